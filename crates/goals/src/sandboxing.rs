//! Isolation of a build: the chroot the builder runs in (`sandbox`), the build user it runs
//! as (`build-users-group`), and getting its outputs out of both safely.
//!
//! ```text
//! sandbox-paths entry = target "=" source [ "?" ]     source bound at target inside
//!                     | path [ "?" ]                  bound at the same place
//!                     ("?": skipped when the source does not exist)
//! ```
//!
//! A build in the chroot sees: its input closure (read-only), the `sandbox-paths` and the
//! closures of those that are store paths (as Nix ≥ 1.9), its build directory, a writable
//! store directory in which it creates its outputs, and what the sandbox crate adds (`/dev`,
//! `/proc`, `/tmp`, `/etc/{passwd,group,hosts}`). The chroot itself is
//! `<store>/<drv>.chroot`, on the store's file system, so that outputs can be renamed out of
//! it. Fixed-output derivations run in the chroot too, but in the host's network namespace.
//!
//! # Getting outputs out (CVE-2024-27297)
//!
//! A builder may hand a descriptor of an output file to a process outside the build (over a
//! unix socket), which could then write through it after the output was checked and
//! registered. Where that is possible, outputs are *copied* into fresh inodes (NAR dump into
//! NAR restore, so no hard link, special file or permission bit comes along) before anything
//! is checked, and the builder's own files are deleted; a descriptor held outside then points
//! at an unlinked inode. Where it is not possible, outputs are renamed:
//!
//! - fixed-output builds share the host's network namespace, so abstract unix sockets reach
//!   any process on the host: always copied;
//! - unsandboxed builds as a build user can reach the host's unix sockets: copied;
//! - other sandboxed builds have a private network namespace (abstract sockets reach only the
//!   sandbox), see no socket of the host's file system, and every process of theirs is dead
//!   once the builder (PID 1 of its namespace) has been reaped: nothing outside can hold a
//!   descriptor, so a rename is enough;
//! - unsandboxed builds without build users run as the caller, who can write to the store
//!   anyway: a copy would protect nothing, so renamed (nothing to move, in fact).
//!
//! Ownership and permissions are checked on the builder's files *before* they are copied
//! (a copy would be owned by us and hide a foreign file, e.g. a hard link to `/etc/shadow`).

use std::collections::BTreeSet;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use nixb_sandbox::{BindMount, BuildUserIds, ChrootSpec, Network, UserNamespace};
use nixb_store::canon::InodesSeen;
use nixb_store::{StoreDir, StorePath};
use nixb_userpool::{AutoUidBlock, BuildUser, UserPoolConfig};

use crate::build_dir::delete_path;
use crate::config::{SandboxMode, WorkerConfig};
use crate::error::{BuildError, Rejection};
use crate::event::FailureKind;
use crate::store::BuildStore;

/// One parsed `sandbox-paths` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxPath {
    pub target: PathBuf,
    pub source: PathBuf,
    pub optional: bool,
}

/// Parses `sandbox-paths` entries (see the module doc for the grammar).
pub fn parse_sandbox_paths(entries: &[String]) -> Result<Vec<SandboxPath>, String> {
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let (body, optional) = match e.strip_suffix('?') {
            Some(b) => (b, true),
            None => (e.as_str(), false),
        };
        let (target, source) = match body.split_once('=') {
            Some((t, s)) => (t, s),
            None => (body, body),
        };
        if target.is_empty() || source.is_empty() {
            return Err(format!("sandbox-paths entry '{e}': empty path"));
        }
        for p in [target, source] {
            if !p.starts_with('/') {
                return Err(format!(
                    "sandbox-paths entry '{e}': '{p}' is not an absolute path"
                ));
            }
        }
        out.push(SandboxPath {
            target: PathBuf::from(target),
            source: PathBuf::from(source),
            optional,
        });
    }
    Ok(out)
}

