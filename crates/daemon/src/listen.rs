//! The listening socket: a thread per connection, and a clean stop. SIGTERM, SIGINT
//! and SIGHUP are taken by a thread of their own (`sigwait`), so no handler runs in
//! signal context: it asks the accept loop to stop, the loop removes the socket and
//! returns.
//!
//! A connection's thread does not exit when its client goes: it waits a while as a spare
//! (named `spare` meanwhile), and the accept loop hands the next connection to a waiting
//! spare instead of starting a thread. Clients that connect once per command
//! (`nix-store`, `nix build`) are then greeted without a thread start each.

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
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

    /// Stops accepting; the loop wakes up through a connection of our own, or within
    /// half a second when the socket file is gone and nothing can connect.
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

/// How often the accept loop looks at its [`Stopper`] while no client connects: the stop's
/// own connection wakes it at once, but a socket file someone deleted cannot be connected
/// to, and SIGTERM must still stop the daemon.
const STOP_CHECK_MS: u16 = 500;

/// How long a connection's thread waits for another connection before it exits.
const SPARE_WAIT: Duration = Duration::from_secs(30);
/// Most threads kept waiting at once; more exit when their client goes.
const MAX_SPARES: usize = 32;

/// Threads waiting for a connection, and the connections handed to them.
#[derive(Default)]
struct Spares {
    state: Mutex<SpareState>,
    wake: Condvar,
}

#[derive(Default)]
struct SpareState {
    /// Waiting threads that no connection has been promised to. Every waiting thread is
    /// either unpromised or will take one of `handed`, so `unpromised + handed.len()`
    /// threads are waiting.
    unpromised: usize,
    handed: VecDeque<UnixStream>,
    /// The accept loop has stopped: waiting threads exit.
    closed: bool,
}

impl Spares {
    fn lock(&self) -> MutexGuard<'_, SpareState> {
        // Nothing in the state can be left half-changed by a panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives `conn` to a waiting thread, or back when none is waiting.
    fn hand_over(&self, conn: UnixStream) -> Option<UnixStream> {
        let mut s = self.lock();
        if s.unpromised == 0 {
            return Some(conn);
        }
        s.unpromised -= 1;
        s.handed.push_back(conn);
        drop(s);
        self.wake.notify_one();
        None
    }

    /// Waits (at most [`SPARE_WAIT`]) for a connection handed over; `None` when this
    /// thread is to exit.
    fn wait(&self) -> Option<UnixStream> {
        let mut s = self.lock();
        if s.closed || s.unpromised + s.handed.len() >= MAX_SPARES {
            return None;
        }
        s.unpromised += 1;
        let deadline = Instant::now() + SPARE_WAIT;
        loop {
            if let Some(conn) = s.handed.pop_front() {
                return Some(conn);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if s.closed || left.is_zero() {
                // Nothing handed is left, so no connection was promised to this thread.
                s.unpromised -= 1;
                return None;
            }
            s = self
                .wake
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Lets every waiting thread exit (connections already handed over are served).
    fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_all();
    }
}

/// Names the calling thread as `ps` and `/proc/<pid>/task/*/comm` show it.
fn set_thread_name(name: &std::ffi::CStr) {
    // Only a name too long fails, and these are short; the name is for people only.
    let _ = nix::sys::prctl::set_name(name);
}

impl Daemon {
    /// Accepts connections until `stopper` is stopped, serving each on its own thread
    /// (a spare one where one waits); then removes the socket file. Connections still
    /// open are left to finish or to end with the process.
    pub fn listen(self: &Arc<Self>, listener: UnixListener, stopper: &Stopper) -> Result<()> {
        let spares = Arc::new(Spares::default());
        listener
            .set_nonblocking(true)
            .map_err(|source| DaemonError::Socket {
                path: stopper.socket.display().to_string(),
                source,
            })?;
        loop {
            if stopper.is_stopped() {
                break;
            }
            let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
            match nix::poll::poll(&mut fds, PollTimeout::from(STOP_CHECK_MS)) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => {}
                Err(e) => {
                    return Err(DaemonError::Socket {
                        path: stopper.socket.display().to_string(),
                        source: e.into(),
                    })
                }
            }
            // Accepted sockets do not inherit the listener's O_NONBLOCK (accept4 without
            // SOCK_NONBLOCK); a connection gone between the poll and here is WouldBlock.
            let Ok((conn, _)) = listener.accept() else {
                continue;
            };
            let Some(conn) = spares.hand_over(conn) else {
                continue;
            };
            let me = Arc::clone(self);
            let spares = Arc::clone(&spares);
            let spawned = std::thread::Builder::new()
                .name("connection".into())
                .spawn(move || {
                    let _ = me.serve_unix(conn);
                    loop {
                        set_thread_name(c"spare");
                        let Some(conn) = spares.wait() else { break };
                        set_thread_name(c"connection");
                        let _ = me.serve_unix(conn);
                    }
                });
            // Out of threads: this client is dropped, the others go on.
            drop(spawned);
        }
        spares.close();
        if stopper.owned {
            let _ = std::fs::remove_file(&stopper.socket);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits until `n` threads wait unpromised (no sleep: the state is checked as the
    /// scheduler lets the waiter run).
    fn until_unpromised(spares: &Spares, n: usize) {
        while spares.lock().unpromised != n {
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_waiting_spare_takes_the_next_connection_and_none_is_lost() {
        let spares = Arc::new(Spares::default());
        // Nobody waits: the connection comes back to be served by a new thread.
        let (a, _a) = UnixStream::pair().unwrap();
        assert!(spares.hand_over(a).is_some());

        // Two spares wait; two connections go to them, one each, and a third comes back.
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let s = Arc::clone(&spares);
                std::thread::spawn(move || s.wait().map(|c| c.local_addr().is_ok()))
            })
            .collect();
        until_unpromised(&spares, 2);
        let (b, _b) = UnixStream::pair().unwrap();
        let (c, _c) = UnixStream::pair().unwrap();
        let (d, _d) = UnixStream::pair().unwrap();
        assert!(spares.hand_over(b).is_none());
        assert!(spares.hand_over(c).is_none());
        assert!(
            spares.hand_over(d).is_some(),
            "handed to a spare already promised"
        );
        for w in waiters {
            assert_eq!(w.join().unwrap(), Some(true));
        }
        let s = spares.lock();
        assert_eq!((s.unpromised, s.handed.len()), (0, 0));
    }

    #[test]
    fn closing_lets_waiting_spares_exit_and_no_more_wait() {
        let spares = Arc::new(Spares::default());
        let s = Arc::clone(&spares);
        let waiter = std::thread::spawn(move || s.wait().is_none());
        until_unpromised(&spares, 1);
        spares.close();
        assert!(waiter.join().unwrap());
        assert!(spares.wait().is_none());
        let (a, _a) = UnixStream::pair().unwrap();
        assert!(spares.hand_over(a).is_some());
    }
}
