//! NAR ("Nix ARchive"): the canonical serialisation of a file system tree that Nix hashes,
//! signs and ships. `dump_path` writes byte-for-byte what `nix-store --dump` writes.
//!
//! ```text
//! nar        = str("nix-archive-1") node
//! node       = str("(") str("type") body str(")")
//! body       = str("regular") [ str("executable") str("") ] str("contents") contents
//!            | str("symlink") str("target") str(<target>)
//!            | str("directory") entry*
//! entry      = str("entry") str("(") str("name") str(<name>) str("node") node str(")")
//! contents   = u64(len) <len bytes> <zero padding to a multiple of 8>
//! str(s)     = u64(len(s)) s <zero padding to a multiple of 8>
//! u64(n)     = n as 8 bytes, little endian
//! ```
//!
//! Entries appear in strictly increasing byte order of their names; a name is never empty,
//! `.` or `..` and contains neither `/` nor NUL. A regular file is "executable" when its
//! owner execute bit (`S_IXUSR`) is set, as in Nix; no other metadata (owner, times, other
//! mode bits) is recorded.
//!
//! Restoring accepts exactly this canonical form (Nix itself also tolerates `executable`
//! after `contents`; such an archive cannot come from a dump, and refusing it keeps one
//! tree ↔ one byte string). The reader never trusts a length before it has the bytes: file
//! contents are streamed in fixed-size chunks, and names, targets and tags have hard caps.
//! Everything is created relative to directory file descriptors with `O_EXCL`/`O_NOFOLLOW`,
//! so no entry can reach outside the destination, even through a symlink it just created.
//!
//! Restored modes follow Nix: files `0666`, directories `0777`, both masked by the umask,
//! and executables get `+x` for user, group and other on top. Canonicalisation
//! ([`crate::canon`]) later turns these into `0444`/`0555`.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{Mode, OFlags};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::hash::{Hash, HashAlgo, Hasher};

/// The magic string every archive starts with.
pub const NAR_MAGIC: &str = "nix-archive-1";

/// Longest entry name accepted when restoring (Linux's `NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;
/// Longest symlink target accepted when restoring (Linux's `PATH_MAX` minus the NUL).
pub const MAX_TARGET_LEN: usize = 4095;
/// Deepest directory nesting accepted when restoring. Nix has no such limit, but a
/// hostile archive must not be able to exhaust memory or the kernel's path walking; real
/// store paths are nowhere near this deep.
pub const MAX_DEPTH: usize = 2048;

