//! Advisory file locks, and `PathLocks`: the per-output locks that make sure only one
//! process builds or substitutes a given store path at a time.
//!
//! ```text
//! lock file of a path  = <path> ".lock"      (created 0600 on demand)
//! stale lock file      = one whose size is non-zero: the holder wrote a byte into it
//!                        after unlinking it, so a waiter that wins the lock on it knows
//!                        the name now belongs to a different (or no) file and retries
//! ```
//!
//! The locks are BSD `flock(2)` locks, not POSIX `fcntl` record locks. That is what Nix
//! 2.x takes on `<path>.lock`, `db/big-lock` and `temproots/<pid>` (visible as `FLOCK`
//! in `/proc/locks` while `nix-build` runs), and the two kinds never conflict with each
//! other on Linux, so using anything else would let nixb and Nix build the same output
//! at once. `flock` also has the semantics the worker wants inside one process: the lock
//! belongs to the open file description, so a second attempt by the same process on a
//! fresh descriptor fails (or blocks) instead of silently succeeding as `fcntl` would.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("opening lock file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("statting lock file {path}: {source}")]
    Stat {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} lock on file descriptor {fd}: {source}")]
    Lock {
        what: &'static str,
        fd: i32,
        source: std::io::Error,
    },
}

/// The kind of lock to hold on a file; `None` releases whatever is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockType {
    Read,
    Write,
    None,
}

impl LockType {
    fn describe(self) -> &'static str {
        match self {
            LockType::Read => "acquiring shared",
            LockType::Write => "acquiring exclusive",
            LockType::None => "releasing",
        }
    }
}

/// Opens (and with `create`, creates with mode 0600) a lock file. A missing file
/// without `create` is `Ok(None)`.
pub fn open_lock_file(path: &Path, create: bool) -> Result<Option<File>, LockError> {
    if create {
        return create_lock_file(path).map(Some);
    }
    let r = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path);
    match r {
        Ok(f) => Ok(Some(f)),
        Err(e) if !create && e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(LockError::Open {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn create_lock_file(path: &Path) -> Result<File, LockError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| LockError::Open {
            path: path.to_path_buf(),
            source,
        })
}

/// Removes a lock file while still holding its lock. The byte written afterwards marks
/// the (now nameless) file stale for any process already blocked on it, which then
/// reopens the name. Failures are ignored: a leftover lock file is harmless.
pub fn delete_lock_file(path: &Path, file: &File) {
    let _ = std::fs::remove_file(path);
    let mut f = file;
    let _ = f.write_all(b"d");
}

/// Takes, converts or releases an `flock` lock on `fd`. With `wait` false, returns
/// `Ok(false)` when another open file holds a conflicting lock.
pub fn lock_file(fd: impl AsFd, lock: LockType, wait: bool) -> Result<bool, LockError> {
    use rustix::fs::FlockOperation as Op;
    let op = match (lock, wait) {
        (LockType::Read, true) => Op::LockShared,
        (LockType::Read, false) => Op::NonBlockingLockShared,
        (LockType::Write, true) => Op::LockExclusive,
        (LockType::Write, false) => Op::NonBlockingLockExclusive,
        (LockType::None, true) => Op::Unlock,
        (LockType::None, false) => Op::NonBlockingUnlock,
    };
    loop {
        match rustix::fs::flock(fd.as_fd(), op) {
            Ok(()) => return Ok(true),
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::WOULDBLOCK) if !wait => return Ok(false),
            Err(e) => {
                return Err(LockError::Lock {
                    what: lock.describe(),
                    fd: fd.as_fd().as_raw_fd(),
                    source: e.into(),
                })
            }
        }
    }
}

/// Exclusive locks on a set of paths, released (and optionally the lock files deleted)
/// on drop.
#[derive(Debug)]
pub struct PathLocks {
    // (lock file name, open lock file), in the order acquired.
    held: Vec<(PathBuf, File)>,
    delete: bool,
}

