//! Builds a client asks for (`BuildPaths`, `BuildPathsWithResults`, `BuildDerivation`,
//! `EnsurePath`), run by the daemon's one engine ([`nixb_goals::Engine`]) with the
//! connection's build mode and keep-going; every other setting is the daemon's, so
//! `max-jobs` and `cores` hold for all clients together. A derivation two clients want is
//! built once and both see its build.
//!
//! The engine's events for this client come over a channel to the connection's thread,
//! which turns them into stderr frames (`activity::Activities`: a `Build` activity per
//! builder, its log lines as `BuildLogLine` results, messages as log lines) while it waits
//! for the request: the engine never blocks on a slow client's socket. A client that hangs
//! up (seen by polling its socket: the client sends nothing while its build runs, so
//! readable means end-of-file; or a frame that cannot be written)
//! cancels its request: what only it wanted is stopped, shared builds go on.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nixb_goals::{BuildMode, Event, EventSink, FailureKind, RealiseOutcome, RequestOptions};
use nixb_protocol::types::{
    BuildMode as WireBuildMode, BuildResult, BuildStatus, DerivedPath as WireDerivedPath,
    KeyedBuildResult, OutputsSpec,
};
use nixb_protocol::{ServerConnection, StderrFrame};
use nixb_store::derivation::{hash_derivation_modulo, Derivation, DrvHashCache};
use nixb_store::temproots::RootsOwner;
use nixb_store::{DerivedPath, StoreDir, StorePath};

use crate::activity::Activities;
use crate::connection::Session;
use crate::error::{DaemonError, Result};
use crate::hangup::HangupState;

/// The engine's end of a request's events: each goes into the channel, and a byte on the
/// socket wakes the connection thread. Dropped by the engine when the request is done,
/// which the connection thread sees as end-of-file. The paths the request's goals use are
/// the connection's temporary roots, released when it ends (not when the daemon idles).
struct ForwardSink {
    tx: mpsc::Sender<Event>,
    wake: UnixStream,
    roots: Arc<RootsOwner>,
}

impl EventSink for ForwardSink {
    fn event(&mut self, e: Event) {
        if self.tx.send(e).is_ok() {
            // A full socket already holds a wake-up; the reader drains the channel after it.
            let _ = (&self.wake).write(&[1]);
        }
    }

    fn keep_temp_root(&mut self, p: &StorePath) -> Option<Result<(), String>> {
        Some(self.roots.add(p).map_err(|e| e.to_string()))
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

/// Runs the engine on `targets` for this client, forwarding its events as frames until
/// the request is done.
pub(crate) fn realise<R: Read, W: Write>(
    s: &mut Session<'_>,
    conn: &mut ServerConnection<R, W>,
    targets: &[WireDerivedPath],
    mode: WireBuildMode,
) -> Result<RealiseOutcome> {
    let targets_wire = targets;
    let targets: Vec<DerivedPath> = targets.iter().map(engine_target).collect();
    let options = RequestOptions {
        build_mode: match mode {
            WireBuildMode::Normal => BuildMode::Normal,
            WireBuildMode::Repair => BuildMode::Repair,
            WireBuildMode::Check => BuildMode::Check,
        },
        keep_going: s.worker.keep_going,
        max_silent_time: s.worker.max_silent_time,
        timeout: s.worker.timeout,
    };
    let daemon = s.daemon;
    let engine = daemon.engine()?;
    let io = |step: &'static str| {
        move |source| DaemonError::Io {
            step,
            path: "event channel".into(),
            source,
        }
    };
    let (wake_rx, wake_tx) = UnixStream::pair().map_err(io("creating"))?;
    wake_rx.set_nonblocking(true).map_err(io("setting up"))?;
    wake_tx.set_nonblocking(true).map_err(io("setting up"))?;
    let (tx, events) = mpsc::channel();
    let mut job = engine.submit(
        targets,
        options,
        Box::new(ForwardSink {
            tx,
            wake: wake_tx,
            roots: s.temp_roots.clone(),
        }),
    );
    let mut activities = Activities::new(daemon.store().store_dir().clone(), s.next_activity);
    let mut gone = false;
    // Cleared if the client sends something while it waits (then only a failed write
    // tells that it left).
    let mut watch = s.hangup.is_some();
    let mut forward = |activities: &mut Activities, gone: &mut bool| {
        for e in events.try_iter() {
            activities.translate(e, &mut |f| {
                if !*gone && conn.frame(&f).is_err() {
                    *gone = true;
                }
            });
        }
    };
    let result = loop {
        // The wake-ups first, then the channel (see `ForwardSink`).
        let mut buf = [0u8; 256];
        while matches!((&wake_rx).read(&mut buf), Ok(n) if n > 0) {}
        forward(&mut activities, &mut gone);
        if gone {
            job.cancel();
            return Err(DaemonError::Broken(
                "the client went away during the build".into(),
            ));
        }
        if let Some(r) = job.try_wait() {
            // Events sent before the reply are in the channel by now.
            forward(&mut activities, &mut gone);
            break r;
        }
        let mut fds = vec![PollFd::new(wake_rx.as_fd(), PollFlags::POLLIN)];
        if let (Some(h), true) = (&s.hangup, watch) {
            fds.push(PollFd::new(h.fd(), PollFlags::POLLIN));
        }
        match nix::poll::poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                return Err(DaemonError::Io {
                    step: "waiting for",
                    path: "the build and the client".into(),
                    source: e.into(),
                })
            }
        }
        let fds_revents = fds
            .get(1)
            .and_then(|p| p.revents())
            .unwrap_or(PollFlags::empty());
        let readable = !fds_revents.is_empty();
        drop(fds);
        if readable {
            match s.hangup.as_ref().map(|h| h.state(fds_revents)) {
                None | Some(HangupState::Unknown) => continue,
                Some(HangupState::SentData) => {
                    watch = false;
                    continue;
                }
                Some(HangupState::Gone) => {}
            }
            job.cancel();
            return Err(DaemonError::Broken(
                "the client hung up during the build".into(),
            ));
        }
    };
    let mut outcome = result?;
    activities.finish(&mut |f| {
        if !gone && conn.frame(&f).is_err() {
            gone = true;
        }
    });
    let dir = daemon.store().store_dir().clone();
    for f in &mut outcome.failures {
        f.message = goal_named_as_nix2(&dir, targets_wire, activities.failure_message(f), &f.path);
    }
    s.next_activity = activities.next_id();
    s.build_usage = activities.take_usage();
    Ok(outcome)
}

/// A message about the goal of `drv` in the words of Nix 2.x, whose clients show it: the
/// engine names a goal `building of '<drv>'` (the original's words), Nix 2.x `building of
/// '<drv>!<outputs>' from .drv file`, with the outputs the request wanted (`*` for all, and
/// for a dependency, whose wanted outputs the request does not say).
fn goal_named_as_nix2(
    dir: &StoreDir,
    targets: &[WireDerivedPath],
    message: String,
    drv: &StorePath,
) -> String {
    let old = format!("building of '{}' ", dir.print(drv));
    let Some(rest) = message.strip_prefix(&old) else {
        return message;
    };
    let outputs = targets
        .iter()
        .find_map(|t| match t {
            WireDerivedPath::Built { drv: d, outputs } if d == drv => Some(match outputs {
                OutputsSpec::All => "*".to_string(),
                OutputsSpec::Names(n) => n.join(","),
            }),
            _ => None,
        })
        .unwrap_or_else(|| "*".to_string());
    format!(
        "building of '{}!{outputs}' from .drv file {rest}",
        dir.print(drv)
    )
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
