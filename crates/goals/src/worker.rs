//! The worker's scheduler: owns the goals, their graph and the dedup maps, runs awake
//! goals, acts on what they ask for (`services::Request`), and waits for their children
//! (kept in `resources`) in one `poll()`. Goals know neither this type nor each other.
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

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nixb_store::derivation::Derivation;
use nixb_store::StorePath;

use crate::config::{BuildMode, WorkerConfig};
use crate::derivation_goal::DerivationGoal;
use crate::error::GoalsError;
use crate::event::{Event, EventSink, FailureKind};
use crate::graph::{ExitCode, GoalId, Graph, WaiteeCounts};
use crate::outcome::{Failure, Outcome};
use crate::resources::{Resources, SlotWaiters};
use crate::services::{ChildError, ChildStatus, Request, Services, Step, SubGoal};
use crate::store::{BuildStore, StoreFault};
use crate::substitution_goal::SubstitutionGoal;

/// One caller's request: the top goals it asked for and its own outcome. Several clients
/// share one scheduler (and every goal two of them need); a failure goes to the outcome of
/// each client whose top goals wait for the failed goal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ClientId(usize);

pub(crate) enum Goal {
    Derivation(Box<DerivationGoal>),
    Substitution(Box<SubstitutionGoal>),
}

/// The scheduler: the goals, their graph, the dedup maps, the wake-ups, and the loop.
pub(crate) struct Worker<'a> {
    store: &'a dyn BuildStore,
    cfg: &'a WorkerConfig,
    pub graph: Graph,
    goals: Vec<Option<Goal>>,
    derivation_goals: HashMap<StorePath, GoalId>,
    substitution_goals: HashMap<StorePath, GoalId>,
    /// For each goal id, the key it has in `derivation_goals` or `substitution_goals`
    /// (`true` = derivation), so that forgetting a goal is a lookup, not a scan.
    dedup_keys: Vec<Option<(bool, StorePath)>>,
    last_woken_up: Option<Instant>,
    /// Buffer for reading log pipes, allocated once.
    read_buf: Vec<u8>,
    /// Local builds whose builder exited successfully, oldest first: their goals are woken
    /// to check and register the outputs only once the freed build slots have gone to
    /// waiting goals (see [`Worker::run`]).
    exited_builds: VecDeque<GoalId>,
    /// Each client's failures and the exit-status bits they set, by `ClientId`.
    outcomes: Vec<Outcome>,
    /// The clients that asked for each top goal.
    clients_of_top: HashMap<GoalId, Vec<ClientId>>,
    /// What goals use: children, slots, logs, directories, hook, substituters. After the
    /// goals, so that goals are dropped before the children and the watchdog.
    pub res: Resources<'a>,
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
            graph: Graph::new(cfg.keep_going),
            goals: Vec::new(),
            derivation_goals: HashMap::new(),
            substitution_goals: HashMap::new(),
            dedup_keys: Vec::new(),
            last_woken_up: None,
            read_buf: Vec::new(),
            exited_builds: VecDeque::new(),
            outcomes: Vec::new(),
            clients_of_top: HashMap::new(),
            res: Resources::new(store, cfg, sink),
        }
    }

    /// The derivation at `drv`, read and parsed once per worker.
    pub fn derivation(&mut self, drv: &StorePath) -> Result<Arc<Derivation>, StoreFault> {
        self.res.derivation(drv)
    }

    pub fn emit(&mut self, e: Event) {
        self.res.emit(e);
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
    fn am_done(&mut self, id: GoalId, result: ExitCode) {
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
        self.res.clear_locked_outputs(id);
        self.child_terminated(id);
    }

    /// A new client, with an empty outcome.
    pub fn add_client(&mut self) -> ClientId {
        self.outcomes.push(Outcome::default());
        ClientId(self.outcomes.len() - 1)
    }

    /// `client` asks for goal `id`: the run goes on until it is done.
    pub fn add_top_goal(&mut self, client: ClientId, id: GoalId) {
        self.graph.set_top(id);
        let clients = self.clients_of_top.entry(id).or_default();
        if !clients.contains(&client) {
            clients.push(client);
        }
    }

    /// The outcome of `client` so far, leaving it empty.
    pub fn take_outcome(&mut self, client: ClientId) -> Outcome {
        self.outcomes
            .get_mut(client.0)
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Records a failure in the outcome of `client`; `permanent` marks a build that would
    /// fail again.
    pub fn record_failure(&mut self, client: ClientId, f: Failure, permanent: bool) {
        if let Some(o) = self.outcomes.get_mut(client.0) {
            o.record(f, permanent);
        }
    }

    /// Records the failure of goal `id` for every client whose top goals wait for it.
    fn record_goal_failure(&mut self, id: GoalId, f: Failure, permanent: bool) {
        let mut clients = BTreeSet::new();
        for top in self.graph.tops_waiting_for(id) {
            if let Some(cs) = self.clients_of_top.get(&top) {
                clients.extend(cs.iter().copied());
            }
        }
        if clients.is_empty() {
            // Every live goal serves some top goal; should one not, its failure is
            // everyone's rather than no one's.
            clients.extend((0..self.outcomes.len()).map(ClientId));
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
        for r in requests {
            match r {
                Request::WaitFor(sub) => {
                    let g = match sub {
                        SubGoal::Derivation { drv, wanted, mode } => {
                            self.make_derivation_goal(&drv, &wanted, mode)
                        }
                        SubGoal::Substitution { path, repair } => {
                            self.make_substitution_goal(&path, repair)
                        }
                    };
                    self.graph.add_waitee(id, g);
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
                } => self
                    .res
                    .child_started(id, builder, log, in_build_slot, respect_timeouts),
                Request::LockedOutputs(paths) => self.res.set_locked_outputs(id, paths),
                Request::UnlockedOutputs => self.res.clear_locked_outputs(id),
                Request::Failed { failure, permanent } => {
                    self.record_goal_failure(id, failure, permanent)
                }
                Request::Done(result) => self.am_done(id, result),
            }
        }
    }

    // --- the loop -----------------------------------------------------------------------

    /// Runs until every top goal of every client is done (or one failed without
    /// keep-going).
    pub fn run(&mut self) -> Result<(), GoalsError> {
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
            self.res.run_deferred();
            if !self.res.children.is_empty()
                || self.graph.has_waiting_for_a_while()
                || self.res.builtin_subst.busy()
            {
                self.wait_for_input()?;
            } else if !self.graph.has_awake() {
                if self.cfg.max_jobs == 0 && self.graph.has_waiting_for_slot() {
                    return Err(GoalsError::NoBuildSlots {
                        remote: self.cfg.build_hook.is_some(),
                    });
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
    fn teardown(&mut self) {
        self.graph.collect_orphans();
        for id in self.graph.live_goals() {
            self.forget(id);
            self.goals[id.0] = None;
        }
        for id in self.res.children.keys().copied().collect::<Vec<_>>() {
            self.child_terminated(id);
        }
        for slot in &mut self.goals {
            *slot = None;
        }
        self.res.drop_hook();
        self.res.run_deferred();
        self.res.finish_all_logs();
    }

    fn destroy_orphans(&mut self) {
        for id in self.graph.collect_orphans() {
            self.forget(id);
            // Dropping the goal value deletes its build directory and closes its log.
            self.goals[id.0] = None;
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
        let Some(mut goal) = self.goals.get_mut(id.0).and_then(Option::take) else {
            return;
        };
        let mut step = Step::new(id, self.store, self.cfg, &mut self.res, counts);
        f(&mut goal, &mut step);
        let requests = step.into_requests();
        self.wake_slot_waiters_if_asked();
        self.act_on(id, requests);
        if self.graph.is_alive(id) {
            self.goals[id.0] = Some(goal);
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
        let later = match self.goals.get_mut(id.0).and_then(Option::as_mut) {
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
        for c in self.res.children.values().filter(|c| c.respect_timeouts) {
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
                self.res.emit(Event::WaitingForLocks);
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
        for c in self.res.builtin_subst.take_completions(self.store) {
            let id = c.goal();
            if let Some(Some(Goal::Substitution(g))) = self.goals.get_mut(id.0) {
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
        if let (Some(usage), Some(Some(Goal::Derivation(g)))) = (usage, self.goals.get(id.0)) {
            let drv = g.drv_path().clone();
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
    use super::*;
    use crate::event::VecSink;
    use crate::testing::Harness;

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
        let mut sink = VecSink::default();
        let mut w = Worker::new(&*h.store, &h.cfg, &mut sink);
        let (a, b) = (w.add_client(), w.add_client());
        let gx = w.make_derivation_goal(&x, &BTreeSet::new(), BuildMode::Normal);
        let gy = w.make_derivation_goal(&y, &BTreeSet::new(), BuildMode::Normal);
        w.add_top_goal(a, gx);
        w.add_top_goal(b, gy);
        w.run().unwrap();
        assert_eq!(w.graph.exit_code(gx), ExitCode::Success);
        assert_eq!(w.graph.exit_code(gy), ExitCode::Failed);
        assert!(w.take_outcome(a).into_failures().is_empty());
        let failures = w.take_outcome(b).into_failures();
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].path, y);
    }
}
