//! `nixb add PATH...`: as `nix-store --add`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

#[derive(Args)]
pub struct AddArgs {
    /// Files or directories to add (by their NAR serialisation, as `nix-store --add`)
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
}

pub fn run(args: AddArgs) -> Result<u8> {
    let store = super::open_store()?;
    for p in &args.paths {
        let added = store
            .add_to_store(p, None)
            .with_context(|| format!("adding {} to the store", p.display()))?;
        println!("{}", store.store_dir().print(&added));
    }
    Ok(0)
}
