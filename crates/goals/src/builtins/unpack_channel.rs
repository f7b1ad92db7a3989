//! `builtin:unpack-channel`: what `nix-channel --update` builds through
//! `<nix/unpack-channel.nix>`, a channel tarball unpacked into the store.
//!
//! The environment gives `out`, `channelName` and `src`, the tarball: a tar archive,
//! uncompressed or compressed with gzip, bzip2 or xz, told apart by their magic numbers as
//! Nix's libarchive tells them apart (never by the file's name). The archive is unpacked into
//! the new directory `out`; it must hold exactly one top-level entry, which is then renamed to
//! `out/<channelName>`.
//!
//! What is kept of a member is what a NAR holds: the tree, the contents, symlink targets, and
//! the owner execute bit of regular files. Owners, times and the other mode bits are not
//! restored, since the worker canonicalises the output afterwards (0444/0555, mtime 1) as it
//! does every output; directories are made 0755 so that one the archive marks unreadable
//! cannot stop its own members from being unpacked. Hard links are made as hard links.
//! Devices and FIFOs cannot be in a store path and are refused; a pax global header (the
//! comment `git archive` writes) is skipped.
//!
//! Nothing is written outside `out`, as libarchive's secure-extraction flags promise for Nix:
//!
//! - a member or hard link target with a `..` component is refused; a leading `/` is dropped,
//!   so an absolute name lands under `out` (as with Nix, which prefixes `out/` to it);
//! - every directory on the way to a member is opened relative to the one before with
//!   `O_NOFOLLOW`, so a symlink the archive made earlier cannot redirect a later member: that
//!   member is refused, whether the link points outside or back inside `out`;
//! - a member replaces whatever is at its own name (a symlink included) by unlinking it and
//!   creating anew with `O_EXCL`, never by writing through it;
//! - `src` is opened with `O_NOFOLLOW`: this builder runs outside the chroot, where a store
//!   path that is a symlink would lead to a file of the host's;
//! - `channelName` must be a single file name, not `.`, `..` or anything with a `/`, so the
//!   final rename cannot move the tree out of `out` (Nix does not check it).
//!
//! Not supported: other compressions libarchive knows (zstd, lzip, lz4, `compress`) and other
//! archive formats (zip, cpio), each refused with an error naming it. The `tar` crate reads a
//! GNU long name or pax header whole into memory, so a tarball can make this process as large
//! as such a header; it is the build's own process, under the build's limits.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

/// Why an archive could not be unpacked; the member names are as the archive spells them.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The compressed stream or the tar headers are damaged (or not a tar archive at all).
    #[error("reading the archive: {0}")]
    Read(#[source] io::Error),
    #[error("the file is {0}, which builtin:unpack-channel does not read (it reads tar archives, uncompressed or compressed with gzip, bzip2 or xz)")]
    Unsupported(&'static str),
    /// `path` is the member's name or, for a hard link, its target.
    #[error("member '{member}': '{path}' has a '..' component")]
    DotDot { member: String, path: String },
    /// `symlink` is the prefix of the member's path (relative to the output) that is one.
    #[error("member '{member}' would be unpacked through the symlink '{symlink}'")]
    ThroughSymlink { member: String, symlink: String },
    /// A device, a FIFO, or a tar entry type nixb does not know.
    #[error("member '{member}' is {kind}, which a store path cannot hold")]
    UnsupportedType { member: String, kind: String },
    /// A non-directory member whose name, once cleaned, is the output directory itself.
    #[error("member '{member}' names the top of the archive but is not a directory")]
    NotADirectoryAtTop { member: String },
    #[error("opening the destination '{}': {source}", path.display())]
    Destination { path: PathBuf, source: io::Error },
    #[error("member '{member}': {step}: {source}")]
    Io {
        member: String,
        step: &'static str,
        source: io::Error,
    },
}

/// The builder: reads its attributes from `env`, unpacks `src` into `out` and renames the
/// archive's one top-level entry to `channelName`.
pub fn run(env: &BTreeMap<String, String>) -> Result<(), String> {
    let get = |name: &str| super::attr(env, name);
    let out = Path::new(get("out")?);
    let channel_name = get("channelName")?;
    let src = get("src")?;
    check_channel_name(channel_name)?;
    std::fs::create_dir_all(out).map_err(|e| format!("creating '{}': {e}", out.display()))?;
    let file = open_tarball(Path::new(src)).map_err(|e| format!("opening '{src}': {e}"))?;
    unpack(file, out).map_err(|e| format!("unpacking channel tarball '{src}': {e}"))?;

    let entries = std::fs::read_dir(out)
        .and_then(|d| {
            d.map(|e| e.map(|e| e.file_name()))
                .collect::<io::Result<Vec<_>>>()
        })
        .map_err(|e| format!("reading directory '{}': {e}", out.display()))?;
    let [top] = entries.as_slice() else {
        return Err(format!(
            "channel tarball '{src}' must hold exactly one top-level entry, and it holds {}",
            entries.len()
        ));
    };
    let (from, to) = (out.join(top), out.join(channel_name));
    std::fs::rename(&from, &to)
        .map_err(|e| format!("renaming '{}' to '{}': {e}", from.display(), to.display()))
}

/// `channelName` becomes a name in the output directory, so it must be exactly one.
pub fn check_channel_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(format!(
            "attribute 'channelName' is '{name}', which is not a file name"
        ));
    }
    Ok(())
}

