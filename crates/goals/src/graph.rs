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
//! wanting to build                    FIFO; the worker wakes as many as there are free slots
//! waiting for any goal                woken when any goal finishes (an output lock of ours)
//! waiting for a while                 woken every build-poll-interval (a lock of another process)
//! deferred waitees                    sub-goals the worker has not made yet (it holds only so
//!                                     many goals at once): counted on the waiter, which
//!                                     sleeps until they are made and done
//! ```
//!
//! Lifetimes follow the original's strong/weak pointers: a goal lives while it is a top goal
//! or some live goal waits for it. A goal nobody waits for any more is *orphaned* and the
//! worker destroys it (killing its builder) without reporting it as done.

use std::collections::{BTreeSet, HashMap, VecDeque};

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
    top: bool,
    /// In the awake queue (the queue may also hold stale entries of goals no longer awake;
    /// this flag is what counts).
    awake: bool,
    /// In the build slot queue (same convention as `awake`).
    wants_slot: bool,
    /// Some client that needs this goal wants keep-going: a failed input does not make
    /// it stop waiting for the others (see [`Graph::set_keep_going`]).
    keep_going: bool,
    /// Waitees the worker has yet to make ([`Graph::defer`]).
    deferred: u32,
    /// Bumped whenever the goal stops waiting for its deferred waitees (a failed input
    /// woke it): a deferral made before names an older epoch and is no longer awaited.
    defer_epoch: u32,
}

/// Failure counters of a goal's finished waitees since they were last reset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WaiteeCounts {
    pub failed: u32,
    pub no_substituters: u32,
    pub incomplete_closure: u32,
}

/// Every operation the worker performs per event is O(log n) or O(what changed), never a
/// scan of all goals: with ten thousand goals a scan per event makes the run quadratic.
/// Queues therefore hold goal ids with a flag on the node saying whether the entry is
/// still meant; entries whose flag is off are skipped when they come up.
#[derive(Debug)]
pub struct Graph {
    /// The live goals: a goal's node goes when it is done or destroyed, and ids are never
    /// given out again, so a stale id (in a queue, in another goal's past) finds nothing.
    nodes: HashMap<GoalId, Node>,
    /// The id the next goal gets.
    next_id: usize,
    keep_going: bool,
    awake: VecDeque<GoalId>,
    /// Goals waiting for a build slot, first come first served.
    wanting_to_build: VecDeque<GoalId>,
    nr_wanting_to_build: usize,
    waiting_for_any: BTreeSet<GoalId>,
    waiting_for_a_while: BTreeSet<GoalId>,
    /// Live top goals.
    nr_live_top: usize,
    /// Goals that may have become orphans since the last `collect_orphans` (new goals,
    /// goals that lost a waiter); checked, not trusted.
    orphan_candidates: Vec<GoalId>,
    /// Set once a top goal failed without keep-going: every goal is to stop.
    stopped: bool,
    /// `stopped` has been acted on: every live goal was made an orphan candidate.
    stop_collected: bool,
    /// Shared by several clients ([`Graph::new_shared`]): a failed top goal never stops
    /// the whole graph; the scheduler ends the requests of the clients concerned.
    shared: bool,
}

impl Graph {
    pub fn new(keep_going: bool) -> Graph {
        Graph {
            nodes: HashMap::new(),
            next_id: 0,
            keep_going,
            awake: VecDeque::new(),
            wanting_to_build: VecDeque::new(),
            nr_wanting_to_build: 0,
            waiting_for_any: BTreeSet::new(),
            waiting_for_a_while: BTreeSet::new(),
            nr_live_top: 0,
            orphan_candidates: Vec::new(),
            stopped: false,
            stop_collected: false,
            shared: false,
        }
    }

    /// A graph serving several clients, each with its own keep-going: a failed input
    /// wakes its waiter at once unless the waiter is marked [`Graph::set_keep_going`],
    /// and a failed top goal stops nothing by itself.
    pub fn new_shared() -> Graph {
        Graph {
            shared: true,
            ..Graph::new(false)
        }
    }

