//! Store optimisation (`auto-optimise-store`): identical regular files are replaced by
//! hard links to one copy, kept in `<store>/.links/<name>` where `<name>` is the nix-base32
//! sha256 of the file's own NAR serialisation (so contents *and* executable bit), the
//! layout Nix uses, so both engines share one `.links` directory.
//!
//! For each regular file under the path:
//!
//! 1. skip it when it is writable by its owner (not canonical: something modified the
//!    store; Nix warns and leaves such files alone) or when it is an inode already known
//!    to live in `.links`;
//! 2. if `.links/<hash>` does not exist, hard-link the file there and stop;
//!    a racing process may create it first (`EEXIST`), then carry on;
//! 3. if `.links/<hash>` is this very inode, stop; if its size differs it is corrupt:
//!    remove it and start again;
//! 4. otherwise link `.links/<hash>` to a temporary name in the store directory and
//!    `rename` that over the file. The rename is atomic, so a reader sees the old or the
//!    new inode, never no file. The file's directory is made writable for the moment of
//!    the rename and restored afterwards.
//!
//! `EMLINK` (the link target reached the file system's link limit, typical for empty
//! files) and `ENOSPC` on `.links` only mean that this file stays unshared.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::canon::InodesSeen;
use crate::hash::{Encoding, HashAlgo};
use crate::nar::{hash_path, NarError};

#[derive(Debug, thiserror::Error)]
pub enum OptimiseError {
    #[error("{step} '{path}': {source}")]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Nar(#[from] NarError),
}

fn io_err<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> OptimiseError + 'a {
    move |source| OptimiseError::Io {
        step,
        path: path.to_path_buf(),
        source,
    }
}

/// What one call achieved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OptimiseStats {
    /// Files replaced by a link to an existing copy.
    pub files_linked: u64,
    /// Sum of the sizes of those files.
    pub bytes_freed: u64,
    /// Sum of their allocated 512-byte blocks.
    pub blocks_freed: u64,
}

impl std::ops::AddAssign for OptimiseStats {
    fn add_assign(&mut self, o: OptimiseStats) {
        self.files_linked += o.files_linked;
        self.bytes_freed += o.bytes_freed;
        self.blocks_freed += o.blocks_freed;
    }
}

/// `<store>/.links`.
pub fn links_dir(store_dir: &Path) -> PathBuf {
    store_dir.join(".links")
}

/// The inodes already in `<store>/.links`, to start an [`optimise_path`] session with, so
/// files linked by an earlier run are not hashed again. An absent `.links` yields an
/// empty set.
pub fn load_links_inodes(store_dir: &Path) -> Result<InodesSeen, OptimiseError> {
    let dir = links_dir(store_dir);
    let mut seen = InodesSeen::new();
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(seen),
        Err(e) => return Err(io_err("reading directory", &dir)(e)),
    };
    for e in rd {
        let e = e.map_err(io_err("reading directory", &dir))?;
        let m = e
            .metadata()
            .map_err(io_err("getting attributes of", &e.path()))?;
        seen.insert(m.dev(), m.ino());
    }
    Ok(seen)
}

/// Hard-links the regular files under `path` (a store path in `store_dir`) to their
/// shared copies in `.links`. `seen` holds inodes known to be in `.links` already (see
/// [`load_links_inodes`]); files linked here are added to it.
pub fn optimise_path(
    store_dir: &Path,
    path: &Path,
    seen: &mut InodesSeen,
) -> Result<OptimiseStats, OptimiseError> {
    let links = links_dir(store_dir);
    match std::fs::create_dir(&links) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err("creating directory", &links)(e)),
    }
    let mut stats = OptimiseStats::default();
    optimise_node(store_dir, &links, path, seen, &mut stats)?;
    Ok(stats)
}