/// Opens the tarball for reading, refusing a symlink and anything but a regular file.
fn open_tarball(src: &Path) -> io::Result<File> {
    let fd = rustix::fs::open(
        src,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let kind = FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode);
    if kind != FileType::RegularFile {
        return Err(io::Error::other(format!(
            "not a regular file but {}",
            describe(kind)
        )));
    }
    Ok(File::from(fd))
}

/// How a tarball is compressed, as its first bytes tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Bzip2,
    Xz,
}

/// The compression the stream starting with `head` (its first six bytes, or all of a shorter
/// stream) is in; `Err` for a format that is recognised but not read.
pub fn detect(head: &[u8]) -> Result<Compression, UnpackError> {
    const NOT_READ: &[(&[u8], &str)] = &[
        (&[0x28, 0xb5, 0x2f, 0xfd], "zstd-compressed"),
        (b"LZIP", "lzip-compressed"),
        (&[0x04, 0x22, 0x4d, 0x18], "lz4-compressed"),
        (&[0x1f, 0x9d], "compressed with compress(1)"),
        (b"PK\x03\x04", "a zip archive"),
        (b"070707", "a cpio archive"),
        (b"070701", "a cpio archive"),
        (b"070702", "a cpio archive"),
    ];
    if head.starts_with(&[0x1f, 0x8b]) {
        return Ok(Compression::Gzip);
    }
    if head.starts_with(b"BZh") {
        return Ok(Compression::Bzip2);
    }
    if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        return Ok(Compression::Xz);
    }
    match NOT_READ.iter().find(|(magic, _)| head.starts_with(magic)) {
        Some((_, what)) => Err(UnpackError::Unsupported(what)),
        None => Ok(Compression::None),
    }
}

/// Unpacks the (possibly compressed) tar archive read from `input` into the existing
/// directory `dest`, under the rules of the module doc.
pub fn unpack(mut input: impl Read, dest: &Path) -> Result<(), UnpackError> {
    let mut head = [0u8; 6];
    let mut len = 0;
    while len < head.len() {
        match input.read(&mut head[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(UnpackError::Read(e)),
        }
    }
    let whole = io::Cursor::new(head[..len].to_vec()).chain(input);
    // Multi-stream decoders: parallel compressors (pigz, pbzip2, pixz) write one stream per
    // chunk, and the tar data runs across them.
    let reader: Box<dyn Read> = match detect(&head[..len])? {
        Compression::None => Box::new(whole),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(whole)),
        Compression::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(whole)),
        Compression::Xz => Box::new(xz2::read::XzDecoder::new_multi_decoder(whole)),
    };
    let root = rustix::fs::open(
        dest,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| UnpackError::Destination {
        path: dest.to_owned(),
        source: e.into(),
    })?;
    let x = Extractor { root };
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().map_err(UnpackError::Read)? {
        let mut entry = entry.map_err(UnpackError::Read)?;
        x.extract(&mut entry)?;
    }
    Ok(())
}

/// The components of a member name or hard link target, with empty and `.` components (a
/// leading `/`, `./`, `a//b`) dropped; `None` when one is `..`.
pub fn clean_components(name: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    for c in name.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn describe(kind: FileType) -> &'static str {
    match kind {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Symlink => "a symlink",
        FileType::Fifo => "a FIFO",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Unknown => "a file of unknown type",
    }
}

/// Creates members under `root`, every path resolved one component at a time from it.
struct Extractor {
    root: OwnedFd,
}

/// What a member becomes.
enum Kind {
    Dir,
    File { executable: bool },
    Symlink(Vec<u8>),
    HardLink(Vec<u8>),
}

