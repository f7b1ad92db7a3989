//! What a goal may ask for while it takes a step, and how it asks.
//!
//! Goals ask, the scheduler decides. A step of a goal gets a [`Step`]: the store and the
//! settings to read, the [`Services`] it uses at once (the event sink, parsed derivations,
//! build directories, the watchdog, the build hook, the substituters, killing its own
//! child), and a list of [`Request`]s it leaves for the scheduler, which acts on them in
//! order when the step returns: wait for sub-goals, wake me again, wait for a build slot,
//! for any goal or for a while, adopt a child, note locked outputs, record a failure,
//! done. Nothing in a step reaches the goal graph or other goals, so a unit test can drive
//! a goal state by state with fake services and read the requests it made.
//!
//! ```text
//! scheduler ──work(step)──> goal ──uses──> Services (answers now)
//!     ^                      │
//!     └──── Vec<Request> ────┘   (acted on after the step, in order)
//! ```

use std::collections::BTreeSet;
use std::os::fd::{OwnedFd, RawFd};
use std::process::ExitStatus;
use std::sync::Arc;

use nixb_store::derivation::Derivation;
use nixb_store::{StoreDir, StorePath};

use crate::build_dir::{BuildDir, BuildDirs};
use crate::builtin_substituter::BuiltinSubstituter;
use crate::config::{BuildMode, WorkerConfig};
use crate::event::{Event, Level};
use crate::graph::{ExitCode, GoalId, WaiteeCounts};
use crate::hook_instance::HookInstance;
use crate::outcome::Failure;
use crate::store::{BuildStore, StoreFault};
use crate::substituter_query::QueryPool;

/// How a child of the worker ended: its exit status, or why there is none.
pub(crate) type ChildStatus = Result<ExitStatus, ChildError>;

/// A child whose exit status could not be had.
#[derive(Debug)]
pub(crate) enum ChildError {
    /// A builder started by `nixb_sandbox::start` failed a setup step (its exec included)
    /// after `start` had returned: the build environment, not the builder, failed.
    Setup(String),
    /// Anything else (waiting failed, no status recorded).
    Other(String),
}

impl std::fmt::Display for ChildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChildError::Setup(m) | ChildError::Other(m) => f.write_str(m),
        }
    }
}

impl From<&str> for ChildError {
    fn from(m: &str) -> Self {
        ChildError::Other(m.to_owned())
    }
}

/// A goal that another goal waits for, named by what it makes (the scheduler finds the
/// running goal for it or makes one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SubGoal {
    /// The wanted outputs (empty: all) of a derivation.
    Derivation {
        drv: StorePath,
        wanted: BTreeSet<String>,
        mode: BuildMode,
    },
    /// One store path, substituted (or repaired) if it is not valid.
    Substitution { path: StorePath, repair: bool },
}

/// What a goal asks the scheduler for during a step.
pub(crate) enum Request {
    /// Wait for this sub-goal: the goal is woken once all it waits for are done (at once
    /// when one fails without keep-going).
    WaitFor(SubGoal),
    /// Call the goal again (its next state) after the goals already awake.
    WakeUp,
    /// Wake the goal when a build slot is free.
    WaitForBuildSlot,
    /// Wake the goal when any goal finishes (an output lock held by another goal of ours).
    WaitForAnyGoal,
    /// Wake the goal after `build-poll-interval` (a lock held by another process).
    WaitForAWhile,
    /// Adopt the goal's child: poll its log pipe and its exit, apply the timeouts when
    /// `respect_timeouts`, and count it against `max-jobs` when `in_build_slot`.
    StartChild {
        builder: nixb_sandbox::Builder,
        log: OwnedFd,
        in_build_slot: bool,
        respect_timeouts: bool,
    },
    /// The goal holds the locks of these outputs (other goals of ours wait for it).
    LockedOutputs(BTreeSet<StorePath>),
    /// The goal released its output locks.
    UnlockedOutputs,
    /// Record a failure in the run's outcome; `permanent` marks a build that would fail
    /// again.
    Failed { failure: Failure, permanent: bool },
    /// The goal is finished: tell its waiters and forget it.
    Done(ExitCode),
}

/// The services a goal uses and gets an answer from at once. The worker's implementation
/// owns the shared resources; a test's fake records what was asked.
pub(crate) trait Services {
    /// Reports an event to the caller's sink.
    fn emit(&mut self, event: Event);
    /// The derivation at `drv`, read and parsed once while some goal holds it.
    fn derivation(&mut self, drv: &StorePath) -> Result<Arc<Derivation>, StoreFault>;
    /// The path of output `output` of the derivation at `drv` (`None`: it has no such
    /// output, or the output has no path), read once per run.
    fn derivation_output(
        &mut self,
        drv: &StorePath,
        output: &str,
    ) -> Result<Option<StorePath>, StoreFault>;
    /// Protects `p` from garbage collectors while the clients that need the goal taking
    /// the step need it (see [`crate::EventSink::keep_temp_root`]), or else while the
    /// process runs.
    fn add_temp_root(&mut self, p: &StorePath) -> Result<(), StoreFault>;
    /// Builders running in local build slots.
    fn nr_local_builds(&self) -> usize;
    /// Another goal of this run holds the lock of `path`.
    fn is_locked_by_me(&self, path: &StorePath) -> bool;
    /// Kills goal `id`'s child (if any) and frees its build slot.
    fn kill_child(&mut self, id: GoalId);
    /// The build directories.
    fn build_dirs(&mut self) -> &mut BuildDirs;
    /// Starts the watchdog if needed; the pipe a sandboxed builder announces itself on.
    fn ensure_watchdog(&mut self) -> Option<RawFd>;
    /// A never-used network namespace for a sandboxed build, if one is ready.
    fn prepared_netns(&mut self) -> Option<OwnedFd>;
    /// Lets a finished build's compressed log complete on its writer thread.
    fn finish_log_later(&mut self, log: nixb_logs::FinishingLog);
    /// Releases output locks once the loop has nothing else to do.
    fn release_later(&mut self, locks: nixb_store::locks::PathLocks);
    /// Deletes a finished build's directory once the loop is idle.
    fn remove_later(&mut self, dir: BuildDir);
    /// The build hook waiting for its next request, if one was started.
    fn hook(&mut self) -> &mut Option<HookInstance>;
    /// The substituters' `--query` processes.
    fn subst_queries(&mut self) -> &mut QueryPool;
    /// The threads reading binary caches.
    fn builtin_subst(&mut self) -> &mut BuiltinSubstituter;
}

