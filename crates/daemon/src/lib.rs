#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

pub mod activity;
mod add;
mod build;
mod connection;
pub mod error;
mod gc;
pub mod listen;
pub mod trust;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, MutexGuard};

use nixb_goals::WorkerConfig;
use nixb_store::local_store::LocalStore;

pub use error::{DaemonError, Result};
pub use listen::Stopper;
pub use trust::{Access, Peer, TrustConfig};

/// What the daemon is configured with; the caller maps `nix.conf` onto it.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// The engine's settings; each connection starts from a copy that its `SetOptions`
    /// may change.
    pub worker: WorkerConfig,
    pub trust: TrustConfig,
    /// Sent in the greeting (`nix store ping` prints it).
    pub nix_version: String,
    /// What `CollectGarbage` keeps alive.
    pub gc: GcConfig,
}

/// The collector's settings (`keep-outputs`, `keep-derivations`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GcConfig {
    pub keep_outputs: bool,
    pub keep_derivations: bool,
}

impl Default for GcConfig {
    /// Nix's defaults.
    fn default() -> GcConfig {
        GcConfig {
            keep_outputs: false,
            keep_derivations: true,
        }
    }
}

/// One store and one engine, shared by every connection.
pub struct Daemon {
    store: LocalStore,
    config: DaemonConfig,
    engine: Mutex<()>,
    /// Connections being served; when the last one ends, the temporary roots the store
    /// and the engine took on their behalf are released.
    active: Mutex<usize>,
}

impl Daemon {
    pub fn new(store: LocalStore, config: DaemonConfig) -> Daemon {
        Daemon {
            store,
            config,
            engine: Mutex::new(()),
            active: Mutex::new(0),
        }
    }

    pub fn store(&self) -> &LocalStore {
        &self.store
    }

    pub fn config(&self) -> &DaemonConfig {
        &self.config
    }

    /// Held while the engine runs for one client.
    fn build_lock(&self) -> MutexGuard<'_, ()> {
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves one connection whose trust the caller has decided (`--stdio`, where
    /// whoever could start the daemon is trusted, as with `nix-daemon --stdio`). Returns
    /// when the client disconnects; an error means the connection broke or went out of
    /// step (the client has been told).
    pub fn serve<R: Read, W: Write>(&self, r: R, w: W, trusted: bool) -> Result<()> {
        let active = Active::enter(self);
        let served = connection::serve(self, r, w, trusted);
        let released = active.leave();
        served?;
        released
    }

    /// Serves one accepted socket connection, trusting the peer as `SO_PEERCRED`,
    /// `trusted-users` and `allowed-users` say. A peer that may not connect is hung up
    /// on before the greeting.
    pub fn serve_unix(&self, stream: UnixStream) -> Result<()> {
        let peer = Peer::of_socket(&stream).map_err(|source| DaemonError::Socket {
            path: "peer credentials".into(),
            source,
        })?;
        let trusted = match self.config.trust.access(&peer) {
            Access::Trusted => true,
            Access::Untrusted => false,
            Access::Refused => {
                return Err(DaemonError::Refused(format!(
                    "user '{}' is not allowed to connect to the Nix daemon",
                    peer.user_name()
                )))
            }
        };
        let reader = stream.try_clone().map_err(|source| DaemonError::Socket {
            path: "client connection".into(),
            source,
        })?;
        self.serve(reader, stream, trusted)
    }
}

/// One connection being served. The engine and the store record temporary roots for the
/// whole process (the paths a connection built or added, until it is done with them);
/// Nix's daemon drops them when the connection's process exits. Here they are dropped
/// when no connection is left: never earlier than Nix would, and so a path built through
/// the daemon can be collected once its clients are gone.
struct Active<'d> {
    daemon: &'d Daemon,
    left: bool,
}

impl<'d> Active<'d> {
    fn enter(daemon: &'d Daemon) -> Active<'d> {
        *daemon.active.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        Active {
            daemon,
            left: false,
        }
    }

    /// The connection is done; the last one out releases the roots.
    fn leave(mut self) -> Result<()> {
        self.left = true;
        let mut n = self.daemon.active.lock().unwrap_or_else(|p| p.into_inner());
        *n -= 1;
        if *n == 0 {
            // Under the count's lock: a connection starting now waits until this is done.
            self.daemon.store.release_temp_roots()?;
        }
        Ok(())
    }
}

impl Drop for Active<'_> {
    /// A connection that unwound without leaving still counts down (its roots are kept
    /// until a later connection releases them).
    fn drop(&mut self) {
        if !self.left {
            *self.daemon.active.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        }
    }
}