/// Whether the build of a derivation with environment `env` runs in the chroot. `Err` for
/// `__noChroot` under `sandbox = true`, the derivation's fault.
pub(crate) fn use_chroot(
    mode: SandboxMode,
    no_chroot: bool,
    drv_name: &str,
) -> Result<bool, BuildError> {
    match mode {
        SandboxMode::Off => Ok(false),
        SandboxMode::Relaxed => Ok(!no_chroot),
        SandboxMode::On if no_chroot => Err(BuildError::Build(format!(
            "derivation '{drv_name}' has '__noChroot' set, but that's not allowed when 'sandbox' is 'true'"
        ))),
        SandboxMode::On => Ok(true),
    }
}

/// Whether a build that would run in the chroot must do without it: without root the
/// sandbox needs a user namespace, which the kernel may refuse. `Ok(Some(warning))`: build
/// unsandboxed (`sandbox-fallback = true`, Nix's default), the warning saying why;
/// `Err`: `sandbox-fallback = false`, the error saying why; `Ok(None)`: the sandbox can be had.
/// Never silent, unlike Nix, which falls back without a word.
pub(crate) fn sandbox_unavailable(
    cfg: &WorkerConfig,
    drv_name: &str,
) -> Result<Option<String>, BuildError> {
    if nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    match nixb_sandbox::user_namespaces_available() {
        Ok(()) => Ok(None),
        Err(e) if cfg.sandbox_fallback => Ok(Some(format!(
            "building '{drv_name}' without the sandbox: without root it needs a user \
             namespace, and {e} (sandbox-fallback = true)"
        ))),
        Err(e) => Err(BuildError::Misc(format!(
            "cannot build '{drv_name}' in the sandbox: without root it needs a user namespace, \
             and {e}; set sandbox-fallback = true to build without the sandbox, or sandbox = \
             false"
        ))),
    }
}

/// A fresh cgroup for one build under `use-cgroups`: `Ok(None)` without the setting,
/// `Err(warning)` where cgroups cannot be made here (said once per process, then `Ok(None)`:
/// the builder's process group is killed as before).
pub(crate) fn build_cgroup(cfg: &WorkerConfig) -> Result<Option<PathBuf>, String> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::OnceLock;
    static ROOT: OnceLock<Result<nixb_sandbox::CgroupRoot, String>> = OnceLock::new();
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !cfg.use_cgroups {
        return Ok(None);
    }
    let root = ROOT.get_or_init(|| nixb_sandbox::CgroupRoot::open().map_err(|e| e.to_string()));
    let made = match root {
        Ok(r) => r.create().map_err(|e| e.to_string()),
        Err(e) => Err(e.clone()),
    };
    match made {
        Ok(dir) => Ok(Some(dir)),
        Err(_) if WARNED.swap(true, Ordering::Relaxed) => Ok(None),
        Err(e) => Err(format!(
            "use-cgroups: {e}; builds are killed by process group instead, so a process that \
             leaves it can outlive its build"
        )),
    }
}

/// A build user held for one build: a member of `build-users-group`, or a block of
/// automatically allocated uids (`auto-allocate-uids`). Every process of the user is killed
/// when it is let go, so nothing a builder started survives its build on any path out
/// (success, failure, cancellation, a dropped goal); the lock is released after that.
#[derive(Debug)]
pub(crate) struct HeldUser(Held);

#[derive(Debug)]
enum Held {
    Group(BuildUser),
    /// A block, and the gid of `build-users-group`, or why there is none: a builder without
    /// a user namespace of its own (no chroot) runs with that gid, so that it can create its
    /// outputs in the store, and cannot be started without it, as in Nix (2.12 and later;
    /// 2.8 has no `auto-allocate-uids` and needs the group for every build). A chroot build
    /// does not use the group.
    Auto(AutoUidBlock, Result<u32, String>),
}

impl HeldUser {
    /// The uid outside any namespace (an automatic block's first id).
    pub fn uid(&self) -> u32 {
        match &self.0 {
            Held::Group(u) => u.uid,
            Held::Auto(b, _) => b.first,
        }
    }

