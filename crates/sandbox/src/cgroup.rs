//! A cgroup v2 per build: every process of the builder in it, killed as one (`cgroup.kill`)
//! and removed once the builder is gone, and its CPU, memory and I/O figures.
//!
//! ```text
//! <cgroup2 mount><this process's cgroup>/nixb-<pid>-<n>/     one per build, made by
//!                                                           [`CgroupRoot::create`]
//! ```
//!
//! The builder is born in its cgroup (`clone3` with `CLONE_INTO_CGROUP`, Linux 5.7, x86_64);
//! on older kernels, or where a seccomp filter hides `clone3`, it enters the cgroup itself as
//! the first step of its plan (it writes `0` to `cgroup.procs`), so it is there before it can
//! fork ([`CgroupEntry`] says which way a builder took). Nothing it starts can leave: a
//! process can only be moved by someone with write access to the common ancestor's
//! `cgroup.procs`, which the builder (a build user, or a namespace's mapped caller without
//! capabilities) does not have. After the builder is reaped, `cgroup.kill` takes whatever is
//! left (a daemon that left the process group and the session), the cgroup's
//! `cgroup.events` is watched until it says `populated 0`, and the directory is removed.
//!
//! Making and removing a cgroup are the dear steps (the kernel sets up and tears down every
//! enabled controller's state), so neither is on a build's path: each [`CgroupRoot`] keeps
//! [`SPARES`] cgroups made ahead by a helper thread, which also removes the cgroups of reaped
//! builders. What is left of both when the process exits is removed by an `atexit` handler;
//! a process killed outright leaves its empty spares, which the next [`CgroupRoot::open`] in
//! the same directory removes.
//!
//! Where there is no cgroup v2 hierarchy, or this process may not make cgroups below its own
//! (not root, no delegation), [`CgroupRoot::open`] says why and the caller keeps the
//! process-group kill.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Why builds cannot get cgroups here.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 hierarchy is mounted (/proc/self/mountinfo has no cgroup2)")]
    NoHierarchy,
    #[error("this process's cgroup v2 path is not in /proc/self/cgroup")]
    NoOwnCgroup,
    #[error("cannot create cgroup {path}: {reason} (cgroup v2 not delegated to this user?)")]
    Create { path: PathBuf, reason: String },
}

/// How a builder got into its cgroup ([`crate::Builder::cgroup_entry`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupEntry {
    /// Born in it: `clone3(CLONE_INTO_CGROUP)`.
    Clone3,
    /// It wrote its pid to the cgroup's `cgroup.procs` as its first step. `refused` is what
    /// the kernel answered `clone3(CLONE_INTO_CGROUP)` with in this process (`ENOSYS`: no
    /// `clone3`; `E2BIG` or `EINVAL`: no such flag, before Linux 5.7); `None` where it was not
    /// asked (not x86_64, or turned off by [`set_clone_into_cgroup`]).
    Procs { refused: Option<nix::errno::Errno> },
}

impl std::fmt::Display for CgroupEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CgroupEntry::Clone3 => write!(f, "born in it by clone3(CLONE_INTO_CGROUP)"),
            CgroupEntry::Procs { refused: Some(e) } => write!(
                f,
                "moved in by its own write to cgroup.procs (clone3(CLONE_INTO_CGROUP): {e})"
            ),
            CgroupEntry::Procs { refused: None } => {
                write!(f, "moved in by its own write to cgroup.procs")
            }
        }
    }
}

/// Whether builders are cloned into their cgroups: 0 yes, -1 turned off
/// ([`set_clone_into_cgroup`]), otherwise the errno the kernel refused the flag with.
static CLONE_INTO: AtomicI32 = AtomicI32::new(0);

/// Whether to ask for `clone3(CLONE_INTO_CGROUP)`; otherwise what the kernel answered before.
pub(crate) fn clone_into_allowed() -> Result<(), Option<nix::errno::Errno>> {
    if !crate::sys::CLONE3_AVAILABLE {
        return Err(None);
    }
    match CLONE_INTO.load(Ordering::Relaxed) {
        0 => Ok(()),
        -1 => Err(None),
        e => Err(Some(nix::errno::Errno::from_raw(e))),
    }
}

/// The kernel has no `clone3` or no `CLONE_INTO_CGROUP`: do not ask again in this process.
pub(crate) fn clone_into_refused(e: nix::errno::Errno) {
    let _ = CLONE_INTO.compare_exchange(0, e as i32, Ordering::Relaxed, Ordering::Relaxed);
}

