//! `substitute_closure CACHE_URL PUBLIC_KEY JOBS PATH...`: makes the closures of PATH valid
//! in the store named by NIX_STORE_DIR / NIX_STATE_DIR / NIX_LOG_DIR, fetching from one cache.
//! Used by `cargo xtask bench substitute` to measure the library in a process of its own.

use std::collections::BTreeSet;
use std::process::ExitCode;

use nixb_binarycache::{substitute_closure, BinaryCache, CacheOptions, TrustedKeys};
use nixb_store::local_store::{LocalStore, StoreConfig};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        eprintln!("usage: substitute_closure CACHE_URL PUBLIC_KEY JOBS PATH...");
        return ExitCode::from(2);
    }
    match run(&args) {
        Ok(n) => {
            eprintln!("substituted {n} paths");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<usize, Box<dyn std::error::Error>> {
    let store = LocalStore::open(StoreConfig::from_env()?)?;
    let opts = CacheOptions {
        trusted_keys: TrustedKeys::parse_setting(&args[1])?,
        ..CacheOptions::default()
    };
    let cache = BinaryCache::open(&args[0], store.store_dir(), opts)?;
    let jobs: usize = args[2].parse()?;
    let mut paths = BTreeSet::new();
    for p in &args[3..] {
        paths.insert(store.store_dir().parse(p)?);
    }
    Ok(
        substitute_closure(&store, std::slice::from_ref(&cache), &paths, jobs)?
            .substituted
            .len(),
    )
}
