//! The listening socket: a thread per connection, and a clean stop. SIGTERM, SIGINT
//! and SIGHUP are taken by a thread of their own (`sigwait`), so no handler runs in
//! signal context: it asks the accept loop to stop, the loop removes the socket and
//! returns.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nix::sys::signal::{SigSet, Signal};

use crate::error::{DaemonError, Result};
use crate::Daemon;

/// Stops an accept loop from another thread.
#[derive(Clone, Debug)]
pub struct Stopper {
    stopped: Arc<AtomicBool>,
    socket: PathBuf,
    /// Whether the socket file is ours to remove (not when systemd made it).
    owned: bool,
}

impl Stopper {
    /// For a socket bound by [`bind`], removed when the loop stops.
    pub fn new(socket: &Path) -> Stopper {
        Stopper {
            stopped: Arc::new(AtomicBool::new(false)),
            socket: socket.to_path_buf(),
            owned: true,
        }
    }

    /// For a socket passed by systemd ([`from_systemd`]): its file stays when the loop
    /// stops, for the socket unit to hand to the next start.
    pub fn for_activated(socket: &Path) -> Stopper {
        Stopper {
            owned: false,
            ..Stopper::new(socket)
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Stops accepting; the loop wakes up through a connection of our own.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.socket);
    }
}

/// Binds `path` (creating its directory, replacing a stale socket) with mode 0666, so
/// every user can reach the daemon, as with Nix's.
pub fn bind(path: &Path) -> Result<UnixListener> {
    let err = |source| DaemonError::Socket {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let l = UnixListener::bind(path).map_err(err)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(err)?;
    Ok(l)
}

/// Takes the listening socket that systemd passes (socket activation: `LISTEN_FDS=1`,
/// `LISTEN_PID` our pid, the socket as descriptor 3), which the caller has checked for
/// those variables. Refuses anything but a listening unix stream socket bound to a path;
/// returns the listener and that path.
pub fn from_systemd(fd: std::os::fd::OwnedFd) -> Result<(UnixListener, PathBuf)> {
    use nix::sys::socket::{getsockopt, sockopt};
    let err = |what: &str| DaemonError::Socket {
        path: "descriptor 3 from systemd (LISTEN_FDS)".into(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_string()),
    };
    let sys = |e: nix::errno::Errno| DaemonError::Socket {
        path: "descriptor 3 from systemd (LISTEN_FDS)".into(),
        source: e.into(),
    };
    let kind = getsockopt(&fd, sockopt::SockType).map_err(|e| match e {
        nix::errno::Errno::ENOTSOCK => err("not a socket"),
        e => sys(e),
    })?;
    if kind != nix::sys::socket::SockType::Stream {
        return Err(err("not a stream socket"));
    }
    if !getsockopt(&fd, sockopt::AcceptConn).map_err(sys)? {
        return Err(err("not listening"));
    }
    // Not to be inherited by builders.
    nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(sys)?;
    let listener = UnixListener::from(fd);
    let addr = listener.local_addr().map_err(|e| DaemonError::Socket {
        path: "descriptor 3 from systemd (LISTEN_FDS)".into(),
        source: e,
    })?;
    let path = addr
        .as_pathname()
        .ok_or_else(|| err("not a unix socket bound to a path"))?
        .to_path_buf();
    Ok((listener, path))
}

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread (and so in every thread it
/// starts later: call this first) and starts a thread that waits for one of them and
/// stops `stopper`. Builders do not inherit the mask: the sandbox and `std::process`
/// reset it in the child.
pub fn stop_on_signals(stopper: Stopper) -> Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    set.thread_block().map_err(|e| DaemonError::Socket {
        path: "blocking stop signals".into(),
        source: e.into(),
    })?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if set.wait().is_ok() {
                stopper.stop();
            }
        })
        .map_err(|source| DaemonError::Socket {
            path: "starting the signal thread".into(),
            source,
        })?;
    Ok(())
}

impl Daemon {
    /// Accepts connections until `stopper` is stopped, serving each on its own thread;
    /// then removes the socket file. Connections still open are left to finish or to end
    /// with the process.
    pub fn listen(self: &Arc<Self>, listener: UnixListener, stopper: &Stopper) -> Result<()> {
        for conn in listener.incoming() {
            if stopper.is_stopped() {
                break;
            }
            let Ok(conn) = conn else { continue };
            let me = Arc::clone(self);
            let spawned = std::thread::Builder::new()
                .name("connection".into())
                .spawn(move || {
                    let _ = me.serve_unix(conn);
                });
            // Out of threads: this client is dropped, the others go on.
            drop(spawned);
        }
        if stopper.owned {
            let _ = std::fs::remove_file(&stopper.socket);
        }
        Ok(())
    }
}
