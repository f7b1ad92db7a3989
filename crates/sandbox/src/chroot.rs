//! Chroot mode: the builder's root, and the namespace part of the child's plan.
//!
//! Almost nothing of the sandbox is on disk. The parent creates only
//!
//! ```text
//! <root>/        the builder's store directory: its outputs end up here (1770 root:<gid>,
//!                sticky; 0700 without a build user), so that no other local user can look
//!                into a build in progress
//! <root>.work/   overlayfs work directory beside it, only in overlay mode (see below)
//! ```
//!
//! The child, already in its new namespaces, builds the rest in a tmpfs mounted over `<root>`,
//! which nobody outside its mount namespace can see and which the kernel frees with the
//! namespace, so there is nothing to delete afterwards but the directories above:
//!
//! ```text
//! 1. / recursively private         nothing below may propagate back to the host
//! 2. lo up / setns to a pooled ns  (not for Network::Host)
//! 3. hostname, domain name         UTS namespace is private now
//! 4. chdir <root>, tmpfs on <root>  the new root; it hides <root> on disk, but the working
//!                                  directory still is that directory, found as "."
//! 5. skeleton in the tmpfs         /tmp 1777, /etc files, /dev entries, /proc, and a mount
//!                                  point for every bind and for the store directory
//! 6. binds outside the store       sorted by target, so a parent directory is mounted before
//!    directory                     what lies inside it (an ancestor of the store directory
//!                                  before the store directory); read-only ones remounted so
//! 7. tmpfs on /dev/shm, devpts     fresh, so nothing is shared with the host or other builds
//! 8. proc on /proc                 after the PID namespace exists (clone made it): shows only
//!                                  the sandbox's processes
//! 9. the store directory, then     (overlay mode with a detached lower layer: first wait for
//!    the binds in it, read-only     the parent, see below)
//! 10. pivot_root, detach old root  last: every source path above is a host path
//! ```
//!
//! The store directory inside is mounted in one of two ways:
//!
//! - *bind mode*: `<root>` ("." for the child) is bound at the store directory. The mount
//!   points of the input paths must then exist in it, on disk: the parent creates them (one
//!   inode each; BENCHMARKS.md, "sandbox: figures behind the README's design choices").
//! - *overlay mode*, when there are many inputs: an overlayfs whose upper layer is `<root>` on
//!   disk (so the builder's writes, its outputs, go there as in bind mode) and whose lower
//!   layer is a tmpfs directory holding the input mount points (a few microseconds each). The
//!   kernel re-creates `<root>.work/work` on each such mount and probes it, which costs about
//!   as much as a few on-disk mount points, hence the threshold. The lower layer is
//!   - a tmpfs the *parent* makes with the new mount API (`fsopen`, `fsmount`: mounted
//!     nowhere) and fills with `mkdirat` on the mount descriptor *after the clone*, while the
//!     child goes through steps 1-8 on the other CPU; the child waits for it (a futex) just
//!     before the overlay mount and names it `/proc/self/fd/<n>`, having inherited the
//!     descriptor ([`DetachedLower`]). Linux 6.15 accepts a layer from a detached mount;
//!   - or, where that is refused (older kernels: the overlay step fails, the build is set up
//!     again and the process does not try again) or the new mount API is missing, the store
//!     directory's place in the child's own tmpfs, made by the child in step 5.
//!
//!   If the overlay mount fails with a lower layer of the second kind too (no overlay module,
//!   an upper file system it does not support), the build is set up again in bind mode, and
//!   the process does not try overlays again.
//!
//! Why not bind the inputs onto tmpfs mount points, which costs less than half a bind onto the
//! overlay (each target's first lookup goes through `ovl_lookup`, upper then lower layer, and
//! an inode hash lookup)? A directory's names all belong to one file system, or to a union of
//! several: names the builder creates (its outputs, as a directory or as a file, and any other
//! name) must go to disk for the rename into the store, and each input must be a name there
//! too, so the store directory is either on disk (mount points on disk, bind mode), or in
//! memory (outputs in RAM, copied afterwards), or a union. Overlayfs does not see mounts on
//! its lower layer, so the binds have to go onto the overlay itself.
//!
//! Read-only input binds under the store directory are made read-only with two
//! `mount_setattr` calls for all of them (recursive set, then clear on the store directory's
//! own mount) instead of one remount each; other read-only binds are remounted one by one,
//! keeping the source's nosuid/nodev/noexec.
//!
//! Non-directory inputs are bind-mounted onto empty files rather than hard-linked as Nix 1.x
//! did: a bind works across file systems, has no link-count limit (no EMLINK/EXDEV fallback
//! to copy), can be read-only, and disappears with the mount namespace.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crate::plan::{Mount, Step};
use crate::seccomp::Filter;
use crate::{BuildUserIds, SandboxError};

/// What the builder's root holds and how its namespaces are set up.
pub struct ChrootSpec {
    /// Directory to create (it must not exist yet) on the store's file system. The builder's
    /// store directory lives in it, at [`chroot_store_dir`]: outputs can be renamed from there
    /// into the store. Left in place afterwards: moving outputs out and removing the directory
    /// are the caller's job. Once the sandbox is gone it holds only plain directories and
    /// files (every mount lived in the builder's mount namespace).
    pub root: PathBuf,
    /// The store directory as the builder sees it, e.g. `/nix/store`; writable (sticky) so
    /// that the builder can create its outputs there.
    pub store_dir: PathBuf,
    /// The build directory, bound read-write at the same path inside.
    pub build_dir: PathBuf,
    /// The input closure and `sandbox-paths`. A bind with target `/dev` replaces the minimal
    /// `/dev`.
    pub binds: Vec<BindMount>,
    pub hostname: String,
    pub network: Network,
    /// Files written under `/etc/` in the sandbox (name relative to `/etc`, contents).
    pub etc_files: Vec<(PathBuf, Vec<u8>)>,
    /// Bind `/dev/kvm` when the host has it.
    pub kvm: bool,
    /// A user namespace of the builder's own, for a caller without root (see
    /// [`UserNamespace`]). `None`: the builder shares the caller's user namespace (root).
    pub user_namespace: Option<UserNamespace>,
}

/// The uid a builder has inside its user namespace, as in Nix 2.x (`sandboxUid`).
pub const SANDBOX_UID: u32 = 1000;
/// The gid a builder has inside its user namespace, as in Nix 2.x (`sandboxGid`).
pub const SANDBOX_GID: u32 = 100;

/// The builder's own user namespace: the caller's effective uid and gid appear inside as
/// `inside_uid`/`inside_gid`, and no other id is mapped (files of anyone else show as
/// `nobody`). This is how a caller without root gets the sandbox (Nix 2.x does the same):
/// the namespace gives the child the capabilities the mounts need, over its own namespaces
/// only. The child writes its maps itself, as its first steps, before it has any other id:
/// the kernel lets a process map exactly its own uid and gid (and only after `setgroups` is
/// denied, so that dropping a group cannot grant access), with no help from the parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserNamespace {
    pub inside_uid: u32,
    pub inside_gid: u32,
    /// Must be the caller's effective uid (the only one the child can map by itself).
    pub outside_uid: u32,
    /// Must be the caller's effective gid.
    pub outside_gid: u32,
    /// Ids mapped from each of the above on: 1 (the caller's, written by the child itself),
    /// or more (`uid-range`: 65536 from 0), written by the parent, which needs
    /// CAP_SETUID/CAP_SETGID (root). With more than one, the builder keeps its
    /// capabilities over its own namespaces (to `chown` to its other ids, say); the seccomp
    /// filter and no_new_privs still apply.
    pub count: u32,
}

impl UserNamespace {
    /// The caller's effective ids, seen inside as Nix's build user 1000:100.
    pub fn for_caller() -> UserNamespace {
        UserNamespace {
            inside_uid: SANDBOX_UID,
            inside_gid: SANDBOX_GID,
            outside_uid: nix::unistd::geteuid().as_raw(),
            outside_gid: nix::unistd::getegid().as_raw(),
            count: 1,
        }
    }

    /// `count` ids from `first` (as uid and gid) outside, seen inside from 0 on: Nix's
    /// `uid-range` (the builder runs as root inside, 65536 ids). Needs root.
    pub fn range(first: u32, count: u32) -> UserNamespace {
        UserNamespace {
            inside_uid: 0,
            inside_gid: 0,
            outside_uid: first,
            outside_gid: first,
            count,
        }
    }

    /// Whether the parent writes the maps (anything but the caller's own ids, one each).
    pub(crate) fn by_parent(&self) -> bool {
        self.count != 1
            || self.outside_uid != nix::unistd::geteuid().as_raw()
            || self.outside_gid != nix::unistd::getegid().as_raw()
    }
}

/// The id maps of a [`UserNamespace`] the parent writes after the clone, while the child
/// waits (a futex, as for a [`DetachedLower`]): only a process with CAP_SETUID in the parent
/// namespace may map more than its own id, and the child is already in the new one.
pub(crate) struct ParentIdMaps {
    pub uid_map: String,
    pub gid_map: String,
    /// 0 while the parent works, 1 when the maps are written, 2 if that failed.
    ready: Box<AtomicU32>,
    released: bool,
}