/// Whether builders may be born in their cgroups (`clone3(CLONE_INTO_CGROUP)`, the default)
/// or must move themselves in by writing `cgroup.procs`, as where the kernel lacks the flag.
/// Process-wide; for `cargo xtask bench sandbox`, which measures both, and for the tests of
/// the fallback.
#[doc(hidden)]
pub fn set_clone_into_cgroup(allowed: bool) {
    CLONE_INTO.store(if allowed { 0 } else { -1 }, Ordering::Relaxed);
}

/// This process's own cgroup v2 directory, below which each build gets one.
#[derive(Clone, Debug)]
pub struct CgroupRoot {
    dir: PathBuf,
    helper: Arc<Helper>,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

/// How many empty cgroups each root keeps ready.
pub const SPARES: usize = 2;

/// The helper thread's work, shared with [`CgroupRoot::create`], [`retire`] and the exit
/// handler.
#[derive(Debug)]
struct Helper {
    /// The process the helper thread runs in: a forked child has no such thread, and must
    /// neither take nor remove its parent's spares.
    pid: u32,
    dir: PathBuf,
    state: Mutex<HelperState>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct HelperState {
    /// Made and unused.
    ready: Vec<PathBuf>,
    /// Emptied, to remove.
    doomed: Vec<PathBuf>,
    /// The thread is making or removing one right now.
    busy: bool,
    /// The process is exiting: make no more.
    closed: bool,
    /// Making failed once: stop trying ahead (create reports the error itself).
    failing: bool,
}

/// Every root's helper, for the exit handler and for [`retire`].
static HELPERS: Mutex<Vec<Arc<Helper>>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere while holding it leaves plain data behind; go on with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn make(dir: &Path) -> Result<PathBuf, CgroupError> {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!("nixb-{}-{n}", std::process::id()));
    std::fs::create_dir(&path).map_err(|e| CgroupError::Create {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    Ok(path)
}

impl Helper {
    fn run(&self) {
        let mut st = lock(&self.state);
        loop {
            if st.closed {
                return;
            }
            if let Some(dir) = st.doomed.pop() {
                st.busy = true;
                drop(st);
                let _ = std::fs::remove_dir(&dir);
                st = lock(&self.state);
                st.busy = false;
                self.wake.notify_all();
                continue;
            }
            if st.ready.len() < SPARES && !st.failing {
                st.busy = true;
                drop(st);
                let made = make(&self.dir);
                st = lock(&self.state);
                st.busy = false;
                match made {
                    Ok(p) if st.closed => {
                        let _ = std::fs::remove_dir(&p);
                    }
                    Ok(p) => st.ready.push(p),
                    Err(_) => st.failing = true,
                }
                self.wake.notify_all();
                continue;
            }
            st = self.wake.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// At exit: stop the thread, wait for what it is doing, remove what is left.
    fn close(&self) {
        let mut st = lock(&self.state);
        st.closed = true;
        self.wake.notify_all();
        while st.busy {
            st = self.wake.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        let mut left = std::mem::take(&mut st.ready);
        left.append(&mut st.doomed);
        drop(st);
        for d in left {
            let _ = std::fs::remove_dir(d);
        }
    }
}

impl Helper {
    fn ours(&self) -> bool {
        self.pid == std::process::id()
    }
}

extern "C" fn close_all_helpers() {
    // try_lock: an exit from inside a holder of the list (it is held only briefly and never
    // across a call that could exit) must not deadlock.
    if let Ok(list) = HELPERS.try_lock() {
        for h in list.iter().filter(|h| h.ours()) {
            h.close();
        }
    }
}

/// Waits until the helpers are idle: every cgroup handed over for removal in this process
/// removed, the spares made. For tests that look at the hierarchy right after a build
/// (what is then left of this process's is [`spare_cgroups`]).
pub fn settle_cgroups() {
    let helpers: Vec<Arc<Helper>> = lock(&HELPERS).clone();
    for h in helpers.iter().filter(|h| h.ours()) {
        let mut st = lock(&h.state);
        while !st.closed
            && (st.busy || !st.doomed.is_empty() || (st.ready.len() < SPARES && !st.failing))
        {
            st = h.wake.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// The spare cgroups made ahead in this process (empty, unused).
pub fn spare_cgroups() -> Vec<PathBuf> {
    let helpers: Vec<Arc<Helper>> = lock(&HELPERS).clone();
    let mut out = Vec::new();
    for h in helpers.iter().filter(|h| h.ours()) {
        let st = lock(&h.state);
        out.extend(st.ready.iter().cloned());
    }
    out
}

/// Hands the cgroup of a reaped builder (emptied, its figures read) to its root's helper for
/// removal; removes it at once when it has none.
pub(crate) fn retire(dir: PathBuf) {
    let helper = dir.parent().and_then(|parent| {
        lock(&HELPERS)
            .iter()
            .find(|h| h.dir == parent && h.ours())
            .cloned()
    });
    match helper {
        Some(h) => {
            let mut st = lock(&h.state);
            if st.closed {
                drop(st);
                let _ = std::fs::remove_dir(&dir);
            } else {
                st.doomed.push(dir);
                h.wake.notify_all();
            }
        }
        None => {
            let _ = std::fs::remove_dir(&dir);
        }
    }
}

/// Removes the empty `nixb-<pid>-<n>` cgroups in `dir` of processes that are gone (spares
/// of a process killed outright). A cgroup with processes in it is never removed by rmdir.
fn remove_stale(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("nixb-"))
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

impl CgroupRoot {
    /// This process's cgroup in the cgroup v2 hierarchy, if one is mounted and this process
    /// can make cgroups in it (tried once, with a cgroup made and removed again).
    pub fn open() -> Result<CgroupRoot, CgroupError> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|_| CgroupError::NoHierarchy)?;
        let mount = cgroup2_mount(&mountinfo).ok_or(CgroupError::NoHierarchy)?;
        let own =
            std::fs::read_to_string("/proc/self/cgroup").map_err(|_| CgroupError::NoOwnCgroup)?;
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or(CgroupError::NoOwnCgroup)?;
        let dir = mount.join(rel.trim_start_matches('/'));
        remove_stale(&dir);
        // The probe is the first spare.
        let probe = make(&dir)?;
        let helper = Arc::new(Helper {
            pid: std::process::id(),
            dir: dir.clone(),
            state: Mutex::new(HelperState {
                ready: vec![probe],
                ..HelperState::default()
            }),
            wake: Condvar::new(),
        });
        static AT_EXIT: std::sync::Once = std::sync::Once::new();
        AT_EXIT.call_once(|| {
            // SAFETY: registering a handler that takes only Rust locks and makes syscalls.
            unsafe { libc::atexit(close_all_helpers) };
        });
        lock(&HELPERS).push(helper.clone());
        let h = helper.clone();
        if std::thread::Builder::new()
            .name("nixb-cgroups".into())
            .spawn(move || h.run())
            .is_err()
        {
            // No helper: create and retire make and remove inline.
            lock(&helper.state).failing = true;
        }
        Ok(CgroupRoot { dir, helper })
    }

    /// The directory builds' cgroups are made in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A new, empty cgroup for one build: a spare made ahead when there is one (the helper
    /// then makes the next), otherwise made now.
    pub fn create(&self) -> Result<PathBuf, CgroupError> {
        if !self.helper.ours() {
            return make(&self.dir);
        }
        let spare = {
            let mut st = lock(&self.helper.state);
            let spare = st.ready.pop();
            st.failing = false;
            self.helper.wake.notify_all();
            spare
        };
        match spare {
            Some(p) => Ok(p),
            None => make(&self.dir),
        }
    }
}

/// The mount point of the cgroup2 file system in a `/proc/self/mountinfo` text.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape(mount_point)))
    })
}

/// mountinfo escapes blanks and backslashes as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What the cgroup's own files say was used; `None` fields where the controller is off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CgroupUsage {
    pub user: Option<Duration>,
    pub system: Option<Duration>,
    pub peak_memory: Option<u64>,
    pub read_bytes: Option<u64>,
    pub written_bytes: Option<u64>,
}

/// `key value` lines (cpu.stat) or `dev key=value ...` lines summed per key (io.stat).
fn field(text: &str, key: &str) -> Option<u64> {
    let mut sum = None;
    for word in text.split_whitespace() {
        if let Some(v) = word.strip_prefix(key).and_then(|r| r.strip_prefix('=')) {
            *sum.get_or_insert(0) += v.parse::<u64>().ok()?;
        }
    }
    if sum.is_some() {
        return sum;
    }
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The cgroup's figures. Bytes written are those the cgroup's writes sent to a device
/// (`io.stat`'s `wbytes`) plus those still waiting in the page cache to be sent
/// (`memory.stat`'s `file_dirty`): the kernel writes dirty pages back seconds after the
/// build, so `wbytes` alone would miss most of what a short build wrote, while the
/// rusage's figure counts at the dirtying too.
pub(crate) fn read_usage(dir: &Path) -> CgroupUsage {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    let cpu = read("cpu.stat");
    let io = read("io.stat");
    // memory.stat is long and the dearest of these to make: only for the bytes written,
    // which need io.stat too.
    let dirty = io
        .as_ref()
        .and_then(|_| read("memory.stat"))
        .and_then(|t| field(&t, "file_dirty"));
    let us = |k: &str| {
        cpu.as_deref()
            .and_then(|t| field(t, k))
            .map(Duration::from_micros)
    };
    CgroupUsage {
        user: us("user_usec"),
        system: us("system_usec"),
        peak_memory: read("memory.peak").and_then(|t| t.trim().parse().ok()),
        read_bytes: io.as_deref().map(|t| field(t, "rbytes").unwrap_or(0)),
        // An io.stat without lines: the cgroup sent nothing to any device yet.
        written_bytes: io
            .as_deref()
            .map(|t| field(t, "wbytes").unwrap_or(0) + dirty.unwrap_or(0)),
    }
}

/// SIGKILLs every process in the cgroup (`cgroup.kill`, Linux 5.14). Returns whether the
/// kernel took the request.
pub(crate) fn kill(dir: &Path) -> bool {
    std::fs::write(dir.join("cgroup.kill"), "1").is_ok()
}

/// Kills what is left in the cgroup, waits (on `cgroup.events`, up to `limit`) until it is
/// empty, and reads what it used (every process in it has then been charged). The figures,
/// and whether it is empty (then [`retire`] it).
pub(crate) fn finish(dir: &Path, limit: Duration) -> (CgroupUsage, bool) {
    // The usual builder leaves nothing: one look at cgroup.events says so, and then there is
    // nothing to kill, watch or look at again (an empty cgroup that nobody can move a
    // process into stays empty).
    if !populated(dir) {
        return (read_usage(dir), true);
    }
    let deadline = Instant::now() + limit;
    if let Ok(f) = std::fs::File::open(dir.join("cgroup.events")) {
        kill(dir);
        loop {
            let now = Instant::now();
            if !populated(dir) || now >= deadline {
                break;
            }
            // The kernel signals a change of cgroup.events with POLLPRI.
            let mut pfd = libc::pollfd {
                fd: f.as_raw_fd(),
                events: libc::POLLPRI,
                revents: 0,
            };
            let ms = (deadline - now).as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one pollfd on our stack, a descriptor we own.
            unsafe { libc::poll(&mut pfd, 1, ms) };
        }
    } else {
        // Nothing to watch: kill whatever may be left anyway.
        kill(dir);
    }
    let usage = read_usage(dir);
    (usage, !populated(dir))
}

fn populated(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events"))
        .map(|t| t.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_point_and_stat_fields() {
        let mi = "24 1 0:21 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
                  35 1 0:30 / /sys/fs/cgroup/uni\\040fied rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(mi),
            Some(PathBuf::from("/sys/fs/cgroup/uni fied"))
        );
        assert_eq!(
            cgroup2_mount("24 1 0:21 / /x rw - ext4 /dev/vda rw\n"),
            None
        );
        let cpu = "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n";
        assert_eq!(field(cpu, "user_usec"), Some(1000));
        assert_eq!(field(cpu, "system_usec"), Some(500));
        let io = "8:0 rbytes=4096 wbytes=100 rios=1 wios=1\n8:16 rbytes=1 wbytes=50000000 rios=0\n";
        assert_eq!(field(io, "rbytes"), Some(4097));
        assert_eq!(field(io, "wbytes"), Some(50_000_100));
        assert_eq!(field(io, "dbytes"), None);
    }

    #[test]
    fn bytes_written_are_sent_plus_dirty() {
        let dir = tempfile::tempdir().unwrap();
        let put = |f: &str, t: &str| std::fs::write(dir.path().join(f), t).unwrap();
        // No io controller: no figure (the rusage's is used).
        put(
            "memory.stat",
            "anon 4096\nfile_dirty 3000\nfile_writeback 7\n",
        );
        assert_eq!(read_usage(dir.path()).written_bytes, None);
        // Nothing sent yet: what waits in the page cache.
        put("io.stat", "");
        let u = read_usage(dir.path());
        assert_eq!((u.written_bytes, u.read_bytes), (Some(3000), Some(0)));
        put(
            "io.stat",
            "254:0 rbytes=10 wbytes=500 rios=1 wios=1 dbytes=0 dios=0\n",
        );
        let u = read_usage(dir.path());
        assert_eq!((u.written_bytes, u.read_bytes), (Some(3500), Some(10)));
        put("memory.peak", "209715200\n");
        assert_eq!(read_usage(dir.path()).peak_memory, Some(209_715_200));
    }
}
