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

use crate::remote::StoreUri;
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

/// How a command stands to `--store` / `NIX_REMOTE`.
enum StoreUse {
    /// Works on the store directly or through a daemon.
    Either,
    /// Works on the store directly only: refused when a daemon is chosen, by the flag or
    /// by `NIX_REMOTE`, rather than going around the daemon.
    Direct(&'static str),
    /// Serves or helps the store here, or touches no store: `NIX_REMOTE` does not apply
    /// (as for `nix-daemon`), and `--store` naming a daemon is refused.
    Own(&'static str),
}

fn store_use(command: &Command) -> StoreUse {
    match command {
        Command::Realise(_) | Command::Query(_) | Command::Log(_) | Command::Add(_) => {
            StoreUse::Either
        }
        Command::Derivation(_) => StoreUse::Direct("derivation"),
        Command::Dump(_) => StoreUse::Direct("dump"),
        Command::Verify(_) => StoreUse::Direct("verify"),
        Command::Gc(_) => StoreUse::Direct("gc"),
        Command::Copy(_) => StoreUse::Direct("copy"),
        Command::Restore(_) => StoreUse::Own("restore"),
        Command::Hash(_) => StoreUse::Own("hash"),
        Command::Substitute(_) => StoreUse::Own("substitute"),
        Command::Serve(_) => StoreUse::Own("serve"),
        Command::Daemon(_) => StoreUse::Own("daemon"),
        Command::BuildRemote(_) => StoreUse::Own("build-remote"),
    }
}

/// The store the command works on, or why it cannot work on the one chosen.
fn chosen_store(cli: &Cli) -> Result<StoreUri> {
    let uri = match store_use(&cli.command) {
        StoreUse::Own(_) => match &cli.store {
            Some(v) => StoreUri::parse(v, &format!("--store '{v}'"))?,
            None => StoreUri::Local,
        },
        _ => StoreUri::resolve(cli.store.as_deref())?,
    };
    match (store_use(&cli.command), &uri) {
        (StoreUse::Direct(name) | StoreUse::Own(name), StoreUri::Daemon { origin, .. }) => {
            anyhow::bail!(
                "'nixb {name}' works on the store directly and not through a daemon, but \
                 {origin} chooses one; run it without --store and with NIX_REMOTE unset or \
                 'local', as a user who may open the store (realise, query, add and log \
                 work through a daemon)"
            )
        }
        _ => Ok(uri),
    }
}

pub fn run(cli: Cli) -> Result<u8> {
    let store = chosen_store(&cli)?;
    // An override that nothing reads would be silently ignored: say so instead.
    if let (Some(name), Some(setting)) = (reads_no_settings(&cli.command), cli.options.first()) {
        anyhow::bail!(
            "'nixb {name}' reads no settings, so '--option {setting} …' would have no effect; \
             drop it (settings apply to realise, gc, query --roots, substitute, copy, serve and \
             build-remote)"
        );
    }
    match cli.command {
        Command::Realise(a) => realise::run(a, &cli.options, &store),
        Command::Query(a) => query::run(a, &cli.options, &store),
        Command::Log(a) => log::run(a, &store),
        Command::Add(a) => add::run(a, &store),
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
    parse_store_path_in(store.store_dir(), arg)
}

/// [`parse_store_path`] in the store directory `dir` (a daemon's store, client mode).
pub fn parse_store_path_in(dir: &nixb_store::StoreDir, arg: &str) -> Result<nixb_store::StorePath> {
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
