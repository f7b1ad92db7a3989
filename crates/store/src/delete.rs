//! Deleting a file or directory tree that may be read-only, as store paths, build
//! directories and half-unpacked downloads are.
//!
//! One function for every crate that deletes trees (the store, the engine, the binary
//! cache reader, the serve protocol), so that all of them treat permissions and races the
//! same way: a directory without owner `rwx` gets it before it is read (a canonicalised
//! store path is `0555`, a builder may leave a `0000` directory behind), and an entry that
//! disappears meanwhile (another process deleting the same tree) is not an error. Symlinks
//! are removed, never followed.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A step of a deletion that failed, with the entry it failed on (which may lie deep
/// inside the tree being deleted).
#[derive(Debug, thiserror::Error)]
#[error("{step} '{}': {source}", path.display())]
pub struct DeleteError {
    pub step: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// For callers that speak `io::Error`: the same kind, the message naming step and entry.
impl From<DeleteError> for io::Error {
    fn from(e: DeleteError) -> io::Error {
        io::Error::new(e.source.kind(), e)
    }
}

/// Removes whatever is at `path`: a file, a symlink or a whole directory tree. A path that
/// does not exist is fine.
pub fn delete_path(path: &Path) -> Result<(), DeleteError> {
    delete_top(path, None)
}

/// [`delete_path`], also returning the bytes freed as Nix's collector counts them: the size
/// of each file with one or two links (two: most likely shared only with `.links`, whose
/// entry goes once it is the last link). Costs a stat per file.
pub fn delete_path_counting(path: &Path) -> Result<u64, DeleteError> {
    let mut freed = 0;
    delete_top(path, Some(&mut freed))?;
    Ok(freed)
}

/// [`delete_path_counting`] for the entry `name` of the open directory `dir` (at
/// `dir_path`, which errors name): a file or symlink is examined and removed relative to
/// `dir`, one path component to resolve instead of the whole path twice (a collector
/// removes a hundred thousand store paths in a row); a directory goes as
/// [`delete_path_counting`] deletes it.
pub fn delete_entry_counting(
    dir: &fs::File,
    dir_path: &Path,
    name: &str,
) -> Result<u64, DeleteError> {
    use rustix::fs::{statat, unlinkat, AtFlags, FileType};
    use rustix::io::Errno;
    let fail = |step| {
        move |e: Errno| DeleteError {
            step,
            path: dir_path.join(name),
            source: e.into(),
        }
    };
    let st = match statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::NOENT) => return Ok(0),
        Err(e) => return Err(fail("examining")(e)),
    };
    if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
        return delete_path_counting(&dir_path.join(name));
    }
    let freed = if matches!(st.st_nlink, 1 | 2) {
        st.st_size as u64
    } else {
        0
    };
    match unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => Ok(freed),
        Err(e) => Err(fail("removing")(e)),
    }
}

