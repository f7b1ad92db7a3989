//! The goal graph: which goal waits for which, who is awake, who sleeps on what.
//!
//! This is pure bookkeeping, kept apart from the goals themselves so that it can be tested
//! without a store or processes. A goal is a node named by a [`GoalId`]; the worker owns the
//! goal values and asks the graph what to run next.
//!
//! ```text
//! waiter --waits for--> waitee        a goal wakes when its last waitee is done, or at once
//!                                     when a waitee failed and keep-going is off
//! top goals                           what the caller asked for; the run ends when none is left
//! awake                               goals to call next, in FIFO order, each at most once
//! wanting to build                    woken when a build slot frees up (a child terminates)
//! waiting for any goal                woken when any goal finishes (an output lock of ours)
//! waiting for a while                 woken every build-poll-interval (a lock of another process)
//! ```
//!
//! Lifetimes follow the original's strong/weak pointers: a goal lives while it is a top goal
//! or some live goal waits for it. A goal nobody waits for any more is *orphaned* and the
//! worker destroys it (killing its builder) without reporting it as done.

use std::collections::{BTreeSet, VecDeque};

/// Names a goal inside one worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GoalId(pub usize);

/// How a goal ended (the original's `ExitCode`; `Busy` while it runs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitCode {
    Busy,
    Success,
    Failed,
    /// A substitution goal found no substituter for its path: the caller should build.
    NoSubstituters,
    /// A substitution goal's references could not be substituted.
    IncompleteClosure,
}

#[derive(Debug, Default)]
struct Node {
    waitees: BTreeSet<GoalId>,
    waiters: BTreeSet<GoalId>,
    nr_failed: u32,
    nr_no_substituters: u32,
    nr_incomplete_closure: u32,
    exit: Option<ExitCode>,
    top: bool,
    /// Destroyed (done or orphaned): ignore any reference to it.
    dead: bool,
}

/// Failure counters of a goal's finished waitees since they were last reset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WaiteeCounts {
    pub failed: u32,
    pub no_substituters: u32,
    pub incomplete_closure: u32,
}

#[derive(Debug)]
pub struct Graph {
    nodes: Vec<Node>,
    keep_going: bool,
    awake: VecDeque<GoalId>,
    wanting_to_build: BTreeSet<GoalId>,
    waiting_for_any: BTreeSet<GoalId>,
    waiting_for_a_while: BTreeSet<GoalId>,
    /// Set once a top goal failed without keep-going: every goal is to stop.
    stopped: bool,
}

impl Graph {
    pub fn new(keep_going: bool) -> Graph {
        Graph {
            nodes: Vec::new(),
            keep_going,
            awake: VecDeque::new(),
            wanting_to_build: BTreeSet::new(),
            waiting_for_any: BTreeSet::new(),
            waiting_for_a_while: BTreeSet::new(),
            stopped: false,
        }
    }

    /// A new goal, awake so that its first state runs.
    pub fn add_goal(&mut self) -> GoalId {
        let id = GoalId(self.nodes.len());
        self.nodes.push(Node {
            exit: Some(ExitCode::Busy),
            ..Node::default()
        });
        self.wake_up(id);
        id
    }

    pub fn set_top(&mut self, id: GoalId) {
        self.nodes[id.0].top = true;
    }

    pub fn is_alive(&self, id: GoalId) -> bool {
        self.nodes.get(id.0).is_some_and(|n| !n.dead)
    }

    pub fn exit_code(&self, id: GoalId) -> ExitCode {
        self.nodes[id.0].exit.unwrap_or(ExitCode::Busy)
    }

    /// True while some top goal is unfinished and no top goal failed without keep-going.
    pub fn has_top_goals(&self) -> bool {
        !self.stopped && self.nodes.iter().any(|n| n.top && !n.dead)
    }

    pub fn waitee_counts(&self, id: GoalId) -> WaiteeCounts {
        let n = &self.nodes[id.0];
        WaiteeCounts {
            failed: n.nr_failed,
            no_substituters: n.nr_no_substituters,
            incomplete_closure: n.nr_incomplete_closure,
        }
    }

    pub fn reset_waitee_counts(&mut self, id: GoalId) {
        let n = &mut self.nodes[id.0];
        n.nr_failed = 0;
        n.nr_no_substituters = 0;
        n.nr_incomplete_closure = 0;
    }

    pub fn has_waitees(&self, id: GoalId) -> bool {
        !self.nodes[id.0].waitees.is_empty()
    }

    /// `waiter` now waits for `waitee`. Waiting for a goal that is already finished
    /// counts as if it finished now (the original never hands out finished goals, since
    /// they leave the dedup maps; this keeps the graph safe either way).
    pub fn add_waitee(&mut self, waiter: GoalId, waitee: GoalId) {
        if waiter == waitee {
            return;
        }
        if !self.is_alive(waitee) {
            let result = self.exit_code(waitee);
            self.count_result(waiter, result);
            return;
        }
        self.nodes[waiter.0].waitees.insert(waitee);
        self.nodes[waitee.0].waiters.insert(waiter);
    }

