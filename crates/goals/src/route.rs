//! Which client sees which event. Every client of the scheduler has its own sink; a goal
//! is of interest to the clients whose top goals need it (directly or through other
//! goals), and an event a goal emits goes to those clients only. Interest is spread by the
//! scheduler as goals start waiting for sub-goals; it is never taken back (a client that
//! has left has no sink, so stale interest costs nothing).
//!
//! Events emitted while no goal is being run (the scheduler's own warnings) go to every
//! client.

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
}

impl<'a> Router<'a> {
    pub fn new() -> Router<'a> {
        Router {
            current: None,
            interest: Vec::new(),
            sinks: Vec::new(),
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
}
