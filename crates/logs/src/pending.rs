//! Creating a log file on a helper thread while the caller goes on.
//!
//! Creating the file (and, for one build in about every two of the first thousand, its
//! `drvs/xx` directory) allocates inodes, which can be slow, and much slower while the file
//! system skips recently freed inodes: the largest single step of starting a trivial build
//! on the worker's thread (BENCHMARKS.md, "logs: log files created on a helper thread"). [`LogSink::create_in_background`] hands the creation to one
//! long-lived helper thread and returns at once; [`PendingLog::wait`] gives the sink (or
//! the error, exactly as [`LogSink::create`] would have) when the caller needs it, e.g.
//! at the builder's first output or its end. [`PendingLog::path`] names the file before.
//!
//! ```text
//! queued  --helper takes it-->  running  --done-->  ready(result)
//!    \--wait() takes it and creates the file itself (helper busy or slow to wake)
//! ```
//!
//! `wait` never waits for the helper to be scheduled: a job the helper has not started
//! yet is run by the caller. A `PendingLog` dropped without `wait` (the build failed to
//! start) still ends with a complete, empty log, as [`LogSink::finish`] writes it.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Condvar, Mutex, OnceLock};

use crate::{check_name, log_path, LogConfig, LogError, LogSink};

enum Slot {
    Queued(LogConfig, String),
    Running,
    Ready(Result<LogSink, LogError>),
    Taken,
}

struct Shared {
    slot: Mutex<Slot>,
    done: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Slot> {
        // The slot holds plain data; a panic elsewhere cannot leave it inconsistent.
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs the job if nobody has started it yet.
    fn run_if_queued(&self) {
        let mut slot = self.lock();
        if !matches!(*slot, Slot::Queued(..)) {
            return; // running elsewhere, done or taken: leave it as it is
        }
        let Slot::Queued(cfg, name) = std::mem::replace(&mut *slot, Slot::Running) else {
            return;
        };
        drop(slot);
        let result = LogSink::create(&cfg, &name);
        *self.lock() = Slot::Ready(result);
        self.done.notify_all();
    }

    fn take(&self) -> Result<LogSink, LogError> {
        self.run_if_queued();
        let mut slot = self.lock();
        loop {
            match std::mem::replace(&mut *slot, Slot::Taken) {
                Slot::Ready(r) => return r,
                Slot::Running => {
                    *slot = Slot::Running;
                    slot = self.done.wait(slot).unwrap_or_else(|p| p.into_inner());
                }
                // Unreachable: `run_if_queued` ran, and only `take` (once) empties it.
                Slot::Queued(..) | Slot::Taken => {
                    return Err(LogError::Internal("build log taken twice".into()))
                }
            }
        }
    }
}

/// A log file being created (see the module documentation).
pub struct PendingLog {
    shared: Option<Arc<Shared>>,
    path: Option<PathBuf>,
}

/// The helper's queue; `None` when its thread could not be started.
fn helper() -> Option<&'static Mutex<mpsc::Sender<Arc<Shared>>>> {
    static HELPER: OnceLock<Option<Mutex<mpsc::Sender<Arc<Shared>>>>> = OnceLock::new();
    HELPER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Arc<Shared>>();
            std::thread::Builder::new()
                .name("log-create".into())
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        job.run_if_queued();
                    }
                })
                .ok()
                .map(|_| Mutex::new(tx))
        })
        .as_ref()
}

impl LogSink {
    /// Starts [`LogSink::create`] on a helper thread; see [`PendingLog`].
    pub fn create_in_background(cfg: &LogConfig, drv_base_name: &str) -> PendingLog {
        let shared = Arc::new(Shared {
            slot: Mutex::new(Slot::Queued(cfg.clone(), drv_base_name.to_string())),
            done: Condvar::new(),
        });
        if crate::bench_plain("log-thread") {
            shared.run_if_queued();
        } else if let Some(h) = helper() {
            let tx = h.lock().unwrap_or_else(|p| p.into_inner());
            // If the helper is gone the job stays queued and `wait` runs it.
            let _ = tx.send(Arc::clone(&shared));
        }
        // What `create` will name it (a bad name fails there, and has no path here).
        let path = (cfg.keep && check_name(drv_base_name).is_ok())
            .then(|| log_path(&cfg.log_dir, drv_base_name, cfg.compress));
        PendingLog {
            shared: Some(shared),
            path,
        }
    }
}

impl PendingLog {
    /// The file the sink will write, as [`LogSink::path`] will give it; `None` when logs
    /// are not kept (or the name is invalid, which `wait` reports).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The created sink, or the error creating it.
    pub fn wait(mut self) -> Result<LogSink, LogError> {
        match self.shared.take() {
            Some(s) => s.take(),
            None => Err(LogError::Internal("build log taken twice".into())),
        }
    }
}

impl Drop for PendingLog {
    fn drop(&mut self) {
        if let Some(s) = self.shared.take() {
            if let Ok(sink) = s.take() {
                let _ = sink.finish();
            }
        }
    }
}
