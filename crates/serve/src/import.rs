//! Moving store paths in and out of a [`LocalStore`] as NAR streams: adding one path
//! whose NAR arrives on a stream (hash and size verified before it is registered), the
//! `nix-store --export` format, and ordering paths so that references come first.
//!
//! ```text
//! export  = { u64(1) <nar> u64(EXPORT_MAGIC) str(path) strs(references) str(deriver|"")
//!             u64(0 | 1 str(signature)) }* u64(0)
//! ```
//!
//! The closure invariant is kept at every step: a path is added only when each of its
//! references (other than itself) is already valid, so an export stream must list paths
//! in dependency order, as `nix-store --export` does. Nothing is registered unless its
//! NAR was received whole and matched the announced hash and size; a path that fails is
//! removed again.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nixb_store::canon::{canonicalise_path_metadata, InodesSeen};
use nixb_store::local_store::{LocalStore, ValidPathInfo};
use nixb_store::locks::PathLocks;
use nixb_store::nar::{dump_to_sink, restore_path_prefix, NarError};
use nixb_store::{Hash, HashAlgo, Hasher, StoreDir, StorePath};

use crate::error::ServeError;
use crate::proto::{read_opt_path, read_path, read_paths, write_paths};
use crate::wire::{WireReader, WireWriter};

/// Marks the metadata trailer of each path in an export stream ("NIXE" little endian).
pub const EXPORT_MAGIC: u64 = 0x4558_494e;

/// Hashes and counts what is read through it.
struct HashingReader<'a, R: Read> {
    inner: &'a mut R,
    hasher: Hasher,
    count: u64,
}

impl<R: Read> Read for HashingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Restores the NAR at the head of `input` to `dest`, returning its sha256 and size.
fn restore_hashed(
    input: &mut impl Read,
    dest: &Path,
    what: &str,
) -> Result<(Hash, u64), ServeError> {
    let mut hr = HashingReader {
        inner: input,
        hasher: Hasher::new(HashAlgo::Sha256),
        count: 0,
    };
    restore_path_prefix(&mut hr, dest).map_err(ServeError::nar(what))?;
    Ok((hr.hasher.finish(), hr.count))
}

/// Removes a tree that may be read-only (see [`nixb_store::delete::delete_path`]).
pub(crate) fn remove_tree(path: &Path) -> Result<(), ServeError> {
    nixb_store::delete::delete_path(path).map_err(|e| ServeError::Io {
        step: e.step,
        path: e.path.display().to_string(),
        source: e.source,
    })
}

/// A scratch name in the store directory, on the same file system as the final path so
/// that moving it there is a rename. The name is no store path name (no hash part), so
/// nothing can mistake it for one.
fn scratch_path(store: &StoreDir) -> std::path::PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    store
        .as_path()
        .join(format!(".nixb-import-{}-{n}", std::process::id()))
}

fn check_references(store: &LocalStore, info: &ValidPathInfo) -> Result<(), ServeError> {
    for r in &info.references {
        if *r != info.path && !store.is_valid_path(r)? {
            return Err(ServeError::MissingReference {
                path: store.store_dir().print(&info.path),
                reference: store.store_dir().print(r),
            });
        }
    }
    Ok(())
}

/// Consumes the NAR at the head of `nar` without keeping it (the path is already valid).
fn skip_nar(store: &LocalStore, nar: &mut impl Read, what: &str) -> Result<(), ServeError> {
    let scratch = scratch_path(store.store_dir());
    let res = restore_hashed(nar, &scratch, what);
    remove_tree(&scratch)?;
    res.map(drop)
}

/// Output paths whose locks the process that started us holds (the engine, while its build
/// hook imports the outputs it asked for): locking them again would wait for ever on our
/// own parent. Nix 2.x's `locksHeld`, filled by its build hook the same way.
static LOCKS_HELD: std::sync::Mutex<BTreeSet<PathBuf>> = std::sync::Mutex::new(BTreeSet::new());

/// Marks `paths` as locked by our parent (see `LOCKS_HELD`).
pub fn assume_locks_held(paths: impl IntoIterator<Item = PathBuf>) {
    if let Ok(mut held) = LOCKS_HELD.lock() {
        held.extend(paths);
    }
}

fn lock_unless_held(
    dest: &std::path::Path,
) -> Result<Option<Option<PathLocks>>, nixb_store::locks::LockError> {
    if LOCKS_HELD.lock().map(|h| h.contains(dest)).unwrap_or(false) {
        return Ok(Some(None));
    }
    Ok(PathLocks::lock(&[dest.to_path_buf()], true, None)?.map(Some))
}

