//! `cargo xtask`: the project's own automation.
//!
//! ```text
//! cargo xtask test        install what the suite needs (as root, on Debian), then run every test
//! cargo xtask lint        cargo fmt --check, clippy -D warnings, no unused dependency
//! cargo xtask test-vm     boot a throw-away VM as root and run the VM suites inside it
//! cargo xtask bench       benchmarks, side by side with real Nix and reference tools
//! ```

mod bench;
mod demo;
mod deps;
mod lint;
mod test;
mod vm;

use anyhow::{bail, Result};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let cmd = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    match cmd.as_str() {
        "test" => test::run(&rest),
        "test-vm" => vm::run(&rest),
        "lint" => lint::run(&rest),
        "bench" => bench::run(&rest),
        "demo" => demo::run(&rest),
        "" | "help" | "--help" | "-h" => {
            println!("{}", HELP);
            Ok(())
        }
        other => bail!("unknown xtask '{other}'\n\n{HELP}"),
    }
}

const HELP: &str = "\
usage: cargo xtask <command>

  demo       build nixb, add the bundled example to ./demo-store and realise it

  test       install missing Debian packages (nix-bin, qemu-system-x86, linux-image-amd64,
             busybox-static, ...) when root, then lint and run the whole suite including
             test-vm
  lint       cargo fmt --check, cargo clippy -D warnings (with the workspace's lints), and
             no unused dependency; `test` runs it first
  test-vm    build nixb and the VM test programs, boot a QEMU VM as root, run them inside
  bench      run the benchmarks side by side with real Nix 2.8 and reference tools
             (`cargo xtask bench NAME` runs one group)";

/// Root of the workspace (xtask lives one level below it).
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// Builds the `nixb` binary (debug profile) and returns its path.
pub fn build_nixb(root: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    let status = std::process::Command::new(env!("CARGO"))
        .current_dir(root)
        .args(["build", "--quiet", "-p", "nixb-cli", "--bin", "nixb"])
        .status()?;
    if !status.success() {
        anyhow::bail!("building nixb failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target.join("debug/nixb"))
}

/// Builds the `nixb` binary with the release profile (for benchmarks) and returns its path.
pub fn build_nixb_release(root: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    let status = std::process::Command::new(env!("CARGO"))
        .current_dir(root)
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "nixb-cli",
            "--bin",
            "nixb",
        ])
        .status()?;
    if !status.success() {
        anyhow::bail!("building nixb (release) failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target.join("release/nixb"))
}
