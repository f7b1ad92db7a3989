//! Metadata canonicalisation: what the engine does to a build output before registering it,
//! so that nothing but contents, the executable bit and symlink targets survives.
//!
//! For every file, directory and symlink under the path (not following symlinks):
//!
//! ```text
//! type         regular, directory or symlink; anything else is an error
//! xattrs       removed (they could carry ACLs granting write access), except
//!              security.selinux and system.nfs4_acl, which the kernel will not drop
//! owner        must be `expected_uid` (the build user), or one of the build's block of
//!              uids, when one is given, otherwise "wrong ownership"; then changed to the
//!              current effective uid/gid
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
use std::ops::RangeInclusive;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, Timestamps};
use rustix::time::Timespec;

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
    #[error("wrong ownership of '{}' (owned by uid {found}, expected a uid from {first} to {last}, the build's)", path.display())]
    WrongOwnershipRange {
        path: PathBuf,
        found: u32,
        first: u32,
        last: u32,
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

/// Canonicalises the metadata of `path` and everything below it (see the module doc).
/// `expected_uid` is the build user's uid when builds run under one.
pub fn canonicalise_path_metadata(
    path: &Path,
    expected_uid: Option<u32>,
    seen: &mut InodesSeen,
) -> Result<(), CanonError> {
    canonicalise_build_output(path, expected_uid.map(|u| u..=u), seen)
}

/// [`canonicalise_path_metadata`] for a build that had a block of uids (a `uid-range` build
/// of `auto-allocate-uids` owns 65536 and may chown to any of them, as Nix allows): every
/// file must be owned by one of `expected_uids`.
pub fn canonicalise_build_output(
    path: &Path,
    expected_uids: Option<RangeInclusive<u32>>,
    seen: &mut InodesSeen,
) -> Result<(), CanonError> {
    canonicalise(path, expected_uids.as_ref(), seen)?;
    // The top-level path must end up ours: a store path owned by someone else could be
    // replaced by them, since the store directory itself is group-writable.
    let st = std::fs::symlink_metadata(path).map_err(io_err("getting attributes of", path))?;
    let euid = rustix::process::geteuid().as_raw();
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
    expected_uids: Option<&RangeInclusive<u32>>,
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
    if let Some(ids) = expected_uids {
        if !ids.contains(&st.uid()) {
            let path = path.to_path_buf();
            let found = st.uid();
            return Err(if ids.start() == ids.end() {
                CanonError::WrongOwnership {
                    path,
                    found,
                    expected: *ids.start(),
                }
            } else {
                CanonError::WrongOwnershipRange {
                    path,
                    found,
                    first: *ids.start(),
                    last: *ids.end(),
                }
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
            // `path` is not a symlink (lstat above), so chmod does not follow one.
            rustix::fs::chmod(c.as_c_str(), Mode::from_raw_mode(new))
                .map_err(|e| io_err("changing mode of", path)(e.into()))?;
        }
    }
    if st.mtime() != MTIME_STORE {
        let times = Timestamps {
            last_access: Timespec {
                tv_sec: 0,
                tv_nsec: rustix::fs::UTIME_OMIT,
            },
            last_modification: Timespec {
                tv_sec: MTIME_STORE,
                tv_nsec: 0,
            },
        };
        rustix::fs::utimensat(
            rustix::fs::CWD,
            c.as_c_str(),
            &times,
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| io_err("setting modification time of", path)(e.into()))?;
    }
    let (euid, egid) = (rustix::process::geteuid(), rustix::process::getegid());
    if st.uid() != euid.as_raw() || st.gid() != egid.as_raw() {
        rustix::fs::chownat(
            rustix::fs::CWD,
            c.as_c_str(),
            Some(euid),
            Some(egid),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| io_err("changing owner of", path)(e.into()))?;
    }

    if ft.is_dir() {
        let mut names = Vec::new();
        for e in std::fs::read_dir(path).map_err(io_err("reading directory", path))? {
            names.push(e.map_err(io_err("reading directory", path))?.file_name());
        }
        for name in names {
            canonicalise(&path.join(name), expected_uids, seen)?;
        }
    }
    Ok(())
}

/// Removes extended attributes, which could carry POSIX ACLs that survive the chmod.
fn remove_xattrs(c: &CString, path: &Path) -> Result<(), CanonError> {
    let size = match rustix::fs::llistxattr_query(c.as_c_str()) {
        Ok(n) => n,
        // File systems without xattr support have nothing to remove.
        Err(rustix::io::Errno::NOTSUP) => return Ok(()),
        Err(e) => return Err(io_err("listing extended attributes of", path)(e.into())),
    };
    if size == 0 {
        return Ok(());
    }
    let mut buf = vec![0u8; size];
    let got = rustix::fs::llistxattr(c.as_c_str(), &mut buf[..])
        .map_err(|e| io_err("listing extended attributes of", path)(e.into()))?;
    buf.truncate(got);
    for name in buf.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        if name == b"security.selinux" || name == b"system.nfs4_acl" {
            continue;
        }
        let Ok(cn) = CString::new(name) else { continue };
        rustix::fs::lremovexattr(c.as_c_str(), cn.as_c_str())
            .map_err(|e| io_err("removing extended attribute of", path)(e.into()))?;
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
