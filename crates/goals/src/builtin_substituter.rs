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
//!   (the path lock travels along)          at dest, NarHash/NarSize/FileSize checked,
//!                                          metadata canonicalised
//!                                   <---   Completion::Fetch: hash and size, the lock
//! register (poll loop: every fetch finished
//!   since the last poll, one transaction)
//! ```
//!
//! The loop never waits for a thread: a finished job is queued and one byte is written to
//! a non-blocking pipe whose read side the worker polls with its children's pipes, then
//! drains the queue ([`BuiltinSubstituter::take_completions`]). Queries go before fetches,
//! since each answer may reveal more paths to query (the closure is prefetched breadth
//! first while earlier paths download). Fetches go largest NAR first: the biggest path
//! of a closure is the longest single job, so starting it last would leave one thread
//! working alone at the end while the others idle.
//!
//! Fetched paths are registered by the loop as it drains the queue, all that finished
//! since the last poll in one transaction ([`BuildStore::register_substitutes`]): one
//! commit per path cost the loop more than the rest of a small path's bookkeeping, and
//! the loop falling behind makes the batches larger, not the queue longer. Each path's
//! references were valid before its fetch started (the goal waits for them), so the
//! closure invariant holds inside the batch, and the transaction is atomic, so a crash
//! leaves each path either registered with its references or not at all. If the batch
//! fails, each goal registers its own path and reports its own error.
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

use std::collections::{BinaryHeap, VecDeque};
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
use crate::store::{BuildStore, SubstitutedPath};

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
    /// Registered already, in the batch of [`BuiltinSubstituter::take_completions`].
    pub registered: bool,
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

/// Lock files of paths this run made valid, deleted when the worker finishes instead of
/// as each path is done. A file deleted mid-run slows every later file creation in the
/// store directory: ext4 without a journal makes each inode allocation step over the
/// inodes of its block group freed in the last minute or more (`recently_deleted()` in
/// `fs/ext4/ialloc.c`), so one deleted lock file per path made the run quadratic in
/// paths (BENCHMARKS.md, "goals: lock files of substituted paths deleted at the end").
/// Until then each file stays empty and unlocked, an ordinary lock file to any other
/// process; at the end each is deleted with the usual protocol (locked without waiting,
/// marked stale, unlinked), and one another process holds is left to it.
#[derive(Default)]
pub(crate) struct StaleLockFiles(Vec<PathBuf>);

impl StaleLockFiles {
    /// `path` is the store path (its lock file is `<path>.lock`), locked by the caller
    /// until it drops its [`PathLocks`] without deletion.
    pub fn defer(&mut self, path: PathBuf) {
        self.0.push(path);
    }
}

