//! Substituting store paths from binary caches into a [`LocalStore`].
//!
//! One path goes in as the original's SubstitutionGoal does it: find the first cache that
//! has it (and whose signature we trust), require its references to be valid already (the
//! closure invariant), lock the path, re-check validity under the lock, remove any stale
//! file at the destination, unpack and verify the NAR, canonicalise its metadata, and
//! register it with the narinfo's references, deriver, signatures and content address.
//!
//! A closure goes in with a small pool of threads: first the narinfos of everything missing
//! are fetched (breadth first, in parallel), then each path is substituted as soon as all its
//! references are valid, so independent paths download and unpack at the same time while no
//! path is ever registered before what it refers to.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use nixb_store::canon::{canonicalise_path_metadata, InodesSeen};
use nixb_store::local_store::{LocalStore, ValidPathInfo};
use nixb_store::locks::PathLocks;
use nixb_store::StorePath;

use crate::cache::{delete_path, BinaryCache, CacheError};
use crate::narinfo::NarInfo;

#[derive(Debug, thiserror::Error)]
pub enum SubstituteError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("no cache has '{path}'{}", if tried.is_empty() { String::new() } else { format!(" ({})", tried.join("; ")) })]
    NoSubstitute { path: String, tried: Vec<String> },
    #[error("cannot substitute '{path}': its reference '{reference}' is not valid (substitute the closure, references first)")]
    IncompleteClosure { path: String, reference: String },
    #[error("store, while substituting '{path}': {reason}")]
    Store { path: String, reason: String },
    #[error("the narinfos of {0} form a reference cycle")]
    Cycle(String),
}

/// How one path came out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Valid before we got to it (perhaps another process substituted it).
    AlreadyValid,
    /// Fetched from the cache with this URL.
    Substituted { cache: String, nar_size: u64 },
}

/// The first cache (in order) that has `path` with an acceptable signature, and its
/// narinfo. Errors of earlier caches are passed over, as Nix tries the next substituter;
/// they are reported only when no cache could provide the path.
pub fn find_info<'c>(
    caches: &'c [BinaryCache],
    path: &StorePath,
) -> Result<(&'c BinaryCache, NarInfo), SubstituteError> {
    let mut tried = Vec::new();
    for cache in caches {
        match cache.query_info(path) {
            Ok(Some(info)) => match cache.check_signatures(&info) {
                Ok(()) => return Ok((cache, info)),
                Err(e) => tried.push(e.to_string()),
            },
            Ok(None) => {}
            Err(e) => tried.push(e.to_string()),
        }
    }
    let printed = caches
        .first()
        .map(|c| c.store_dir().print(path))
        .unwrap_or_else(|| path.to_string());
    Err(SubstituteError::NoSubstitute {
        path: printed,
        tried,
    })
}

fn store_err(
    path: &str,
) -> impl FnOnce(nixb_store::local_store::StoreError) -> SubstituteError + '_ {
    move |e| SubstituteError::Store {
        path: path.to_string(),
        reason: e.to_string(),
    }
}

/// Substitutes one path whose narinfo `cache` gave. Its references must be valid.
pub fn substitute_from(
    store: &LocalStore,
    cache: &BinaryCache,
    info: &NarInfo,
) -> Result<Outcome, SubstituteError> {
    substitute_one(store, cache, info, None)
}

/// Lock files of paths made valid, to delete once a whole closure is done rather than one
/// by one: on ext4 without a journal every inode freed in the last minute or more slows
/// each later creation in its block group (`recently_deleted()` in `fs/ext4/ialloc.c`),
/// so deleting one lock file per path as it goes made a closure quadratic in its paths.
/// Meanwhile each stays an empty, unlocked lock file, an ordinary one to other processes.
#[derive(Default)]
struct StaleLocks(Mutex<Vec<std::path::PathBuf>>);

impl Drop for StaleLocks {
    fn drop(&mut self) {
        let paths = match self.0.get_mut() {
            Ok(v) => std::mem::take(v),
            Err(p) => std::mem::take(p.into_inner()),
        };
        for p in paths {
            // The usual protocol: lock without waiting, mark stale, unlink; a lock another
            // process holds is left to it.
            if let Ok(Some(mut l)) = PathLocks::lock(std::slice::from_ref(&p), false, None) {
                l.set_deletion(true);
            }
        }
    }
}

