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
    let log = nixb_logs::read_log(&store.config().log_dir, p.base_name())
        .with_context(|| format!("reading the build log of {}", dir.print(&p)))?;
    std::io::stdout()
        .write_all(&log)
        .context("writing the log to stdout")?;
    Ok(0)
}
