//! `nixb log DRV|OUTPUT`: the stored build log, decompressed.

use std::io::Write;

use anyhow::{Context, Result};
use clap::Args;
use nixb_protocol::{Request, Response};

use crate::remote::{op_error, Remote, StoreUri};

#[derive(Args)]
pub struct LogArgs {
    /// A .drv path, or an output path (its deriver's log is printed)
    pub path: String,
}

pub fn run(args: LogArgs, store: &StoreUri) -> Result<u8> {
    if let StoreUri::Daemon { socket, origin } = store {
        return run_remote(&args, &mut Remote::connect_plain(socket, origin)?);
    }
    let store = super::open_store()?;
    let dir = store.store_dir().clone();
    let mut p = super::parse_store_path(&store, &args.path)?;
    if !p.is_derivation() {
        let info = store
            .query_path_info(&p)?
            .with_context(|| format!("path '{}' is not valid", dir.print(&p)))?;
        p = info.deriver.with_context(|| {
            format!(
                "path '{}' has no known deriver, so no build log",
                dir.print(&p)
            )
        })?;
    }
    copy_log(&store.config().log_dir, &dir, &p)
}

/// Through a daemon: the deriver from the daemon (`QueryPathInfo`), the log from the log
/// directory here (`NIX_LOG_DIR`), as Nix's daemon-backed store reads it.
fn run_remote(args: &LogArgs, remote: &mut Remote) -> Result<u8> {
    let dir = remote.dir.clone();
    let mut p = super::parse_store_path_in(&dir, &args.path)?;
    if !p.is_derivation() {
        let printed = dir.print(&p);
        let answer = remote
            .client
            .request(&Request::QueryPathInfo(p.clone()), None, &mut |_| {});
        let info = match answer.map_err(|e| op_error(remote, &format!("describe {printed}"), e))? {
            Response::PathInfo(Some(i)) => i,
            Response::PathInfo(None) => anyhow::bail!("path '{printed}' is not valid"),
            r => anyhow::bail!("the daemon answered {r:?} when asked to describe {printed}"),
        };
        p = info
            .deriver
            .with_context(|| format!("path '{printed}' has no known deriver, so no build log"))?;
    }
    let cfg = nixb_store::local_store::StoreConfig::from_env()
        .context("reading the log directory from the environment")?;
    copy_log(&cfg.log_dir, &dir, &p)
}

/// Copies the build log of `p` to stdout, decompressed.
fn copy_log(
    log_dir: &std::path::Path,
    dir: &nixb_store::StoreDir,
    p: &nixb_store::StorePath,
) -> Result<u8> {
    // Streamed: a log can be far larger than memory (Nix keeps up to max-build-log-size,
    // unlimited by default), and `nixb log | less` should start at once.
    let mut log = nixb_logs::open_log(log_dir, p.base_name())
        .with_context(|| format!("reading the build log of {}", dir.print(p)))?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match std::io::copy(&mut log, &mut out).and_then(|_| out.flush()) {
        Ok(()) => Ok(0),
        // The reader went away (`nixb log … | head`): nothing is lost that anyone wanted.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(0),
        Err(e) => {
            Err(e).with_context(|| format!("copying the build log of {} to stdout", dir.print(p)))
        }
    }
}