    /// The gid (an automatic block's first id, as uid and gid share the numbers).
    pub fn gid(&self) -> u32 {
        match &self.0 {
            Held::Group(u) => u.gid,
            Held::Auto(b, _) => b.first,
        }
    }

    /// The ids a builder without a user namespace of its own switches to. For a block of
    /// automatically allocated uids that is the block's first uid with the gid of
    /// `build-users-group`, an error when that group does not exist.
    pub fn ids(&self) -> Result<BuildUserIds, BuildError> {
        match &self.0 {
            Held::Group(u) => Ok(BuildUserIds {
                uid: u.uid,
                gid: u.gid,
                supplementary: u.supplementary_gids.clone(),
            }),
            Held::Auto(b, group) => match group {
                Ok(gid) => Ok(BuildUserIds {
                    uid: b.first,
                    gid: *gid,
                    supplementary: vec![],
                }),
                Err(e) => Err(BuildError::Misc(format!(
                    "{e} (with 'auto-allocate-uids', a build without a sandbox runs as uid {} \
                     with the gid of 'build-users-group')",
                    b.first
                ))),
            },
        }
    }

    /// The uids the build's files may be owned by: the build user's, or an automatic
    /// block's (a `uid-range` builder may chown to any of them).
    pub fn uids(&self) -> std::ops::RangeInclusive<u32> {
        match &self.0 {
            Held::Group(u) => u.uid..=u.uid,
            Held::Auto(b, _) => b.first..=b.first + (b.count - 1),
        }
    }

    /// For a chroot build with automatically allocated uids: the user namespace mapping
    /// Nix's build user 1000:100 onto the block's first id, or with `uid_range` root and
    /// all 65536 ids onto the block (as Nix 2.12). `None` for a group member (the builder
    /// switches to it without a namespace of its own).
    pub fn user_namespace(&self, uid_range: bool) -> Option<UserNamespace> {
        let Held::Auto(b, _) = &self.0 else {
            return None;
        };
        Some(if uid_range {
            UserNamespace::range(b.first, b.count)
        } else {
            UserNamespace {
                inside_uid: nixb_sandbox::SANDBOX_UID,
                inside_gid: nixb_sandbox::SANDBOX_GID,
                outside_uid: b.first,
                outside_gid: b.first,
                count: 1,
            }
        })
    }

    pub fn kill_all_processes(&self) -> Result<(), BuildError> {
        match &self.0 {
            Held::Group(u) => u
                .kill_all_processes()
                .map_err(|e| BuildError::misc(format!("build user '{}'", u.name), e)),
            Held::Auto(b, _) => nixb_userpool::kill_user(b.first).map_err(|e| {
                BuildError::misc(format!("automatically allocated uid {}", b.first), e)
            }),
        }
    }
}

impl Drop for HeldUser {
    fn drop(&mut self) {
        let _ = self.kill_all_processes();
    }
}

/// The outcome of asking for a build user.
pub(crate) enum UserSlot {
    /// No `build-users-group`, or not root: the builder runs as the caller.
    NotNeeded,
    Got(HeldUser),
    /// Every member of the group is building; the message says so in the original's words.
    Busy(String),
}

