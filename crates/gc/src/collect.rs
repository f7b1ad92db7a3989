//! One collection: Nix 2.8's `collectGarbage`, on an in-memory graph.
//!
//! 1. Take `gc.lock` exclusively and start the `gc-socket` server ([`crate::server`]);
//!    from then on permanent roots cannot be added and temporary roots arrive there.
//! 2. Read the database into a [`Graph`], find the roots ([`crate::roots`]), and mark
//!    everything reachable from them over liveness edges. What is left is dead: the
//!    same set as Nix's per-path referrer walks, computed in one pass.
//! 3. Delete dead paths in batches, referrers before their references: under the shared
//!    state's lock, drop from the batch whatever a client has made a temporary root since
//!    (with its closure) and mark the rest pending; delete the batch's database rows in
//!    one transaction (a statement for the whole batch); then its files, on a second
//!    thread while the next batch's rows go; then clear its paths from pending. The
//!    database row always goes before the files, and a row only after every row referring
//!    to it (SQLite's foreign keys refuse anything else), so a kill at any instant leaves
//!    every valid path present and its closure valid; what is left on disk without a row
//!    is removed by the next run. When at least half the store is dead (and the rest is
//!    not large), every dead row goes in one transaction that keeps the rest instead (see
//!    `delete_all_dead`), then the files, batch by batch on the second thread.
//! 4. Remove store entries that are not valid (and are no temporary root), then unused
//!    entries of `.links`.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use nixb_store::local_store::LocalStore;
use nixb_store::locks::{lock_file, open_lock_file, LockType};
use nixb_store::{StoreDir, StorePath};

use crate::delete::{delete_path, delete_store_entry, prune_links};
use crate::graph::{EdgeKinds, Graph, Node};
use crate::roots::{find_roots_no_temp, find_temp_roots, RootDirs};
use crate::server::{RootsServer, SharedRoots};
use crate::GcError;

/// The page cache of a collection that deletes every dead row at once, in KiB.
const AT_ONCE_CACHE_KIB: u32 = 8 * 1024;

/// The most rows a collection keeps while deleting every dead row at once: the kept rows
/// are copied to temporary tables in memory (a few hundred bytes a row), so past this many
/// the batches, whose memory does not grow with what is kept, go instead.
const AT_ONCE_MAX_KEPT: usize = 200_000;

/// SQLite's page cache while deleting rows, in KiB, for a store of `paths` valid paths: as
/// much as 128 MiB (every batch touches index pages all over the file, and what the cache
/// cannot hold is written to the log again), less on stores whose graph is large, so that
/// graph and cache together stay within about 150 MiB (the graph takes about 110 bytes a
/// path); at least 16 MiB.
fn gc_cache_kib(paths: usize) -> u32 {
    const BUDGET_KIB: u64 = 150 * 1024;
    let graph_kib = (paths as u64).saturating_mul(110) / 1024;
    BUDGET_KIB
        .saturating_sub(graph_kib)
        .clamp(16 * 1024, 128 * 1024) as u32
}

/// What a collection does (Nix's `GCOptions::GCAction`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GcAction {
    /// List the live paths, delete nothing.
    ReturnLive,
    /// List the dead paths, delete nothing.
    ReturnDead,
    /// Delete every dead path.
    DeleteDead,
    /// Delete these paths, which must be dead and not referred to by anything else.
    DeleteSpecific(BTreeSet<StorePath>),
}

/// How to collect.
#[derive(Clone, Debug)]
pub struct GcOptions {
    pub action: GcAction,
    /// Do not look for roots other than temporary ones (`--ignore-liveness`).
    pub ignore_liveness: bool,
    /// Stop once more than this many bytes have been freed (0: delete nothing).
    pub max_freed: u64,
    /// `keep-outputs`: a live derivation keeps its outputs alive.
    pub keep_outputs: bool,
    /// `keep-derivations`: a live path keeps its deriver alive.
    pub keep_derivations: bool,
    /// Paths whose rows are deleted in one transaction; 0 (the default) chooses by the
    /// number of dead paths (see [`auto_batch_size`]).
    pub batch_size: usize,
    /// Collect the listed or deleted paths in [`GcResults::paths`] (they are reported as
    /// events either way; a caller that prints them as they come can save the memory).
    pub keep_paths: bool,
}