    /// Some client needing `id` wants keep-going (only meaningful in a shared graph).
    pub fn set_keep_going(&mut self, id: GoalId) -> bool {
        match self.nodes.get_mut(&id) {
            Some(n) if !n.keep_going => {
                n.keep_going = true;
                true
            }
            _ => false,
        }
    }

    /// No client asks for `id` any more: it lives on only while some goal waits for it.
    pub fn unset_top(&mut self, id: GoalId) {
        if let Some(n) = self.nodes.get_mut(&id) {
            if n.top {
                n.top = false;
                self.nr_live_top -= 1;
                self.orphan_candidates.push(id);
            }
        }
    }

    /// The goals `id` waits for.
    pub fn waitees(&self, id: GoalId) -> Vec<GoalId> {
        self.nodes
            .get(&id)
            .map(|n| n.waitees.iter().copied().collect())
            .unwrap_or_default()
    }

    /// The number of goals ever added.
    pub fn nr_goals(&self) -> usize {
        self.next_id
    }

    /// The goals waiting for a while (a lock of another process).
    pub fn a_while_waiters(&self) -> Vec<GoalId> {
        self.waiting_for_a_while.iter().copied().collect()
    }

    /// A new goal, awake so that its first state runs.
    pub fn add_goal(&mut self) -> GoalId {
        let id = GoalId(self.next_id);
        self.next_id += 1;
        self.nodes.insert(id, Node::default());
        // Nobody waits for it yet: an orphan unless someone does by the next collection.
        self.orphan_candidates.push(id);
        self.wake_up(id);
        id
    }

    pub fn set_top(&mut self, id: GoalId) {
        if let Some(n) = self.nodes.get_mut(&id) {
            if !n.top {
                self.nr_live_top += 1;
            }
            n.top = true;
        }
    }

    pub fn is_alive(&self, id: GoalId) -> bool {
        self.nodes.contains_key(&id)
    }

    /// True while some top goal is unfinished and no top goal failed without keep-going.
    pub fn has_top_goals(&self) -> bool {
        !self.stopped && self.nr_live_top > 0
    }

    pub fn waitee_counts(&self, id: GoalId) -> WaiteeCounts {
        self.nodes
            .get(&id)
            .map(|n| WaiteeCounts {
                failed: n.nr_failed,
                no_substituters: n.nr_no_substituters,
                incomplete_closure: n.nr_incomplete_closure,
            })
            .unwrap_or_default()
    }

    pub fn reset_waitee_counts(&mut self, id: GoalId) {
        if let Some(n) = self.nodes.get_mut(&id) {
            n.nr_failed = 0;
            n.nr_no_substituters = 0;
            n.nr_incomplete_closure = 0;
        }
    }

    /// The counts of `id`, which start again from zero: a goal is handed them when it
    /// is called, and looks at them once.
    pub fn take_waitee_counts(&mut self, id: GoalId) -> WaiteeCounts {
        let counts = self.waitee_counts(id);
        self.reset_waitee_counts(id);
        counts
    }

    pub fn has_waitees(&self, id: GoalId) -> bool {
        self.nodes.get(&id).is_some_and(|n| !n.waitees.is_empty())
    }

    /// The top goals that wait for `id`, directly or through other goals (`id` itself if it
    /// is one): the requests a failure of `id` concerns. Walked only when a goal fails.
    pub fn tops_waiting_for(&self, id: GoalId) -> BTreeSet<GoalId> {
        let mut tops = BTreeSet::new();
        let mut seen = BTreeSet::new();
        let mut todo = vec![id];
        while let Some(g) = todo.pop() {
            if !seen.insert(g) {
                continue;
            }
            let Some(n) = self.nodes.get(&g) else {
                continue;
            };
            if n.top {
                tops.insert(g);
            }
            todo.extend(n.waiters.iter().copied());
        }
        tops
    }

