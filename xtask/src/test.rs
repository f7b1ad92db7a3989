//! `cargo xtask test`: the whole suite, as CI runs it.
use anyhow::{bail, Result};
use std::process::Command;

pub fn run(_args: &[String]) -> Result<()> {
    crate::deps::ensure()?;
    let root = crate::workspace_root();
    let status = Command::new(env!("CARGO"))
        .current_dir(&root)
        .args(["test", "--workspace", "--exclude", "xtask"])
        .status()?;
    if !status.success() {
        bail!("cargo test failed");
    }
    crate::vm::run(&[])
}