// Tags are short; anything longer is garbage and is refused before it is read.
const MAX_TAG_LEN: usize = 16;
const CHUNK: usize = 256 * 1024;
// Files at least this big are read on a helper thread (see `Out::contents_threaded`).
const THREADED_READ_MIN: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum NarError {
    /// A system call on a file failed while archiving, restoring or hashing.
    #[error("{step} '{path}': {source}")]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("file '{path}' has an unsupported type (only regular files, directories and symlinks can be archived)")]
    UnsupportedType { path: PathBuf },
    #[error("file '{path}' shrank from {expected} to {got} bytes while being archived")]
    Shrank {
        path: PathBuf,
        expected: u64,
        got: u64,
    },
    /// The consumer of a dump failed.
    #[error("writing nar: {0}")]
    Sink(#[source] io::Error),
    #[error("reading nar at byte {offset}: {source}")]
    Read {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("nar ends early at byte {offset} (while reading {what})")]
    Truncated { offset: u64, what: &'static str },
    #[error("malformed nar at byte {offset} (restoring '{}'): {reason}", path.display())]
    Malformed {
        offset: u64,
        path: PathBuf,
        reason: String,
    },
    #[error("restore destination '{0}' already exists")]
    DestExists(PathBuf),
}

impl NarError {
    fn io(step: &'static str, path: &Path, source: io::Error) -> NarError {
        NarError::Io {
            step,
            path: path.to_path_buf(),
            source,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Dumping

/// Buffers the small framing tokens and file contents and hands full blocks to the sink,
/// so a tree of many small files costs few sink calls.
struct Out<'a> {
    sink: &'a mut dyn FnMut(&[u8]) -> Result<(), NarError>,
    // A fixed buffer and a fill level rather than a Vec: file reads land in the spare
    // part directly, without zero-filling it first.
    buf: Box<[u8]>,
    len: usize,
}

impl Out<'_> {
    /// Grows the buffer (up to `CHUNK`) so that `need` more bytes fit. It starts small:
    /// zero-filling a whole chunk for every dump cost more than hashing the NAR of a small
    /// output (the engine dumps every output it registers).
    fn grow_for(&mut self, need: usize) {
        let want = self.len.saturating_add(need);
        if want <= self.buf.len() || self.buf.len() >= CHUNK {
            return;
        }
        let size = want.next_power_of_two().min(CHUNK);
        let mut bigger = vec![0u8; size].into_boxed_slice();
        bigger[..self.len].copy_from_slice(&self.buf[..self.len]);
        self.buf = bigger;
    }

    fn flush(&mut self) -> Result<(), NarError> {
        if self.len > 0 {
            (self.sink)(&self.buf[..self.len])?;
            self.len = 0;
        }
        Ok(())
    }

    fn bytes(&mut self, b: &[u8]) -> Result<(), NarError> {
        self.grow_for(b.len());
        if self.len + b.len() > self.buf.len() {
            self.flush()?;
        }
        if b.len() >= self.buf.len() {
            (self.sink)(b)
        } else {
            self.buf[self.len..self.len + b.len()].copy_from_slice(b);
            self.len += b.len();
            Ok(())
        }
    }

    fn u64(&mut self, n: u64) -> Result<(), NarError> {
        self.bytes(&n.to_le_bytes())
    }

    fn padding(&mut self, len: u64) -> Result<(), NarError> {
        let pad = padding_len(len);
        self.bytes(&[0u8; 8][..pad])
    }

    fn str(&mut self, s: &[u8]) -> Result<(), NarError> {
        self.u64(s.len() as u64)?;
        self.bytes(s)?;
        self.padding(s.len() as u64)
    }

    /// Streams `size` bytes of `file` straight into the buffer.
    fn contents(&mut self, file: &mut File, size: u64, path: &Path) -> Result<(), NarError> {
        self.u64(size)?;
        if size >= THREADED_READ_MIN {
            self.contents_threaded(file, size, path)?;
            return self.padding(size);
        }
        let mut left = size;
        while left > 0 {
            self.grow_for(usize::try_from(left).unwrap_or(usize::MAX));
            if self.len == self.buf.len() {
                self.flush()?;
            }
            let want = (self.buf.len() - self.len).min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = loop {
                match file.read(&mut self.buf[self.len..self.len + want]) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(NarError::io("reading file", path, e)),
                }
            };
            if n == 0 {
                return Err(NarError::Shrank {
                    path: path.to_path_buf(),
                    expected: size,
                    got: size - left,
                });
            }
            self.len += n;
            left -= n as u64;
        }
        self.padding(size)
    }

    /// For big files: a reader thread fills buffers while this thread hands the previous
    /// ones to the sink, so the copy out of the page cache overlaps the hashing.
    fn contents_threaded(
        &mut self,
        file: &mut File,
        size: u64,
        path: &Path,
    ) -> Result<(), NarError> {
        use std::sync::mpsc::sync_channel;
        self.flush()?;
        let (full_tx, full_rx) = sync_channel::<Result<(Vec<u8>, usize), io::Error>>(2);
        let (empty_tx, empty_rx) = sync_channel::<Vec<u8>>(3);
        for _ in 0..3 {
            // Cannot fail: the receiver is alive and there is room for three.
            let _ = empty_tx.send(vec![0u8; CHUNK]);
        }
        std::thread::scope(|scope| {
            scope.spawn(move || {
                let mut left = size;
                while left > 0 {
                    // The consumer hung up (sink error or done): stop quietly.
                    let Ok(mut buf) = empty_rx.recv() else { return };
                    let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let res = loop {
                        match file.read(&mut buf[..want]) {
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            r => break r,
                        }
                    };
                    let stop = !matches!(res, Ok(n) if n > 0);
                    if let Ok(n) = res {
                        left -= n as u64;
                    }
                    if full_tx.send(res.map(|n| (buf, n))).is_err() || stop {
                        return;
                    }
                }
            });
            // Owned by this closure so that an early return drops them before the scope
            // joins the reader, which then sees a hung-up channel instead of waiting forever.
            let (full_rx, empty_tx) = (full_rx, empty_tx);
            let mut got = 0u64;
            while got < size {
                let (buf, n) = match full_rx.recv() {
                    Ok(Ok(x)) => x,
                    Ok(Err(e)) => return Err(NarError::io("reading file", path, e)),
                    // The reader stopped without a result: treat as end of file.
                    Err(_) => (Vec::new(), 0),
                };
                if n == 0 {
                    return Err(NarError::Shrank {
                        path: path.to_path_buf(),
                        expected: size,
                        got,
                    });
                }
                (self.sink)(&buf[..n])?;
                got += n as u64;
                let _ = empty_tx.send(buf);
            }
            Ok(())
        })
    }
}

fn padding_len(len: u64) -> usize {
    ((8 - len % 8) % 8) as usize
}

/// Serialises the tree at `path` as a NAR, handing the bytes to `sink` in blocks of up to
/// a few hundred KiB. Never holds a whole file in memory.
pub fn dump_to_sink(
    path: &Path,
    sink: &mut dyn FnMut(&[u8]) -> Result<(), NarError>,
) -> Result<(), NarError> {
    let mut out = Out {
        sink,
        buf: vec![0u8; 4096].into_boxed_slice(),
        len: 0,
    };
    out.str(NAR_MAGIC.as_bytes())?;
    dump_node(path, &mut out)?;
    out.flush()
}

fn dump_node(path: &Path, out: &mut Out<'_>) -> Result<(), NarError> {
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| NarError::io("getting attributes of", path, e))?;
    out.str(b"(")?;
    out.str(b"type")?;
    let ft = meta.file_type();
    if ft.is_file() {
        // Open without following a symlink swapped in since the lstat, and take size and
        // mode from the open file so the header agrees with what is read.
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| NarError::io("opening file", path, e))?;
        let meta = file
            .metadata()
            .map_err(|e| NarError::io("getting attributes of", path, e))?;
        if !meta.file_type().is_file() {
            return Err(NarError::UnsupportedType { path: path.into() });
        }
        out.str(b"regular")?;
        if meta.mode() & libc::S_IXUSR != 0 {
            out.str(b"executable")?;
            out.str(b"")?;
        }
        out.str(b"contents")?;
        out.contents(&mut file, meta.len(), path)?;
    } else if ft.is_symlink() {
        let target =
            std::fs::read_link(path).map_err(|e| NarError::io("reading symlink", path, e))?;
        out.str(b"symlink")?;
        out.str(b"target")?;
        out.str(target.as_os_str().as_bytes())?;
    } else if ft.is_dir() {
        out.str(b"directory")?;
        let mut names = Vec::new();
        for entry in
            std::fs::read_dir(path).map_err(|e| NarError::io("reading directory", path, e))?
        {
            let entry = entry.map_err(|e| NarError::io("reading directory", path, e))?;
            names.push(entry.file_name());
        }
        // NAR order is plain byte order of the names (std::map<std::string> in Nix).
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            out.str(b"entry")?;
            out.str(b"(")?;
            out.str(b"name")?;
            out.str(name.as_bytes())?;
            out.str(b"node")?;
            dump_node(&path.join(&name), out)?;
            out.str(b")")?;
        }
    } else {
        return Err(NarError::UnsupportedType { path: path.into() });
    }
    out.str(b")")
}

