//! `nixb copy --to file://DIR PATH...`: write the closure of paths into a binary cache
//! directory in the layout `nix copy --to file://` writes, signing each narinfo with the
//! keys of `secret-key-files`.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use nixb_binarycache::{Compression, SecretKey, WriteOptions};

#[derive(Args)]
pub struct CopyArgs {
    /// The cache to write, `file:///absolute/dir`
    #[arg(long, value_name = "URL")]
    pub to: String,
    /// NAR compression: xz (Nix's default), bzip2, zstd or none
    #[arg(long, default_value = "xz")]
    pub compression: String,
    /// Store paths whose closures to copy
    #[arg(required = true)]
    pub paths: Vec<String>,
}

pub fn run(args: CopyArgs, options: &[String]) -> Result<u8> {
    let settings = super::settings(options)?;
    let Some(dir) = args.to.strip_prefix("file://") else {
        bail!("'{}': only file:// caches can be written", args.to);
    };
    if !dir.starts_with('/') {
        bail!("'{}': a file:// cache needs an absolute directory", args.to);
    }
    let compression = Compression::parse(&args.compression)
        .with_context(|| format!("unknown compression '{}'", args.compression))?;
    let secret_keys = settings
        .secret_key_files
        .iter()
        .map(|f| {
            SecretKey::from_file(&PathBuf::from(f))
                .with_context(|| format!("setting 'secret-key-files': {f}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let store = super::open_store()?;
    let paths = args
        .paths
        .iter()
        .map(|p| super::parse_store_path(&store, p))
        .collect::<Result<BTreeSet<_>>>()?;
    let jobs = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let opts = WriteOptions {
        compression,
        secret_keys,
        jobs,
    };
    let written = nixb_binarycache::copy_to_file_cache(&store, &PathBuf::from(dir), &paths, &opts)?;
    for p in &written {
        crate::render::info(&format!("copied '{}'", store.store_dir().print(p)));
    }
    Ok(0)
}
