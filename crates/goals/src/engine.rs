//! One long-lived engine for many callers (the daemon's clients): a scheduler thread owns
//! the worker, and requests join its running loop. A derivation that two requests need is
//! one goal, built once; both get its result and its events. `max-jobs` and `cores` hold
//! for the engine as a whole.
//!
//! ```text
//! caller ── submit(targets, options, sink) ──> request channel ─┐
//!        <── Job::wait() <── reply channel <──┐                  │ + a byte on the wake-up
//!                                             │                  v   socket, which the
//!                          engine thread: Worker::new_shared ── poll ── loop polls with the
//!                                             │                          builders' pipes
//!        sink <── events of the goals the request needs (route.rs)
//! ```
//!
//! Dropping a [`Job`] before it is done cancels it: its top goals are no longer its, and
//! what no other request needs is stopped (builders killed, their locks released, their
//! build directories removed, nothing registered).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use nixb_store::DerivedPath;

use crate::config::{BuildMode, WorkerConfig};
use crate::error::GoalsError;
use crate::event::EventSink;
use crate::route::ClientId;
use crate::store::BuildStore;
use crate::worker::Worker;
use crate::RealiseOutcome;

/// What one request may choose for itself; every other setting is the engine's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestOptions {
    /// Normal, check or repair. A check or repair of a derivation another request is
    /// building normally is a goal of its own (it waits for that build's output locks),
    /// not that request's build; the derivations it needs are shared as usual.
    pub build_mode: BuildMode,
    /// Without keep-going, the first failure among the goals this request needs ends it
    /// (stopping what only it needed); other requests go on either way.
    pub keep_going: bool,
    /// `max-silent-time` and `timeout` for this request's builds (`None`: no limit). A
    /// build several requests need gets the most permissive of their limits, each limit
    /// on its own (no limit beats any), so that no request's limit cuts short a build
    /// another request waits for without one.
    pub max_silent_time: Option<std::time::Duration>,
    pub timeout: Option<std::time::Duration>,
}

type Reply = Result<RealiseOutcome, GoalsError>;

enum Msg {
    Submit {
        job: u64,
        targets: Vec<DerivedPath>,
        options: RequestOptions,
        sink: Box<dyn EventSink + Send>,
        reply: mpsc::Sender<Reply>,
    },
    Cancel(u64),
    /// The engine is dropped: end every request, kill every builder.
    Stop,
}

/// The way to the engine thread: the request channel and the wake-up socket.
#[derive(Clone)]
struct Link {
    tx: mpsc::Sender<Msg>,
    wake: Arc<UnixStream>,
}

impl Link {
    /// Sends `m`; false if the engine thread is gone.
    fn send(&self, m: Msg) -> bool {
        if self.tx.send(m).is_err() {
            return false;
        }
        // A full socket already holds a wake-up: the engine drains the channel after it.
        let _ = (&*self.wake).write(&[1]);
        true
    }
}

/// The shared engine: a scheduler thread serving every submitted request. Dropping it
/// stops the thread, killing the builds still running.
pub struct Engine {
    link: Option<Link>,
    next_job: AtomicU64,
    thread: Option<JoinHandle<()>>,
}

impl Engine {
    /// Starts the engine thread on `store` with `cfg` (whose `keep_going` and
    /// `build_mode` are per request, see [`RequestOptions`]).
    pub fn start(
        store: Arc<dyn BuildStore + Send + Sync>,
        cfg: WorkerConfig,
    ) -> Result<Engine, GoalsError> {
        let (tx, rx) = mpsc::channel();
        let (wake_rx, wake_tx) = UnixStream::pair().map_err(GoalsError::EngineThread)?;
        for s in [&wake_rx, &wake_tx] {
            s.set_nonblocking(true).map_err(GoalsError::EngineThread)?;
        }
        let thread = std::thread::Builder::new()
            .name("nixb-engine".into())
            .spawn(move || engine_main(&*store, &cfg, &rx, &wake_rx))
            .map_err(GoalsError::EngineThread)?;
        Ok(Engine {
            link: Some(Link {
                tx,
                wake: Arc::new(wake_tx),
            }),
            next_job: AtomicU64::new(0),
            thread: Some(thread),
        })
    }