/// Takes a free build user when builds run under build users (a group is set and we are
/// root, as in the original).
pub(crate) fn acquire_build_user(cfg: &WorkerConfig) -> Result<UserSlot, BuildError> {
    if cfg.auto_allocate_uids && nix::unistd::geteuid().is_root() {
        let auto = nixb_userpool::AutoUidConfig {
            state_dir: cfg.state_dir.clone(),
            start_id: cfg.start_id,
            id_count: cfg.id_count,
        };
        return match nixb_userpool::acquire_auto(&auto) {
            Ok(Some(b)) => {
                // Only a builder without a user namespace needs it, and a chroot build must
                // not fail for a group it does not use: looked up here, required by `ids`.
                let name = cfg.build_users_group.clone().unwrap_or_default();
                let group = match nix::unistd::Group::from_name(&name) {
                    Ok(Some(g)) if !name.is_empty() => Ok(g.gid.as_raw()),
                    Ok(_) => Err(nixb_userpool::UserPoolError::GroupNotFound { group: name }),
                    Err(source) => Err(nixb_userpool::UserPoolError::GroupLookup {
                        group: name,
                        source,
                    }),
                };
                let group = group.map_err(|e| e.to_string());
                Ok(UserSlot::Got(HeldUser(Held::Auto(b, group))))
            }
            Ok(None) => Ok(UserSlot::Busy(
                nixb_userpool::acquire_auto_or_fail(&auto)
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default(),
            )),
            Err(e) => Err(BuildError::misc("allocating uids for the build", e)),
        };
    }
    let Some(group) = cfg.build_users_group.as_ref().filter(|g| !g.is_empty()) else {
        return Ok(UserSlot::NotNeeded);
    };
    if !nix::unistd::geteuid().is_root() {
        return Ok(UserSlot::NotNeeded);
    }
    let pool = UserPoolConfig {
        group: group.clone(),
        state_dir: cfg.state_dir.clone(),
    };
    match nixb_userpool::acquire(&pool) {
        Ok(Some(u)) => Ok(UserSlot::Got(HeldUser(Held::Group(u)))),
        Ok(None) => Ok(UserSlot::Busy(
            nixb_userpool::UserPoolError::AllInUse {
                group: group.clone(),
            }
            .to_string(),
        )),
        Err(e) => Err(BuildError::misc("acquiring a build user", e)),
    }
}

/// Prepares the build directory and store for `user`: the store directory must let the
/// build users' group create outputs (and only that), no process of the user may be left
/// from before, and the build directory becomes theirs.
pub(crate) fn prepare_for_user(
    user: &HeldUser,
    store_dir: &Path,
    build_dir: &Path,
) -> Result<(), BuildError> {
    match &user.0 {
        Held::Group(u) => {
            nixb_userpool::check_store_permissions(store_dir, u.gid)
                .map_err(|e| BuildError::Misc(e.to_string()))?;
            user.kill_all_processes()?;
            nixb_userpool::chown_tmp_dir(build_dir, u)
                .map_err(|e| BuildError::Misc(e.to_string()))?;
        }
        // Chroot builds write their outputs into the chroot directory, which the sandbox
        // gives to the block's first id; only the build directory is ours to hand over.
        Held::Auto(b, _) => {
            user.kill_all_processes()?;
            std::os::unix::fs::chown(build_dir, Some(b.first), Some(b.first)).map_err(|e| {
                BuildError::misc(
                    format!(
                        "changing the owner of '{}' to {}",
                        build_dir.display(),
                        b.first
                    ),
                    e,
                )
            })?;
        }
    }
    Ok(())
}

/// The chroot directory of a build of `drv`: next to the store paths, so that outputs can be
/// renamed out of it.
pub(crate) fn chroot_root(sd: &StoreDir, drv: &StorePath) -> PathBuf {
    sd.as_path().join(format!("{}.chroot", drv.base_name()))
}

/// Everything the chroot of one build holds, for the sandbox crate.
pub(crate) struct ChrootPlan<'a> {
    pub root: PathBuf,
    pub build_dir: &'a Path,
    pub inputs: &'a BTreeSet<StorePath>,
    pub fixed_output: bool,
    /// A prepared network namespace, for a build that gets a private one.
    pub netns: Option<std::os::fd::OwnedFd>,
    /// uid/gid written into the chroot's `/etc/passwd` and `/etc/group`.
    pub uid: u32,
    pub gid: u32,
    /// The builder's own user namespace, for automatically allocated uids (without root,
    /// one for the caller is made here).
    pub user_namespace: Option<UserNamespace>,
}