impl ParentIdMaps {
    /// Writes `/proc/<pid>/{uid,gid}_map`, then lets the child go on (told to stop on
    /// failure).
    pub fn write(&mut self, pid: libc::pid_t) -> Result<(), SandboxError> {
        let mut r = Ok(());
        for (file, map) in [("uid_map", &self.uid_map), ("gid_map", &self.gid_map)] {
            let path = format!("/proc/{pid}/{file}");
            if let Err(source) = fs::write(&path, map) {
                r = Err(SandboxError::Prepare {
                    step: format!("writing {path} ({})", map.trim_end()),
                    source,
                });
                break;
            }
        }
        self.release(r.is_ok());
        r
    }

    fn release(&mut self, ok: bool) {
        if self.released {
            return;
        }
        self.released = true;
        self.ready.store(if ok { 1 } else { 2 }, Ordering::Release);
        // SAFETY: FUTEX_WAKE on a word we own; the child (same address space) may wait on it.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                &*self.ready as *const AtomicU32,
                FUTEX_WAKE_PRIVATE,
                1,
                std::ptr::null::<libc::timespec>(),
                std::ptr::null::<u32>(),
                0,
            );
        }
    }
}

impl Drop for ParentIdMaps {
    fn drop(&mut self) {
        // Never leave a child waiting forever.
        self.release(false);
    }
}

impl ChrootSpec {
    /// A spec with Nix's defaults: host name `localhost`, a private network, `/etc/passwd`,
    /// `/etc/group` and `/etc/hosts` as [`nix_etc_files`] writes them for `uid`/`gid`.
    pub fn new(root: PathBuf, store_dir: PathBuf, build_dir: PathBuf, uid: u32, gid: u32) -> Self {
        ChrootSpec {
            root,
            store_dir,
            build_dir,
            binds: Vec::new(),
            hostname: "localhost".into(),
            network: Network::Private,
            etc_files: nix_etc_files(uid, gid),
            kvm: false,
            user_namespace: None,
        }
    }
}

/// Where the builder's store directory is on the host: [`ChrootSpec::root`] itself. An output
/// `<store_dir>/<name>` of the builder is at `chroot_store_dir(root)/<name>` once the builder
/// is gone.
pub fn chroot_store_dir(root: &Path) -> PathBuf {
    root.to_path_buf()
}

/// The overlayfs work directory of a root in overlay mode: beside the root, since overlayfs
/// wants it apart from its upper directory (the root itself), on the same file system. Made
/// by `prepare`, removed when the builder has been reaped.
pub(crate) fn overlay_work_dir(root: &Path) -> PathBuf {
    let mut w = root.as_os_str().to_owned();
    w.push(".work");
    PathBuf::from(w)
}

/// Removes an overlay work directory. The kernel makes `work/work` in it with mode 0: as
/// root that does not matter, but a caller without root (whose user namespace mounted the
/// overlay, so the directory is theirs) must open it up before it can be listed.
pub(crate) fn remove_overlay_work_dir(work: &Path) -> std::io::Result<()> {
    let _ = fs::set_permissions(work.join("work"), fs::Permissions::from_mode(0o700));
    fs::remove_dir_all(work)
}

/// `/etc/passwd` (the build user as `nixbld`, and `nobody`), `/etc/group` and `/etc/hosts`
/// with the contents Nix gives them in the chroot.
pub fn nix_etc_files(uid: u32, gid: u32) -> Vec<(PathBuf, Vec<u8>)> {
    vec![
        (
            "passwd".into(),
            format!(
                "nixbld:x:{uid}:{gid}:Nix build user:/:/noshell\n\
                 nobody:x:65534:65534:Nobody:/:/noshell\n"
            )
            .into_bytes(),
        ),
        ("group".into(), format!("nixbld:!:{gid}:\n").into_bytes()),
        (
            "hosts".into(),
            b"127.0.0.1 localhost\n::1 localhost\n".to_vec(),
        ),
    ]
}

/// `/etc/passwd`, `/etc/group` and `/etc/hosts` as Nix 2.x writes them for a builder in a
/// user namespace: `root` and the build user (`uid`/`gid`, home `home`, the build directory
/// as the builder sees it) as `nixbld`, and `nobody`/`nogroup` for every unmapped id.
pub fn nix_etc_files_userns(uid: u32, gid: u32, home: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let home = home.display();
    vec![
        (
            "passwd".into(),
            format!(
                "root:x:0:0:Nix build user:{home}:/noshell\n\
                 nixbld:x:{uid}:{gid}:Nix build user:{home}:/noshell\n\
                 nobody:x:65534:65534:Nobody:/:/noshell\n"
            )
            .into_bytes(),
        ),
        (
            "group".into(),
            format!("root:x:0:\nnixbld:!:{gid}:\nnogroup:x:65534:\n").into_bytes(),
        ),
        (
            "hosts".into(),
            b"127.0.0.1 localhost\n::1 localhost\n".to_vec(),
        ),
    ]
}

/// `source` on the host appears at `target` inside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindMount {
    pub target: PathBuf,
    pub source: PathBuf,
    /// A missing source is skipped instead of being an error (`sandbox-paths` entries with `?`).
    pub optional: bool,
    pub read_only: bool,
}

impl BindMount {
    /// `path` at the same place inside, read-write, required.
    pub fn same(path: impl Into<PathBuf>) -> BindMount {
        let p = path.into();
        BindMount {
            target: p.clone(),
            source: p,
            optional: false,
            read_only: false,
        }
    }

    pub fn read_only(mut self) -> BindMount {
        self.read_only = true;
        self
    }

    pub fn optional(mut self) -> BindMount {
        self.optional = true;
        self
    }
}

/// The builder's network.
pub enum Network {
    /// A fresh network namespace with only `lo`, made by the clone.
    Private,
    /// A never-used network namespace prepared ahead of time by a [`crate::NetNsPool`]
    /// (`lo` already up). Same isolation as `Private`, cheaper start.
    Prepared(OwnedFd),
    /// The host's network namespace, for fixed-output derivations (which must fetch); the
    /// host's `/etc/resolv.conf` and `/etc/services` are bound in when present.
    Host,
}

/// Device nodes of the minimal `/dev` (Nix's list).
const DEV_NODES: &[&str] = &["full", "null", "random", "tty", "urandom", "zero"];

/// From this many mount points under the store directory on, overlay mode is cheaper than
/// creating them on disk (see the module doc; the figures: BENCHMARKS.md, "sandbox: figures
/// behind the README's design choices").
pub(crate) const OVERLAY_MIN_INPUTS: usize = 8;

/// Set once an overlay mount failed in this process: no overlay is tried again.
static OVERLAY_BROKEN: AtomicBool = AtomicBool::new(false);

/// Set once an overlay over a detached lower layer failed (kernels before 6.15 refuse layers
/// from a detached mount): from then on the child makes the lower layer itself.
static DETACHED_LOWER_BROKEN: AtomicBool = AtomicBool::new(false);

/// Set by [`crate::set_detached_lower`] (benchmarks, tests): the child makes the lower layer.
static DETACHED_LOWER_DISABLED: AtomicBool = AtomicBool::new(false);

pub(crate) fn disable_detached_lower(disabled: bool) {
    DETACHED_LOWER_DISABLED.store(disabled, Ordering::Relaxed);
}

/// An overlay mount failed; `detached_lower`: its lower layer was a [`DetachedLower`]. Such
/// a failure only rules out detached lower layers, the other kind rules out overlays.
pub(crate) fn overlay_failed(detached_lower: bool) {
    if detached_lower {
        DETACHED_LOWER_BROKEN.store(true, Ordering::Relaxed);
    } else {
        OVERLAY_BROKEN.store(true, Ordering::Relaxed);
    }
}

/// Set once an overlay mount (of each kind: child-made or detached lower layer) worked in this
/// process: later builders with one may be started without waiting for their exec (a failure
/// could no longer be retried another way).
static OVERLAY_PROVEN: AtomicBool = AtomicBool::new(false);
static DETACHED_LOWER_PROVEN: AtomicBool = AtomicBool::new(false);

pub(crate) fn overlay_worked(detached_lower: bool) {
    if detached_lower {
        DETACHED_LOWER_PROVEN.store(true, Ordering::Relaxed);
    } else {
        OVERLAY_PROVEN.store(true, Ordering::Relaxed);
    }
}

pub(crate) fn overlay_proven(detached_lower: bool) -> bool {
    if detached_lower {
        DETACHED_LOWER_PROVEN.load(Ordering::Relaxed)
    } else {
        OVERLAY_PROVEN.load(Ordering::Relaxed)
    }
}

/// How the store directory inside is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StoreMode {
    /// Overlay when worthwhile and not known to fail, else bind; the overlay's lower layer
    /// detached and made by the parent unless that is known to fail.
    Auto,
    Bind,
    /// Overlay whatever the number of inputs, lower layer as in `Auto` (tests).
    #[cfg_attr(not(test), allow(dead_code))]
    Overlay,
    /// Overlay whatever the number of inputs, lower layer made by the child, as on kernels
    /// that refuse a detached one (tests of that fallback).
    #[cfg_attr(not(test), allow(dead_code))]
    OverlayChildLower,
}

/// The overlay's lower layer when the parent makes it: a tmpfs mounted nowhere
/// (`fsopen`/`fsmount`), in which the parent creates the store inputs' mount points after the
/// clone, while the child sets up the rest of its sandbox on the other CPU; the child waits
/// for them (a futex on `ready`) just before it mounts the overlay, naming this tmpfs as
/// `/proc/self/fd/<n>` (it inherited the descriptor). These mkdirs were the child's
/// second-largest step, and its own steps before the overlay take about as long, so the two
/// overlap (BENCHMARKS.md, "sandbox: figures behind the README's design choices").
///
/// No one else can reach this tmpfs: it is in no mount namespace, its descriptor is
/// close-on-exec, and the parent closes its copy once the mount points exist. The overlay
/// takes a private clone of it, which goes away with the sandbox's mount namespace.
pub(crate) struct DetachedLower {
    /// The detached tmpfs; `None` once the parent is done with it.
    mount: Option<OwnedFd>,
    /// Relative to the tmpfs root (the store directory), parents before what is inside them.
    entries: Vec<(CString, LowerEntry)>,
    /// 0 while the parent works, 1 when the mount points are there, 2 if making them failed.
    ready: Box<AtomicU32>,
    /// The store directory as the builder sees it, for error messages.
    store_dir: PathBuf,
}

