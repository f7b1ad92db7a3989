//! The build hook's process (the original's `HookInstance`): started on the first request
//! with the hook's arguments and its fd 4 for the build log, and kept while it declines or
//! postpones, so that one process answers requests until it accepts one. What is said on
//! its pipes is the derivation goal's business (`derivation_goal::hook`).

use std::fs::File;
use std::io::BufReader;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{ChildStdin, Command, Stdio};

use nix::fcntl::OFlag;

use crate::config::{HookCommand, WorkerConfig};
use crate::external::spawn_adopted;

/// A running hook process waiting for (or answering) requests.
pub(crate) struct HookInstance {
    pub process: nixb_sandbox::Builder,
    /// Requests go here; dropped (closing it) once a request is accepted.
    pub to_hook: Option<ChildStdin>,
    /// Its stdout and stderr: replies and messages.
    pub from_hook: BufReader<File>,
    /// Its fd 4: the build log.
    pub builder_out: OwnedFd,
}

impl HookInstance {
    pub fn start(cmd: &HookCommand, cfg: &WorkerConfig) -> std::io::Result<HookInstance> {
        let (from_read, from_write) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(std::io::Error::from)?;
        let (out_read, out_write) = crate::external::log_pipe()?;
        let from_write2 = from_write.try_clone()?;
        let mut c = Command::new(&cmd.program);
        c.args(&cmd.args)
            .arg(&cfg.system)
            .arg(cfg.max_silent_time.map_or(0, |d| d.as_secs()).to_string())
            .arg("0")
            .arg(cfg.timeout.map_or(0, |d| d.as_secs()).to_string())
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::from(from_write))
            .stderr(Stdio::from(from_write2));
        let fd4 = out_write.as_raw_fd();
        // SAFETY: dup2 and fcntl are async-signal-safe; fd4 stays open until spawn returns.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut c, move || {
                if fd4 == 4 {
                    // Already in place: only the close-on-exec flag must go.
                    if libc::fcntl(4, libc::F_SETFD, 0) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(fd4, 4) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let (process, mut child) = spawn_adopted(&mut c)?;
        drop(out_write);
        let to_hook = child.stdin.take();
        Ok(HookInstance {
            process,
            to_hook,
            from_hook: BufReader::new(File::from(from_read)),
            builder_out: out_read,
        })
    }
}