impl GcOptions {
    pub fn new(action: GcAction) -> GcOptions {
        GcOptions {
            action,
            ignore_liveness: false,
            max_freed: u64::MAX,
            keep_outputs: false,
            keep_derivations: true,
            batch_size: 0,
            keep_paths: true,
        }
    }
}

/// What a collection found or did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcResults {
    /// Listed paths (live or dead) or, when deleting, the deleted ones (absolute); empty
    /// unless [`GcOptions::keep_paths`].
    pub paths: BTreeSet<String>,
    /// How many paths were listed or deleted.
    pub count: u64,
    pub bytes_freed: u64,
    /// Entries removed from `<store>/.links`.
    pub links_pruned: u64,
}

/// What the collector reports as it goes; the caller renders it.
#[derive(Debug)]
pub enum GcEvent<'a> {
    /// `gc.lock` is held by another collector; waiting for it.
    WaitingForLock,
    FindingRoots,
    /// A live or dead path, with `ReturnLive`/`ReturnDead`, in sorted order.
    Listed {
        path: &'a str,
    },
    /// The graph is read and liveness computed: `dead` of `valid` paths are garbage.
    Determined {
        valid: usize,
        dead: usize,
    },
    /// A path was deleted; `done` of `total` so far.
    Deleted {
        path: &'a str,
        done: usize,
        total: usize,
        bytes_freed: u64,
    },
    /// More than `max_freed` bytes were freed.
    LimitReached {
        max_freed: u64,
    },
    PruningLinks,
    /// A dead path that a row still refers to (a path registered during the collection)
    /// is kept, with its closure.
    KeptInUse {
        path: &'a str,
    },
}

