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
//!   "+<pgid>\n"      a builder's process group was started
//!   "-<pgid>\n"      it was reaped; forget it (its id may be reused)
//!   end-of-file      the worker is gone (exit or crash): SIGKILL every group still listed
//! ```
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

impl Watchdog {
    /// Forks the watchdog. `None` if that failed: builds still run, just without the guard.
    pub fn start() -> Option<Watchdog> {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).ok()?;
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
            -1 => None,
            0 => unsafe { watchdog_main(read_fd, write_fd, &mut state) },
            pid => {
                drop(read);
                Some(Watchdog {
                    pipe: Some(std::fs::File::from(write)),
                    pid,
                    reaped: String::new(),
                })
            }
        }
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
                    if sign == b'+' && n_groups < MAX_GROUPS && num > 1 {
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
        libc::kill(-g, libc::SIGKILL);
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
        let mut wd = Watchdog::start().expect("forking the watchdog");
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
        let mut wd = Watchdog::start().expect("forking the watchdog");
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