/// [`substitute_from`]; with `stale`, the lock file of a path that ends up valid is left
/// for `stale` to delete later instead of deleted at once.
fn substitute_one(
    store: &LocalStore,
    cache: &BinaryCache,
    info: &NarInfo,
    stale: Option<&StaleLocks>,
) -> Result<Outcome, SubstituteError> {
    let sd = store.store_dir();
    let path = &info.store_path;
    let printed = sd.print(path);
    let dest = sd.to_path(path);

    // Under the lock no other nixb or Nix process substitutes or builds this path.
    let mut lock = PathLocks::lock(
        std::slice::from_ref(&dest),
        true,
        Some(&format!("waiting for the lock on '{printed}'")),
    )
    .map_err(|e| SubstituteError::Store {
        path: printed.clone(),
        reason: e.to_string(),
    })?
    .ok_or_else(|| SubstituteError::Store {
        path: printed.clone(),
        reason: "could not lock the path".into(),
    })?;
    // Remove the lock file however this ends, so a failed attempt leaves nothing behind
    // in the store directory (the lock is marked stale first, so waiters start over).
    lock.set_deletion(true);
    // A valid path's lock file may wait for `stale` instead.
    let defer = |mut lock: PathLocks| {
        if let Some(s) = stale {
            lock.set_deletion(false);
            match s.0.lock() {
                Ok(mut v) => v.push(dest.clone()),
                Err(p) => p.into_inner().push(dest.clone()),
            }
        }
    };
    if store.is_valid_path(path).map_err(store_err(&printed))? {
        defer(lock);
        return Ok(Outcome::AlreadyValid);
    }
    for r in info.references.iter().filter(|r| *r != path) {
        if !store.is_valid_path(r).map_err(store_err(&printed))? {
            return Err(SubstituteError::IncompleteClosure {
                path: printed,
                reference: sd.print(r),
            });
        }
    }

    // Something at an invalid path's name is left over from an interrupted attempt.
    delete_path(&dest)?;
    let (nar_hash, nar_size) = cache.fetch_into(info, &dest)?;

    let finish = || -> Result<(), SubstituteError> {
        canonicalise_path_metadata(&dest, None, &mut InodesSeen::new()).map_err(|e| {
            SubstituteError::Store {
                path: printed.clone(),
                reason: e.to_string(),
            }
        })?;
        let vpi = ValidPathInfo {
            path: path.clone(),
            nar_hash,
            nar_size,
            deriver: info.deriver.clone(),
            references: info.references.clone(),
            registration_time: 0,
            ultimate: false,
            sigs: info.sigs.clone(),
            ca: info.ca.clone(),
        };
        store
            .register_valid_paths(&[vpi])
            .map_err(store_err(&printed))
    };
    if let Err(e) = finish() {
        // Nothing unregistered may stay behind under a store path's name.
        let _ = delete_path(&dest);
        return Err(e);
    }
    defer(lock);
    Ok(Outcome::Substituted {
        cache: cache.url().to_string(),
        nar_size,
    })
}

/// Substitutes `path` from the first cache that has it. Its references must be valid.
pub fn substitute(
    store: &LocalStore,
    caches: &[BinaryCache],
    path: &StorePath,
) -> Result<Outcome, SubstituteError> {
    if store
        .is_valid_path(path)
        .map_err(store_err(&store.store_dir().print(path)))?
    {
        return Ok(Outcome::AlreadyValid);
    }
    let (cache, info) = find_info(caches, path)?;
    substitute_from(store, cache, &info)
}