enum LowerEntry {
    /// A mount point for a directory; its mode does not matter, the bind covers it.
    MountDir,
    /// A mount point for a non-directory.
    MountFile,
    /// A directory the builder sees (between the store directory and a nested mount point).
    Dir(libc::mode_t),
}

const FSOPEN_CLOEXEC: usize = 1;
const FSCONFIG_SET_STRING: usize = 1;
const FSCONFIG_CMD_CREATE: usize = 6;
const FSMOUNT_CLOEXEC: usize = 1;
const MOUNT_ATTR_NOSUID: usize = 0x2;
const MOUNT_ATTR_NODEV: usize = 0x4;
const MOUNT_ATTR_NOEXEC: usize = 0x8;
const FUTEX_WAKE_PRIVATE: libc::c_int = libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG;

/// A fresh tmpfs mounted nowhere: `fsopen`, `fsconfig`, `fsmount` (Linux 5.2).
fn detached_tmpfs() -> std::io::Result<OwnedFd> {
    let call = |nr: libc::c_long, a: [usize; 5]| -> std::io::Result<libc::c_long> {
        // SAFETY: the calls below pass valid C strings or null, and descriptors we own.
        let r = unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4]) };
        if r == -1 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r)
        }
    };
    let fs = call(
        libc::SYS_fsopen,
        [c"tmpfs".as_ptr() as usize, FSOPEN_CLOEXEC, 0, 0, 0],
    )?;
    // SAFETY: a descriptor fsopen just returned.
    let fs = unsafe { OwnedFd::from_raw_fd(fs as RawFd) };
    let fsfd = fs.as_raw_fd() as usize;
    call(
        libc::SYS_fsconfig,
        [
            fsfd,
            FSCONFIG_SET_STRING,
            c"mode".as_ptr() as usize,
            c"0755".as_ptr() as usize,
            0,
        ],
    )?;
    call(libc::SYS_fsconfig, [fsfd, FSCONFIG_CMD_CREATE, 0, 0, 0])?;
    let m = call(
        libc::SYS_fsmount,
        [
            fsfd,
            FSMOUNT_CLOEXEC,
            MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
            0,
            0,
        ],
    )?;
    // SAFETY: a descriptor fsmount just returned.
    Ok(unsafe { OwnedFd::from_raw_fd(m as RawFd) })
}

impl DetachedLower {
    /// The word the child's [`Step::WaitForLower`] waits on.
    pub fn ready_flag(&self) -> *const AtomicU32 {
        &*self.ready
    }

    /// Makes the mount points (the parent, after the clone), then lets the child go on; on
    /// failure the child is told to stop (it exits naming its waiting step, and the caller
    /// reports this error instead).
    pub fn populate(&mut self) -> Result<(), SandboxError> {
        let r = self.make_entries();
        self.release(r.is_ok());
        r
    }

    fn make_entries(&self) -> Result<(), SandboxError> {
        let Some(m) = &self.mount else {
            return Ok(());
        };
        let fd = m.as_raw_fd();
        for (rel, entry) in &self.entries {
            // SAFETY: a C string we own, relative to a directory descriptor we own; libc's
            // wrappers are fine here, this is the parent's own thread.
            let r = unsafe {
                match entry {
                    LowerEntry::MountDir => libc::mkdirat(fd, rel.as_ptr(), 0o755),
                    LowerEntry::MountFile => {
                        libc::mknodat(fd, rel.as_ptr(), libc::S_IFREG | 0o444, 0)
                    }
                    LowerEntry::Dir(mode) => match libc::mkdirat(fd, rel.as_ptr(), *mode) {
                        // Exactly `mode`, whatever our umask.
                        0 => libc::fchmodat(fd, rel.as_ptr(), *mode, 0),
                        e => e,
                    },
                }
            };
            if r == -1 {
                let source = std::io::Error::last_os_error();
                return Err(SandboxError::Prepare {
                    step: format!(
                        "creating mount point {}/{} in the overlay's lower layer",
                        self.store_dir.display(),
                        rel.to_string_lossy()
                    ),
                    source,
                });
            }
        }
        Ok(())
    }

    /// Wakes the child's [`Step::WaitForLower`] (idempotent) and closes our descriptor of the
    /// tmpfs: the child has its own, until its exec.
    pub fn release(&mut self, ok: bool) {
        if self.mount.take().is_none() {
            return;
        }
        self.ready.store(if ok { 1 } else { 2 }, Ordering::Release);
        // SAFETY: FUTEX_WAKE on a word we own; the child (same address space) may be waiting.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                self.ready_flag(),
                FUTEX_WAKE_PRIVATE,
                1,
                std::ptr::null::<libc::timespec>(),
                std::ptr::null::<u32>(),
                0,
            );
        }
    }
}

impl Drop for DetachedLower {
    fn drop(&mut self) {
        // Never leave a child waiting forever (an error between the clone and `populate`).
        self.release(false);
    }
}

pub(crate) struct Prepared {
    pub ns_steps: Vec<Step>,
    pub clone_flags: libc::c_int,
    /// Index of the overlay mount in `ns_steps`, in overlay mode.
    pub overlay_step: Option<usize>,
    /// The overlay's lower layer, when the parent makes it (see [`DetachedLower`]).
    pub lower: Option<DetachedLower>,
    /// The overlay work directory made beside the root, in overlay mode: the builder's to
    /// remove once it has been reaped.
    pub work_dir: Option<PathBuf>,
    /// Id maps the parent writes after the clone (see [`UserNamespace::count`]).
    pub id_maps: Option<ParentIdMaps>,
    /// The builder keeps its capabilities (over its own namespaces only: a `uid-range`).
    pub keep_capabilities: bool,
    filter: &'static Filter,
}

impl Prepared {
    /// From before the user switch to just before exec: bounding set (needs CAP_SETPCAP, so
    /// before setuid), the user switch, then the remaining capability sets, no_new_privs and
    /// the seccomp filter (installing it unprivileged requires no_new_privs).
    pub fn privilege_steps(&self, user: Option<Vec<Step>>) -> Vec<Step> {
        if self.keep_capabilities {
            let mut steps = user.unwrap_or_default();
            steps.extend([Step::NoNewPrivs, Step::Seccomp(self.filter.as_ptr())]);
            return steps;
        }
        let mut steps = vec![Step::DropBoundingSet(last_capability())];
        steps.extend(user.unwrap_or_default());
        steps.extend([
            Step::ClearCapabilities,
            Step::NoNewPrivs,
            Step::Seccomp(self.filter.as_ptr()),
        ]);
        steps
    }
}

/// The highest capability number this kernel knows (`/proc/sys/kernel/cap_last_cap`), so that
/// the child does not make a failing prctl for each of the numbers above it; 63 (every
/// possible one) when the file cannot be read.
fn last_capability() -> u32 {
    static LAST: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *LAST.get_or_init(|| {
        fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .filter(|n| *n <= 63)
            .unwrap_or(63)
    })
}

fn prep_err(step: String) -> impl FnOnce(std::io::Error) -> SandboxError {
    move |source| SandboxError::Prepare { step, source }
}

fn cpath(p: &Path) -> Result<CString, SandboxError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| SandboxError::InvalidSpec(format!("path {} contains a NUL byte", p.display())))
}

fn cstr(what: &str, s: &str) -> Result<CString, SandboxError> {
    CString::new(s).map_err(|_| SandboxError::InvalidSpec(format!("{what} contains a NUL byte")))
}

/// `inner` (absolute, no `..`) as a path under `root`.
fn under(root: &Path, inner: &Path, what: &str) -> Result<PathBuf, SandboxError> {
    let mut out = root.to_path_buf();
    let mut comps = inner.components();
    if comps.next() != Some(Component::RootDir) {
        return Err(SandboxError::InvalidSpec(format!(
            "{what} {} is not an absolute path",
            inner.display()
        )));
    }
    for c in comps {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => {
                return Err(SandboxError::InvalidSpec(format!(
                    "{what} {} must not contain '..'",
                    inner.display()
                )))
            }
        }
    }
    Ok(out)
}

fn mkdir_all(p: &Path) -> Result<(), SandboxError> {
    fs::create_dir_all(p).map_err(prep_err(format!("creating directory {}", p.display())))
}

