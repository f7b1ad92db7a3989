//! The worker's scheduler: owns the goals, their graph and the dedup maps, runs awake
//! goals, acts on what they ask for (`services::Request`), and waits for their children
//! (kept in `resources`) in one `poll()`. Goals know neither this type nor each other.
//!
//! ```text
//! loop:
//!   call every awake goal (a goal's call may wake others; repeat until none is awake);
//!   when none is: hand free slots to waiting goals, finish exited builds, make deferred
//!   sub-goals (see `GOAL_BUDGET`)
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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nixb_store::{DerivedPath, StorePath};

use crate::config::{BuildMode, WorkerConfig};
use crate::derivation_goal::DerivationGoal;
use crate::error::GoalsError;
use crate::event::{Event, EventSink, FailureKind, Level};
use crate::graph::{ExitCode, GoalId, Graph, WaiteeCounts};
use crate::outcome::{Failure, Outcome};
use crate::resources::{Resources, SlotWaiters};
use crate::route::ClientId;
use crate::services::{ChildError, ChildStatus, Request, Services, Step, SubGoal};
use crate::store::BuildStore;
use crate::substitution_goal::SubstitutionGoal;
use crate::RealiseOutcome;

/// What the scheduler keeps for one client (see [`ClientId`]): a failure goes to the
/// outcome of each client whose top goals wait for the failed goal.
#[derive(Default)]
struct ClientState {
    outcome: Outcome,
    keep_going: bool,
    /// What the client asked for, in order, and the top goal of each.
    targets: Vec<(DerivedPath, GoalId)>,
    /// Its top goals, once each.
    tops: BTreeSet<GoalId>,
    /// What each of its top goals ended as, once done (a goal's node goes with it).
    results: HashMap<GoalId, ExitCode>,
    /// Top goals not done yet.
    pending: usize,
    /// Its request has ended (all its top goals done, or ended early); it is in
    /// `finished` until the caller takes it.
    ended: bool,
    /// Stopped by a failure without keep-going: tops not done count as failed.
    stopped: bool,
    /// The derivations (and build modes) whose goals failed during its request: goals
    /// made later in the request that need one count it as failed rather than building it
    /// again (with deferred sub-goals, a goal can be asked for after it finished).
    failed_drvs: HashSet<(StorePath, BuildMode)>,
    /// Its `max-silent-time` and `timeout` (shared scheduler only).
    max_silent_time: Option<Duration>,
    timeout: Option<Duration>,
}

/// A goal's key in the worker's dedup maps.
enum DedupKey {
    Derivation(StorePath, BuildMode),
    Substitution(StorePath),
}

/// A sub-goal asked for while the worker held [`GOAL_BUDGET`] goals: made later, when
/// goals have finished or the machine would otherwise idle (see [`Worker::make_deferred`]).
struct Deferred {
    waiter: GoalId,
    /// The waiter's deferral epoch (see [`Graph::defer`]).
    epoch: u32,
    sub: SubGoal,
}

/// How many goals the worker holds before it defers new sub-goals. A goal costs a few
/// hundred bytes to a few KiB while it waits; without a bound a request for a graph of n
/// derivations holds n goals at once, and a daemon building for many clients holds all
/// their graphs. Bounded, the worker makes sub-goals depth first beyond this many (the
/// newest deferred first), so what it holds follows the builds that can run, not the size
/// of the graph. Graphs smaller than this never see a difference.
pub(crate) const GOAL_BUDGET: usize = 256;

pub(crate) enum Goal {
    Derivation(Box<DerivationGoal>),
    Substitution(Box<SubstitutionGoal>),
}

/// The scheduler: the goals, their graph, the dedup maps, the wake-ups, and the loop.
pub(crate) struct Worker<'a> {
    store: &'a dyn BuildStore,
    cfg: &'a WorkerConfig,
    pub graph: Graph,
    /// The live goals' values. Goal and client ids are never given out twice, and every
    /// table here drops a goal's or a client's entry once it is gone: a scheduler that
    /// never goes idle (a busy daemon's) holds nothing of what it has finished.
    goals: HashMap<GoalId, Goal>,
    /// By derivation and, in a shared scheduler, build mode (see
    /// [`Worker::make_derivation_goal`]).
    derivation_goals: HashMap<(StorePath, BuildMode), GoalId>,
    substitution_goals: HashMap<StorePath, GoalId>,
    /// For each goal, the key it has in `derivation_goals` or `substitution_goals`, so
    /// that forgetting a goal is a lookup, not a scan.
    dedup_keys: HashMap<GoalId, DedupKey>,
    last_woken_up: Option<Instant>,
    /// Buffer for reading log pipes, allocated once.
    read_buf: Vec<u8>,
    /// Local builds whose builder exited successfully, oldest first: their goals are woken
    /// to check and register the outputs only once the freed build slots have gone to
    /// waiting goals (see [`Worker::run`]).
    exited_builds: VecDeque<GoalId>,
    /// Each client's targets, failures and the exit-status bits they set, until it is
    /// removed.
    clients: HashMap<ClientId, ClientState>,
    /// Clients whose request ended since the caller last looked.
    finished: Vec<ClientId>,
    /// Serving several clients, each with its own keep-going ([`Worker::new_shared`]).
    shared: bool,
    /// The clients that asked for each top goal.
    clients_of_top: HashMap<GoalId, Vec<ClientId>>,
    /// Sub-goals not made yet, newest last; entries whose waiter no longer waits are
    /// dropped as they come up.
    deferred: Vec<Deferred>,
    /// [`GOAL_BUDGET`], smaller in tests.
    goal_budget: usize,
    /// The most goals held at once.
    #[cfg(test)]
    peak_goals: usize,
    /// What goals use: children, slots, logs, directories, hook, substituters. After the
    /// goals, so that goals are dropped before the children and the watchdog.
    pub res: Resources<'a>,
}

