//! `nixb substitute`: a substituter for Nix binary caches, speaking the original engine's
//! external-program protocol (`--query`, `--substitute PATH DEST`; see
//! `nixb_binarycache::protocol`). The worker runs it for every `file://` / `http(s)://`
//! entry of `substituters`, passing the cache with `--cache`; run by hand without `--cache`
//! it serves every cache URL in `substituters`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use nixb_binarycache::{BinaryCache, CacheOptions, TrustedKeys};
use nixb_store::StoreDir;

use crate::settings::Settings;

#[derive(Args)]
pub struct SubstituteArgs {
    /// Answer `have PATH...` / `info PATH...` requests on stdin until it ends
    #[arg(long, conflicts_with = "substitute")]
    pub query: bool,
    /// Unpack PATH at DEST (not registering it) and print its expected NAR hash
    #[arg(long, num_args = 2, value_names = ["PATH", "DEST"])]
    pub substitute: Vec<String>,
    /// Use this cache (may be repeated) instead of the URLs in `substituters`
    #[arg(long = "cache", value_name = "URL")]
    pub caches: Vec<String>,
}

/// Whether a `substituters` entry is a binary cache URL (served by `nixb substitute`)
/// rather than an external program.
pub fn is_cache_url(s: &str) -> bool {
    s.starts_with("file://") || s.starts_with("http://") || s.starts_with("https://")
}

/// The cache options that the settings ask for.
pub fn cache_options(s: &Settings) -> Result<CacheOptions> {
    let keys = TrustedKeys::parse_setting(&s.trusted_public_keys.join(" "))
        .context("setting 'trusted-public-keys'")?;
    Ok(CacheOptions {
        trusted_keys: keys,
        require_sigs: s.require_sigs,
        attempts: s.download_attempts,
        ..CacheOptions::default()
    })
}

pub fn run(args: SubstituteArgs, options: &[String]) -> Result<u8> {
    let settings = super::settings(options)?;
    let dir = StoreDir::from_env().context("reading NIX_STORE_DIR")?;
    let urls: Vec<String> = if args.caches.is_empty() {
        settings
            .substituters
            .iter()
            .filter(|s| is_cache_url(s))
            .cloned()
            .collect()
    } else {
        args.caches.clone()
    };
    let opts = cache_options(&settings)?;
    let stdout = std::io::stdout();
    if args.query {
        // A cache that cannot be opened (down, wrong store dir) is left out with a
        // warning: the others may still have the paths.
        let mut caches = Vec::new();
        for u in &urls {
            match BinaryCache::open(u, &dir, opts.clone()) {
                Ok(c) => caches.push(c),
                Err(e) => crate::render::warn(&format!("{e}")),
            }
        }
        if caches.is_empty() {
            // Nothing to offer: answer every request with an empty reply.
            return answer_nothing();
        }
        let mut input = std::io::stdin().lock();
        let mut out = stdout.lock();
        nixb_binarycache::protocol::run_query(&caches, &mut input, &mut out)?;
        return Ok(0);
    }
    let [path, dest] = args.substitute.as_slice() else {
        bail!("expected --query or --substitute PATH DEST");
    };
    let caches = urls
        .iter()
        .map(|u| BinaryCache::open(u, &dir, opts.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    if caches.is_empty() {
        bail!("no binary caches configured (setting 'substituters')");
    }
    let mut out = stdout.lock();
    let mut log = std::io::stderr().lock();
    nixb_binarycache::protocol::run_substitute(
        &caches,
        path,
        &PathBuf::from(dest),
        &mut out,
        &mut log,
    )?;
    Ok(0)
}

/// `--query` with no usable cache: the startup line, then an empty reply to each request.
fn answer_nothing() -> Result<u8> {
    use std::io::BufRead;
    let mut out = std::io::stdout().lock();
    out.write_all(b"\n")?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        if line?.trim().is_empty() {
            continue;
        }
        out.write_all(b"\n")?;
        out.flush()?;
    }
    Ok(0)
}
