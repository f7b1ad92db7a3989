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
//!
//! # Recycled lock files ([`LockFilePool`])
//!
//! Deleting a lock file after every build frees an inode, and creating the next one
//! allocates one. On ext4 without a journal the inode allocator skips every inode of the
//! group freed in the last 60 seconds (360 while its inode table block is dirty), one
//! buffer-cache lookup each, so each free makes every later file creation in that group
//! slower, the builders' included (the measurement: BENCHMARKS.md, "store: recycled lock
//! files"). With a pool, a released lock file
//! is *renamed* out of the way instead of unlinked, and the next lock file is that inode
//! renamed into place: no inode is freed or allocated.
//!
//! ```text
//! retire (instead of unlink)  rename <path>.lock -> <pool>/<pid>-<n> (no replace) ;
//!                             write the stale byte unless the lease test below
//!                             succeeds ; unlock ; keep the descriptor
//! take (instead of create)    F_SETLEASE F_WRLCK succeeds (no other open file
//!                             description of the inode exists anywhere), F_UNLCK ;
//!                             truncate to 0 if not empty ; rename <pool>/<pid>-<n> ->
//!                             <path>.lock (no replace; EEXIST: open the existing file
//!                             instead)
//! ```
//!
//! The stale byte is for processes blocked on the file, and each of those holds it open.
//! Once the file is renamed away nobody can open it by its old name, so when the lease
//! test finds no other open description right after the rename, nobody waits on it and
//! the byte (and the truncation that would take it out again) is skipped: a write that
//! dirties a page and a truncation per build less.
//!
//! To everyone else this is Nix's protocol: the name disappears while the lock is held,
//! and a waiter blocked on the old file finds the stale byte and retries the name. The
//! lease test is what makes reuse safe: a waiter (Nix or nixb) that opened the old name
//! holds the file open until it has seen the stale byte, and while anyone holds it the
//! lease is refused and the inode is not reused (it is left in the pool directory). Only
//! nixb opens pool entries, and only to run the same test. Entries left by a process that
//! died are taken by the next one; Nix's garbage collector may delete them, which only
//! makes a rename fail and a fresh file be created.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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
    /// Where deleted lock files go, and fresh ones come from (see the module doc).
    pool: Option<Arc<LockFilePool>>,
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
        Self::lock_with_pool(paths, wait, wait_msg, None)
    }

    /// As [`PathLocks::lock`], taking lock files from `pool` and giving deleted ones back
    /// to it (see the module doc).
    pub fn lock_with_pool(
        paths: &[PathBuf],
        wait: bool,
        wait_msg: Option<&str>,
        pool: Option<&Arc<LockFilePool>>,
    ) -> Result<Option<PathLocks>, LockError> {
        let sorted: BTreeSet<&PathBuf> = paths.iter().collect();
        // Built up one lock at a time so that an early return drops (releases) exactly
        // what was acquired so far.
        let mut locks = PathLocks {
            held: Vec::with_capacity(sorted.len()),
            delete: false,
            pool: pool.cloned(),
        };
        for path in sorted {
            let mut lock_path = path.clone().into_os_string();
            lock_path.push(".lock");
            let lock_path = PathBuf::from(lock_path);
            loop {
                let file = match pool.and_then(|p| p.take(&lock_path)) {
                    Some(f) => f,
                    None => create_lock_file(&lock_path)?,
                };
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
                if let Some(pool) = &self.pool {
                    if let Some(name) = pool.retire(&path, &file) {
                        let _ = lock_file(&file, LockType::None, false);
                        pool.keep(name, file);
                        continue;
                    }
                }
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

/// Spare lock files for [`PathLocks::lock_with_pool`]: released lock files renamed into
/// one directory, reused as the next lock files. See the module documentation for why
/// and for the protocol.
#[derive(Debug)]
pub struct LockFilePool {
    dir: PathBuf,
    state: Mutex<PoolState>,
}

#[derive(Debug, Default)]
struct PoolState {
    /// Entries this process holds open: (name in the pool directory, file).
    spares: Vec<(PathBuf, File)>,
    /// The directory was listed for entries left by earlier processes.
    scanned: bool,
    /// The directory is known to exist.
    dir_made: bool,
}

/// Descriptors held per pool: about the number of lock files released between two
/// builds starting, with room for bursts; past it lock files are deleted as usual.
const MAX_SPARES: usize = 64;

static POOL_COUNTER: AtomicU64 = AtomicU64::new(0);

impl LockFilePool {
    /// A pool in `dir` for lock files that live in `lock_dir`. `None` when the two are
    /// on different file systems (a rename between them would fail) or `lock_dir` cannot
    /// be examined. `dir` itself is made on first use.
    pub fn new(dir: &Path, lock_dir: &Path) -> Option<Arc<LockFilePool>> {
        let parent = dir.parent()?;
        let a = std::fs::metadata(parent).ok()?;
        let b = std::fs::metadata(lock_dir).ok()?;
        if a.dev() != b.dev() {
            return None;
        }
        Some(Arc::new(LockFilePool {
            dir: dir.to_path_buf(),
            state: Mutex::new(PoolState::default()),
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PoolState> {
        // The state is a list of open files; a panic elsewhere cannot corrupt it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many spare lock files this process holds.
    pub fn spare_count(&self) -> usize {
        self.state().spares.len()
    }

    /// A spare lock file renamed to `lock_path`, empty and unlocked, or `None` (take a
    /// fresh file then). Spares someone else holds open are dropped from the pool here.
    fn take(&self, lock_path: &Path) -> Option<File> {
        let mut st = self.state();
        if !st.scanned {
            st.scanned = true;
            self.scan(&mut st);
        }
        while let Some((name, file)) = st.spares.pop() {
            let empty = file.metadata().is_ok_and(|m| m.len() == 0);
            if !nobody_else_has_open(&file) || (!empty && file.set_len(0).is_err()) {
                // Its name stays in the pool directory for a later process.
                continue;
            }
            match rename_noreplace(&name, lock_path) {
                Ok(()) => return Some(file),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    // A lock file exists already: use it, keep the spare.
                    st.spares.push((name, file));
                    return None;
                }
                // Gone (a garbage collector removed it) or unusable: forget it.
                Err(_) => continue,
            }
        }
        None
    }

    /// Adopts entries that processes which have exited left in the directory.
    fn scan(&self, st: &mut PoolState) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        st.dir_made = true;
        for e in entries.flatten() {
            let name = e.path();
            let Ok(file) = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(&name)
            else {
                continue;
            };
            // Another live process's spare (or its lock, in the moment it is renamed out):
            // close it at once, so that its owner's lease test keeps succeeding.
            let regular = file.metadata().map(|m| m.is_file()).unwrap_or(false);
            if regular && nobody_else_has_open(&file) {
                if st.spares.len() < MAX_SPARES {
                    st.spares.push((name, file));
                } else {
                    // More than this process will use, left by processes that have exited:
                    // the directory would otherwise only grow (say, where leases are
                    // refused and nothing is ever taken back out of it).
                    let _ = std::fs::remove_file(&name);
                }
            }
        }
    }

    /// Moves the held lock file `lock_path` into the pool directory (instead of unlinking
    /// it) and writes the stale byte into it; returns its name there. `None` when the
    /// pool is full or the rename failed; the caller deletes the file as usual then.
    fn retire(&self, lock_path: &Path, file: &File) -> Option<PathBuf> {
        let mut st = self.state();
        if st.spares.len() >= MAX_SPARES {
            return None;
        }
        if !st.dir_made {
            match std::fs::create_dir(&self.dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(_) => return None,
            }
            st.dir_made = true;
        }
        let pid = std::process::id();
        for _ in 0..16 {
            let n = POOL_COUNTER.fetch_add(1, Ordering::Relaxed);
            let name = self.dir.join(format!("{pid}-{n}"));
            match rename_noreplace(lock_path, &name) {
                Ok(()) => {
                    // As after an unlink: whoever waits on this file must retry the name.
                    // Only someone who has it open can wait on it (see the module doc).
                    if !nobody_else_has_open(file) {
                        let mut f = file;
                        let _ = f.write_all(b"d");
                    }
                    return Some(name);
                }
                // A leftover of a dead process with our pid and counter value.
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
                Err(_) => return None,
            }
        }
        None
    }

    /// Keeps `file`, which `retire` moved to `name` in the pool, now unlocked.
    fn keep(&self, name: PathBuf, file: File) {
        self.state().spares.push((name, file));
    }
}

/// Whether no open file description of `file`'s inode exists besides `file` (in any
/// process): a write lease is granted only then. Anyone who might still flock the inode
/// holds it open, so this is what makes reusing it safe.
fn nobody_else_has_open(file: &File) -> bool {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl with integer arguments on a descriptor we own.
    let granted = unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_WRLCK) } == 0;
    if granted {
        // SAFETY: as above; drops the lease we were just granted.
        unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK) };
    }
    granted
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
            // As "hold", with lock files from a pool beside the lock file.
            "holdpool" => {
                let dir = path.parent().unwrap();
                let pool = LockFilePool::new(&dir.join("pool"), dir).unwrap();
                let mut l = PathLocks::lock_with_pool(&[path], true, None, Some(&pool))
                    .unwrap()
                    .unwrap();
                l.set_deletion(true);
                println!("locked");
                let mut s = String::new();
                let _ = std::io::stdin().read_line(&mut s);
                drop(l);
                assert_eq!(pool.spare_count(), 1, "lock file not pooled");
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

    #[test]
    fn waiter_survives_deletion_by_pooling_holder() {
        child_dispatch();
        waiter_survives_deletion("waiter_survives_deletion_by_pooling_holder", "holdpool");
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

    fn ino(p: &Path) -> u64 {
        std::fs::symlink_metadata(p).unwrap().ino()
    }

    fn pooled(p: &Path, pool: &Arc<LockFilePool>) -> PathLocks {
        let mut l = PathLocks::lock_with_pool(&[p.to_path_buf()], false, None, Some(pool))
            .unwrap()
            .unwrap();
        l.set_deletion(true);
        l
    }

    #[test]
    fn pool_reuses_the_inode_of_a_deleted_lock_file() {
        let dir = tempfile::tempdir().unwrap();
        let pool = LockFilePool::new(&dir.path().join("pool"), dir.path()).unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let la = pooled(&a, &pool);
        let a_ino = ino(&dir.path().join("a.lock"));
        drop(la);
        assert!(!dir.path().join("a.lock").exists(), "lock file not deleted");
        assert_eq!(pool.spare_count(), 1);
        // Nobody had it open, so nobody waits on it: no stale byte was written.
        let spare = std::fs::read_dir(dir.path().join("pool"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        assert_eq!(std::fs::metadata(&spare).unwrap().len(), 0);
        let lb = pooled(&b, &pool);
        let b_lock = dir.path().join("b.lock");
        assert_eq!(ino(&b_lock), a_ino, "a fresh inode was allocated");
        assert_eq!(
            std::fs::metadata(&b_lock).unwrap().len(),
            0,
            "stale byte kept"
        );
        assert_eq!(pool.spare_count(), 0);
        // It is a working lock: nobody else gets it, and it is free once released.
        assert!(PathLocks::lock(std::slice::from_ref(&b), false, None)
            .unwrap()
            .is_none());
        drop(lb);
        assert!(!b_lock.exists());
        assert!(PathLocks::lock(&[b], false, None).unwrap().is_some());
    }

    #[test]
    fn pool_never_reuses_a_file_someone_still_has_open() {
        let dir = tempfile::tempdir().unwrap();
        let pool = LockFilePool::new(&dir.path().join("pool"), dir.path()).unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let la = pooled(&a, &pool);
        let a_lock = dir.path().join("a.lock");
        let a_ino = ino(&a_lock);
        // A waiter opened the name while the lock was held (it would block in flock).
        let waiter = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&a_lock)
            .unwrap();
        drop(la);
        // The waiter, once it gets the lock, sees the file was deleted.
        assert!(lock_file(&waiter, LockType::Write, false).unwrap());
        assert_eq!(waiter.metadata().unwrap().len(), 1, "stale byte missing");
        // Reusing that inode for b would hand the waiter b's lock: a fresh file it is.
        let _lb = pooled(&b, &pool);
        assert_ne!(ino(&dir.path().join("b.lock")), a_ino);
        assert_eq!(waiter.metadata().unwrap().len(), 1);
    }

    #[test]
    fn pool_adopts_spares_of_an_exited_process() {
        let dir = tempfile::tempdir().unwrap();
        let pool_dir = dir.path().join("pool");
        let a = dir.path().join("a");
        let first = LockFilePool::new(&pool_dir, dir.path()).unwrap();
        drop(pooled(&a, &first));
        let a_ino = ino(&std::fs::read_dir(&pool_dir)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path());
        // Another pool on the same directory while the first still holds its spare.
        let other = LockFilePool::new(&pool_dir, dir.path()).unwrap();
        let _lc = pooled(&dir.path().join("c"), &other);
        assert_ne!(ino(&dir.path().join("c.lock")), a_ino, "took a live spare");
        // The first process exits; its spare is free for the next one. A lease is refused
        // while any other process has the inode open, and a child that another test thread
        // is spawning holds copies of all our descriptors until it execs; then the spare
        // stays in the directory for a later pool, so a fresh pool tries again.
        drop(first);
        let b_lock = dir.path().join("b.lock");
        let taken = (0..100).find_map(|_| {
            let next = LockFilePool::new(&pool_dir, dir.path()).unwrap();
            next.take(&b_lock)
        });
        let taken = taken.expect("the exited pool's spare was never free");
        assert_eq!(taken.metadata().unwrap().ino(), a_ino);
        assert_eq!(ino(&b_lock), a_ino);
    }

    /// Leftovers of exited processes beyond what one pool holds are deleted when a pool
    /// first looks at the directory, so the directory cannot only grow; entries another
    /// live process holds open stay.
    #[test]
    fn pool_directory_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let pool_dir = dir.path().join("pool");
        std::fs::create_dir(&pool_dir).unwrap();
        for i in 0..MAX_SPARES + 40 {
            std::fs::write(pool_dir.join(format!("1-{i}")), "").unwrap();
        }
        // One held open elsewhere (another live process's spare).
        let held = File::open(pool_dir.join("1-0")).unwrap();
        let pool = LockFilePool::new(&pool_dir, dir.path()).unwrap();
        let _l = pooled(&dir.path().join("x"), &pool);
        let left: Vec<_> = std::fs::read_dir(&pool_dir).unwrap().flatten().collect();
        // One pool's worth plus the held one (104 before), with a little room for
        // entries whose lease was refused for a moment because another test thread was
        // spawning a child (which holds copies of our descriptors until it execs).
        assert!(left.len() <= MAX_SPARES + 8, "{} entries left", left.len());
        assert!(
            pool_dir.join("1-0").exists(),
            "deleted a file someone holds open"
        );
        drop(held);
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