impl PathLocks {
    /// Locks `<p>.lock` for every `p` in `paths`, in sorted order so that two processes
    /// locking overlapping sets cannot deadlock. With `wait` false, returns `Ok(None)`
    /// (holding nothing) as soon as one lock is taken by someone else. With `wait` true,
    /// blocks, logging `wait_msg` once per contended path.
    pub fn lock(
        paths: &[PathBuf],
        wait: bool,
        wait_msg: Option<&str>,
    ) -> Result<Option<PathLocks>, LockError> {
        let sorted: BTreeSet<&PathBuf> = paths.iter().collect();
        // Built up one lock at a time so that an early return drops (releases) exactly
        // what was acquired so far.
        let mut locks = PathLocks {
            held: Vec::with_capacity(sorted.len()),
            delete: false,
        };
        for path in sorted {
            let mut lock_path = path.clone().into_os_string();
            lock_path.push(".lock");
            let lock_path = PathBuf::from(lock_path);
            loop {
                let file = create_lock_file(&lock_path)?;
                if !lock_file(&file, LockType::Write, false)? {
                    if !wait {
                        return Ok(None);
                    }
                    if let Some(msg) = wait_msg {
                        tracing::info!("{msg}");
                    }
                    lock_file(&file, LockType::Write, true)?;
                }
                let meta = file.metadata().map_err(|source| LockError::Stat {
                    path: lock_path.clone(),
                    source,
                })?;
                if meta.len() == 0 {
                    locks.held.push((lock_path, file));
                    break;
                }
                // The previous holder deleted this file while we waited for it; the name
                // may already be locked through a new file, so start over with the name.
                tracing::debug!("lock file {} has become stale", lock_path.display());
            }
        }
        Ok(Some(locks))
    }

    /// Whether the lock files are removed when the locks are released (as after a
    /// successful build, when no one will need them again soon).
    pub fn set_deletion(&mut self, delete: bool) {
        self.delete = delete;
    }

    /// Releases all locks now.
    pub fn unlock(mut self) {
        self.release();
    }

    fn release(&mut self) {
        for (path, file) in self.held.drain(..) {
            if self.delete {
                delete_lock_file(&path, &file);
            }
            // Unlock explicitly: closing our descriptor alone would leave the flock held
            // while a child forked by another thread still has a copy of it (until its
            // exec closes the close-on-exec descriptor).
            let _ = lock_file(&file, LockType::None, false);
            drop(file);
        }
    }
}

impl Drop for PathLocks {
    fn drop(&mut self) {
        self.release();
    }
}

