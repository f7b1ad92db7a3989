//! Rewriting a file tree in place: the I/O edge of the crate.
//!
//! Nix rewrites hashes in a build output by serialising it to a NAR, running
//! the rewriter over the NAR bytes and restoring it. [`rewrite_tree`] gets the
//! same result without holding the output in memory, by rewriting each of the
//! byte strings a NAR carries:
//!
//! * regular file contents, streamed in place (same length, so every chunk is
//!   written back where it came from; the inode, its mode and any other hard
//!   links are kept);
//! * symlink targets (the link is replaced);
//! * directory entry names (the entry is renamed).
//!
//! This equals rewriting the NAR whenever no match can span two of those
//! strings or fall inside NAR framing, which holds for patterns that contain
//! no NUL byte and are longer than NAR's longest keyword (13 bytes,
//! `nix-archive-1`): every NAR string is preceded by a little-endian 64-bit
//! length whose high byte is NUL. Store hashes (32 base-32 characters) qualify.
//!
//! The name of `path` itself is not rewritten: it is the caller's to choose.
//! Only regular files, directories and symlinks can occur in a store path;
//! anything else is an error, as it is for Nix's NAR serialiser.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;

use crate::Rewriter;

/// Size of the chunks a file is rewritten in.
const CHUNK: usize = 256 * 1024;

/// Rewrites file contents, symlink targets and entry names below `path`
/// (and `path` itself if it is a file or symlink) in place. See the module
/// documentation for how this relates to rewriting a NAR.
///
/// Files and directories that lack the owner's write bit get it for the
/// duration of their rewrite and have their mode restored afterwards.
/// A file with several hard links inside the tree is rewritten once.
/// Errors name the path at fault.
pub fn rewrite_tree(path: &Path, rewriter: &Rewriter) -> io::Result<()> {
    if rewriter.is_empty() {
        return Ok(());
    }
    let mut seen = HashSet::new();
    rewrite_node(path, rewriter, &mut seen)
}

fn with_path(path: &Path, what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

fn rewrite_node(path: &Path, rw: &Rewriter, seen: &mut HashSet<(u64, u64)>) -> io::Result<()> {
    let meta = fs::symlink_metadata(path).map_err(|e| with_path(path, "cannot stat", e))?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        rewrite_symlink(path, rw)
    } else if ft.is_file() {
        if meta.nlink() > 1 && !seen.insert((meta.dev(), meta.ino())) {
            return Ok(());
        }
        rewrite_file(path, &meta, rw)
    } else if ft.is_dir() {
        rewrite_dir(path, &meta, rw, seen)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "cannot rewrite {}: not a regular file, directory or symlink",
                path.display()
            ),
        ))
    }
}

fn rewrite_symlink(path: &Path, rw: &Rewriter) -> io::Result<()> {
    let target = fs::read_link(path).map_err(|e| with_path(path, "cannot read symlink", e))?;
    let (new, n) = rw.rewrite_all_counted(target.as_os_str().as_bytes());
    if n == 0 {
        return Ok(());
    }
    fs::remove_file(path).map_err(|e| with_path(path, "cannot remove symlink", e))?;
    std::os::unix::fs::symlink(OsStr::from_bytes(&new), path)
        .map_err(|e| with_path(path, "cannot create symlink", e))
}

/// Runs `f` with the owner's write bit set on `path`, restoring the mode after.
fn writable<T>(
    path: &Path,
    meta: &fs::Metadata,
    f: impl FnOnce() -> io::Result<T>,
) -> io::Result<T> {
    let mode = meta.permissions().mode();
    if mode & 0o200 != 0 {
        return f();
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode | 0o200))
        .map_err(|e| with_path(path, "cannot make writable", e))?;
    let res = f();
    let restored = fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| with_path(path, "cannot restore mode of", e));
    let value = res?;
    restored?;
    Ok(value)
}

fn rewrite_file(path: &Path, meta: &fs::Metadata, rw: &Rewriter) -> io::Result<()> {
    // First pass read-only: most files contain no match and are never opened
    // for writing (nor have their mtime or mode touched).
    let file = File::open(path).map_err(|e| with_path(path, "cannot open", e))?;
    if !stream_file(path, &file, rw, false)? {
        return Ok(());
    }
    drop(file);
    writable(path, meta, || {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| with_path(path, "cannot open for writing", e))?;
        stream_file(path, &file, rw, true)?;
        Ok(())
    })
}

/// Streams the file through the rewriter; with `write`, writes the output
/// back at the same offsets. The output lags the input, so it only ever
/// overwrites bytes that have already been read. Returns whether anything
/// was replaced.
fn stream_file(path: &Path, file: &File, rw: &Rewriter, write: bool) -> io::Result<bool> {
    let mut stream = rw.stream();
    let mut buf = vec![0u8; CHUNK];
    let mut out = Vec::with_capacity(CHUNK);
    let mut read_at: u64 = 0;
    let mut write_at: u64 = 0;
    loop {
        let n = match file.read_at(&mut buf, read_at) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(with_path(path, "cannot read", e)),
        };
        out.clear();
        if n == 0 {
            stream.finish_in_place(&mut out);
        } else {
            stream.feed(&buf[..n], &mut out);
            read_at += n as u64;
        }
        // Before the first replacement the output equals the input: skip it.
        if write && stream.replaced() > 0 && !out.is_empty() {
            file.write_all_at(&out, write_at).map_err(|e| {
                with_path(path, &format!("cannot write at offset {write_at} to"), e)
            })?;
        }
        write_at += out.len() as u64;
        if n == 0 {
            break;
        }
        if !write && stream.replaced() > 0 {
            return Ok(true);
        }
    }
    Ok(stream.replaced() > 0)
}

