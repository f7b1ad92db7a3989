//! A watchdog process that kills the worker's builders if the worker dies, however it dies.
//!
//! Builders run in their own sessions (so that a timeout can kill a whole process group),
//! which also means nothing takes them down with the worker: after a SIGKILL of nixb they
//! would go on writing into the store. The watchdog closes that hole without help from
//! the kernel's per-process death signal (which reaches only the builder itself, not what
//! it forked):
//!
//! ```text
//! worker  --pipe-->  watchdog (forked once per worker, before any builder)
//!   "+<pid>\n"       a builder was started: it leads a process group of that id
//!                    (it called setsid) and may be the init of a PID namespace
//!   "-<pid>\n"       it was reaped; forget it (its id may be reused)
//!   end-of-file      the worker is gone (exit or crash): SIGKILL every group still
//!                    listed, and its leader by pid (for a chroot builder that is the
//!                    namespace's init: everything in it dies with it, including
//!                    descendants that left the group)
//! ```
//!
//! A sandboxed builder writes its own `+` line on the pipe, as the first thing it does after
//! the clone (`SandboxSpec::announce`): the worker may die between the clone and the return
//! of `nixb_sandbox::start`, and the child's copy of the pipe keeps the watchdog from seeing
//! the end of file until the line is in (the child closes it right after). The worker still
//! writes `+` after `start` returned, for every child (those it starts itself, a substituter
//! or the build hook, have no other): a pid already listed is not listed twice, so the one
//! `-` after the reaping forgets it. A retraction `-` for a child that a failing `start` has
//! reaped comes from the sandbox crate.
//!
//! A reaped group's `-` line waits in the worker and goes out in one write with the next
//! `+` line (or when the worker lets go of the watchdog): one write and one wake-up of the
//! watchdog per build instead of two, which under load was a preemption of the worker's
//! thread per message. Until then the watchdog still lists a group that is gone; were the
//! worker to die in that moment, it would signal a process group id nobody has, unless
//! the kernel handed the very same id to a new group meanwhile, which needs the pid
//! counter to wrap around in those few milliseconds (the same window as between the
//! reaping and the write before).
//!
//! The watchdog is a plain `fork` of the worker that never returns to Rust code: it runs a
//! loop of raw `read`/`kill` syscalls over buffers prepared before the fork (the worker
//! may have other threads, e.g. log compressors, whose locks a forked child must not
//! touch). It closes every other descriptor first, so that it holds no lock of the
//! worker's alive, and ignores terminal signals, so that Ctrl-C on nixb cannot take the
//! watchdog down before it has done its job.

use std::io::Write;
use std::os::fd::AsRawFd;

/// Most process groups tracked at once; far above any sensible max-jobs.
const MAX_GROUPS: usize = 4096;

/// The worker's end of the watchdog pipe. Dropping it (or dying) lets the watchdog act.
pub(crate) struct Watchdog {
    pipe: Option<std::fs::File>,
    pid: nix::unistd::Pid,
    /// `-` lines not sent yet (see the module documentation).
    reaped: String,
}

/// The watchdog could not be started.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WatchdogError {
    #[error("no watchdog: builders would outlive nixb if it crashed: {step}: {errno}")]
    Start {
        step: &'static str,
        errno: nix::errno::Errno,
    },
}

