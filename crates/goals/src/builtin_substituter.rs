//! The built-in substituter: the binary caches of `substituters` (`file://`, `http(s)://`)
//! read in-process by a small pool of threads, instead of one `nixb substitute` child per
//! path (a process start, settings, a cache open and a second hashing pass each).
//!
//! ```text
//! substitution goal (poll loop)            pool thread
//! query(goal, cache, path)          --->   open the cache (once per run), fetch the
//!                                          narinfo, check its signatures
//!                                   <---   Completion::Query: offered / not / error
//! lock, re-check validity,
//! fetch(goal, cache, narinfo, dest) --->   stream the NAR: decompress, hash and restore
//!   (the path lock travels along)          at dest, NarHash/NarSize/FileHash checked,
//!                                          metadata canonicalised
//!                                   <---   Completion::Fetch: hash and size, the lock
//! register (poll loop)
//! ```
//!
//! The loop never waits for a thread: a finished job is queued and one byte is written to
//! a non-blocking pipe whose read side the worker polls with its children's pipes, then
//! drains the queue ([`BuiltinSubstituter::take_completions`]). Queries go before fetches,
//! since each answer may reveal more paths to query (the closure is prefetched breadth
//! first while earlier paths download).
//!
//! The path lock of a fetch is held by the job, not by the goal, for as long as a thread
//! writes at the destination: a goal destroyed meanwhile (a failure elsewhere without
//! keep-going) must not let another process lock the path and find it half written. What a
//! thread unpacked for a goal that is gone is deleted before its lock is released
//! ([`Fetched`] deletes its destination unless the goal keeps it).
//!
//! Threads are not killed: a fetch runs to its end or to the cache's own timeouts.
//! `max-silent-time`, which for a substituter process means "no output for that long",
//! becomes the longest wait for any single read from the cache (when shorter than the
//! cache's own read timeout): a stalled cache fails the attempt, retries included, and
//! the goal moves on to the next substituter or `--fallback`. `timeout` (a bound on the
//! whole run of a process) has no equivalent for a thread, and a slow but live download
//! is not cut short. Dropping the pool discards queued jobs and waits for the ones in
//! flight.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nixb_binarycache::{BinaryCache, CacheOptions, NarInfo};
use nixb_store::locks::PathLocks;
use nixb_store::{Hash, StoreDir, StorePath};

use crate::config::{Substituter, WorkerConfig};
use crate::graph::GoalId;

/// What a query found: the narinfo of a path the cache offers with an acceptable
/// signature, `None` when it does not have it, or a message to warn with (the cache could
/// not be read, or its narinfo was refused) before the next substituter is asked.
pub(crate) type QueryResult = Result<Option<Box<NarInfo>>, String>;

/// What a thread unpacked at `dest`: deleted when dropped unless [`Fetched::keep`] was
/// called, so that nothing unregistered stays under a store path's name.
pub(crate) struct Fetched {
    /// sha256 NAR hash, computed while the NAR streamed in and checked against the narinfo.
    pub nar_hash: Hash,
    pub nar_size: u64,
    dest: PathBuf,
    kept: bool,
}