    fn count_result(&mut self, waiter: GoalId, result: ExitCode) {
        let n = &mut self.nodes[waiter.0];
        if matches!(
            result,
            ExitCode::Failed | ExitCode::NoSubstituters | ExitCode::IncompleteClosure
        ) {
            n.nr_failed += 1;
        }
        if result == ExitCode::NoSubstituters {
            n.nr_no_substituters += 1;
        }
        if result == ExitCode::IncompleteClosure {
            n.nr_incomplete_closure += 1;
        }
    }

    fn waitee_done(&mut self, waiter: GoalId, waitee: GoalId, result: ExitCode) {
        if !self.is_alive(waiter) || !self.nodes[waiter.0].waitees.remove(&waitee) {
            return;
        }
        self.count_result(waiter, result);
        let fail_fast = result == ExitCode::Failed && !self.keep_going;
        if self.nodes[waiter.0].waitees.is_empty() || fail_fast {
            // Without keep-going one failed input dooms the waiter: stop waiting for the
            // rest, which may leave some of them orphaned.
            let rest = std::mem::take(&mut self.nodes[waiter.0].waitees);
            for w in rest {
                self.nodes[w.0].waiters.remove(&waiter);
            }
            self.wake_up(waiter);
        }
    }

    /// Records that `id` finished with `result`, tells its waiters and forgets it.
    pub fn am_done(&mut self, id: GoalId, result: ExitCode) {
        if !self.is_alive(id) {
            return;
        }
        self.nodes[id.0].exit = Some(result);
        let waiters = std::mem::take(&mut self.nodes[id.0].waiters);
        for w in waiters {
            self.waitee_done(w, id, result);
        }
        self.remove(id);
        if self.nodes[id.0].top && result == ExitCode::Failed && !self.keep_going {
            self.stopped = true;
        }
        // Anything waiting for "some goal to finish" gets another chance.
        let any = std::mem::take(&mut self.waiting_for_any);
        for g in any {
            self.wake_up(g);
        }
    }

    fn remove(&mut self, id: GoalId) {
        let n = &mut self.nodes[id.0];
        n.dead = true;
        let waitees = std::mem::take(&mut n.waitees);
        for w in waitees {
            self.nodes[w.0].waiters.remove(&id);
        }
        self.awake.retain(|g| *g != id);
        self.wanting_to_build.remove(&id);
        self.waiting_for_any.remove(&id);
        self.waiting_for_a_while.remove(&id);
    }

    /// Live goals nobody needs any more (not top, no waiters), found transitively: each is
    /// removed from the graph and returned so the worker can destroy its value.
    pub fn collect_orphans(&mut self) -> Vec<GoalId> {
        let mut out = Vec::new();
        loop {
            let found: Vec<GoalId> = (0..self.nodes.len())
                .map(GoalId)
                .filter(|&g| {
                    let n = &self.nodes[g.0];
                    !n.dead && (!n.top || self.stopped) && n.waiters.is_empty()
                })
                .collect();
            if found.is_empty() {
                return out;
            }
            for g in found {
                self.remove(g);
                out.push(g);
            }
        }
    }

    /// Every live goal, for tearing the worker down.
    pub fn live_goals(&self) -> Vec<GoalId> {
        (0..self.nodes.len())
            .map(GoalId)
            .filter(|g| !self.nodes[g.0].dead)
            .collect()
    }

    pub fn wake_up(&mut self, id: GoalId) {
        if self.is_alive(id) && !self.awake.contains(&id) {
            self.awake.push_back(id);
        }
    }

    /// The goals to call now; goals woken while they run are returned by the next call.
    pub fn take_awake(&mut self) -> Vec<GoalId> {
        self.awake.drain(..).collect()
    }

    pub fn has_awake(&self) -> bool {
        !self.awake.is_empty()
    }

    pub fn wait_for_build_slot(&mut self, id: GoalId) {
        self.wanting_to_build.insert(id);
    }

    /// A build slot is free: everyone wanting one gets to try again.
    pub fn wake_slot_waiters(&mut self) {
        for g in std::mem::take(&mut self.wanting_to_build) {
            self.wake_up(g);
        }
    }

    pub fn wait_for_any_goal(&mut self, id: GoalId) {
        self.waiting_for_any.insert(id);
    }

    pub fn wait_for_a_while(&mut self, id: GoalId) {
        self.waiting_for_a_while.insert(id);
    }

    pub fn has_waiting_for_a_while(&self) -> bool {
        !self.waiting_for_a_while.is_empty()
    }

    pub fn wake_a_while_waiters(&mut self) {
        for g in std::mem::take(&mut self.waiting_for_a_while) {
            self.wake_up(g);
        }
    }