pub(crate) fn chroot_spec(
    plan: ChrootPlan<'_>,
    cfg: &WorkerConfig,
    store: &dyn BuildStore,
) -> Result<ChrootSpec, BuildError> {
    let sd = store.store_dir();
    // A chroot left by a crashed build would make the sandbox refuse to start.
    delete_path(&plan.root).map_err(|e| {
        BuildError::misc(
            format!("removing old chroot directory '{}'", plan.root.display()),
            e,
        )
    })?;
    let mut spec = ChrootSpec::new(
        plan.root,
        sd.as_path().to_path_buf(),
        plan.build_dir.to_path_buf(),
        plan.uid,
        plan.gid,
    );
    if let Some(ns) = plan.user_namespace {
        spec.user_namespace = Some(ns);
        spec.etc_files =
            nixb_sandbox::nix_etc_files_userns(ns.inside_uid, ns.inside_gid, plan.build_dir);
    } else if !nix::unistd::geteuid().is_root() {
        // No build users without root: the builder gets a user namespace mapping us to
        // Nix's build user 1000:100, with the /etc files Nix 2.x writes for it.
        spec.user_namespace = Some(UserNamespace::for_caller());
        spec.etc_files = nixb_sandbox::nix_etc_files_userns(
            nixb_sandbox::SANDBOX_UID,
            nixb_sandbox::SANDBOX_GID,
            plan.build_dir,
        );
    }
    // Inputs read-only: unlike Nix (which relies on the store's ownership alone), this also
    // holds for a builder that runs as root without build users.
    let mut store_paths: BTreeSet<StorePath> = plan.inputs.clone();
    let extra = parse_sandbox_paths(&cfg.sandbox_paths).map_err(BuildError::Misc)?;
    let mut extra_roots = BTreeSet::new();
    for p in &extra {
        if let Some(s) = p.source.to_str() {
            if let Ok(sp) = sd.parse_prefix(s) {
                if store.is_valid_path(&sp)? {
                    extra_roots.insert(sp);
                }
            }
        }
        spec.binds.push(BindMount {
            target: p.target.clone(),
            source: p.source.clone(),
            optional: p.optional,
            read_only: false,
        });
    }
    if !extra_roots.is_empty() {
        store_paths.extend(store.compute_closure(&extra_roots)?);
    }
    for p in &store_paths {
        spec.binds.push(BindMount::same(sd.to_path(p)).read_only());
    }
    spec.network = if plan.fixed_output {
        Network::Host
    } else {
        match plan.netns {
            // A builder cloned into a user namespace of its own has no capability over a
            // network namespace made outside it (setns fails with EPERM): it gets a fresh
            // one, owned by its user namespace.
            Some(_) if spec.user_namespace.is_some() => Network::Private,
            Some(fd) => Network::Prepared(fd),
            None => Network::Private,
        }
    };
    Ok(spec)
}

/// Where a builder's output `p` lies once the builder is gone: in the chroot's store
/// directory on disk (see [`nixb_sandbox::chroot_store_dir`]), or in place.
pub(crate) fn built_location(sd: &StoreDir, chroot: Option<&Path>, p: &StorePath) -> PathBuf {
    match chroot {
        Some(root) => nixb_sandbox::chroot_store_dir(root).join(p.base_name()),
        None => sd.to_path(p),
    }
}

/// How outputs leave the build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Extraction {
    /// Rename (out of the chroot), or leave in place when there is no chroot.
    Move,
    /// Copy into fresh inodes; see the module doc.
    Copy,
}

pub(crate) fn extraction_for(chroot: bool, fixed_output: bool, build_user: bool) -> Extraction {
    if fixed_output || (!chroot && build_user) {
        Extraction::Copy
    } else {
        Extraction::Move
    }
}

fn reject(e: impl std::fmt::Display) -> Rejection {
    Rejection::build(FailureKind::BuilderFailed, e.to_string())
}