impl Drop for StaleLockFiles {
    fn drop(&mut self) {
        for p in self.0.drain(..) {
            if let Ok(Some(mut l)) = PathLocks::lock(std::slice::from_ref(&p), false, None) {
                l.set_deletion(true);
            }
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
        /// `dest` is the store path itself (not a repair's temporary beside it), so the
        /// loop may register the path as soon as the fetch completes.
        register: bool,
        lock: PathLocks,
        /// Set when the goal is destroyed: a job not started yet is skipped.
        cancelled: Arc<AtomicBool>,
    },
}

/// A fetch waiting for a thread, ordered by NAR size (then by submission, oldest first).
struct QueuedFetch {
    nar_size: u64,
    /// Submission number, so equal sizes keep their order.
    seq: u64,
    job: Job,
}

impl PartialEq for QueuedFetch {
    fn eq(&self, other: &Self) -> bool {
        (self.nar_size, self.seq) == (other.nar_size, other.seq)
    }
}

impl Eq for QueuedFetch {}

impl PartialOrd for QueuedFetch {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for QueuedFetch {
    /// The max-heap pops the largest NAR first; among equals, the lowest `seq`.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.nar_size
            .cmp(&other.nar_size)
            .then_with(|| other.seq.cmp(&self.seq))
    }
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
    fetches: BinaryHeap<QueuedFetch>,
    fetches_queued: u64,
    /// Finished jobs, each with what the loop needs to register a fetched path.
    done: Vec<(Completion, Option<SubstitutedPath>)>,
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
    /// Lock files of substituted paths, deleted when the worker is done.
    pub stale_locks: StaleLockFiles,
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
            stale_locks: StaleLockFiles::default(),
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
            Job::Fetch { ref info, .. } => {
                let (nar_size, seq) = (info.nar_size, q.fetches_queued);
                q.fetches_queued += 1;
                q.fetches.push(QueuedFetch { nar_size, seq, job });
            }
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
    /// its `lock`; the outcome and the lock come back as a [`Completion::Fetch`]. When
    /// `dest` is the store path itself (`register`), the path is registered before the
    /// completion is handed out if it can be ([`Fetched::registered`]); its references
    /// must be valid. On error the lock is handed back at once.
    #[allow(clippy::too_many_arguments)]
    pub fn fetch(
        &mut self,
        goal: GoalId,
        cache: usize,
        info: NarInfo,
        dest: PathBuf,
        register: bool,
        lock: PathLocks,
        cancelled: Arc<AtomicBool>,
    ) -> Result<(), (String, Option<PathLocks>)> {
        self.push(Job::Fetch {
            goal,
            cache,
            info: Box::new(info),
            dest,
            register,
            lock,
            cancelled,
        })
    }

    /// The jobs finished since the last call (never blocks). The paths fetched among
    /// them are registered in `store` first, in one transaction (see the module doc).
    pub fn take_completions(&mut self, store: &dyn BuildStore) -> Vec<Completion> {
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
        register_batch(store, done)
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
        // Completions no goal took delete what they unpacked, then unlock (none was
        // registered: only take_completions registers).
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
                if let Some(j) = q
                    .queries
                    .pop_front()
                    .or_else(|| q.fetches.pop().map(|f| f.job))
                {
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

fn run_job(shared: &Shared, job: Job) -> Option<(Completion, Option<SubstitutedPath>)> {
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
            Some((Completion::Query { goal, result }, None))
        }
        Job::Fetch {
            goal,
            cache: idx,
            info,
            dest,
            register,
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
            // What the loop registers, if the fetch succeeded: the narinfo's
            // metadata with the hash and size that were checked against it.
            let entry = match &result {
                Ok(f) if register => Some(SubstitutedPath {
                    path: info.store_path.clone(),
                    nar_hash: f.nar_hash.clone(),
                    nar_size: f.nar_size,
                    references: info.references.clone(),
                    deriver: info.deriver.clone(),
                    sigs: info.sigs.clone(),
                    ca: info.ca.clone(),
                }),
                _ => None,
            };
            Some((Completion::Fetch { goal, result, lock }, entry))
        }
    }
}

/// Registers the paths fetched among `done` in one transaction and marks them so; if
/// that fails, none is marked and each goal registers (and reports) its own.
fn register_batch(
    store: &dyn BuildStore,
    done: Vec<(Completion, Option<SubstitutedPath>)>,
) -> Vec<Completion> {
    let batch: Vec<SubstitutedPath> = done.iter().filter_map(|(_, e)| e.clone()).collect();
    let registered = !batch.is_empty() && store.register_substitutes(&batch).is_ok();
    done.into_iter()
        .map(|(mut c, entry)| {
            if let (true, Some(_), Completion::Fetch { result: Ok(f), .. }) =
                (registered, entry, &mut c)
            {
                f.registered = true;
                // Valid now: it must outlive the completion whatever the goal does.
                f.kept = true;
            }
            c
        })
        .collect()
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
        registered: false,
        dest: dest.to_path_buf(),
        kept: false,
    };
    let mut seen = nixb_store::canon::InodesSeen::new();
    nixb_store::canon::canonicalise_path_metadata(dest, None, &mut seen)
        .map_err(|e| format!("canonicalising '{}': {e}", dest.display()))?;
    Ok(fetched)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeSet;

