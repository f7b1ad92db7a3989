//! `nixb realise`: build (or find valid) the outputs of derivations and print their paths.

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use nixb_goals::{BuildMode, HookCommand, Substituter, SubstituterCommand, WorkerConfig};
use nixb_store::DerivedPath;

use crate::render::{EventRenderer, RenderMode};
use crate::settings::Settings;

#[derive(Args)]
pub struct RealiseArgs {
    /// Derivations (`DRV` or `DRV!OUT,OUT`) or store paths to realise
    #[arg(required = true)]
    pub targets: Vec<String>,
    /// Builds to run at once (setting `max-jobs`)
    #[arg(long, short = 'j')]
    pub max_jobs: Option<usize>,
    /// Cores each builder may use, as NIX_BUILD_CORES (setting `cores`; 0 = all)
    #[arg(long)]
    pub cores: Option<usize>,
    /// Keep building other derivations after one fails (setting `keep-going`)
    #[arg(long, short = 'k')]
    pub keep_going: bool,
    /// Keep the build directory of failed builds (setting `keep-failed`)
    #[arg(long, short = 'K')]
    pub keep_failed: bool,
    /// Rebuild and compare with the registered outputs
    #[arg(long, conflicts_with = "repair")]
    pub check: bool,
    /// Rebuild outputs in the closure that are missing or corrupt
    #[arg(long)]
    pub repair: bool,
    /// Kill a builder that writes nothing for SECS seconds (setting `max-silent-time`)
    #[arg(long, value_name = "SECS")]
    pub max_silent_time: Option<u64>,
    /// Kill a builder that runs longer than SECS seconds (setting `timeout`)
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// Print `@ build-started` / `@ build-succeeded` / `@ build-failed` lines on stderr
    #[arg(long)]
    pub print_build_trace: bool,
    /// Report progress as one JSON object a line on stderr, for tools
    #[arg(long, conflicts_with = "print_build_trace")]
    pub json: bool,
    /// Build from source when substituting a derivation's outputs fails (setting `fallback`)
    #[arg(long)]
    pub fallback: bool,
}

pub fn run(args: RealiseArgs, options: &[String]) -> Result<u8> {
    let mut settings = super::settings(options)?;
    apply_flags(&mut settings, &args)?;
    let store = super::open_store()?;
    let dir = store.store_dir().clone();
    let targets: Vec<DerivedPath> = args
        .targets
        .iter()
        .map(|t| {
            // `./result` or a relative .drv path stand for the store path they lead to.
            let (path, outputs) = match t.split_once('!') {
                Some((p, o)) => (p, Some(o)),
                None => (t.as_str(), None),
            };
            let p = super::parse_store_path(&store, path)?;
            let full = match outputs {
                Some(o) => format!("{}!{o}", dir.print(&p)),
                None => dir.print(&p),
            };
            DerivedPath::parse(&dir, &full).with_context(|| format!("argument '{t}'"))
        })
        .collect::<Result<_>>()?;

    super::gc::auto_gc(&store, &settings, &targets)?;
    let cfg = worker_config(&settings, &store, &args);
    let mode = if args.json {
        RenderMode::Json
    } else if args.print_build_trace {
        RenderMode::Trace
    } else {
        RenderMode::Human
    };
    let mut renderer = EventRenderer::new(mode, dir.clone());
    let outcome = nixb_goals::realise(&store, &targets, &cfg, &mut renderer)?;
    renderer.finish();
    for (_, outputs) in &outcome.outputs {
        for p in outputs.values() {
            println!("{}", dir.print(p));
        }
    }
    Ok(u8::try_from(outcome.exit_status).unwrap_or(1))
}

fn apply_flags(s: &mut Settings, a: &RealiseArgs) -> Result<()> {
    if let Some(n) = a.max_jobs {
        s.max_jobs = n;
    }
    if let Some(n) = a.cores {
        s.cores = n;
    }
    if a.keep_going {
        s.keep_going = true;
    }
    if a.keep_failed {
        s.keep_failed = true;
    }
    if let Some(t) = a.max_silent_time {
        s.max_silent_time = (t > 0).then(|| Duration::from_secs(t));
    }
    if let Some(t) = a.timeout {
        s.timeout = (t > 0).then(|| Duration::from_secs(t));
    }
    if a.fallback {
        s.fallback = true;
    }
    Ok(())
}

/// Maps the settings the worker cares about onto its own config struct.
fn worker_config(
    s: &Settings,
    store: &nixb_store::local_store::LocalStore,
    a: &RealiseArgs,
) -> WorkerConfig {
    let mut cfg = settings_worker_config(s, store);
    cfg.build_mode = if a.check {
        BuildMode::Check
    } else if a.repair {
        BuildMode::Repair
    } else {
        BuildMode::Normal
    };
    cfg
}

