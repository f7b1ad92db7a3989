//! `nixb serve [--write]`: the `nix-store --serve` protocol on stdin/stdout, so that any Nix
//! (or nixb) machine can copy paths to and from this store and build here over SSH. Builds
//! run on the real engine ([`EngineBuilder`]), with this machine's settings; their logs go
//! to stderr, which SSH carries back to the client.

use std::collections::BTreeSet;
use std::io::Write;

use anyhow::Result;
use clap::Args;
use nixb_goals::{
    BuildStore, Event, EventSink, FailureKind, Level, NewOutput, PathInfo, StoreFault,
    SubstitutedPath,
};
use nixb_serve::proto::{BuildOptions, BuildResult, BuildStatus};
use nixb_serve::server::RemoteBuilder;
use nixb_store::derivation::Derivation;
use nixb_store::local_store::LocalStore;
use nixb_store::{DerivedPath, StoreDir, StorePath};

use crate::settings::Settings;

#[derive(Args)]
pub struct ServeArgs {
    /// Allow the client to add paths and build (nix-store --serve --write)
    #[arg(long)]
    pub write: bool,
    /// Accepted for compatibility with `nix-store --serve` command lines; no effect
    #[arg(long, hide = true)]
    pub serve: bool,
}

pub fn run(args: ServeArgs, options: &[String]) -> Result<u8> {
    let settings = super::settings(options)?;
    let store = super::open_store()?;
    let mut builder = EngineBuilder { settings };
    nixb_serve::server::serve(
        std::io::stdin().lock(),
        std::io::stdout().lock(),
        &store,
        &mut builder,
        args.write,
    )?;
    Ok(0)
}

/// Builds what a serve client asks for with the worker, as a local `nixb realise` would.
pub struct EngineBuilder {
    pub settings: Settings,
}

/// Where the worker's events go while serving: the build log and errors on stderr (never
/// stdout, which carries the protocol).
struct StderrSink;

impl EventSink for StderrSink {
    fn event(&mut self, e: Event) {
        let mut err = std::io::stderr().lock();
        let _ = match e {
            Event::BuildLog { chunk, .. } => err.write_all(&chunk),
            Event::Message {
                level: Level::Error,
                text,
            } => writeln!(err, "error: {text}"),
            Event::HookOutput { text, .. } => writeln!(err, "{text}"),
            Event::BuildFailed { reason, .. } => writeln!(err, "error: {reason}"),
            _ => Ok(()),
        };
    }
}

impl EngineBuilder {
    fn config(&self, store: &LocalStore, options: &BuildOptions) -> nixb_goals::WorkerConfig {
        let mut cfg = super::realise::settings_worker_config(&self.settings, store);
        // The client's limits win, as with nix-store --serve.
        if options.max_silent_time > 0 {
            cfg.max_silent_time = Some(std::time::Duration::from_secs(options.max_silent_time));
        }
        if options.build_timeout > 0 {
            cfg.timeout = Some(std::time::Duration::from_secs(options.build_timeout));
        }
        if options.max_log_size > 0 {
            cfg.log.max_size = Some(options.max_log_size);
        }
        cfg.keep_failed = options.keep_failed;
        // A served build is never handed on again: that could loop between machines.
        cfg.build_hook = None;
        cfg
    }

    fn realise(
        &self,
        store: &dyn BuildStore,
        targets: &[DerivedPath],
        cfg: &nixb_goals::WorkerConfig,
    ) -> Result<(), (BuildStatus, String)> {
        let outcome = nixb_goals::realise(store, targets, cfg, &mut StderrSink)
            .map_err(|e| (BuildStatus::MiscFailure, e.to_string()))?;
        if outcome.exit_status == 0 {
            return Ok(());
        }
        let Some(f) = outcome.failures.first() else {
            return Err((
                BuildStatus::MiscFailure,
                format!("build failed with status {}", outcome.exit_status),
            ));
        };
        let status = match f.kind {
            FailureKind::BuilderFailed => BuildStatus::PermanentFailure,
            FailureKind::TimedOut => BuildStatus::TimedOut,
            FailureKind::LogLimitExceeded => BuildStatus::LogLimitExceeded,
            FailureKind::HashMismatch => BuildStatus::OutputRejected,
            FailureKind::NotDeterministic => BuildStatus::NotDeterministic,
            FailureKind::CachedFailure => BuildStatus::CachedFailure,
            FailureKind::DependencyFailed => BuildStatus::DependencyFailed,
            FailureKind::SetupFailed => BuildStatus::MiscFailure,
        };
        Err((status, f.message.clone()))
    }
}

