//! `nixb dump` and `nixb restore`: NAR archives on stdout / stdin.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

#[derive(Args)]
pub struct DumpArgs {
    /// The file, directory or symlink to serialise (need not be in the store)
    pub path: PathBuf,
}

#[derive(Args)]
pub struct RestoreArgs {
    /// Where to unpack; must not exist yet
    pub dest: PathBuf,
}

pub fn dump(args: DumpArgs) -> Result<u8> {
    let stdout = std::io::stdout().lock();
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, stdout);
    nixb_store::nar::dump_path(&args.path, &mut out)
        .with_context(|| format!("dumping {}", args.path.display()))?;
    out.flush().context("writing the NAR to stdout")?;
    Ok(0)
}

pub fn restore(args: RestoreArgs) -> Result<u8> {
    let stdin = std::io::stdin().lock();
    let mut input = std::io::BufReader::with_capacity(256 * 1024, stdin);
    nixb_store::nar::restore_path(&mut input, &args.dest)
        .with_context(|| format!("restoring a NAR from stdin into {}", args.dest.display()))?;
    Ok(0)
}