/// Adds `info.path` with the NAR at the head of `nar` to the store, unless it is valid
/// already (the NAR is consumed either way). The NAR must hash to `info.nar_hash` and
/// be `info.nar_size` bytes long; every reference must be valid. Returns whether the
/// path was added.
pub fn add_nar_to_store(
    store: &LocalStore,
    info: &ValidPathInfo,
    nar: &mut impl Read,
) -> Result<bool, ServeError> {
    let dir = store.store_dir();
    let printed = dir.print(&info.path);
    if store.is_valid_path(&info.path)? {
        skip_nar(store, nar, &printed)?;
        return Ok(false);
    }
    check_references(store, info)?;
    store.add_temp_root(&info.path)?;
    let dest = dir.to_path(&info.path);
    let Some(mut locks) = lock_unless_held(&dest).map_err(|e| ServeError::Io {
        step: "locking",
        path: printed.clone(),
        source: io::Error::other(e.to_string()),
    })?
    else {
        return Err(ServeError::Io {
            step: "locking",
            path: printed,
            source: io::ErrorKind::WouldBlock.into(),
        });
    };
    if store.is_valid_path(&info.path)? {
        // Someone else added it while we waited for the lock.
        skip_nar(store, nar, &printed)?;
        return Ok(false);
    }
    remove_tree(&dest)?;
    let (hash, size) = match restore_hashed(nar, &dest, &printed) {
        Ok(v) => v,
        Err(e) => {
            let _ = remove_tree(&dest);
            return Err(e);
        }
    };
    if let Err(e) = verify_nar(info, &printed, &hash, size) {
        remove_tree(&dest)?;
        return Err(e);
    }
    let registered = canonicalise_path_metadata(&dest, None, &mut InodesSeen::new())
        .map_err(|e| ServeError::Io {
            step: "canonicalising",
            path: printed.clone(),
            source: io::Error::other(e.to_string()),
        })
        .and_then(|()| {
            let mut info = info.clone();
            info.registration_time = 0;
            Ok(store.register_valid_paths(&[info])?)
        });
    if let Err(e) = registered {
        let _ = remove_tree(&dest);
        return Err(e);
    }
    if let Some(l) = locks.as_mut() {
        l.set_deletion(true);
    }
    Ok(true)
}

fn verify_nar(
    info: &ValidPathInfo,
    printed: &str,
    hash: &Hash,
    size: u64,
) -> Result<(), ServeError> {
    if size != info.nar_size {
        return Err(ServeError::SizeMismatch {
            path: printed.to_string(),
            expected: info.nar_size,
            got: size,
        });
    }
    // The hash we computed is sha256; an info carrying another algorithm is compared by
    // recomputing nothing: Nix itself only ever announces sha256 NAR hashes.
    if info.nar_hash != *hash {
        return Err(ServeError::HashMismatch {
            path: printed.to_string(),
            expected: info.nar_hash.to_base32_typed(),
            got: hash.to_base32_typed(),
        });
    }
    Ok(())
}

/// Orders `paths` so that each comes after everything it references within the set.
pub fn topo_sort(
    dir: &StoreDir,
    paths: &BTreeSet<StorePath>,
    mut references: impl FnMut(&StorePath) -> Result<BTreeSet<StorePath>, ServeError>,
) -> Result<Vec<StorePath>, ServeError> {
    let mut refs: BTreeMap<StorePath, Vec<StorePath>> = BTreeMap::new();
    for p in paths {
        let rs = references(p)?
            .into_iter()
            .filter(|r| r != p && paths.contains(r))
            .collect();
        refs.insert(p.clone(), rs);
    }
    // Iterative depth-first search: closures can be deep enough to overflow the stack.
    let mut out = Vec::with_capacity(paths.len());
    let mut done: BTreeSet<StorePath> = BTreeSet::new();
    let mut on_stack: BTreeSet<StorePath> = BTreeSet::new();
    for root in paths {
        if done.contains(root) {
            continue;
        }
        let mut stack: Vec<(StorePath, usize)> = vec![(root.clone(), 0)];
        on_stack.insert(root.clone());
        while let Some((p, i)) = stack.last_mut() {
            let children = &refs[&*p];
            if let Some(c) = children.get(*i) {
                *i += 1;
                if done.contains(c) {
                    continue;
                }
                if on_stack.contains(c) {
                    return Err(ServeError::Export {
                        offset: 0,
                        reason: format!("references of '{}' form a cycle", dir.print(c)),
                    });
                }
                on_stack.insert(c.clone());
                stack.push((c.clone(), 0));
            } else {
                let p = p.clone();
                stack.pop();
                on_stack.remove(&p);
                done.insert(p.clone());
                out.push(p);
            }
        }
    }
    Ok(out)
}

