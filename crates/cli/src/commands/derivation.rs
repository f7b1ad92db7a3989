//! `nixb derivation add|show`: derivations as JSON, in the shape `nix show-derivation` prints.

use std::io::Read;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use nixb_store::derivation::Derivation;
use serde_json::{Map, Value};

#[derive(Subcommand)]
pub enum DerivationCommand {
    /// Read a derivation as JSON on stdin, write its .drv into the store, print its path
    #[command(after_help = "\
The input is what `nix show-derivation` prints (an object keyed by the .drv path; the key is
checked against the path nixb computes) or a bare derivation object. Output paths that are
empty or missing are computed, as `nix derivation add` does; given ones are checked.

Example:
  nix show-derivation /nix/store/…-hello.drv | nixb derivation add")]
    Add(AddArgs),
    /// Print derivations as JSON (as `nix show-derivation`)
    #[command(after_help = "Example:\n  nixb derivation show /nix/store/…-hello.drv")]
    Show(ShowArgs),
}

#[derive(Args)]
pub struct AddArgs {}

#[derive(Args)]
pub struct ShowArgs {
    /// .drv paths (or output paths: their deriver is shown)
    #[arg(required = true)]
    pub paths: Vec<String>,
}

pub fn run(cmd: DerivationCommand) -> Result<u8> {
    match cmd {
        DerivationCommand::Add(_) => add(),
        DerivationCommand::Show(a) => show(a),
    }
}

fn add() -> Result<u8> {
    let store = super::open_store()?;
    let dir = store.store_dir().clone();
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .context("reading derivation JSON from stdin")?;
    let value: Value = serde_json::from_str(&text).context("parsing derivation JSON from stdin")?;
    // Either { "/nix/store/…drv": {…} , …} or a bare derivation object.
    let entries: Vec<(Option<String>, Value)> = match &value {
        Value::Object(m) if m.contains_key("outputs") => vec![(None, value.clone())],
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| (Some(k.clone()), v.clone()))
            .collect(),
        _ => bail!("derivation JSON on stdin: expected an object"),
    };
    if entries.is_empty() {
        bail!("derivation JSON on stdin: no derivation in the object");
    }
    let mut cache = nixb_store::derivation::DrvHashCache::new();
    for (key, v) in entries {
        let origin = key.clone().unwrap_or_else(|| "<stdin>".into());
        let mut drv = Derivation::from_json(&dir, &v, &origin)?;
        let mut resolve = |p: &nixb_store::StorePath| Derivation::read(&dir, &dir.to_path(p));
        nixb_store::derivation::compute_output_paths(&dir, &mut drv, &mut resolve, &mut cache)
            .with_context(|| format!("computing output paths of {origin}"))?;
        let path = store
            .add_derivation(&drv)
            .with_context(|| format!("adding {origin}"))?;
        let printed = dir.print(&path);
        if let Some(k) = key {
            if k != printed {
                bail!("derivation JSON key {k} does not match the path of its contents, {printed}");
            }
        }
        println!("{printed}");
    }
    Ok(0)
}

fn show(args: ShowArgs) -> Result<u8> {
    let store = super::open_store()?;
    let dir = store.store_dir().clone();
    let mut out = Map::new();
    for arg in &args.paths {
        let mut p = super::parse_store_path(&store, arg)?;
        if !p.is_derivation() {
            let info = store
                .query_path_info(&p)?
                .with_context(|| format!("path '{}' is not valid", dir.print(&p)))?;
            p = info
                .deriver
                .with_context(|| format!("path '{}' has no known deriver", dir.print(&p)))?;
        }
        let drv = store
            .read_derivation(&p)
            .with_context(|| format!("reading derivation {}", dir.print(&p)))?;
        out.insert(dir.print(&p), drv.to_json(&dir));
    }
    println!("{}", serde_json::to_string_pretty(&Value::Object(out))?);
    Ok(0)
}
