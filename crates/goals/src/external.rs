//! Starting the external programs of the original's two protocols (substituters and the
//! build hook) as children the worker can poll, kill and reap like builders.
//!
//! Builders go through `nixb_sandbox::spawn`, which gives a child exactly one log pipe as
//! stdout and stderr. These programs need more: a substituter's stdout carries the hash it
//! expects, apart from its log on stderr; the hook reads requests on stdin, answers on
//! stderr and writes the build log on descriptor 4. So they are started with
//! `std::process`, in a session of their own (so that killing the group takes their
//! children along, as the original's `setSeparatePG`), and then handed to
//! [`nixb_sandbox::Builder::adopt`].

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

use nix::fcntl::{fcntl, FcntlArg, OFlag};

/// A close-on-exec pipe whose read side is non-blocking (the worker reads it after
/// `poll()` and must never block on it): (read, write).
pub(crate) fn log_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    fcntl(read.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).map_err(io::Error::from)?;
    Ok((read, write))
}

/// Spawns `cmd` as a session leader and adopts it. The returned `Child` only lends its
/// pipes: the `Builder` reaps the process.
pub(crate) fn spawn_adopted(cmd: &mut Command) -> io::Result<(nixb_sandbox::Builder, Child)> {
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    match nixb_sandbox::Builder::adopt(pid) {
        Ok(b) => Ok((b, child)),
        Err(e) => {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
            Err(io::Error::other(e.to_string()))
        }
    }
}

/// The original's `statusToString`: how a child ended, for messages.
pub(crate) fn status_to_string(s: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = s.code() {
        format!("failed with exit code {code}")
    } else if let Some(sig) = s.signal() {
        format!("failed due to signal {sig}")
    } else {
        "died abnormally".into()
    }
}

/// The raw wait status, as the original prints it in `@ substituter-failed` and
/// `@ hook-failed` trace lines.
pub(crate) fn raw_status(s: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    s.into_raw().to_string()
}
