//! Host-runnable tests: lock files, process-local exclusion, errors, the store permission
//! check. Tests that need real users and root live in `tests/vm_userpool.rs` (run in the VM).

use super::*;
use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Clone, Copy)]
enum Kind {
    Fcntl,
    Flock,
}

/// A child process holding one kind of lock on a file until `release` is called.
struct Holder {
    pid: libc::pid_t,
    release_wr: Option<OwnedFd>,
}

impl Holder {
    fn release(mut self) {
        drop(self.release_wr.take());
        let mut st = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(self.pid, &mut st, 0) };
    }
}

/// Taken by the tests that fork and the tests that re-take a lock they just dropped: a child
/// forked by one test holds copies of every descriptor until it closes them, which keeps a
/// `flock` that another test just released alive for that moment.
static FORKING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    FORKING.lock().unwrap_or_else(|e| e.into_inner())
}

/// In a forked test child: closes every inherited descriptor but `keep`. Other tests of this
/// binary hold lock files open on other threads; a child keeping their descriptors would keep
/// their `flock` (which belongs to the open file description) alive after they drop it.
unsafe fn close_others(keep: &[i32]) {
    for fd in 3..4096 {
        if !keep.contains(&fd) {
            libc::close(fd);
        }
    }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe")
}

fn read_byte(fd: &OwnedFd) -> u8 {
    let mut b = [0u8; 1];
    // SAFETY: reading into a stack buffer from our pipe.
    let n = unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
    assert_eq!(n, 1, "child reported nothing");
    b[0]
}

/// Forks a child that opens `path`, takes a `kind` lock without waiting and holds it until
/// released. Panics unless the child got the lock. The child makes raw syscalls only.
fn hold_in_child(path: &Path, kind: Kind) -> Holder {
    let cpath = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let (ready_rd, ready_wr) = pipe();
    let (release_rd, release_wr) = pipe();
    // SAFETY: the child only makes async-signal-safe calls and _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: in the forked child: raw calls on memory made before the fork, then _exit.
        unsafe {
            close_others(&[ready_wr.as_raw_fd(), release_rd.as_raw_fd()]);
            let fd = libc::open(cpath.as_ptr(), libc::O_RDWR | libc::O_CREAT, 0o600);
            let ok = fd >= 0
                && match kind {
                    Kind::Fcntl => {
                        let mut fl: libc::flock = std::mem::zeroed();
                        fl.l_type = libc::F_WRLCK as libc::c_short;
                        fl.l_whence = libc::SEEK_SET as libc::c_short;
                        libc::fcntl(fd, libc::F_SETLK, &fl) == 0
                    }
                    Kind::Flock => libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) == 0,
                };
            let b = [ok as u8];
            libc::write(ready_wr.as_raw_fd(), b.as_ptr().cast(), 1);
            let mut x = [0u8; 1];
            libc::read(release_rd.as_raw_fd(), x.as_mut_ptr().cast(), 1);
            libc::_exit(0);
        }
    }
    drop(ready_wr);
    drop(release_rd);
    assert_eq!(
        read_byte(&ready_rd),
        1,
        "child could not take the {} lock",
        kind_name(kind)
    );
    Holder {
        pid,
        release_wr: Some(release_wr),
    }
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Fcntl => "fcntl",
        Kind::Flock => "flock",
    }
}

/// Asks a fresh child process whether `path` is locked: returns (fcntl write-locked by
/// `owner`, flock held).
fn probe_in_child(path: &Path, owner: libc::pid_t) -> (bool, bool) {
    let cpath = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let (rd, wr) = pipe();
    // SAFETY: the child only makes async-signal-safe calls and _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: in the forked child: raw calls on memory made before the fork, then _exit.
        unsafe {
            close_others(&[wr.as_raw_fd()]);
            let fd = libc::open(cpath.as_ptr(), libc::O_RDWR);
            let mut fl: libc::flock = std::mem::zeroed();
            fl.l_type = libc::F_WRLCK as libc::c_short;
            fl.l_whence = libc::SEEK_SET as libc::c_short;
            let getlk = libc::fcntl(fd, libc::F_GETLK, &mut fl) == 0;
            let fcntl_held =
                getlk && fl.l_type == libc::F_WRLCK as libc::c_short && fl.l_pid == owner;
            let flock_free = libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) == 0;
            let b =
                [(fd >= 0 && getlk) as u8 | (fcntl_held as u8) << 1 | ((!flock_free) as u8) << 2];
            libc::write(wr.as_raw_fd(), b.as_ptr().cast(), 1);
            libc::_exit(0);
        }
    }
    drop(wr);
    let b = read_byte(&rd);
    let mut st = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut st, 0) };
    assert!(
        b & 1 == 1,
        "probe could not open {} or F_GETLK failed",
        path.display()
    );
    (b & 2 != 0, b & 4 != 0)
}

