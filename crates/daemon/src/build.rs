//! Builds a client asks for (`BuildPaths`, `BuildPathsWithResults`, `BuildDerivation`,
//! `EnsurePath`), run by the engine (`nixb_goals::realise`) with the connection's
//! settings. The engine's events become that client's stderr frames: a `Build` activity
//! per builder, its log lines as `BuildLogLine` results, messages as log lines.
//!
//! The translation to frames is `activity::Activities`. For now the engine runs one `realise` at a time for the whole daemon (a mutex): two
//! clients never run two workers that race for the same outputs, at the price of one
//! client waiting for another's builds.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};

use nixb_goals::{BuildMode, Event, EventSink, FailureKind, RealiseOutcome};
use nixb_protocol::types::{
    BuildMode as WireBuildMode, BuildResult, BuildStatus, DerivedPath as WireDerivedPath,
    KeyedBuildResult, OutputsSpec,
};
use nixb_protocol::{ServerConnection, StderrFrame};
use nixb_store::derivation::{hash_derivation_modulo, Derivation, DrvHashCache};
use nixb_store::{DerivedPath, StoreDir, StorePath};

use crate::activity::Activities;
use crate::connection::Session;
use crate::error::{DaemonError, Result};

/// Forwards the engine's events to one client. A client that has gone away stops
/// receiving frames; the run goes on (its results are still registered).
struct ClientSink<'a, R: Read, W: Write> {
    conn: &'a mut ServerConnection<R, W>,
    activities: Activities,
    gone: bool,
}

impl<R: Read, W: Write> EventSink for ClientSink<'_, R, W> {
    fn event(&mut self, e: Event) {
        let (conn, gone) = (&mut *self.conn, &mut self.gone);
        self.activities.translate(e, &mut |f| {
            if !*gone && conn.frame(&f).is_err() {
                *gone = true;
            }
        });
    }
}

fn engine_target(t: &WireDerivedPath) -> DerivedPath {
    match t {
        WireDerivedPath::Opaque(p) => DerivedPath::Opaque(p.clone()),
        WireDerivedPath::Built { drv, outputs } => DerivedPath::Built {
            drv: drv.clone(),
            outputs: match outputs {
                OutputsSpec::All => Vec::new(),
                OutputsSpec::Names(n) => n.clone(),
            },
        },
    }
}

/// Runs the engine on `targets` for this client.
pub(crate) fn realise<R: Read, W: Write>(
    s: &mut Session<'_>,
    conn: &mut ServerConnection<R, W>,
    targets: &[WireDerivedPath],
    mode: WireBuildMode,
) -> Result<RealiseOutcome> {
    let targets: Vec<DerivedPath> = targets.iter().map(engine_target).collect();
    let mut cfg = s.worker.clone();
    cfg.build_mode = match mode {
        WireBuildMode::Normal => BuildMode::Normal,
        WireBuildMode::Repair => BuildMode::Repair,
        WireBuildMode::Check => BuildMode::Check,
    };
    let daemon = s.daemon;
    let _one_engine = daemon.build_lock();
    let mut sink = ClientSink {
        conn,
        activities: Activities::new(daemon.store().store_dir().clone(), s.next_activity),
        gone: false,
    };
    let mut outcome = nixb_goals::realise(daemon.store(), &targets, &cfg, &mut sink)?;
    let ClientSink {
        conn,
        mut activities,
        mut gone,
    } = sink;
    activities.finish(&mut |f| {
        if !gone && conn.frame(&f).is_err() {
            gone = true;
        }
    });
    for f in &mut outcome.failures {
        f.message = activities.failure_message(f);
    }
    s.next_activity = activities.next_id();
    s.build_usage = activities.take_usage();
    Ok(outcome)
}

