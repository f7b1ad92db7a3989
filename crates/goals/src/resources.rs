//! The worker's shared resources, which goals use through [`Services`]: the clients' sinks,
//! parsed derivations, the running children and the build slots they take, output locks
//! held by goals of this run, build directories, logs finishing in the background, the
//! watchdog, prepared network namespaces, the build hook and the substituters.
//!
//! The scheduler (`worker`) polls the children kept here; goals never see this type.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::os::fd::{OwnedFd, RawFd};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use nixb_store::derivation::Derivation;
use nixb_store::locks::PathLocks;
use nixb_store::StorePath;

use crate::build_dir::{BuildDir, BuildDirs};
use crate::builtin_substituter::BuiltinSubstituter;
use crate::config::WorkerConfig;
use crate::event::{Event, Level};
use crate::graph::GoalId;
use crate::hook_instance::HookInstance;
use crate::route::{ClientId, Router};
use crate::services::Services;
use crate::store::{BuildStore, StoreFault};
use crate::substituter_query::QueryPool;
use crate::watchdog::Watchdog;

/// A running child of a goal (builder, substituter, hook), owned here so that destroying
/// its goal kills it.
pub(crate) struct Child {
    pub builder: nixb_sandbox::Builder,
    /// Read side of the log pipe (non-blocking); `None` after end-of-file.
    pub log: Option<OwnedFd>,
    /// Killed after this long without output (`max-silent-time`), or this long in all
    /// (`timeout`); `None`: no limit (a child that does not respect timeouts has none).
    pub max_silent_time: Option<Duration>,
    pub timeout: Option<Duration>,
    pub in_build_slot: bool,
    pub last_output: Instant,
    pub started: Instant,
}

/// Which goals waiting for a build slot a freed slot concerns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum SlotWaiters {
    /// None at once: the scheduler hands out free local slots itself.
    #[default]
    Nobody,
    /// Every one asks again (a remote build ended, or the last local one with max-jobs 0).
    All,
}

/// An output's name and its path (`None` for a floating content-addressed one).
type OutputPath = (String, Option<StorePath>);

/// At most this many derivations' outputs are remembered (about a MiB). A dependent asks
/// for its inputs' outputs soon after they are built, and the worker holds at most about
/// [`crate::worker::GOAL_BUDGET`] goals, so what is asked for is near the work; a table
/// as large as the graph would grow with it.
const DRV_OUTPUTS_MAX: usize = 4096;

/// The smallest size at which the derivation cache is swept of dead entries.
const DRV_CACHE_SWEEP_MIN: usize = 1024;

pub(crate) struct Resources<'a> {
    store: &'a dyn BuildStore,
    cfg: &'a WorkerConfig,
    /// The clients' sinks, and which goal's events go to which client.
    pub router: Router<'a>,
    /// Parsed derivations, by path, while some goal holds them (see
    /// [`Services::derivation`]): a goal waiting for its inputs lets go of its own, so
    /// that what a wide graph keeps per pending derivation stays small.
    drv_cache: HashMap<StorePath, Weak<Derivation>>,
    /// `drv_cache` is swept of dead entries when it reaches this many.
    drv_cache_sweep_at: usize,
    /// The output paths of the derivations read (up to [`DRV_OUTPUTS_MAX`]): what a goal
    /// asks of its inputs' derivations, a few dozen bytes each.
    drv_outputs: HashMap<StorePath, Box<[OutputPath]>>,
    pub children: BTreeMap<GoalId, Child>,
    nr_local_builds: usize,
    /// Set when a freed slot should wake every goal waiting for one; taken by the
    /// scheduler (see [`Resources::take_slot_waiters`]).
    slot_waiters: SlotWaiters,
    /// Output paths locked by goals of this worker (flock would block them too, but this
    /// lets a goal sleep until another goal of ours finishes instead of polling).
    locked_outputs: BTreeMap<GoalId, BTreeSet<StorePath>>,
    /// Compressed logs of finished builds whose writer threads are still finishing.
    finishing_logs: VecDeque<nixb_logs::FinishingLog>,
    /// Build directories.
    build_dirs: BuildDirs,
    /// Output locks of finished builds and their build directories, released and deleted
    /// just before the loop waits (see [`Services::release_later`]).
    deferred_locks: Vec<PathLocks>,
    deferred_dirs: Vec<BuildDir>,
    /// Fresh network namespaces made ahead of time for sandboxed builds; started with the
    /// first one.
    netns_pool: Option<nixb_sandbox::NetNsPool>,
    /// The substituters' `--query` processes, shared by all substitution goals.
    subst_queries: QueryPool,
    /// The threads reading binary caches for substitution goals; its wake-up pipe is
    /// polled with the children's.
    pub builtin_subst: BuiltinSubstituter,
    /// The build hook waiting for its next request (a goal whose build it accepted takes
    /// it over, and the next request starts a fresh one).
    hook: Option<HookInstance>,
    /// Kills the builders if this process dies; started with the first builder. Declared
    /// last so that it is dropped after the children (all reaped by then).
    watchdog: Option<Watchdog>,
}