impl<'a> Worker<'a> {
    /// A scheduler for one run of one caller: `cfg.keep_going` holds for the whole graph.
    pub fn new(store: &'a dyn BuildStore, cfg: &'a WorkerConfig) -> Worker<'a> {
        Worker::with_graph(store, cfg, Graph::new(cfg.keep_going), false)
    }

    /// A scheduler serving several clients at once, each with its own keep-going: a
    /// failure ends the requests of the clients without keep-going that need the failed
    /// goal, and stops only what no other client needs.
    pub fn new_shared(store: &'a dyn BuildStore, cfg: &'a WorkerConfig) -> Worker<'a> {
        Worker::with_graph(store, cfg, Graph::new_shared(), true)
    }

    fn with_graph(
        store: &'a dyn BuildStore,
        cfg: &'a WorkerConfig,
        graph: Graph,
        shared: bool,
    ) -> Worker<'a> {
        Worker {
            store,
            cfg,
            graph,
            goals: HashMap::new(),
            derivation_goals: HashMap::new(),
            substitution_goals: HashMap::new(),
            dedup_keys: HashMap::new(),
            last_woken_up: None,
            read_buf: Vec::new(),
            exited_builds: VecDeque::new(),
            clients: HashMap::new(),
            finished: Vec::new(),
            shared,
            clients_of_top: HashMap::new(),
            deferred: Vec::new(),
            goal_budget: GOAL_BUDGET,
            #[cfg(test)]
            peak_goals: 0,
            res: Resources::new(store, cfg),
        }
    }

    /// Reports `e` to the clients of goal `id`.
    fn emit_for(&mut self, id: GoalId, e: Event) {
        self.res.router.emit_for(id, e);
    }

    fn insert_goal(&mut self, goal: Goal) -> GoalId {
        let id = self.graph.add_goal();
        self.goals.insert(id, goal);
        #[cfg(test)]
        {
            self.peak_goals = self.peak_goals.max(self.goals.len());
        }
        id
    }

    /// The goal building `drv` (shared by everyone who needs it), wanting at least `wanted`
    /// outputs (empty = all). In one caller's run a goal keeps the mode it was made with,
    /// as the original's does; in a shared scheduler a request for `--check` or `--repair`
    /// gets its own goal rather than another request's normal build (whose success says
    /// nothing of a check): it waits for that build's output locks and then does what it
    /// was asked, or finds the outputs not yet valid and says so, as a separate Nix
    /// daemon process would.
    pub fn make_derivation_goal(
        &mut self,
        drv: &StorePath,
        wanted: &BTreeSet<String>,
        mode: BuildMode,
    ) -> GoalId {
        if let Some(id) = self.live_derivation_goal(drv, wanted, mode) {
            return id;
        }
        let key = self.derivation_key(drv, mode);
        let id = self.insert_goal(Goal::Derivation(Box::new(DerivationGoal::new(
            drv.clone(),
            wanted.clone(),
            mode,
        ))));
        self.derivation_goals.insert(key.clone(), id);
        self.dedup_keys
            .insert(id, DedupKey::Derivation(key.0, key.1));
        id
    }

    /// A derivation goal's key in `derivation_goals`.
    fn derivation_key(&self, drv: &StorePath, mode: BuildMode) -> (StorePath, BuildMode) {
        (
            drv.clone(),
            if self.shared { mode } else { BuildMode::Normal },
        )
    }

    /// The live goal building `drv` in `mode`, now wanting `wanted` too. A goal taken out
    /// of its slot (running right now) is not returned: it is the caller itself, which
    /// cannot depend on itself, and gets a fresh goal.
    fn live_derivation_goal(
        &mut self,
        drv: &StorePath,
        wanted: &BTreeSet<String>,
        mode: BuildMode,
    ) -> Option<GoalId> {
        let id = *self.derivation_goals.get(&self.derivation_key(drv, mode))?;
        match self.goals.get_mut(&id)? {
            Goal::Derivation(g) => {
                g.add_wanted_outputs(wanted);
                Some(id)
            }
            Goal::Substitution(_) => None,
        }
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
        self.dedup_keys
            .insert(id, DedupKey::Substitution(path.clone()));
        id
    }

    /// Finishes goal `id`: tells its waiters and forgets it. The requests of clients
    /// whose last top goal it was end; so do, in a shared scheduler, those of clients
    /// without keep-going for which it failed.
    fn am_done(&mut self, id: GoalId, result: ExitCode) {
        if result == ExitCode::Failed {
            if let Some(DedupKey::Derivation(drv, mode)) = self.dedup_keys.get(&id) {
                for c in self.res.router.interest(id) {
                    if let Some(st) = self.clients.get_mut(c) {
                        st.failed_drvs.insert((drv.clone(), *mode));
                    }
                }
            }
        }
        self.forget(id);
        self.graph.am_done(id, result);
        // A goal done is never a top goal again (a request for it makes a new one).
        let Some(clients) = self.clients_of_top.remove(&id) else {
            return;
        };
        for c in clients {
            let Some(st) = self.clients.get_mut(&c) else {
                continue;
            };
            st.results.insert(id, result);
            if st.ended {
                continue;
            }
            st.pending = st.pending.saturating_sub(1);
            let stop = self.shared && result == ExitCode::Failed && !st.keep_going;
            if stop {
                st.stopped = true;
                self.end_client(c);
            } else if st.pending == 0 {
                st.ended = true;
                self.finished.push(c);
            }
        }
    }

    /// Ends the request of `c` now: its top goals not done are no longer its, and goals
    /// nobody else needs are destroyed with the next collection of orphans (their
    /// builders killed, their build directories removed, nothing registered).
    fn end_client(&mut self, c: ClientId) {
        let Some(st) = self.clients.get_mut(&c) else {
            return;
        };
        let tops = std::mem::take(&mut st.tops);
        if !st.ended {
            st.ended = true;
            self.finished.push(c);
        }
        for top in tops {
            if let Some(cs) = self.clients_of_top.get_mut(&top) {
                cs.retain(|x| *x != c);
                if cs.is_empty() {
                    self.clients_of_top.remove(&top);
                    self.graph.unset_top(top);
                }
            }
        }
    }

    /// `c` has left (or no longer wants what it asked for): its request ends, what only
    /// it needed is stopped, and it receives no more events.
    pub fn remove_client(&mut self, c: ClientId) {
        self.end_client(c);
        self.finished.retain(|x| *x != c);
        self.clients.remove(&c);
        self.res.router.remove_client(c);
        self.destroy_orphans();
    }

    /// The clients whose request ended since the last call. The logs of finished builds
    /// are complete by then (as at the end of a `realise`), so a client reading one
    /// right after its request sees all of it.
    pub fn take_finished(&mut self) -> Vec<ClientId> {
        if !self.finished.is_empty() {
            self.res.finish_all_logs();
        }
        std::mem::take(&mut self.finished)
    }

    /// Ends the request of every client still waiting (the engine cannot go on for
    /// them); returns them.
    pub fn end_all_clients(&mut self) -> Vec<ClientId> {
        let mut waiting: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|(_, st)| !st.ended)
            .map(|(c, _)| *c)
            .collect();
        waiting.sort_unstable();
        for &c in &waiting {
            self.end_client(c);
        }
        self.finished.retain(|c| !waiting.contains(c));
        self.destroy_orphans();
        waiting
    }

    /// No client waits and no goal or child is left: the scheduler can be replaced by a
    /// fresh one without anyone noticing.
    pub fn is_idle(&self) -> bool {
        self.clients.values().all(|c| c.ended)
            && self.finished.is_empty()
            && !self.graph.has_top_goals()
            && self.res.children.is_empty()
            && self.graph.live_goals().is_empty()
    }

    /// Drops everything the worker keeps for `id` except its goal value.
    fn forget(&mut self, id: GoalId) {
        // A newer goal may have taken the key (see `make_derivation_goal`).
        match self.dedup_keys.remove(&id) {
            Some(DedupKey::Derivation(drv, mode)) => {
                let key = (drv, mode);
                if self.derivation_goals.get(&key) == Some(&id) {
                    self.derivation_goals.remove(&key);
                }
            }
            Some(DedupKey::Substitution(path))
                if self.substitution_goals.get(&path) == Some(&id) =>
            {
                self.substitution_goals.remove(&path);
            }
            _ => {}
        }
        self.res.clear_locked_outputs(id);
        self.res.router.forget_goal(id);
        self.child_terminated(id);
    }

    /// A new client, with an empty outcome; `sink` receives the events of the goals its
    /// requests need. `keep_going` matters in a shared scheduler only (otherwise the
    /// settings' `keep-going` holds for everyone).
    pub fn add_client(&mut self, sink: Box<dyn EventSink + 'a>, keep_going: bool) -> ClientId {
        let c = self.res.router.add_client(sink);
        self.clients.insert(
            c,
            ClientState {
                keep_going,
                ..ClientState::default()
            },
        );
        c
    }

    /// The time limits of `client`'s builds, in a shared scheduler (see
    /// [`crate::RequestOptions`]); otherwise the settings' hold for every build.
    pub fn set_client_limits(
        &mut self,
        client: ClientId,
        max_silent_time: Option<Duration>,
        timeout: Option<Duration>,
    ) {
        if let Some(st) = self.clients.get_mut(&client) {
            st.max_silent_time = max_silent_time;
            st.timeout = timeout;
        }
    }

    /// The time limits of goal `id`'s builder: the settings', or in a shared scheduler the
    /// most permissive of the interested clients' (no limit beats any).
    fn limits_of(&self, id: GoalId) -> (Option<Duration>, Option<Duration>) {
        if !self.shared {
            return (self.cfg.max_silent_time, self.cfg.timeout);
        }
        fn looser(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
            Some(a?.max(b?))
        }
        let mut limits: Option<(Option<Duration>, Option<Duration>)> = None;
        for c in self.res.router.interest(id) {
            let Some(st) = self.clients.get(c).filter(|st| !st.ended) else {
                continue;
            };
            let mine = (st.max_silent_time, st.timeout);
            limits = Some(match limits {
                None => mine,
                Some((s, t)) => (looser(s, mine.0), looser(t, mine.1)),
            });
        }
        limits.unwrap_or((self.cfg.max_silent_time, self.cfg.timeout))
    }

    /// `client` asks for `target`, built in `mode`; returns its top goal.
    pub fn add_target(
        &mut self,
        client: ClientId,
        target: &DerivedPath,
        mode: BuildMode,
    ) -> GoalId {
        let id = match target {
            DerivedPath::Built { drv, outputs } => {
                let wanted: BTreeSet<String> = outputs.iter().cloned().collect();
                self.make_derivation_goal(drv, &wanted, mode)
            }
            DerivedPath::Opaque(p) => self.make_substitution_goal(p, mode == BuildMode::Repair),
        };
        if let Some(st) = self.clients.get_mut(&client) {
            st.targets.push((target.clone(), id));
        }
        self.add_top_goal(client, id);
        id
    }

    /// Every target of `client` has been added: a request with nothing to do (no
    /// targets) ends at once.
    pub fn targets_added(&mut self, client: ClientId) {
        if let Some(st) = self.clients.get_mut(&client) {
            if st.pending == 0 && !st.ended {
                st.ended = true;
                self.finished.push(client);
            }
        }
    }

    /// `client` asks for goal `id`: the run goes on until it is done.
    pub fn add_top_goal(&mut self, client: ClientId, id: GoalId) {
        self.graph.set_top(id);
        let clients = self.clients_of_top.entry(id).or_default();
        if !clients.contains(&client) {
            clients.push(client);
        }
        if let Some(st) = self.clients.get_mut(&client) {
            if st.tops.insert(id) {
                st.pending += 1;
            }
            let keep_going = st.keep_going;
            self.spread_interest(&[client], keep_going, id);
        }
    }

    /// Makes `clients` interested in goal `root` and everything it waits for, marking
    /// them keep-going if one of the clients is. Stops where a goal has them already:
    /// what it waits for has them too.
    fn spread_interest(&mut self, clients: &[ClientId], keep_going: bool, root: GoalId) {
        let mut todo = vec![root];
        while let Some(g) = todo.pop() {
            let mut added = false;
            for &c in clients {
                if self.res.router.add_interest(g, c) {
                    added = true;
                    self.res.keep_roots_for(g, c);
                }
            }
            if self.shared && keep_going {
                added |= self.graph.set_keep_going(g);
            }
            if added {
                todo.extend(self.graph.waitees(g));
            }
        }
    }

    /// The outcome of `client` so far, leaving it empty.
    #[cfg(test)]
    pub fn take_outcome(&mut self, client: ClientId) -> Outcome {
        self.clients
            .get_mut(&client)
            .map(|c| std::mem::take(&mut c.outcome))
            .unwrap_or_default()
    }

    /// Records a failure in the outcome of `client`; `permanent` marks a build that would
    /// fail again.
    pub fn record_failure(&mut self, client: ClientId, f: Failure, permanent: bool) {
        if let Some(c) = self.clients.get_mut(&client) {
            c.outcome.record(f, permanent);
        }
    }

    /// What `client`'s request achieved: the outputs of its targets, its failures and
    /// Nix's exit status for them. A target that cannot be had is reported to the client
    /// here (as `realise` always did).
    pub fn client_outcome(&mut self, client: ClientId) -> Result<RealiseOutcome, GoalsError> {
        let Some(st) = self.clients.get_mut(&client) else {
            return Err(GoalsError::Internal(format!("no client {}", client.0)));
        };
        let targets = std::mem::take(&mut st.targets);
        let results = std::mem::take(&mut st.results);
        // The request has ended: its top goals are done or no longer its.
        st.tops = BTreeSet::new();
        let stopped = st.stopped;
        let mut outputs = Vec::new();
        let mut failed = stopped;
        for (t, id) in &targets {
            match (t, results.get(id).copied().unwrap_or(ExitCode::Busy)) {
                (
                    DerivedPath::Built {
                        drv,
                        outputs: wanted,
                    },
                    ExitCode::Success,
                ) => {
                    let chosen = self
                        .res
                        .outputs_of(drv)?
                        .iter()
                        .filter(|(name, _)| wanted.is_empty() || wanted.contains(name))
                        .filter_map(|(name, p)| Some((name.clone(), p.clone()?)))
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
                        self.store.store_dir().print(p)
                    );
                    self.res.router.emit_to(
                        client,
                        Event::Message {
                            level: Level::Error,
                            text: message.clone(),
                        },
                    );
                    self.record_failure(
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
        let outcome = self
            .clients
            .get_mut(&client)
            .map(|c| std::mem::take(&mut c.outcome))
            .unwrap_or_default();
        let exit_status = if failed {
            outcome.failing_exit_status()
        } else {
            0
        };
        Ok(RealiseOutcome {
            exit_status,
            outputs,
            failures: outcome.into_failures(),
        })
    }

    /// Records the failure of goal `id` for every client whose top goals wait for it.
    fn record_goal_failure(&mut self, id: GoalId, f: Failure, permanent: bool) {
        let mut clients = BTreeSet::new();
        for top in self.graph.tops_waiting_for(id) {
            if let Some(cs) = self.clients_of_top.get(&top) {
                clients.extend(cs.iter().copied());
            }
        }
        if clients.is_empty() && !self.shared {
            // Every live goal serves some top goal; should one not, its failure is
            // everyone's rather than no one's. (In a shared scheduler it served clients
            // that have left.)
            clients.extend(self.clients.keys().copied());
        }
        for c in clients {
            self.record_failure(c, f.clone(), permanent);
        }
    }

    /// Forgets the child of `id` (killing it if it still runs) and frees its build slot.
    fn child_terminated(&mut self, id: GoalId) {
        self.res.child_terminated(id);
        self.wake_slot_waiters_if_asked();
    }

    /// A child that ended (here or in a goal's step) may want every slot waiter woken.
    fn wake_slot_waiters_if_asked(&mut self) {
        if self.res.take_slot_waiters() == SlotWaiters::All {
            self.graph.wake_slot_waiters();
        }
    }

    /// Acts on what goal `id` asked for in a step, in order.
    fn act_on(&mut self, id: GoalId, requests: Vec<Request>) {
        // Where this step's deferred sub-goals start: they are made in the order asked.
        let mut deferred_from = None;
        let mut inputs_failed = false;
        for r in requests {
            match r {
                Request::WaitFor(sub) => {
                    if let Some(g) = self.existing_goal(&sub) {
                        self.wait_for(id, g);
                    } else if self.failed_for_all_clients_of(id, &sub) {
                        self.graph.input_failed(id);
                        inputs_failed = true;
                    } else if self.goals.len() < self.goal_budget {
                        let g = self.make_goal(sub);
                        self.wait_for(id, g);
                    } else if let Some(epoch) = self.graph.defer(id) {
                        deferred_from.get_or_insert(self.deferred.len());
                        self.deferred.push(Deferred {
                            waiter: id,
                            epoch,
                            sub,
                        });
                    }
                }
                Request::WakeUp => self.graph.wake_up(id),
                Request::WaitForBuildSlot => {
                    if self.res.nr_local_builds() < self.cfg.max_jobs {
                        self.graph.wake_up(id);
                    } else {
                        self.graph.wait_for_build_slot(id);
                    }
                }
                Request::WaitForAnyGoal => self.graph.wait_for_any_goal(id),
                Request::WaitForAWhile => self.graph.wait_for_a_while(id),
                Request::StartChild {
                    builder,
                    log,
                    in_build_slot,
                    respect_timeouts,
                } => {
                    let limits = self.limits_of(id);
                    self.res.child_started(
                        id,
                        builder,
                        log,
                        in_build_slot,
                        respect_timeouts.then_some(limits),
                    )
                }
                Request::LockedOutputs(paths) => self.res.set_locked_outputs(id, paths),
                Request::UnlockedOutputs => self.res.clear_locked_outputs(id),
                Request::Failed { failure, permanent } => {
                    self.record_goal_failure(id, failure, permanent)
                }
                Request::Done(result) => self.am_done(id, result),
            }
        }
        if let Some(from) = deferred_from {
            self.deferred[from..].reverse();
        }
        if inputs_failed {
            self.graph.wake_after_failed_inputs(id);
        }
    }

    /// The live goal for `sub`, if there is one (a derivation goal then also wants the
    /// outputs `sub` wants).
    fn existing_goal(&mut self, sub: &SubGoal) -> Option<GoalId> {
        match sub {
            SubGoal::Derivation { drv, wanted, mode } => {
                self.live_derivation_goal(drv, wanted, *mode)
            }
            SubGoal::Substitution { path, .. } => self.substitution_goals.get(path).copied(),
        }
    }

    /// Whether `sub` is a derivation whose goal failed in the request of every client
    /// that needs `waiter` (and some client does).
    fn failed_for_all_clients_of(&self, waiter: GoalId, sub: &SubGoal) -> bool {
        let SubGoal::Derivation { drv, mode, .. } = sub else {
            return false;
        };
        let clients = self.res.router.interest(waiter);
        let failed = |c: &ClientId| {
            self.clients
                .get(c)
                .is_some_and(|st| !st.failed_drvs.is_empty())
        };
        if clients.is_empty() || !clients.iter().all(failed) {
            return false;
        }
        let key = self.derivation_key(drv, *mode);
        clients.iter().all(|c| {
            self.clients
                .get(c)
                .is_some_and(|st| st.failed_drvs.contains(&key))
        })
    }

    fn make_goal(&mut self, sub: SubGoal) -> GoalId {
        match sub {
            SubGoal::Derivation { drv, wanted, mode } => {
                self.make_derivation_goal(&drv, &wanted, mode)
            }
            SubGoal::Substitution { path, repair } => self.make_substitution_goal(&path, repair),
        }
    }

    /// `waiter` waits for `g`, and whoever needs the waiter needs `g`.
    fn wait_for(&mut self, waiter: GoalId, g: GoalId) {
        self.graph.add_waitee(waiter, g);
        let clients = self.res.router.interest(waiter).to_vec();
        let keep_going = self.shared
            && clients
                .iter()
                .any(|c| self.clients.get(c).is_some_and(|s| s.keep_going));
        self.spread_interest(&clients, keep_going, g);
    }

    /// Makes deferred sub-goals, newest first: any that is running already, as many as
    /// fit under the goal budget, and beyond it one, when the machine would otherwise
    /// idle (see [`Worker::may_explore`]): the goal made then runs, and asks for its own
    /// inputs, which come next, so that a path down to something buildable is found one
    /// goal at a time. True if it made or joined any.
    fn make_deferred(&mut self) -> bool {
        let mut made = false;
        while let Some(d) = self.deferred.pop() {
            if !self.graph.deferral_awaited(d.waiter, d.epoch) {
                continue;
            }
            let g = match self.existing_goal(&d.sub) {
                Some(g) => g,
                None if self.failed_for_all_clients_of(d.waiter, &d.sub) => {
                    self.graph.input_failed(d.waiter);
                    self.graph.deferral_made(d.waiter);
                    self.graph.wake_after_failed_inputs(d.waiter);
                    made = true;
                    continue;
                }
                None if self.goals.len() < self.goal_budget || (!made && self.may_explore()) => {
                    self.make_goal(d.sub)
                }
                None => {
                    self.deferred.push(d);
                    break;
                }
            };
            self.wait_for(d.waiter, g);
            self.graph.deferral_made(d.waiter);
            made = true;
        }
        made
    }

    /// Whether to make a goal beyond the budget. Nothing is awake and no goal waits for a
    /// build slot; then, if nothing at all runs, always (whatever is left can only go on
    /// through a goal not made yet, which is how the worker never stalls); if a slot is
    /// free while builds run, up to twice the budget (goals made then may only wait for
    /// running ones, and filling the slot must not grow the worker without bound).
    fn may_explore(&self) -> bool {
        if self.graph.has_awake()
            || !self.exited_builds.is_empty()
            || self.graph.has_waiting_for_slot()
        {
            return false;
        }
        self.res.children.is_empty()
            || (self.res.nr_local_builds() < self.cfg.max_jobs
                && self.goals.len() < 2 * self.goal_budget)
    }

    // --- the loop -----------------------------------------------------------------------

    /// Runs until every top goal of every client is done (or one failed without
    /// keep-going).
    pub fn run(&mut self) -> Result<(), GoalsError> {
        loop {
            self.run_ready();
            if !self.graph.has_top_goals() {
                break;
            }
            self.res.run_deferred();
            if self.must_wait() {
                self.wait_for_input(None)?;
            } else if !self.graph.has_awake() {
                return Err(self.stuck());
            }
        }
        self.teardown();
        Ok(())
    }

    /// Whether the loop has something to wait for: a child, a lock poll, a download.
    pub fn must_wait(&self) -> bool {
        !self.res.children.is_empty()
            || self.graph.has_waiting_for_a_while()
            || self.res.builtin_subst.busy()
    }

    /// Top goals are left, nothing is awake and nothing is to be waited for: why.
    pub fn stuck(&self) -> GoalsError {
        if self.cfg.max_jobs == 0 && self.graph.has_waiting_for_slot() {
            GoalsError::NoBuildSlots {
                remote: self.cfg.build_hook.is_some(),
            }
        } else {
            GoalsError::Internal("no goal can make progress".into())
        }
    }

    /// Whether top goals are left.
    pub fn has_top_goals(&self) -> bool {
        self.graph.has_top_goals()
    }

    /// Releases deferred locks and deletes deferred build directories.
    pub fn run_deferred(&mut self) {
        self.res.run_deferred();
    }

    /// Runs awake goals, hands out free slots and finishes exited builds until nothing
    /// is left to do without waiting.
    pub fn run_ready(&mut self) {
        {
            while self.graph.has_top_goals() {
                // Awake goals first, then freed slots to waiting goals (their builders
                // start), and only then the post-processing of builds that exited, one at
                // a time: a slot never idles while the worker checks and registers the
                // outputs of the build that left it, and a build that makes dependents
                // ready lets them start before the next exited build is looked at.
                if !self.graph.has_awake()
                    && !self.hand_out_slots()
                    && !self.wake_exited_build()
                    && !self.make_deferred()
                {
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
        }
        self.destroy_orphans();
    }

    /// Wakes as many goals waiting for a build slot as there are free slots; true if it
    /// woke any. Called only when no goal is awake, so nobody else takes the slots before
    /// the woken goals run; a woken goal that does not take its slot after all (its
    /// outputs became valid, another process holds their lock) leaves it free for the
    /// next call.
    fn hand_out_slots(&mut self) -> bool {
        let free = self.cfg.max_jobs.saturating_sub(self.res.nr_local_builds());
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
    pub fn teardown(&mut self) {
        self.graph.collect_orphans();
        for id in self.graph.live_goals() {
            self.forget(id);
            self.goals.remove(&id);
        }
        for id in self.res.children.keys().copied().collect::<Vec<_>>() {
            self.child_terminated(id);
        }
        self.goals.clear();
        self.deferred.clear();
        self.res.drop_hook();
        self.res.run_deferred();
        self.res.finish_all_logs();
    }

    fn destroy_orphans(&mut self) {
        for id in self.graph.collect_orphans() {
            self.forget(id);
            // Dropping the goal value deletes its build directory and closes its log.
            self.goals.remove(&id);
        }
    }

    /// Takes goal `id` out of its slot, lets `f` take a step of it, acts on the requests
    /// of the step, and puts the goal back unless it finished. The requests are acted on
    /// while the goal is out, so that a goal asking for its own derivation gets a fresh
    /// goal rather than itself.
    fn with_goal(
        &mut self,
        id: GoalId,
        counts: WaiteeCounts,
        f: impl FnOnce(&mut Goal, &mut Step<'_>),
    ) {
        let Some(mut goal) = self.goals.remove(&id) else {
            return;
        };
        self.res.router.current = Some(id);
        let mut step = Step::new(id, self.store, self.cfg, &mut self.res, counts);
        f(&mut goal, &mut step);
        let requests = step.into_requests();
        self.res.router.current = None;
        self.wake_slot_waiters_if_asked();
        self.act_on(id, requests);
        if self.graph.is_alive(id) {
            self.goals.insert(id, goal);
        }
    }

    fn work(&mut self, id: GoalId) {
        let counts = self.graph.take_waitee_counts(id);
        self.with_goal(id, counts, |goal, cx| match goal {
            Goal::Derivation(g) => g.work(cx),
            Goal::Substitution(g) => g.work(cx),
        });
    }

    fn handle_output(&mut self, id: GoalId, chunk: &[u8]) {
        self.with_goal(id, WaiteeCounts::default(), |goal, cx| match goal {
            Goal::Derivation(g) => g.handle_child_output(cx, chunk),
            Goal::Substitution(g) => g.handle_child_output(cx, chunk),
        });
    }

    fn child_exited(&mut self, id: GoalId, status: ChildStatus) {
        // A local build that succeeded is finished after the slot it frees has gone to the
        // next build (see `run`). Failures are handled at once: without keep-going they
        // stop everything, and no new builder should start first.
        let later = matches!(&status, Ok(s) if s.success())
            && self.res.children.get(&id).is_some_and(|c| c.in_build_slot);
        self.child_terminated(id);
        let later = match self.goals.get_mut(&id) {
            Some(Goal::Derivation(g)) => {
                g.child_exited(status);
                later
            }
            Some(Goal::Substitution(g)) => {
                g.child_exited(status);
                false
            }
            None => return,
        };
        if later {
            self.exited_builds.push_back(id);
        } else {
            self.graph.wake_up(id);
        }
    }

    fn cancel(&mut self, id: GoalId, kind: FailureKind, reason: String) {
        self.child_terminated(id);
        self.with_goal(id, WaiteeCounts::default(), |goal, cx| match goal {
            Goal::Derivation(g) => g.cancel(cx, kind, reason),
            Goal::Substitution(g) => g.cancel(cx, reason),
        });
    }

    fn nearest_deadline(&self, now: Instant) -> Option<Instant> {
        let mut nearest: Option<Instant> = None;
        let mut consider = |t: Instant| nearest = Some(nearest.map_or(t, |n| n.min(t)));
        for c in self.res.children.values() {
            if let Some(d) = c.max_silent_time {
                consider(c.last_output + d);
            }
            if let Some(d) = c.timeout {
                consider(c.started + d);
            }
        }
        if self.graph.has_waiting_for_a_while() {
            let last = self.last_woken_up.unwrap_or(now);
            consider(last + self.cfg.build_poll_interval);
        }
        nearest
    }

    /// Waits for a child's output or exit, a deadline, a download, or `extra` becoming
    /// readable (the shared engine's wake-up for new requests), and acts on what came.
    pub fn wait_for_input(&mut self, extra: Option<BorrowedFd<'_>>) -> Result<(), GoalsError> {
        let now = Instant::now();
        if self.graph.has_waiting_for_a_while() {
            if self.last_woken_up.is_none() {
                let waiters = self.graph.a_while_waiters();
                self.res
                    .router
                    .emit_for_any(&waiters, Event::WaitingForLocks);
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
        for (&id, c) in &self.res.children {
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
                // SAFETY: each descriptor belongs to a child in `self.res.children`, which is not
                // touched until `borrowed` is dropped at the end of this block.
                .map(|&fd| unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) })
                .collect();
            let mut pfds: Vec<PollFd> = borrowed
                .iter()
                .map(|fd| PollFd::new(fd.as_fd(), PollFlags::POLLIN))
                .collect();
            // Last: the built-in substituter's wake-up pipe, when it has jobs out.
            if let Some(fd) = self.res.builtin_subst.wake_fd() {
                pfds.push(PollFd::new(fd, PollFlags::POLLIN));
            }
            if let Some(fd) = extra {
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
            if is_exit && self.res.children.contains_key(&id) {
                self.reap(id);
            }
        }

        let ids: Vec<GoalId> = self.res.children.keys().copied().collect();
        for id in ids {
            let Some(c) = self.res.children.get(&id) else {
                continue;
            };
            if let Some(d) = c.max_silent_time {
                if after.duration_since(c.last_output) >= d {
                    let msg = format!("timed out after {} seconds of silence", d.as_secs());
                    self.cancel(id, FailureKind::TimedOut, msg);
                    continue;
                }
            }
            if let Some(d) = c.timeout {
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
        for c in self.res.builtin_subst.take_completions(self.store) {
            let id = c.goal();
            if let Some(Goal::Substitution(g)) = self.goals.get_mut(&id) {
                g.builtin_completed(c);
                self.graph.wake_up(id);
            }
        }
    }

    /// Reads what is available on `id`'s log pipe (one read), handing it to the goal.
    fn read_log(&mut self, id: GoalId, now: Instant) {
        let mut buf = std::mem::take(&mut self.read_buf);
        buf.resize(64 * 1024, 0);
        if let Some(c) = self.res.children.get_mut(&id) {
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
        let status = match self.res.children.get_mut(&id) {
            Some(c) => c.builder.wait().map_err(|e| match e {
                nixb_sandbox::SandboxError::Setup { .. } => ChildError::Setup(e.to_string()),
                e => ChildError::Other(e.to_string()),
            }),
            None => return,
        };
        let usage = self
            .res
            .children
            .get(&id)
            .and_then(|c| c.builder.resource_usage());
        if let (Some(usage), Some(Goal::Derivation(g))) = (usage, self.goals.get(&id)) {
            let drv = g.drv_path().clone();
            self.emit_for(id, Event::BuildResources { drv, usage });
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
            let Some(c) = self.res.children.get_mut(&id) else {
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
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::*;
    use crate::testing::Harness;

    /// A client's sink the test reads after the run.
    #[derive(Clone, Default)]
    struct Events(Rc<RefCell<Vec<Event>>>);

    impl EventSink for Events {
        fn event(&mut self, e: Event) {
            self.0.borrow_mut().push(e);
        }
    }

    impl Events {
        fn started(&self) -> Vec<StorePath> {
            self.0
                .borrow()
                .iter()
                .filter_map(|e| match e {
                    Event::BuildStarted { drv, .. } => Some(drv.clone()),
                    _ => None,
                })
                .collect()
        }
    }

    fn built(drv: &StorePath) -> DerivedPath {
        DerivedPath::Built {
            drv: drv.clone(),
            outputs: vec![],
        }
    }

    /// A harness without substitution, where each derivation added by `drv` is valid.
    fn harness() -> Harness {
        let mut h = Harness::new();
        h.cfg.use_substitutes = false;
        h.cfg.max_jobs = 4;
        h
    }

    /// Adds derivation `name` (hash part `c`) running `script`, needing `inputs`; returns
    /// its path and its output's.
    fn drv(
        h: &Harness,
        c: char,
        name: &str,
        script: &str,
        inputs: &[&StorePath],
    ) -> (StorePath, StorePath) {
        let d = h.path(c, &format!("{name}.drv"));
        // Output hash parts from another part of the alphabet than the derivations'.
        let o = h.path(char::from(c as u8 + 10), name);
        let ins: Vec<(StorePath, &str)> = inputs.iter().map(|p| ((*p).clone(), "out")).collect();
        h.add_drv(&d, &o, script, &ins, &[]);
        h.make_valid(&d, &[]);
        (d, o)
    }

    /// A builder script that waits a minute (builders get no `PATH`), then succeeds.
    fn slow_script() -> String {
        let sleep = ["/bin/sleep", "/usr/bin/sleep"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("a sleep program");
        format!("{sleep} 60; echo > $out")
    }

    fn is_valid(h: &Harness, p: &StorePath) -> bool {
        h.store.valid.borrow().contains_key(p)
    }

    /// Two clients of one scheduler: the failure of one's goal is not the other's.
    #[test]
    fn each_client_gets_the_failures_of_its_own_goals() {
        let mut h = Harness::new();
        h.cfg.keep_going = true;
        let (x, x_out) = (h.path('a', "x.drv"), h.path('b', "x"));
        h.add_drv(&x, &x_out, "exit 1", &[], &[]);
        h.make_valid(&x, &[]);
        h.make_valid(&x_out, &[]);
        // y's .drv is missing and no substituter has it.
        let y = h.path('c', "y.drv");
        let mut w = Worker::new(&*h.store, &h.cfg);
        let a = w.add_client(Box::new(Events::default()), true);
        let b = w.add_client(Box::new(Events::default()), true);
        let gx = w.add_target(a, &built(&x), BuildMode::Normal);
        let gy = w.add_target(b, &built(&y), BuildMode::Normal);
        w.run().unwrap();
        assert_eq!(w.clients[&a].results[&gx], ExitCode::Success);
        assert_eq!(w.clients[&b].results[&gy], ExitCode::Failed);
        assert!(w.take_outcome(a).into_failures().is_empty());
        let failures = w.take_outcome(b).into_failures();
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].path, y);
    }

    /// A derivation both clients need is one goal, built once; each client sees the
    /// builds of its own closure only, and gets the outputs it asked for.
    #[test]
    fn a_shared_goal_is_built_once_and_each_client_sees_its_own_builds() {
        let h = harness();
        let log = h.tmp.path().join("built");
        let log = log.display();
        let (s, s_out) = drv(
            &h,
            'a',
            "s",
            &format!("echo s >> {log}; echo s > $out"),
            &[],
        );
        let script = |n: &str| format!("echo {n} >> {log}; echo {n} > $out");
        let (x, x_out) = drv(&h, 'b', "x", &script("x"), &[&s]);
        let (y, y_out) = drv(&h, 'c', "y", &script("y"), &[&s]);
        let (ea, eb) = (Events::default(), Events::default());
        let mut w = Worker::new_shared(&*h.store, &h.cfg);
        let a = w.add_client(Box::new(ea.clone()), false);
        let b = w.add_client(Box::new(eb.clone()), false);
        w.add_target(a, &built(&x), BuildMode::Normal);
        w.add_target(b, &built(&y), BuildMode::Normal);
        w.run().unwrap();

        let mut lines: Vec<String> = std::fs::read_to_string(h.tmp.path().join("built"))
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        lines.sort();
        assert_eq!(lines, ["s", "x", "y"], "each derivation built once");
        let mut a_saw = ea.started();
        a_saw.sort();
        assert_eq!(a_saw, [s.clone(), x.clone()]);
        let mut b_saw = eb.started();
        b_saw.sort();
        assert_eq!(b_saw, [s.clone(), y.clone()]);

        let mut finished = w.take_finished();
        finished.sort();
        assert_eq!(finished, [a, b]);
        let oa = w.client_outcome(a).unwrap();
        let ob = w.client_outcome(b).unwrap();
        assert_eq!((oa.exit_status, ob.exit_status), (0, 0));
        assert_eq!(oa.outputs[0].1["out"], x_out);
        assert_eq!(ob.outputs[0].1["out"], y_out);
        assert!(is_valid(&h, &s_out));
    }

    /// In a shared scheduler a `--check` request does not take another request's normal
    /// goal for its own: it checks. A builder whose output differs each time then fails
    /// the check for that client only; the client asking for a normal build, whose
    /// outputs are valid, is done at once.
    #[test]
    fn a_check_beside_a_normal_request_checks() {
        let h = harness();
        let log = h.tmp.path().join("built");
        let (x, x_out) = drv(
            &h,
            'a',
            "x",
            &format!(
                "echo x >> {}; read u < /proc/sys/kernel/random/uuid; echo $u > $out",
                log.display()
            ),
            &[],
        );
        let mut w = Worker::new_shared(&*h.store, &h.cfg);
        let first = w.add_client(Box::new(Events::default()), false);
        w.add_target(first, &built(&x), BuildMode::Normal);
        w.run().unwrap();
        assert_eq!(w.client_outcome(first).unwrap().exit_status, 0);
        assert!(is_valid(&h, &x_out));

        let (a, b) = (
            w.add_client(Box::new(Events::default()), false),
            w.add_client(Box::new(Events::default()), false),
        );
        w.add_target(a, &built(&x), BuildMode::Normal);
        w.add_target(b, &built(&x), BuildMode::Check);
        w.run().unwrap();
        let built = std::fs::read_to_string(&log).unwrap();
        assert_eq!(built, "x\nx\n", "built once, then once more for the check");
        assert_eq!(w.client_outcome(a).unwrap().exit_status, 0);
        let ob = w.client_outcome(b).unwrap();
        assert_eq!(ob.exit_status, 104, "{:?}", ob.failures);
        assert_eq!(ob.failures[0].kind, FailureKind::NotDeterministic);
    }

    /// A scheduler that never goes idle (a busy daemon's) holds nothing of the goals and
    /// requests it has finished: its tables are as empty after each request (the first
    /// building, the next finding the outputs valid) as before the first.
    #[test]
    fn finished_goals_and_requests_leave_nothing_behind() {
        let h = harness();
        let (x, _) = drv(&h, 'a', "x", "echo x > $out", &[]);
        let (y, _) = drv(&h, 'b', "y", "echo y > $out", &[&x]);
        let mut w = Worker::new_shared(&*h.store, &h.cfg);
        for round in 0..3 {
            let k = Keeper::default();
            let c = w.add_client(Box::new(Events::default()), false);
            let kc = w.add_client(Box::new(k.clone()), false);
            w.add_target(c, &built(&y), BuildMode::Normal);
            w.add_target(kc, &built(&y), BuildMode::Normal);
            w.run().unwrap();
            for client in [c, kc] {
                assert_eq!(w.client_outcome(client).unwrap().exit_status, 0);
                w.remove_client(client);
            }
            assert!(
                !k.0.borrow().is_empty(),
                "round {round}: roots kept while working"
            );
            assert!(w.clients.is_empty() && w.clients_of_top.is_empty());
            assert!(w.goals.is_empty() && w.dedup_keys.is_empty());
            assert!(w.graph.live_goals().is_empty());
            assert!(w.res.router.is_empty(), "round {round}");
        }
    }

    /// A client that keeps temporary roots of its own, as a daemon connection does.
    #[derive(Clone, Default)]
    struct Keeper(Rc<RefCell<BTreeSet<StorePath>>>);

    impl EventSink for Keeper {
        fn event(&mut self, _: Event) {}

        fn keep_temp_root(&mut self, p: &StorePath) -> Option<Result<(), String>> {
            self.0.borrow_mut().insert(p.clone());
            Some(Ok(()))
        }
    }

    /// The paths a goal protects are kept by the clients that need it, through its
    /// dependents too; a client that comes to need a running goal is given the roots it
    /// took before; a client that keeps no roots has the process root them. Nothing of
    /// a request whose clients keep roots is rooted for the process.
    #[test]
    fn temporary_roots_are_kept_by_the_clients_that_need_them() {
        let h = harness();
        let (x, x_out) = drv(&h, 'a', "x", &slow_script(), &[]);
        let (y, y_out) = drv(&h, 'b', "y", "echo y > $out", &[&x]);
        let mut w = Worker::new_shared(&*h.store, &h.cfg);
        let (ka, kb) = (Keeper::default(), Keeper::default());
        let a = w.add_client(Box::new(ka.clone()), false);
        let b = w.add_client(Box::new(kb.clone()), false);
        let n = w.add_client(Box::new(Events::default()), false);
        let gy = w.add_target(a, &built(&y), BuildMode::Normal);
        w.run_ready();
        let gx = w.graph.waitees(gy)[0];
        assert!(w.res.children.contains_key(&gx), "x's builder runs");
        let set = |ps: &[&StorePath]| ps.iter().map(|p| (*p).clone()).collect::<BTreeSet<_>>();
        assert_eq!(*ka.0.borrow(), set(&[&x, &x_out, &y, &y_out]));
        assert!(kb.0.borrow().is_empty());
        assert!(h.store.temp_roots.borrow().is_empty());

        assert_eq!(w.add_target(b, &built(&x), BuildMode::Normal), gx);
        assert_eq!(*kb.0.borrow(), set(&[&x, &x_out]));
        assert!(h.store.temp_roots.borrow().is_empty());

        assert_eq!(w.add_target(n, &built(&x), BuildMode::Normal), gx);
        let process: BTreeSet<StorePath> = h.store.temp_roots.borrow().iter().cloned().collect();
        assert_eq!(process, set(&[&x, &x_out]));
    }

    fn alive(pid: nix::unistd::Pid) -> bool {
        nix::sys::signal::kill(pid, None).is_ok()
    }

    /// A client that leaves stops the build only it wanted (builder killed, build
    /// directory removed, nothing registered); the build another client shares goes on.
    #[test]
    fn a_client_that_leaves_stops_only_what_no_one_else_wants() {
        let h = harness();
        let (x, x_out) = drv(&h, 'a', "x", &slow_script(), &[]);
        let (s, s_out) = drv(&h, 'b', "s", "echo s > $out", &[]);
        let mut w = Worker::new_shared(&*h.store, &h.cfg);
        let a = w.add_client(Box::new(Events::default()), false);
        let b = w.add_client(Box::new(Events::default()), false);
        let gx = w.add_target(a, &built(&x), BuildMode::Normal);
        let gs = w.add_target(a, &built(&s), BuildMode::Normal);
        assert_eq!(w.add_target(b, &built(&s), BuildMode::Normal), gs);
        w.run_ready();
        let x_pid = w
            .res
            .children
            .get(&gx)
            .expect("x's builder runs")
            .builder
            .pid;
        assert!(w.res.children.contains_key(&gs), "s's builder runs");
        let build_dirs = || {
            let entries = std::fs::read_dir(&h.cfg.build_dir_root).unwrap();
            entries
                .filter(|e| e.as_ref().unwrap().path().is_dir())
                .count()
        };
        assert_eq!(build_dirs(), 2);

        w.remove_client(a);
        assert!(!alive(x_pid), "x's builder was killed");
        assert!(!w.graph.is_alive(gx));
        assert!(w.graph.is_alive(gs), "b still wants s");
        w.run().unwrap();
        assert_eq!(w.clients[&b].results[&gs], ExitCode::Success);
        assert!(is_valid(&h, &s_out));
        assert!(!is_valid(&h, &x_out), "nothing registered for x");
        assert_eq!(build_dirs(), 0, "build directories removed");
        assert_eq!(w.take_finished(), [b]);
        assert_eq!(w.client_outcome(b).unwrap().exit_status, 0);
    }

    /// Time limits are per client: a build only a client with a limit wants gets that
    /// limit, a build two clients want gets the looser one (none beats any).
    #[test]
    fn time_limits_are_per_client_and_shared_builds_take_the_loosest() {
        let h = harness();
        let (alone, _) = drv(&h, 'a', "alone", &slow_script(), &[]);
        let (shared, _) = drv(&h, 'b', "shared", &slow_script(), &[]);
        let mut w = Worker::new_shared(&*h.store, &h.cfg);
        let strict = w.add_client(Box::new(Events::default()), true);
        let loose = w.add_client(Box::new(Events::default()), true);
        let second = Duration::from_secs(1);
        w.set_client_limits(strict, Some(second), Some(2 * second));
        w.set_client_limits(loose, None, Some(5 * second));
        let galone = w.add_target(strict, &built(&alone), BuildMode::Normal);
        let gshared = w.add_target(strict, &built(&shared), BuildMode::Normal);
        w.add_target(loose, &built(&shared), BuildMode::Normal);
        assert_eq!(w.limits_of(galone), (Some(second), Some(2 * second)));
        assert_eq!(w.limits_of(gshared), (None, Some(5 * second)));
        w.remove_client(strict);
        w.remove_client(loose);
    }

    /// Keep-going is per client: a failure ends the request of a client without it
    /// (stopping what only that client wanted), while a client with it gets its other
    /// outputs and the failure.
    #[test]
    fn keep_going_is_per_client() {
        let h = harness();
        let (bad, _) = drv(&h, 'a', "bad", "exit 1", &[]);
        let (slow, slow_out) = drv(&h, 'b', "slow", &slow_script(), &[]);
        let (ok, ok_out) = drv(&h, 'c', "ok", "echo ok > $out", &[]);
        let mut w = Worker::new_shared(&*h.store, &h.cfg);
        let quitter = w.add_client(Box::new(Events::default()), false);
        let keeper = w.add_client(Box::new(Events::default()), true);
        w.add_target(quitter, &built(&bad), BuildMode::Normal);
        let gslow = w.add_target(quitter, &built(&slow), BuildMode::Normal);
        w.add_target(keeper, &built(&bad), BuildMode::Normal);
        w.add_target(keeper, &built(&ok), BuildMode::Normal);
        w.run_ready();
        let slow_pid = w
            .res
            .children
            .get(&gslow)
            .expect("slow's builder runs")
            .builder
            .pid;
        w.run().unwrap();
        assert!(!alive(slow_pid), "the quitter's own build was stopped");
        assert!(!is_valid(&h, &slow_out));

        let q = w.client_outcome(quitter).unwrap();
        assert_eq!(q.exit_status, 100);
        assert!(q.outputs.is_empty());
        assert_eq!(q.failures.len(), 1);
        assert_eq!(q.failures[0].path, bad);
        let k = w.client_outcome(keeper).unwrap();
        assert_eq!(k.exit_status, 100);
        assert_eq!(k.outputs.len(), 1);
        assert_eq!(k.outputs[0].1["out"], ok_out);
        assert_eq!(k.failures.len(), 1);
    }

    /// A graph of `layers` layers of `width` derivations, each past the first needing
    /// three of the layer below; every builder appends its name to `log`. Returns the
    /// derivations and their outputs, layer by layer, the last layer the top.
    fn layered(
        h: &Harness,
        layers: usize,
        width: usize,
        log: &std::path::Path,
        fails: Option<(usize, usize)>,
    ) -> Vec<Vec<(StorePath, StorePath)>> {
        const DIGITS: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
        let path = |kind: char, n: usize, name: &str| {
            let mut hash = String::from(kind);
            for k in (0..31).rev() {
                hash.push(DIGITS[(n >> (5 * k).min(63)) & 31] as char);
            }
            StorePath::from_base_name(&format!("{hash}-{name}")).unwrap()
        };
        let mut graph: Vec<Vec<(StorePath, StorePath)>> = Vec::new();
        for l in 0..layers {
            let mut layer = Vec::new();
            for i in 0..width {
                let name = format!("l{l}n{i}");
                let (d, o) = (
                    path('d', l * width + i, &format!("{name}.drv")),
                    path('f', l * width + i, &name),
                );
                let ins: Vec<(StorePath, &str)> = match l {
                    0 => vec![],
                    _ => [i, (i + 1) % width, (i + 3) % width]
                        .into_iter()
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .map(|j| (graph[l - 1][j].0.clone(), "out"))
                        .collect(),
                };
                let end = if fails == Some((l, i)) {
                    "exit 1"
                } else {
                    "echo > $out"
                };
                let script = format!("echo {name} >> {}; {end}", log.display());
                h.add_drv(&d, &o, &script, &ins, &[]);
                h.make_valid(&d, &[]);
                layer.push((d, o));
            }
            graph.push(layer);
        }
        graph
    }

    fn built_lines(log: &std::path::Path) -> Vec<String> {
        let mut lines: Vec<String> = std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        lines.sort();
        lines
    }

    /// A graph larger than the goal budget is built whole, each derivation once, while
    /// the worker holds far fewer goals than the graph has derivations (without the
    /// budget it holds them all at once).
    #[test]
    fn a_graph_larger_than_the_goal_budget_is_built_holding_few_goals() {
        let (layers, width, budget) = (10, 6, 4);
        let mut peaks = Vec::new();
        for bounded in [true, false] {
            let mut h = harness();
            h.cfg.max_jobs = 2;
            let log = h.tmp.path().join("built");
            let graph = layered(&h, layers, width, &log, None);
            let mut w = Worker::new(&*h.store, &h.cfg);
            if bounded {
                w.goal_budget = budget;
            }
            let c = w.add_client(Box::new(Events::default()), false);
            for (d, _) in &graph[layers - 1] {
                w.add_target(c, &built(d), BuildMode::Normal);
            }
            w.run().unwrap();
            let outcome = w.client_outcome(c).unwrap();
            assert_eq!(outcome.exit_status, 0, "{:?}", outcome.failures);
            assert_eq!(outcome.outputs.len(), width);
            let lines = built_lines(&log);
            let mut once = lines.clone();
            once.dedup();
            assert_eq!(once, lines, "each derivation built once");
            assert_eq!(lines.len(), layers * width);
            assert!(graph.iter().flatten().all(|(_, o)| is_valid(&h, o)));
            assert!(w.deferred.is_empty());
            peaks.push(w.peak_goals);
        }
        // The tops, twice the budget (filling a free slot), a path down the graph.
        let bound = width + 2 * budget + layers;
        assert!(peaks[0] <= bound, "bounded: {} goals at once", peaks[0]);
        // (Less the one goal out of its slot while it asks for its inputs.)
        assert!(peaks[1] >= layers * width - 1, "unbounded: {}", peaks[1]);
    }

    /// Deferred sub-goals keep the semantics of failure: with keep-going everything that
    /// does not need the failed build is built; without, the run stops and ends.
    #[test]
    fn a_failure_in_a_graph_beyond_the_goal_budget_ends_as_without_it() {
        let (layers, width) = (6, 4);
        for keep_going in [true, false] {
            let mut h = harness();
            h.cfg.max_jobs = 2;
            let log = h.tmp.path().join("built");
            let graph = layered(&h, layers, width, &log, Some((2, 1)));
            let mut w = Worker::new_shared(&*h.store, &h.cfg);
            w.goal_budget = 3;
            let c = w.add_client(Box::new(Events::default()), keep_going);
            for (d, _) in &graph[layers - 1] {
                w.add_target(c, &built(d), BuildMode::Normal);
            }
            w.run().unwrap();
            let outcome = w.client_outcome(c).unwrap();
            assert_eq!(outcome.exit_status, 100, "keep-going {keep_going}");
            let lines = built_lines(&log);
            // What needs l2n1: the l3 nodes taking it as i, i+1 or i+3, and all above.
            let needs_bad = |l: usize, i: usize| l > 2 && (l > 3 || [1, 0, 2].contains(&i));
            let nodes = (0..layers).flat_map(|l| (0..width).map(move |i| (l, i)));
            let buildable: Vec<String> = nodes
                .clone()
                .filter(|&(l, i)| !needs_bad(l, i))
                .map(|(l, i)| format!("l{l}n{i}"))
                .collect();
            let builder_failures: Vec<&StorePath> = outcome
                .failures
                .iter()
                .filter(|f| f.kind == FailureKind::BuilderFailed)
                .map(|f| &f.path)
                .collect();
            assert_eq!(builder_failures, [&graph[2][1].0]);
            if keep_going {
                let mut want = buildable.clone();
                want.sort();
                assert_eq!(lines, want, "l2n1 tried once, all else that can be built");
                let mut failed: Vec<&StorePath> =
                    outcome.failures.iter().map(|f| &f.path).collect();
                failed.sort();
                let mut doomed: Vec<&StorePath> = nodes
                    .filter(|&(l, i)| needs_bad(l, i) || (l, i) == (2, 1))
                    .map(|(l, i)| &graph[l][i].0)
                    .collect();
                doomed.sort();
                assert_eq!(failed, doomed, "each failure reported once");
            } else {
                assert!(lines.len() < buildable.len(), "stopped early: {lines:?}");
                assert!(lines.iter().all(|l| buildable.contains(l)));
            }
            w.remove_client(c);
            assert!(w.graph.live_goals().is_empty() && w.goals.is_empty());
        }
    }
}