/// Takes the output `p` out of the build to its place in the store. With `check`, the
/// builder's files are first checked (not group/world-writable, the top owned by the first
/// of the build's `uids` and everything by one of them) and canonicalised; without it (a
/// failed build, kept for debugging) they are only moved.
pub(crate) fn extract_output(
    sd: &StoreDir,
    chroot: Option<&Path>,
    p: &StorePath,
    how: Extraction,
    check: Option<Option<std::ops::RangeInclusive<u32>>>,
) -> Result<(), Rejection> {
    let src = built_location(sd, chroot, p);
    let dest = sd.to_path(p);
    if src.symlink_metadata().is_err() {
        return Ok(()); // not produced; registration reports it
    }
    let checked = check.is_some();
    if let Some(uids) = check {
        nixb_store::canon::check_suspicious(&src, uids.as_ref().map(|u| *u.start()))
            .map_err(reject)?;
        nixb_store::canon::canonicalise_build_output(&src, uids, &mut InodesSeen::new())
            .map_err(reject)?;
    }
    let how = if !checked { Extraction::Move } else { how };
    match how {
        Extraction::Move => {
            if src != dest {
                rename_over(&src, &dest)?;
            }
        }
        Extraction::Copy => {
            let mut tmp = dest.clone().into_os_string();
            tmp.push(format!(".nixb-copy-{}", std::process::id()));
            let tmp = PathBuf::from(tmp);
            delete_path(&tmp)
                .map_err(|e| Rejection::misc(format!("removing '{}': {e}", tmp.display())))?;
            copy_fresh(&src, &tmp)?;
            // The builder's inodes go: a descriptor held outside now points at nothing
            // reachable from the store.
            delete_path(&src)
                .map_err(|e| Rejection::misc(format!("removing '{}': {e}", src.display())))?;
            rename_over(&tmp, &dest)?;
        }
    }
    Ok(())
}

fn rename_over(src: &Path, dest: &Path) -> Result<(), Rejection> {
    delete_path(dest)
        .map_err(|e| Rejection::misc(format!("removing '{}': {e}", dest.display())))?;
    let err = |e: std::io::Error| {
        Rejection::misc(format!(
            "moving '{}' to '{}': {e}",
            src.display(),
            dest.display()
        ))
    };
    match std::fs::rename(src, dest) {
        Ok(()) => Ok(()),
        // Moving a directory to another parent rewrites its `..`, which needs write
        // permission on it; canonical (0555) it has none, and without root nothing
        // overrides that. Opened for the move, then back to its mode (mtime unchanged).
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            use std::os::unix::fs::PermissionsExt;
            let md = src.symlink_metadata().map_err(|_| err(e))?;
            if !md.is_dir() {
                return Err(err(std::io::Error::from(
                    std::io::ErrorKind::PermissionDenied,
                )));
            }
            let mode = md.permissions().mode() & 0o7777;
            std::fs::set_permissions(src, std::fs::Permissions::from_mode(mode | 0o200))
                .map_err(err)?;
            std::fs::rename(src, dest).map_err(err)?;
            std::fs::set_permissions(dest, std::fs::Permissions::from_mode(mode)).map_err(err)
        }
        Err(e) => Err(err(e)),
    }
}