#[test]
fn missing_group_is_reported_without_side_effects() {
    let state = tempfile::tempdir().unwrap();
    let cfg = UserPoolConfig {
        group: "nixb-no-such-group-7f3a".into(),
        state_dir: state.path().to_path_buf(),
    };
    let err = acquire(&cfg).unwrap_err();
    assert!(
        matches!(err, UserPoolError::GroupNotFound { .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "the group 'nixb-no-such-group-7f3a' specified in 'build-users-group' does not exist"
    );
    assert!(!state.path().join("userpool").exists());
    assert!(matches!(
        acquire_or_fail(&cfg),
        Err(UserPoolError::GroupNotFound { .. })
    ));
}

#[test]
fn error_texts_follow_the_original() {
    // Wording from UserLock::acquire in the 1.x engine, with Nix 2.x's straight quotes.
    let g = || "nixbld".to_string();
    assert_eq!(
        UserPoolError::AllInUse { group: g() }.to_string(),
        "all build users are currently in use; consider creating additional users and adding them to the 'nixbld' group"
    );
    assert_eq!(
        UserPoolError::NoMembers { group: g() }.to_string(),
        "the build users group 'nixbld' has no members"
    );
    assert_eq!(
        UserPoolError::UserNotFound {
            user: "nixbld9".into(),
            group: g()
        }
        .to_string(),
        "the user 'nixbld9' in the group 'nixbld' does not exist"
    );
}

#[test]
fn lock_file_per_uid_with_mode_0600() {
    let dir = tempfile::tempdir().unwrap();
    let lock = UidLock::try_acquire(dir.path(), 30001)
        .unwrap()
        .expect("free uid");
    let path = dir.path().join("30001");
    assert_eq!(lock.path, path);
    let md = std::fs::metadata(&path).unwrap();
    assert!(md.is_file());
    assert_eq!(md.permissions().mode() & 0o7777, 0o600);
}

#[test]
fn same_process_cannot_take_a_held_uid_twice() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let a = UidLock::try_acquire(dir.path(), 30001)
        .unwrap()
        .expect("free uid");
    // fcntl alone would grant this (locks are per process); the process-local set must not.
    assert!(UidLock::try_acquire(dir.path(), 30001).unwrap().is_none());
    // The failed attempt must not have released the held lock (by closing a second fd).
    let me = std::process::id() as libc::pid_t;
    assert_eq!(probe_in_child(&a.path, me), (true, true));
    let b = UidLock::try_acquire(dir.path(), 30002)
        .unwrap()
        .expect("another uid is free");
    drop(a);
    let a2 = UidLock::try_acquire(dir.path(), 30001).unwrap();
    assert!(a2.is_some(), "released uid must be free again");
    drop(b);
}

#[test]
fn other_processes_see_both_locks_until_drop() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let me = std::process::id() as libc::pid_t;
    let lock = UidLock::try_acquire(dir.path(), 30003)
        .unwrap()
        .expect("free uid");
    let path = lock.path.clone();
    assert_eq!(
        probe_in_child(&path, me),
        (true, true),
        "fcntl by us, and flock held"
    );
    drop(lock);
    assert_eq!(
        probe_in_child(&path, me),
        (false, false),
        "both released on drop"
    );
}

#[test]
fn a_uid_locked_by_another_process_is_skipped() {
    let _serial = serial();
    for kind in [Kind::Fcntl, Kind::Flock] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("30004");
        let holder = hold_in_child(&path, kind);
        assert!(
            UidLock::try_acquire(dir.path(), 30004).unwrap().is_none(),
            "{} lock held by another process was ignored",
            kind_name(kind)
        );
        holder.release();
        assert!(
            UidLock::try_acquire(dir.path(), 30004).unwrap().is_some(),
            "uid stayed busy after the other process ({}) exited",
            kind_name(kind)
        );
    }
}

