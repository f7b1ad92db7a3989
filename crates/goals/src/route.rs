//! Which client sees which event. Every client of the scheduler has its own sink; a goal
//! is of interest to the clients whose top goals need it (directly or through other
//! goals), and an event a goal emits goes to those clients only. Interest is spread by the
//! scheduler as goals start waiting for sub-goals; it is not taken back while the goal
//! lives (a client that has left has no sink, so stale interest costs nothing) and goes
//! with the goal.
//!
//! Events emitted while no goal is being run (the scheduler's own warnings) go to every
//! client.
//!
//! Temporary roots follow the same lines: a path a goal protects from garbage collectors
//! is kept by each interested client that keeps roots of its own (a daemon connection,
//! whose roots go when it ends), and by a client that becomes interested later as well;
//! the caller roots it for the whole process when some interested client keeps none.

use std::collections::HashMap;

use nixb_store::StorePath;

use crate::event::{Event, EventSink};
use crate::graph::GoalId;

/// One caller's request: the top goals it asked for, its sink and its own outcome.
/// Several clients share one scheduler (and every goal two of them need).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct ClientId(pub usize);

pub(crate) struct Router<'a> {
    /// The goal whose step is being taken, if any: what `emit` routes by.
    pub current: Option<GoalId>,
    /// The clients interested in each goal not gone yet.
    interest: HashMap<GoalId, Vec<ClientId>>,
    /// Each client's sink, until the client leaves.
    sinks: HashMap<ClientId, Box<dyn EventSink + 'a>>,
    /// The id the next client gets (ids are never given out twice).
    next_client: usize,
    /// The temporary roots clients keep for each goal not done yet, to be kept by the
    /// clients that become interested in it later.
    roots: HashMap<GoalId, Vec<StorePath>>,
}

impl<'a> Router<'a> {
    pub fn new() -> Router<'a> {
        Router {
            current: None,
            interest: HashMap::new(),
            sinks: HashMap::new(),
            next_client: 0,
            roots: HashMap::new(),
        }
    }

    pub fn add_client(&mut self, sink: Box<dyn EventSink + 'a>) -> ClientId {
        let c = ClientId(self.next_client);
        self.next_client += 1;
        self.sinks.insert(c, sink);
        c
    }

    /// Drops the sink of `c`: it receives nothing more.
    pub fn remove_client(&mut self, c: ClientId) {
        self.sinks.remove(&c);
    }

    /// The clients interested in goal `g`.
    pub fn interest(&self, g: GoalId) -> &[ClientId] {
        self.interest.get(&g).map_or(&[], Vec::as_slice)
    }

    /// Adds `c` to the clients interested in `g`; false if it was there already.
    pub fn add_interest(&mut self, g: GoalId, c: ClientId) -> bool {
        let set = self.interest.entry(g).or_default();
        if set.contains(&c) {
            false
        } else {
            set.push(c);
            true
        }
    }

    /// Has the clients interested in the goal being run keep `p` as a temporary root.
    /// False when the process must root it itself: no goal is being run, no interested
    /// client is there, or one of them keeps no roots or failed to (its error is returned
    /// for a warning).
    pub fn keep_temp_root(&mut self, p: &StorePath) -> (bool, Vec<String>) {
        let Some(g) = self.current else {
            return (false, Vec::new());
        };
        let clients = self.interest(g).to_vec();
        let (kept, errors) = self.keep_for(&clients, p);
        if kept.iter().any(|&k| k) {
            let roots = self.roots.entry(g).or_default();
            if !roots.contains(p) {
                roots.push(p.clone());
            }
        }
        (!kept.is_empty() && kept.iter().all(|&k| k), errors)
    }

    /// Has client `c`, just become interested in goal `g`, keep the roots `g` has taken;
    /// returns those it did not keep (the process must root them) and its errors.
    pub fn keep_roots_of(&mut self, g: GoalId, c: ClientId) -> (Vec<StorePath>, Vec<String>) {
        let roots = self.roots.get(&g).cloned().unwrap_or_default();
        let mut missed = Vec::new();
        let mut errors = Vec::new();
        for p in roots {
            let (kept, mut errs) = self.keep_for(&[c], &p);
            errors.append(&mut errs);
            // A client that has left needs nothing kept.
            if kept.first() == Some(&false) {
                missed.push(p);
            }
        }
        (missed, errors)
    }

    /// Whether each live client of `clients` kept `p`, and the errors of those that failed.
    fn keep_for(&mut self, clients: &[ClientId], p: &StorePath) -> (Vec<bool>, Vec<String>) {
        let mut kept = Vec::new();
        let mut errors = Vec::new();
        for c in clients {
            let Some(sink) = self.sinks.get_mut(c) else {
                continue;
            };
            kept.push(match sink.keep_temp_root(p) {
                Some(Ok(())) => true,
                Some(Err(e)) => {
                    errors.push(e);
                    false
                }
                None => false,
            });
        }
        (kept, errors)
    }

    /// Nothing is held: no client, no goal's interest or roots.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.sinks.is_empty() && self.interest.is_empty() && self.roots.is_empty()
    }

    /// Goal `g` is gone (done or destroyed): it emits nothing more, and a client that
    /// needs its paths now takes them on its own. Only its empty slot stays.
    pub fn forget_goal(&mut self, g: GoalId) {
        self.roots.remove(&g);
        self.interest.remove(&g);
    }

    /// Routes `e` by the goal being run (see the module doc).
    pub fn emit(&mut self, e: Event) {
        match self.current {
            Some(g) => self.emit_for(g, e),
            None => self.broadcast(e),
        }
    }

    /// Hands `e` to the clients interested in goal `g`.
    pub fn emit_for(&mut self, g: GoalId, e: Event) {
        let clients = self.interest(g).to_vec();
        self.deliver(&clients, e);
    }

    /// Hands `e` to the clients interested in any of `goals`, once each.
    pub fn emit_for_any(&mut self, goals: &[GoalId], e: Event) {
        let mut clients: Vec<ClientId> = goals
            .iter()
            .flat_map(|g| self.interest(*g).iter().copied())
            .collect();
        clients.sort();
        clients.dedup();
        self.deliver(&clients, e);
    }

    /// Hands `e` to client `c` only.
    pub fn emit_to(&mut self, c: ClientId, e: Event) {
        self.deliver(&[c], e);
    }

    /// Hands `e` to every client still there.
    pub fn broadcast(&mut self, e: Event) {
        let mut clients: Vec<ClientId> = self.sinks.keys().copied().collect();
        clients.sort_unstable();
        self.deliver(&clients, e);
    }

    /// Hands `e` to each of `clients` that is still there, cloning it for all but the
    /// last.
    fn deliver(&mut self, clients: &[ClientId], e: Event) {
        let live: Vec<ClientId> = clients
            .iter()
            .copied()
            .filter(|c| self.sinks.contains_key(c))
            .collect();
        let Some((last, rest)) = live.split_last() else {
            return;
        };
        for c in rest {
            if let Some(s) = self.sinks.get_mut(c) {
                s.event(e.clone());
            }
        }
        if let Some(s) = self.sinks.get_mut(last) {
            s.event(e);
        }
    }
}

/// A borrowed sink as a client's sink (for `realise`, whose caller keeps its sink).
pub(crate) struct BorrowedSink<'s>(pub &'s mut dyn EventSink);

impl EventSink for BorrowedSink<'_> {
    fn event(&mut self, e: Event) {
        self.0.event(e);
    }

    fn keep_temp_root(&mut self, p: &StorePath) -> Option<Result<(), String>> {
        self.0.keep_temp_root(p)
    }
}
