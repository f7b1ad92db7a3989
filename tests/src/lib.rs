//! Harness for nixb's end-to-end tests: the private store, the `nixb` binary and the
//! command helpers of [`nixb_testsupport::store`], under the names the tests use.
//!
//! Oracle tests start with `nixb_testsupport::require!(Nix)`: under `CI=true` a missing
//! `nix-store` fails them (the test command installs `nix-bin`); elsewhere they are skipped
//! with a `SKIPPED` line on stderr.

#![forbid(unsafe_code)]

pub use nixb_testsupport::store::{nixb_binary, run, run_ok, run_str, TestStore};

/// Runs `inner` (program, arguments and environment) as uid and gid `12345`, which have
/// no passwd entry, so no host user is made: a client that `allowed-users = *` lets in
/// and `trusted-users = root` leaves untrusted. Its `HOME` is `<test root>/untrusted-home`,
/// which [`open_to_untrusted`] prepares.
pub fn as_untrusted(t: &TestStore, inner: &std::process::Command) -> std::process::Command {
    let mut c = std::process::Command::new("setpriv");
    c.args(["--reuid=12345", "--regid=12345", "--clear-groups", "--"])
        .arg(inner.get_program())
        .args(inner.get_args());
    for (k, v) in inner.get_envs() {
        if let Some(v) = v {
            c.env(k, v);
        }
    }
    let home = t.root.path().join("untrusted-home");
    c.env("XDG_CACHE_HOME", home.join(".cache"))
        .env("HOME", home);
    c
}

/// Lets the uid of [`as_untrusted`] reach the test store's socket, store and files, and
/// gives it a writable home.
pub fn open_to_untrusted(t: &TestStore) {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()))
    };
    let files = t.root.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::create_dir_all(t.state_dir()).unwrap();
    for d in [t.root.path().to_path_buf(), t.state_dir(), files] {
        mode(&d, 0o755);
    }
    let home = t.root.path().join("untrusted-home");
    std::fs::create_dir_all(&home).unwrap();
    mode(&home, 0o777);
}

/// A daemon process (nixb's or Nix's) serving a test store on a socket, stopped with
/// SIGTERM on drop.
pub struct RunningDaemon {
    child: std::process::Child,
}

impl RunningDaemon {
    /// Starts `cmd` and waits until `socket` accepts a connection (polled: a daemon gives
    /// no other sign); panics if the daemon exits first or never listens.
    pub fn start(mut cmd: std::process::Command, socket: &std::path::Path) -> RunningDaemon {
        let child = cmd
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("starting the daemon");
        let mut d = RunningDaemon { child };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            if let Some(status) = d.child.try_wait().unwrap() {
                panic!("the daemon exited early: {status}");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the daemon never listened on {}",
                socket.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        d
    }

    /// A daemon already started and listening (as one handed a socket by systemd).
    pub fn adopt(child: std::process::Child) -> RunningDaemon {
        RunningDaemon { child }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        self.child.wait().unwrap()
    }
}

impl Drop for RunningDaemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.stop();
        }
    }
}
