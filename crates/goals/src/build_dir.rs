//! Build directories `<root>/nix-build-<drv name>-<n>` that no crash can leak.
//!
//! Each live build directory has a lock file `<dir>.nixb-lock` on which its worker holds a
//! `flock`. The kernel drops the lock when the worker dies, however it dies (SIGKILL
//! included), so the next worker to start finds the lock free and deletes the directory.
//! Directories without a lock file (kept with keep-failed, or made by other programs) are
//! never touched.
//!
//! ```text
//! create   mkdir <dir> 0700 (picking the first free n) ; write+flock a temp file ;
//!          rename it to <dir>.nixb-lock  (so the final name is never seen unlocked)
//! finish   delete <dir> ; unlink the lock file ; unlock
//! keep     chmod 0755 <dir> ; unlink the lock file ; unlock
//! clean    for each *.nixb-lock we can flock: unlink it, then delete its <dir>
//! recycle  empty <dir> ; keep it (and its locked lock file) as a spare
//! reuse    link <spare>.nixb-lock to <new>.nixb-lock ; rename <spare> to <new> (no
//!          replace) ; unlink <spare>.nixb-lock
//! ```
//!
//! # Why directories are recycled
//!
//! Removing a directory frees its data block, and `rmdir` can then block for a long time
//! compared with a short build; creating an inode gets slower with every inode deleted in
//! the last minutes (ext4 without a journal skips recently freed inodes one by one). With
//! builders that run for a millisecond that was the largest cost of a build after the fork
//! (BENCHMARKS.md, "goals: recycled build directories"). [`BuildDirs`] therefore empties a finished build's directory and renames
//! it for the next build: no inode is created or freed for the directory or its lock file.
//! At every step of a reuse some lock file names each directory that exists, so a crash
//! leaves nothing the next run's cleaning misses. Only directories still ours (owner, mode
//! 0700) are reused; build-user builds chown theirs and get fresh ones. Reuse gives a build
//! no less isolation than a fresh directory: unsandboxed, a leftover process of an earlier
//! build could as well write to the next build's predictable path, and in the sandbox the
//! PID namespace leaves no process behind.

use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

const LOCK_SUFFIX: &str = ".nixb-lock";
const PREFIX: &str = "nix-build-";

#[derive(Debug, thiserror::Error)]
#[error("{step} '{}': {source}", path.display())]
pub struct BuildDirError {
    pub step: &'static str,
    pub path: PathBuf,
    pub source: io::Error,
}

fn err<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> BuildDirError + 'a {
    move |source| BuildDirError {
        step,
        path: path.to_path_buf(),
        source,
    }
}

/// A build directory owned by this process.
#[derive(Debug)]
pub struct BuildDir {
    path: PathBuf,
    lock_path: PathBuf,
    lock: Option<File>,
}

fn try_flock(f: &File) -> io::Result<bool> {
    // SAFETY: flock on a descriptor we own.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        Ok(true)
    } else {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(false)
        } else {
            Err(e)
        }
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

