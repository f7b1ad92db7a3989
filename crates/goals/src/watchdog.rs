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
    pid: libc::pid_t,
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
        let pid = unsafe { libc::fork() };
        match pid {
            -1 => Err(WatchdogError::Start {
                step: "forking",
                errno: nix::errno::Errno::last(),
            }),
            0 => unsafe { watchdog_main(read_fd, write_fd, &mut state) },
            pid => {
                drop(read);
                Ok(Watchdog {
                    pipe: Some(std::fs::File::from(write)),
                    pid,
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
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(self.pid, std::ptr::null_mut(), 0) };
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
}