    use nixb_store::derivation::Derivation;
    use nixb_store::HashAlgo;

    use crate::store::{NewOutput, PathInfo, StoreFault};

    fn sp(name: &str) -> StorePath {
        StorePath::from_base_name(&format!("0123456789abcdfghijklmnpqrsvwxyz-{name}")).unwrap()
    }

    fn query_job(n: usize) -> Job {
        Job::Query {
            goal: GoalId(n),
            cache: 0,
            path: sp("q"),
        }
    }

    #[test]
    fn fetches_go_largest_nar_first_and_equal_sizes_in_submission_order() {
        let mut heap = BinaryHeap::new();
        for (seq, (goal, nar_size)) in [(0, 10), (1, 5000), (2, 10), (3, 70), (4, 5000)]
            .into_iter()
            .enumerate()
        {
            heap.push(QueuedFetch {
                nar_size,
                seq: seq as u64,
                job: query_job(goal),
            });
        }
        let order: Vec<usize> = std::iter::from_fn(|| heap.pop())
            .map(|f| match f.job {
                Job::Query { goal, .. } | Job::Fetch { goal, .. } => goal.0,
            })
            .collect();
        assert_eq!(order, [1, 4, 3, 0, 2]);
    }

    /// Records the batches it is asked to register; fails them when `fail` is set.
    struct RecordingStore {
        dir: StoreDir,
        fail: bool,
        batches: RefCell<Vec<Vec<StorePath>>>,
    }

    fn unused<T>() -> Result<T, StoreFault> {
        Err(StoreFault("not used by this test".into()))
    }

    impl BuildStore for RecordingStore {
        fn store_dir(&self) -> &StoreDir {
            &self.dir
        }
        fn is_valid_path(&self, _: &StorePath) -> Result<bool, StoreFault> {
            unused()
        }
        fn query_path_info(&self, _: &StorePath) -> Result<Option<PathInfo>, StoreFault> {
            unused()
        }
        fn query_references(&self, _: &StorePath) -> Result<BTreeSet<StorePath>, StoreFault> {
            unused()
        }
        fn compute_closure(
            &self,
            _: &BTreeSet<StorePath>,
        ) -> Result<BTreeSet<StorePath>, StoreFault> {
            unused()
        }
        fn read_derivation(&self, _: &StorePath) -> Result<Derivation, StoreFault> {
            unused()
        }
        fn register_outputs(&self, _: &[NewOutput]) -> Result<(), StoreFault> {
            unused()
        }
        fn has_path_failed(&self, _: &StorePath) -> Result<bool, StoreFault> {
            unused()
        }
        fn register_failed_path(&self, _: &StorePath) -> Result<(), StoreFault> {
            unused()
        }
        fn add_temp_root(&self, _: &StorePath) -> Result<(), StoreFault> {
            unused()
        }
        fn register_substitutes(&self, infos: &[SubstitutedPath]) -> Result<(), StoreFault> {
            self.batches
                .borrow_mut()
                .push(infos.iter().map(|i| i.path.clone()).collect());
            if self.fail {
                return Err(StoreFault("disk full".into()));
            }
            Ok(())
        }
    }

    /// A fetch of `name` that unpacked a file at `dir/name`, with its lock and what the
    /// loop would register.
    fn fetched(dir: &Path, goal: usize, name: &str) -> (Completion, Option<SubstitutedPath>) {
        let dest = dir.join(name);
        std::fs::write(&dest, name).unwrap();
        let lock = PathLocks::lock(std::slice::from_ref(&dest), false, None)
            .unwrap()
            .unwrap();
        let hash = Hash::parse_typed(&format!("sha256:{}", "0".repeat(52))).unwrap();
        assert_eq!(hash.algo(), HashAlgo::Sha256);
        let entry = SubstitutedPath {
            path: sp(name),
            nar_hash: hash.clone(),
            nar_size: 1,
            references: BTreeSet::new(),
            deriver: None,
            sigs: vec![],
            ca: None,
        };
        let result = Ok(Fetched {
            nar_hash: hash,
            nar_size: 1,
            registered: false,
            dest,
            kept: false,
        });
        (
            Completion::Fetch {
                goal: GoalId(goal),
                result,
                lock,
            },
            Some(entry),
        )
    }