impl<'a> Resources<'a> {
    /// The outputs of the derivation at `drv` and their paths, read once per run (of up
    /// to [`DRV_OUTPUTS_MAX`] derivations).
    pub fn outputs_of(&mut self, drv: &StorePath) -> Result<&[OutputPath], StoreFault> {
        if !self.drv_outputs.contains_key(drv) {
            Services::derivation(self, drv)?;
        }
        Ok(self.drv_outputs.get(drv).map_or(&[], |o| &o[..]))
    }

    pub fn new(store: &'a dyn BuildStore, cfg: &'a WorkerConfig) -> Resources<'a> {
        Resources {
            store,
            cfg,
            router: Router::new(),
            drv_cache: HashMap::new(),
            drv_cache_sweep_at: DRV_CACHE_SWEEP_MIN,
            drv_outputs: HashMap::new(),
            children: BTreeMap::new(),
            nr_local_builds: 0,
            slot_waiters: SlotWaiters::Nobody,
            locked_outputs: BTreeMap::new(),
            finishing_logs: VecDeque::new(),
            build_dirs: BuildDirs::new(&cfg.build_dir_root),
            deferred_locks: Vec::new(),
            deferred_dirs: Vec::new(),
            netns_pool: None,
            subst_queries: QueryPool::default(),
            builtin_subst: BuiltinSubstituter::new(cfg, store.store_dir().clone()),
            hook: None,
            watchdog: None,
        }
    }

    pub fn message(&mut self, level: Level, text: String) {
        self.router.emit(Event::Message { level, text });
    }

    /// Which slot waiters a child that ended since the last call wants woken.
    pub fn take_slot_waiters(&mut self) -> SlotWaiters {
        std::mem::take(&mut self.slot_waiters)
    }

    pub fn child_started(
        &mut self,
        id: GoalId,
        builder: nixb_sandbox::Builder,
        log: OwnedFd,
        in_build_slot: bool,
        limits: Option<(Option<Duration>, Option<Duration>)>,
    ) {
        let (max_silent_time, timeout) = limits.unwrap_or((None, None));
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
                max_silent_time,
                timeout,
                in_build_slot,
                last_output: now,
                started: now,
            },
        );
        if in_build_slot {
            self.nr_local_builds += 1;
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
                    self.slot_waiters = SlotWaiters::All;
                }
                // Otherwise the local slot goes to the longest waiting goal: see the
                // scheduler's `hand_out_slots`.
            } else {
                // A remote build ended: a machine of the build hook may have room now,
                // and only the hook can tell which waiting goal it would take, so every
                // waiter asks again (as in the original).
                self.slot_waiters = SlotWaiters::All;
            }
        }
    }

    pub fn set_locked_outputs(&mut self, id: GoalId, paths: BTreeSet<StorePath>) {
        self.locked_outputs.insert(id, paths);
    }

    pub fn clear_locked_outputs(&mut self, id: GoalId) {
        self.locked_outputs.remove(&id);
    }

    fn log_finished(&mut self, log: nixb_logs::FinishingLog) {
        if let Err(e) = log.wait() {
            self.message(Level::Warn, format!("closing the build log: {e}"));
        }
    }

    /// Releases the locks and deletes the directories handed over since the last call.
    pub fn run_deferred(&mut self) {
        // Dropping them releases the locks (deleting the lock files as set).
        self.deferred_locks.clear();
        for dir in std::mem::take(&mut self.deferred_dirs) {
            if let Err(e) = self.build_dirs.remove(dir) {
                self.message(Level::Warn, e.to_string());
            }
        }
    }

    /// Waits for every log still being finished.
    pub fn finish_all_logs(&mut self) {
        while let Some(log) = self.finishing_logs.pop_front() {
            self.log_finished(log);
        }
    }

    /// Client `c` has become interested in goal `g`: it keeps the temporary roots `g` has
    /// taken, or the process does.
    pub fn keep_roots_for(&mut self, g: GoalId, c: ClientId) {
        let (missed, errors) = self.router.keep_roots_of(g, c);
        if let Some(p) = missed.first() {
            self.warn_unkept(p, errors);
        }
        for p in missed {
            if let Err(e) = self.store.add_temp_root(&p) {
                let printed = self.store.store_dir().print(&p);
                self.message(
                    Level::Warn,
                    format!("cannot protect '{printed}' from garbage collection: {e}"),
                );
            }
        }
    }

    /// Warns of the clients that failed to keep `p` (the process keeps it instead).
    fn warn_unkept(&mut self, p: &StorePath, errors: Vec<String>) {
        for e in errors {
            let printed = self.store.store_dir().print(p);
            self.message(
                Level::Warn,
                format!("a client could not keep '{printed}' as a temporary root: {e}"),
            );
        }
    }

    /// Stops the build hook waiting for requests.
    pub fn drop_hook(&mut self) {
        self.hook = None;
    }
}