/// Writes the NAR serialisation of `path` to `out`.
pub fn dump_path(path: &Path, out: &mut impl Write) -> Result<(), NarError> {
    dump_to_sink(path, &mut |b| out.write_all(b).map_err(NarError::Sink))
}

/// The NAR hash of `path` and the NAR's size in bytes, computed in one streaming pass.
pub fn hash_path(path: &Path, algo: HashAlgo) -> Result<(Hash, u64), NarError> {
    let mut hasher = Hasher::new(algo);
    let mut size = 0u64;
    dump_to_sink(path, &mut |b| {
        hasher.update(b);
        size += b.len() as u64;
        Ok(())
    })?;
    Ok((hasher.finish(), size))
}

/// The hash of a regular file's contents ("flat" hashing, as `nix-hash --flat`).
pub fn hash_file_flat(path: &Path, algo: HashAlgo) -> Result<Hash, NarError> {
    let mut file = File::open(path).map_err(|e| NarError::io("opening file", path, e))?;
    let mut hasher = Hasher::new(algo);
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(NarError::io("reading file", path, e)),
        };
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finish())
}

// ---------------------------------------------------------------------------------------
// Restoring

/// Counts the bytes consumed so that every error can name its offset.
struct NarReader<'a, R: Read> {
    r: &'a mut R,
    offset: u64,
}