/// `BuildPaths`: all or nothing, a failure is the operation's error.
pub(crate) fn build_paths<R: Read, W: Write>(
    s: &mut Session<'_>,
    conn: &mut ServerConnection<R, W>,
    targets: &[WireDerivedPath],
    mode: WireBuildMode,
) -> Result<()> {
    let outcome = realise(s, conn, targets, mode)?;
    if outcome.exit_status == 0 {
        return Ok(());
    }
    let dir = s.daemon.store().store_dir();
    let message = match outcome.failures.as_slice() {
        [one] => one.message.clone(),
        many => {
            for f in many {
                let _ = conn.frame(&StderrFrame::Next(
                    format!("error: {}\n", f.message).into_bytes(),
                ));
            }
            let names: Vec<String> = many.iter().map(|f| dir.print(&f.path)).collect();
            format!("build of '{}' failed", names.join("', '"))
        }
    };
    Err(DaemonError::Build {
        status: u64::try_from(outcome.exit_status).unwrap_or(1),
        message,
    })
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn status_of(kind: FailureKind) -> BuildStatus {
    match kind {
        FailureKind::BuilderFailed => BuildStatus::PermanentFailure,
        FailureKind::TimedOut => BuildStatus::TimedOut,
        FailureKind::LogLimitExceeded => BuildStatus::LogLimitExceeded,
        FailureKind::HashMismatch => BuildStatus::OutputRejected,
        FailureKind::NotDeterministic => BuildStatus::NotDeterministic,
        FailureKind::CachedFailure => BuildStatus::CachedFailure,
        FailureKind::DependencyFailed => BuildStatus::DependencyFailed,
        FailureKind::SetupFailed => BuildStatus::MiscFailure,
    }
}

/// `BuildPathsWithResults`: one result per target, failures included.
pub(crate) fn build_paths_with_results<R: Read, W: Write>(
    s: &mut Session<'_>,
    conn: &mut ServerConnection<R, W>,
    targets: &[WireDerivedPath],
    mode: WireBuildMode,
) -> Result<Vec<KeyedBuildResult>> {
    let store = s.daemon.store();
    let dir = store.store_dir().clone();
    // Which targets were complete before: those are "already valid", not "built".
    let mut valid_before = Vec::new();
    for t in targets {
        valid_before.push(outputs_valid(store, t)?);
    }
    let start = now();
    let outcome = realise(s, conn, targets, mode)?;
    let stop = now();
    let realised: HashMap<DerivedPath, BTreeMap<String, StorePath>> =
        outcome.outputs.iter().cloned().collect();
    let mut results = Vec::new();
    for (t, was_valid) in targets.iter().zip(valid_before) {
        let mut r = match realised.get(&engine_target(t)) {
            Some(outputs) => {
                let mut r = BuildResult::new(if was_valid && mode != WireBuildMode::Check {
                    BuildStatus::AlreadyValid
                } else {
                    BuildStatus::Built
                });
                if let WireDerivedPath::Built { drv, .. } = t {
                    r.built_outputs = built_outputs(store, &dir, drv, outputs)?;
                }
                r
            }
            None => {
                let key = match t {
                    WireDerivedPath::Opaque(p) => p,
                    WireDerivedPath::Built { drv, .. } => drv,
                };
                match outcome.failures.iter().find(|f| &f.path == key) {
                    Some(f) => {
                        let mut r = BuildResult::new(status_of(f.kind));
                        r.error_msg = f.message.clone();
                        r
                    }
                    None => {
                        let mut r = BuildResult::new(BuildStatus::DependencyFailed);
                        r.error_msg =
                            format!("a dependency of '{}' failed to build", dir.print(key));
                        r
                    }
                }
            }
        };
        r.start_time = start;
        r.stop_time = stop;
        // CPU times of a derivation built by this request (protocol 1.37 and later carry
        // them; Nix fills them from its cgroup, nixb from the builder's rusage or cgroup).
        if let WireDerivedPath::Built { drv, .. } = t {
            if let Some(u) = s.build_usage.get(drv) {
                r.cpu_user = Some(u.user.as_micros().try_into().unwrap_or(i64::MAX));
                r.cpu_system = Some(u.system.as_micros().try_into().unwrap_or(i64::MAX));
            }
        }
        results.push(KeyedBuildResult {
            path: t.clone(),
            result: r,
        });
    }
    Ok(results)
}

/// `BuildDerivation` of a derivation that is in the store: all its outputs.
pub(crate) fn build_derivation<R: Read, W: Write>(
    s: &mut Session<'_>,
    conn: &mut ServerConnection<R, W>,
    drv: &StorePath,
    mode: WireBuildMode,
) -> Result<BuildResult> {
    let t = WireDerivedPath::Built {
        drv: drv.clone(),
        outputs: OutputsSpec::All,
    };
    let mut v = build_paths_with_results(s, conn, std::slice::from_ref(&t), mode)?;
    Ok(v.pop()
        .map(|k| k.result)
        .unwrap_or_else(|| BuildResult::new(BuildStatus::MiscFailure)))
}

fn outputs_valid(store: &nixb_store::local_store::LocalStore, t: &WireDerivedPath) -> Result<bool> {
    Ok(match t {
        WireDerivedPath::Opaque(p) => store.is_valid_path(p)?,
        WireDerivedPath::Built { drv, outputs } => {
            if !store.is_valid_path(drv)? {
                return Ok(false);
            }
            let d = store.read_derivation(drv)?;
            let mut all = true;
            for (name, p) in d.output_paths() {
                let wanted = match outputs {
                    OutputsSpec::All => true,
                    OutputsSpec::Names(n) => n.contains(&name),
                };
                if wanted && !store.is_valid_path(&p)? {
                    all = false;
                }
            }
            all
        }
    })
}

/// `sha256:<hashDerivationModulo>!<output>` to the realisation JSON, as Nix 2.8 sends
/// them (`nix build` takes the output paths from here).
fn built_outputs(
    store: &nixb_store::local_store::LocalStore,
    dir: &StoreDir,
    drv_path: &StorePath,
    outputs: &BTreeMap<String, StorePath>,
) -> Result<BTreeMap<String, String>> {
    let drv = store.read_derivation(drv_path)?;
    let mut cache = DrvHashCache::default();
    let hash = hash_derivation_modulo(
        dir,
        &drv,
        true,
        &mut |p| Derivation::read(dir, &dir.to_path(p)),
        &mut cache,
    )
    .map_err(|e| DaemonError::Refused(format!("derivation '{}': {e}", dir.print(drv_path))))?;
    Ok(outputs
        .iter()
        .map(|(name, p)| {
            let id = format!("{}!{name}", hash.to_typed(nixb_store::Encoding::Base16));
            (id.clone(), BuildResult::realisation_json(&id, p))
        })
        .collect())
}