impl Services for Resources<'_> {
    fn emit(&mut self, event: Event) {
        self.router.emit(event);
    }

    /// A `.drv` cannot change once valid (its path is its contents' hash), while the graph
    /// names each one several times: its own goal, and every dependent working out its
    /// input closure. The parsed derivation is shared while some goal holds it; its
    /// outputs are kept for the run, which is all a dependent asks. Failures are not
    /// remembered, since a substitution goal may make the derivation valid later.
    fn derivation(&mut self, drv: &StorePath) -> Result<Arc<Derivation>, StoreFault> {
        if let Some(d) = self.drv_cache.get(drv).and_then(Weak::upgrade) {
            return Ok(d);
        }
        let d = Arc::new(self.store.read_derivation(drv)?);
        if self.drv_cache.len() >= self.drv_cache_sweep_at {
            self.drv_cache.retain(|_, w| w.strong_count() > 0);
            self.drv_cache_sweep_at = (2 * self.drv_cache.len()).max(DRV_CACHE_SWEEP_MIN);
        }
        self.drv_cache.insert(drv.clone(), Arc::downgrade(&d));
        if !self.drv_outputs.contains_key(drv) {
            // A daemon's worker may never go idle: a bound instead of a life-long table
            // (forgetting costs a dependent one more read).
            if self.drv_outputs.len() >= DRV_OUTPUTS_MAX {
                self.drv_outputs.clear();
            }
            let outputs = d
                .outputs
                .iter()
                .map(|(name, o)| (name.clone(), o.path.clone()))
                .collect();
            self.drv_outputs.insert(drv.clone(), outputs);
        }
        Ok(d)
    }

    fn derivation_output(
        &mut self,
        drv: &StorePath,
        output: &str,
    ) -> Result<Option<StorePath>, StoreFault> {
        Ok(self
            .outputs_of(drv)?
            .iter()
            .find(|(name, _)| name == output)
            .and_then(|(_, p)| p.clone()))
    }

    fn add_temp_root(&mut self, p: &StorePath) -> Result<(), StoreFault> {
        let (kept, errors) = self.router.keep_temp_root(p);
        self.warn_unkept(p, errors);
        if kept {
            Ok(())
        } else {
            self.store.add_temp_root(p)
        }
    }

    fn nr_local_builds(&self) -> usize {
        self.nr_local_builds
    }

    fn is_locked_by_me(&self, path: &StorePath) -> bool {
        self.locked_outputs.values().any(|s| s.contains(path))
    }

    fn kill_child(&mut self, id: GoalId) {
        self.child_terminated(id);
    }

    fn build_dirs(&mut self) -> &mut BuildDirs {
        &mut self.build_dirs
    }

    /// Forks the watchdog if it is not running yet. Called before a builder is started, so
    /// that the fork (milliseconds for a large worker) does not sit between the builder's
    /// start and its registration. `None`, with a warning, when the watchdog could not
    /// start.
    fn ensure_watchdog(&mut self) -> Option<RawFd> {
        if self.watchdog.is_none() {
            match Watchdog::start() {
                Ok(wd) => self.watchdog = Some(wd),
                Err(e) => self.message(Level::Warn, e.to_string()),
            }
        }
        self.watchdog.as_ref().and_then(|wd| wd.announce_fd())
    }

    /// Creating a network namespace is the dearest step of a sandbox start; the pool takes
    /// it off the build's critical path without sharing a namespace between builds. `None`
    /// when none is ready (the clone then creates one).
    fn prepared_netns(&mut self) -> Option<OwnedFd> {
        if self.netns_pool.is_none() {
            // Enough for every build slot plus the next wave.
            let target = self.cfg.max_jobs.clamp(1, 16) * 2;
            self.netns_pool = nixb_sandbox::NetNsPool::new(target).ok();
        }
        self.netns_pool.as_ref().and_then(|p| p.take())
    }

    /// Waiting for bzip2 here would let a chatty build's backlog stall every other build.
    /// All logs are complete when the run ends. Past a few logs in flight the oldest is
    /// waited for, which bounds their memory.
    fn finish_log_later(&mut self, log: nixb_logs::FinishingLog) {
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

    /// Until then the outputs are valid and the locks only keep others waiting a moment
    /// longer; meanwhile the goals this build woke start their builders, so in a chain
    /// the release overlaps the next builder instead of delaying it.
    fn release_later(&mut self, locks: PathLocks) {
        self.deferred_locks.push(locks);
    }

    fn remove_later(&mut self, dir: BuildDir) {
        self.deferred_dirs.push(dir);
    }

    fn hook(&mut self) -> &mut Option<HookInstance> {
        &mut self.hook
    }

    fn subst_queries(&mut self) -> &mut QueryPool {
        &mut self.subst_queries
    }

    fn builtin_subst(&mut self) -> &mut BuiltinSubstituter {
        &mut self.builtin_subst
    }
}

impl Drop for Resources<'_> {
    fn drop(&mut self) {
        // After an error the run did not tear down: still leave complete logs behind.
        for log in self.finishing_logs.drain(..) {
            let _ = log.wait();
        }
    }
}
