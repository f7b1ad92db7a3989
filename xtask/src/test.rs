//! `cargo xtask test`: the whole suite, as CI runs it.
use anyhow::{bail, Result};
use std::process::Command;

pub fn run(_args: &[String]) -> Result<()> {
    crate::deps::ensure()?;
    crate::lint::run(&[])?;
    let root = crate::workspace_root();
    let status = Command::new(env!("CARGO"))
        .current_dir(&root)
        .args(["test", "--workspace", "--exclude", "xtask"])
        .status()?;
    if !status.success() {
        bail!("cargo test failed");
    }
    // xtask's own unit tests (cpio writer, kernel extraction, exit marker): a separate
    // harness binary, so building it does not replace the running xtask.
    let status = Command::new(env!("CARGO"))
        .current_dir(&root)
        .args(["test", "-p", "xtask", "--bins"])
        .status()?;
    if !status.success() {
        bail!("cargo test -p xtask failed");
    }
    crate::vm::run(&[])
}