/// Mount flags of the file system holding `p` that a read-only remount must keep (the kernel
/// refuses to drop a locked nosuid/nodev/noexec, and we would not want to drop them anyway).
fn kept_flags(p: &Path) -> Result<libc::c_ulong, SandboxError> {
    let c = cpath(p)?;
    // SAFETY: statvfs fills the zeroed struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } == -1 {
        return Err(SandboxError::Prepare {
            step: format!("getting the mount flags of {}", p.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    let pairs = [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ];
    Ok(pairs
        .iter()
        .filter(|(st_flag, _)| st.f_flag & st_flag != 0)
        .fold(0, |acc, (_, ms)| acc | ms))
}

fn mount(
    what: &'static str,
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<Step, SandboxError> {
    let c = |s: Option<&str>| s.map(|s| cstr(what, s)).transpose();
    Ok(Step::Mount {
        mount: Mount {
            source: c(source)?,
            target: cpath(target)?,
            target_from: 0,
            fstype: c(fstype)?,
            flags,
            data: c(data)?,
        },
        what,
    })
}

/// An entry of the skeleton the child makes in its tmpfs.
enum Node {
    Dir(libc::mode_t),
    /// Mount point for a non-directory.
    File,
    Symlink(&'static str),
    Contents(Vec<u8>),
}

/// `inside` (absolute, already checked for `..`) as bytes in one spelling: `/` followed by
/// its normal components joined by `/`, so that `/usr/`, `/usr/.` and `//usr` are one key.
fn inside_key(inside: &Path) -> Vec<u8> {
    let mut key = Vec::with_capacity(inside.as_os_str().len() + 1);
    for c in inside.components() {
        if let Component::Normal(n) = c {
            key.push(b'/');
            key.extend_from_slice(n.as_bytes());
        }
    }
    if key.is_empty() {
        key.push(b'/');
    }
    key
}

/// The skeleton, keyed by the path inside as an [`inside_key`]. In byte order a directory
/// comes before everything in it (it is a prefix of their keys), which is all the child
/// needs; comparing bytes is several times cheaper than `Path`'s component-wise order, and a
/// prepare compares a few thousand keys.
#[derive(Default)]
struct Skeleton(BTreeMap<Vec<u8>, Node>);

impl Skeleton {
    /// Adds `inside` (absolute, checked) and the directories above it.
    fn add(&mut self, inside: &Path, node: Node) {
        self.add_key(inside_key(inside), node);
    }

    /// As [`Skeleton::add`], with the [`inside_key`] already made.
    fn add_key(&mut self, key: Vec<u8>, node: Node) {
        // Every `/` after the first ends an ancestor ("/" itself is the tmpfs).
        for (i, _) in key.iter().enumerate().skip(1).filter(|(_, c)| **c == b'/') {
            if !self.0.contains_key(&key[..i]) {
                self.0.insert(key[..i].to_vec(), Node::Dir(0o755));
            }
        }
        if key != b"/" {
            self.0.insert(key, node);
        }
    }

    /// Takes out everything strictly under the directory `dir` (an [`inside_key`]), as paths
    /// relative to it, for a [`DetachedLower`]; `mount_points` are the bind targets' keys.
    /// Symlinks and files with contents stay (none is ever under the store directory).
    fn split_off_under(
        &mut self,
        dir: &[u8],
        mount_points: &BTreeSet<Vec<u8>>,
    ) -> Result<Vec<(CString, LowerEntry)>, SandboxError> {
        let mut prefix = dir.to_vec();
        prefix.push(b'/');
        // The keys under `dir` are those from "<dir>/" up to "<dir>0" ('0' follows '/').
        let mut end = dir.to_vec();
        end.push(b'0');
        let mut under = self.0.split_off(prefix.as_slice());
        let mut after = under.split_off(end.as_slice());
        self.0.append(&mut after);
        let mut out = Vec::with_capacity(under.len());
        for (key, node) in under {
            let entry = match node {
                Node::File => LowerEntry::MountFile,
                Node::Dir(_) if mount_points.contains(&key) => LowerEntry::MountDir,
                Node::Dir(mode) => LowerEntry::Dir(mode),
                other => {
                    self.0.insert(key, other);
                    continue;
                }
            };
            let rel = CString::new(&key[prefix.len()..]).map_err(|_| {
                SandboxError::InvalidSpec(format!(
                    "sandbox path {} contains a NUL byte",
                    String::from_utf8_lossy(&key)
                ))
            })?;
            out.push((rel, entry));
        }
        Ok(out)
    }

    fn steps(self, root: &Path) -> Result<Vec<Step>, SandboxError> {
        let root = root_bytes(root);
        let mut steps = Vec::with_capacity(self.0.len());
        for (inside, node) in self.0 {
            let mut full = Vec::with_capacity(root.len() + inside.len() + 1);
            full.extend_from_slice(root);
            full.extend_from_slice(&inside);
            let path = CString::new(full).map_err(|_| {
                SandboxError::InvalidSpec(format!(
                    "sandbox path {} contains a NUL byte",
                    String::from_utf8_lossy(&inside)
                ))
            })?;
            steps.push(match node {
                Node::Dir(mode) => Step::MkDir { path, mode },
                Node::File => Step::MkFile(path),
                Node::Symlink(to) => Step::Symlink {
                    target: cstr("symlink target", to)?,
                    link: path,
                },
                Node::Contents(contents) => Step::WriteFile { path, contents },
            });
        }
        Ok(steps)
    }
}

/// `root` without trailing slashes, for joining [`inside_key`]s to it.
fn root_bytes(root: &Path) -> &[u8] {
    let b = root.as_os_str().as_bytes();
    let end = b.iter().rposition(|c| *c != b'/').map_or(0, |i| i + 1);
    &b[..end]
}

/// A bind whose source exists, and what it is.
struct Bind<'a> {
    b: &'a BindMount,
    /// Its target's [`inside_key`].
    key: &'a [u8],
    is_dir: bool,
    /// Below the store directory (compared as keys: `Path::starts_with` on a hundred binds,
    /// several times each, was a visible part of the parent's preparation).
    in_store: bool,
}

/// Looks at bind sources relative to their directory, kept open while consecutive sources
/// share it (the input closure: a hundred paths in the store directory), so that each `stat`
/// walks one path component instead of all of them.
#[derive(Default)]
struct SourceDirs {
    dir: Option<(PathBuf, OwnedFd)>,
}

impl SourceDirs {
    /// Whether `source` (followed if a symlink, as `fs::metadata` does) is a directory.
    fn is_dir(&mut self, source: &Path) -> std::io::Result<bool> {
        let (Some(parent), Some(name)) = (source.parent(), source.file_name()) else {
            return fs::metadata(source).map(|m| m.is_dir());
        };
        if parent.as_os_str().is_empty() || name.as_bytes().contains(&0) {
            return fs::metadata(source).map(|m| m.is_dir());
        }
        if self.dir.as_ref().map(|(p, _)| p.as_path()) != Some(parent) {
            self.dir = None;
            let c = CString::new(parent.as_os_str().as_bytes())
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
            // SAFETY: a C string we own; the result is checked.
            let fd = unsafe {
                libc::open(
                    c.as_ptr(),
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                )
            };
            if fd == -1 {
                // A parent we cannot open (missing, not a directory): the full path says why.
                return fs::metadata(source).map(|m| m.is_dir());
            }
            // SAFETY: a descriptor open just returned.
            self.dir = Some((parent.to_path_buf(), unsafe { OwnedFd::from_raw_fd(fd) }));
        }
        let Some((_, fd)) = &self.dir else {
            return fs::metadata(source).map(|m| m.is_dir());
        };
        let c = CString::new(name.as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: fstatat fills the zeroed struct; name and descriptor are ours.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a NUL-terminated name, `fd` an open directory, `st` writable.
        if unsafe { libc::fstatat(fd.as_raw_fd(), c.as_ptr(), &mut st, 0) } == -1 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(st.st_mode & libc::S_IFMT == libc::S_IFDIR)
    }
}

/// Checks that `inner` is absolute and has no `..`, as [`under`] does, without building the
/// path.
fn check_inside(inner: &Path, what: &str) -> Result<(), SandboxError> {
    let mut comps = inner.components();
    if comps.next() != Some(Component::RootDir) {
        return Err(SandboxError::InvalidSpec(format!(
            "{what} {} is not an absolute path",
            inner.display()
        )));
    }
    if comps.any(|c| c == Component::ParentDir) {
        return Err(SandboxError::InvalidSpec(format!(
            "{what} {} must not contain '..'",
            inner.display()
        )));
    }
    Ok(())
}

/// Characters overlayfs takes as separators or escapes in its mount options.
fn overlay_safe(p: &Path) -> bool {
    !p.as_os_str()
        .as_bytes()
        .iter()
        .any(|c| matches!(c, b',' | b':' | b'\\'))
}

/// Creates the on-disk part of the root and returns the namespace steps.
pub(crate) fn prepare(
    spec: &ChrootSpec,
    user: Option<&BuildUserIds>,
    mode: StoreMode,
) -> Result<Prepared, SandboxError> {
    let root = &spec.root;
    if !root.is_absolute() {
        return Err(SandboxError::InvalidSpec(format!(
            "chroot directory {} is not an absolute path",
            root.display()
        )));
    }
    // Validated before anything is created on disk.
    under(root, &spec.store_dir, "store directory")?;
    if spec.store_dir.parent().is_none() {
        return Err(SandboxError::InvalidSpec(
            "store directory / is not allowed".into(),
        ));
    }
    let hostname = cstr("host name", &spec.hostname)?;

    // The spec's binds are borrowed, not copied (a hundred-odd paths); these are ours.
    let mut extra = vec![BindMount::same(&spec.build_dir)];
    let host_dev = spec.binds.iter().any(|b| b.target == Path::new("/dev"));
    if matches!(spec.network, Network::Host) {
        for f in ["/etc/resolv.conf", "/etc/services"] {
            extra.push(BindMount::same(f).read_only().optional());
        }
    }
    if !host_dev {
        for n in DEV_NODES {
            extra.push(BindMount::same(format!("/dev/{n}")));
        }
        if spec.kvm && Path::new("/dev/kvm").exists() {
            extra.push(BindMount::same("/dev/kvm"));
        }
    }
    // By inside_key: a directory sorts before anything inside it (see Skeleton). A stable
    // sort, so that of two binds with one target the spec's (first) is kept.
    let mut keyed: Vec<(Vec<u8>, &BindMount)> = spec
        .binds
        .iter()
        .chain(extra.iter())
        .map(|b| (inside_key(&b.target), b))
        .collect();
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    keyed.dedup_by(|later, earlier| later.0 == earlier.0);
    let store_key = inside_key(&spec.store_dir);
    let mut store_key_dir = store_key.clone();
    store_key_dir.push(b'/');

    let mut present = Vec::with_capacity(keyed.len());
    let mut sources = SourceDirs::default();
    for (key, b) in &keyed {
        check_inside(&b.target, "bind target")?;
        if *key == store_key {
            return Err(SandboxError::InvalidSpec(format!(
                "bind target {} would hide the store directory",
                b.target.display()
            )));
        }
        let is_dir = match sources.is_dir(&b.source) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && b.optional => continue,
            Err(e) => {
                return Err(SandboxError::Prepare {
                    step: format!("getting attributes of bind source {}", b.source.display()),
                    source: e,
                })
            }
        };
        present.push(Bind {
            b,
            key,
            is_dir,
            in_store: key.starts_with(&store_key_dir),
        });
    }
    drop(sources);
    let store_binds = present.iter().filter(|p| p.in_store).count();
    let overlay = match mode {
        StoreMode::Bind => false,
        StoreMode::Overlay | StoreMode::OverlayChildLower => true,
        StoreMode::Auto => {
            store_binds >= OVERLAY_MIN_INPUTS && !OVERLAY_BROKEN.load(Ordering::Relaxed)
        }
    } && overlay_safe(&overlay_work_dir(root))
        && overlay_safe(&spec.store_dir);
    let want_detached_lower = overlay
        && mode != StoreMode::OverlayChildLower
        && !DETACHED_LOWER_BROKEN.load(Ordering::Relaxed)
        && !DETACHED_LOWER_DISABLED.load(Ordering::Relaxed);

    // The on-disk part: <root> only, the builder's store directory (plus the work directory
    // beside it in overlay mode). One directory, because on a busy file system every inode
    // made and removed per build counts (ext4 without a journal scans past recently freed
    // inodes on each allocation). Sticky, so that builders cannot remove each other's files
    // (or our mount points); no access for others, so that no other local user can look into
    // a build in progress.
    fs::DirBuilder::new()
        .mode(0o700)
        .create(root)
        .map_err(prep_err(format!(
            "creating chroot directory {}",
            root.display()
        )))?;
    if let Some(ns) = spec.user_namespace.filter(UserNamespace::by_parent) {
        // The builder's ids are not ours: it must own its store directory (on disk).
        std::os::unix::fs::chown(root, Some(ns.outside_uid), Some(ns.outside_gid)).map_err(
            prep_err(format!("changing the owner of {}", root.display())),
        )?;
    }
    if let Some(u) = user {
        std::os::unix::fs::chown(root, Some(0), Some(u.gid)).map_err(prep_err(format!(
            "changing the owner of {}",
            root.display()
        )))?;
        fs::set_permissions(root, fs::Permissions::from_mode(0o1770))
            .map_err(prep_err(format!("changing the mode of {}", root.display())))?;
    }
    let disk_store = chroot_store_dir(root);
    let work = overlay_work_dir(root);
    if overlay {
        // A crashed build's work directory would make the mount fail.
        match remove_overlay_work_dir(&work) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(SandboxError::Prepare {
                    step: format!("removing old overlay work directory {}", work.display()),
                    source: e,
                })
            }
        }
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&work)
            .map_err(prep_err(format!("creating directory {}", work.display())))?;
    }
    let root_c = cpath(root)?;
    let lower_mount = if want_detached_lower {
        match detached_tmpfs() {
            Ok(fd) => Some(fd),
            Err(_) => {
                // No new mount API (Linux < 5.2) or not allowed: the child makes the lower
                // layer, as before; no point asking again.
                DETACHED_LOWER_BROKEN.store(true, Ordering::Relaxed);
                None
            }
        }
    } else {
        None
    };

    // The skeleton in the tmpfs.
    let store_targets: BTreeSet<Vec<u8>> = present
        .iter()
        .filter(|p| p.in_store)
        .map(|p| p.key.to_vec())
        .collect();
    let mut skel = Skeleton::default();
    skel.add(Path::new("/tmp"), Node::Dir(0o1777));
    skel.add(Path::new("/etc"), Node::Dir(0o755));
    for (name, contents) in &spec.etc_files {
        let p = under(Path::new("/etc"), &Path::new("/").join(name), "/etc file")?;
        skel.add(&p, Node::Contents(contents.clone()));
    }
    skel.add(&spec.store_dir, Node::Dir(0o755));
    skel.add(Path::new("/proc"), Node::Dir(0o555));
    for p in &present {
        if p.in_store && !overlay {
            // On disk, in the directory bound at the store directory.
            let rel =
                p.b.target
                    .strip_prefix(&spec.store_dir)
                    .unwrap_or(&p.b.target);
            let target = disk_store.join(rel);
            if p.is_dir {
                mkdir_all(&target)?;
            } else {
                if let Some(dir) = target.parent() {
                    mkdir_all(dir)?;
                }
                fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&target)
                    .map_err(prep_err(format!(
                        "creating mount point {}",
                        target.display()
                    )))?;
            }
        } else {
            skel.add_key(
                p.key.to_vec(),
                if p.is_dir {
                    Node::Dir(0o755)
                } else {
                    Node::File
                },
            );
        }
    }
    let have_pts = !host_dev && Path::new("/dev/pts/ptmx").exists();
    if !host_dev {
        for (name, to) in [
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ] {
            skel.add(&Path::new("/dev").join(name), Node::Symlink(to));
        }
        skel.add(Path::new("/dev/shm"), Node::Dir(0o755));
        if have_pts {
            skel.add(Path::new("/dev/pts"), Node::Dir(0o755));
            skel.add(Path::new("/dev/ptmx"), Node::Symlink("pts/ptmx"));
        }
    }

    let userns = spec.user_namespace.is_some();
    let mut id_maps = None;
    let mut steps = Vec::new();
    let mut clone_flags =
        libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if let Some(ns) = &spec.user_namespace {
        // First of all: until its ids are mapped the child is `nobody` inside and can create
        // no file. The other namespaces of the clone belong to this one, which gives the
        // child the capabilities over them that the steps below need.
        clone_flags |= libc::CLONE_NEWUSER;
        if ns.by_parent() {
            let maps = ParentIdMaps {
                uid_map: format!("{} {} {}\n", ns.inside_uid, ns.outside_uid, ns.count),
                gid_map: format!("{} {} {}\n", ns.inside_gid, ns.outside_gid, ns.count),
                ready: Box::new(AtomicU32::new(0)),
                released: false,
            };
            steps.push(Step::WaitForLower {
                ready: &*maps.ready,
                what: "write the user namespace's id maps",
            });
            // Our ids (the parent's) are not mapped here, and no file can be made under an
            // unmapped one: the builder's ids now, with the capabilities it has in the
            // namespace (as an unmapped id becoming a mapped one, it keeps them).
            steps.extend([
                Step::SetGroups(vec![]),
                Step::SetGid(ns.inside_gid),
                Step::SetUid(ns.inside_uid),
            ]);
            id_maps = Some(maps);
        } else {
            steps.extend(user_namespace_steps(ns));
        }
    }
    steps.push(Step::MakeMountsPrivate);
    match &spec.network {
        Network::Private => {
            clone_flags |= libc::CLONE_NEWNET;
            steps.push(Step::LoopbackUp);
        }
        Network::Prepared(fd) => steps.push(Step::JoinNetNs(fd.as_raw_fd())),
        Network::Host => {}
    }
    steps.push(Step::SetHostname(hostname));
    steps.push(Step::SetDomainname(CString::from(c"(none)")));
    // The working directory keeps pointing at the directory on disk once the tmpfs covers
    // it: the store directory's mount below finds `store` and `work` relative to it.
    steps.push(Step::Chdir(root_c.clone()));
    steps.push(mount(
        "mounting the sandbox's root tmpfs on",
        Some("none"),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=0755"),
    )?);
    let store_inside = under(root, &spec.store_dir, "store directory")?;
    let lower = match lower_mount {
        Some(m) => Some(DetachedLower {
            mount: Some(m),
            entries: skel.split_off_under(&store_key, &store_targets)?,
            ready: Box::new(AtomicU32::new(0)),
            store_dir: spec.store_dir.clone(),
        }),
        None => None,
    };
    steps.push(Step::ClearUmask);
    let mut skel_steps = skel.steps(root)?;
    if userns {
        // The builder owns the root tmpfs here (its uid made it), so the root is made
        // read-only below, and /tmp gets a tmpfs of its own, mounted as soon as it exists
        // (before the mount points under it, which would be hidden).
        let tmp = cpath(&root.join("tmp"))?;
        if let Some(i) = skel_steps
            .iter()
            .position(|st| matches!(st, Step::MkDir { path, .. } if *path == tmp))
        {
            skel_steps.insert(
                i + 1,
                mount(
                    "mounting tmpfs on",
                    Some("none"),
                    &root.join("tmp"),
                    Some("tmpfs"),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    Some("mode=1777"),
                )?,
            );
        }
    }
    steps.extend(skel_steps);
    steps.push(Step::RestoreUmask);

    // The store directory, then the binds, in target order (a bind of an ancestor of the
    // store directory, say /nix, must come first or it would hide the store directory).
    let batch_ro = crate::plan::have_mount_setattr();
    let mut overlay_step = None;
    let mut any_batched = false;
    let mut writable_in_store = Vec::new();
    let mut mount_store = |steps: &mut Vec<Step>| -> Result<(), SandboxError> {
        if overlay {
            // The working directory is <root> on disk, under the tmpfs: the upper layer. The
            // lower layer is the parent's detached tmpfs, through the descriptor we inherited
            // (the host's /proc is still mounted here), or the store directory's place in our
            // own tmpfs, where the skeleton made the mount points.
            let lowerdir = match &lower {
                Some(l) => {
                    steps.push(Step::WaitForLower {
                        ready: l.ready_flag(),
                        what: "make the store's mount points",
                    });
                    let fd = l.mount.as_ref().map_or(-1, |m| m.as_raw_fd());
                    format!("/proc/self/fd/{fd}")
                }
                None => store_inside.to_string_lossy().into_owned(),
            };
            let work = work.to_string_lossy();
            // In a user namespace overlayfs cannot use trusted.* xattrs: it keeps its own in
            // user.* (`userxattr`, which implies what redirect_dir=off says and refuses it).
            let redirect = if userns {
                "userxattr"
            } else {
                "redirect_dir=off"
            };
            let data = format!(
                "lowerdir={lowerdir},upperdir=.,workdir={work},index=off,metacopy=off,{redirect}"
            );
            overlay_step = Some(steps.len());
            steps.push(mount(
                "mounting the store directory overlay on",
                Some("overlay"),
                &store_inside,
                Some("overlay"),
                libc::MS_NOSUID | libc::MS_NODEV,
                Some(&data),
            )?);
        } else {
            // "." is the working directory: <root> on disk, under the tmpfs.
            steps.push(mount(
                "bind mounting the chroot directory on disk at",
                Some("."),
                &store_inside,
                None,
                libc::MS_BIND,
                None,
            )?);
        }
        Ok(())
    };
    // Binds below the store directory are made from inside it (see `Mount::target_from`).
    let mut store_prefix = store_inside.as_os_str().as_bytes().to_vec();
    store_prefix.push(b'/');
    let root_b = root_bytes(root);
    let mut push_bind = |steps: &mut Vec<Step>, p: &Bind| -> Result<(), SandboxError> {
        let b = p.b;
        // `under(root, target)`, from the key: the root without trailing slashes, then the
        // target's normal components.
        let mut full = Vec::with_capacity(root_b.len() + p.key.len());
        full.extend_from_slice(root_b);
        full.extend_from_slice(p.key);
        let target = PathBuf::from(std::ffi::OsString::from_vec(full));
        let target_c = cpath(&target)?;
        let t = target_c.as_bytes();
        let target_from = if t.starts_with(&store_prefix) && t.len() > store_prefix.len() {
            store_prefix.len()
        } else {
            0
        };
        steps.push(Step::Mount {
            mount: Mount {
                source: Some(cpath(&b.source)?),
                target: target_c,
                target_from,
                fstype: None,
                flags: libc::MS_BIND | libc::MS_REC,
                data: None,
            },
            what: "bind mounting",
        });
        let batched = batch_ro && p.in_store;
        if b.read_only && batched {
            any_batched = true;
        } else if b.read_only {
            let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | kept_flags(&b.source)?;
            steps.push(mount(
                "remounting read-only",
                None,
                &target,
                None,
                flags,
                None,
            )?);
        } else if batched {
            writable_in_store.push(cpath(&target)?);
        }
        Ok(())
    };
    // The binds outside the store directory first, in target order (a parent directory before
    // what is inside it; an ancestor of the store directory, say /nix, before the store
    // directory, which it would otherwise hide), then the store directory, then the binds in
    // it. With a detached lower layer the first group runs while the parent still makes the
    // mount points of the last.
    for p in present.iter().filter(|p| !p.in_store) {
        push_bind(&mut steps, p)?;
    }
    // The file systems of the sandbox's own after the binds outside the store directory (as
    // before, a bind below /dev or /proc would land under them), and before the store
    // directory: they too need not wait for the parent.
    if !host_dev {
        // A fresh tmpfs: whatever the builder leaves in /dev/shm goes away with it.
        steps.push(mount(
            "mounting tmpfs on",
            Some("none"),
            &root.join("dev/shm"),
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV,
            Some("mode=1777"),
        )?);
        // A private devpts instance, so the builder can open ptys without seeing the host's.
        if have_pts {
            steps.push(mount(
                "mounting devpts on",
                Some("none"),
                &root.join("dev/pts"),
                Some("devpts"),
                libc::MS_NOSUID | libc::MS_NOEXEC,
                Some("newinstance,ptmxmode=0666,mode=0620"),
            )?);
        }
    }
    steps.push(mount(
        "mounting proc on",
        Some("none"),
        &root.join("proc"),
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?);
    mount_store(&mut steps)?;
    // Into the store directory just mounted, for the binds' relative targets (pivot_root
    // changes the working directory again).
    steps.push(Step::Chdir(cpath(&store_inside)?));
    for p in present.iter().filter(|p| p.in_store) {
        push_bind(&mut steps, p)?;
    }
    if any_batched {
        let store_c = cpath(&store_inside)?;
        steps.push(Step::SetReadOnly {
            path: store_c.clone(),
            read_only: true,
            recursive: true,
        });
        steps.push(Step::SetReadOnly {
            path: store_c,
            read_only: false,
            recursive: false,
        });
        for path in writable_in_store {
            steps.push(Step::SetReadOnly {
                path,
                read_only: false,
                recursive: false,
            });
        }
    }

    if userns {
        steps.push(mount(
            "remounting the sandbox's root read-only:",
            None,
            root,
            None,
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
            None,
        )?);
    }
    steps.push(Step::PivotRoot(root_c));

    Ok(Prepared {
        ns_steps: steps,
        clone_flags,
        overlay_step,
        lower,
        work_dir: overlay.then_some(work),
        id_maps,
        keep_capabilities: spec.user_namespace.is_some_and(|ns| ns.count > 1),
        filter: crate::seccomp::filter()?,
    })
}

/// The child's own id maps: `setgroups` denied first (the kernel requires it before an
/// unprivileged gid map), then one line each mapping the caller's id.
fn user_namespace_steps(ns: &UserNamespace) -> Vec<Step> {
    let file = |path: &'static std::ffi::CStr, contents: String| Step::WriteExisting {
        path: CString::from(path),
        contents: contents.into_bytes(),
    };
    vec![
        file(c"/proc/self/setgroups", "deny".into()),
        file(
            c"/proc/self/uid_map",
            format!("{} {} 1\n", ns.inside_uid, ns.outside_uid),
        ),
        file(
            c"/proc/self/gid_map",
            format!("{} {} 1\n", ns.inside_gid, ns.outside_gid),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path) -> ChrootSpec {
        let build = dir.join("build");
        fs::create_dir_all(&build).unwrap();
        let mut s = ChrootSpec::new(dir.join("root"), "/nix/store".into(), build, 1000, 100);
        s.binds = vec![
            BindMount::same("/usr").read_only(),
            BindMount::same("/bin").read_only(),
            BindMount::same("/no/such/path").optional(),
        ];
        s
    }

    /// Adds `n` fake store paths (directories, and one file) as read-only inputs.
    fn with_inputs(dir: &Path, s: &mut ChrootSpec, n: usize) {
        for i in 0..n {
            let host = dir.join(format!("store/{i:032}-in"));
            fs::create_dir_all(&host).unwrap();
            s.binds.push(BindMount {
                target: format!("/nix/store/{i:032}-in").into(),
                source: host,
                optional: false,
                read_only: true,
            });
        }
        let file = dir.join("store/ffffffffffffffffffffffffffffffff-file");
        fs::write(&file, "x").unwrap();
        s.binds.push(BindMount {
            target: "/nix/store/ffffffffffffffffffffffffffffffff-file".into(),
            source: file,
            optional: false,
            read_only: false,
        });
    }

    fn describe(p: &Prepared) -> Vec<String> {
        p.ns_steps.iter().map(Step::describe).collect()
    }

    fn position(steps: &[String], needle: &str) -> usize {
        steps
            .iter()
            .position(|s| s.contains(needle))
            .unwrap_or_else(|| panic!("no step containing {needle:?} in {steps:#?}"))
    }

    fn dir_mode(p: &Prepared, path: &Path) -> libc::mode_t {
        let want = path.as_os_str().as_bytes();
        p.ns_steps
            .iter()
            .find_map(|s| match s {
                Step::MkDir { path, mode } if path.as_bytes() == want => Some(*mode),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no mkdir of {}", path.display()))
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn plan_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(dir.path());
        let p = prepare(&s, None, StoreMode::Bind).unwrap();
        let steps = describe(&p);
        let root = s.root.display().to_string();
        assert_eq!(steps[0], "making all mounts private");
        assert_eq!(steps[1], "bringing up the loopback interface");
        assert_eq!(steps[2], "setting the host name to localhost");
        assert_eq!(steps[3], "setting the domain name to (none)");
        assert_eq!(steps[4], format!("chdir to {root}"));
        assert_eq!(
            steps[5],
            format!("mounting the sandbox's root tmpfs on {root}")
        );
        // The skeleton comes before any bind, parents before children.
        let first_bind = position(&steps, "bind mounting");
        for made in [
            "etc",
            "etc/passwd",
            "tmp",
            "dev",
            "dev/null",
            "dev/stderr",
            "nix/store",
            "proc",
            "usr",
        ] {
            let i = steps
                .iter()
                .position(|st| st.ends_with(&format!("{root}/{made}")) && !st.starts_with("bind"))
                .unwrap_or_else(|| panic!("{made} not created: {steps:#?}"));
            assert!(i < first_bind, "{made} created after the first bind");
        }
        assert!(
            position(&steps, &format!("directory {root}/nix"))
                < position(&steps, &format!("directory {root}/nix/store"))
        );
        assert_eq!(dir_mode(&p, &s.root.join("tmp")), 0o1777);
        assert_eq!(dir_mode(&p, &s.root.join("etc")), 0o755);
        let bin = position(&steps, &format!("bind mounting /bin on {root}/bin"));
        let usr = position(&steps, &format!("bind mounting /usr on {root}/usr"));
        assert!(bin < usr, "binds are sorted by target");
        assert_eq!(steps[bin + 1], format!("remounting read-only {root}/bin"));
        let store = position(
            &steps,
            &format!("bind mounting the chroot directory on disk at {root}/nix/store"),
        );
        assert_eq!(steps[4], format!("chdir to {root}"));
        let build = position(&steps, &format!("bind mounting {}", s.build_dir.display()));
        let null = position(
            &steps,
            &format!("bind mounting /dev/null on {root}/dev/null"),
        );
        // The store directory after every bind outside it (so after an ancestor such as
        // /nix, which would hide it), before every bind inside it.
        assert!(
            null < store && usr < store && build < store,
            "the store directory after the binds outside it"
        );
        let proc_ = position(&steps, "mounting proc on");
        let shm = position(&steps, &format!("mounting tmpfs on {root}/dev/shm"));
        // /dev/shm and /proc after every bind outside the store directory (a bind below them
        // would be hidden), before the store directory (they need not wait for it).
        let last_outside = steps
            .iter()
            .rposition(|st| st.starts_with("bind mounting") && !st.contains("/nix/store"))
            .unwrap();
        assert!(build < proc_ && null < proc_ && usr < proc_ && shm < proc_);
        assert!(last_outside < shm && proc_ < store);
        assert_eq!(
            steps.last().unwrap(),
            &format!("pivoting the root to {root}")
        );
        assert!(!steps.iter().any(|s| s.contains("/no/such/path")));
        assert!(!steps.iter().any(|s| s.contains("overlay")));
        assert_eq!(
            p.clone_flags & libc::CLONE_NEWNET,
            libc::CLONE_NEWNET,
            "private network by default"
        );
        let passwd = p
            .ns_steps
            .iter()
            .find_map(|st| match st {
                Step::WriteFile { path, contents } if path.as_bytes().ends_with(b"/etc/passwd") => {
                    Some(contents.clone())
                }
                _ => None,
            })
            .expect("/etc/passwd written");
        assert_eq!(
            passwd,
            b"nixbld:x:1000:100:Nix build user:/:/noshell\nnobody:x:65534:65534:Nobody:/:/noshell\n"
        );

        // On disk: only the root, which is the builder's store directory; no access for others
        // (without a build user the builder runs as its owner).
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(chroot_store_dir(&s.root), s.root);
        assert!(names(&s.root).is_empty());
        assert_eq!(mode(&s.root), 0o700);
        assert!(!overlay_work_dir(&s.root).exists());
        assert!(p.work_dir.is_none());
        // With a build user: sticky, the build group's, still closed to others.
        let dir2 = tempfile::tempdir().unwrap();
        let s2 = spec(dir2.path());
        let gid = nix::unistd::getegid().as_raw();
        let user = BuildUserIds {
            uid: 1,
            gid,
            supplementary: vec![],
        };
        if nix::unistd::geteuid().is_root() {
            prepare(&s2, Some(&user), StoreMode::Bind).unwrap();
            assert_eq!(mode(&s2.root), 0o1770);
            assert_eq!(
                std::os::unix::fs::MetadataExt::gid(&fs::metadata(&s2.root).unwrap()),
                gid
            );
        }
    }

    #[test]
    fn bind_mode_makes_store_mount_points_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path());
        with_inputs(dir.path(), &mut s, 3);
        let p = prepare(&s, None, StoreMode::Bind).unwrap();
        let disk = chroot_store_dir(&s.root);
        assert_eq!(names(&disk).len(), 4);
        assert!(disk.join(format!("{:032}-in", 2)).is_dir());
        assert!(disk.join("ffffffffffffffffffffffffffffffff-file").is_file());
        let steps = describe(&p);
        let root = s.root.display().to_string();
        let store = position(&steps, "bind mounting the chroot directory on disk");
        let input = position(&steps, &format!("on {root}/nix/store/{:032}-in", 0));
        assert!(store < input);
        assert!(!steps
            .iter()
            .any(|st| st.contains(&format!("directory {root}/nix/store/"))));
    }

    #[test]
    fn overlay_mode_makes_store_mount_points_in_the_tmpfs() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path());
        with_inputs(dir.path(), &mut s, 3);
        let p = prepare(&s, None, StoreMode::OverlayChildLower).unwrap();
        assert!(p.lower.is_none());
        // Nothing but the upper (the root) and the work directory beside it on disk.
        assert!(names(&s.root).is_empty());
        let work = overlay_work_dir(&s.root);
        assert!(work.is_dir());
        assert_eq!(p.work_dir.as_deref(), Some(work.as_path()));
        let steps = describe(&p);
        let root = s.root.display().to_string();
        let lower = position(
            &steps,
            &format!("creating directory {root}/nix/store/{:032}-in", 1),
        );
        let file = position(
            &steps,
            &format!("creating mount point {root}/nix/store/ffffffffffffffffffffffffffffffff-file"),
        );
        let ov = p.overlay_step.expect("overlay step");
        assert_eq!(
            steps[ov],
            format!("mounting the store directory overlay on {root}/nix/store")
        );
        match &p.ns_steps[ov] {
            Step::Mount { mount, .. } => {
                let data = mount.data.as_ref().unwrap().to_string_lossy().into_owned();
                assert!(
                    data.starts_with(&format!(
                        "lowerdir={root}/nix/store,upperdir=.,workdir={root}.work,"
                    )),
                    "{data}"
                );
            }
            _ => panic!("overlay step is not a mount"),
        }
        let input = position(
            &steps,
            &format!("bind mounting {}", dir.path().join("store").display()),
        );
        assert!(lower < ov && file < ov && ov < input);
        if crate::plan::have_mount_setattr() {
            // Read-only inputs in the store: one recursive set, then the store's own mount and
            // the writable input cleared; no remount per input.
            assert!(!steps
                .iter()
                .any(|st| st.contains("remounting read-only") && st.contains("/nix/store/")));
            let set = position(
                &steps,
                &format!("making {root}/nix/store and the mounts below it read-only"),
            );
            assert_eq!(steps[set + 1], format!("making {root}/nix/store writable"));
            assert_eq!(
                steps[set + 2],
                format!("making {root}/nix/store/ffffffffffffffffffffffffffffffff-file writable")
            );
            let last_bind = steps
                .iter()
                .rposition(|s| s.starts_with("bind mounting"))
                .unwrap();
            assert!(last_bind < set);
        }
    }

    #[test]
    fn detached_lower_layer_holds_the_store_mount_points_and_the_child_waits_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path());
        with_inputs(dir.path(), &mut s, 3);
        // A nested mount point: its parent is a directory the builder sees, mode 0755.
        let nested = dir.path().join("nested-src");
        fs::create_dir_all(&nested).unwrap();
        s.binds.push(BindMount {
            target: "/nix/store/dddddddddddddddddddddddddddddddd-dir/sub".into(),
            source: nested,
            optional: false,
            read_only: true,
        });
        let p = prepare(&s, None, StoreMode::Overlay).unwrap();
        let Some(lower) = &p.lower else {
            // No new mount API here (or not allowed): the child makes the lower layer.
            assert!(DETACHED_LOWER_BROKEN.load(Ordering::Relaxed));
            return;
        };
        let entries: Vec<(String, String)> = lower
            .entries
            .iter()
            .map(|(rel, e)| {
                let kind = match e {
                    LowerEntry::MountDir => "mount dir".to_string(),
                    LowerEntry::MountFile => "mount file".to_string(),
                    LowerEntry::Dir(mode) => format!("dir {mode:o}"),
                };
                (rel.to_string_lossy().into_owned(), kind)
            })
            .collect();
        let want = |rel: &str, kind: &str| (rel.to_string(), kind.to_string());
        assert_eq!(
            entries,
            vec![
                want(&format!("{:032}-in", 0), "mount dir"),
                want(&format!("{:032}-in", 1), "mount dir"),
                want(&format!("{:032}-in", 2), "mount dir"),
                want("dddddddddddddddddddddddddddddddd-dir", "dir 755"),
                want("dddddddddddddddddddddddddddddddd-dir/sub", "mount dir"),
                want("ffffffffffffffffffffffffffffffff-file", "mount file"),
            ]
        );
        let steps = describe(&p);
        let root = s.root.display().to_string();
        // The child makes none of them, only the store directory's own mount point.
        assert!(!steps
            .iter()
            .any(|st| st.contains(&format!("{root}/nix/store/")) && (st.starts_with("creating"))));
        position(&steps, &format!("creating directory {root}/nix/store"));
        let ov = p.overlay_step.expect("overlay step");
        assert_eq!(
            steps[ov - 1],
            "waiting for the parent to make the store's mount points"
        );
        // Every bind outside the store directory before the wait, every one inside after, from
        // inside the store directory: its target relative, the whole path in the message.
        let chdir = position(&steps, &format!("chdir to {root}/nix/store"));
        assert!(ov < chdir);
        for (i, st) in steps.iter().enumerate() {
            if st.starts_with("bind mounting") {
                let inside = st.contains(&format!("on {root}/nix/store/"));
                assert_eq!(i > ov, inside, "{st}");
                assert_eq!(i > chdir, inside, "{st}");
                let Step::Mount { mount, .. } = &p.ns_steps[i] else {
                    panic!("{st}")
                };
                let relative = &mount.target.as_bytes()[mount.target_from..];
                if inside {
                    assert!(!relative.starts_with(b"/"), "{st}");
                    assert_eq!(
                        format!("{root}/nix/store/{}", String::from_utf8_lossy(relative)),
                        st.rsplit(" on ").next().unwrap()
                    );
                } else {
                    assert_eq!(mount.target_from, 0, "{st}");
                }
            }
        }
        match &p.ns_steps[ov] {
            Step::Mount { mount, .. } => {
                let data = mount.data.as_ref().unwrap().to_string_lossy().into_owned();
                let fd = lower.mount.as_ref().unwrap().as_raw_fd();
                assert!(
                    data.starts_with(&format!(
                        "lowerdir=/proc/self/fd/{fd},upperdir=.,workdir={root}.work,"
                    )),
                    "{data}"
                );
            }
            _ => panic!("overlay step is not a mount"),
        }
    }

    #[test]
    fn auto_mode_picks_an_overlay_only_for_many_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path());
        with_inputs(dir.path(), &mut s, OVERLAY_MIN_INPUTS - 2);
        let p = prepare(&s, None, StoreMode::Auto).unwrap();
        assert!(p.overlay_step.is_none());
        let dir2 = tempfile::tempdir().unwrap();
        let mut s = spec(dir2.path());
        with_inputs(dir2.path(), &mut s, OVERLAY_MIN_INPUTS);
        let p = prepare(&s, None, StoreMode::Auto).unwrap();
        assert_eq!(
            p.overlay_step.is_some(),
            !OVERLAY_BROKEN.load(Ordering::Relaxed)
        );
    }

    #[test]
    fn user_switch_sits_between_bounding_set_and_seccomp() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(dir.path());
        let p = prepare(&s, None, StoreMode::Bind).unwrap();
        let user = crate::BuildUserIds {
            uid: 1,
            gid: 2,
            supplementary: vec![],
        };
        let steps: Vec<String> = p
            .privilege_steps(Some(crate::user_steps(&user)))
            .iter()
            .map(Step::describe)
            .collect();
        assert_eq!(
            steps,
            [
                "dropping the capability bounding set",
                "setting supplementary groups to []",
                "setgid to 2",
                "setuid to 1",
                "clearing capabilities",
                "setting no_new_privs",
                "installing the seccomp filter",
            ]
        );
    }

    #[test]
    fn a_user_namespace_maps_the_caller_first_and_leaves_the_root_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path());
        with_inputs(dir.path(), &mut s, 2);
        // The caller's own ids: the child maps them itself.
        s.user_namespace = Some(UserNamespace::for_caller());
        let (uid, gid) = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        let p = prepare(&s, None, StoreMode::Bind).unwrap();
        assert_eq!(p.clone_flags & libc::CLONE_NEWUSER, libc::CLONE_NEWUSER);
        let written: Vec<(String, String)> = p
            .ns_steps
            .iter()
            .take(3)
            .map(|st| match st {
                Step::WriteExisting { path, contents } => (
                    path.to_string_lossy().into_owned(),
                    String::from_utf8_lossy(contents).into_owned(),
                ),
                other => panic!("expected an id map step, got {}", other.describe()),
            })
            .collect();
        // setgroups denied before the gid map (the kernel's rule for unprivileged maps).
        assert_eq!(
            written,
            [
                ("/proc/self/setgroups".into(), "deny".into()),
                ("/proc/self/uid_map".into(), format!("1000 {uid} 1\n")),
                ("/proc/self/gid_map".into(), format!("100 {gid} 1\n")),
            ]
        );
        let steps = describe(&p);
        let root = s.root.display().to_string();
        assert_eq!(steps[3], "making all mounts private");
        // /tmp has a tmpfs of its own, mounted right after its directory exists and before
        // anything below it (the build directory's mount point) is made.
        let tmp_dir = position(&steps, &format!("creating directory {root}/tmp"));
        assert_eq!(steps[tmp_dir + 1], format!("mounting tmpfs on {root}/tmp"));
        let build_mp = position(
            &steps,
            &format!("creating directory {root}{}", s.build_dir.display()),
        );
        assert!(tmp_dir + 1 < build_mp);
        // The root read-only last, after every mount onto it.
        let n = steps.len();
        assert_eq!(
            steps[n - 2],
            format!("remounting the sandbox's root read-only: {root}")
        );
        assert_eq!(steps[n - 1], format!("pivoting the root to {root}"));
        // Without one: no user namespace, no extra mounts.
        let dir2 = tempfile::tempdir().unwrap();
        let p = prepare(&spec(dir2.path()), None, StoreMode::Bind).unwrap();
        assert_eq!(p.clone_flags & libc::CLONE_NEWUSER, 0);
        let steps = describe(&p);
        assert!(!steps.iter().any(|st| st.contains("/proc/self/")
            || st.contains("read-only:")
            || st.ends_with("/root/tmp") && st.starts_with("mounting")));
    }

    #[test]
    fn a_range_is_mapped_by_the_parent_while_the_child_waits_then_switches_ids() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path());
        s.user_namespace = Some(UserNamespace::range(872_415_232, 65536));
        if !nix::unistd::geteuid().is_root() {
            return; // the root directory is chowned to the range: root only
        }
        let p = prepare(&s, None, StoreMode::Bind).unwrap();
        let maps = p.id_maps.as_ref().expect("maps for the parent");
        assert_eq!(maps.uid_map, "0 872415232 65536\n");
        assert_eq!(maps.gid_map, "0 872415232 65536\n");
        assert!(p.keep_capabilities);
        let steps = describe(&p);
        assert_eq!(
            steps[..5],
            [
                "waiting for the parent to write the user namespace's id maps",
                "setting supplementary groups to []",
                "setgid to 0",
                "setuid to 0",
                "making all mounts private",
            ]
        );
        assert_eq!(
            p.privilege_steps(None)
                .iter()
                .map(Step::describe)
                .collect::<Vec<_>>(),
            ["setting no_new_privs", "installing the seccomp filter"]
        );
    }

    #[test]
    fn nix_2_etc_files_for_a_user_namespace() {
        let files = nix_etc_files_userns(1000, 100, Path::new("/tmp/nix-build-x-0"));
        let get = |n: &str| {
            String::from_utf8(
                files
                    .iter()
                    .find(|(p, _)| p == Path::new(n))
                    .unwrap()
                    .1
                    .clone(),
            )
            .unwrap()
        };
        // As real Nix 2.8 writes them (seen from a builder of nix-store -r run without root).
        assert_eq!(
            get("passwd"),
            "root:x:0:0:Nix build user:/tmp/nix-build-x-0:/noshell\n\
             nixbld:x:1000:100:Nix build user:/tmp/nix-build-x-0:/noshell\n\
             nobody:x:65534:65534:Nobody:/:/noshell\n"
        );
        assert_eq!(get("group"), "root:x:0:\nnixbld:!:100:\nnogroup:x:65534:\n");
        assert_eq!(get("hosts"), "127.0.0.1 localhost\n::1 localhost\n");
    }

    #[test]
    fn host_network_keeps_the_namespace_and_binds_resolv_conf() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path());
        s.network = Network::Host;
        let p = prepare(&s, None, StoreMode::Bind).unwrap();
        assert_eq!(p.clone_flags & libc::CLONE_NEWNET, 0);
        let steps = describe(&p);
        assert!(!steps.iter().any(|s| s.contains("loopback")));
        if Path::new("/etc/resolv.conf").exists() {
            position(&steps, "bind mounting /etc/resolv.conf");
        }
    }

    #[test]
    fn escaping_targets_hidden_stores_and_existing_roots_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path());
        s.binds.push(BindMount {
            target: "/../../etc".into(),
            source: "/etc".into(),
            optional: false,
            read_only: false,
        });
        let e = prepare(&s, None, StoreMode::Bind)
            .err()
            .expect("'..' refused");
        assert_eq!(
            e.to_string(),
            "invalid sandbox spec: bind target /../../etc must not contain '..'"
        );
        assert!(!s.root.exists(), "nothing created for an invalid spec");

        let mut s = spec(dir.path());
        s.binds.push(BindMount::same("/nix/store/"));
        let e = prepare(&s, None, StoreMode::Bind)
            .err()
            .expect("store target refused");
        assert_eq!(
            e.to_string(),
            "invalid sandbox spec: bind target /nix/store/ would hide the store directory"
        );

        let s = spec(dir.path());
        prepare(&s, None, StoreMode::Bind).unwrap();
        // The root now exists: a second prepare must not reuse it.
        let e = prepare(&s, None, StoreMode::Bind)
            .err()
            .expect("existing root refused");
        assert!(
            e.to_string().starts_with(&format!(
                "preparing the sandbox: creating chroot directory {}:",
                s.root.display()
            )),
            "{e}"
        );
    }
}