/// One step of one goal: what it may read and use, and the requests it leaves.
pub(crate) struct Step<'s> {
    /// The goal taking the step.
    pub id: GoalId,
    pub store: &'s dyn BuildStore,
    pub cfg: &'s WorkerConfig,
    pub services: &'s mut dyn Services,
    requests: Vec<Request>,
    /// What the goal's finished waitees ended as, since the goal last looked.
    counts: WaiteeCounts,
    /// Sub-goals asked for in this step.
    nr_waits: usize,
}

impl<'s> Step<'s> {
    pub fn new(
        id: GoalId,
        store: &'s dyn BuildStore,
        cfg: &'s WorkerConfig,
        services: &'s mut dyn Services,
        counts: WaiteeCounts,
    ) -> Step<'s> {
        Step {
            id,
            store,
            cfg,
            services,
            requests: Vec::new(),
            counts,
            nr_waits: 0,
        }
    }

    /// The requests made, in order.
    pub fn into_requests(self) -> Vec<Request> {
        self.requests
    }

    pub fn store_dir(&self) -> &'s StoreDir {
        self.store.store_dir()
    }

    pub fn emit(&mut self, e: Event) {
        self.services.emit(e);
    }

    pub fn message(&mut self, level: Level, text: String) {
        self.services.emit(Event::Message { level, text });
    }

    pub fn derivation(&mut self, drv: &StorePath) -> Result<Arc<Derivation>, StoreFault> {
        self.services.derivation(drv)
    }

    pub fn derivation_output(
        &mut self,
        drv: &StorePath,
        output: &str,
    ) -> Result<Option<StorePath>, StoreFault> {
        self.services.derivation_output(drv, output)
    }

    /// Protects `p` from garbage collectors while this goal's clients need it. A failure
    /// leaves `p` unprotected; the goal decides whether that matters.
    pub fn add_temp_root(&mut self, p: &StorePath) -> Result<(), StoreFault> {
        self.services.add_temp_root(p)
    }

    pub fn nr_local_builds(&self) -> usize {
        self.services.nr_local_builds()
    }

    pub fn is_locked_by_me(&self, path: &StorePath) -> bool {
        self.services.is_locked_by_me(path)
    }

    /// Kills this goal's child, if it has one.
    pub fn kill_child(&mut self) {
        self.services.kill_child(self.id);
    }

    /// Failure counts of the waitees that finished before this step.
    pub fn waitee_counts(&self) -> WaiteeCounts {
        self.counts
    }

    pub fn reset_waitee_counts(&mut self) {
        self.counts = WaiteeCounts::default();
    }

    /// Whether this step asked for any sub-goal (then the goal sleeps until they are done).
    pub fn has_waitees(&self) -> bool {
        self.nr_waits > 0
    }

    pub fn wait_for(&mut self, sub: SubGoal) {
        self.nr_waits += 1;
        self.requests.push(Request::WaitFor(sub));
    }

    pub fn wait_for_derivation(
        &mut self,
        drv: &StorePath,
        wanted: &BTreeSet<String>,
        mode: BuildMode,
    ) {
        self.wait_for(SubGoal::Derivation {
            drv: drv.clone(),
            wanted: wanted.clone(),
            mode,
        });
    }

    pub fn wait_for_substitution(&mut self, path: &StorePath, repair: bool) {
        self.wait_for(SubGoal::Substitution {
            path: path.clone(),
            repair,
        });
    }

    pub fn wake_up(&mut self) {
        self.requests.push(Request::WakeUp);
    }

    pub fn wait_for_build_slot(&mut self) {
        self.requests.push(Request::WaitForBuildSlot);
    }

    pub fn wait_for_any_goal(&mut self) {
        self.requests.push(Request::WaitForAnyGoal);
    }

    pub fn wait_for_a_while(&mut self) {
        self.requests.push(Request::WaitForAWhile);
    }

    pub fn start_child(
        &mut self,
        builder: nixb_sandbox::Builder,
        log: OwnedFd,
        in_build_slot: bool,
        respect_timeouts: bool,
    ) {
        self.requests.push(Request::StartChild {
            builder,
            log,
            in_build_slot,
            respect_timeouts,
        });
    }

    pub fn set_locked_outputs(&mut self, paths: BTreeSet<StorePath>) {
        self.requests.push(Request::LockedOutputs(paths));
    }

    pub fn clear_locked_outputs(&mut self) {
        self.requests.push(Request::UnlockedOutputs);
    }

    pub fn record_failure(&mut self, failure: Failure, permanent: bool) {
        self.requests.push(Request::Failed { failure, permanent });
    }

    pub fn am_done(&mut self, result: ExitCode) {
        self.requests.push(Request::Done(result));
    }
}