    /// Asks the engine to make `targets` valid. `sink` receives the events of the goals
    /// this request needs (shared goals' events go to every request needing them) and is
    /// dropped when the request is done.
    pub fn submit(
        &self,
        targets: Vec<DerivedPath>,
        options: RequestOptions,
        sink: Box<dyn EventSink + Send>,
    ) -> Job {
        let job = self.next_job.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = mpsc::channel();
        let link = self.link.clone();
        let sent = link.as_ref().is_some_and(|l| {
            l.send(Msg::Submit {
                job,
                targets,
                options,
                sink,
                reply,
            })
        });
        Job {
            id: job,
            rx,
            link,
            done: !sent,
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Jobs still waiting hold the channel open: say so instead of closing it. Their
        // replies are dropped, which they see as `EngineStopped`.
        if let Some(link) = self.link.take() {
            link.send(Msg::Stop);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A submitted request. Dropping it before it is done cancels it.
pub struct Job {
    id: u64,
    rx: mpsc::Receiver<Reply>,
    link: Option<Link>,
    /// The reply was taken (or can never come): nothing to cancel.
    done: bool,
}

impl Job {
    /// Waits until the request is done.
    pub fn wait(mut self) -> Reply {
        self.done = true;
        self.rx.recv().unwrap_or(Err(GoalsError::EngineStopped))
    }

    /// The outcome, if the request is done; `None` while it runs.
    pub fn try_wait(&mut self) -> Option<Reply> {
        if self.done {
            return Some(Err(GoalsError::EngineStopped));
        }
        match self.rx.try_recv() {
            Ok(r) => {
                self.done = true;
                Some(r)
            }
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => {
                self.done = true;
                Some(Err(GoalsError::EngineStopped))
            }
        }
    }

    /// Cancels the request (as dropping it does).
    pub fn cancel(self) {}
}

impl Drop for Job {
    fn drop(&mut self) {
        if !self.done {
            if let Some(l) = &self.link {
                l.send(Msg::Cancel(self.id));
            }
        }
    }
}

/// A running request on the engine thread.
struct Active {
    client: ClientId,
    reply: mpsc::Sender<Reply>,
}

fn engine_main(
    store: &dyn BuildStore,
    cfg: &WorkerConfig,
    rx: &mpsc::Receiver<Msg>,
    wake: &UnixStream,
) {
    // Builders of an engine that died (even by SIGKILL) left their directories behind.
    let _ = crate::build_dir::clean_stale(&cfg.build_dir_root);
    loop {
        // A fresh worker whenever the engine is idle: goals, parsed derivations and the
        // like do not pile up over the life of the engine.
        let mut w = Worker::new_shared(store, cfg);
        match serve(&mut w, rx, wake) {
            Served::Idle => w.teardown(),
            Served::Stop => {
                w.end_all_clients();
                w.teardown();
                return;
            }
        }
    }
}

enum Served {
    /// Every request is done and nothing runs: start afresh.
    Idle,
    /// The engine was dropped.
    Stop,
}

fn serve(w: &mut Worker<'_>, rx: &mpsc::Receiver<Msg>, wake: &UnixStream) -> Served {
    let mut active: HashMap<u64, Active> = HashMap::new();
    let mut by_client: HashMap<ClientId, u64> = HashMap::new();
    let mut used = false;
    loop {
        // Wake-ups first, then the channel: a message sent after the drain still
        // leaves its byte for the next poll.
        let mut buf = [0u8; 256];
        while matches!((&*wake).read(&mut buf), Ok(n) if n > 0) {}
        loop {
            match rx.try_recv() {
                Ok(Msg::Submit {
                    job,
                    targets,
                    options,
                    sink,
                    reply,
                }) => {
                    used = true;
                    let client = w.add_client(sink, options.keep_going);
                    w.set_client_limits(client, options.max_silent_time, options.timeout);
                    for t in &targets {
                        w.add_target(client, t, options.build_mode);
                    }
                    w.targets_added(client);
                    active.insert(job, Active { client, reply });
                    by_client.insert(client, job);
                }
                Ok(Msg::Cancel(job)) => {
                    if let Some(a) = active.remove(&job) {
                        by_client.remove(&a.client);
                        w.remove_client(a.client);
                    }
                }
                Ok(Msg::Stop) | Err(mpsc::TryRecvError::Disconnected) => return Served::Stop,
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }

        w.run_ready();
        answer(w, &mut active, &mut by_client);
        if active.is_empty() && used && w.is_idle() {
            return Served::Idle;
        }
        w.run_deferred();
        let result = if w.must_wait() || !w.has_top_goals() {
            w.wait_for_input(Some(wake.as_fd()))
        } else {
            Err(w.stuck())
        };
        if let Err(e) = result {
            // The engine cannot go on for the requests running now; later ones get a
            // fresh try.
            let failed = w.end_all_clients();
            for c in failed {
                if let Some(a) = by_client.remove(&c).and_then(|j| active.remove(&j)) {
                    let _ = a.reply.send(Err(copy_error(&e)));
                }
                w.remove_client(c);
            }
        }
    }
}

/// Sends the outcome of each request that ended, then drops its sink (which tells a
/// caller waiting on the sink that the reply is there).
fn answer(
    w: &mut Worker<'_>,
    active: &mut HashMap<u64, Active>,
    by_client: &mut HashMap<ClientId, u64>,
) {
    for c in w.take_finished() {
        let outcome = w.client_outcome(c);
        if let Some(a) = by_client.remove(&c).and_then(|j| active.remove(&j)) {
            let _ = a.reply.send(outcome);
        }
        w.remove_client(c);
    }
}

/// The same error for another request (errors hold I/O errors, which do not clone).
fn copy_error(e: &GoalsError) -> GoalsError {
    match e {
        GoalsError::NoBuildSlots { remote } => GoalsError::NoBuildSlots { remote: *remote },
        GoalsError::Poll(errno) => GoalsError::Poll(*errno),
        GoalsError::EngineStopped => GoalsError::EngineStopped,
        other => GoalsError::Internal(other.to_string()),
    }
}