fn delete_top(path: &Path, freed: Option<&mut u64>) -> Result<(), DeleteError> {
    match fs::symlink_metadata(path) {
        Ok(m) => delete_entry(path, m.is_dir(), Some(&m), freed),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DeleteError {
            step: "examining",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Puts `replacement` (a file or tree on the same file system) where `path` is, as repair
/// and `--check` do with a rebuilt or re-fetched store path: whatever is at `path` is
/// first renamed aside (`<path>.old-<pid>-<nanos>`, no store path name), so that `path`
/// never holds a half-replaced tree, then `replacement` is renamed to `path`, then the old
/// copy is deleted. A failure names the step; once `replacement` is in place, the only
/// failure left is deleting the old copy, whose name the error gives.
pub fn replace_path(path: &Path, replacement: &Path) -> Result<(), DeleteError> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut old = path.as_os_str().to_owned();
    old.push(format!(".old-{}-{nanos}", std::process::id()));
    let old = PathBuf::from(old);
    let had_old = match fs::symlink_metadata(path) {
        Ok(_) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(source) => {
            return Err(DeleteError {
                step: "examining",
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if had_old {
        fs::rename(path, &old).map_err(|source| DeleteError {
            step: "moving aside",
            path: path.to_path_buf(),
            source,
        })?;
    }
    fs::rename(replacement, path).map_err(|source| DeleteError {
        step: "moving into place",
        path: replacement.to_path_buf(),
        source,
    })?;
    if had_old {
        delete_path(&old)?;
    }
    Ok(())
}

/// Deletes `path`, whose type is known and whose metadata may be (`meta`, saving a stat).
fn delete_entry(
    path: &Path,
    is_dir: bool,
    meta: Option<&fs::Metadata>,
    freed: Option<&mut u64>,
) -> Result<(), DeleteError> {
    let fail = |step| {
        move |source| DeleteError {
            step,
            path: path.to_path_buf(),
            source,
        }
    };
    let gone_is_fine = |r: io::Result<()>| match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    };
    if !is_dir {
        if let Some(freed) = freed {
            let (nlink, size) = match meta {
                Some(m) => (m.nlink(), m.size()),
                None => match fs::symlink_metadata(path) {
                    Ok(m) => (m.nlink(), m.size()),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                    Err(e) => return Err(fail("examining")(e)),
                },
            };
            if matches!(nlink, 1 | 2) {
                *freed += size;
            }
        }
        return gone_is_fine(fs::remove_file(path)).map_err(fail("removing"));
    }
    let mode = match meta {
        Some(m) => m.permissions().mode(),
        None => match fs::symlink_metadata(path) {
            Ok(m) => m.permissions().mode(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(fail("examining")(e)),
        },
    };
    if mode & 0o700 != 0o700 {
        gone_is_fine(fs::set_permissions(
            path,
            fs::Permissions::from_mode(mode | 0o700),
        ))
        .map_err(fail("making writable"))?;
    }
    let entries = match fs::read_dir(path) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(fail("reading directory")(e)),
    };
    let mut freed = freed;
    for entry in entries {
        let entry = entry.map_err(fail("reading directory"))?;
        // The directory entry's type, without another stat (symlinks report themselves).
        let child_is_dir = match entry.file_type() {
            Ok(t) => t.is_dir(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(fail("examining")(e)),
        };
        delete_entry(&entry.path(), child_is_dir, None, freed.as_deref_mut())?;
    }
    gone_is_fine(fs::remove_dir(path)).map_err(fail("removing directory"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn entries_of_an_open_directory_go_with_their_sizes() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        fs::write(dir.join("f"), b"12345").unwrap();
        fs::write(dir.join("shared"), b"123").unwrap();
        for i in 0..2 {
            fs::hard_link(dir.join("shared"), dir.join(format!("other{i}"))).unwrap();
        }
        symlink("f", dir.join("l")).unwrap();
        fs::create_dir_all(dir.join("t/sub")).unwrap();
        fs::write(dir.join("t/sub/x"), b"1234567").unwrap();
        fs::set_permissions(dir.join("t/sub"), fs::Permissions::from_mode(0o555)).unwrap();
        fs::set_permissions(dir.join("t"), fs::Permissions::from_mode(0o555)).unwrap();
        let fd = fs::File::open(dir).unwrap();
        assert_eq!(delete_entry_counting(&fd, dir, "f").unwrap(), 5);
        // Three links: nothing freed.
        assert_eq!(delete_entry_counting(&fd, dir, "shared").unwrap(), 0);
        // The link's own length (1), not its target's.
        assert_eq!(delete_entry_counting(&fd, dir, "l").unwrap(), 1);
        assert_eq!(delete_entry_counting(&fd, dir, "t").unwrap(), 7);
        assert_eq!(delete_entry_counting(&fd, dir, "missing").unwrap(), 0);
        let left: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(left.iter().all(|n| n.starts_with("other")), "{left:?}");
    }

    #[test]
    fn read_only_trees_go_and_symlinks_are_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("keep"), "x").unwrap();

        let tree = tmp.path().join("tree");
        fs::create_dir_all(tree.join("a/b")).unwrap();
        fs::write(tree.join("a/b/f"), "y").unwrap();
        symlink(&outside, tree.join("a/link")).unwrap();
        fs::create_dir(tree.join("locked")).unwrap();
        fs::write(tree.join("locked/g"), "z").unwrap();
        // A store path's modes, and a directory nobody may even list.
        for (p, m) in [
            ("a/b/f", 0o444),
            ("a/b", 0o555),
            ("a", 0o555),
            ("locked", 0o000),
            ("", 0o555),
        ] {
            fs::set_permissions(tree.join(p), fs::Permissions::from_mode(m)).unwrap();
        }
        delete_path(&tree).unwrap();
        assert!(!tree.exists());
        assert!(outside.join("keep").exists(), "followed a symlink");

        // A lone file, a lone symlink, and nothing at all.
        let f = tmp.path().join("file");
        fs::write(&f, "").unwrap();
        delete_path(&f).unwrap();
        assert!(!f.exists());
        let l = tmp.path().join("dangling");
        symlink("/nonexistent", &l).unwrap();
        delete_path(&l).unwrap();
        assert!(fs::symlink_metadata(&l).is_err());
        delete_path(&tmp.path().join("never-was")).unwrap();
    }

    #[test]
    fn replace_swaps_in_the_new_tree_and_deletes_the_old() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("p");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("f"), "old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o555)).unwrap();
        let new = tmp.path().join("new");
        fs::create_dir(&new).unwrap();
        fs::write(new.join("f"), "new").unwrap();
        replace_path(&path, &new).unwrap();
        assert_eq!(fs::read_to_string(path.join("f")).unwrap(), "new");
        assert!(!new.exists());
        let names: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("p")], "old copy left");
        // Nothing there before: the replacement just moves in.
        let fresh = tmp.path().join("fresh");
        let src = tmp.path().join("src");
        fs::write(&src, "x").unwrap();
        replace_path(&fresh, &src).unwrap();
        assert_eq!(fs::read_to_string(&fresh).unwrap(), "x");
        // A missing replacement leaves the old path where it was.
        let e = replace_path(&fresh, &tmp.path().join("nope")).unwrap_err();
        assert_eq!(e.step, "moving into place");
        assert!(fs::read_dir(tmp.path()).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("fresh.old-")));
    }

    #[test]
    fn a_failure_names_the_entry_and_the_step() {
        // A file below a path component that is not a directory cannot be examined.
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("file");
        fs::write(&f, "").unwrap();
        let e = delete_path(&f.join("below")).unwrap_err();
        assert_eq!(e.step, "examining");
        assert_eq!(e.path, f.join("below"));
        assert!(e.to_string().starts_with("examining '"), "{e}");
    }
}