    /// `waiter` now waits for `waitee`. Finished goals are never handed out (they leave
    /// the dedup maps as they finish); should one be, waiting for it counts as a failure,
    /// since what it ended as is no longer known.
    pub fn add_waitee(&mut self, waiter: GoalId, waitee: GoalId) {
        if waiter == waitee || !self.is_alive(waiter) {
            return;
        }
        let Some(w) = self.nodes.get_mut(&waitee) else {
            self.count_result(waiter, ExitCode::Failed);
            return;
        };
        w.waiters.insert(waiter);
        if let Some(n) = self.nodes.get_mut(&waiter) {
            n.waitees.insert(waitee);
        }
    }

    /// `waiter` is to wait for a goal the worker has not made yet: it sleeps until that
    /// goal is made ([`Graph::deferral_made`]) and done, as if it were a waitee already.
    /// Returns the epoch to name the deferral by; `None` for a goal that is gone.
    pub fn defer(&mut self, waiter: GoalId) -> Option<u32> {
        let n = self.nodes.get_mut(&waiter)?;
        n.deferred += 1;
        Some(n.defer_epoch)
    }

    /// Whether `waiter` still waits for a goal deferred in `epoch`: it is alive and no
    /// failed input has ended its waiting since.
    pub fn deferral_awaited(&self, waiter: GoalId, epoch: u32) -> bool {
        self.nodes
            .get(&waiter)
            .is_some_and(|n| n.deferred > 0 && n.defer_epoch == epoch)
    }

    /// The worker has made (and linked with [`Graph::add_waitee`]) a goal it deferred for
    /// `waiter`. Should that have left the waiter nothing to wait for (the goal was the
    /// waiter itself), it wakes.
    pub fn deferral_made(&mut self, waiter: GoalId) {
        let Some(n) = self.nodes.get_mut(&waiter) else {
            return;
        };
        n.deferred = n.deferred.saturating_sub(1);
        self.wake_if_done_waiting(waiter, false);
    }

