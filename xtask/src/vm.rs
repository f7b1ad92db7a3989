//! `cargo xtask test-vm`: not yet written.
use anyhow::{bail, Result};

pub fn run(_args: &[String]) -> Result<()> {
    bail!("test-vm is not implemented yet")
}
