//! A temporary roots file of its own, for an owner that lives shorter than its process:
//! a daemon connection. Nix's daemon forks a process per connection, whose
//! `temproots/<pid>` goes when the connection ends; a daemon serving every connection
//! from one process keeps one such file per connection instead, named
//! `<pid>-<connection>` (Nix's collector reads the leading number as the owner's pid and
//! no process ever has the name), and removes it when the connection ends.
//!
//! The file has the format and the locking of `temproots/<pid>` (see [`crate::roots`]):
//! store paths each followed by NUL, exclusively locked while the owner lives. Adding a
//! root takes `gc.lock` shared for the moment of the write; when a collector holds it,
//! the root goes to the collector's socket and is acknowledged first, as in Nix.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nixb_store::locks::{lock_file, open_lock_file, LockType};
use nixb_store::{StoreDir, StorePath};

use crate::GcError;

/// One owner's temporary roots; the file is removed on drop, which releases the roots.
#[derive(Debug)]
pub struct TempRootsFile {
    path: PathBuf,
    file: File,
    gc_lock: File,
    socket: PathBuf,
    store_dir: StoreDir,
    added: HashSet<String>,
}

fn io_err(step: &'static str, path: &Path) -> impl FnOnce(io::Error) -> GcError {
    let path = path.to_path_buf();
    move |source| GcError::Io { step, path, source }
}

impl TempRootsFile {
    /// Creates `<state_dir>/temproots/<name>`, locked. `name` must start with a number
    /// (Nix's collector parses it as a pid) and be unique among live owners.
    pub fn create(state_dir: &Path, store_dir: StoreDir, name: &str) -> Result<Self, GcError> {
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
        let gc_lock = open_lock_file(&gc_lock_path, true)?.ok_or_else(|| GcError::Io {
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

    /// Protects `p` from every collector until this file is dropped.
    pub fn add(&mut self, p: &StorePath) -> Result<(), GcError> {
        let printed = self.store_dir.print(p);
        if self.added.contains(&printed) {
            return Ok(());
        }
        let mut attempts = 0u32;
        let locked = loop {
            if lock_file(&self.gc_lock, LockType::Read, false)? {
                break true;
            }
            match send_to_collector(&self.socket, &printed) {
                Ok(()) => break false,
                // The collector is starting or finishing: its socket is not answering
                // yet or any more; the lock decides again.
                Err(source) => {
                    attempts += 1;
                    if attempts > 6000 {
                        return Err(GcError::Io {
                            step: "sending a temporary root to the collector at",
                            path: self.socket.clone(),
                            source,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        let mut record = printed.clone().into_bytes();
        record.push(0);
        let written = self
            .file
            .write_all(&record)
            .map_err(io_err("writing temporary root to", &self.path));
        if locked {
            lock_file(&self.gc_lock, LockType::None, false)?;
        }
        written?;
        self.added.insert(printed);
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

fn send_to_collector(socket: &Path, path: &str) -> io::Result<()> {
    let mut s = UnixStream::connect(socket)?;
    s.write_all(format!("{path}\n").as_bytes())?;
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack)?;
    if ack[0] != b'1' {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected acknowledgement byte {}", ack[0]),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::roots::{find_temp_roots, RootDirs};

    #[test]
    fn roots_hold_while_the_file_lives_and_go_with_it() {
        let tmp = tempfile::tempdir().unwrap();
        let store_dir = StoreDir::new(tmp.path().join("store").to_str().unwrap()).unwrap();
        let state = tmp.path().join("state");
        let dirs = RootDirs::new(store_dir.clone(), state.clone());
        let p = store_dir
            .parse(&format!(
                "{}/0c6kzph7l0dcbfmjap64f0czdafn3b7x-hello",
                store_dir.as_str()
            ))
            .unwrap();
        let mut f = TempRootsFile::create(&state, store_dir.clone(), "4242-7").unwrap();
        f.add(&p).unwrap();
        f.add(&p).unwrap();
        // The raw file is Nix's format: one NUL-terminated record.
        let raw = std::fs::read(state.join("temproots/4242-7")).unwrap();
        assert_eq!(raw, format!("{}\0", store_dir.print(&p)).into_bytes());
        let roots = find_temp_roots(&dirs, false).unwrap();
        assert_eq!(
            roots.get(&p).map(|l| l.iter().cloned().collect::<Vec<_>>()),
            Some(vec!["{temp:4242}".to_string()])
        );
        drop(f);
        assert!(!state.join("temproots/4242-7").exists());
        assert!(find_temp_roots(&dirs, false).unwrap().is_empty());
    }

    /// While a collector holds `gc.lock`, a root goes to its socket and is acknowledged
    /// before `add` returns.
    #[test]
    fn a_running_collector_hears_of_new_roots() {
        use crate::server::{RootsServer, SharedRoots};
        use std::sync::Arc;
        let tmp = tempfile::tempdir().unwrap();
        let store_dir = StoreDir::new(tmp.path().join("store").to_str().unwrap()).unwrap();
        let state = tmp.path().join("state");
        let p = store_dir
            .parse(&format!(
                "{}/1c6kzph7l0dcbfmjap64f0czdafn3b7x-late",
                store_dir.as_str()
            ))
            .unwrap();
        let mut f = TempRootsFile::create(&state, store_dir.clone(), "4243-1").unwrap();
        let gc_lock = open_lock_file(&state.join("gc.lock"), true)
            .unwrap()
            .unwrap();
        assert!(lock_file(&gc_lock, LockType::Write, false).unwrap());
        let shared = Arc::new(SharedRoots::default());
        let server = RootsServer::start(&state, store_dir.clone(), shared.clone()).unwrap();
        f.add(&p).unwrap();
        assert_eq!(shared.lock().new_roots, vec![p.hash_part().to_string()]);
        drop(server);
        // And it is in the file for the collectors that come later.
        let raw = std::fs::read(f.path()).unwrap();
        assert_eq!(raw, format!("{}\0", store_dir.print(&p)).into_bytes());
    }
}
