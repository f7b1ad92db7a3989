//! The worker: owns the goals and their builders, runs awake goals, and waits for builders
//! in one `poll()`.
//!
//! ```text
//! loop:
//!   call every awake goal (a goal's call may wake others; repeat until none is awake)
//!   stop when no top goal is left (or one failed without keep-going)
//!   poll(log pipes + exit pidfds of all builders, timeout = nearest deadline of
//!        max-silent-time / timeout / the next lock poll)
//!   feed log chunks to their goals; a builder that exited ends its build (its pipe is
//!   drained first); cancel builders past a deadline; wake lock pollers when due
//! ```
//!
//! A build ends when its builder *process* exits, observed through a pidfd; end-of-file on
//! the log pipe alone ends nothing (a builder may close stdout and go on), and a background
//! process that keeps the pipe open does not keep the build alive.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nixb_store::derivation::Derivation;
use nixb_store::{StoreDir, StorePath};

use crate::config::{BuildMode, WorkerConfig};
use crate::derivation_goal::DerivationGoal;
use crate::error::GoalsError;
use crate::event::{Event, EventSink, FailureKind, Level};
use crate::graph::{ExitCode, GoalId, Graph};
use crate::store::{BuildStore, StoreFault};
use crate::substitution_goal::SubstitutionGoal;

pub(crate) enum Goal {
    Derivation(Box<DerivationGoal>),
    Substitution(Box<SubstitutionGoal>),
}

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

/// A running builder, owned by the worker so that destroying its goal kills it.
pub(crate) struct Child {
    pub builder: nixb_sandbox::Builder,
    /// Read side of the log pipe (non-blocking); `None` after end-of-file.
    pub log: Option<OwnedFd>,
    pub respect_timeouts: bool,
    pub in_build_slot: bool,
    pub last_output: Instant,
    pub started: Instant,
}

/// One failed goal, for the outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The derivation (or, for a missing source, the path) that failed.
    pub path: StorePath,
    pub kind: FailureKind,
    pub message: String,
}

pub(crate) struct Worker<'a> {
    pub store: &'a dyn BuildStore,
    pub cfg: &'a WorkerConfig,
    sink: &'a mut dyn EventSink,
    pub graph: Graph,
    goals: Vec<Option<Goal>>,
    derivation_goals: HashMap<StorePath, GoalId>,
    substitution_goals: HashMap<StorePath, GoalId>,
    /// For each goal id, the key it has in `derivation_goals` or `substitution_goals`
    /// (`true` = derivation), so that forgetting a goal is a lookup, not a scan.
    dedup_keys: Vec<Option<(bool, StorePath)>>,
    /// Derivations parsed so far, by path (see [`Worker::derivation`]).
    drv_cache: HashMap<StorePath, Arc<Derivation>>,
    children: BTreeMap<GoalId, Child>,
    nr_local_builds: usize,
    /// Output paths locked by goals of this worker (flock would block them too, but this
    /// lets a goal sleep until another goal of ours finishes instead of polling).
    locked_outputs: BTreeMap<GoalId, BTreeSet<StorePath>>,
    last_woken_up: Option<Instant>,
    /// Compressed logs of finished builds whose writer threads are still finishing.
    finishing_logs: std::collections::VecDeque<nixb_logs::FinishingLog>,
    /// Build directories, with emptied ones kept for reuse.
    pub build_dirs: crate::build_dir::BuildDirs,
    /// Buffer for reading log pipes, allocated once.
    read_buf: Vec<u8>,
    /// The store's spare lock files, for output locks.
    pub lock_pool: Option<Arc<nixb_store::locks::LockFilePool>>,
    /// Output locks of finished builds and their emptied build directories, released and
    /// recycled just before the loop waits (see [`Worker::release_later`]).
    deferred_locks: Vec<nixb_store::locks::PathLocks>,
    deferred_dirs: Vec<crate::build_dir::BuildDir>,
    /// Local builds whose builder exited successfully, oldest first: their goals are woken
    /// to check and register the outputs only once the freed build slots have gone to
    /// waiting goals (see [`Worker::run`]).
    exited_builds: std::collections::VecDeque<GoalId>,
    pub failures: Vec<Failure>,
    pub permanent_failure: bool,
    pub timed_out: bool,
    pub hash_mismatch: bool,
    pub check_mismatch: bool,
    /// Fresh network namespaces made ahead of time for sandboxed builds; started with the
    /// first one.
    netns_pool: Option<nixb_sandbox::NetNsPool>,
    /// The substituters' `--query` processes, shared by all substitution goals.
    pub subst_queries: crate::substitution_goal::QueryPool,
    /// The threads reading binary caches for substitution goals; its wake-up pipe is
    /// polled with the children's.
    pub builtin_subst: crate::builtin_substituter::BuiltinSubstituter,
    /// The build hook waiting for its next request (a goal whose build it accepted takes
    /// it over, and the next request starts a fresh one).
    pub hook: Option<crate::hook::HookInstance>,
    /// Kills the builders if this process dies; started with the first builder. Declared
    /// last so that it is dropped after the children (all reaped by then).
    watchdog: Option<crate::watchdog::Watchdog>,
}

