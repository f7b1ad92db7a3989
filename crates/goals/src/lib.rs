#![doc = include_str!("../README.md")]

pub mod build_dir;
mod builtin_substituter;
pub mod builtins;
pub mod config;
mod derivation_goal;
mod engine;
pub mod env;
mod error;
pub mod event;
mod external;
pub mod graph;
mod hook_instance;
mod local;
mod outcome;
pub mod refcheck;
mod resources;
mod route;
pub mod sandboxing;
mod services;
pub mod store;
mod substituter_query;
mod substitution_goal;
#[cfg(test)]
mod testing;
mod watchdog;
mod worker;

use std::collections::BTreeMap;

use nixb_store::{DerivedPath, StorePath};

pub use config::{
    BuildMode, HookCommand, SandboxMode, Substituter, SubstituterCommand, WorkerConfig,
};
pub use engine::{Engine, Job, RequestOptions};
pub use error::GoalsError;
pub use event::{Event, EventSink, FailureKind, Level, NullSink, VecSink};
pub use graph::ExitCode;
/// What a builder used (`Event::BuildResources`).
pub use nixb_sandbox::ResourceUsage;
pub use outcome::Failure;
pub use store::{BuildStore, NewOutput, PathInfo, StoreFault, SubstitutedPath};

/// What `realise` achieved.
#[derive(Debug)]
pub struct RealiseOutcome {
    /// 0 when every target was realised; otherwise Nix 2.x's status: 100 for a permanent
    /// build failure, plus 1 if a build timed out, 2 for a fixed-output hash mismatch, 4 for
    /// a `--check` mismatch; 1 for any other failure.
    pub exit_status: i32,
    /// For each realised target, its output paths by output name (the wanted ones, or all).
    /// A plain store path target maps the empty name to itself.
    pub outputs: Vec<(DerivedPath, BTreeMap<String, StorePath>)>,
    /// Every goal that failed, in the order they failed.
    pub failures: Vec<Failure>,
}

/// Makes the `targets` valid: builds the wanted outputs of derivations (and everything they
/// need), checks plain store paths. Failures of individual builds are reported through
/// `sink` and in the outcome; `Err` means the worker itself could not go on.
pub fn realise(
    store: &dyn BuildStore,
    targets: &[DerivedPath],
    cfg: &WorkerConfig,
    sink: &mut dyn EventSink,
) -> Result<RealiseOutcome, GoalsError> {
    // Builders of a worker that died (even by SIGKILL) left their directories behind.
    for dir in build_dir::clean_stale(&cfg.build_dir_root) {
        sink.event(Event::Message {
            level: Level::Debug,
            text: format!("removed stale build directory '{}'", dir.display()),
        });
    }

    let mut w = worker::Worker::new(store, cfg);
    let client = w.add_client(Box::new(route::BorrowedSink(sink)), cfg.keep_going);
    for t in targets {
        w.add_target(client, t, cfg.build_mode);
    }
    w.run()?;
    w.client_outcome(client)
}
