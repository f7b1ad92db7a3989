//! Builds a client asks for (`BuildPaths`, `BuildPathsWithResults`, `BuildDerivation`,
//! `EnsurePath`), run by the engine (`nixb_goals::realise`) with the connection's
//! settings. The engine's events become that client's stderr frames: a `Build` activity
//! per builder, its log lines as `BuildLogLine` results, messages as log lines.
//!
//! For now the engine runs one `realise` at a time for the whole daemon (a mutex): two
//! clients never run two workers that race for the same outputs, at the price of one
//! client waiting for another's builds.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{Read, Write};

use nixb_goals::{BuildMode, Event, EventSink, FailureKind, Level, RealiseOutcome};
use nixb_protocol::stderr::{ActivityType, Field, ResultType, Verbosity};
use nixb_protocol::types::{
    BuildMode as WireBuildMode, BuildResult, BuildStatus, DerivedPath as WireDerivedPath,
    KeyedBuildResult, OutputsSpec,
};
use nixb_protocol::{ServerConnection, StderrFrame};
use nixb_store::derivation::{hash_derivation_modulo, Derivation, DrvHashCache};
use nixb_store::{DerivedPath, StoreDir, StorePath};

use crate::connection::Session;
use crate::error::{DaemonError, Result};

/// Forwards the engine's events to one client. A client that has gone away stops
/// receiving frames; the run goes on (its results are still registered).
struct ClientSink<'a, R: Read, W: Write> {
    conn: &'a mut ServerConnection<R, W>,
    store_dir: StoreDir,
    next_activity: &'a mut u64,
    /// Per running build: its activity and the unfinished last line of its log.
    builds: HashMap<StorePath, (u64, Vec<u8>)>,
    /// The last lines of each build's log, for the error of a failed builder.
    tails: HashMap<StorePath, VecDeque<Vec<u8>>>,
    /// What each builder used, for the build results' CPU times.
    usage: HashMap<StorePath, nixb_goals::ResourceUsage>,
    gone: bool,
}

/// How many log lines a failed builder's error quotes (Nix's `log-lines` default).
const LOG_TAIL: usize = 10;

impl<R: Read, W: Write> ClientSink<'_, R, W> {
    fn send(&mut self, f: StderrFrame) {
        if !self.gone && self.conn.frame(&f).is_err() {
            self.gone = true;
        }
    }

    fn log_line(&mut self, drv: &StorePath, id: u64, line: &[u8]) {
        let tail = self.tails.entry(drv.clone()).or_default();
        if tail.len() == LOG_TAIL {
            tail.pop_front();
        }
        tail.push_back(line.to_vec());
        self.send(StderrFrame::Result {
            id,
            kind: ResultType::BuildLogLine,
            fields: vec![Field::String(line.to_vec())],
        });
    }

    fn stop(&mut self, drv: &StorePath) {
        if let Some((id, rest)) = self.builds.remove(drv) {
            if !rest.is_empty() {
                self.log_line(drv, id, &rest);
            }
            self.send(StderrFrame::StopActivity { id });
        }
    }
}

impl<R: Read, W: Write> EventSink for ClientSink<'_, R, W> {
    fn event(&mut self, e: Event) {
        match e {
            Event::BuildStarted { drv, .. } => {
                let id = *self.next_activity;
                *self.next_activity += 1;
                let printed = self.store_dir.print(&drv);
                self.send(StderrFrame::StartActivity {
                    id,
                    level: Verbosity::Info,
                    kind: ActivityType::Build,
                    text: format!("building '{printed}'"),
                    // drv path, machine (empty: here), round, rounds.
                    fields: vec![
                        Field::string(printed),
                        Field::string(""),
                        Field::Int(1),
                        Field::Int(1),
                    ],
                    parent: 0,
                });
                self.builds.insert(drv, (id, Vec::new()));
            }
            Event::BuildLog { drv, chunk } => {
                let Some((id, mut pending)) = self.builds.remove(&drv) else {
                    return;
                };
                pending.extend_from_slice(&chunk);
                let mut start = 0;
                while let Some(nl) = pending[start..].iter().position(|&b| b == b'\n') {
                    let line = pending[start..start + nl].to_vec();
                    self.log_line(&drv, id, &line);
                    start += nl + 1;
                }
                pending.drain(..start);
                self.builds.insert(drv, (id, pending));
            }
            Event::BuildResources { drv, usage } => {
                self.usage.insert(drv, usage);
            }
            Event::BuildSucceeded { drv } => self.stop(&drv),
            Event::BuildFailed { drv, .. } => self.stop(&drv),
            Event::Message { level, text } => {
                let prefix = match level {
                    Level::Error => "error: ",
                    Level::Warn => "warning: ",
                    Level::Info => "",
                    Level::Debug => return,
                };
                self.send(StderrFrame::Next(format!("{prefix}{text}\n").into_bytes()));
            }
            Event::HookOutput { text, .. } => {
                self.send(StderrFrame::Next(format!("{text}\n").into_bytes()));
            }
            Event::SubstituterLog { chunk, .. } => self.send(StderrFrame::Next(chunk)),
            _ => {}
        }
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
        store_dir: daemon.store().store_dir().clone(),
        next_activity: &mut s.next_activity,
        builds: HashMap::new(),
        tails: HashMap::new(),
        usage: HashMap::new(),
        gone: false,
    };
    let mut outcome = nixb_goals::realise(daemon.store(), &targets, &cfg, &mut sink)?;
    let running: Vec<StorePath> = sink.builds.keys().cloned().collect();
    for drv in running {
        sink.stop(&drv);
    }
    // As Nix words a failed builder for a client that does not show build logs in full:
    // the last lines of the log, and where the rest is.
    for f in &mut outcome.failures {
        if f.kind != FailureKind::BuilderFailed {
            continue;
        }
        let Some(tail) = sink.tails.get(&f.path).filter(|t| !t.is_empty()) else {
            continue;
        };
        let mut msg = format!("{};\nlast {} log lines:\n", f.message, tail.len());
        for line in tail {
            msg.push_str("> ");
            msg.push_str(&String::from_utf8_lossy(line));
            msg.push('\n');
        }
        msg.push_str(&format!(
            "For full logs, run 'nix log {}'.",
            sink.store_dir.print(&f.path)
        ));
        f.message = msg;
    }
    let usage = std::mem::take(&mut sink.usage);
    drop(sink);
    s.build_usage = usage;
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