impl Fetched {
    /// The goal registered the path (or moved it into place): leave it.
    pub fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Fetched {
    fn drop(&mut self) {
        if !self.kept {
            let _ = crate::build_dir::delete_path(&self.dest);
        }
    }
}

/// A finished job, for the goal that asked.
pub(crate) enum Completion {
    Query {
        goal: GoalId,
        result: QueryResult,
    },
    Fetch {
        goal: GoalId,
        // Declared before `lock`, so that an abandoned destination is deleted while the
        // path is still locked (fields drop in order).
        result: Result<Fetched, String>,
        lock: PathLocks,
    },
}

impl Completion {
    pub fn goal(&self) -> GoalId {
        match self {
            Completion::Query { goal, .. } | Completion::Fetch { goal, .. } => *goal,
        }
    }
}

enum Job {
    Query {
        goal: GoalId,
        cache: usize,
        path: StorePath,
    },
    Fetch {
        goal: GoalId,
        cache: usize,
        info: Box<NarInfo>,
        dest: PathBuf,
        lock: PathLocks,
        /// Set when the goal is destroyed: a job not started yet is skipped.
        cancelled: Arc<AtomicBool>,
    },
}

/// One `substituters` entry that is a binary cache, opened by the first thread that needs
/// it. An entry that cannot be opened is reported once and then offers nothing.
struct CacheSlot {
    url: String,
    cache: OnceLock<Result<BinaryCache, String>>,
    open_failure_reported: AtomicBool,
}

#[derive(Default)]
struct Queues {
    queries: VecDeque<Job>,
    fetches: VecDeque<Job>,
    done: Vec<Completion>,
    stop: bool,
}

struct Shared {
    queues: Mutex<Queues>,
    work: Condvar,
    /// Write side of the wake-up pipe (non-blocking: a full pipe already wakes the loop).
    wake: OwnedFd,
    store_dir: StoreDir,
    opts: CacheOptions,
    /// By index into `substituters`; `None` for external programs.
    caches: Vec<Option<CacheSlot>>,
}

struct Running {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    /// Read side of the wake-up pipe (non-blocking).
    wake: OwnedFd,
}

/// The pool, owned by the worker. Threads and the pipe are made with the first job, so a
/// run that substitutes nothing from caches costs nothing.
pub(crate) struct BuiltinSubstituter {
    store_dir: StoreDir,
    opts: CacheOptions,
    urls: Vec<Option<String>>,
    jobs: usize,
    running: Option<Running>,
    /// Jobs submitted whose completion has not been taken yet.
    outstanding: usize,
}

impl BuiltinSubstituter {
    pub fn new(cfg: &WorkerConfig, store_dir: StoreDir) -> BuiltinSubstituter {
        let mut opts = cfg.cache_options.clone();
        if let Some(silent) = cfg.max_silent_time.filter(|d| !d.is_zero()) {
            opts.read_timeout = opts.read_timeout.min(silent);
        }
        BuiltinSubstituter {
            store_dir,
            opts,
            urls: cfg
                .substituters
                .iter()
                .map(|s| match s {
                    Substituter::BinaryCache { url } => Some(url.clone()),
                    Substituter::External(_) => None,
                })
                .collect(),
            jobs: cfg.substitution_jobs.max(1),
            running: None,
            outstanding: 0,
        }
    }

    /// True while some job's completion has not been taken: the worker must keep polling.
    pub fn busy(&self) -> bool {
        self.outstanding > 0
    }

    /// The descriptor that becomes readable when a job finishes, while [`Self::busy`].
    pub fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.running {
            Some(r) if self.outstanding > 0 => Some(r.wake.as_fd()),
            _ => None,
        }
    }

    fn start(&mut self) -> Result<&Running, String> {
        if self.running.is_none() {
            let (read, write) = crate::external::log_pipe()
                .map_err(|e| format!("built-in substituter: creating its pipe: {e}"))?;
            fcntl(write.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
                .map_err(|e| format!("built-in substituter: configuring its pipe: {e}"))?;
            let shared = Arc::new(Shared {
                queues: Mutex::new(Queues::default()),
                work: Condvar::new(),
                wake: write,
                store_dir: self.store_dir.clone(),
                opts: self.opts.clone(),
                caches: self
                    .urls
                    .iter()
                    .map(|u| {
                        u.as_ref().map(|url| CacheSlot {
                            url: url.clone(),
                            cache: OnceLock::new(),
                            open_failure_reported: AtomicBool::new(false),
                        })
                    })
                    .collect(),
            });
            let mut running = Running {
                shared,
                threads: Vec::new(),
                wake: read,
            };
            for n in 0..self.jobs {
                let shared = running.shared.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("substituter-{n}"))
                    .spawn(move || thread_main(&shared));
                match spawned {
                    Ok(h) => running.threads.push(h),
                    // Fewer threads than asked still work; none at all does not.
                    Err(e) if running.threads.is_empty() => {
                        return Err(format!("built-in substituter: starting a thread: {e}"))
                    }
                    Err(_) => break,
                }
            }
            self.running = Some(running);
        }
        self.running
            .as_ref()
            .ok_or_else(|| "built-in substituter: not running".to_string())
    }

