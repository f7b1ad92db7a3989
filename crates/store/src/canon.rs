//! Metadata canonicalisation: what the engine does to a build output before registering it,
//! so that nothing but contents, the executable bit and symlink targets survives.
//!
//! For every file, directory and symlink under the path (not following symlinks):
//!
//! ```text
//! type         regular, directory or symlink; anything else is an error
//! xattrs       removed (they could carry ACLs granting write access), except
//!              security.selinux and system.nfs4_acl, which the kernel will not drop
//! owner        must be `expected_uid` when one is given (the build user), otherwise
//!              "wrong ownership"; then changed to the current effective uid/gid
//! mode         0444, or 0555 when the owner execute bit (S_IXUSR) was set, as Nix decides;
//!              setuid, setgid, sticky and every write bit disappear; symlinks keep theirs
//! mtime        1 second after the epoch (also on symlinks); atime left alone
//! ```
//!
//! Hard links: a build may link one file into several places, even across its outputs.
//! The first time an inode is met it is canonicalised and remembered in [`InodesSeen`];
//! later links to it are skipped, which is what lets the ownership check pass for them
//! although they are now owned by the current user instead of the build user. An inode
//! that was *not* canonicalised by us and is foreign-owned (`ln /etc/shadow $out/x`) fails
//! the ownership check instead of being chowned and chmodded.
//!
//! [`check_suspicious`] is the engine's separate pre-check on the top-level output:
//! group- or world-writable (someone else could have changed it during the build) or not
//! owned by the build user means the output is rejected before anything is touched.

use std::collections::HashSet;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The mtime Nix gives every file in the store.
pub const MTIME_STORE: i64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CanonError {
    #[error("{step} '{path}': {source}")]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("file '{0}' has an unsupported type (only regular files, directories and symlinks may be in the store)")]
    UnsupportedType(PathBuf),
    #[error("wrong ownership of '{}' (owned by uid {found}, expected uid {expected})", path.display())]
    WrongOwnership {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("suspicious ownership or permission on '{}' ({reason}); rejecting this build output", path.display())]
    Suspicious { path: PathBuf, reason: String },
}

fn io_err<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CanonError + 'a {
    move |source| CanonError::Io {
        step,
        path: path.to_path_buf(),
        source,
    }
}

/// Set of (device, inode) pairs, shared across all outputs of one build so hard links
/// between them are recognised.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InodesSeen(HashSet<(u64, u64)>);

impl InodesSeen {
    pub fn new() -> InodesSeen {
        InodesSeen::default()
    }

    pub fn contains(&self, dev: u64, ino: u64) -> bool {
        self.0.contains(&(dev, ino))
    }