impl<R: Read> NarReader<'_, R> {
    fn fill(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), NarError> {
        let mut done = 0;
        while done < buf.len() {
            match self.r.read(&mut buf[done..]) {
                Ok(0) => {
                    return Err(NarError::Truncated {
                        offset: self.offset,
                        what,
                    })
                }
                Ok(n) => {
                    done += n;
                    self.offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(NarError::Read {
                        offset: self.offset,
                        source: e,
                    })
                }
            }
        }
        Ok(())
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, NarError> {
        let mut b = [0u8; 8];
        self.fill(&mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Reads and checks the zero padding after `len` bytes of payload.
    fn padding(&mut self, len: u64, path: &Path) -> Result<(), NarError> {
        let pad = padding_len(len);
        let mut b = [0u8; 8];
        let start = self.offset;
        self.fill(&mut b[..pad], "padding")?;
        if b[..pad].iter().any(|&x| x != 0) {
            return Err(malformed(start, path, "non-zero padding".into()));
        }
        Ok(())
    }

    /// Reads a string of at most `max` bytes; a longer length is refused before any of
    /// its bytes are read or allocated.
    fn str(&mut self, max: usize, what: &'static str, path: &Path) -> Result<Vec<u8>, NarError> {
        let start = self.offset;
        let len = self.u64(what)?;
        if len > max as u64 {
            return Err(malformed(
                start,
                path,
                format!("{what} is {len} bytes long, more than the {max} allowed"),
            ));
        }
        let mut v = vec![0u8; len as usize];
        self.fill(&mut v, what)?;
        self.padding(len, path)?;
        Ok(v)
    }

    fn tag(&mut self, path: &Path) -> Result<(u64, Vec<u8>), NarError> {
        let start = self.offset;
        let len = self.u64("a tag")?;
        if len > MAX_TAG_LEN as u64 {
            return Err(malformed(
                start,
                path,
                format!("expected a tag, found a string of {len} bytes"),
            ));
        }
        let mut v = vec![0u8; len as usize];
        self.fill(&mut v, "a tag")?;
        self.padding(len, path)?;
        Ok((start, v))
    }

    fn expect(&mut self, want: &str, path: &Path) -> Result<(), NarError> {
        let (at, got) = self.tag(path)?;
        if got != want.as_bytes() {
            return Err(malformed(
                at,
                path,
                format!(
                    "expected '{want}', found '{}'",
                    String::from_utf8_lossy(&got).escape_default()
                ),
            ));
        }
        Ok(())
    }
}

fn malformed(offset: u64, path: &Path, reason: String) -> NarError {
    NarError::Malformed {
        offset,
        path: path.to_path_buf(),
        reason,
    }
}

/// Where the next node goes: the destination itself, or a name inside a directory we
/// created and hold open.
enum Place<'a> {
    Root(&'a Path),
    At(BorrowedFd<'a>, &'a CStr),
}

fn cstring(p: &[u8], path: &Path) -> Result<CString, NarError> {
    CString::new(p).map_err(|_| {
        NarError::io(
            "restoring",
            path,
            io::Error::from_raw_os_error(libc::EINVAL),
        )
    })
}

fn at_fd<'a>(place: &Place<'a>) -> BorrowedFd<'a> {
    match place {
        Place::Root(_) => rustix::fs::CWD,
        Place::At(fd, _) => *fd,
    }
}

