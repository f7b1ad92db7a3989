#![doc = include_str!("../README.md")]

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use nix::errno::Errno;
use nix::unistd::{Gid, Group, User};

/// Where and from which group build users come; the caller maps nix.conf onto it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserPoolConfig {
    /// `build-users-group`: the group whose members are the build users.
    pub group: String,
    /// `NIX_STATE_DIR`; the lock files live in `<state_dir>/userpool/`.
    pub state_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum UserPoolError {
    #[error("the group '{group}' specified in 'build-users-group' does not exist")]
    GroupNotFound { group: String },
    #[error("looking up the group '{group}' specified in 'build-users-group': {source}")]
    GroupLookup { group: String, source: Errno },
    #[error("the build users group '{group}' has no members")]
    NoMembers { group: String },
    #[error("the user '{user}' in the group '{group}' does not exist")]
    UserNotFound { user: String, group: String },
    #[error("looking up the user '{user}' in the group '{group}': {source}")]
    UserLookup {
        user: String,
        group: String,
        source: Errno,
    },
    #[error("getting the supplementary groups of the build user '{user}': {source}")]
    GroupList { user: String, source: Errno },
    #[error("the Nix user (uid {uid}) should not be a member of '{group}' (it is, as '{user}')")]
    CallerIsMember {
        uid: u32,
        user: String,
        group: String,
    },
    #[error("the user '{user}' in the group '{group}' has uid 0; build users must not be root")]
    RootMember { user: String, group: String },
    #[error("all build users are currently in use; consider creating additional users and adding them to the '{group}' group")]
    AllInUse { group: String },
    #[error("creating the user pool directory '{path}': {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("opening user lock '{path}': {source}")]
    OpenLock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("locking user lock '{path}' ({how}): {source}")]
    Lock {
        path: PathBuf,
        how: &'static str,
        source: Errno,
    },
    #[error("all {slots} blocks of automatically allocated uids (from {start_id}, 'id-count' {id_count}) are in use")]
    AllAutoInUse {
        slots: u32,
        start_id: u32,
        id_count: u32,
    },
    #[error("'id-count' {id_count} from 'start-id' {start_id}: {reason}")]
    BadIdRange {
        start_id: u32,
        id_count: u32,
        reason: &'static str,
    },
    #[error("refusing to kill all processes of uid 0")]
    KillRoot,
    #[error("cannot kill processes for uid {uid}: {step}: {source}")]
    Kill {
        uid: u32,
        step: &'static str,
        source: Errno,
    },
    #[error("cannot stat '{path}': {source}")]
    StatStore {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("builder does not have write permission to '{path}'; try 'chgrp {gid} {path}; chmod 1775 {path}'", path = .path.display())]
    StorePermissions { path: PathBuf, gid: u32 },
    #[error("cannot change ownership of '{path}' to {uid}:{gid}: {source}", path = .path.display())]
    Chown {
        path: PathBuf,
        uid: u32,
        gid: u32,
        source: std::io::Error,
    },
}

/// A build user held for one build. The lock is released when this value is dropped.
#[derive(Debug)]
pub struct BuildUser {
    pub uid: u32,
    /// The gid of the build users group (not the user's login group): builders run with it,
    /// and the store directory is group-writable for it.
    pub gid: u32,
    /// The groups `/etc/group` lists the user in, plus `gid` (`getgrouplist`). Nix 2.x hands
    /// these to `setgroups` so that e.g. a `kvm` group works in builds; the 1.x engine cleared
    /// them. Which to do is the sandbox's choice.
    pub supplementary_gids: Vec<u32>,
    pub name: String,
    lock: UidLock,
}

/// The lock on one uid: `<dir>/<uid>` held open with both locks, and reserved in [`LOCKED`].
#[derive(Debug)]
struct UidLock {
    path: PathBuf,
    // Closed (so both locks released) in `Drop` before the path leaves `LOCKED`.
    fd: Option<OwnedFd>,
}