/// Runs one collection on `store`.
pub fn collect_garbage(
    store: &LocalStore,
    opts: &GcOptions,
    events: &mut dyn FnMut(GcEvent<'_>),
) -> Result<GcResults, GcError> {
    let config = store.config();
    let store_dir = config.store_dir.clone();
    let mut kinds = EdgeKinds {
        outputs: opts.keep_outputs,
        derivers: opts.keep_derivations,
    };
    // As in Nix: deleting specific paths while ignoring liveness must not reach out to
    // outputs or derivers of what is deleted.
    if matches!(opts.action, GcAction::DeleteSpecific(_)) && opts.ignore_liveness {
        kinds = EdgeKinds::default();
    }

    let lock_path = config.state_dir.join("gc.lock");
    let gc_lock = open_lock_file(&lock_path, true)?.ok_or_else(|| GcError::Io {
        step: "opening",
        path: lock_path.clone(),
        source: std::io::ErrorKind::NotFound.into(),
    })?;
    if !lock_file(&gc_lock, LockType::Write, false)? {
        events(GcEvent::WaitingForLock);
        lock_file(&gc_lock, LockType::Write, true)?;
    }
    let shared = Arc::new(SharedRoots::default());
    let server = RootsServer::start(&config.state_dir, store_dir.clone(), shared.clone())?;

    let result = collect_locked(store, &store_dir, opts, kinds, &shared, events);

    // Stop taking roots before the lock goes, as Nix does: a client then finds the socket
    // refusing and takes the lock shared.
    drop(server);
    let _ = lock_file(&gc_lock, LockType::None, false);
    result
}

/// An entry of the store directory that is not a valid path.
struct Stray {
    name: String,
    /// Its hash part when the name parses as a store path.
    hash: Option<String>,
}

fn collect_locked(
    store: &LocalStore,
    store_dir: &StoreDir,
    opts: &GcOptions,
    kinds: EdgeKinds,
    shared: &SharedRoots,
    events: &mut dyn FnMut(GcEvent<'_>),
) -> Result<GcResults, GcError> {
    let config = store.config();
    events(GcEvent::FindingRoots);
    let mut phase = Phase::start();
    // The store directory is listed on a second thread while the graph is read. Listing
    // it first rather than last can only leave out a path that appears meanwhile, which
    // is then not a candidate for deletion at all (valid paths come from the graph).
    let list_path = store_dir.as_path().to_path_buf();
    let listing = std::thread::spawn(move || list_directory(&list_path));
    let graph = Graph::load(store, kinds)?;
    let n = graph.len();
    phase.done("reading the reference graph");
    let dirs = RootDirs::new(store_dir.clone(), config.state_dir.clone());
    let mut is_valid = |p: &StorePath| Ok(graph.lookup(p.base_name()).is_some());
    let roots = if opts.ignore_liveness {
        Default::default()
    } else {
        find_roots_no_temp(&dirs, true, &mut is_valid)?
    };
    let temp_roots = find_temp_roots(&dirs, true)?;
    phase.done("finding roots");

    let mut alive = vec![false; n];
    let mut start: Vec<Node> = roots
        .keys()
        .filter_map(|p| graph.lookup(p.base_name()))
        .collect();
    {
        let mut s = shared.lock();
        for p in temp_roots.keys() {
            s.temp_roots.insert(p.hash_part().to_string());
        }
        s.new_roots.clear();
        start.extend(s.temp_roots.iter().filter_map(|h| graph.lookup_hash(h)));
    }
    graph.mark_closure(start, kinds, &mut alive);
    phase.done("marking live paths");

    // The store directory, minus what the graph already knows.
    let mut strays = Vec::new();
    // With a limit on the bytes freed, which paths go depends on the order: Nix 2.8's is
    // the store directory's.
    let nix_order = opts.max_freed != u64::MAX && matches!(opts.action, GcAction::DeleteDead);
    let mut dir_order: Vec<Entry> = Vec::new();
    let store_path = store_dir.as_path();
    let entries = listing.join().map_err(|_| GcError::Corrupt {
        what: "the thread listing the store directory panicked".into(),
    })??;
    for name in entries {
        if name == ".links" {
            continue;
        }
        if let Some(v) = graph.lookup(&name) {
            if nix_order {
                dir_order.push(Entry::Valid(v));
            }
            continue;
        }
        if nix_order {
            dir_order.push(Entry::Stray(strays.len()));
        }
        let hash = StorePath::from_base_name(&name)
            .ok()
            .map(|p| p.hash_part().to_string());
        strays.push(Stray { name, hash });
    }
    phase.done("reading the store directory");

    let mut results = GcResults::default();
    let print = |name: &str| format!("{}/{name}", store_dir.as_str());
    let stray_is_temp_root = |s: &Stray| {
        s.hash
            .as_ref()
            .is_some_and(|h| shared.lock().temp_roots.contains(h))
    };

    // Which valid paths are dead, and for DeleteSpecific which paths were asked for.
    let mut dead: Vec<bool> = alive.iter().map(|a| !a).collect();
    let mut refused: Vec<String> = Vec::new();
    let mut specific_strays: Option<BTreeSet<String>> = None;
    if let GcAction::DeleteSpecific(paths) = &opts.action {
        let mut wanted = vec![false; n];
        let mut wanted_names = BTreeSet::new();
        for p in paths {
            match graph.lookup(p.base_name()) {
                Some(v) => wanted[v as usize] = true,
                None => {
                    wanted_names.insert(p.base_name().to_string());
                }
            }
        }
        // Whatever is not to be deleted keeps what it reaches.
        let mut kept = alive.clone();
        let outside: Vec<Node> = (0..n as Node).filter(|v| !wanted[*v as usize]).collect();
        graph.mark_closure(outside, kinds, &mut kept);
        for v in 0..n {
            dead[v] = wanted[v] && !kept[v];
            if wanted[v] && kept[v] {
                refused.push(print(graph.name(v as Node)));
            }
        }
        for s in &strays {
            if wanted_names.contains(&s.name) && stray_is_temp_root(s) {
                refused.push(print(&s.name));
            }
        }
        specific_strays = Some(wanted_names);
    }
    let dead_count = dead.iter().filter(|d| **d).count();
    events(GcEvent::Determined {
        valid: n,
        dead: dead_count,
    });

    if opts.max_freed == 0 {
        return Ok(results);
    }
    let listing = match &opts.action {
        GcAction::ReturnLive => Some(true),
        GcAction::ReturnDead => Some(false),
        GcAction::DeleteDead | GcAction::DeleteSpecific(_) => None,
    };
    if let Some(live) = listing {
        // Names only (no printed copies) until each is handed out, in sorted order: on a
        // store of a million paths a set of printed paths would outweigh the graph.
        let mut names: Vec<&str> = (0..n)
            .filter(|v| if live { alive[*v] } else { dead[*v] })
            .map(|v| graph.name(v as Node))
            .collect();
        names.extend(
            strays
                .iter()
                .filter(|s| stray_is_temp_root(s) == live)
                .map(|s| s.name.as_str()),
        );
        names.sort_unstable();
        phase.done("sorting the listing");
        for name in names {
            let printed = print(name);
            events(GcEvent::Listed { path: &printed });
            results.count += 1;
            if opts.keep_paths {
                results.paths.insert(printed);
            }
        }
        phase.done("printing the listing");
        return Ok(results);
    }

    // Each batch rewrites index pages all over the file; with SQLite's default 2 MiB
    // cache they spill into the log and are written again (most of the time of a full
    // collection, before this).
    // Deleting a batch's rows in one statement writes a statement journal as it goes
    // (a temporary file on disk by default, costing as much as the deletion itself).
    // Most of the store is dead: its rows go at once, by keeping the rest (see
    // `delete_all_dead`), unless the caller chose a batch size or the rest is large. That
    // reads and writes each page about once, so a small cache does.
    let overlap = opts.max_freed == u64::MAX;
    let kept = n - dead_count;
    let at_once = overlap
        && !nix_order
        && opts.batch_size == 0
        && dead_count >= kept
        && kept <= AT_ONCE_MAX_KEPT;
    store.with_db(|db| {
        db.set_cache_size_kib(if at_once {
            AT_ONCE_CACHE_KIB
        } else {
            gc_cache_kib(n)
        })?;
        db.keep_temp_files_in_memory()
    })?;
    let total = dead_count + strays.len();
    let batch_size = match opts.batch_size {
        0 => auto_batch_size(total),
        b => b,
    };
    let batch_size = if opts.max_freed == u64::MAX {
        batch_size
    } else {
        // Freed bytes are known only after the files go: keep the overshoot small.
        batch_size.clamp(1, 16)
    };
    let done = std::cell::Cell::new(0usize);
    let mut limit_reached = false;
    let mut rows_time = std::time::Duration::ZERO;
    // A batch's files, once deleted: each node with the bytes it freed, and the error
    // that stopped the deletion early.
    type FilesDone = (Vec<(Node, u64)>, Option<GcError>);
    let report = |(files, error): FilesDone,
                  results: &mut GcResults,
                  events: &mut dyn FnMut(GcEvent<'_>)|
     -> Result<(), GcError> {
        for (v, freed) in &files {
            results.bytes_freed += freed;
            let printed = print(graph.name(*v));
            done.set(done.get() + 1);
            events(GcEvent::Deleted {
                path: &printed,
                done: done.get(),
                total,
                bytes_freed: results.bytes_freed,
            });
            results.count += 1;
            if opts.keep_paths {
                results.paths.insert(printed);
            }
        }
        shared.finish_pending_of(files.iter().map(|(v, _)| graph.hash_part(*v)));
        match error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    };
    // Files are removed relative to the store directory, open once.
    let store_fd = std::fs::File::open(store_path).map_err(|source| GcError::Io {
        step: "opening directory",
        path: store_path.to_path_buf(),
        source,
    })?;
    let delete_files = |batch: Vec<Node>| -> FilesDone {
        let mut files = Vec::with_capacity(batch.len());
        for v in batch {
            match delete_store_entry(&store_fd, store_path, graph.name(v)) {
                Ok(freed) => files.push((v, freed)),
                Err(e) => return (files, Some(e)),
            }
        }
        (files, None)
    };
    // Without a limit on the bytes freed, a batch's files are deleted on a second thread
    // while the next batch's rows go. A batch's rows are committed before its files are
    // handed over, and its paths stay pending (a client adding a root for one waits)
    // until its files are gone.
    // Entries without a row: leftovers of failed builds, of an earlier collection that
    // was interrupted, or paths being added right now (those have a temporary root).
    // Returns whether the limit on the bytes freed is reached.
    let delete_stray = |s: &Stray,
                        results: &mut GcResults,
                        events: &mut dyn FnMut(GcEvent<'_>)|
     -> Result<bool, GcError> {
        if let Some(wanted) = &specific_strays {
            if !wanted.contains(&s.name) {
                return Ok(false);
            }
        }
        if let Some(h) = &s.hash {
            let mut st = shared.lock();
            if st.temp_roots.contains(h) {
                return Ok(false);
            }
            st.pending.clear();
            st.pending.insert(h);
        }
        // Registered since the graph was read (its registrar should have made it a
        // temporary root first; this catches one that did not).
        let printed = print(&s.name);
        let now_valid = s.hash.is_some() && store.with_db(|db| db.path_id(&printed))?.is_some();
        if !now_valid {
            let freed = delete_path(&store_path.join(&s.name));
            shared.finish_pending();
            results.bytes_freed += freed?;
            done.set(done.get() + 1);
            events(GcEvent::Deleted {
                path: &printed,
                done: done.get(),
                total,
                bytes_freed: results.bytes_freed,
            });
            results.count += 1;
            if opts.keep_paths {
                results.paths.insert(printed);
            }
        } else {
            shared.finish_pending();
        }
        Ok(results.bytes_freed > opts.max_freed)
    };

    if nix_order {
        limit_reached = delete_in_directory_order(
            &DirOrder {
                store,
                graph: &graph,
                kinds,
                shared,
                entries: &dir_order,
                dead: &dead,
                max_freed: opts.max_freed,
            },
            &mut alive,
            &|v, results, events| report(delete_files(vec![v]), results, events),
            &|i, results, events| delete_stray(&strays[i], results, events),
            &mut results,
            events,
        )?;
    }
    std::thread::scope(|scope| -> Result<(), GcError> {
        let (work_tx, work_rx) = std::sync::mpsc::sync_channel::<Vec<Node>>(1);
        let (done_tx, done_rx) = std::sync::mpsc::channel::<FilesDone>();
        if overlap {
            let delete_files = &delete_files;
            std::thread::Builder::new()
                .name("gc-unlink".into())
                .spawn_scoped(scope, move || {
                    for batch in work_rx {
                        let r = delete_files(batch);
                        let failed = r.1.is_some();
                        if done_tx.send(r).is_err() || failed {
                            return;
                        }
                    }
                })
                .map_err(|source| GcError::Io {
                    step: "starting a thread to delete files",
                    path: store_path.to_path_buf(),
                    source,
                })?;
        } else {
            drop((work_rx, done_tx));
        }
        let mut in_flight = 0usize;
        let mut rows_left = true;
        if at_once && dead_count > 0 {
            let t = std::time::Instant::now();
            let deleted = delete_all_dead(store, &graph, kinds, shared, &dead, &mut alive);
            rows_time += t.elapsed();
            if let Some(deleted) = deleted? {
                rows_left = false;
                for chunk in deleted.chunks(batch_size) {
                    if work_tx.send(chunk.to_vec()).is_err() {
                        break;
                    }
                    in_flight += 1;
                    while let Ok(r) = done_rx.try_recv() {
                        in_flight -= 1;
                        report(r, &mut results, events)?;
                    }
                }
            }
        }
        let order = if nix_order || !rows_left {
            Vec::new()
        } else {
            let order = graph.referrers_first(&dead);
            phase.done("ordering dead paths");
            order
        };
        // `alive` from here on also holds what became alive during the collection.
        for chunk in order.chunks(batch_size) {
            let batch: Vec<Node> = {
                let mut s = shared.lock();
                take_new_roots(&mut s, &graph, kinds, &mut alive);
                let batch: Vec<Node> = chunk
                    .iter()
                    .copied()
                    .filter(|v| !alive[*v as usize])
                    .collect();
                for v in &batch {
                    s.pending.insert(graph.hash_part(*v));
                }
                batch
            };
            let t = std::time::Instant::now();
            // On an error, the server clears what is still pending when it stops.
            let deleted = invalidate_batch(store, &graph, kinds, &batch, &mut alive, events);
            rows_time += t.elapsed();
            let deleted = deleted?;
            // Nodes of the batch that were kept (referred to by a path registered
            // meanwhile) are pending no longer.
            if deleted.len() < batch.len() {
                let mut gone = vec![false; n];
                for v in &deleted {
                    gone[*v as usize] = true;
                }
                shared.finish_pending_of(
                    batch
                        .iter()
                        .filter(|v| !gone[**v as usize])
                        .map(|v| graph.hash_part(*v)),
                );
            }
            if overlap {
                if work_tx.send(deleted).is_err() {
                    // The thread stopped on an error, which it sent first.
                    break;
                }
                in_flight += 1;
                while let Ok(r) = done_rx.try_recv() {
                    in_flight -= 1;
                    report(r, &mut results, events)?;
                }
            } else {
                report(delete_files(deleted), &mut results, events)?;
                if results.bytes_freed > opts.max_freed {
                    limit_reached = true;
                    break;
                }
            }
        }
        drop(work_tx);
        while in_flight > 0 {
            let Ok(r) = done_rx.recv() else { break };
            in_flight -= 1;
            report(r, &mut results, events)?;
        }
        Ok(())
    })?;
    tracing::debug!("deleting rows: {:.3} s", rows_time.as_secs_f64());

    if !nix_order && !limit_reached {
        for s in &strays {
            if delete_stray(s, &mut results, events)? {
                limit_reached = true;
                break;
            }
        }
    }
    phase.done("deleting dead paths");
    if limit_reached {
        events(GcEvent::LimitReached {
            max_freed: opts.max_freed,
        });
    }

    events(GcEvent::PruningLinks);
    results.links_pruned = prune_links(&store_path.join(".links"))?;
    phase.done("pruning links");

    if let Some(first) = refused.first() {
        return Err(GcError::StillAlive {
            path: first.clone(),
        });
    }
    Ok(results)
}

/// An entry of the store directory, in the order `readdir` gave it.
enum Entry {
    Valid(Node),
    /// An index into the strays.
    Stray(usize),
}

/// What [`delete_in_directory_order`] works on.
struct DirOrder<'a> {
    store: &'a LocalStore,
    graph: &'a Graph,
    kinds: EdgeKinds,
    shared: &'a SharedRoots,
    entries: &'a [Entry],
    dead: &'a [bool],
    max_freed: u64,
}

type DeleteNode<'a> =
    dyn Fn(Node, &mut GcResults, &mut dyn FnMut(GcEvent<'_>)) -> Result<(), GcError> + 'a;
type DeleteStray<'a> =
    dyn Fn(usize, &mut GcResults, &mut dyn FnMut(GcEvent<'_>)) -> Result<bool, GcError> + 'a;

/// Deletion with a limit on the bytes freed, in Nix 2.8's order, so that the same paths
/// go: the store directory's entries in `readdir` order; for a dead valid path, the group
/// of paths that keep it alive (its referrers, and with `keep-outputs`/`keep-derivations`
/// the derivations and outputs that keep it), transitively, not yet deleted, deleted
/// together in Nix's topological order ([`Graph::nix_topo_order`]); a stray entry alone.
/// The limit is checked after every path. Each path's row goes in a transaction of its
/// own before its files. Returns whether the limit was reached.
fn delete_in_directory_order(
    d: &DirOrder<'_>,
    alive: &mut [bool],
    delete_files: &DeleteNode<'_>,
    delete_stray: &DeleteStray<'_>,
    results: &mut GcResults,
    events: &mut dyn FnMut(GcEvent<'_>),
) -> Result<bool, GcError> {
    let g = d.graph;
    let kept_by = g.kept_by(d.kinds);
    let mut gone = vec![false; g.len()];
    for entry in d.entries {
        let v = match *entry {
            Entry::Stray(i) => {
                if delete_stray(i, results, events)? {
                    return Ok(true);
                }
                continue;
            }
            Entry::Valid(v) => v,
        };
        if !d.dead[v as usize] || gone[v as usize] {
            continue;
        }
        take_new_roots(&mut d.shared.lock(), g, d.kinds, alive);
        let mut group = vec![v];
        let mut in_group = std::collections::HashSet::from([v]);
        let mut i = 0;
        while i < group.len() {
            for &r in kept_by.of(group[i]) {
                if !gone[r as usize] && in_group.insert(r) {
                    group.push(r);
                }
            }
            i += 1;
        }
        // Something in the group became alive: so did everything it refers to, as in
        // Nix, which then leaves the whole group.
        if group.iter().any(|u| alive[*u as usize]) {
            continue;
        }
        for u in g.nix_topo_order(&group) {
            let hash = g.hash_part(u);
            {
                // Checked and marked pending under one lock: a client adding a root for
                // it from now on waits until its files are gone.
                let mut s = d.shared.lock();
                take_new_roots(&mut s, g, d.kinds, alive);
                if alive[u as usize] {
                    continue;
                }
                s.pending.insert(hash);
            }
            let deleted = match invalidate_batch(d.store, g, d.kinds, &[u], alive, events) {
                Ok(deleted) => deleted,
                Err(e) => {
                    d.shared.finish_pending_of([hash]);
                    return Err(e);
                }
            };
            if deleted.is_empty() {
                d.shared.finish_pending_of([hash]);
                continue;
            }
            gone[u as usize] = true;
            // Clears the path from pending once its files are gone.
            delete_files(u, results, events)?;
            if results.bytes_freed > d.max_freed {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Marks alive the roots clients added since liveness was computed, with their closures.
fn take_new_roots(
    s: &mut crate::server::Shared,
    graph: &Graph,
    kinds: EdgeKinds,
    alive: &mut [bool],
) {
    let new: Vec<Node> = s
        .new_roots
        .drain(..)
        .filter_map(|h| graph.lookup_hash(&h))
        .collect();
    graph.mark_closure(new, kinds, alive);
}

/// Deletes the rows of every dead path in one transaction that keeps the rest of the
/// store ([`nixb_store::db::Db::keep_only_paths`]): for a collection that deletes most of
/// the store, where deleting row by row costs index seeks per row and reference that grow
/// with the store. Roots clients added meanwhile are taken first, with their closures,
/// and every path to delete is pending until its files are gone. Returns the nodes whose
/// rows went, or `None` (nothing deleted, nothing pending) where the database refuses
/// (another schema, or a path registered since the graph was read refers to a dead one):
/// the caller then goes batch by batch.
fn delete_all_dead(
    store: &LocalStore,
    graph: &Graph,
    kinds: EdgeKinds,
    shared: &SharedRoots,
    dead: &[bool],
    alive: &mut [bool],
) -> Result<Option<Vec<Node>>, GcError> {
    let deleting: Vec<Node> = {
        let mut s = shared.lock();
        take_new_roots(&mut s, graph, kinds, alive);
        let deleting: Vec<Node> = (0..graph.len() as Node)
            .filter(|v| dead[*v as usize] && !alive[*v as usize])
            .collect();
        for v in &deleting {
            s.pending.insert(graph.hash_part(*v));
        }
        deleting
    };
    let mut goes = vec![false; graph.len()];
    for v in &deleting {
        goes[*v as usize] = true;
    }
    let keep: Vec<i64> = (0..graph.len() as Node)
        .filter(|v| !goes[*v as usize])
        .map(|v| graph.db_id(v))
        .collect();
    drop(goes);
    let done =
        store.with_db(|db| db.keep_only_paths("deleting dead paths", &keep, graph.max_db_id()));
    match done {
        Ok(true) => Ok(Some(deleting)),
        Ok(false) => {
            shared.finish_pending();
            Ok(None)
        }
        Err(e) => {
            shared.finish_pending();
            Err(e.into())
        }
    }
}

/// Rows a transaction deletes when the caller does not say, for `dead` paths to delete:
/// an eighth of them, so that the files of one batch go on the second thread while the
/// rows of the next go (two batches would barely overlap), but at least 16,384, and at
/// most 65,536 (bigger batches pass over the same index pages fewer times on large
/// stores, and hold the write lock longer).
pub fn auto_batch_size(dead: usize) -> usize {
    (dead / 8).clamp(16_384, 65_536)
}

/// The names in the store directory `dir`, in the directory's order.
fn list_directory(dir: &Path) -> Result<Vec<String>, GcError> {
    let io = |source| GcError::Io {
        step: "reading directory",
        path: dir.to_path_buf(),
        source,
    };
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io)? {
        names.push(e.map_err(io)?.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}

/// Deletes the rows of `batch` together in one transaction and returns the nodes
/// deleted. When the transaction fails because a row is still referred to (a path
/// registered since the graph was read), falls back to one transaction per path and
/// keeps those that cannot go, with their closure.
fn invalidate_batch(
    store: &LocalStore,
    graph: &Graph,
    kinds: EdgeKinds,
    batch: &[Node],
    alive: &mut [bool],
    events: &mut dyn FnMut(GcEvent<'_>),
) -> Result<Vec<Node>, GcError> {
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = batch.iter().map(|v| graph.db_id(*v)).collect();
    let all = store.with_db(|db| db.invalidate_paths("deleting dead paths", &ids));
    if all.is_ok() {
        return Ok(batch.to_vec());
    }
    let mut deleted = Vec::new();
    for v in batch {
        if alive[*v as usize] {
            continue;
        }
        let one = store.with_db(|db| {
            db.transaction("deleting a dead path", |db| db.delete_path(graph.db_id(*v)))
        });
        match one {
            Ok(()) => deleted.push(*v),
            Err(e) => {
                tracing::warn!("keeping {}: {e}", graph.name(*v));
                events(GcEvent::KeptInUse {
                    path: graph.name(*v),
                });
                graph.mark_closure([*v], kinds, alive);
            }
        }
    }
    Ok(deleted)
}

/// Time spent in each phase of a collection, logged at debug level (`NIXB_LOG=nixb_gc=debug`).
struct Phase(std::time::Instant);

impl Phase {
    fn start() -> Phase {
        Phase(std::time::Instant::now())
    }

    fn done(&mut self, what: &str) {
        tracing::debug!("{what}: {:.3} s", self.0.elapsed().as_secs_f64());
        self.0 = std::time::Instant::now();
    }
}