fn place_name(place: &Place<'_>, path: &Path) -> Result<CString, NarError> {
    match place {
        Place::Root(p) => cstring(p.as_os_str().as_bytes(), path),
        Place::At(_, n) => Ok((*n).to_owned()),
    }
}

/// Never follow a symlink someone swapped in for a name we create or open.
const CREATE: OFlags = OFlags::WRONLY
    .union(OFlags::CREATE)
    .union(OFlags::EXCL)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);
const OPEN_DIR: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

fn create_file(place: &Place<'_>, path: &Path) -> Result<File, NarError> {
    let name = place_name(place, path)?;
    rustix::fs::openat(
        at_fd(place),
        name.as_c_str(),
        CREATE,
        Mode::from_raw_mode(0o666),
    )
    .map(File::from)
    .map_err(|e| creation_error(e.into(), place, path, "creating file"))
}

fn create_dir(place: &Place<'_>, path: &Path) -> Result<OwnedFd, NarError> {
    let name = place_name(place, path)?;
    rustix::fs::mkdirat(at_fd(place), name.as_c_str(), Mode::from_raw_mode(0o777))
        .map_err(|e| creation_error(e.into(), place, path, "creating directory"))?;
    rustix::fs::openat(at_fd(place), name.as_c_str(), OPEN_DIR, Mode::empty())
        .map_err(|e| NarError::io("opening directory", path, e.into()))
}

fn create_symlink(place: &Place<'_>, target: &[u8], path: &Path) -> Result<(), NarError> {
    let name = place_name(place, path)?;
    let target = cstring(target, path)?;
    rustix::fs::symlinkat(target.as_c_str(), at_fd(place), name.as_c_str())
        .map_err(|e| creation_error(e.into(), place, path, "creating symlink"))
}

fn creation_error(e: io::Error, place: &Place<'_>, path: &Path, step: &'static str) -> NarError {
    if matches!(place, Place::Root(_)) && e.kind() == io::ErrorKind::AlreadyExists {
        NarError::DestExists(path.to_path_buf())
    } else {
        NarError::io(step, path, e)
    }
}

/// One directory being filled: the last entry name (to enforce order), its identity,
/// and its fd while it is the innermost directory. Ancestors give up their fds so that
/// deep archives cannot exhaust the descriptor table; on the way back up the parent is
/// reopened through `..` of the child and must be the same inode.
struct Frame {
    fd: Option<OwnedFd>,
    dev_ino: (u64, u64),
    prev: Option<Vec<u8>>,
}

impl Frame {
    fn new(fd: OwnedFd, path: &Path) -> Result<Frame, NarError> {
        let dev_ino = fd_identity(&fd, path)?;
        Ok(Frame {
            fd: Some(fd),
            dev_ino,
            prev: None,
        })
    }
}