    fn push(&mut self, job: Job) -> Result<(), (String, Option<PathLocks>)> {
        let running = match self.start() {
            Ok(r) => r,
            Err(e) => {
                let lock = match job {
                    Job::Fetch { lock, .. } => Some(lock),
                    Job::Query { .. } => None,
                };
                return Err((e, lock));
            }
        };
        let shared = running.shared.clone();
        let mut q = match shared.queues.lock() {
            Ok(q) => q,
            Err(p) => p.into_inner(),
        };
        match job {
            Job::Query { .. } => q.queries.push_back(job),
            Job::Fetch { .. } => q.fetches.push_back(job),
        }
        drop(q);
        shared.work.notify_one();
        self.outstanding += 1;
        Ok(())
    }

    /// Asks the cache at `substituters[cache]` about `path`; the answer comes as a
    /// [`Completion::Query`] for `goal`.
    pub fn query(&mut self, goal: GoalId, cache: usize, path: StorePath) -> Result<(), String> {
        self.push(Job::Query { goal, cache, path })
            .map_err(|(e, _)| e)
    }

    /// Fetches the path `info` describes into `dest` (which must not exist) while holding
    /// its `lock`; the outcome and the lock come back as a [`Completion::Fetch`]. On error
    /// the lock is handed back at once.
    pub fn fetch(
        &mut self,
        goal: GoalId,
        cache: usize,
        info: NarInfo,
        dest: PathBuf,
        lock: PathLocks,
        cancelled: Arc<AtomicBool>,
    ) -> Result<(), (String, Option<PathLocks>)> {
        self.push(Job::Fetch {
            goal,
            cache,
            info: Box::new(info),
            dest,
            lock,
            cancelled,
        })
    }

    /// The jobs finished since the last call (never blocks).
    pub fn take_completions(&mut self) -> Vec<Completion> {
        let Some(r) = &self.running else {
            return Vec::new();
        };
        // Empty the pipe first: a completion queued after this still finds its byte there
        // for the next poll, so none is missed (threads queue before they write).
        let mut buf = [0u8; 256];
        loop {
            match nix::unistd::read(r.wake.as_raw_fd(), &mut buf) {
                Ok(n) if n == buf.len() => {}
                Err(Errno::EINTR) => {}
                _ => break,
            }
        }
        let done = match r.shared.queues.lock() {
            Ok(mut q) => std::mem::take(&mut q.done),
            Err(p) => std::mem::take(&mut p.into_inner().done),
        };
        self.outstanding = self.outstanding.saturating_sub(done.len());
        done
    }
}

impl Drop for BuiltinSubstituter {
    fn drop(&mut self) {
        let Some(r) = self.running.take() else {
            return;
        };
        let queued = {
            let mut q = match r.shared.queues.lock() {
                Ok(q) => q,
                Err(p) => p.into_inner(),
            };
            q.stop = true;
            // Dropped below, outside the mutex: queued fetches release their locks
            // (nothing was written for them yet).
            (
                std::mem::take(&mut q.queries),
                std::mem::take(&mut q.fetches),
            )
        };
        drop(queued);
        r.shared.work.notify_all();
        for t in r.threads {
            let _ = t.join();
        }
        // Completions no goal took delete what they unpacked, then unlock.
        let left = match r.shared.queues.lock() {
            Ok(mut q) => std::mem::take(&mut q.done),
            Err(_) => Vec::new(),
        };
        drop(left);
    }
}

