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
//! ```

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

/// The build directories of one worker, under one root.
#[derive(Debug)]
pub struct BuildDirs {
    root: PathBuf,
}

impl BuildDirs {
    pub fn new(root: &Path) -> BuildDirs {
        BuildDirs {
            root: root.to_path_buf(),
        }
    }

    /// An empty directory `<root>/nix-build-<name>-<n>` with mode 0700, locked.
    pub fn create(&mut self, name: &str) -> Result<BuildDir, BuildDirError> {
        BuildDir::create(&self.root, name)
    }

    /// Ends a build's use of `dir`: deletes it.
    pub fn remove(&mut self, dir: BuildDir) -> Result<(), BuildDirError> {
        dir.remove()
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
}