fn fd_identity(fd: &OwnedFd, path: &Path) -> Result<(u64, u64), NarError> {
    let st =
        rustix::fs::fstat(fd).map_err(|e| NarError::io("getting attributes of", path, e.into()))?;
    Ok((st.st_dev, st.st_ino))
}

/// Reopens the parent of the directory `child` and checks it is the one we created.
fn reopen_parent(child: &OwnedFd, want: (u64, u64), path: &Path) -> Result<OwnedFd, NarError> {
    let fd = rustix::fs::openat(child, c"..", OPEN_DIR, Mode::empty())
        .map_err(|e| NarError::io("reopening directory", path, e.into()))?;
    if fd_identity(&fd, path)? != want {
        return Err(NarError::io(
            "reopening directory",
            path,
            io::Error::other("directory was moved while being restored"),
        ));
    }
    Ok(fd)
}

/// Restores a NAR from `input` into `dest`, which must not exist yet; the input must end
/// right after the archive. On error, whatever was created under `dest` is removed again.
pub fn restore_path(input: &mut impl Read, dest: &Path) -> Result<(), NarError> {
    let mut r = NarReader {
        r: input,
        offset: 0,
    };
    let res = restore_inner(&mut r, dest).and_then(|()| {
        let mut b = [0u8; 1];
        loop {
            match r.r.read(&mut b) {
                Ok(0) => return Ok(()),
                Ok(_) => {
                    return Err(malformed(
                        r.offset,
                        dest,
                        "trailing data after the archive".into(),
                    ))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(NarError::Read {
                        offset: r.offset,
                        source: e,
                    })
                }
            }
        }
    });
    cleanup_on_error(res, dest)
}

/// Like [`restore_path`], but stops right after the archive and leaves the rest of
/// `input` unread (for NARs embedded in a larger stream, e.g. `nix-store --export`).
pub fn restore_path_prefix(input: &mut impl Read, dest: &Path) -> Result<(), NarError> {
    let mut r = NarReader {
        r: input,
        offset: 0,
    };
    let res = restore_inner(&mut r, dest);
    cleanup_on_error(res, dest)
}

fn cleanup_on_error(res: Result<(), NarError>, dest: &Path) -> Result<(), NarError> {
    if res.is_err() && !matches!(res, Err(NarError::DestExists(_))) {
        // Only ever remove what this call created: DestExists means dest was not ours.
        // remove_dir_all does not follow symlinks.
        if let Ok(m) = std::fs::symlink_metadata(dest) {
            let _ = if m.is_dir() {
                std::fs::remove_dir_all(dest)
            } else {
                std::fs::remove_file(dest)
            };
        }
    }
    res
}

