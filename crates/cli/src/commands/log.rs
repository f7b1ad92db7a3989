//! `nixb log DRV|OUTPUT`: the stored build log, decompressed.

use std::io::Write;

use anyhow::{Context, Result};
use clap::Args;

#[derive(Args)]
pub struct LogArgs {
    /// A .drv path, or an output path (its deriver's log is printed)
    pub path: String,
}

pub fn run(args: LogArgs) -> Result<u8> {
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
    // Streamed: a log can be far larger than memory (Nix keeps up to max-build-log-size,
    // unlimited by default), and `nixb log | less` should start at once.
    let mut log = nixb_logs::open_log(&store.config().log_dir, p.base_name())
        .with_context(|| format!("reading the build log of {}", dir.print(&p)))?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match std::io::copy(&mut log, &mut out).and_then(|_| out.flush()) {
        Ok(()) => Ok(0),
        // The reader went away (`nixb log … | head`): nothing is lost that anyone wanted.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(0),
        Err(e) => {
            Err(e).with_context(|| format!("copying the build log of {} to stdout", dir.print(&p)))
        }
    }
}