fn optimise_node(
    store_dir: &Path,
    links: &Path,
    path: &Path,
    seen: &mut InodesSeen,
    stats: &mut OptimiseStats,
) -> Result<(), OptimiseError> {
    let st = std::fs::symlink_metadata(path).map_err(io_err("getting attributes of", path))?;
    let ft = st.file_type();
    if ft.is_dir() {
        let mut names = Vec::new();
        for e in std::fs::read_dir(path).map_err(io_err("reading directory", path))? {
            names.push(e.map_err(io_err("reading directory", path))?.file_name());
        }
        for n in names {
            optimise_node(store_dir, links, &path.join(n), seen, stats)?;
        }
        return Ok(());
    }
    if !ft.is_file() {
        return Ok(());
    }
    if st.mode() & libc::S_IWUSR != 0 {
        tracing::warn!("skipping suspicious writable file '{}'", path.display());
        return Ok(());
    }
    if st.nlink() > 1 && seen.contains(st.dev(), st.ino()) {
        return Ok(());
    }

    let (hash, _) = hash_path(path, HashAlgo::Sha256)?;
    let link = links.join(hash.encode(Encoding::Base32));

    // Bounded: each pass either finishes or removed a corrupt link that a concurrent
    // writer would have to recreate; give up sharing rather than loop forever.
    for _ in 0..10 {
        match std::fs::hard_link(path, &link) {
            Ok(()) => {
                seen.insert(st.dev(), st.ino());
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            // .links is full (e.g. ext4's per-directory limit): the file stays unshared.
            Err(e)
                if e.raw_os_error() == Some(libc::ENOSPC)
                    || e.raw_os_error() == Some(libc::EMLINK) =>
            {
                return Ok(())
            }
            Err(e) => return Err(io_err("linking into", &link)(e)),
        }
        let lst = match std::fs::symlink_metadata(&link) {
            Ok(m) => m,
            // Removed between our link attempt and now (another optimiser repairing it).
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("getting attributes of", &link)(e)),
        };
        if lst.dev() == st.dev() && lst.ino() == st.ino() {
            seen.insert(st.dev(), st.ino());
            return Ok(());
        }
        if !lst.file_type().is_file() || lst.len() != st.len() {
            tracing::warn!("removing corrupted link '{}'", link.display());
            match std::fs::remove_file(&link) {
                Ok(()) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("removing corrupted link", &link)(e)),
            }
        }
        if replace_with_link(store_dir, &link, path)? {
            stats.files_linked += 1;
            stats.bytes_freed += st.len();
            stats.blocks_freed += st.blocks();
            seen.insert(lst.dev(), lst.ino());
        }
        return Ok(());
    }
    Ok(())
}

/// Atomically replaces `path` by a hard link to `link`. `false` when the link limit was hit.
fn replace_with_link(store_dir: &Path, link: &Path, path: &Path) -> Result<bool, OptimiseError> {
    let tmp = store_dir.join(format!(
        ".tmp-link-{}-{}",
        std::process::id(),
        // Unique within the process; the pid keeps processes apart.
        TMP_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    match std::fs::hard_link(link, &tmp) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EMLINK) => return Ok(false),
        Err(e) => return Err(io_err("linking", &tmp)(e)),
    }
    let _writable = match path.parent() {
        Some(dir) if dir != store_dir => Some(MakeWritable::new(dir)?),
        _ => None,
    };
    match std::fs::rename(&tmp, path) {
        Ok(()) => Ok(true),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            if e.raw_os_error() == Some(libc::EMLINK) {
                Ok(false)
            } else {
                Err(io_err("replacing with a link", path)(e))
            }
        }
    }
}

static TMP_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Gives a read-only store directory its owner write bit for as long as it lives.
struct MakeWritable {
    dir: PathBuf,
    mode: u32,
}

impl MakeWritable {
    fn new(dir: &Path) -> Result<Option<MakeWritable>, OptimiseError> {
        let m = std::fs::symlink_metadata(dir).map_err(io_err("getting attributes of", dir))?;
        let mode = m.permissions().mode() & 0o7777;
        if mode & 0o200 != 0 {
            return Ok(None);
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o200))
            .map_err(io_err("making writable", dir))?;
        Ok(Some(MakeWritable {
            dir: dir.to_path_buf(),
            mode,
        }))
    }
}

impl Drop for MakeWritable {
    fn drop(&mut self) {
        if let Err(e) =
            std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(self.mode))
        {
            tracing::warn!("restoring the mode of '{}': {e}", self.dir.display());
        }
    }
}