    fn count_result(&mut self, waiter: GoalId, result: ExitCode) {
        let Some(n) = self.nodes.get_mut(&waiter) else {
            return;
        };
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

    /// `waitee` no longer counts `waiter` among its waiters.
    fn drop_waiter(&mut self, waitee: GoalId, waiter: GoalId) {
        if let Some(n) = self.nodes.get_mut(&waitee) {
            if n.waiters.remove(&waiter) && n.waiters.is_empty() {
                self.orphan_candidates.push(waitee);
            }
        }
    }

    fn waitee_done(&mut self, waiter: GoalId, waitee: GoalId, result: ExitCode) {
        let keep_going = self.keep_going;
        let Some(n) = self.nodes.get_mut(&waiter) else {
            return;
        };
        if !n.waitees.remove(&waitee) {
            return;
        }
        let fail_fast = result == ExitCode::Failed && !keep_going && !n.keep_going;
        self.count_result(waiter, result);
        self.wake_if_done_waiting(waiter, fail_fast);
    }

    /// `waiter` needs a goal known to have failed already (the worker does not make it
    /// again): counted as a failed waitee. Whether the waiter wakes is decided by
    /// [`Graph::wake_after_failed_inputs`], once all it asked for in the same step is
    /// known: with keep-going it goes on waiting for the others.
    pub fn input_failed(&mut self, waiter: GoalId) {
        self.count_result(waiter, ExitCode::Failed);
    }

    /// Wakes `waiter`, which had inputs fail ([`Graph::input_failed`]), if it waits for
    /// nothing else or has no keep-going.
    pub fn wake_after_failed_inputs(&mut self, waiter: GoalId) {
        let Some(n) = self.nodes.get(&waiter) else {
            return;
        };
        let fail_fast = !self.keep_going && !n.keep_going;
        self.wake_if_done_waiting(waiter, fail_fast);
    }

    /// Wakes `waiter` if it waits for nothing more, or at once on `fail_fast`.
    fn wake_if_done_waiting(&mut self, waiter: GoalId, fail_fast: bool) {
        let Some(n) = self.nodes.get(&waiter) else {
            return;
        };
        if (n.waitees.is_empty() && n.deferred == 0) || fail_fast {
            // Without keep-going one failed input dooms the waiter: stop waiting for the
            // rest, which may leave some of them orphaned, and for those not made yet.
            let rest = self
                .nodes
                .get_mut(&waiter)
                .map(|n| {
                    if n.deferred > 0 {
                        n.deferred = 0;
                        n.defer_epoch = n.defer_epoch.wrapping_add(1);
                    }
                    std::mem::take(&mut n.waitees)
                })
                .unwrap_or_default();
            for w in rest {
                self.drop_waiter(w, waiter);
            }
            self.wake_up(waiter);
        }
    }

    /// Records that `id` finished with `result`, tells its waiters and forgets it.
    pub fn am_done(&mut self, id: GoalId, result: ExitCode) {
        let Some(n) = self.nodes.get_mut(&id) else {
            return;
        };
        let top = n.top;
        let waiters = std::mem::take(&mut n.waiters);
        for w in waiters {
            self.waitee_done(w, id, result);
        }
        self.remove(id);
        if top && result == ExitCode::Failed && !self.keep_going && !self.shared {
            self.stopped = true;
        }
        // Anything waiting for "some goal to finish" gets another chance.
        let any = std::mem::take(&mut self.waiting_for_any);
        for g in any {
            self.wake_up(g);
        }
    }

    fn remove(&mut self, id: GoalId) {
        let Some(n) = self.nodes.remove(&id) else {
            return;
        };
        if n.top {
            self.nr_live_top -= 1;
        }
        if n.wants_slot {
            self.nr_wanting_to_build -= 1;
        }
        for w in n.waitees {
            self.drop_waiter(w, id);
        }
        self.waiting_for_any.remove(&id);
        self.waiting_for_a_while.remove(&id);
    }

    fn is_orphan(&self, g: GoalId) -> bool {
        self.nodes
            .get(&g)
            .is_some_and(|n| (!n.top || self.stopped) && n.waiters.is_empty())
    }

    /// Live goals nobody needs any more (not top, no waiters), found transitively: each is
    /// removed from the graph and returned so the worker can destroy its value.
    pub fn collect_orphans(&mut self) -> Vec<GoalId> {
        if self.stopped && !self.stop_collected {
            // Top goals count as orphans from now on; look at every goal once.
            self.stop_collected = true;
            self.orphan_candidates.extend(self.nodes.keys().copied());
        }
        let mut out = Vec::new();
        while let Some(g) = self.orphan_candidates.pop() {
            if self.is_orphan(g) {
                // Removing it may make its own waitees candidates.
                self.remove(g);
                out.push(g);
            }
        }
        out
    }

    /// Every live goal, for tearing the worker down.
    pub fn live_goals(&self) -> Vec<GoalId> {
        let mut live: Vec<GoalId> = self.nodes.keys().copied().collect();
        live.sort_unstable();
        live
    }

    pub fn wake_up(&mut self, id: GoalId) {
        if let Some(n) = self.nodes.get_mut(&id) {
            if !n.awake {
                n.awake = true;
                self.awake.push_back(id);
            }
        }
    }

    /// The goals to call now; goals woken while they run are returned by the next call.
    pub fn take_awake(&mut self) -> Vec<GoalId> {
        let mut out = Vec::with_capacity(self.awake.len());
        for id in self.awake.drain(..) {
            if let Some(n) = self.nodes.get_mut(&id) {
                if n.awake {
                    n.awake = false;
                    out.push(id);
                }
            }
        }
        out
    }

    pub fn has_awake(&self) -> bool {
        // Stale entries are only left by dead goals; `take_awake` skips them.
        !self.awake.is_empty()
    }

    pub fn wait_for_build_slot(&mut self, id: GoalId) {
        let Some(n) = self.nodes.get_mut(&id) else {
            return;
        };
        if !n.wants_slot {
            n.wants_slot = true;
            self.nr_wanting_to_build += 1;
            self.wanting_to_build.push_back(id);
        }
    }

    /// Wakes up to `n` goals waiting for a build slot, longest waiting first; returns how
    /// many were woken. Waking exactly as many goals as there are free slots (rather than
    /// all of them, as the original does) keeps a freed slot from costing a lock attempt
    /// and a database re-check by every waiting goal.
    pub fn wake_slot_waiters_up_to(&mut self, n: usize) -> usize {
        let mut woken = 0;
        while woken < n {
            let Some(id) = self.wanting_to_build.pop_front() else {
                break;
            };
            let Some(node) = self.nodes.get_mut(&id) else {
                continue; // a goal gone since
            };
            if !std::mem::take(&mut node.wants_slot) {
                continue; // stale entry
            }
            self.nr_wanting_to_build -= 1;
            self.wake_up(id);
            woken += 1;
        }
        woken
    }

    /// Wakes every goal waiting for a build slot.
    pub fn wake_slot_waiters(&mut self) {
        self.wake_slot_waiters_up_to(usize::MAX);
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
        self.nr_wanting_to_build > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_concerns_every_top_goal_waiting_for_it() {
        // t1 -> a -> b and t2 -> b; t3 apart.
        let mut g = Graph::new(true);
        let (t1, t2, t3) = (g.add_goal(), g.add_goal(), g.add_goal());
        for t in [t1, t2, t3] {
            g.set_top(t);
        }
        let (a, b) = (g.add_goal(), g.add_goal());
        g.add_waitee(t1, a);
        g.add_waitee(a, b);
        g.add_waitee(t2, b);
        assert_eq!(g.tops_waiting_for(b), BTreeSet::from([t1, t2]));
        assert_eq!(g.tops_waiting_for(a), BTreeSet::from([t1]));
        assert_eq!(g.tops_waiting_for(t3), BTreeSet::from([t3]));
    }

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

    /// A graph whose top goal waits for one goal `a`, nothing awake: (graph, top, a).
    fn top_waiting_for_one(keep_going: bool) -> (Graph, GoalId, GoalId) {
        let mut g = Graph::new(keep_going);
        let top = g.add_goal();
        g.set_top(top);
        let a = g.add_goal();
        g.add_waitee(top, a);
        g.take_awake();
        (g, top, a)
    }

    #[test]
    fn a_deferred_waitee_counts_until_made_and_done() {
        let (mut g, top, a) = top_waiting_for_one(false);
        let epoch = g.defer(top).unwrap();
        g.am_done(a, ExitCode::Success);
        assert!(!g.has_awake(), "the deferred waitee is still to come");
        assert!(g.deferral_awaited(top, epoch));
        let b = g.add_goal();
        g.add_waitee(top, b);
        g.deferral_made(top);
        assert!(!g.deferral_awaited(top, epoch));
        assert_eq!(g.take_awake(), vec![b]);
        g.am_done(b, ExitCode::Success);
        assert_eq!(g.take_awake(), vec![top]);
    }

    #[test]
    fn a_failure_without_keep_going_ends_the_wait_for_deferred_waitees() {
        let (mut g, top, a) = top_waiting_for_one(false);
        let epoch = g.defer(top).unwrap();
        g.am_done(a, ExitCode::Failed);
        assert_eq!(g.take_awake(), vec![top]);
        assert!(!g.deferral_awaited(top, epoch), "no longer awaited");
        // A later deferral of the same goal is a new one.
        let again = g.defer(top).unwrap();
        assert!(again != epoch && g.deferral_awaited(top, again));
        assert!(!g.deferral_awaited(top, epoch));
    }

    #[test]
    fn a_known_failed_input_wakes_only_once_the_others_are_done_with_keep_going() {
        let (mut g, top, a) = top_waiting_for_one(true);
        g.input_failed(top);
        g.wake_after_failed_inputs(top);
        assert!(!g.has_awake(), "a is still running");
        g.am_done(a, ExitCode::Success);
        assert_eq!(g.take_awake(), vec![top]);
        assert_eq!(g.waitee_counts(top).failed, 1);

        let (mut g, top, _) = top_waiting_for_one(false);
        g.input_failed(top);
        g.wake_after_failed_inputs(top);
        assert_eq!(g.take_awake(), vec![top], "without keep-going at once");
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

    /// A finished goal's node is gone with what it ended as: waiting for it (which the
    /// worker never asks, finished goals leaving its dedup maps) counts as a failure, never
    /// as a success nobody saw.
    #[test]
    fn waiting_for_a_finished_goal_counts_as_a_failure() {
        let mut g = Graph::new(true);
        let (t, done) = (g.add_goal(), g.add_goal());
        g.set_top(t);
        g.am_done(done, ExitCode::Success);
        assert!(!g.is_alive(done));
        g.add_waitee(t, done);
        assert_eq!(g.waitee_counts(t).failed, 1);
        assert!(!g.has_waitees(t));
    }

    #[test]
    fn slots_go_to_the_longest_waiting_goal_one_per_free_slot() {
        let mut g = Graph::new(false);
        let ids: Vec<GoalId> = (0..5).map(|_| g.add_goal()).collect();
        for &x in &ids {
            g.set_top(x);
        }
        g.take_awake();
        // Queue in an order that differs from id order: FIFO, not by id.
        for &x in &[ids[3], ids[1], ids[4], ids[0]] {
            g.wait_for_build_slot(x);
        }
        g.wait_for_build_slot(ids[1]); // already queued: no second entry
        assert_eq!(g.wake_slot_waiters_up_to(1), 1);
        assert_eq!(g.take_awake(), vec![ids[3]]);
        // A queued goal that finishes meanwhile leaves a stale entry, which is skipped.
        g.am_done(ids[1], ExitCode::Success);
        assert_eq!(g.wake_slot_waiters_up_to(2), 2);
        assert_eq!(g.take_awake(), vec![ids[4], ids[0]]);
        assert!(!g.has_waiting_for_slot());
        assert_eq!(g.wake_slot_waiters_up_to(3), 0);
        // A goal can queue again after being woken.
        g.wait_for_build_slot(ids[3]);
        assert!(g.has_waiting_for_slot());
        g.wake_slot_waiters();
        assert_eq!(g.take_awake(), vec![ids[3]]);
    }

    #[test]
    fn wake_up_is_idempotent_and_dead_goals_are_not_returned() {
        let mut g = Graph::new(false);
        let (t, a) = (g.add_goal(), g.add_goal());
        g.set_top(t);
        g.add_waitee(t, a);
        g.take_awake();
        g.wake_up(t);
        g.wake_up(a);
        g.wake_up(t);
        g.am_done(a, ExitCode::Success); // wakes t again: still once
        assert_eq!(g.take_awake(), vec![t]);
    }

    #[test]
    fn top_goal_count_follows_set_top_and_completion() {
        let mut g = Graph::new(true);
        let (t1, t2) = (g.add_goal(), g.add_goal());
        assert!(!g.has_top_goals());
        g.set_top(t1);
        g.set_top(t1);
        g.set_top(t2);
        g.am_done(t1, ExitCode::Failed);
        assert!(g.has_top_goals(), "keep-going: t2 is still to do");
        g.am_done(t2, ExitCode::Success);
        assert!(!g.has_top_goals());
    }

    #[test]
    fn orphans_are_found_through_chains_of_waitees_only() {
        // t -> a -> b -> c, and d (also waited for by t2, which stays).
        let mut g = Graph::new(false);
        let (t, t2) = (g.add_goal(), g.add_goal());
        g.set_top(t);
        g.set_top(t2);
        let (a, b, c, d) = (g.add_goal(), g.add_goal(), g.add_goal(), g.add_goal());
        g.add_waitee(t, a);
        g.add_waitee(a, b);
        g.add_waitee(b, c);
        g.add_waitee(a, d);
        g.add_waitee(t2, d);
        assert!(g.collect_orphans().is_empty());
        // a fails for another reason and is destroyed: t stays, b and c go, d stays.
        g.am_done(a, ExitCode::Failed);
        let mut o = g.collect_orphans();
        o.sort();
        assert_eq!(o, vec![b, c]);
        assert!(g.is_alive(d) && g.is_alive(t));
        assert!(g.collect_orphans().is_empty());
    }
}