    fn registered_flags(done: &[Completion]) -> Vec<Option<bool>> {
        done.iter()
            .map(|c| match c {
                Completion::Fetch { result: Ok(f), .. } => Some(f.registered),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn fetched_paths_are_registered_in_one_batch_and_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let store = RecordingStore {
            dir: StoreDir::new("/nix/store").unwrap(),
            fail: false,
            batches: RefCell::new(vec![]),
        };
        let failed = Completion::Fetch {
            goal: GoalId(2),
            result: Err("corrupt".into()),
            lock: PathLocks::lock(&[tmp.path().join("c")], false, None)
                .unwrap()
                .unwrap(),
        };
        let done = vec![
            fetched(tmp.path(), 0, "a"),
            (
                Completion::Query {
                    goal: GoalId(1),
                    result: Ok(None),
                },
                None,
            ),
            (failed, None),
            fetched(tmp.path(), 3, "b"),
        ];
        let out = register_batch(&store, done);
        assert_eq!(*store.batches.borrow(), vec![vec![sp("a"), sp("b")]]);
        assert_eq!(registered_flags(&out), [Some(true), None, None, Some(true)]);
        drop(out);
        // Registered paths outlive their completions even when no goal takes them.
        assert!(tmp.path().join("a").exists() && tmp.path().join("b").exists());
    }

    #[test]
    fn a_failed_batch_leaves_registration_to_each_goal() {
        let tmp = tempfile::tempdir().unwrap();
        let store = RecordingStore {
            dir: StoreDir::new("/nix/store").unwrap(),
            fail: true,
            batches: RefCell::new(vec![]),
        };
        let done = vec![fetched(tmp.path(), 0, "a"), fetched(tmp.path(), 1, "b")];
        let out = register_batch(&store, done);
        assert_eq!(store.batches.borrow().len(), 1);
        assert_eq!(registered_flags(&out), [Some(false), Some(false)]);
        drop(out);
        // Unregistered and untaken: deleted, as before batching.
        assert!(!tmp.path().join("a").exists() && !tmp.path().join("b").exists());
    }

    #[test]
    fn stale_lock_files_are_deleted_at_the_end_unless_someone_holds_them() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        let lock_file = |p: &Path| {
            let mut l = p.as_os_str().to_owned();
            l.push(".lock");
            PathBuf::from(l)
        };
        let mut stale = StaleLockFiles::default();
        for p in [&a, &b] {
            // Locked and released without deletion, as a goal does once the path is valid.
            drop(PathLocks::lock(std::slice::from_ref(p), false, None).unwrap());
            stale.defer(p.clone());
            assert!(lock_file(p).exists(), "kept until the end");
        }
        // Someone else holds b's lock (flock conflicts between open files, even in one
        // process).
        let other = PathLocks::lock(std::slice::from_ref(&b), false, None)
            .unwrap()
            .unwrap();
        drop(stale);
        assert!(!lock_file(&a).exists(), "deleted");
        assert!(lock_file(&b).exists(), "left to its holder");
        drop(other);
    }

    #[test]
    fn nothing_fetched_means_no_transaction() {
        let store = RecordingStore {
            dir: StoreDir::new("/nix/store").unwrap(),
            fail: false,
            batches: RefCell::new(vec![]),
        };
        let done = vec![(
            Completion::Query {
                goal: GoalId(0),
                result: Ok(None),
            },
            None,
        )];
        assert_eq!(register_batch(&store, done).len(), 1);
        assert!(store.batches.borrow().is_empty());
    }
}
