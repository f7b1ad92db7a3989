//! One module per subcommand; `run` opens what the command needs and dispatches.

pub mod add;
pub mod build_remote;
pub mod copy;
pub mod daemon;
pub mod derivation;
pub mod gc;
pub mod hash;
pub mod log;
pub mod nar;
pub mod query;
pub mod realise;
pub mod serve;
pub mod substitute;
pub mod verify;

use anyhow::{Context, Result};
use nixb_store::local_store::{LocalStore, StoreConfig};

use crate::settings::Settings;
use crate::{render, Cli, Command};

/// Settings from nix.conf with `--option` overrides applied.
pub fn settings(options: &[String]) -> Result<Settings> {
    let mut s = Settings::load()?;
    for pair in options.chunks(2) {
        if let [name, value] = pair {
            s.set(name, value, "--option")?;
        }
    }
    for w in &s.warnings {
        render::warn(w);
    }
    Ok(s)
}

/// Opens the store named by NIX_STORE_DIR / NIX_STATE_DIR / NIX_LOG_DIR.
pub fn open_store() -> Result<LocalStore> {
    let cfg = StoreConfig::from_env().context("reading the store location from the environment")?;
    let state = cfg.state_dir.display().to_string();
    LocalStore::open(cfg).with_context(|| format!("opening the Nix store database under {state}"))
}

/// The name of a command that reads no setting, for refusing `--option` on it.
fn reads_no_settings(command: &Command) -> Option<&'static str> {
    match command {
        // --roots reads keep-outputs and keep-derivations; the other queries read nothing.
        Command::Query(a) if !a.roots => Some("query"),
        Command::Log(_) => Some("log"),
        Command::Add(_) => Some("add"),
        Command::Derivation(_) => Some("derivation"),
        Command::Dump(_) => Some("dump"),
        Command::Restore(_) => Some("restore"),
        Command::Hash(_) => Some("hash"),
        Command::Verify(_) => Some("verify"),
        Command::Realise(_)
        | Command::Query(_)
        | Command::Gc(_)
        | Command::Substitute(_)
        | Command::Copy(_)
        | Command::Serve(_)
        | Command::Daemon(_)
        | Command::BuildRemote(_) => None,
    }
}

pub fn run(cli: Cli) -> Result<u8> {
    // An override that nothing reads would be silently ignored: say so instead.
    if let (Some(name), Some(setting)) = (reads_no_settings(&cli.command), cli.options.first()) {
        anyhow::bail!(
            "'nixb {name}' reads no settings, so '--option {setting} …' would have no effect; \
             drop it (settings apply to realise, gc, query --roots, substitute, copy, serve and \
             build-remote)"
        );
    }
    match cli.command {
        Command::Realise(a) => realise::run(a, &cli.options),
        Command::Query(a) => query::run(a, &cli.options),
        Command::Log(a) => log::run(a),
        Command::Add(a) => add::run(a),
        Command::Derivation(c) => derivation::run(c),
        Command::Dump(a) => nar::dump(a),
        Command::Restore(a) => nar::restore(a),
        Command::Hash(c) => hash::run(c),
        Command::Verify(a) => verify::run(a),
        Command::Gc(a) => gc::run(a, &cli.options),
        Command::Substitute(a) => substitute::run(a, &cli.options),
        Command::Copy(a) => copy::run(a, &cli.options),
        Command::Serve(a) => serve::run(a, &cli.options),
        Command::Daemon(a) => daemon::run(a, &cli.options),
        Command::BuildRemote(a) => build_remote::run(a, &cli.options),
    }
}

/// Parses a command-line argument as a store path, following a symlink into the store
/// (as Nix does for `./result`) when it is not one literally.
pub fn parse_store_path(store: &LocalStore, arg: &str) -> Result<nixb_store::StorePath> {
    let dir = store.store_dir();
    if let Ok(p) = dir.parse(arg) {
        return Ok(p);
    }
    // A relative path, or a symlink into the store such as `./result`.
    if let Ok(abs) = std::path::absolute(arg) {
        if let Ok(p) = dir.parse(&abs.to_string_lossy()) {
            return Ok(p);
        }
    }
    if let Ok(target) = std::fs::canonicalize(arg) {
        if let Ok(p) = dir.parse_prefix(&target.to_string_lossy()) {
            return Ok(p);
        }
    }
    dir.parse_prefix(arg)
        .with_context(|| format!("'{arg}' is not a path in the store {}", dir.as_str()))
}
