//! Temporary roots: the paths a process (or a part of one) is using, which no garbage
//! collector may delete while their owner lives.
//!
//! The format and the locking are Nix 2.x's: `<state>/temproots/<name>` holds store paths,
//! each followed by NUL, and is locked exclusively while its owner lives, so that a
//! collector that can lock it knows the owner is gone. A collector takes the number the
//! name starts with for the owner's pid. Adding a root takes `gc.lock` shared for the
//! moment of the write; while a collector holds it exclusively, the root goes to the
//! collector's socket (`<state>/gc-socket/socket`) and is acknowledged first.
//!
//! A process has one file named by its pid ([`LocalStore::add_temp_root`]). An owner that
//! lives shorter than its process, such as a daemon connection (Nix's daemon forks a
//! process per connection, whose file goes when the connection ends), has a file of its own
//! named `<pid>-<n>` ([`RootsOwner`]), removed when the owner is dropped: that releases its
//! roots and no others.
//!
//! [`LocalStore::add_temp_root`]: crate::local_store::LocalStore::add_temp_root

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::local_store::StoreError;
use crate::locks::{lock_file, open_lock_file, LockType};
use crate::path::{StoreDir, StorePath};

/// How long a root waits for a collector that holds `gc.lock` but does not answer on its
/// socket yet (it is starting or finishing), in 10 ms attempts: a minute.
const COLLECTOR_ATTEMPTS: u32 = 6000;

/// One owner's temporary roots file; removed on drop, which releases the roots.
#[derive(Debug)]
pub struct TempRootsFile {
    path: PathBuf,
    file: File,
    gc_lock: File,
    socket: PathBuf,
    store_dir: StoreDir,
    /// The hash parts of the paths written since the file was created or emptied, so that
    /// a root is recorded once: 32 bytes a path, and at most [`ADDED_MAX`] of them (a
    /// daemon connection may live for days and root millions of paths). Past that the set
    /// starts again, and a path rooted anew is written again: harmless, a root named twice
    /// in the file is one root.
    added: HashSet<[u8; 32]>,
}

/// How many hash parts a [`TempRootsFile`] remembers (2 MiB or so at the most).
#[cfg(not(test))]
const ADDED_MAX: usize = 1 << 16;
#[cfg(test)]
const ADDED_MAX: usize = 4;

fn io_err(step: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { step, path, source }
}