fn rewrite_dir(
    path: &Path,
    meta: &fs::Metadata,
    rw: &Rewriter,
    seen: &mut HashSet<(u64, u64)>,
) -> io::Result<()> {
    let mut names: Vec<OsString> = Vec::new();
    for entry in fs::read_dir(path).map_err(|e| with_path(path, "cannot read directory", e))? {
        let entry = entry.map_err(|e| with_path(path, "cannot read directory", e))?;
        names.push(entry.file_name());
    }
    names.sort();
    let mut renames = Vec::new();
    for name in &names {
        let child = path.join(name);
        rewrite_node(&child, rw, seen)?;
        let (new, n) = rw.rewrite_all_counted(name.as_bytes());
        if n > 0 {
            renames.push((name.clone(), OsString::from_vec(new)));
        }
    }
    if renames.is_empty() {
        return Ok(());
    }
    writable(path, meta, || {
        for (old, new) in &renames {
            let to = path.join(new);
            // rename(2) would silently replace an existing entry; a NAR with
            // two equal names is invalid, so refuse instead.
            if fs::symlink_metadata(&to).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "cannot rename {} to {}: an entry of that name exists",
                        path.join(old).display(),
                        to.display()
                    ),
                ));
            }
            fs::rename(path.join(old), &to)
                .map_err(|e| with_path(&path.join(old), "cannot rename", e))?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw() -> Rewriter {
        Rewriter::new(vec![(b"OLDHASH".to_vec(), b"newhash".to_vec())]).unwrap()
    }

    #[test]
    fn rewrites_contents_links_and_names() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("out");
        fs::create_dir_all(root.join("sub-OLDHASH")).unwrap();
        fs::write(root.join("plain"), b"nothing here").unwrap();
        // A large file with a match straddling a chunk boundary.
        let mut big = vec![b'x'; CHUNK * 2 + 10];
        big[CHUNK - 3..CHUNK + 4].copy_from_slice(b"OLDHASH");
        big.extend_from_slice(b"OLDHASH");
        fs::write(root.join("sub-OLDHASH/big"), &big).unwrap();
        std::os::unix::fs::symlink("/store/OLDHASH-x/bin", root.join("link")).unwrap();
        fs::set_permissions(root.join("plain"), fs::Permissions::from_mode(0o444)).unwrap();

        rewrite_tree(&root, &rw()).unwrap();

        let mut expect = vec![b'x'; CHUNK * 2 + 10];
        expect[CHUNK - 3..CHUNK + 4].copy_from_slice(b"newhash");
        expect.extend_from_slice(b"newhash");
        assert!(!root.join("sub-OLDHASH").exists());
        assert_eq!(fs::read(root.join("sub-newhash/big")).unwrap(), expect);
        assert_eq!(
            fs::read_link(root.join("link")).unwrap(),
            Path::new("/store/newhash-x/bin")
        );
        assert_eq!(fs::read(root.join("plain")).unwrap(), b"nothing here");
        let mode = fs::metadata(root.join("plain"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o444);
    }

    #[test]
    fn read_only_file_is_rewritten_and_mode_kept() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, b"a OLDHASH b").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o555)).unwrap();
        rewrite_tree(&f, &rw()).unwrap();
        assert_eq!(fs::read(&f).unwrap(), b"a newhash b");
        assert_eq!(
            fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o555
        );
    }

    #[test]
    fn name_collision_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("OLDHASH"), b"").unwrap();
        fs::write(dir.path().join("newhash"), b"").unwrap();
        let e = rewrite_tree(dir.path(), &rw()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert!(e.to_string().contains("OLDHASH"), "{e}");
    }

    #[test]
    fn hard_links_rewritten_once() {
        // With a -> b and b -> a, rewriting a file twice would undo the change.
        let r = Rewriter::new(vec![
            (b"aaaa".to_vec(), b"bbbb".to_vec()),
            (b"bbbb".to_vec(), b"aaaa".to_vec()),
        ])
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("one"), b"aaaa").unwrap();
        fs::hard_link(dir.path().join("one"), dir.path().join("two")).unwrap();
        rewrite_tree(dir.path(), &r).unwrap();
        assert_eq!(fs::read(dir.path().join("two")).unwrap(), b"bbbb");
    }

    #[test]
    fn missing_path_names_it() {
        let e = rewrite_tree(Path::new("/nonexistent/nixb-x"), &rw()).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/nixb-x"), "{e}");
    }
}
