#![doc = include_str!("../README.md")]

pub mod build_dir;
mod builtin_substituter;
pub mod config;
mod derivation_goal;
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
pub mod sandboxing;
mod services;
pub mod store;
mod substituter_query;
mod substitution_goal;
#[cfg(test)]
mod testing;
mod watchdog;
mod worker;

use std::collections::{BTreeMap, BTreeSet};

use nixb_store::{DerivedPath, StorePath};

pub use config::{
    BuildMode, HookCommand, SandboxMode, Substituter, SubstituterCommand, WorkerConfig,
};
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

    let mut w = worker::Worker::new(store, cfg, sink);
    let client = w.add_client();
    let mut top = Vec::new();
    for t in targets {
        let id = match t {
            DerivedPath::Built { drv, outputs } => {
                let wanted: BTreeSet<String> = outputs.iter().cloned().collect();
                w.make_derivation_goal(drv, &wanted, cfg.build_mode)
            }
            DerivedPath::Opaque(p) => {
                w.make_substitution_goal(p, cfg.build_mode == BuildMode::Repair)
            }
        };
        w.add_top_goal(client, id);
        top.push(id);
    }
    w.run()?;

    let mut outputs = Vec::new();
    let mut failed = false;
    for (t, id) in targets.iter().zip(&top) {
        match (t, w.graph.exit_code(*id)) {
            (
                DerivedPath::Built {
                    drv,
                    outputs: wanted,
                },
                ExitCode::Success,
            ) => {
                let all = w.derivation(drv)?.output_paths();
                let chosen = all
                    .into_iter()
                    .filter(|(name, _)| wanted.is_empty() || wanted.contains(name))
                    .collect();
                outputs.push((t.clone(), chosen));
            }
            (DerivedPath::Opaque(p), ExitCode::Success) => {
                outputs.push((t.clone(), BTreeMap::from([(String::new(), p.clone())])));
            }
            (
                DerivedPath::Opaque(p),
                ExitCode::NoSubstituters | ExitCode::IncompleteClosure | ExitCode::Failed,
            ) => {
                failed = true;
                let message = format!(
                    "path '{}' does not exist and cannot be created",
                    store.store_dir().print(p)
                );
                w.emit(Event::Message {
                    level: Level::Error,
                    text: message.clone(),
                });
                w.record_failure(
                    client,
                    Failure {
                        path: p.clone(),
                        kind: FailureKind::SetupFailed,
                        message,
                    },
                    false,
                );
            }
            _ => failed = true,
        }
    }
    let outcome = w.take_outcome(client);
    let exit_status = if failed {
        outcome.failing_exit_status()
    } else {
        0
    };
    let failures = outcome.into_failures();
    Ok(RealiseOutcome {
        exit_status,
        outputs,
        failures,
    })
}