fn thread_main(shared: &Shared) {
    loop {
        let job = {
            let mut q = match shared.queues.lock() {
                Ok(q) => q,
                Err(_) => return,
            };
            loop {
                if q.stop {
                    return;
                }
                if let Some(j) = q.queries.pop_front().or_else(|| q.fetches.pop_front()) {
                    break j;
                }
                q = match shared.work.wait(q) {
                    Ok(q) => q,
                    Err(_) => return,
                };
            }
        };
        let Some(done) = run_job(shared, job) else {
            continue;
        };
        match shared.queues.lock() {
            Ok(mut q) => q.done.push(done),
            Err(_) => return,
        }
        // EAGAIN: the pipe is full, so the loop is woken anyway.
        let _ = nix::unistd::write(shared.wake.as_fd(), b"x");
    }
}

/// The open cache of `substituters[idx]`, or why there is none (`Ok(None)`: it failed to
/// open and that was reported already).
fn cache(shared: &Shared, idx: usize) -> Result<Option<&BinaryCache>, String> {
    let Some(Some(slot)) = shared.caches.get(idx) else {
        return Err(format!(
            "internal error: substituter {idx} is not a binary cache"
        ));
    };
    let opened = slot.cache.get_or_init(|| {
        BinaryCache::open(&slot.url, &shared.store_dir, shared.opts.clone())
            .map_err(|e| e.to_string())
    });
    match opened {
        Ok(c) => Ok(Some(c)),
        Err(e) => {
            if slot.open_failure_reported.swap(true, Ordering::SeqCst) {
                Ok(None)
            } else {
                Err(format!("substituter '{}' cannot be used: {e}", slot.url))
            }
        }
    }
}

fn run_job(shared: &Shared, job: Job) -> Option<Completion> {
    match job {
        Job::Query {
            goal,
            cache: idx,
            path,
        } => {
            let result = cache(shared, idx).and_then(|c| match c {
                None => Ok(None),
                Some(c) => query(c, &path),
            });
            Some(Completion::Query { goal, result })
        }
        Job::Fetch {
            goal,
            cache: idx,
            info,
            dest,
            lock,
            cancelled,
        } => {
            if cancelled.load(Ordering::SeqCst) {
                // The goal is gone; dropping the lock releases the path untouched.
                return None;
            }
            let result = match cache(shared, idx) {
                Ok(Some(c)) => fetch(c, &info, &dest),
                Ok(None) => Err(format!(
                    "substituter '{}' cannot be used",
                    shared.caches[idx].as_ref().map_or("", |s| s.url.as_str())
                )),
                Err(e) => Err(e),
            };
            Some(Completion::Fetch { goal, result, lock })
        }
    }
}

/// The narinfo of `path` if `cache` has it signed as we require.
fn query(cache: &BinaryCache, path: &StorePath) -> QueryResult {
    let Some(info) = cache.query_info(path).map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    // Refused before anything is downloaded, as Nix does ("ignoring substitute ...").
    cache.check_signatures(&info).map_err(|e| e.to_string())?;
    Ok(Some(Box::new(info)))
}

/// Streams the NAR of `info` into `dest` and canonicalises it there. Canonicalising here
/// rather than in the loop keeps a large tree's thousands of chmod/utimes calls off the
/// loop's thread; the result is the same, since nothing else touches the locked path.
fn fetch(cache: &BinaryCache, info: &NarInfo, dest: &Path) -> Result<Fetched, String> {
    let (nar_hash, nar_size) = cache.fetch_into(info, dest).map_err(|e| e.to_string())?;
    let fetched = Fetched {
        nar_hash,
        nar_size,
        dest: dest.to_path_buf(),
        kept: false,
    };
    let mut seen = nixb_store::canon::InodesSeen::new();
    nixb_store::canon::canonicalise_path_metadata(dest, None, &mut seen)
        .map_err(|e| format!("canonicalising '{}': {e}", dest.display()))?;
    Ok(fetched)
}