impl TempRootsFile {
    /// Creates `<state_dir>/temproots/<name>`, locked. `name` must start with the owner's
    /// pid and be unique among the live owners.
    pub fn create(state_dir: &Path, store_dir: StoreDir, name: &str) -> Result<Self, StoreError> {
        let dir = state_dir.join("temproots");
        std::fs::create_dir_all(&dir).map_err(io_err("creating directory", &dir))?;
        let path = dir.join(name);
        let file = loop {
            // A file of this name is left over from an owner that died.
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("removing stale", &path)(e)),
            }
            let f = OpenOptions::new()
                .read(true)
                .append(true)
                .create(true)
                .open(&path)
                .map_err(io_err("creating temporary roots file", &path))?;
            lock_file(&f, LockType::Write, true)?;
            let len = f.metadata().map_err(io_err("statting", &path))?.len();
            // A collector that found the file unlocked writes into it before removing it:
            // then it is no longer ours; start over.
            if len == 0 {
                break f;
            }
        };
        let gc_lock_path = state_dir.join("gc.lock");
        let gc_lock = open_lock_file(&gc_lock_path, true)?.ok_or_else(|| StoreError::Io {
            step: "opening",
            path: gc_lock_path.clone(),
            source: io::ErrorKind::NotFound.into(),
        })?;
        Ok(TempRootsFile {
            path,
            file,
            gc_lock,
            socket: state_dir.join("gc-socket").join("socket"),
            store_dir,
            added: HashSet::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Protects `p` from every collector until this file is dropped or emptied.
    pub fn add(&mut self, p: &StorePath) -> Result<(), StoreError> {
        // A store path's hash part is 32 base-32 characters; anything else is never
        // remembered, only written.
        let key = <[u8; 32]>::try_from(p.hash_part().as_bytes()).ok();
        if key.is_some_and(|k| self.added.contains(&k)) {
            return Ok(());
        }
        let printed = self.store_dir.print(p);
        let mut attempts = 0u32;
        let locked = loop {
            if lock_file(&self.gc_lock, LockType::Read, false)? {
                break true;
            }
            match send_to_collector(&self.socket, &printed) {
                Ok(()) => break false,
                // The collector is starting or finishing: its socket is not answering
                // yet or any more; the lock decides again.
                Err(reason) => {
                    attempts += 1;
                    if attempts > COLLECTOR_ATTEMPTS {
                        return Err(StoreError::GcSocket {
                            socket: self.socket.clone(),
                            reason,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        let mut record = printed.into_bytes();
        record.push(0);
        let written = self
            .file
            .write_all(&record)
            .map_err(io_err("writing temporary root to", &self.path));
        if locked {
            lock_file(&self.gc_lock, LockType::None, false)?;
        }
        written?;
        if let Some(k) = key {
            if self.added.len() >= ADDED_MAX {
                self.added.clear();
            }
            self.added.insert(k);
        }
        Ok(())
    }

    /// Drops every root: the file is emptied and stays locked, so collectors keep
    /// treating its owner as alive.
    pub fn clear(&mut self) -> Result<(), StoreError> {
        self.file
            .set_len(0)
            .map_err(io_err("emptying", &self.path))?;
        self.added.clear();
        Ok(())
    }
}

impl Drop for TempRootsFile {
    fn drop(&mut self) {
        // Removed while still locked, so no collector takes the file for a stale one of
        // an owner that is still there.
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(
                    "removing temporary roots file '{}': {e}",
                    self.path.display()
                );
            }
        }
        let _ = lock_file(&self.file, LockType::None, false);
    }
}

fn send_to_collector(socket: &Path, path: &str) -> Result<(), String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("connecting: {e}"))?;
    s.write_all(format!("{path}\n").as_bytes())
        .map_err(|e| format!("sending root: {e}"))?;
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack)
        .map_err(|e| format!("reading acknowledgement: {e}"))?;
    if ack[0] != b'1' {
        return Err(format!("unexpected acknowledgement byte {}", ack[0]));
    }
    Ok(())
}

/// The temporary roots of one owner inside a process (a daemon connection): a file of its
/// own, `temproots/<pid>-<n>`, created with the first root and removed when the owner is
/// dropped. Shared by the threads that act for the owner.
#[derive(Debug)]
pub struct RootsOwner {
    state_dir: PathBuf,
    store_dir: StoreDir,
    name: String,
    file: Mutex<Option<TempRootsFile>>,
}

impl RootsOwner {
    /// An owner whose file will be `<state_dir>/temproots/<pid>-<n>`; `n` must be unique
    /// in this process.
    pub fn new(state_dir: &Path, store_dir: StoreDir, n: u64) -> RootsOwner {
        RootsOwner {
            state_dir: state_dir.to_path_buf(),
            store_dir,
            name: format!("{}-{n}", std::process::id()),
            file: Mutex::new(None),
        }
    }

    /// Protects `p` from every collector until this owner is dropped.
    pub fn add(&self, p: &StorePath) -> Result<(), StoreError> {
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let f = match file.take() {
            Some(f) => f,
            None => TempRootsFile::create(&self.state_dir, self.store_dir.clone(), &self.name)?,
        };
        file.insert(f).add(p)
    }

    /// The file, once a root has been added.
    pub fn path(&self) -> Option<PathBuf> {
        let file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        file.as_ref().map(|f| f.path().to_path_buf())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_root_is_written_once_until_the_remembered_ones_start_again() {
        let tmp = tempfile::tempdir().unwrap();
        let store_dir = StoreDir::new(tmp.path().join("store").to_str().unwrap()).unwrap();
        let state = tmp.path().join("state");
        let path = |i: usize| StorePath::from_base_name(&format!("{:0>32}-p{i}", i)).unwrap();
        let mut f = TempRootsFile::create(&state, store_dir.clone(), "4242-1").unwrap();
        let records = || -> Vec<String> {
            let raw = std::fs::read_to_string(state.join("temproots/4242-1")).unwrap();
            raw.split_terminator('\0').map(str::to_string).collect()
        };
        for i in [0, 1, 0, 2, 1, 3] {
            f.add(&path(i)).unwrap();
        }
        let printed: Vec<String> = (0..4).map(|i| store_dir.print(&path(i))).collect();
        assert_eq!(records(), printed);
        assert_eq!(f.added.len(), ADDED_MAX);
        // A fifth path: the set starts again with it alone, so path 0 is written again.
        f.add(&path(4)).unwrap();
        f.add(&path(0)).unwrap();
        f.add(&path(4)).unwrap();
        assert_eq!(f.added.len(), 2);
        let mut want = printed.clone();
        want.push(store_dir.print(&path(4)));
        want.push(printed[0].clone());
        assert_eq!(records(), want);
        // Emptied: every root goes, and the next is written again.
        f.clear().unwrap();
        f.add(&path(4)).unwrap();
        assert_eq!(records(), vec![store_dir.print(&path(4))]);
    }
}