impl UidLock {
    /// Locks `<dir>/<uid>`, or `None` when this process or another holds it.
    fn try_acquire(dir: &Path, uid: u32) -> Result<Option<UidLock>, UserPoolError> {
        Self::try_acquire_path(dir.join(uid.to_string()))
    }

    /// Locks `path`, or `None` when this process or another holds it.
    fn try_acquire_path(path: PathBuf) -> Result<Option<UidLock>, UserPoolError> {
        // Reserve the path before opening it, so that no other thread of this process opens
        // (and by closing, unlocks) a file this process holds.
        if !locked_set().insert(path.clone()) {
            return Ok(None);
        }
        match try_lock(&path) {
            Ok(Some(fd)) => Ok(Some(UidLock { path, fd: Some(fd) })),
            other => {
                locked_set().remove(&path);
                other.map(|_| None)
            }
        }
    }
}

impl Drop for UidLock {
    fn drop(&mut self) {
        // Close first: once the path leaves the set another thread may open the file, and
        // must find it unlocked by us rather than share our (per-process) fcntl lock.
        if let Some(fd) = self.fd.take() {
            // Unlock the flock explicitly: a child forked by another thread shares the open
            // file description until its exec closes it, and would keep the lock held.
            let _ = rustix::fs::flock(&fd, rustix::fs::FlockOperation::Unlock);
            drop(fd);
        }
        locked_set().remove(&self.path);
    }
}

/// Lock files this process holds; see "Locking" in the module doc.
static LOCKED: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

fn locked_set() -> MutexGuard<'static, BTreeSet<PathBuf>> {
    // The set is only ever inserted into or removed from; a panic elsewhere while it was held
    // cannot leave it half-updated, so a poisoned lock is still usable.
    LOCKED.lock().unwrap_or_else(|e| e.into_inner())
}

struct Member {
    name: String,
    uid: u32,
}

/// Resolves the members of the build users group, refusing configurations that would let a
/// builder act as the caller or as root.
fn members(group_name: &str) -> Result<(Gid, Vec<Member>), UserPoolError> {
    let group = Group::from_name(group_name)
        .map_err(|source| UserPoolError::GroupLookup {
            group: group_name.to_string(),
            source,
        })?
        .ok_or_else(|| UserPoolError::GroupNotFound {
            group: group_name.to_string(),
        })?;
    if group.mem.is_empty() {
        return Err(UserPoolError::NoMembers {
            group: group_name.to_string(),
        });
    }
    let me = [
        nix::unistd::getuid().as_raw(),
        nix::unistd::geteuid().as_raw(),
    ];
    let mut out = Vec::with_capacity(group.mem.len());
    for name in &group.mem {
        let user = User::from_name(name)
            .map_err(|source| UserPoolError::UserLookup {
                user: name.clone(),
                group: group_name.to_string(),
                source,
            })?
            .ok_or_else(|| UserPoolError::UserNotFound {
                user: name.clone(),
                group: group_name.to_string(),
            })?;
        let uid = user.uid.as_raw();
        // The original checks this only for the user it happens to lock; checking every member
        // up front makes the refusal independent of which users are busy.
        if me.contains(&uid) {
            return Err(UserPoolError::CallerIsMember {
                uid,
                user: name.clone(),
                group: group_name.to_string(),
            });
        }
        if uid == 0 {
            return Err(UserPoolError::RootMember {
                user: name.clone(),
                group: group_name.to_string(),
            });
        }
        out.push(Member {
            name: name.clone(),
            uid,
        });
    }
    Ok((group.gid, out))
}