impl Extractor {
    fn extract<R: Read>(&self, entry: &mut tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let raw_name = entry.path_bytes().into_owned();
        let member = lossy(&raw_name);
        let io_err = |step: &'static str| {
            let member = member.clone();
            move |e: io::Error| UnpackError::Io {
                member,
                step,
                source: e,
            }
        };
        let entry_type = entry.header().entry_type();
        let link_name = || {
            entry
                .link_name_bytes()
                .map(|l| l.into_owned())
                .ok_or_else(|| UnpackError::Io {
                    member: member.clone(),
                    step: "reading the link target",
                    source: io::Error::other("the archive gives none"),
                })
        };
        let unsupported = |kind: String| UnpackError::UnsupportedType {
            member: member.clone(),
            kind,
        };
        let kind = match entry_type {
            // Metadata for the whole archive, such as `git archive`'s commit id.
            tar::EntryType::XGlobalHeader => return Ok(()),
            tar::EntryType::Directory => Kind::Dir,
            // Before POSIX had a directory type, a trailing `/` made a member a directory.
            tar::EntryType::Regular if raw_name.ends_with(b"/") => Kind::Dir,
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let mode = entry.header().mode().map_err(UnpackError::Read)?;
                Kind::File {
                    executable: mode & 0o100 != 0,
                }
            }
            tar::EntryType::Symlink => Kind::Symlink(link_name()?),
            tar::EntryType::Link => Kind::HardLink(link_name()?),
            tar::EntryType::Char => return Err(unsupported("a character device".into())),
            tar::EntryType::Block => return Err(unsupported("a block device".into())),
            tar::EntryType::Fifo => return Err(unsupported("a FIFO".into())),
            other => {
                return Err(unsupported(format!(
                    "of tar entry type '{}'",
                    other.as_byte().escape_ascii()
                )))
            }
        };
        let dot_dot = |path: &[u8]| UnpackError::DotDot {
            member: member.clone(),
            path: lossy(path),
        };
        let components = clean_components(&raw_name).ok_or_else(|| dot_dot(&raw_name))?;
        let Some((name, parents)) = components.split_last() else {
            // `./` or `/`: the destination itself, which exists.
            return match kind {
                Kind::Dir => Ok(()),
                _ => Err(UnpackError::NotADirectoryAtTop { member }),
            };
        };
        let parent = self.open_dir(parents, &member, true)?;
        let parent = parent.as_ref().map_or(self.root.as_fd(), AsFd::as_fd);

        match kind {
            Kind::Dir => {
                if !self.clear_way(parent, name, true, &member)? {
                    rustix::fs::mkdirat(parent, *name, Mode::from_raw_mode(0o755))
                        .map_err(|e| io_err("creating the directory")(e.into()))?;
                }
            }
            Kind::File { executable } => {
                self.clear_way(parent, name, false, &member)?;
                let mode = Mode::from_raw_mode(if executable { 0o755 } else { 0o644 });
                // O_EXCL: the name was just cleared; a symlink there now is not followed.
                let fd = rustix::fs::openat(
                    parent,
                    *name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    mode,
                )
                .map_err(|e| io_err("creating the file")(e.into()))?;
                // The umask must not take the execute bit away: it is what the NAR keeps.
                rustix::fs::fchmod(&fd, mode)
                    .map_err(|e| io_err("setting the file's mode")(e.into()))?;
                let mut file = File::from(fd);
                let written =
                    io::copy(entry, &mut file).map_err(io_err("unpacking the contents"))?;
                // A stream that ends inside a member leaves it short rather than failing.
                if entry_type != tar::EntryType::GNUSparse && written != entry.size() {
                    return Err(io_err("unpacking the contents")(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "the archive ends after {written} of its {} bytes",
                            entry.size()
                        ),
                    )));
                }
            }
            Kind::Symlink(target) => {
                self.clear_way(parent, name, false, &member)?;
                // The target is kept as it is: a symlink may point anywhere, what matters is
                // that nothing is ever unpacked through one.
                rustix::fs::symlinkat(target.as_slice(), parent, *name)
                    .map_err(|e| io_err("creating the symlink")(e.into()))?;
            }
            Kind::HardLink(target) => {
                let target_components =
                    clean_components(&target).ok_or_else(|| dot_dot(&target))?;
                let Some((target_name, target_parents)) = target_components.split_last() else {
                    return Err(io_err("creating the hard link")(io::Error::other(
                        "its target is the top of the archive",
                    )));
                };
                let target_dir = self.open_dir(target_parents, &member, false)?;
                let target_dir = target_dir.as_ref().map_or(self.root.as_fd(), AsFd::as_fd);
                self.clear_way(parent, name, false, &member)?;
                // No AT_SYMLINK_FOLLOW: a link to a symlink is a link to the symlink itself.
                rustix::fs::linkat(target_dir, *target_name, parent, *name, AtFlags::empty())
                    .map_err(|e| {
                        io_err("creating the hard link")(io::Error::new(
                            io::Error::from(e).kind(),
                            format!("to '{}': {e}", lossy(&target)),
                        ))
                    })?;
            }
        }
        Ok(())
    }

    /// Opens the directory at `components` under the root, one component at a time, never
    /// following a symlink; missing directories are made when `create`, and (as libarchive
    /// does) a non-directory in the way is replaced by one. `None` is the root itself.
    fn open_dir(
        &self,
        components: &[&[u8]],
        member: &str,
        create: bool,
    ) -> Result<Option<OwnedFd>, UnpackError> {
        let mut dir: Option<OwnedFd> = None;
        for (i, c) in components.iter().enumerate() {
            let at = dir.as_ref().map_or(self.root.as_fd(), AsFd::as_fd);
            let so_far = || lossy(&components[..=i].join(&b'/'));
            let io_err = |step: &'static str, e: Errno| UnpackError::Io {
                member: member.to_owned(),
                step,
                source: io::Error::new(io::Error::from(e).kind(), format!("'{}': {e}", so_far())),
            };
            let through = || UnpackError::ThroughSymlink {
                member: member.to_owned(),
                symlink: so_far(),
            };
            let open = || {
                rustix::fs::openat(
                    at,
                    *c,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
            };
            let fd = match open() {
                Ok(fd) => fd,
                Err(Errno::LOOP) => return Err(through()),
                Err(e @ (Errno::NOENT | Errno::NOTDIR)) => {
                    if e == Errno::NOTDIR {
                        // Linux reports a symlink opened with O_DIRECTORY | O_NOFOLLOW as
                        // ENOTDIR; a symlink is refused, anything else replaced.
                        let st = rustix::fs::statat(at, *c, AtFlags::SYMLINK_NOFOLLOW)
                            .map_err(|e| io_err("getting the status", e))?;
                        if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
                            return Err(through());
                        }
                    }
                    if !create {
                        return Err(io_err("opening the directory", e));
                    }
                    if e == Errno::NOTDIR {
                        rustix::fs::unlinkat(at, *c, AtFlags::empty())
                            .map_err(|e| io_err("removing a non-directory in the way", e))?;
                    }
                    rustix::fs::mkdirat(at, *c, Mode::from_raw_mode(0o755))
                        .map_err(|e| io_err("creating the directory", e))?;
                    match open() {
                        Ok(fd) => fd,
                        Err(Errno::LOOP | Errno::NOTDIR) => return Err(through()),
                        Err(e) => return Err(io_err("opening the directory", e)),
                    }
                }
                Err(e) => return Err(io_err("opening the directory", e)),
            };
            dir = Some(fd);
        }
        Ok(dir)
    }

    /// Makes room for a member at `name` in `dir`, as libarchive overwrites: whatever is
    /// there is unlinked, except a directory where a directory is wanted, which is kept
    /// (`true`). A non-empty directory where a non-directory is wanted is an error.
    fn clear_way(
        &self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        want_dir: bool,
        member: &str,
    ) -> Result<bool, UnpackError> {
        let io_err = |step: &'static str| {
            move |e: Errno| UnpackError::Io {
                member: member.to_owned(),
                step,
                source: e.into(),
            }
        };
        let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Ok(false),
            Err(e) => return Err(io_err("getting the status of what is there")(e)),
        };
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            if want_dir {
                return Ok(true);
            }
            rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)
                .map_err(io_err("replacing the directory there"))?;
        } else {
            rustix::fs::unlinkat(dir, name, AtFlags::empty())
                .map_err(io_err("replacing what is there"))?;
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::process::Command;

    /// The tree under `root` as sorted lines: `d path`, `f path [x] contents`, `l path -> target`.
    fn tree(root: &Path) -> Vec<String> {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                let m = std::fs::symlink_metadata(&p).unwrap();
                if m.is_dir() {
                    out.push(format!("d {rel}"));
                    walk(root, &p, out);
                } else if m.file_type().is_symlink() {
                    let t = std::fs::read_link(&p).unwrap();
                    out.push(format!("l {rel} -> {}", t.display()));
                } else {
                    let x = if m.mode() & 0o100 != 0 { "x " } else { "" };
                    let text = std::fs::read_to_string(&p).unwrap();
                    out.push(format!("f {rel} {x}{text:?}"));
                }
            }
        }
        let mut out = Vec::new();
        walk(root, root, &mut out);
        out.sort();
        out
    }

    fn lines(v: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    }

    /// Appends a member with its name and link target written into the header as they are,
    /// which `tar::Builder`'s own setters refuse for `..` and absolute names.
    fn member(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, name: &[u8], link: &[u8]) {
        raw_member(b, kind, name, link, b"", 0o644);
    }

    fn raw_member(
        b: &mut tar::Builder<Vec<u8>>,
        kind: tar::EntryType,
        name: &[u8],
        link: &[u8],
        data: &[u8],
        mode: u32,
    ) {
        let mut h = tar::Header::new_ustar();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &str) {
        raw_member(
            b,
            tar::EntryType::Regular,
            name.as_bytes(),
            b"",
            data.as_bytes(),
            0o644,
        );
    }

    fn archive(f: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        f(&mut b);
        b.into_inner().unwrap()
    }

    /// A scratch directory with an empty `out` to unpack into and an `outside` beside it
    /// holding `victim`, which no archive may touch.
    struct Scratch {
        dir: tempfile::TempDir,
    }

    impl Scratch {
        fn new() -> Scratch {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir(dir.path().join("out")).unwrap();
            std::fs::create_dir(dir.path().join("outside")).unwrap();
            std::fs::write(dir.path().join("outside/victim"), "victim\n").unwrap();
            Scratch { dir }
        }
        fn out(&self) -> PathBuf {
            self.dir.path().join("out")
        }
        fn outside(&self) -> PathBuf {
            self.dir.path().join("outside")
        }
        fn unpack(&self, tar: &[u8]) -> Result<(), UnpackError> {
            unpack(tar, &self.out())
        }
        /// Asserts that `outside` holds `victim` alone, unchanged and with one link, and
        /// that nothing new appeared beside `out` and `outside`.
        fn assert_outside_untouched(&self) {
            assert_eq!(tree(&self.outside()), ["f victim \"victim\\n\""]);
            let victim = std::fs::metadata(self.outside().join("victim")).unwrap();
            assert_eq!(victim.nlink(), 1);
            let mut top: Vec<_> = std::fs::read_dir(self.dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            top.sort();
            assert_eq!(top, ["out", "outside"]);
        }
    }

    /// A channel-like tree archived by GNU tar: a long name, an executable, a symlink, a
    /// hard link, an empty directory.
    fn gnu_tarball(dir: &Path) -> PathBuf {
        let src = dir.join("src/nixexprs-1.0");
        let deep = src.join("lib/a-directory-name-long-enough/that-the-whole-path-is-past-one-hundred-bytes/which-ustar-cannot-hold");
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::create_dir_all(src.join("empty")).unwrap();
        std::fs::create_dir_all(src.join("bin")).unwrap();
        std::fs::write(deep.join("default.nix"), "{ }\n").unwrap();
        std::fs::write(src.join("README"), "read me\n").unwrap();
        std::fs::write(src.join("bin/run"), "#!/bin/sh\n").unwrap();
        // Owner execute only: that bit alone decides what the NAR calls executable.
        std::fs::set_permissions(src.join("bin/run"), std::fs::Permissions::from_mode(0o711))
            .unwrap();
        std::fs::set_permissions(src.join("README"), std::fs::Permissions::from_mode(0o604))
            .unwrap();
        std::os::unix::fs::symlink("../README", src.join("bin/readme")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", src.join("elsewhere")).unwrap();
        std::fs::hard_link(src.join("README"), src.join("README.hard")).unwrap();
        let tarball = dir.join("plain.tar");
        let status = Command::new("tar")
            .arg("-C")
            .arg(dir.join("src"))
            .arg("-cf")
            .arg(&tarball)
            .arg("nixexprs-1.0")
            .status()
            .unwrap();
        assert!(status.success());
        tarball
    }

    const LONG: &str = "lib/a-directory-name-long-enough/that-the-whole-path-is-past-one-hundred-bytes/which-ustar-cannot-hold";

    fn gnu_tree(top: &str) -> Vec<String> {
        let long = format!("{top}/{LONG}");
        let mut dirs = vec![];
        let mut p = String::new();
        for c in long.split('/') {
            p = if p.is_empty() {
                c.to_owned()
            } else {
                format!("{p}/{c}")
            };
            dirs.push(format!("d {p}"));
        }
        let mut v = dirs;
        v.extend([
            format!("f {long}/default.nix \"{{ }}\\n\""),
            format!("d {top}/empty"),
            format!("d {top}/bin"),
            format!("f {top}/bin/run x \"#!/bin/sh\\n\""),
            format!("l {top}/bin/readme -> ../README"),
            format!("l {top}/elsewhere -> /etc/hostname"),
            format!("f {top}/README \"read me\\n\""),
            format!("f {top}/README.hard \"read me\\n\""),
        ]);
        v.sort();
        v
    }

    fn compress(data: &[u8], how: Compression) -> Vec<u8> {
        match how {
            Compression::None => data.to_vec(),
            Compression::Gzip => {
                let mut e =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            Compression::Bzip2 => {
                let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            Compression::Xz => {
                let mut e = xz2::write::XzEncoder::new(Vec::new(), 6);
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
        }
    }

    const ALL: [Compression; 4] = [
        Compression::None,
        Compression::Gzip,
        Compression::Bzip2,
        Compression::Xz,
    ];

    #[test]
    fn a_gnu_tarball_unpacks_to_its_tree_under_every_compression() {
        let t = tempfile::tempdir().unwrap();
        let plain = std::fs::read(gnu_tarball(t.path())).unwrap();
        for how in ALL {
            let out = t.path().join(format!("out-{how:?}"));
            std::fs::create_dir(&out).unwrap();
            unpack(compress(&plain, how).as_slice(), &out).unwrap();
            assert_eq!(tree(&out), gnu_tree("nixexprs-1.0"), "{how:?}");
            let readme = std::fs::metadata(out.join("nixexprs-1.0/README")).unwrap();
            assert_eq!(readme.nlink(), 2, "{how:?}: the hard link is one");
        }
    }

    #[test]
    fn streams_in_several_parts_are_read_whole() {
        // As pigz/pbzip2/pixz write them: the tar data split across concatenated streams.
        let t = tempfile::tempdir().unwrap();
        let plain = std::fs::read(gnu_tarball(t.path())).unwrap();
        let (a, b) = plain.split_at(plain.len() / 3);
        for how in [Compression::Gzip, Compression::Bzip2, Compression::Xz] {
            let mut two = compress(a, how);
            two.extend(compress(b, how));
            let out = t.path().join(format!("out-{how:?}"));
            std::fs::create_dir(&out).unwrap();
            unpack(two.as_slice(), &out).unwrap();
            assert_eq!(tree(&out), gnu_tree("nixexprs-1.0"), "{how:?}");
        }
    }

    fn env(pairs: &[(&str, &Path)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.display().to_string()))
            .collect()
    }

    #[test]
    fn the_builder_renames_the_one_top_level_entry_whatever_the_file_is_called() {
        let t = tempfile::tempdir().unwrap();
        let plain = std::fs::read(gnu_tarball(t.path())).unwrap();
        // xz data under a name that says gzip: the contents decide.
        let src = t.path().join("nixexprs.tar.gz");
        std::fs::write(&src, compress(&plain, Compression::Xz)).unwrap();
        let out = t.path().join("out");
        run(&env(&[
            ("out", &out),
            ("channelName", Path::new("nixos")),
            ("src", &src),
        ]))
        .unwrap();
        assert_eq!(tree(&out), gnu_tree("nixos"));
    }

    #[test]
    fn a_tarball_without_exactly_one_top_level_entry_is_an_error_naming_it() {
        let t = tempfile::tempdir().unwrap();
        let cases = [
            (
                "two",
                archive(|b| {
                    file(b, "a/x", "1");
                    file(b, "b", "2");
                }),
                2,
            ),
            ("none", archive(|_| {}), 0),
            // `./` is the top itself, so `./a` and `./b` are two entries.
            (
                "dot",
                archive(|b| {
                    member(b, tar::EntryType::Directory, b"./", b"");
                    file(b, "./a", "1");
                    file(b, "./b", "2");
                }),
                2,
            ),
        ];
        for (name, tar, count) in cases {
            let src = t.path().join(format!("{name}.tar"));
            std::fs::write(&src, tar).unwrap();
            let out = t.path().join(format!("out-{name}"));
            let e = run(&env(&[
                ("out", &out),
                ("channelName", Path::new("nixos")),
                ("src", &src),
            ]))
            .unwrap_err();
            assert_eq!(
                e,
                format!(
                    "channel tarball '{}' must hold exactly one top-level entry, and it holds {count}",
                    src.display()
                )
            );
        }
    }

    #[test]
    fn missing_attributes_and_bad_channel_names_are_refused_before_anything_is_made() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("c.tar");
        std::fs::write(&src, archive(|b| file(b, "c/f", "x"))).unwrap();
        let out = t.path().join("out");
        for bad in ["../escape", "a/b", "", ".", ".."] {
            let e = run(&env(&[
                ("out", &out),
                ("channelName", Path::new(bad)),
                ("src", &src),
            ]))
            .unwrap_err();
            assert_eq!(
                e,
                format!("attribute 'channelName' is '{bad}', which is not a file name")
            );
        }
        let e = run(&env(&[("out", &out), ("src", &src)])).unwrap_err();
        assert_eq!(e, "attribute 'channelName' missing");
        assert!(!out.exists());
        assert!(!t.path().join("escape").exists());
    }

    #[test]
    fn a_src_that_is_a_symlink_is_not_followed() {
        let t = tempfile::tempdir().unwrap();
        let real = t.path().join("real.tar");
        std::fs::write(&real, archive(|b| file(b, "c/f", "x"))).unwrap();
        let src = t.path().join("src.tar");
        std::os::unix::fs::symlink(&real, &src).unwrap();
        let out = t.path().join("out");
        let e = run(&env(&[
            ("out", &out),
            ("channelName", Path::new("nixos")),
            ("src", &src),
        ]))
        .unwrap_err();
        assert!(
            e.starts_with(&format!("opening '{}': ", src.display())),
            "{e}"
        );
        assert_eq!(tree(&out), Vec::<String>::new());
    }

    #[test]
    fn dot_dot_in_a_name_or_hard_link_target_is_refused() {
        let s = Scratch::new();
        let e = s
            .unpack(&archive(|b| {
                file(b, "c/ok", "fine");
                file(b, "c/../../outside/victim", "pwned");
            }))
            .unwrap_err();
        assert!(
            matches!(&e, UnpackError::DotDot { member, path }
                if member == "c/../../outside/victim" && path == member),
            "{e:?}"
        );
        let s2 = Scratch::new();
        let e = s2
            .unpack(&archive(|b| {
                member(b, tar::EntryType::Directory, b"c/", b"");
                member(b, tar::EntryType::Link, b"c/h", b"../outside/victim");
            }))
            .unwrap_err();
        assert!(
            matches!(&e, UnpackError::DotDot { member, path }
                if member == "c/h" && path == "../outside/victim"),
            "{e:?}"
        );
        for s in [&s, &s2] {
            s.assert_outside_untouched();
        }
        assert_eq!(tree(&s.out()), lines(&["d c", "f c/ok \"fine\""]));
    }

    #[test]
    fn absolute_names_land_inside_the_output() {
        let s = Scratch::new();
        let abs = s.outside().join("victim");
        let abs = abs.to_str().unwrap();
        s.unpack(&archive(|b| file(b, abs, "pwned"))).unwrap();
        s.assert_outside_untouched();
        let inside = s.out().join(abs.trim_start_matches('/'));
        assert_eq!(std::fs::read_to_string(inside).unwrap(), "pwned");

        // An absolute hard link target is looked for under the output as well.
        let s = Scratch::new();
        let e = s
            .unpack(&archive(|b| {
                member(b, tar::EntryType::Directory, b"c/", b"");
                member(b, tar::EntryType::Link, b"c/h", abs.as_bytes());
            }))
            .unwrap_err();
        assert!(
            matches!(&e, UnpackError::Io { member, step: "opening the directory", source }
                if member == "c/h" && source.kind() == io::ErrorKind::NotFound),
            "{e:?}"
        );
        s.assert_outside_untouched();
    }

    #[test]
    fn nothing_is_unpacked_through_a_symlink() {
        let scratch = Scratch::new();
        let outside = scratch.outside();
        let outside = outside.to_str().unwrap().as_bytes();
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "absolute link, then a file under it",
                archive(|b| {
                    member(b, tar::EntryType::Symlink, b"c/l", outside);
                    file(b, "c/l/evil", "pwned");
                }),
                "c/l",
            ),
            (
                "relative link out of the output",
                archive(|b| {
                    member(b, tar::EntryType::Symlink, b"c/up", b"../../outside");
                    file(b, "c/up/evil", "pwned");
                }),
                "c/up",
            ),
            (
                "link to a directory inside, then a directory under it",
                archive(|b| {
                    member(b, tar::EntryType::Directory, b"c/d/", b"");
                    member(b, tar::EntryType::Symlink, b"c/l", b"d");
                    member(b, tar::EntryType::Directory, b"c/l/sub/", b"");
                }),
                "c/l",
            ),
            (
                "hard link whose target lies through a link",
                archive(|b| {
                    member(b, tar::EntryType::Symlink, b"c/l", outside);
                    member(b, tar::EntryType::Link, b"c/h", b"c/l/victim");
                }),
                "c/l",
            ),
        ];
        for (what, tar, link) in cases {
            let s = Scratch::new();
            // The links point at this scratch's `outside`, not the first one's.
            let tar = swap(&tar, outside, s.outside().to_str().unwrap().as_bytes());
            let e = s.unpack(&tar).unwrap_err();
            assert!(
                matches!(&e, UnpackError::ThroughSymlink { symlink, .. } if symlink == link),
                "{what}: {e:?}"
            );
            s.assert_outside_untouched();
        }
    }

    /// `tar` with every `from` replaced by `to`, of the same length, checksums fixed.
    fn swap(tar: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
        assert_eq!(from.len(), to.len());
        let mut out = tar.to_vec();
        let mut i = 0;
        while i + from.len() <= out.len() {
            if &out[i..i + from.len()] == from {
                out[i..i + from.len()].copy_from_slice(to);
            }
            i += 1;
        }
        for block in out.chunks_mut(512) {
            if block.iter().any(|&b| b != 0) && block[257..262] == *b"ustar" {
                let h = tar::Header::from_byte_slice(block);
                let mut h = h.clone();
                h.set_cksum();
                block.copy_from_slice(h.as_bytes());
            }
        }
        out
    }

    #[test]
    fn a_member_replaces_a_symlink_at_its_name_instead_of_writing_through_it() {
        let s = Scratch::new();
        let victim = s.outside().join("victim");
        let victim = victim.to_str().unwrap().as_bytes();
        s.unpack(&archive(|b| {
            member(b, tar::EntryType::Symlink, b"c/l", victim);
            file(b, "c/l", "mine");
            member(b, tar::EntryType::Symlink, b"c/d", victim);
            member(b, tar::EntryType::Directory, b"c/d/", b"");
        }))
        .unwrap();
        s.assert_outside_untouched();
        assert_eq!(tree(&s.out()), lines(&["d c", "d c/d", "f c/l \"mine\""]));
    }

    #[test]
    fn devices_fifos_and_unknown_types_are_refused() {
        for (kind, name) in [
            (tar::EntryType::Fifo, "a FIFO"),
            (tar::EntryType::Char, "a character device"),
            (tar::EntryType::Block, "a block device"),
            (tar::EntryType::new(b'V'), "of tar entry type 'V'"),
        ] {
            let s = Scratch::new();
            let e = s
                .unpack(&archive(|b| member(b, kind, b"c/special", b"")))
                .unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("member 'c/special' is {name}, which a store path cannot hold")
            );
        }
    }

    #[test]
    fn modes_keep_the_owner_execute_bit_and_never_block_unpacking() {
        let s = Scratch::new();
        s.unpack(&archive(|b| {
            // As `git archive` begins: a global header holding the commit id.
            raw_member(
                b,
                tar::EntryType::XGlobalHeader,
                b"pax_global_header",
                b"",
                b"52 comment=0123456789abcdef0123456789abcdef01234567\n",
                0o666,
            );
            raw_member(b, tar::EntryType::Directory, b"c/", b"", b"", 0o000);
            raw_member(b, tar::EntryType::Regular, b"c/plain", b"", b"p", 0o000);
            raw_member(b, tar::EntryType::Regular, b"c/exec", b"", b"e", 0o100);
            raw_member(b, tar::EntryType::Regular, b"c/others", b"", b"o", 0o655);
            // A trailing slash on a regular member: a directory, as in pre-POSIX archives.
            raw_member(b, tar::EntryType::Regular, b"c/old-dir/", b"", b"", 0o755);
        }))
        .unwrap();
        assert_eq!(
            tree(&s.out()),
            lines(&[
                "d c",
                "d c/old-dir",
                "f c/exec x \"e\"",
                "f c/others \"o\"",
                "f c/plain \"p\"",
            ])
        );
    }

    #[test]
    fn a_later_member_replaces_an_earlier_one_of_the_same_name() {
        let s = Scratch::new();
        s.unpack(&archive(|b| {
            file(b, "c/a", "first");
            file(b, "c/a", "second");
            file(b, "c/f", "a file, then a directory");
            member(b, tar::EntryType::Directory, b"c/f/", b"");
            file(b, "c/p", "a file where a parent directory goes");
            file(b, "c/p/child", "child");
        }))
        .unwrap();
        assert_eq!(
            tree(&s.out()),
            lines(&[
                "d c",
                "d c/f",
                "d c/p",
                "f c/a \"second\"",
                "f c/p/child \"child\"",
            ])
        );
        let e = s
            .unpack(&archive(|b| file(b, "c/p", "not over a full directory")))
            .unwrap_err();
        assert!(
            matches!(
                &e,
                UnpackError::Io {
                    step: "replacing the directory there",
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn damaged_and_foreign_input_is_an_error() {
        let t = tempfile::tempdir().unwrap();
        let plain = std::fs::read(gnu_tarball(t.path())).unwrap();
        let readme = plain.windows(8).position(|w| w == b"read me\n").unwrap();
        for how in ALL {
            let s = Scratch::new();
            let cut = &plain[..readme + 4];
            let e = s.unpack(&compress(cut, how)).unwrap_err();
            assert!(
                matches!(
                    &e,
                    UnpackError::Io {
                        step: "unpacking the contents",
                        ..
                    } | UnpackError::Read(_)
                ),
                "{how:?}: {e:?}"
            );
        }
        let s = Scratch::new();
        let mut garbled = compress(&plain, Compression::Xz);
        let mid = garbled.len() / 2;
        garbled[mid] ^= 0xff;
        assert!(s.unpack(&garbled).is_err());
        let s = Scratch::new();
        let zstd = [0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0];
        let e = s.unpack(&zstd).unwrap_err();
        assert!(
            matches!(e, UnpackError::Unsupported("zstd-compressed")),
            "{e:?}"
        );
        let e = s.unpack(b"PK\x03\x04rest of a zip").unwrap_err();
        assert!(
            matches!(e, UnpackError::Unsupported("a zip archive")),
            "{e:?}"
        );
        assert!(matches!(s.unpack(&[0x5a; 700]), Err(UnpackError::Read(_))));
    }

    #[test]
    fn names_are_cleaned_of_empty_and_dot_components() {
        let c = |s: &str| {
            clean_components(s.as_bytes()).map(|v| {
                v.iter()
                    .map(|c| String::from_utf8(c.to_vec()).unwrap())
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(
            c("/abs//x/./y/"),
            Some(vec!["abs".into(), "x".into(), "y".into()])
        );
        assert_eq!(c("./"), Some(vec![]));
        assert_eq!(c("a/../b"), None);
        assert_eq!(c(".."), None);
        assert_eq!(
            c("a/..b/c."),
            Some(vec!["a".into(), "..b".into(), "c.".into()])
        );
    }

    #[test]
    fn compression_is_told_by_magic_numbers() {
        assert_eq!(detect(&[0x1f, 0x8b, 8, 0]).unwrap(), Compression::Gzip);
        assert_eq!(detect(b"BZh91AY").unwrap(), Compression::Bzip2);
        assert_eq!(detect(b"\xfd7zXZ\x00").unwrap(), Compression::Xz);
        // An xz magic cut short is not xz.
        assert_eq!(detect(b"\xfd7zXZ").unwrap(), Compression::None);
        assert_eq!(detect(b"nixexp").unwrap(), Compression::None);
        assert_eq!(detect(b"").unwrap(), Compression::None);
        assert!(matches!(
            detect(b"LZIP\x01"),
            Err(UnpackError::Unsupported(_))
        ));
    }
}
