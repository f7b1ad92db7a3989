#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

pub mod activity;
mod add;
mod build;
mod connection;
pub mod error;
mod gc;
pub mod hangup;
pub mod listen;
pub mod trust;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use nixb_goals::{Engine, WorkerConfig};
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
    store: Arc<LocalStore>,
    config: DaemonConfig,
    /// Started with the first build; dropping the daemon stops it (killing its builds).
    engine: Mutex<Option<Arc<Engine>>>,
    /// Connections being served; when the last one ends, the temporary roots the process
    /// holds for itself are released (see `Active`).
    active: Mutex<usize>,
    /// The user names of the uids that connected: the name is looked up (in the passwd
    /// database, which may mean reading a file) once per uid, not per connection.
    user_names: Mutex<std::collections::HashMap<u32, String>>,
}

impl Daemon {
    pub fn new(store: LocalStore, config: DaemonConfig) -> Daemon {
        Daemon {
            store: Arc::new(store),
            config,
            engine: Mutex::new(None),
            active: Mutex::new(0),
            user_names: Mutex::new(std::collections::HashMap::new()),
        }
    }

    pub fn store(&self) -> &LocalStore {
        &self.store
    }

    pub fn config(&self) -> &DaemonConfig {
        &self.config
    }

    /// The engine every connection's builds run on: one scheduler, so a derivation two
    /// clients want is built once and `max-jobs` holds for the daemon as a whole.
    fn engine(&self) -> Result<Arc<Engine>> {
        let mut slot = self.engine.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = &*slot {
            return Ok(Arc::clone(e));
        }
        let store: Arc<dyn nixb_goals::BuildStore + Send + Sync> = self.store.clone();
        let e = Arc::new(Engine::start(store, self.config.worker.clone())?);
        *slot = Some(Arc::clone(&e));
        Ok(e)
    }

    /// Serves one connection whose trust the caller has decided (`--stdio`, where
    /// whoever could start the daemon is trusted, as with `nix-daemon --stdio`). Returns
    /// when the client disconnects; an error means the connection broke or went out of
    /// step (the client has been told).
    pub fn serve<R: Read, W: Write>(&self, r: R, w: W, trusted: bool) -> Result<()> {
        self.serve_with(r, w, trusted, None)
    }

    /// [`Daemon::serve`], with the client's end to poll for a hang-up while builds run
    /// (for `--stdio`: a duplicate of standard input).
    pub fn serve_with<R: Read, W: Write>(
        &self,
        r: R,
        w: W,
        trusted: bool,
        hangup: Option<hangup::Hangup>,
    ) -> Result<()> {
        let active = Active::enter(self);
        let served = connection::serve(self, r, w, trusted, hangup);
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
        // As Nix's daemon: the user's profile directories exist once it has connected.
        let name = self
            .user_names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(peer.uid)
            .or_insert_with(|| peer.user_name())
            .clone();
        self.store.create_user(&name, peer.uid)?;
        let reader = stream.try_clone().map_err(|source| DaemonError::Socket {
            path: "client connection".into(),
            source,
        })?;
        // Polled for a hang-up while the client's builds run: a client that goes away
        // cancels what only it wanted.
        let hangup = stream.try_clone().map_err(|source| DaemonError::Socket {
            path: "client connection".into(),
            source,
        })?;
        self.serve_with(
            reader,
            stream,
            trusted,
            Some(hangup::Hangup::Socket(hangup)),
        )
    }
}

/// One connection being served. A connection's temporary roots are its own, released
/// when it ends (see `Session::temp_roots`): those it adds, those of the paths added for
/// it, and those the engine's goals take while building for it. What the process roots
/// for itself (a goal's paths once no connection wants the goal) is dropped when no
/// connection is left: never earlier than Nix would.
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