/// Runs `f` over `items` on up to `jobs` threads; results in input order.
pub(crate) fn par_map<T: Sync, R: Send>(
    items: &[T],
    jobs: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..jobs.clamp(1, items.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let r = f(item);
                if let Ok(mut g) = results.lock() {
                    g[i] = Some(r);
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_default()
        .into_iter()
        .flatten()
        .collect()
}

/// What [`substitute_closure`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClosureReport {
    /// Paths fetched, in the order they were registered.
    pub substituted: Vec<StorePath>,
    /// Paths of the closure that were valid already.
    pub already_valid: usize,
}

/// Makes `paths` and everything they refer to valid, fetching what is missing from
/// `caches` with up to `jobs` downloads at a time. Stops at the first failure (after the
/// downloads in flight finish); what was registered before stays valid, which keeps the
/// closure invariant since every registered path's references were registered first.
pub fn substitute_closure(
    store: &LocalStore,
    caches: &[BinaryCache],
    paths: &BTreeSet<StorePath>,
    jobs: usize,
) -> Result<ClosureReport, SubstituteError> {
    let sd = store.store_dir();
    let mut report = ClosureReport::default();

    // 1. The missing part of the closure, with one narinfo per path.
    let mut infos: BTreeMap<StorePath, (usize, NarInfo)> = BTreeMap::new();
    let mut seen: BTreeSet<StorePath> = BTreeSet::new();
    let mut frontier: Vec<StorePath> = paths.iter().cloned().collect();
    while !frontier.is_empty() {
        let mut missing = Vec::new();
        for p in frontier.drain(..) {
            if !seen.insert(p.clone()) {
                continue;
            }
            if store.is_valid_path(&p).map_err(store_err(&sd.print(&p)))? {
                report.already_valid += 1;
            } else {
                missing.push(p);
            }
        }
        let found = par_map(&missing, jobs, |p| {
            find_info(caches, p).map(|(c, info)| {
                let idx = caches.iter().position(|x| std::ptr::eq(x, c)).unwrap_or(0);
                (idx, info)
            })
        });
        for r in found {
            let (idx, info) = r?;
            frontier.extend(
                info.references
                    .iter()
                    .filter(|r| !seen.contains(*r))
                    .cloned(),
            );
            infos.insert(info.store_path.clone(), (idx, info));
        }
    }

    // 2. Fetch in dependency order. `waiting[p]` counts p's references not valid yet.
    let mut waiting: BTreeMap<StorePath, usize> = BTreeMap::new();
    let mut dependents: BTreeMap<StorePath, Vec<StorePath>> = BTreeMap::new();
    for (p, (_, info)) in &infos {
        let pending: Vec<&StorePath> = info
            .references
            .iter()
            .filter(|r| *r != p && infos.contains_key(*r))
            .collect();
        waiting.insert(p.clone(), pending.len());
        for r in pending {
            dependents.entry(r.clone()).or_default().push(p.clone());
        }
    }
    let mut ready: VecDeque<StorePath> = waiting
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(p, _)| p.clone())
        .collect();
    let total = infos.len();
    let mut finished = 0usize;
    let mut in_flight = 0usize;
    let mut first_error: Option<SubstituteError> = None;

    // Declared before the threads' scope, so it outlives every job that fills it.
    let stale = StaleLocks::default();
    let (job_tx, job_rx) = mpsc::channel::<StorePath>();
    let job_rx = Arc::new(Mutex::new(job_rx));
    let (done_tx, done_rx) = mpsc::channel::<(StorePath, Result<Outcome, SubstituteError>)>();
    let workers = jobs.clamp(1, total.max(1));
    std::thread::scope(|s| {
        for _ in 0..workers {
            let job_rx = job_rx.clone();
            let done_tx = done_tx.clone();
            let infos = &infos;
            let stale = &stale;
            s.spawn(move || loop {
                let next = match job_rx.lock() {
                    Ok(rx) => rx.recv(),
                    Err(_) => break,
                };
                let Ok(p) = next else { break };
                let res = match infos.get(&p) {
                    Some((idx, info)) => substitute_one(store, &caches[*idx], info, Some(stale)),
                    None => Ok(Outcome::AlreadyValid),
                };
                if done_tx.send((p, res)).is_err() {
                    break;
                }
            });
        }
        drop(done_tx);
        loop {
            // At most one job per worker is queued, so after a failure nothing more starts.
            while first_error.is_none() && in_flight < workers {
                let Some(p) = ready.pop_front() else { break };
                if job_tx.send(p).is_err() {
                    break;
                }
                in_flight += 1;
            }
            if in_flight == 0 {
                break;
            }
            let Ok((p, res)) = done_rx.recv() else { break };
            in_flight -= 1;
            match res {
                Ok(outcome) => {
                    finished += 1;
                    match outcome {
                        Outcome::Substituted { .. } => report.substituted.push(p.clone()),
                        Outcome::AlreadyValid => report.already_valid += 1,
                    }
                    for d in dependents.get(&p).into_iter().flatten() {
                        if let Some(n) = waiting.get_mut(d) {
                            *n -= 1;
                            if *n == 0 {
                                ready.push_back(d.clone());
                            }
                        }
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        // Closing the job channel ends the workers.
        drop(job_tx);
    });
    if let Some(e) = first_error {
        return Err(e);
    }
    if finished < total {
        let stuck: Vec<String> = waiting
            .iter()
            .filter(|(_, n)| **n > 0)
            .take(3)
            .map(|(p, _)| sd.print(p))
            .collect();
        return Err(SubstituteError::Cycle(stuck.join(", ")));
    }
    Ok(report)
}