impl RemoteBuilder for EngineBuilder {
    fn build_derivation(
        &mut self,
        store: &LocalStore,
        drv_path: &StorePath,
        drv: &Derivation,
        options: &BuildOptions,
    ) -> BuildResult {
        BuildResult::of_build(|| {
            let cfg = self.config(store, options);
            let wire = WireDrvStore {
                inner: store,
                drv_path: drv_path.clone(),
                drv: drv.clone(),
            };
            let targets = [DerivedPath::Built {
                drv: drv_path.clone(),
                outputs: Vec::new(),
            }];
            self.realise(&wire, &targets, &cfg)
        })
    }

    fn build_paths(
        &mut self,
        store: &LocalStore,
        paths: &[DerivedPath],
        options: &BuildOptions,
    ) -> Result<(), (BuildStatus, String)> {
        let cfg = self.config(store, options);
        self.realise(store, paths, &cfg)
    }

    /// The worker substitutes plain paths from this machine's `substituters`; a path
    /// none of them has stays missing (the client then sends it), so failures are only
    /// warnings, as in `nix-store --serve`.
    fn substitute_paths(&mut self, store: &LocalStore, paths: &BTreeSet<StorePath>) {
        let mut cfg = self.config(store, &BuildOptions::default());
        // One path nobody has must not stop the others.
        cfg.keep_going = true;
        let targets: Vec<DerivedPath> = paths.iter().cloned().map(DerivedPath::Opaque).collect();
        if let Err((_, msg)) = self.realise(store, &targets, &cfg) {
            eprintln!("warning: substituting inputs: {msg}");
        }
    }
}

/// The store as the worker sees it while building a derivation received over the wire:
/// the real store, plus that derivation, which need not exist here as a `.drv` file (the
/// client sends a `BasicDerivation`: its inputs are all sources, already copied over).
struct WireDrvStore<'a> {
    inner: &'a LocalStore,
    drv_path: StorePath,
    drv: Derivation,
}

impl BuildStore for WireDrvStore<'_> {
    fn store_dir(&self) -> &StoreDir {
        self.inner.store_dir()
    }
    fn is_valid_path(&self, p: &StorePath) -> Result<bool, StoreFault> {
        if *p == self.drv_path {
            return Ok(true);
        }
        BuildStore::is_valid_path(self.inner, p)
    }
    fn query_path_info(&self, p: &StorePath) -> Result<Option<PathInfo>, StoreFault> {
        BuildStore::query_path_info(self.inner, p)
    }
    fn query_references(&self, p: &StorePath) -> Result<BTreeSet<StorePath>, StoreFault> {
        BuildStore::query_references(self.inner, p)
    }
    fn compute_closure(
        &self,
        paths: &BTreeSet<StorePath>,
    ) -> Result<BTreeSet<StorePath>, StoreFault> {
        // The wire derivation is not in the database: its closure is itself plus its
        // input sources' closures.
        let mut roots = paths.clone();
        let had = roots.remove(&self.drv_path);
        if had {
            roots.extend(self.drv.input_srcs.iter().cloned());
        }
        let mut c = BuildStore::compute_closure(self.inner, &roots)?;
        if had {
            c.insert(self.drv_path.clone());
        }
        Ok(c)
    }
    fn read_derivation(&self, drv: &StorePath) -> Result<Derivation, StoreFault> {
        if *drv == self.drv_path {
            return Ok(self.drv.clone());
        }
        BuildStore::read_derivation(self.inner, drv)
    }
    fn register_outputs(&self, outputs: &[NewOutput]) -> Result<(), StoreFault> {
        BuildStore::register_outputs(self.inner, outputs)
    }
    fn has_path_failed(&self, p: &StorePath) -> Result<bool, StoreFault> {
        BuildStore::has_path_failed(self.inner, p)
    }
    fn register_failed_path(&self, p: &StorePath) -> Result<(), StoreFault> {
        BuildStore::register_failed_path(self.inner, p)
    }
    fn add_temp_root(&self, p: &StorePath) -> Result<(), StoreFault> {
        BuildStore::add_temp_root(self.inner, p)
    }
    fn register_substitute(&self, info: &SubstitutedPath) -> Result<(), StoreFault> {
        BuildStore::register_substitute(self.inner, info)
    }
}