/// Copies the tree at `src` to `dest` (which must not exist) as a NAR stream: fresh inodes,
/// only regular files (with the executable bit), directories and symlinks.
pub(crate) fn copy_fresh(src: &Path, dest: &Path) -> Result<(), Rejection> {
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| {
        Rejection::misc(format!("creating a pipe to copy '{}': {e}", src.display()))
    })?;
    let from = src.to_path_buf();
    let dumper = std::thread::Builder::new()
        .name("nixb-copy-output".into())
        .spawn(move || -> Result<(), String> {
            let mut w = BufWriter::with_capacity(256 * 1024, std::fs::File::from(wr));
            nixb_store::nar::dump_path(&from, &mut w).map_err(|e| e.to_string())?;
            w.flush().map_err(|e| e.to_string())
        })
        .map_err(|e| Rejection::misc(format!("starting the copy of '{}': {e}", src.display())))?;
    let mut r = BufReader::with_capacity(256 * 1024, std::fs::File::from(rd));
    let restored = nixb_store::nar::restore_path(&mut r, dest);
    // Closing the read end makes a dumper stuck on a full pipe fail instead of hang.
    drop(r);
    let dumped = dumper
        .join()
        .unwrap_or_else(|_| Err("the copying thread panicked".into()));
    if let Err(e) = dumped {
        let _ = delete_path(dest);
        return Err(Rejection::misc(format!(
            "copying '{}' out of the build: {e}",
            src.display()
        )));
    }
    restored.map_err(|e| {
        Rejection::misc(format!(
            "copying '{}' to '{}': {e}",
            src.display(),
            dest.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_paths_grammar() {
        let got = parse_sandbox_paths(&[
            "/bin/sh=/bin/busybox".into(),
            "/usr".into(),
            "/opt/x?".into(),
            "/a=/b?".into(),
        ])
        .unwrap();
        let sp = |t: &str, s: &str, o| SandboxPath {
            target: t.into(),
            source: s.into(),
            optional: o,
        };
        assert_eq!(
            got,
            [
                sp("/bin/sh", "/bin/busybox", false),
                sp("/usr", "/usr", false),
                sp("/opt/x", "/opt/x", true),
                sp("/a", "/b", true),
            ]
        );
        assert!(parse_sandbox_paths(&["relative".into()])
            .unwrap_err()
            .contains("'relative' is not an absolute path"));
        assert!(parse_sandbox_paths(&["/x=".into()])
            .unwrap_err()
            .contains("empty path"));
    }

    #[test]
    fn no_chroot_rules() {
        assert!(!use_chroot(SandboxMode::Off, false, "d").unwrap());
        assert!(!use_chroot(SandboxMode::Off, true, "d").unwrap());
        assert!(use_chroot(SandboxMode::On, false, "d").unwrap());
        assert!(use_chroot(SandboxMode::Relaxed, false, "d").unwrap());
        assert!(!use_chroot(SandboxMode::Relaxed, true, "d").unwrap());
        let e = use_chroot(SandboxMode::On, true, "/s/x.drv").unwrap_err();
        assert_eq!(
            e.to_string(),
            "derivation '/s/x.drv' has '__noChroot' set, but that's not allowed when 'sandbox' is 'true'"
        );
    }

    #[test]
    fn extraction_choice() {
        assert_eq!(extraction_for(true, true, true), Extraction::Copy);
        assert_eq!(extraction_for(true, true, false), Extraction::Copy);
        assert_eq!(extraction_for(false, true, false), Extraction::Copy);
        assert_eq!(extraction_for(false, false, true), Extraction::Copy);
        assert_eq!(extraction_for(true, false, true), Extraction::Move);
        assert_eq!(extraction_for(false, false, false), Extraction::Move);
    }

    #[test]
    fn copy_makes_fresh_inodes_with_the_same_nar() {
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("f"), b"hello").unwrap();
        std::os::unix::fs::symlink("f", src.join("l")).unwrap();
        std::fs::create_dir(src.join("d")).unwrap();
        std::fs::write(src.join("d/g"), b"x").unwrap();
        let before = nixb_store::nar::hash_path(&src, nixb_store::HashAlgo::Sha256).unwrap();
        let ino = std::fs::metadata(src.join("f")).unwrap().ino();
        // A descriptor held on the source, as an attacker outside the sandbox would.
        let mut held = std::fs::OpenOptions::new()
            .write(true)
            .open(src.join("f"))
            .unwrap();
        let dest = t.path().join("dest");
        copy_fresh(&src, &dest).unwrap();
        assert_ne!(std::fs::metadata(dest.join("f")).unwrap().ino(), ino);
        held.write_all(b"EVIL").unwrap();
        drop(held);
        let after = nixb_store::nar::hash_path(&dest, nixb_store::HashAlgo::Sha256).unwrap();
        assert_eq!(before, after);
        assert_eq!(std::fs::read(dest.join("f")).unwrap(), b"hello");
    }
}
