//! A cgroup v2 per build: every process of the builder in it, killed as one (`cgroup.kill`)
//! and removed once the builder is gone, and its CPU, memory and I/O figures.
//!
//! ```text
//! <cgroup2 mount><this process's cgroup>/nixb-<pid>-<n>/     one per build, made by
//!                                                           [`CgroupRoot::create`]
//! ```
//!
//! The builder enters its cgroup itself, as the first step of its plan (it writes `0` to
//! `cgroup.procs`), so it is there before it can fork. Nothing it starts can leave: a
//! process can only be moved by someone with write access to the common ancestor's
//! `cgroup.procs`, which the builder (a build user, or a namespace's mapped caller without
//! capabilities) does not have. After the builder is reaped, `cgroup.kill` takes whatever is
//! left (a daemon that left the process group and the session), the cgroup's
//! `cgroup.events` is watched until it says `populated 0`, and the directory is removed.
//!
//! Where there is no cgroup v2 hierarchy, or this process may not make cgroups below its own
//! (not root, no delegation), [`CgroupRoot::open`] says why and the caller keeps the
//! process-group kill.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
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

/// This process's own cgroup v2 directory, below which each build gets one.
#[derive(Clone, Debug)]
pub struct CgroupRoot {
    dir: PathBuf,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

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
        let root = CgroupRoot { dir };
        let probe = root.create()?;
        let _ = std::fs::remove_dir(&probe);
        Ok(root)
    }

    /// The directory builds' cgroups are made in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A new, empty cgroup for one build.
    pub fn create(&self) -> Result<PathBuf, CgroupError> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("nixb-{}-{n}", std::process::id()));
        std::fs::create_dir(&path).map_err(|e| CgroupError::Create {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Ok(path)
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

pub(crate) fn read_usage(dir: &Path) -> CgroupUsage {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    let cpu = read("cpu.stat");
    let io = read("io.stat");
    let us = |k: &str| {
        cpu.as_deref()
            .and_then(|t| field(t, k))
            .map(Duration::from_micros)
    };
    CgroupUsage {
        user: us("user_usec"),
        system: us("system_usec"),
        peak_memory: read("memory.peak").and_then(|t| t.trim().parse().ok()),
        read_bytes: io.as_deref().and_then(|t| field(t, "rbytes")),
        written_bytes: io.as_deref().and_then(|t| field(t, "wbytes")),
    }
}

/// SIGKILLs every process in the cgroup (`cgroup.kill`, Linux 5.14). Returns whether the
/// kernel took the request.
pub(crate) fn kill(dir: &Path) -> bool {
    std::fs::write(dir.join("cgroup.kill"), "1").is_ok()
}

/// Kills what is left in the cgroup, waits (on `cgroup.events`, up to `limit`) until it is
/// empty, reads what it used (every process in it has then been charged), and removes it.
/// The figures, and whether the cgroup is gone.
pub(crate) fn finish(dir: &Path, limit: Duration) -> (CgroupUsage, bool) {
    let deadline = Instant::now() + limit;
    if let Ok(f) = std::fs::File::open(dir.join("cgroup.events")) {
        let mut killed = false;
        loop {
            let populated = std::fs::read_to_string(dir.join("cgroup.events"))
                .map(|t| t.lines().any(|l| l == "populated 1"))
                .unwrap_or(false);
            let now = Instant::now();
            if !populated || now >= deadline {
                break;
            }
            // Only when something is left: the usual builder leaves nothing, and the write
            // is one of the dearer calls here.
            if !killed {
                kill(dir);
                killed = true;
                continue;
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
    let gone = match std::fs::remove_dir(dir) {
        Ok(()) => true,
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    };
    (usage, gone)
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
}