    pub fn has_waiting_for_slot(&self) -> bool {
        !self.wanting_to_build.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiter_wakes_only_after_last_waitee() {
        let mut g = Graph::new(false);
        let top = g.add_goal();
        g.set_top(top);
        let a = g.add_goal();
        let b = g.add_goal();
        g.add_waitee(top, a);
        g.add_waitee(top, b);
        assert_eq!(g.take_awake(), vec![top, a, b]);
        g.am_done(a, ExitCode::Success);
        assert!(!g.has_awake());
        g.am_done(b, ExitCode::Success);
        assert_eq!(g.take_awake(), vec![top]);
        assert_eq!(g.waitee_counts(top), WaiteeCounts::default());
    }

    #[test]
    fn failure_without_keep_going_wakes_at_once_and_orphans_the_rest() {
        let mut g = Graph::new(false);
        let top = g.add_goal();
        g.set_top(top);
        let (a, b) = (g.add_goal(), g.add_goal());
        let c = g.add_goal(); // only b waits for c
        g.add_waitee(top, a);
        g.add_waitee(top, b);
        g.add_waitee(b, c);
        g.take_awake();
        g.am_done(a, ExitCode::Failed);
        assert_eq!(g.take_awake(), vec![top]);
        assert_eq!(g.waitee_counts(top).failed, 1);
        let mut orphans = g.collect_orphans();
        orphans.sort();
        assert_eq!(orphans, vec![b, c]);
        assert!(g.is_alive(top));
    }

    #[test]
    fn keep_going_waits_for_everything_and_counts_each_kind() {
        let mut g = Graph::new(true);
        let top = g.add_goal();
        g.set_top(top);
        let (a, b, c) = (g.add_goal(), g.add_goal(), g.add_goal());
        for x in [a, b, c] {
            g.add_waitee(top, x);
        }
        g.take_awake();
        g.am_done(a, ExitCode::Failed);
        assert!(!g.has_awake());
        g.am_done(b, ExitCode::NoSubstituters);
        g.am_done(c, ExitCode::IncompleteClosure);
        assert_eq!(g.take_awake(), vec![top]);
        assert_eq!(
            g.waitee_counts(top),
            WaiteeCounts {
                failed: 3,
                no_substituters: 1,
                incomplete_closure: 1
            }
        );
        assert!(g.collect_orphans().is_empty());
    }

    #[test]
    fn shared_waitee_survives_while_someone_waits() {
        let mut g = Graph::new(false);
        let (t1, t2) = (g.add_goal(), g.add_goal());
        g.set_top(t1);
        g.set_top(t2);
        let (x, shared) = (g.add_goal(), g.add_goal());
        g.add_waitee(t1, x);
        g.add_waitee(t1, shared);
        g.add_waitee(t2, shared);
        g.am_done(x, ExitCode::Failed);
        assert!(
            g.collect_orphans().is_empty(),
            "t2 still waits for the shared goal"
        );
        assert!(g.is_alive(shared));
    }

    #[test]
    fn failed_top_goal_stops_everything_without_keep_going() {
        let mut g = Graph::new(false);
        let (t1, t2) = (g.add_goal(), g.add_goal());
        g.set_top(t1);
        g.set_top(t2);
        g.am_done(t1, ExitCode::Failed);
        assert!(!g.has_top_goals());
        assert_eq!(g.collect_orphans(), vec![t2]);

        let mut g = Graph::new(true);
        let (t1, t2) = (g.add_goal(), g.add_goal());
        g.set_top(t1);
        g.set_top(t2);
        g.am_done(t1, ExitCode::Failed);
        assert!(g.has_top_goals());
    }

    #[test]
    fn sleepers_wake_on_their_own_event_only() {
        let mut g = Graph::new(false);
        let (s, l, w, other) = (g.add_goal(), g.add_goal(), g.add_goal(), g.add_goal());
        for x in [s, l, w, other] {
            g.set_top(x);
        }
        g.take_awake();
        g.wait_for_build_slot(s);
        g.wait_for_any_goal(l);
        g.wait_for_a_while(w);
        g.wake_slot_waiters();
        assert_eq!(g.take_awake(), vec![s]);
        g.am_done(other, ExitCode::Success);
        assert_eq!(g.take_awake(), vec![l]);
        assert!(g.has_waiting_for_a_while());
        g.wake_a_while_waiters();
        assert_eq!(g.take_awake(), vec![w]);
    }

    #[test]
    fn waiting_for_a_finished_goal_counts_its_result() {
        let mut g = Graph::new(true);
        let (t, done) = (g.add_goal(), g.add_goal());
        g.set_top(t);
        g.am_done(done, ExitCode::Failed);
        g.add_waitee(t, done);
        assert_eq!(g.waitee_counts(t).failed, 1);
        assert!(!g.has_waitees(t));
    }
}