/// Takes a free build user, or returns `Ok(None)` when every member is held by some build
/// (in this process or another); the caller may wait and retry, or fail with
/// [`UserPoolError::AllInUse`] as [`acquire_or_fail`] does.
pub fn acquire(cfg: &UserPoolConfig) -> Result<Option<BuildUser>, UserPoolError> {
    let (gid, members) = members(&cfg.group)?;
    let dir = cfg.state_dir.join("userpool");
    std::fs::create_dir_all(&dir).map_err(|source| UserPoolError::CreateDir {
        path: dir.clone(),
        source,
    })?;
    for member in members {
        let Some(lock) = UidLock::try_acquire(&dir, member.uid)? else {
            continue;
        };
        let cname =
            CString::new(member.name.as_bytes()).map_err(|_| UserPoolError::UserNotFound {
                user: member.name.clone(),
                group: cfg.group.clone(),
            })?;
        // An early return from here drops `lock`, which releases the user again.
        let groups =
            nix::unistd::getgrouplist(&cname, gid).map_err(|source| UserPoolError::GroupList {
                user: member.name.clone(),
                source,
            })?;
        return Ok(Some(BuildUser {
            uid: member.uid,
            gid: gid.as_raw(),
            supplementary_gids: groups.into_iter().map(Gid::as_raw).collect(),
            name: member.name,
            lock,
        }));
    }
    Ok(None)
}

/// [`acquire`], with an exhausted pool reported as the original's error.
pub fn acquire_or_fail(cfg: &UserPoolConfig) -> Result<BuildUser, UserPoolError> {
    acquire(cfg)?.ok_or_else(|| UserPoolError::AllInUse {
        group: cfg.group.clone(),
    })
}

/// Opens `path` and takes both locks without waiting; `None` when another holder has either.
fn try_lock(path: &Path) -> Result<Option<OwnedFd>, UserPoolError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| UserPoolError::OpenLock {
            path: path.to_path_buf(),
            source,
        })?;
    let fd: OwnedFd = file.into();
    let raw = fd.as_raw_fd();

    // A process-associated (not open-file-description) lock, as the original takes.
    let fl = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0, // the whole file
        l_pid: 0,
    };
    loop {
        match nix::fcntl::fcntl(raw, nix::fcntl::FcntlArg::F_SETLK(&fl)) {
            Ok(_) => break,
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN | Errno::EACCES) => return Ok(None),
            Err(source) => {
                return Err(UserPoolError::Lock {
                    path: path.to_path_buf(),
                    how: "fcntl",
                    source,
                })
            }
        }
    }
    loop {
        match rustix::fs::flock(&fd, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => break,
            Err(rustix::io::Errno::INTR) => continue,
            // Dropping `fd` closes it, which also releases the fcntl lock taken above.
            Err(rustix::io::Errno::WOULDBLOCK) => return Ok(None),
            Err(e) => {
                let source = Errno::from_raw(e.raw_os_error());
                return Err(UserPoolError::Lock {
                    path: path.to_path_buf(),
                    how: "flock",
                    source,
                });
            }
        }
    }
    Ok(Some(fd))
}

impl BuildUser {
    /// The lock file this user is held by (`<state dir>/userpool/<uid>`).
    pub fn lock_path(&self) -> &Path {
        &self.lock.path
    }

    /// Kills every process running as this user (see [`kill_user`]).
    pub fn kill_all_processes(&self) -> Result<(), UserPoolError> {
        kill_user(self.uid)
    }
}