#[test]
fn threads_never_hold_one_uid_together() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let holders = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    let wins = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..6)
        .map(|_| {
            let (dir, holders, max, wins) =
                (dir.clone(), holders.clone(), max.clone(), wins.clone());
            std::thread::spawn(move || {
                for _ in 0..300 {
                    if let Some(lock) = UidLock::try_acquire(dir.path(), 30005).unwrap() {
                        let now = holders.fetch_add(1, Ordering::SeqCst) + 1;
                        max.fetch_max(now, Ordering::SeqCst);
                        wins.fetch_add(1, Ordering::SeqCst);
                        std::thread::yield_now();
                        holders.fetch_sub(1, Ordering::SeqCst);
                        drop(lock);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(max.load(Ordering::SeqCst), 1);
    assert!(wins.load(Ordering::SeqCst) > 0);
}

#[test]
fn store_permission_check() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let gid = std::fs::metadata(p).unwrap().gid();
    let set =
        |mode: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();

    set(0o1775);
    check_store_permissions(p, gid).unwrap();
    set(0o1770);
    check_store_permissions(p, gid).unwrap();

    let expected = format!(
        "builder does not have write permission to '{0}'; try 'chgrp {1} {0}; chmod 1775 {0}'",
        p.display(),
        gid
    );
    for bad in [0o0775, 0o1755, 0o1745, 0o0755] {
        set(bad);
        let err = check_store_permissions(p, gid).unwrap_err();
        assert_eq!(err.to_string(), expected, "mode {bad:o}");
    }
    set(0o1775);
    let other = gid.wrapping_add(1);
    let err = check_store_permissions(p, other).unwrap_err();
    assert!(matches!(err, UserPoolError::StorePermissions { gid, .. } if gid == other));

    let missing = p.join("no-store");
    let err = check_store_permissions(&missing, gid).unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("cannot stat '{}': ", missing.display())),
        "{err}"
    );
}

#[test]
fn killing_root_is_refused() {
    let err = kill_user(0).unwrap_err();
    assert_eq!(err.to_string(), "refusing to kill all processes of uid 0");
}

#[test]
fn auto_uids_come_in_blocks_locked_per_build_also_against_another_process() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let cfg = AutoUidConfig {
        state_dir: dir.path().to_path_buf(),
        start_id: DEFAULT_START_ID,
        id_count: 3 * IDS_PER_BUILD,
    };
    let a = acquire_auto(&cfg).unwrap().expect("a block");
    let b = acquire_auto(&cfg).unwrap().expect("a second block");
    assert_eq!((a.first, a.count), (872_415_232, 65536));
    assert_eq!(b.first, 872_415_232 + 65536);
    assert_eq!(a.lock_path(), dir.path().join("userpool2/slot-0"));
    // The third slot held by another process (as Nix 2.12+ would hold it): none left.
    let other = hold_in_child(&dir.path().join("userpool2/slot-2"), Kind::Flock);
    assert!(acquire_auto(&cfg).unwrap().is_none());
    assert_eq!(
        acquire_auto_or_fail(&cfg).unwrap_err().to_string(),
        "all 3 blocks of automatically allocated uids (from 872415232, 'id-count' 196608) are in use"
    );
    // A released block is handed out again.
    drop(a);
    assert_eq!(
        acquire_auto(&cfg).unwrap().expect("slot 0 again").first,
        872_415_232
    );
    other.release();

    for (start_id, id_count, reason) in [
        (0, IDS_PER_BUILD, "uid 0 is root's"),
        (1000, 100, "fewer ids than one build needs (65536)"),
        (
            u32::MAX - 10,
            IDS_PER_BUILD,
            "the range goes past the largest uid",
        ),
    ] {
        let cfg = AutoUidConfig {
            state_dir: dir.path().to_path_buf(),
            start_id,
            id_count,
        };
        let e = acquire_auto(&cfg).unwrap_err().to_string();
        assert!(e.ends_with(reason), "{e}");
    }
}
