//! Which client sees which event. Every client of the scheduler has its own sink; a goal
//! is of interest to the clients whose top goals need it (directly or through other
//! goals), and an event a goal emits goes to those clients only. Interest is spread by the
//! scheduler as goals start waiting for sub-goals; it is never taken back (a client that
//! has left has no sink, so stale interest costs nothing).
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
    /// The clients interested in each goal, by goal index.
    interest: Vec<Vec<ClientId>>,
    /// Each client's sink, by client index; `None` once the client has left.
    sinks: Vec<Option<Box<dyn EventSink + 'a>>>,
    /// The temporary roots clients keep for each goal not done yet, to be kept by the
    /// clients that become interested in it later.
    roots: HashMap<GoalId, Vec<StorePath>>,
}

impl<'a> Router<'a> {
    pub fn new() -> Router<'a> {
        Router {
            current: None,
            interest: Vec::new(),
            sinks: Vec::new(),
            roots: HashMap::new(),
        }
    }

    pub fn add_client(&mut self, sink: Box<dyn EventSink + 'a>) -> ClientId {
        self.sinks.push(Some(sink));
        ClientId(self.sinks.len() - 1)
    }

    /// Drops the sink of `c`: it receives nothing more.
    pub fn remove_client(&mut self, c: ClientId) {
        if let Some(s) = self.sinks.get_mut(c.0) {
            *s = None;
        }
    }

    /// The clients interested in goal `g`.
    pub fn interest(&self, g: GoalId) -> &[ClientId] {
        self.interest.get(g.0).map_or(&[], Vec::as_slice)
    }

    /// Adds `c` to the clients interested in `g`; false if it was there already.
    pub fn add_interest(&mut self, g: GoalId, c: ClientId) -> bool {
        if self.interest.len() <= g.0 {
            self.interest.resize_with(g.0 + 1, Vec::new);
        }
        let set = &mut self.interest[g.0];
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
            let Some(Some(sink)) = self.sinks.get_mut(c.0) else {
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

    /// No goal's roots are remembered.
    #[cfg(test)]
    pub fn has_no_roots(&self) -> bool {
        self.roots.is_empty()
    }

    /// Goal `g` is gone (done or destroyed): it emits nothing more, and a client that
    /// needs its paths now takes them on its own. Only its empty slot stays.
    pub fn forget_goal(&mut self, g: GoalId) {
        self.roots.remove(&g);
        if let Some(set) = self.interest.get_mut(g.0) {
            *set = Vec::new();
        }
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
        let clients: Vec<ClientId> = (0..self.sinks.len()).map(ClientId).collect();
        self.deliver(&clients, e);
    }

    /// Hands `e` to each of `clients` that is still there, cloning it for all but the
    /// last.
    fn deliver(&mut self, clients: &[ClientId], e: Event) {
        let live: Vec<usize> = clients
            .iter()
            .map(|c| c.0)
            .filter(|&i| self.sinks.get(i).is_some_and(Option::is_some))
            .collect();
        let Some((&last, rest)) = live.split_last() else {
            return;
        };
        for &i in rest {
            if let Some(Some(s)) = self.sinks.get_mut(i) {
                s.event(e.clone());
            }
        }
        if let Some(Some(s)) = self.sinks.get_mut(last) {
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