/// Sends SIGKILL to every process whose real or saved uid is `uid`. Needs root.
///
/// `kill(-1, sig)` signals every process the caller may signal, which for an unprivileged
/// caller means exactly the processes of its own uid (and never the caller itself). So a
/// child is forked that switches to `uid` and sweeps with `kill(-1, SIGKILL)` until no
/// process is left (`ESRCH`). One sweep is atomic with respect to `fork` on Linux (a fork
/// does not complete while a fatal signal is pending), so a fork bomb cannot outrun it.
///
/// Processes that are already dead but not yet reaped by their parent (zombies) still count
/// as signalable, so when they are all that is left the sweep would never see `ESRCH`; the
/// sweep is therefore repeated at most [`MAX_KILL_SWEEPS`] times, after which whatever is
/// left has already been sent SIGKILL at least that many times.
pub fn kill_user(uid: u32) -> Result<(), UserPoolError> {
    if uid == 0 {
        return Err(UserPoolError::KillRoot);
    }
    let pipe_err = |source| UserPoolError::Kill {
        uid,
        step: "creating the status pipe",
        source,
    };
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(pipe_err)?;

    // SAFETY: the child calls only async-signal-safe functions (setuid, kill, write, _exit)
    // and touches no memory that another thread of the parent could hold locked.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(UserPoolError::Kill {
            uid,
            step: "fork",
            source: Errno::last(),
        });
    }
    if pid == 0 {
        let wfd = wr.as_raw_fd();
        // Reports (step, errno) to the parent and exits; steps: 1 = setuid, 2 = kill.
        let fail = |step: u8, errno: i32| -> ! {
            let mut rec = [0u8; 5];
            rec[0] = step;
            rec[1..].copy_from_slice(&errno.to_ne_bytes());
            // SAFETY: writing a stack buffer to our pipe, then leaving without running any
            // of the parent's atexit handlers or destructors.
            unsafe {
                libc::write(wfd, rec.as_ptr().cast(), rec.len());
                libc::_exit(1)
            }
        };
        // SAFETY: plain syscalls in the forked child.
        unsafe {
            // As root, setuid sets the real, effective and saved uid, so the kill permission
            // check below sees only `uid`.
            if libc::setuid(uid) != 0 {
                fail(1, *libc::__errno_location());
            }
            let mut sweeps = 0;
            while sweeps < MAX_KILL_SWEEPS {
                if libc::kill(-1, libc::SIGKILL) == 0 {
                    sweeps += 1;
                    continue;
                }
                match *libc::__errno_location() {
                    libc::ESRCH => break,
                    libc::EINTR => continue,
                    e => fail(2, e),
                }
            }
            libc::_exit(0)
        }
    }

    drop(wr);
    let mut rec = Vec::new();
    // EOF once the child exits (the write end is close-on-exec and the child never execs,
    // so EOF comes from its `_exit`); a 5-byte record means a failed step.
    let mut rd = File::from(rd);
    let read = rd.read_to_end(&mut rec);
    let status = loop {
        match nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None) {
            Err(Errno::EINTR) => continue,
            other => break other,
        }
    };
    if rec.len() == 5 {
        let step = match rec[0] {
            1 => "setuid",
            _ => "kill(-1, SIGKILL)",
        };
        let errno = i32::from_ne_bytes([rec[1], rec[2], rec[3], rec[4]]);
        return Err(UserPoolError::Kill {
            uid,
            step,
            source: Errno::from_raw(errno),
        });
    }
    read.map_err(|e| UserPoolError::Kill {
        uid,
        step: "reading the status pipe",
        source: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    })?;
    match status {
        Ok(nix::sys::wait::WaitStatus::Exited(_, 0)) => Ok(()),
        Ok(_) => Err(UserPoolError::Kill {
            uid,
            step: "the killer process died abnormally",
            source: Errno::UnknownErrno,
        }),
        Err(source) => Err(UserPoolError::Kill {
            uid,
            step: "waiting for the killer process",
            source,
        }),
    }
}

/// `auto-allocate-uids` (Nix 2.12): uids for builds taken from a range no account uses, in
/// blocks of [`IDS_PER_BUILD`], instead of the members of a group; no user needs to exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoUidConfig {
    /// `NIX_STATE_DIR`; the blocks' lock files are `<state_dir>/userpool2/slot-<n>`, where
    /// Nix 2.12 and later keep theirs, so that the two never share a block.
    pub state_dir: PathBuf,
    /// `start-id`: the first uid (and gid) of the range.
    pub start_id: u32,
    /// `id-count`: how many ids the range has; a multiple of [`IDS_PER_BUILD`] is used.
    pub id_count: u32,
}

/// Nix's default `start-id` on Linux (0x34000000).
pub const DEFAULT_START_ID: u32 = 872_415_232;
/// Nix's default `id-count` on Linux: 128 blocks.
pub const DEFAULT_ID_COUNT: u32 = 128 * IDS_PER_BUILD;
/// Ids per build: a `uid-range` build gets them all, others the first.
pub const IDS_PER_BUILD: u32 = 65536;