impl Watchdog {
    /// Forks the watchdog. On failure builds can still run, just without the guard: the
    /// caller says so.
    pub fn start() -> Result<Watchdog, WatchdogError> {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|errno| {
            WatchdogError::Start {
                step: "creating its pipe",
                errno,
            }
        })?;
        // Everything the child touches is allocated here, before the fork.
        let mut state = Box::new(ChildState {
            buf: [0u8; 4096],
            groups: [0; MAX_GROUPS],
        });
        let read_fd = read.as_raw_fd();
        let write_fd = write.as_raw_fd();
        // SAFETY: the child only runs `watchdog_main`, which makes raw syscalls on memory
        // allocated above and never returns.
        match unsafe { nix::unistd::fork() } {
            Err(errno) => Err(WatchdogError::Start {
                step: "forking",
                errno,
            }),
            // SAFETY: in the forked child, which runs only `watchdog_main` (see the fork above).
            Ok(nix::unistd::ForkResult::Child) => unsafe {
                watchdog_main(read_fd, write_fd, &mut state)
            },
            Ok(nix::unistd::ForkResult::Parent { child }) => {
                drop(read);
                Ok(Watchdog {
                    pipe: Some(std::fs::File::from(write)),
                    pid: child,
                    reaped: String::new(),
                })
            }
        }
    }

    /// The pipe's write end, on which a builder announces itself (`SandboxSpec::announce`).
    /// Close-on-exec: a builder's copy goes at the latest with its exec.
    pub fn announce_fd(&self) -> Option<std::os::fd::RawFd> {
        self.pipe.as_ref().map(|p| p.as_raw_fd())
    }

    /// Sends the pending `-` lines, then `extra`.
    fn send(&mut self, extra: &str) {
        let mut msg = std::mem::take(&mut self.reaped);
        msg.push_str(extra);
        if let Some(p) = self.pipe.as_mut() {
            // A failed write means the watchdog is gone; nothing better to do than go on.
            let _ = p.write_all(msg.as_bytes());
        }
    }

    pub fn builder_started(&mut self, pgid: i32) {
        self.send(&format!("+{pgid}\n"));
    }

    /// Noted now, sent with the next start (see the module documentation).
    pub fn builder_reaped(&mut self, pgid: i32) {
        use std::fmt::Write as _;
        let _ = writeln!(self.reaped, "-{pgid}");
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Every builder is reaped by now: once told so, the list is empty and the watchdog
        // just exits.
        if !self.reaped.is_empty() {
            self.send("");
        }
        self.pipe = None;
        // Reaping our own child; it exits once the pipe is closed.
        let _ = nix::sys::wait::waitpid(self.pid, None);
    }
}

struct ChildState {
    buf: [u8; 4096],
    groups: [i32; MAX_GROUPS],
}