fn restore_inner<R: Read>(r: &mut NarReader<'_, R>, dest: &Path) -> Result<(), NarError> {
    let (at, magic) = r.tag(dest).map_err(|e| match e {
        NarError::Malformed { offset, path, .. } => {
            malformed(offset, &path, "not a nar (bad magic)".into())
        }
        e => e,
    })?;
    if magic != NAR_MAGIC.as_bytes() {
        return Err(malformed(at, dest, "not a nar (bad magic)".into()));
    }

    let mut stack: Vec<Frame> = Vec::new();
    // The path being restored, for error messages only; never used to create anything.
    let mut path = dest.to_path_buf();

    // Parse the root node, then loop over directory entries until the stack is empty.
    if let Some(fd) = restore_node(r, Place::Root(dest), &path)? {
        stack.push(Frame::new(fd, &path)?);
    }
    while !stack.is_empty() {
        let depth = stack.len();
        let (at, tag) = r.tag(&path)?;
        match tag.as_slice() {
            b")" => {
                // End of this directory; unless it is the root, its entry closes too.
                let done = stack.pop();
                if let (Some(parent), Some(Frame { fd: Some(fd), .. })) = (stack.last_mut(), done) {
                    path.pop();
                    parent.fd = Some(reopen_parent(&fd, parent.dev_ino, &path)?);
                    r.expect(")", &path)?;
                }
            }
            b"entry" => {
                if depth > MAX_DEPTH {
                    return Err(malformed(
                        at,
                        &path,
                        format!("directories nested more than {MAX_DEPTH} deep"),
                    ));
                }
                r.expect("(", &path)?;
                r.expect("name", &path)?;
                let name_at = r.offset;
                let name = r.str(MAX_NAME_LEN, "entry name", &path)?;
                if let Some(reason) = bad_name(&name) {
                    return Err(malformed(name_at, &path, reason));
                }
                if let Some(prev) = stack.last().and_then(|f| f.prev.as_ref()) {
                    if name.as_slice() <= prev.as_slice() {
                        let what = if name == *prev {
                            "duplicate"
                        } else {
                            "unsorted"
                        };
                        return Err(malformed(
                            name_at,
                            &path,
                            format!(
                                "{what} entry name '{}'",
                                String::from_utf8_lossy(&name).escape_default()
                            ),
                        ));
                    }
                }
                r.expect("node", &path)?;
                let Some(top) = stack.last_mut() else {
                    return Err(no_open_dir(&path));
                };
                path.push(OsStr::from_bytes(&name));
                let name_c = cstring(&name, &path)?;
                top.prev = Some(name);
                let Some(parent) = top.fd.as_ref().map(|f| f.as_fd()) else {
                    return Err(no_open_dir(&path));
                };
                match restore_node(r, Place::At(parent, &name_c), &path)? {
                    Some(fd) => {
                        let frame = Frame::new(fd, &path)?;
                        if let Some(top) = stack.last_mut() {
                            top.fd = None;
                        }
                        stack.push(frame);
                    }
                    None => {
                        r.expect(")", &path)?;
                        path.pop();
                    }
                }
            }
            other => {
                return Err(malformed(
                    at,
                    &path,
                    format!(
                        "expected 'entry' or ')', found '{}'",
                        String::from_utf8_lossy(other).escape_default()
                    ),
                ))
            }
        }
    }
    Ok(())
}

// Unreachable by construction (the innermost frame always holds its fd); an error rather
// than a panic all the same.
fn no_open_dir(path: &Path) -> NarError {
    NarError::io(
        "restoring",
        path,
        io::Error::other("internal error: no open directory"),
    )
}

/// Why `name` may not be a directory entry, if it may not.
fn bad_name(name: &[u8]) -> Option<String> {
    if name.is_empty() {
        Some("empty entry name".into())
    } else if name == b"." || name == b".." {
        Some(format!(
            "entry name '{}' is not allowed",
            String::from_utf8_lossy(name)
        ))
    } else if name.contains(&b'/') || name.contains(&0) {
        Some(format!(
            "entry name '{}' contains '/' or NUL",
            String::from_utf8_lossy(name).escape_default()
        ))
    } else {
        None
    }
}