/// A block of [`IDS_PER_BUILD`] uids (and the same gids) held for one build; released when
/// dropped.
#[derive(Debug)]
pub struct AutoUidBlock {
    /// The block's first id: the build's uid and gid (outside its user namespace).
    pub first: u32,
    pub count: u32,
    lock: UidLock,
}

impl AutoUidBlock {
    /// The lock file this block is held by.
    pub fn lock_path(&self) -> &Path {
        &self.lock.path
    }
}

/// Takes a free block of automatically allocated uids, or `Ok(None)` when every block is held
/// (in this process or another).
pub fn acquire_auto(cfg: &AutoUidConfig) -> Result<Option<AutoUidBlock>, UserPoolError> {
    let bad = |reason| UserPoolError::BadIdRange {
        start_id: cfg.start_id,
        id_count: cfg.id_count,
        reason,
    };
    if cfg.start_id == 0 {
        return Err(bad("uid 0 is root's"));
    }
    let slots = cfg.id_count / IDS_PER_BUILD;
    if slots == 0 {
        return Err(bad("fewer ids than one build needs (65536)"));
    }
    if cfg.start_id.checked_add(slots * IDS_PER_BUILD).is_none() {
        return Err(bad("the range goes past the largest uid"));
    }
    let dir = cfg.state_dir.join("userpool2");
    std::fs::create_dir_all(&dir).map_err(|source| UserPoolError::CreateDir {
        path: dir.clone(),
        source,
    })?;
    for slot in 0..slots {
        if let Some(lock) = UidLock::try_acquire_path(dir.join(format!("slot-{slot}")))? {
            return Ok(Some(AutoUidBlock {
                first: cfg.start_id + slot * IDS_PER_BUILD,
                count: IDS_PER_BUILD,
                lock,
            }));
        }
    }
    Ok(None)
}

/// [`acquire_auto`], with every block held reported as an error.
pub fn acquire_auto_or_fail(cfg: &AutoUidConfig) -> Result<AutoUidBlock, UserPoolError> {
    acquire_auto(cfg)?.ok_or(UserPoolError::AllAutoInUse {
        slots: cfg.id_count / IDS_PER_BUILD,
        start_id: cfg.start_id,
        id_count: cfg.id_count,
    })
}

/// How many successful `kill(-1, SIGKILL)` sweeps [`kill_user`] makes at most; see there.
pub const MAX_KILL_SWEEPS: u32 = 1000;

/// Checks that builders running with group `gid` can create outputs in the store directory
/// but not delete each other's: the sticky bit, `rwx` for the group, and group `gid` (mode
/// 1775, group = the build users group, as `chgrp`/`chmod` in the error's hint make it).
pub fn check_store_permissions(store_dir: &Path, gid: u32) -> Result<(), UserPoolError> {
    let md = std::fs::metadata(store_dir).map_err(|source| UserPoolError::StatStore {
        path: store_dir.to_path_buf(),
        source,
    })?;
    let mode = md.mode();
    let sticky = mode & libc::S_ISVTX != 0;
    let group_rwx = mode & libc::S_IRWXG == libc::S_IRWXG;
    if !sticky || !group_rwx || md.gid() != gid {
        return Err(UserPoolError::StorePermissions {
            path: store_dir.to_path_buf(),
            gid,
        });
    }
    Ok(())
}

/// Gives the build's temporary directory to the build user, so that the builder (running as
/// that user) can write in it. Needs root unless the directory is already theirs.
pub fn chown_tmp_dir(dir: &Path, user: &BuildUser) -> Result<(), UserPoolError> {
    std::os::unix::fs::chown(dir, Some(user.uid), Some(user.gid)).map_err(|source| {
        UserPoolError::Chown {
            path: dir.to_path_buf(),
            uid: user.uid,
            gid: user.gid,
            source,
        }
    })
}

#[cfg(test)]
mod tests;