impl BuildDir {
    /// Makes a fresh `<root>/nix-build-<name>-<n>` with mode 0700.
    pub fn create(root: &Path, name: &str) -> Result<BuildDir, BuildDirError> {
        fs::create_dir_all(root).map_err(err("creating build directory root", root))?;
        let path = loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let p = root.join(format!("{PREFIX}{name}-{n}"));
            match fs::DirBuilder::new().mode(0o700).create(&p) {
                Ok(()) => break p,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(err("creating build directory", &p)(e)),
            }
        };
        let mut lock_path = path.clone().into_os_string();
        lock_path.push(LOCK_SUFFIX);
        let lock_path = PathBuf::from(lock_path);
        let tmp = root.join(format!(
            ".nixb-lock-tmp-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let file = File::create(&tmp).map_err(err("creating lock file", &tmp))?;
        if !try_flock(&file).map_err(err("locking", &tmp))? {
            let _ = fs::remove_file(&tmp);
            return Err(BuildDirError {
                step: "locking",
                path: tmp,
                source: io::Error::from_raw_os_error(libc::EWOULDBLOCK),
            });
        }
        fs::rename(&tmp, &lock_path).map_err(err("renaming lock file into place", &lock_path))?;
        Ok(BuildDir {
            path,
            lock_path,
            lock: Some(file),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Deletes the directory (the normal end of a build).
    pub fn remove(mut self) -> Result<(), BuildDirError> {
        self.release(false)
    }

    /// Keeps the directory for inspection (keep-failed): readable by others, and no longer
    /// a candidate for cleaning.
    pub fn keep(mut self) -> Result<PathBuf, BuildDirError> {
        self.release(true)?;
        Ok(self.path.clone())
    }

    fn release(&mut self, keep: bool) -> Result<(), BuildDirError> {
        let Some(lock) = self.lock.take() else {
            return Ok(());
        };
        let r = if keep {
            fs::set_permissions(&self.path, fs::Permissions::from_mode(0o755))
                .map_err(err("making build directory readable", &self.path))
        } else {
            delete_path(&self.path).map_err(err("deleting build directory", &self.path))
        };
        let _ = fs::remove_file(&self.lock_path);
        drop(lock);
        r
    }
}

impl BuildDir {
    /// Moves this (empty) directory and its lock to a fresh `<root>/nix-build-<name>-<n>`,
    /// holding the lock throughout. Gives the directory back when that fails.
    fn rename_to(mut self, root: &Path, name: &str) -> Result<BuildDir, BuildDir> {
        // Give up after a few hundred names taken by others; a fresh directory will do.
        for _ in 0..256 {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = root.join(format!("{PREFIX}{name}-{n}"));
            let mut lock_path = path.clone().into_os_string();
            lock_path.push(LOCK_SUFFIX);
            let lock_path = PathBuf::from(lock_path);
            // A second name for the locked lock file first: the directory is named by a
            // lock file under both its old and its new name.
            match fs::hard_link(&self.lock_path, &lock_path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(_) => return Err(self),
            }
            match nixb_store::locks::rename_noreplace(&self.path, &path) {
                Ok(()) => {}
                Err(e) => {
                    let _ = fs::remove_file(&lock_path);
                    if e.kind() == io::ErrorKind::AlreadyExists {
                        continue;
                    }
                    return Err(self);
                }
            }
            // Only a name: if it stays, the next run's cleaning unlinks it.
            let _ = fs::remove_file(&self.lock_path);
            self.path = path;
            self.lock_path = lock_path;
            return Ok(self);
        }
        Err(self)
    }
}

/// The build directories of one worker: hands out fresh ones, and keeps the emptied
/// directories of finished builds for reuse (see the module documentation).
#[derive(Debug)]
pub struct BuildDirs {
    root: PathBuf,
    spares: Vec<BuildDir>,
    max_spares: usize,
}

impl BuildDirs {
    /// Directories under `root`, keeping at most `max_spares` empty ones (about the number
    /// of builds that run at once).
    pub fn new(root: &Path, max_spares: usize) -> BuildDirs {
        BuildDirs {
            root: root.to_path_buf(),
            spares: Vec::new(),
            max_spares,
        }
    }

    /// An empty directory `<root>/nix-build-<name>-<n>` with mode 0700, locked.
    pub fn create(&mut self, name: &str) -> Result<BuildDir, BuildDirError> {
        while let Some(spare) = self.spares.pop() {
            match spare.rename_to(&self.root, name) {
                Ok(dir) => return Ok(dir),
                // Dropping it deletes it.
                Err(spare) => drop(spare),
            }
        }
        BuildDir::create(&self.root, name)
    }

    /// Ends a build's use of `dir`: its contents are deleted and the directory is kept
    /// for the next build, or deleted when it cannot be reused.
    pub fn recycle(&mut self, dir: BuildDir) -> Result<(), BuildDirError> {
        if self.spares.len() >= self.max_spares || !empty_and_reusable(dir.path()) {
            return dir.remove();
        }
        self.spares.push(dir);
        Ok(())
    }

    /// How many emptied directories are kept for reuse.
    pub fn spare_count(&self) -> usize {
        self.spares.len()
    }
}

impl Drop for BuildDirs {
    fn drop(&mut self) {
        // Each removal blocks on the file system for a moment; overlap them.
        let spares = std::mem::take(&mut self.spares);
        if spares.len() <= 1 {
            return;
        }
        std::thread::scope(|s| {
            for d in spares {
                if std::thread::Builder::new()
                    .spawn_scoped(s, move || drop(d))
                    .is_err()
                {
                    // No thread: the directory was dropped (and removed) right here.
                }
            }
        });
    }
}

/// Deletes what is inside `dir` and tells whether the directory itself may serve another
/// build: still a directory owned by us with mode 0700 (a builder may have changed it).
fn empty_and_reusable(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = fs::read_dir(dir) else {
        return false;
    };
    for e in entries {
        let Ok(e) = e else { return false };
        if delete_path(&e.path()).is_err() {
            return false;
        }
    }
    match fs::symlink_metadata(dir) {
        Ok(m) => {
            // SAFETY: geteuid cannot fail.
            let euid = unsafe { libc::geteuid() };
            m.is_dir() && m.uid() == euid && m.mode() & 0o7777 == 0o700
        }
        Err(_) => false,
    }
}

impl Drop for BuildDir {
    fn drop(&mut self) {
        let _ = self.release(false);
    }
}

/// Deletes the build directories under `root` whose worker died. Returns what was removed.
pub fn clean_stale(root: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir(root) else {
        return removed;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(dir_name) = name.strip_suffix(LOCK_SUFFIX) else {
            continue;
        };
        if !dir_name.starts_with(PREFIX) {
            continue;
        }
        let lock_path = e.path();
        let Ok(file) = File::options().write(true).open(&lock_path) else {
            continue;
        };
        if !matches!(try_flock(&file), Ok(true)) {
            continue; // a live worker holds it
        }
        // Unlink the lock first: once it is gone, nobody treats the directory as live or
        // stale, and a new worker cannot pick the same name while the directory exists.
        if fs::remove_file(&lock_path).is_ok() {
            let dir = root.join(dir_name);
            if delete_path(&dir).is_ok() {
                removed.push(dir);
            }
        }
    }
    removed
}

/// Removes a file, symlink or directory tree, making directories writable on the way
/// (builders may leave read-only directories behind); [`nixb_store::delete::delete_path`]
/// as an `io::Error` whose message names the failing step and entry.
pub fn delete_path(path: &Path) -> io::Result<()> {
    Ok(nixb_store::delete::delete_path(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_dirs_survive_cleaning_and_dead_ones_do_not() {
        let root = tempfile::tempdir().unwrap();
        let live = BuildDir::create(root.path(), "a.drv").unwrap();
        assert!(live
            .path()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("nix-build-a.drv-"));
        // A dead worker's directory: lock file present, nobody holds it.
        let dead = root.path().join("nix-build-b.drv-7");
        fs::create_dir(&dead).unwrap();
        fs::write(dead.join("f"), "x").unwrap();
        File::create(root.path().join("nix-build-b.drv-7.nixb-lock")).unwrap();
        // Not ours: no lock file.
        let foreign = root.path().join("nix-build-c.drv-0");
        fs::create_dir(&foreign).unwrap();

        assert_eq!(clean_stale(root.path()), vec![dead.clone()]);
        assert!(!dead.exists());
        assert!(live.path().exists());
        assert!(foreign.exists());

        let kept = live.keep().unwrap();
        assert!(kept.exists());
        assert!(clean_stale(root.path()).is_empty());
        assert!(kept.exists());
    }

    #[test]
    fn remove_deletes_read_only_trees() {
        let root = tempfile::tempdir().unwrap();
        let d = BuildDir::create(root.path(), "x.drv").unwrap();
        let p = d.path().to_path_buf();
        fs::create_dir(p.join("ro")).unwrap();
        fs::write(p.join("ro/f"), "x").unwrap();
        fs::set_permissions(p.join("ro"), fs::Permissions::from_mode(0o500)).unwrap();
        d.remove().unwrap();
        assert!(!p.exists());
        assert_eq!(
            fs::read_dir(root.path()).unwrap().count(),
            0,
            "lock file left behind"
        );
    }

    fn ino(p: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        fs::symlink_metadata(p).unwrap().ino()
    }

    fn names(root: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn recycled_directory_is_emptied_renamed_and_stays_locked() {
        let root = tempfile::tempdir().unwrap();
        let mut dirs = BuildDirs::new(root.path(), 2);
        let a = dirs.create("a.drv").unwrap();
        let a_path = a.path().to_path_buf();
        let a_ino = ino(&a_path);
        fs::create_dir(a_path.join("sub")).unwrap();
        fs::write(a_path.join("sub/f"), "x").unwrap();
        fs::set_permissions(a_path.join("sub"), fs::Permissions::from_mode(0o500)).unwrap();
        dirs.recycle(a).unwrap();
        assert_eq!(dirs.spare_count(), 1);

        let b = dirs.create("b.drv").unwrap();
        assert_eq!(dirs.spare_count(), 0);
        let b_name = b.path().file_name().unwrap().to_str().unwrap().to_string();
        assert!(b_name.starts_with("nix-build-b.drv-"), "{b_name}");
        assert_eq!(ino(b.path()), a_ino, "the directory was not reused");
        assert_eq!(fs::read_dir(b.path()).unwrap().count(), 0, "not emptied");
        // Exactly the new directory and its lock file are left under root.
        assert_eq!(
            names(root.path()),
            vec![b_name.clone(), format!("{b_name}.nixb-lock")]
        );
        // The lock is still held: a cleaner (another worker) must leave it alone.
        assert!(clean_stale(root.path()).is_empty());
        assert!(b.path().exists());

        dirs.recycle(b).unwrap();
        drop(dirs);
        assert!(names(root.path()).is_empty(), "{:?}", names(root.path()));
    }

    #[test]
    fn directories_changed_by_the_builder_or_beyond_the_cap_are_removed() {
        let root = tempfile::tempdir().unwrap();
        let mut dirs = BuildDirs::new(root.path(), 1);
        let (a, b, c) = (
            dirs.create("a.drv").unwrap(),
            dirs.create("b.drv").unwrap(),
            dirs.create("c.drv").unwrap(),
        );
        let (pa, pb, pc) = (
            a.path().to_path_buf(),
            b.path().to_path_buf(),
            c.path().to_path_buf(),
        );
        // A builder made its top directory world-readable: not reused.
        fs::set_permissions(&pa, fs::Permissions::from_mode(0o755)).unwrap();
        dirs.recycle(a).unwrap();
        assert!(!pa.exists());
        dirs.recycle(b).unwrap();
        assert!(pb.exists(), "kept as a spare");
        dirs.recycle(c).unwrap();
        assert!(!pc.exists(), "over the cap of one spare");
        assert_eq!(dirs.spare_count(), 1);
    }

    #[test]
    fn reuse_never_takes_a_name_someone_else_holds() {
        let root = tempfile::tempdir().unwrap();
        let mut dirs = BuildDirs::new(root.path(), 1);
        let a = dirs.create("x.drv").unwrap();
        dirs.recycle(a).unwrap();
        // Names the counter will give next are taken by other processes: directories for
        // some, lock files for others (other tests may take counter values meanwhile).
        let n = COUNTER.load(Ordering::Relaxed);
        let mut foreign = Vec::new();
        for k in n..n + 40 {
            let d = root.path().join(format!("nix-build-x.drv-{k}"));
            if k % 2 == 0 {
                fs::create_dir(&d).unwrap();
                foreign.push(d);
            } else {
                let l = root.path().join(format!("nix-build-x.drv-{k}.nixb-lock"));
                fs::write(&l, "").unwrap();
                foreign.push(l);
            }
        }
        let b = dirs.create("x.drv").unwrap();
        assert!(!foreign.iter().any(|f| f.as_path() == b.path()));
        for f in &foreign {
            assert!(f.exists(), "{} was replaced", f.display());
        }
        for f in foreign.iter().filter(|f| f.is_dir()) {
            assert_eq!(fs::read_dir(f).unwrap().count(), 0);
        }
    }

    #[test]
    fn a_reuse_interrupted_at_any_step_is_cleaned_by_the_next_run() {
        // The on-disk states a crash can leave mid-reuse, with the lock released (the
        // process is gone): both must be cleaned completely.
        for renamed in [false, true] {
            let root = tempfile::tempdir().unwrap();
            let old = root.path().join("nix-build-a.drv-1");
            let new = root.path().join("nix-build-b.drv-2");
            let old_lock = root.path().join("nix-build-a.drv-1.nixb-lock");
            let new_lock = root.path().join("nix-build-b.drv-2.nixb-lock");
            fs::create_dir(&old).unwrap();
            fs::write(&old_lock, "").unwrap();
            fs::hard_link(&old_lock, &new_lock).unwrap();
            if renamed {
                fs::rename(&old, &new).unwrap();
            }
            clean_stale(root.path());
            assert!(
                names(root.path()).is_empty(),
                "renamed={renamed}: {:?}",
                names(root.path())
            );
        }
    }
}
