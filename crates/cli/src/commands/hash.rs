//! `nixb hash path|file`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use nixb_store::{Encoding, HashAlgo};

use crate::HashFormat;

#[derive(Subcommand)]
pub enum HashCommand {
    /// Hash the NAR serialisation of a path (as `nix hash path`)
    #[command(after_help = "Example:\n  nixb hash path --base32 ./src")]
    Path(HashArgs),
    /// Hash the contents of a regular file (as `nix hash file`)
    #[command(after_help = "Example:\n  nixb hash file --type sha1 ./foo.tar.gz")]
    File(HashArgs),
}

#[derive(Args)]
pub struct HashArgs {
    /// Hash algorithm: md5, sha1, sha256 or sha512
    #[arg(long = "type", default_value = "sha256", value_parser = parse_algo)]
    pub algo: HashAlgo,
    #[command(flatten)]
    pub format: HashFormat,
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
}

fn parse_algo(s: &str) -> Result<HashAlgo, String> {
    s.parse()
        .map_err(|e: nixb_store::hash::HashError| e.to_string())
}

impl HashFormat {
    pub fn encoding(&self) -> Encoding {
        if self.base16 {
            Encoding::Base16
        } else if self.base32 {
            Encoding::Base32
        } else if self.base64 {
            Encoding::Base64
        } else {
            Encoding::Sri
        }
    }
}

pub fn run(cmd: HashCommand) -> Result<u8> {
    let (args, nar) = match cmd {
        HashCommand::Path(a) => (a, true),
        HashCommand::File(a) => (a, false),
    };
    let enc = args.format.encoding();
    for p in &args.paths {
        let h = if nar {
            nixb_store::nar::hash_path(p, args.algo).map(|(h, _)| h)
        } else {
            nixb_store::nar::hash_file_flat(p, args.algo)
        }
        .with_context(|| format!("hashing {}", p.display()))?;
        // `nix hash` prints bare digests for the non-SRI encodings.
        println!("{}", h.encode(enc));
    }
    Ok(0)
}