impl<'a> Worker<'a> {
    pub fn new(
        store: &'a dyn BuildStore,
        cfg: &'a WorkerConfig,
        sink: &'a mut dyn EventSink,
    ) -> Worker<'a> {
        Worker {
            store,
            cfg,
            sink,
            graph: Graph::new(cfg.keep_going),
            goals: Vec::new(),
            derivation_goals: HashMap::new(),
            substitution_goals: HashMap::new(),
            dedup_keys: Vec::new(),
            drv_cache: HashMap::new(),
            children: BTreeMap::new(),
            nr_local_builds: 0,
            locked_outputs: BTreeMap::new(),
            last_woken_up: None,
            read_buf: Vec::new(),
            lock_pool: store.lock_pool(),
            deferred_locks: Vec::new(),
            deferred_dirs: Vec::new(),
            exited_builds: std::collections::VecDeque::new(),
            finishing_logs: std::collections::VecDeque::new(),
            build_dirs: crate::build_dir::BuildDirs::new(
                &cfg.build_dir_root,
                cfg.max_jobs.clamp(1, 64),
            ),
            failures: Vec::new(),
            permanent_failure: false,
            timed_out: false,
            hash_mismatch: false,
            check_mismatch: false,
            netns_pool: None,
            subst_queries: Default::default(),
            builtin_subst: crate::builtin_substituter::BuiltinSubstituter::new(
                cfg,
                store.store_dir().clone(),
            ),
            hook: None,
            watchdog: None,
        }
    }

    /// The derivation at `drv`, read and parsed once per worker. A `.drv` cannot change once
    /// valid (its path is its contents' hash), while the graph names each one several times:
    /// its own goal, and every dependent working out its input closure. Failures are not
    /// remembered, since a substitution goal may make the derivation valid later.
    pub fn derivation(&mut self, drv: &StorePath) -> Result<Arc<Derivation>, StoreFault> {
        if let Some(d) = self.drv_cache.get(drv) {
            return Ok(Arc::clone(d));
        }
        let d = Arc::new(self.store.read_derivation(drv)?);
        self.drv_cache.insert(drv.clone(), Arc::clone(&d));
        Ok(d)
    }

    pub fn store_dir(&self) -> &StoreDir {
        self.store.store_dir()
    }

    pub fn emit(&mut self, e: Event) {
        self.sink.event(e);
    }

    pub fn message(&mut self, level: Level, text: String) {
        self.sink.event(Event::Message { level, text });
    }

    fn insert_goal(&mut self, goal: Goal) -> GoalId {
        let id = self.graph.add_goal();
        debug_assert_eq!(id.0, self.goals.len());
        self.goals.push(Some(goal));
        self.dedup_keys.push(None);
        id
    }

    /// The goal building `drv` (shared by everyone who needs it), wanting at least `wanted`
    /// outputs (empty = all).
    pub fn make_derivation_goal(
        &mut self,
        drv: &StorePath,
        wanted: &BTreeSet<String>,
        mode: BuildMode,
    ) -> GoalId {
        if let Some(&id) = self.derivation_goals.get(drv) {
            if let Some(Some(Goal::Derivation(g))) = self.goals.get_mut(id.0) {
                g.add_wanted_outputs(wanted);
                return id;
            }
            // The goal is running right now (taken out of its slot): it is the caller
            // itself, which cannot depend on itself; fall through to a fresh goal.
        }
        let id = self.insert_goal(Goal::Derivation(Box::new(DerivationGoal::new(
            drv.clone(),
            wanted.clone(),
            mode,
        ))));
        self.derivation_goals.insert(drv.clone(), id);
        self.dedup_keys[id.0] = Some((true, drv.clone()));
        id
    }

    pub fn make_substitution_goal(&mut self, path: &StorePath, repair: bool) -> GoalId {
        if let Some(&id) = self.substitution_goals.get(path) {
            return id;
        }
        let id = self.insert_goal(Goal::Substitution(Box::new(SubstitutionGoal::new(
            path.clone(),
            repair,
        ))));
        self.substitution_goals.insert(path.clone(), id);
        self.dedup_keys[id.0] = Some((false, path.clone()));
        id
    }

    /// Finishes goal `id`: tells its waiters and forgets it.
    pub fn am_done(&mut self, id: GoalId, result: ExitCode) {
        self.forget(id);
        self.graph.am_done(id, result);
    }

    /// Drops everything the worker keeps for `id` except its goal value.
    fn forget(&mut self, id: GoalId) {
        if let Some((is_drv, key)) = self.dedup_keys.get_mut(id.0).and_then(Option::take) {
            let map = if is_drv {
                &mut self.derivation_goals
            } else {
                &mut self.substitution_goals
            };
            // A newer goal may have taken the key (see `make_derivation_goal`).
            if map.get(&key) == Some(&id) {
                map.remove(&key);
            }
        }
        self.locked_outputs.remove(&id);
        self.child_terminated(id);
    }

    pub fn record_failure(&mut self, f: Failure) {
        self.failures.push(f);
    }

    // --- build slots and sleeping -------------------------------------------------------

    pub fn nr_local_builds(&self) -> usize {
        self.nr_local_builds
    }

    pub fn wait_for_build_slot(&mut self, id: GoalId) {
        if self.nr_local_builds < self.cfg.max_jobs {
            self.graph.wake_up(id);
        } else {
            self.graph.wait_for_build_slot(id);
        }
    }

    pub fn wait_for_any_goal(&mut self, id: GoalId) {
        self.graph.wait_for_any_goal(id);
    }

    pub fn wait_for_a_while(&mut self, id: GoalId) {
        self.graph.wait_for_a_while(id);
    }

    pub fn set_locked_outputs(&mut self, id: GoalId, paths: BTreeSet<StorePath>) {
        self.locked_outputs.insert(id, paths);
    }

    pub fn clear_locked_outputs(&mut self, id: GoalId) {
        self.locked_outputs.remove(&id);
    }

    pub fn is_locked_by_me(&self, path: &StorePath) -> bool {
        self.locked_outputs.values().any(|s| s.contains(path))
    }

    /// A never-used network namespace for a sandboxed build, or `None` when none is ready
    /// (the clone then creates one). Creating a network namespace is the dearest step of a
    /// sandbox start; the pool takes it off the build's critical path without sharing a
    /// namespace between builds.
    pub fn prepared_netns(&mut self) -> Option<OwnedFd> {
        if self.netns_pool.is_none() {
            // Enough for every build slot plus the next wave.
            let target = self.cfg.max_jobs.clamp(1, 16) * 2;
            self.netns_pool = nixb_sandbox::NetNsPool::new(target).ok();
        }
        self.netns_pool.as_ref().and_then(|p| p.take())
    }

    // --- children -----------------------------------------------------------------------

    /// Forks the watchdog if it is not running yet. Called before a builder is started, so
    /// that the fork (milliseconds for a large worker) does not sit between the builder's
    /// start and its registration. Returns the pipe a sandboxed builder announces itself on
    /// (`SandboxSpec::announce`); `None`, with a warning, when the watchdog could not start.
    pub fn ensure_watchdog(&mut self) -> Option<std::os::fd::RawFd> {
        if self.watchdog.is_none() {
            match crate::watchdog::Watchdog::start() {
                Ok(wd) => self.watchdog = Some(wd),
                Err(e) => self.message(Level::Warn, e.to_string()),
            }
        }
        self.watchdog.as_ref().and_then(|wd| wd.announce_fd())
    }

    pub fn child_started(
        &mut self,
        id: GoalId,
        builder: nixb_sandbox::Builder,
        log: OwnedFd,
        in_build_slot: bool,
    ) {
        let now = Instant::now();
        self.ensure_watchdog();
        if let Some(wd) = self.watchdog.as_mut() {
            // The builder leads its own process group (it called setsid).
            wd.builder_started(builder.pid.as_raw());
        }
        self.children.insert(
            id,
            Child {
                builder,
                log: Some(log),
                respect_timeouts: true,
                in_build_slot,
                last_output: now,
                started: now,
            },
        );
        if in_build_slot {
            self.nr_local_builds += 1;
        }
    }

    /// Builds done by the hook are watched by the hook itself: the worker must not apply
    /// max-silent-time or timeout to the hook process.
    pub fn set_respect_timeouts(&mut self, id: GoalId, respect: bool) {
        if let Some(c) = self.children.get_mut(&id) {
            c.respect_timeouts = respect;
        }
    }

    /// Forgets the child of `id` (killing it if it still runs) and frees its build slot.
    pub fn child_terminated(&mut self, id: GoalId) {
        if let Some(mut child) = self.children.remove(&id) {
            let _ = child.builder.kill();
            let _ = child.builder.wait();
            if let Some(wd) = self.watchdog.as_mut() {
                wd.builder_reaped(child.builder.pid.as_raw());
            }
            if child.in_build_slot {
                self.nr_local_builds -= 1;
                if self.nr_local_builds == 0 && self.cfg.max_jobs == 0 {
                    // Only a preferLocalBuild goal can use the idle machine; which of the
                    // waiters are such goals only they know.
                    self.graph.wake_slot_waiters();
                }
                // Otherwise the local slot goes to the longest waiting goal: see
                // `hand_out_slots`.
            } else {
                // A remote build ended: a machine of the build hook may have room now,
                // and only the hook can tell which waiting goal it would take, so every
                // waiter asks again (as in the original).
                self.graph.wake_slot_waiters();
            }
        }
    }

    /// Lets a finished build's log complete on its writer thread instead of waiting for
    /// bzip2 here: a chatty build's backlog would otherwise stall every other build. All
    /// logs are complete when `run` returns. Past a few logs in flight the oldest is
    /// waited for, which bounds their memory.
    pub fn finish_log_later(&mut self, log: nixb_logs::FinishingLog) {
        self.finishing_logs.push_back(log);
        let limit = 2 * self.cfg.max_jobs.max(1);
        while let Some(front) = self.finishing_logs.front() {
            if !front.is_done() && self.finishing_logs.len() <= limit {
                break;
            }
            if let Some(done) = self.finishing_logs.pop_front() {
                self.log_finished(done);
            }
        }
    }

    fn log_finished(&mut self, log: nixb_logs::FinishingLog) {
        if let Err(e) = log.wait() {
            self.message(Level::Warn, format!("closing the build log: {e}"));
        }
    }

    /// Releases the output locks of a build whose outputs are registered, once the loop
    /// has nothing else to do. Until then the outputs are valid and the locks only keep
    /// others waiting a moment longer; meanwhile the goals this build woke start their
    /// builders, so in a chain the release overlaps the next builder instead of delaying
    /// it.
    pub fn release_later(&mut self, locks: nixb_store::locks::PathLocks) {
        self.deferred_locks.push(locks);
    }

    /// Empties a finished build's directory for reuse, likewise once the loop has nothing
    /// else to do.
    pub fn recycle_later(&mut self, dir: crate::build_dir::BuildDir) {
        self.deferred_dirs.push(dir);
    }

    fn run_deferred(&mut self) {
        // Dropping them releases the locks (deleting the lock files as set).
        self.deferred_locks.clear();
        for dir in std::mem::take(&mut self.deferred_dirs) {
            if let Err(e) = self.build_dirs.recycle(dir) {
                self.message(Level::Warn, e.to_string());
            }
        }
    }

    /// Waits for every log still being finished.
    fn finish_all_logs(&mut self) {
        while let Some(log) = self.finishing_logs.pop_front() {
            self.log_finished(log);
        }
    }

    // --- the loop -----------------------------------------------------------------------

    /// Runs until every top goal is done (or one failed without keep-going).
    pub fn run(&mut self, top: &[GoalId]) -> Result<(), GoalsError> {
        for &t in top {
            self.graph.set_top(t);
        }
        loop {
            while self.graph.has_top_goals() {
                // Awake goals first, then freed slots to waiting goals (their builders
                // start), and only then the post-processing of builds that exited, one at
                // a time: a slot never idles while the worker checks and registers the
                // outputs of the build that left it, and a build that makes dependents
                // ready lets them start before the next exited build is looked at.
                if !self.graph.has_awake() && !self.hand_out_slots() && !self.wake_exited_build() {
                    break;
                }
                for id in self.graph.take_awake() {
                    self.work(id);
                    self.destroy_orphans();
                    if !self.graph.has_top_goals() {
                        break;
                    }
                }
            }
            if !self.graph.has_top_goals() {
                break;
            }
            self.run_deferred();
            if !self.children.is_empty()
                || self.graph.has_waiting_for_a_while()
                || self.builtin_subst.busy()
            {
                self.wait_for_input()?;
            } else if !self.graph.has_awake() {
                if self.cfg.max_jobs == 0 && self.graph.has_waiting_for_slot() {
                    return Err(GoalsError::NoBuildSlots);
                }
                return Err(GoalsError::Internal("no goal can make progress".into()));
            }
        }
        self.teardown();
        Ok(())
    }

    /// Wakes as many goals waiting for a build slot as there are free slots; true if it
    /// woke any. Called only when no goal is awake, so nobody else takes the slots before
    /// the woken goals run; a woken goal that does not take its slot after all (its
    /// outputs became valid, another process holds their lock) leaves it free for the
    /// next call.
    fn hand_out_slots(&mut self) -> bool {
        let free = self.cfg.max_jobs.saturating_sub(self.nr_local_builds);
        free > 0 && self.graph.wake_slot_waiters_up_to(free) > 0
    }

    /// Wakes the goal of the oldest build whose builder exited, to check and register its
    /// outputs; false if there is none. Goals destroyed meanwhile (a stop without
    /// keep-going) are skipped.
    fn wake_exited_build(&mut self) -> bool {
        while let Some(id) = self.exited_builds.pop_front() {
            if self.graph.is_alive(id) {
                self.graph.wake_up(id);
                return true;
            }
        }
        false
    }

    /// Destroys every goal still alive (after a stop without keep-going), killing builders.
    fn teardown(&mut self) {
        self.graph.collect_orphans();
        for id in self.graph.live_goals() {
            self.forget(id);
            self.goals[id.0] = None;
        }
        for id in self.children.keys().copied().collect::<Vec<_>>() {
            self.child_terminated(id);
        }
        for slot in &mut self.goals {
            *slot = None;
        }
        self.hook = None;
        self.run_deferred();
        self.finish_all_logs();
    }

    fn destroy_orphans(&mut self) {
        for id in self.graph.collect_orphans() {
            self.forget(id);
            // Dropping the goal value deletes its build directory and closes its log.
            self.goals[id.0] = None;
        }
    }

    /// Takes goal `id` out of its slot, lets `f` act on it with the worker at hand, and
    /// puts it back unless it finished.
    fn with_goal(&mut self, id: GoalId, f: impl FnOnce(&mut Goal, &mut Worker<'a>)) {
        let Some(mut goal) = self.goals.get_mut(id.0).and_then(Option::take) else {
            return;
        };
        f(&mut goal, self);
        if self.graph.is_alive(id) {
            self.goals[id.0] = Some(goal);
        }
    }

    fn work(&mut self, id: GoalId) {
        self.with_goal(id, |goal, w| match goal {
            Goal::Derivation(g) => g.work(id, w),
            Goal::Substitution(g) => g.work(id, w),
        });
    }

    fn handle_output(&mut self, id: GoalId, chunk: &[u8]) {
        self.with_goal(id, |goal, w| match goal {
            Goal::Derivation(g) => g.handle_child_output(id, w, chunk),
            Goal::Substitution(g) => g.handle_child_output(w, chunk),
        });
    }

    fn child_exited(&mut self, id: GoalId, status: ChildStatus) {
        // A local build that succeeded is finished after the slot it frees has gone to the
        // next build (see `run`). Failures are handled at once: without keep-going they
        // stop everything, and no new builder should start first.
        let later = matches!(&status, Ok(s) if s.success())
            && self.children.get(&id).is_some_and(|c| c.in_build_slot);
        self.child_terminated(id);
        self.with_goal(id, |goal, w| {
            let later = match goal {
                Goal::Derivation(g) => {
                    g.child_exited(status);
                    later
                }
                Goal::Substitution(g) => {
                    g.child_exited(status);
                    false
                }
            };
            if later {
                w.exited_builds.push_back(id);
            } else {
                w.graph.wake_up(id);
            }
        });
    }

    fn cancel(&mut self, id: GoalId, kind: FailureKind, reason: String) {
        self.child_terminated(id);
        self.with_goal(id, |goal, w| match goal {
            Goal::Derivation(g) => g.cancel(id, w, kind, reason),
            Goal::Substitution(g) => g.cancel(id, w, reason),
        });
    }

    fn nearest_deadline(&self, now: Instant) -> Option<Instant> {
        let mut nearest: Option<Instant> = None;
        let mut consider = |t: Instant| nearest = Some(nearest.map_or(t, |n| n.min(t)));
        for c in self.children.values().filter(|c| c.respect_timeouts) {
            if let Some(d) = self.cfg.max_silent_time {
                consider(c.last_output + d);
            }
            if let Some(d) = self.cfg.timeout {
                consider(c.started + d);
            }
        }
        if self.graph.has_waiting_for_a_while() {
            let last = self.last_woken_up.unwrap_or(now);
            consider(last + self.cfg.build_poll_interval);
        }
        nearest
    }

    fn wait_for_input(&mut self) -> Result<(), GoalsError> {
        let now = Instant::now();
        if self.graph.has_waiting_for_a_while() {
            if self.last_woken_up.is_none() {
                self.emit(Event::WaitingForLocks);
                self.last_woken_up = Some(now);
            }
        } else {
            self.last_woken_up = None;
        }
        let timeout = match self.nearest_deadline(now) {
            Some(t) => {
                // Round up so that we do not wake a millisecond early and spin.
                let ms = t.saturating_duration_since(now).as_millis() + 1;
                PollTimeout::try_from(ms.min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX)
            }
            None => PollTimeout::NONE,
        };

        // (goal, is exit fd) for each entry of `fds`.
        let mut owners: Vec<(GoalId, bool)> = Vec::new();
        let mut raw: Vec<i32> = Vec::new();
        for (&id, c) in &self.children {
            if let Some(log) = &c.log {
                owners.push((id, false));
                raw.push(log.as_raw_fd());
            }
            owners.push((id, true));
            raw.push(c.builder.pidfd().as_raw_fd());
        }
        let ready: Vec<(GoalId, bool)> = {
            let borrowed: Vec<_> = raw
                .iter()
                // SAFETY: each descriptor belongs to a child in `self.children`, which is not
                // touched until `borrowed` is dropped at the end of this block.
                .map(|&fd| unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) })
                .collect();
            let mut pfds: Vec<PollFd> = borrowed
                .iter()
                .map(|fd| PollFd::new(fd.as_fd(), PollFlags::POLLIN))
                .collect();
            // Last: the built-in substituter's wake-up pipe, when it has jobs out.
            if let Some(fd) = self.builtin_subst.wake_fd() {
                pfds.push(PollFd::new(fd, PollFlags::POLLIN));
            }
            match nix::poll::poll(&mut pfds, timeout) {
                Ok(_) => {}
                Err(Errno::EINTR) => return Ok(()),
                Err(e) => return Err(GoalsError::Poll(e)),
            }
            pfds.iter()
                .zip(&owners)
                .filter(|(p, _)| p.revents().is_some_and(|r| !r.is_empty()))
                .map(|(_, o)| *o)
                .collect()
        };
        let after = Instant::now();
        self.deliver_substitutions();

        // Log data first, so that a builder's last words reach its goal before its exit.
        for &(id, is_exit) in &ready {
            if !is_exit {
                self.read_log(id, after);
            }
        }
        for &(id, is_exit) in &ready {
            if is_exit && self.children.contains_key(&id) {
                self.reap(id);
            }
        }

        let ids: Vec<GoalId> = self.children.keys().copied().collect();
        for id in ids {
            let Some(c) = self.children.get(&id) else {
                continue;
            };
            if !c.respect_timeouts {
                continue;
            }
            if let Some(d) = self.cfg.max_silent_time {
                if after.duration_since(c.last_output) >= d {
                    let msg = format!("timed out after {} seconds of silence", d.as_secs());
                    self.cancel(id, FailureKind::TimedOut, msg);
                    continue;
                }
            }
            if let Some(d) = self.cfg.timeout {
                if after.duration_since(c.started) >= d {
                    let msg = format!("timed out after {} seconds", d.as_secs());
                    self.cancel(id, FailureKind::TimedOut, msg);
                }
            }
        }

        if self.graph.has_waiting_for_a_while() {
            let last = *self.last_woken_up.get_or_insert(after);
            if last + self.cfg.build_poll_interval <= after {
                self.last_woken_up = Some(after);
                self.graph.wake_a_while_waiters();
            }
        }
        Ok(())
    }

    /// Hands the built-in substituter's finished jobs to their goals. A goal that is gone
    /// drops its result, which deletes what was unpacked for it and releases its lock.
    fn deliver_substitutions(&mut self) {
        for c in self.builtin_subst.take_completions(self.store) {
            let id = c.goal();
            self.with_goal(id, |goal, w| {
                if let Goal::Substitution(g) = goal {
                    g.builtin_completed(c);
                    w.graph.wake_up(id);
                }
            });
        }
    }

    /// Reads what is available on `id`'s log pipe (one read), handing it to the goal.
    fn read_log(&mut self, id: GoalId, now: Instant) {
        let mut buf = std::mem::take(&mut self.read_buf);
        buf.resize(64 * 1024, 0);
        if let Some(c) = self.children.get_mut(&id) {
            if let Some(log) = &c.log {
                match nix::unistd::read(log.as_raw_fd(), &mut buf) {
                    Ok(0) => c.log = None,
                    Ok(n) => {
                        c.last_output = now;
                        self.handle_output(id, &buf[..n]);
                    }
                    Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
                    Err(_) => c.log = None,
                }
            }
        }
        self.read_buf = buf;
    }

    /// The builder of `id` exited: reap it (which kills what is left of its process group),
    /// drain its log pipe and let the goal finish the build.
    fn reap(&mut self, id: GoalId) {
        let status = match self.children.get_mut(&id) {
            Some(c) => c.builder.wait().map_err(|e| match e {
                nixb_sandbox::SandboxError::Setup { .. } => ChildError::Setup(e.to_string()),
                e => ChildError::Other(e.to_string()),
            }),
            None => return,
        };
        let usage = self
            .children
            .get(&id)
            .and_then(|c| c.builder.resource_usage());
        if let (Some(usage), Some(Some(Goal::Derivation(g)))) = (usage, self.goals.get(id.0)) {
            let drv = g.drv_path.clone();
            self.emit(Event::BuildResources { drv, usage });
        }
        self.drain_log(id);
        self.child_exited(id, status);
    }

    fn drain_log(&mut self, id: GoalId) {
        let mut buf = std::mem::take(&mut self.read_buf);
        buf.resize(64 * 1024, 0);
        self.drain_log_with(id, &mut buf);
        self.read_buf = buf;
    }

    fn drain_log_with(&mut self, id: GoalId, buf: &mut [u8]) {
        // The process group is dead, so the pipe reaches end-of-file as soon as the kernel
        // has closed their descriptors. A process that left the group (setsid) may still
        // hold it open; stop waiting once the pipe stays quiet for a moment.
        const QUIET: Duration = Duration::from_millis(200);
        loop {
            let Some(c) = self.children.get_mut(&id) else {
                return;
            };
            let Some(log) = &c.log else { return };
            let mut pfd = [PollFd::new(log.as_fd(), PollFlags::POLLIN)];
            match nix::poll::poll(
                &mut pfd,
                PollTimeout::try_from(QUIET.as_millis() as i32).unwrap_or(PollTimeout::ZERO),
            ) {
                Ok(0) => return,
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(_) => return,
            }
            match nix::unistd::read(log.as_raw_fd(), buf) {
                Ok(0) => {
                    c.log = None;
                    return;
                }
                Ok(n) => {
                    c.last_output = Instant::now();
                    self.handle_output(id, &buf[..n]);
                }
                Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
                Err(_) => return,
            }
        }
    }

    /// Nix 2.x's exit status for a run with failures: 100 plus bits for a timeout (1), a
    /// fixed-output hash mismatch (2) and a `--check` mismatch (4); 1 for other failures.
    pub fn failing_exit_status(&self) -> i32 {
        let build_failure = self.permanent_failure || self.timed_out || self.hash_mismatch;
        let mut mask = 0;
        if build_failure {
            mask |= 0x04;
        }
        if self.timed_out {
            mask |= 0x01;
        }
        if self.hash_mismatch {
            mask |= 0x02;
        }
        if self.check_mismatch {
            mask |= 0x08;
        }
        if mask != 0 {
            mask | 0x60
        } else {
            1
        }
    }
}

impl Drop for Worker<'_> {
    fn drop(&mut self) {
        // After an error `run` did not tear down: still leave complete logs behind.
        for log in self.finishing_logs.drain(..) {
            let _ = log.wait();
        }
    }
}
