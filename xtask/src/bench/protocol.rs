//! Bench group `protocol`: a connection's greeting and `SetOptions`, the same client
//! against real `nix-daemon` 2.8 and against nixb-protocol's `ServerConnection` with no
//! engine (the `handshake_bench` example of nixb-protocol, release build; see its doc).

use anyhow::{bail, Result};

pub fn run() -> Result<()> {
    let status =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "run",
                "--quiet",
                "--release",
                "-p",
                "nixb-protocol",
                "--example",
                "handshake_bench",
            ])
            .status()?;
    if !status.success() {
        bail!("handshake_bench failed: {status}");
    }
    Ok(())
}