    /// Returns `true` when the inode was not in the set yet.
    pub fn insert(&mut self, dev: u64, ino: u64) -> bool {
        self.0.insert((dev, ino))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn cpath(path: &Path) -> Result<CString, CanonError> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io_err("converting path", path)(io::Error::from_raw_os_error(libc::EINVAL)))
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Canonicalises the metadata of `path` and everything below it (see the module doc).
/// `expected_uid` is the build user's uid when builds run under one.
pub fn canonicalise_path_metadata(
    path: &Path,
    expected_uid: Option<u32>,
    seen: &mut InodesSeen,
) -> Result<(), CanonError> {
    canonicalise(path, expected_uid, seen)?;
    // The top-level path must end up ours: a store path owned by someone else could be
    // replaced by them, since the store directory itself is group-writable.
    let st = std::fs::symlink_metadata(path).map_err(io_err("getting attributes of", path))?;
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    if st.uid() != euid {
        return Err(CanonError::WrongOwnership {
            path: path.to_path_buf(),
            found: st.uid(),
            expected: euid,
        });
    }
    Ok(())
}

fn canonicalise(
    path: &Path,
    expected_uid: Option<u32>,
    seen: &mut InodesSeen,
) -> Result<(), CanonError> {
    let st = std::fs::symlink_metadata(path).map_err(io_err("getting attributes of", path))?;
    let ft = st.file_type();
    if !(ft.is_file() || ft.is_dir() || ft.is_symlink()) {
        return Err(CanonError::UnsupportedType(path.to_path_buf()));
    }
    // A later link to an inode canonicalised earlier in this build: done already, and
    // re-checking its owner would wrongly fail, since we changed it.
    if !ft.is_dir() && seen.contains(st.dev(), st.ino()) {
        return Ok(());
    }
    if let Some(uid) = expected_uid {
        if st.uid() != uid {
            return Err(CanonError::WrongOwnership {
                path: path.to_path_buf(),
                found: st.uid(),
                expected: uid,
            });
        }
    }
    seen.insert(st.dev(), st.ino());
    // Only after the ownership check: a foreign file must be left exactly as it was.
    let c = cpath(path)?;
    remove_xattrs(&c, path)?;

    if !ft.is_symlink() {
        let mode = st.mode() & 0o7777;
        if mode != 0o444 && mode != 0o555 {
            let new = if mode & libc::S_IXUSR != 0 {
                0o555
            } else {
                0o444
            };
            // SAFETY: valid C string; `path` is not a symlink (lstat above), so chmod does not follow one.
            check(unsafe { libc::chmod(c.as_ptr(), new) })
                .map_err(io_err("changing mode of", path))?;
        }
    }
    if st.mtime() != MTIME_STORE {
        let times = [
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            libc::timespec {
                tv_sec: MTIME_STORE as libc::time_t,
                tv_nsec: 0,
            },
        ];
        // SAFETY: valid C string and a two-element timespec array, as utimensat requires.
        check(unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                c.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
        .map_err(io_err("setting modification time of", path))?;
    }
    // SAFETY: plain getters.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if st.uid() != euid || st.gid() != egid {
        // SAFETY: valid C string; lchown never follows a symlink.
        check(unsafe { libc::lchown(c.as_ptr(), euid, egid) })
            .map_err(io_err("changing owner of", path))?;
    }

    if ft.is_dir() {
        let mut names = Vec::new();
        for e in std::fs::read_dir(path).map_err(io_err("reading directory", path))? {
            names.push(e.map_err(io_err("reading directory", path))?.file_name());
        }
        for name in names {
            canonicalise(&path.join(name), expected_uid, seen)?;
        }
    }
    Ok(())
}

/// Removes extended attributes, which could carry POSIX ACLs that survive the chmod.
fn remove_xattrs(c: &CString, path: &Path) -> Result<(), CanonError> {
    // SAFETY: a null buffer of size 0 asks for the needed size.
    let size = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
    if size < 0 {
        let e = io::Error::last_os_error();
        // File systems without xattr support have nothing to remove.
        if e.raw_os_error() == Some(libc::ENOTSUP) {
            return Ok(());
        }
        return Err(io_err("listing extended attributes of", path)(e));
    }
    if size == 0 {
        return Ok(());
    }
    let mut buf = vec![0u8; size as usize];
    // SAFETY: buf has exactly the size passed.
    let got = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if got < 0 {
        return Err(io_err("listing extended attributes of", path)(
            io::Error::last_os_error(),
        ));
    }
    buf.truncate(got as usize);
    for name in buf.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        if name == b"security.selinux" || name == b"system.nfs4_acl" {
            continue;
        }
        let Ok(cn) = CString::new(name) else { continue };
        // SAFETY: valid C strings.
        check(unsafe { libc::lremovexattr(c.as_ptr(), cn.as_ptr()) })
            .map_err(io_err("removing extended attribute of", path))?;
    }
    Ok(())
}

/// The engine's check on a freshly built output, before any canonicalisation: not
/// group- or world-writable (symlinks excepted, their mode means nothing) and, when
/// builds run as a build user, owned by that user.
pub fn check_suspicious(path: &Path, build_uid: Option<u32>) -> Result<(), CanonError> {
    let st = std::fs::symlink_metadata(path).map_err(io_err("getting attributes of", path))?;
    let suspicious = |reason: String| CanonError::Suspicious {
        path: path.to_path_buf(),
        reason,
    };
    if !st.file_type().is_symlink() && st.mode() & (libc::S_IWGRP | libc::S_IWOTH) != 0 {
        return Err(suspicious(format!(
            "mode {:o} is group- or world-writable",
            st.mode() & 0o7777
        )));
    }
    if let Some(uid) = build_uid {
        if st.uid() != uid {
            return Err(suspicious(format!(
                "owned by uid {}, not the build user {uid}",
                st.uid()
            )));
        }
    }
    Ok(())
}