/// The worker config of the settings alone (`nixb serve` builds with it too).
pub fn settings_worker_config(
    s: &Settings,
    store: &nixb_store::local_store::LocalStore,
) -> WorkerConfig {
    let mut cfg = WorkerConfig::new(store.config().log_dir.clone());
    cfg.max_jobs = s.max_jobs;
    cfg.cores = if s.cores == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        s.cores
    };
    cfg.max_silent_time = s.max_silent_time;
    cfg.timeout = s.timeout;
    cfg.keep_going = s.keep_going;
    cfg.keep_failed = s.keep_failed;
    cfg.cache_failure = s.cache_failure;
    cfg.build_poll_interval = s.build_poll_interval;
    cfg.log.compress = s.compress_build_log;
    cfg.log.keep = s.keep_build_log;
    cfg.log.max_size = s.max_build_log_size;
    cfg.auto_optimise = s.auto_optimise_store;
    cfg.use_substitutes = s.use_substitutes;
    cfg.system = s.system.clone();
    cfg.system_features = s.system_features.iter().cloned().collect();
    if s.auto_allocate_uids {
        // As Nix 2.12: a block of uids per build lets a build have all of them.
        cfg.system_features.insert("uid-range".into());
    }
    cfg.sandbox = match s.sandbox {
        crate::settings::SandboxMode::Off => nixb_goals::SandboxMode::Off,
        crate::settings::SandboxMode::On => nixb_goals::SandboxMode::On,
        crate::settings::SandboxMode::Relaxed => nixb_goals::SandboxMode::Relaxed,
    };
    cfg.sandbox_fallback = s.sandbox_fallback;
    cfg.use_cgroups = s.use_cgroups;
    cfg.auto_allocate_uids = s.auto_allocate_uids;
    cfg.start_id = s.start_id;
    cfg.id_count = s.id_count;
    cfg.sandbox_paths = s.sandbox_paths.clone();
    cfg.build_users_group = Some(s.build_users_group.clone()).filter(|g| !g.is_empty());
    cfg.impersonate_linux_26 = s.impersonate_linux_26;
    cfg.state_dir = store.config().state_dir.clone();
    cfg.fallback = s.fallback;
    cfg.substituters = substituters(s);
    cfg.cache_options = match super::substitute::cache_options(s) {
        Ok(o) => o,
        Err(e) => {
            // Fail closed: with no trusted key, every signed path is refused too.
            crate::render::warn(&format!("{e:#}; no binary cache path will be trusted"));
            nixb_binarycache::CacheOptions {
                require_sigs: true,
                ..Default::default()
            }
        }
    };
    // The built-in substituter's threads: at least as many as builds may run.
    cfg.substitution_jobs = cfg.substitution_jobs.max(s.max_jobs);
    cfg.build_hook = hook_command(s);
    cfg
}

/// `nixb` itself, to run as `nixb substitute` / `nixb build-remote`.
fn self_exe() -> std::path::PathBuf {
    std::env::current_exe().unwrap_or_else(|_| "nixb".into())
}

/// `substituters`: cache URLs are read in-process by the worker's built-in substituter
/// (with `trusted-public-keys` and `require-sigs` in `cache_options`); anything else is an
/// external program speaking the original's protocol.
fn substituters(s: &Settings) -> Vec<Substituter> {
    s.substituters
        .iter()
        .map(|sub| {
            if super::substitute::is_cache_url(sub) {
                Substituter::BinaryCache { url: sub.clone() }
            } else {
                Substituter::External(SubstituterCommand {
                    name: sub.clone(),
                    program: sub.into(),
                    args: Vec::new(),
                })
            }
        })
        .collect()
}

/// `build-hook` (or NIX_BUILD_HOOK, as the original); otherwise `nixb build-remote` when
/// `builders` names machines; otherwise none.
fn hook_command(s: &Settings) -> Option<HookCommand> {
    let explicit = s.build_hook.clone().or_else(|| {
        std::env::var("NIX_BUILD_HOOK")
            .ok()
            .filter(|h| !h.is_empty())
    });
    if let Some(h) = explicit {
        return Some(HookCommand {
            program: h.into(),
            args: Vec::new(),
        });
    }
    if s.builders.is_empty() {
        return None;
    }
    Some(HookCommand {
        program: self_exe(),
        args: vec![
            "build-remote".into(),
            "--option".into(),
            "builders".into(),
            s.builders.join(" "),
            "--option".into(),
            "builders-use-substitutes".into(),
            s.builders_use_substitutes.to_string(),
        ],
    })
}