/// Reads `( type ...` and creates the node. Regular files and symlinks are read through
/// their closing `)`; for a directory the open fd is returned and its entries follow.
fn restore_node<R: Read>(
    r: &mut NarReader<'_, R>,
    place: Place<'_>,
    path: &Path,
) -> Result<Option<OwnedFd>, NarError> {
    r.expect("(", path)?;
    r.expect("type", path)?;
    let (at, ty) = r.tag(path)?;
    match ty.as_slice() {
        b"regular" => {
            let (at, mut tag) = r.tag(path)?;
            let executable = tag == b"executable";
            if executable {
                let (at, v) = r.tag(path)?;
                if !v.is_empty() {
                    return Err(malformed(
                        at,
                        path,
                        "executable marker has a non-empty value".into(),
                    ));
                }
                tag = r.tag(path)?.1;
            }
            if tag != b"contents" {
                return Err(malformed(
                    at,
                    path,
                    format!(
                        "expected 'contents', found '{}'",
                        String::from_utf8_lossy(&tag).escape_default()
                    ),
                ));
            }
            let mut file = create_file(&place, path)?;
            let len = r.u64("file length")?;
            let mut buf = vec![0u8; CHUNK.min(usize::try_from(len).unwrap_or(CHUNK))];
            let mut left = len;
            while left > 0 {
                let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                r.fill(&mut buf[..n], "file contents")?;
                file.write_all(&buf[..n])
                    .map_err(|e| NarError::io("writing file", path, e))?;
                left -= n as u64;
            }
            r.padding(len, path)?;
            if executable {
                let mode = file
                    .metadata()
                    .map_err(|e| NarError::io("getting attributes of", path, e))?
                    .mode();
                let mode = mode | libc::S_IXUSR | libc::S_IXGRP | libc::S_IXOTH;
                rustix::fs::fchmod(&file, Mode::from_raw_mode(mode & 0o7777))
                    .map_err(|e| NarError::io("making executable", path, e.into()))?;
            }
            r.expect(")", path)?;
            Ok(None)
        }
        b"symlink" => {
            r.expect("target", path)?;
            let target_at = r.offset;
            let target = r.str(MAX_TARGET_LEN, "symlink target", path)?;
            if target.is_empty() || target.contains(&0) {
                return Err(malformed(
                    target_at,
                    path,
                    "symlink target is empty or contains NUL".into(),
                ));
            }
            create_symlink(&place, &target, path)?;
            r.expect(")", path)?;
            Ok(None)
        }
        b"directory" => create_dir(&place, path).map(Some),
        other => Err(malformed(
            at,
            path,
            format!(
                "unknown file type '{}'",
                String::from_utf8_lossy(other).escape_default()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &mut Vec<u8>, x: &[u8]) {
        v.extend_from_slice(&(x.len() as u64).to_le_bytes());
        v.extend_from_slice(x);
        v.resize(v.len() + padding_len(x.len() as u64), 0);
    }

    /// An archive of one regular file, built by hand from the grammar above.
    #[test]
    fn regular_file_layout() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"hello").unwrap();
        let mut got = Vec::new();
        dump_path(&f, &mut got).unwrap();
        let mut want = Vec::new();
        for t in ["nix-archive-1", "(", "type", "regular", "contents"] {
            s(&mut want, t.as_bytes());
        }
        s(&mut want, b"hello");
        s(&mut want, b")");
        assert_eq!(got, want);
        // 13-byte magic padded to 16, six more strings of at most 8 bytes: 8 + 8 each.
        assert_eq!(got.len(), 24 + 6 * 16);
    }

    /// Big files go through the reader thread: the bytes must be the same, and a failing
    /// sink must end the dump (not hang waiting for the reader).
    #[test]
    fn threaded_read_of_big_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("big");
        let data: Vec<u8> = (0..(THREADED_READ_MIN as usize) * 3 + 12345)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        std::fs::write(&f, &data).unwrap();
        let mut got = Vec::new();
        dump_path(&f, &mut got).unwrap();
        let mut want = Vec::new();
        for t in ["nix-archive-1", "(", "type", "regular", "contents"] {
            s(&mut want, t.as_bytes());
        }
        s(&mut want, &data);
        s(&mut want, b")");
        assert!(got == want);

        let mut calls = 0;
        let err = dump_to_sink(&f, &mut |_| {
            calls += 1;
            if calls == 3 {
                Err(NarError::Sink(io::Error::other("disk full")))
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
        assert_eq!(calls, 3);
    }

    #[test]
    fn restore_refuses_existing_dest() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let mut nar = Vec::new();
        dump_path(&f, &mut nar).unwrap();
        let err = restore_path(&mut nar.as_slice(), &f).unwrap_err();
        assert!(matches!(err, NarError::DestExists(_)), "{err}");
        assert_eq!(std::fs::read(&f).unwrap(), b"x");
    }
}