/// The watchdog's whole life. Raw syscalls only.
unsafe fn watchdog_main(read_fd: i32, write_fd: i32, st: &mut ChildState) -> ! {
    libc::close(write_fd);
    // Keep only the pipe, as fd 0: close everything else, including the worker's lock files.
    if read_fd != 0 {
        libc::dup2(read_fd, 0);
    }
    libc::syscall(libc::SYS_close_range, 1u32, u32::MAX, 0u32);
    for sig in [
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGPIPE,
    ] {
        libc::signal(sig, libc::SIG_IGN);
    }
    let mut n_groups = 0usize;
    let mut sign: u8 = 0;
    let mut num: i32 = 0;
    loop {
        let r = libc::read(0, st.buf.as_mut_ptr().cast(), st.buf.len());
        if r < 0 {
            if *libc::__errno_location() == libc::EINTR {
                continue;
            }
            break;
        }
        if r == 0 {
            break;
        }
        for i in 0..r as usize {
            let c = st.buf[i];
            match c {
                b'+' | b'-' => {
                    sign = c;
                    num = 0;
                }
                b'0'..=b'9' => num = num.saturating_mul(10).saturating_add((c - b'0') as i32),
                b'\n' => {
                    // Listed once however often announced (by the builder and the worker).
                    if sign == b'+'
                        && n_groups < MAX_GROUPS
                        && num > 1
                        && !st.groups[..n_groups].contains(&num)
                    {
                        st.groups[n_groups] = num;
                        n_groups += 1;
                    } else if sign == b'-' {
                        if let Some(j) = st.groups[..n_groups].iter().position(|&g| g == num) {
                            st.groups[j] = st.groups[n_groups - 1];
                            n_groups -= 1;
                        }
                    }
                    sign = 0;
                }
                _ => {}
            }
        }
    }
    for &g in &st.groups[..n_groups] {
        // The group reaches a plain builder's descendants; the leader by pid reaches a
        // chroot builder's whole PID namespace (its init), and a builder killed before its
        // setsid, which had no group yet and had forked nothing (ESRCH for the group then).
        libc::kill(-g, libc::SIGKILL);
        libc::kill(g, libc::SIGKILL);
    }
    libc::_exit(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    use std::process::{Child, Command};

    /// `sleep` leading a process group of its own (pgid = pid), as a builder does.
    fn group() -> Child {
        Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .expect("spawning sleep")
    }

    /// When the worker lets go of the watchdog, a group whose reaping was noted (its `-`
    /// line still waiting in the worker) is left alone, and a group still listed is killed,
    /// as after a crash.
    #[test]
    fn a_noted_reaping_reaches_the_watchdog_before_it_acts() {
        let mut gone = group();
        let mut live = group();
        let mut wd = Watchdog::start().expect("starting the watchdog");
        wd.builder_started(gone.id() as i32);
        wd.builder_started(live.id() as i32);
        wd.builder_reaped(gone.id() as i32);
        assert!(!wd.reaped.is_empty(), "the '-' line is held back");
        // Waits for the watchdog, which signals before it exits.
        drop(wd);
        let status = live.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
        assert!(
            gone.try_wait().unwrap().is_none(),
            "a group noted as reaped was killed"
        );
        gone.kill().unwrap();
        gone.wait().unwrap();
    }

    /// The held-back line goes out with the next start, in one write.
    #[test]
    fn a_noted_reaping_goes_out_with_the_next_start() {
        let mut gone = group();
        let mut next = group();
        let mut wd = Watchdog::start().expect("starting the watchdog");
        wd.builder_started(gone.id() as i32);
        wd.builder_reaped(gone.id() as i32);
        wd.builder_started(next.id() as i32);
        assert!(wd.reaped.is_empty());
        // Simulate a crash: close the pipe without the orderly drop.
        wd.pipe = None;
        let status = next.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
        assert!(gone.try_wait().unwrap().is_none());
        gone.kill().unwrap();
        gone.wait().unwrap();
    }
    /// A builder announced before its setsid leads no group yet: it is killed by its pid.
    /// And a pid announced twice (by the builder and by the worker) is forgotten with one
    /// `-`: another started later with the same two lines is still killed.
    #[test]
    fn a_listed_pid_that_leads_no_group_is_killed_and_doubles_count_once() {
        let mut not_leader = Command::new("sleep").arg("30").spawn().unwrap();
        let mut gone = group();
        let mut wd = Watchdog::start().expect("starting the watchdog");
        wd.send(&format!("+{}\n", gone.id()));
        wd.builder_started(gone.id() as i32);
        wd.builder_reaped(gone.id() as i32);
        wd.send(&format!("+{}\n", not_leader.id()));
        wd.builder_started(not_leader.id() as i32);
        wd.pipe = None;
        let status = not_leader.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(
            gone.try_wait().unwrap().is_none(),
            "a pid announced twice and reaped once was killed"
        );
        gone.kill().unwrap();
        gone.wait().unwrap();
    }

    /// Set in the re-executed test binary that plays the worker: "plain", or "chroot" with
    /// the scratch directory in [`SCRATCH_ENV`].
    const WORKER_ENV: &str = "NIXB_WATCHDOG_TEST_WORKER";
    const SCRATCH_ENV: &str = "NIXB_WATCHDOG_TEST_SCRATCH";
    /// In the environment of the builder and of everything it starts, so that survivors can
    /// be found whatever their pids.
    const TOKEN_ENV: &str = "NIXB_WATCHDOG_TEST_TOKEN";

    /// The worker's side: the watchdog, a builder that announces itself on its pipe, and a
    /// SIGKILL right after `start` returned, before `builder_started` (the worker's own `+`
    /// line) could run: the window that only the builder's announcement covers. Test-only
    /// code, reached through the environment variables above and a re-executed test binary.
    fn worker_that_dies_right_after_start(mode: &str) -> ! {
        let wd = Watchdog::start().expect("starting the watchdog");
        let (_log_r, log_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let token = std::env::var_os(TOKEN_ENV).expect("token");
        let script = if mode == "chroot" {
            "setsid sleep 1000 & sleep 1000 & sleep 1000"
        } else {
            "sleep 1000 & sleep 1000"
        };
        let (isolation, cwd) = if mode == "chroot" {
            let scratch = std::path::PathBuf::from(std::env::var_os(SCRATCH_ENV).unwrap());
            let build = scratch.join("build");
            std::fs::create_dir(&build).unwrap();
            let mut c = nixb_sandbox::ChrootSpec::new(
                scratch.join("root"),
                "/nix/store".into(),
                build.clone(),
                0,
                0,
            );
            for d in ["/bin", "/usr"] {
                c.binds.push(nixb_sandbox::BindMount::same(d).read_only());
            }
            for d in ["/lib", "/lib64"] {
                c.binds
                    .push(nixb_sandbox::BindMount::same(d).read_only().optional());
            }
            (nixb_sandbox::Isolation::Chroot(c), build)
        } else {
            (nixb_sandbox::Isolation::Plain, "/".into())
        };
        let spec = nixb_sandbox::SandboxSpec {
            program: "/bin/sh".into(),
            // In a chroot, also a child that leaves the builder's session: only the end of
            // the PID namespace takes it (in plain mode nothing would: that is the build
            // user's kill-all, not the watchdog's).
            args: vec!["-c".into(), script.into()],
            env: vec![
                ("PATH".into(), "/usr/bin:/bin".into()),
                (TOKEN_ENV.into(), token),
            ],
            cwd,
            log_fd: log_w,
            user: None,
            personality: Default::default(),
            isolation,
            announce: wd.announce_fd(),
            cgroup: None,
        };
        let builder = nixb_sandbox::start(spec).expect("starting the builder");
        // Nothing of ours may take the builder down: no drop, no kill.
        std::mem::forget(builder);
        // SAFETY: kill(2) of ourselves.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        unreachable!("SIGKILLed")
    }

    /// Live (not zombie) processes whose environment holds `TOKEN_ENV=token`.
    fn carrying(token: &str) -> Vec<i32> {
        let needle = format!("{TOKEN_ENV}={token}");
        let mut found = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            if env.split(|&b| b == 0).any(|v| v == needle.as_bytes()) {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let zombie = stat
                    .rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
                if !zombie {
                    found.push(pid);
                }
            }
        }
        found
    }

    fn builder_dies_with_a_worker_killed_right_after_start(test: &str, mode: &str) {
        if let Ok(m) = std::env::var(WORKER_ENV) {
            worker_that_dies_right_after_start(&m);
        }
        let scratch = tempfile::tempdir().unwrap();
        let token = format!("{}-{}", std::process::id(), mode);
        let status = Command::new(std::env::current_exe().unwrap())
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(WORKER_ENV, mode)
            .env(SCRATCH_ENV, scratch.path())
            .env(TOKEN_ENV, &token)
            .status()
            .unwrap();
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "the worker: {status:?}"
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let left = carrying(&token);
            if left.is_empty() {
                break;
            }
            if std::time::Instant::now() > deadline {
                for &p in &left {
                    // SAFETY: kill(2); do not leave them running after the failure.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
                panic!("processes {left:?} of the builder survived the worker");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[test]
    fn a_plain_builder_dies_with_a_worker_killed_right_after_start() {
        builder_dies_with_a_worker_killed_right_after_start(
            "watchdog::tests::a_plain_builder_dies_with_a_worker_killed_right_after_start",
            "plain",
        );
    }

    /// A chroot builder is still setting up when `start` returns.
    #[test]
    fn a_chroot_builder_dies_with_a_worker_killed_right_after_start() {
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var_os("CI").is_none(),
                "a chroot builder needs root (namespaces and mounts) and CI is set"
            );
            eprintln!("skipping: not root");
            return;
        }
        builder_dies_with_a_worker_killed_right_after_start(
            "watchdog::tests::a_chroot_builder_dies_with_a_worker_killed_right_after_start",
            "chroot",
        );
    }
}