/// Writes `paths` (which must be valid) as an export stream, references first.
pub fn export_paths<W: Write>(
    store: &LocalStore,
    paths: &BTreeSet<StorePath>,
    w: &mut WireWriter<W>,
) -> Result<(), ServeError> {
    let dir = store.store_dir();
    let mut infos = BTreeMap::new();
    for p in paths {
        let info = store
            .query_path_info(p)?
            .ok_or_else(|| ServeError::NotValid(dir.print(p)))?;
        infos.insert(p.clone(), info);
    }
    let order = topo_sort(dir, paths, |p| Ok(infos[p].references.clone()))?;
    for p in &order {
        let info = &infos[p];
        w.write_u64(1, "export item")?;
        dump_nar(store, p, w)?;
        w.write_u64(EXPORT_MAGIC, "export magic")?;
        w.write_str(&dir.print(p), "path")?;
        write_paths(w, dir, &info.references, "references")?;
        w.write_str(
            &info
                .deriver
                .as_ref()
                .map(|d| dir.print(d))
                .unwrap_or_default(),
            "deriver",
        )?;
        // No signature: Nix 2.x neither writes nor checks this legacy field.
        w.write_u64(0, "signature flag")?;
    }
    w.write_u64(0, "export end")?;
    Ok(())
}

/// Writes the NAR of valid path `p`.
pub fn dump_nar(store: &LocalStore, p: &StorePath, w: &mut impl Write) -> Result<(), ServeError> {
    let real = store.store_dir().to_path(p);
    dump_to_sink(&real, &mut |b| w.write_all(b).map_err(NarError::Sink))
        .map_err(ServeError::nar(store.store_dir().print(p)))
}

/// Reads an export stream and adds every path in it (in stream order, each with the hash
/// of the NAR as received); returns the paths in that order.
pub fn import_paths<R: Read>(
    store: &LocalStore,
    r: &mut WireReader<R>,
) -> Result<Vec<StorePath>, ServeError> {
    let dir = store.store_dir();
    let mut imported = Vec::new();
    loop {
        let at = r.offset();
        match r.read_u64("export item")? {
            0 => return Ok(imported),
            1 => {}
            n => {
                return Err(ServeError::Export {
                    offset: at,
                    reason: format!(
                    "expected 0 or 1 before an item, got {n} (not made by 'nix-store --export'?)"
                ),
                })
            }
        }
        // The path is named only after its NAR, so the NAR goes to a scratch name first.
        let scratch = scratch_path(dir);
        let res = import_one(store, r, &scratch);
        let _ = remove_tree(&scratch);
        imported.push(res?);
    }
}

fn import_one<R: Read>(
    store: &LocalStore,
    r: &mut WireReader<R>,
    scratch: &Path,
) -> Result<StorePath, ServeError> {
    let dir = store.store_dir();
    let nar_at = r.offset();
    let (hash, size) = restore_hashed(r, scratch, &format!("export item at byte {nar_at}"))?;
    let magic_at = r.offset();
    let magic = r.read_u64("export magic")?;
    if magic != EXPORT_MAGIC {
        return Err(ServeError::Export {
            offset: magic_at,
            reason: format!("expected export magic {EXPORT_MAGIC:#x}, got {magic:#x}"),
        });
    }
    let path = read_path(r, dir, "exported path")?;
    let references = read_paths(r, dir, "references")?;
    let deriver = read_opt_path(r, dir, "deriver")?;
    if r.read_bool("signature flag")? {
        r.read_string("signature")?;
    }
    let info = ValidPathInfo {
        path: path.clone(),
        nar_hash: hash,
        nar_size: size,
        deriver,
        references,
        registration_time: 0,
        ultimate: false,
        sigs: Vec::new(),
        ca: None,
    };
    if store.is_valid_path(&path)? {
        return Ok(path);
    }
    check_references(store, &info)?;
    store.add_temp_root(&path)?;
    let dest = dir.to_path(&path);
    let printed = dir.print(&path);
    let mut locks = lock_unless_held(&dest)
        .map_err(|e| ServeError::Io {
            step: "locking",
            path: printed.clone(),
            source: io::Error::other(e.to_string()),
        })?
        .ok_or_else(|| ServeError::Io {
            step: "locking",
            path: printed.clone(),
            source: io::ErrorKind::WouldBlock.into(),
        })?;
    if store.is_valid_path(&path)? {
        return Ok(path);
    }
    remove_tree(&dest)?;
    std::fs::rename(scratch, &dest).map_err(|source| ServeError::Io {
        step: "moving into place",
        path: printed.clone(),
        source,
    })?;
    let res = canonicalise_path_metadata(&dest, None, &mut InodesSeen::new())
        .map_err(|e| ServeError::Io {
            step: "canonicalising",
            path: printed.clone(),
            source: io::Error::other(e.to_string()),
        })
        .and_then(|()| Ok(store.register_valid_paths(&[info])?));
    if let Err(e) = res {
        let _ = remove_tree(&dest);
        return Err(e);
    }
    if let Some(l) = locks.as_mut() {
        l.set_deletion(true);
    }
    Ok(path)
}