/// `rename(2)` that fails with `EEXIST` (`AlreadyExists`) instead of replacing `to`, also
/// when `to` is an empty directory another process just made.
pub fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    nix::fcntl::renameat2(
        None,
        from,
        None,
        to,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )
    .map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};
    use std::time::Duration;

    // Cross-process tests re-run this test binary, filtered to the calling test, with
    // these variables set; the test then starts with `child_dispatch`, which plays the
    // other process and exits instead of running the test body.
    const CHILD_ENV: &str = "NIXB_LOCKS_TEST_CHILD";
    const CHILD_PATH: &str = "NIXB_LOCKS_TEST_PATH";

    fn child_dispatch() {
        let Ok(mode) = std::env::var(CHILD_ENV) else {
            return;
        };
        let path = PathBuf::from(std::env::var(CHILD_PATH).unwrap());
        match mode.as_str() {
            // Try without waiting; report the outcome through the exit code.
            "try" => {
                let got = PathLocks::lock(&[path], false, None).unwrap();
                std::process::exit(if got.is_some() { 0 } else { 3 });
            }
            // Hold the lock until stdin closes, then delete the lock file.
            "hold" => {
                let mut l = PathLocks::lock(&[path], true, None).unwrap().unwrap();
                l.set_deletion(true);
                println!("locked");
                let mut s = String::new();
                let _ = std::io::stdin().read_line(&mut s);
                drop(l);
                std::process::exit(0);
            }
            m => panic!("unknown child mode {m}"),
        }
    }

    fn child(test: &str, mode: &str, path: &Path) -> Command {
        let mut c = Command::new(std::env::current_exe().unwrap());
        c.args([
            "--exact",
            &format!("locks::tests::{test}"),
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, mode)
        .env(CHILD_PATH, path);
        c
    }

    #[test]
    fn lock_held_here_blocks_another_process() {
        child_dispatch();
        let t = "lock_held_here_blocks_another_process";
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out");
        let locks = PathLocks::lock(std::slice::from_ref(&p), false, None)
            .unwrap()
            .unwrap();
        assert!(dir.path().join("out.lock").exists());
        let st = child(t, "try", &p).status().unwrap();
        assert_eq!(st.code(), Some(3), "child got a lock the parent holds");
        drop(locks);
        let st = child(t, "try", &p).status().unwrap();
        assert_eq!(st.code(), Some(0), "child could not lock after release");
    }

    #[test]
    fn same_process_second_attempt_fails() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        let _a = PathLocks::lock(std::slice::from_ref(&p), false, None)
            .unwrap()
            .unwrap();
        assert!(PathLocks::lock(&[p], false, None).unwrap().is_none());
    }

    #[test]
    fn failed_set_releases_what_it_took() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let _hold_b = PathLocks::lock(std::slice::from_ref(&b), false, None)
            .unwrap()
            .unwrap();
        assert!(PathLocks::lock(&[b.clone(), a.clone()], false, None)
            .unwrap()
            .is_none());
        // `a` sorts first and was taken before `b` failed; it must be free again.
        assert!(PathLocks::lock(&[a], false, None).unwrap().is_some());
    }

    #[test]
    fn waiter_survives_deletion_by_holder() {
        child_dispatch();
        waiter_survives_deletion("waiter_survives_deletion_by_holder", "hold");
    }

    fn waiter_survives_deletion(t: &str, holder_mode: &str) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out");
        let mut holder = child(t, holder_mode, &p)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(holder.stdout.take().unwrap());
        // The test harness prints its own lines first.
        let mut seen = String::new();
        loop {
            let mut line = String::new();
            let n = std::io::BufRead::read_line(&mut out, &mut line).unwrap();
            seen.push_str(&line);
            if line.trim_end().ends_with("locked") {
                break;
            }
            assert!(n > 0, "holder exited before locking; it said {seen:?}");
        }

        // Open the lock file by name now, as a waiter would, then let the holder delete it.
        let waiter = std::thread::spawn({
            let p = p.clone();
            move || PathLocks::lock(&[p], true, None).unwrap().unwrap()
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !waiter.is_finished(),
            "waiter got the lock while the child held it"
        );
        drop(holder.stdin.take());
        assert!(holder.wait().unwrap().success());
        let got = waiter.join().unwrap();
        // The waiter must hold a lock on a file that still has the name, not on the
        // deleted (stale) one: another process must be unable to take it.
        assert!(dir.path().join("out.lock").exists());
        assert_eq!(
            std::fs::metadata(dir.path().join("out.lock"))
                .unwrap()
                .len(),
            0
        );
        assert_eq!(child(t, "try", &p).status().unwrap().code(), Some(3));
        drop(got);
    }

    #[test]
    fn deletion_removes_lock_file_and_marks_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("y");
        let mut l = PathLocks::lock(std::slice::from_ref(&p), false, None)
            .unwrap()
            .unwrap();
        let lf = dir.path().join("y.lock");
        let keep = File::open(&lf).unwrap();
        l.set_deletion(true);
        drop(l);
        assert!(!lf.exists());
        assert_eq!(
            keep.metadata().unwrap().len(),
            1,
            "stale marker byte missing"
        );
    }

    #[test]
    fn read_locks_share_write_excludes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("big-lock");
        let a = open_lock_file(&f, true).unwrap().unwrap();
        let b = open_lock_file(&f, true).unwrap().unwrap();
        assert!(lock_file(&a, LockType::Read, false).unwrap());
        assert!(lock_file(&b, LockType::Read, false).unwrap());
        assert!(!lock_file(&b, LockType::Write, false).unwrap());
        assert!(lock_file(&a, LockType::None, false).unwrap());
        assert!(lock_file(&b, LockType::Write, false).unwrap());
        assert!(!lock_file(&a, LockType::Read, false).unwrap());
        assert!(open_lock_file(&dir.path().join("missing"), false)
            .unwrap()
            .is_none());
    }
}
