//! The collector's side of Nix's `gc-socket` protocol.
//!
//! While a collection runs, the collector holds `$NIX_STATE_DIR/gc.lock` exclusively, so a
//! process adding a temporary root cannot take the lock shared; it connects to
//! `$NIX_STATE_DIR/gc-socket/socket` instead and sends the root:
//!
//! ```text
//! client -> collector   "<absolute store path>\n"     (any number of times)
//! collector -> client   "1"                           once the root is recorded
//! ```
//!
//! Roots are recorded by hash part, so `.lock`, `.chroot` and `.check` siblings of a path
//! are protected with it. When the path is being deleted at that moment (it is *pending*),
//! the acknowledgement waits until the deletion is done, so that the client, which checks
//! validity after adding its root, never races the deletion. Garbage instead of a store
//! path is logged and acknowledged, as Nix does.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use nixb_store::StoreDir;

use crate::GcError;

/// What the collector and the connection threads share.
#[derive(Debug, Default)]
pub struct Shared {
    /// Hash parts of every temporary root known to this collection.
    pub temp_roots: HashSet<String>,
    /// Roots received over the socket that the collector has not looked at yet.
    pub new_roots: Vec<String>,
    /// The paths being deleted right now.
    pub pending: Pending,
}

/// A set of paths by hash part, kept as 64-bit digests of it: a collection that deletes
/// most of a million-path store at once holds them all, and 8 bytes a path is what that
/// costs. Two hash parts with one digest only make a client wait for the other path's
/// deletion as well.
#[derive(Debug, Default)]
pub struct Pending(HashSet<u64>);

impl Pending {
    fn key(hash: &str) -> u64 {
        use std::hash::{Hash, Hasher};
        // Deterministic (fixed keys); hash parts are uniformly random already.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        hash.hash(&mut h);
        h.finish()
    }

    pub fn insert(&mut self, hash: &str) {
        self.0.insert(Self::key(hash));
    }

    pub fn remove(&mut self, hash: &str) {
        self.0.remove(&Self::key(hash));
    }

    pub fn contains(&self, hash: &str) -> bool {
        self.0.contains(&Self::key(hash))
    }

    pub fn clear(&mut self) {
        self.0.clear();
        self.0.shrink_to_fit();
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The shared state and the condition variable that wakes clients waiting on `pending`.
#[derive(Debug, Default)]
pub struct SharedRoots {
    state: Mutex<Shared>,
    wakeup: Condvar,
}

impl SharedRoots {
    pub fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panicking connection thread leaves the sets consistent (each update is one
        // insert), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Clears `pending` and wakes every client waiting for it.
    pub fn finish_pending(&self) {
        self.lock().pending.clear();
        self.wakeup.notify_all();
    }

    /// Removes these hash parts from `pending` and wakes the clients waiting for them.
    pub fn finish_pending_of<'a>(&self, hashes: impl IntoIterator<Item = &'a str>) {
        let mut s = self.lock();
        for h in hashes {
            s.pending.remove(h);
        }
        drop(s);
        self.wakeup.notify_all();
    }
}

/// Open client connections and their threads, to shut down when the server stops.
type Connections = Arc<Mutex<Vec<(UnixStream, JoinHandle<()>)>>>;

/// The running server; stopped (threads joined) on drop.
pub struct RootsServer {
    shared: Arc<SharedRoots>,
    stop: Arc<AtomicBool>,
    socket: PathBuf,
    accept: Option<JoinHandle<()>>,
    conns: Connections,
}

impl RootsServer {
    /// Binds `<state_dir>/gc-socket/socket` (replacing a leftover one, mode 0666) and
    /// starts answering clients. The caller must hold `gc.lock` exclusively.
    pub fn start(
        state_dir: &Path,
        store_dir: StoreDir,
        shared: Arc<SharedRoots>,
    ) -> Result<RootsServer, GcError> {
        let dir = state_dir.join("gc-socket");
        let socket = dir.join("socket");
        let io = |step: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| GcError::Io { step, path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io("creating directory", &dir))?;
        match std::fs::remove_file(&socket) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io("removing old socket", &socket)(e))
            }
            _ => {}
        }
        let listener = UnixListener::bind(&socket).map_err(io("binding", &socket))?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))
            .map_err(io("changing mode of", &socket))?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Connections = Arc::default();
        let accept = {
            let (stop, conns, shared) = (stop.clone(), conns.clone(), shared.clone());
            std::thread::Builder::new()
                .name("gc-roots-server".into())
                .spawn(move || accept_loop(listener, store_dir, shared, stop, conns))
                .map_err(io("starting the roots server for", &socket))?
        };
        Ok(RootsServer {
            shared,
            stop,
            socket,
            accept: Some(accept),
            conns,
        })
    }

    pub fn shared(&self) -> &Arc<SharedRoots> {
        &self.shared
    }
}

impl Drop for RootsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept call; the thread sees the flag and returns, closing the socket.
        let _ = UnixStream::connect(&self.socket);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        self.shared.finish_pending();
        let conns = std::mem::take(&mut *self.conns.lock().unwrap_or_else(|e| e.into_inner()));
        for (stream, thread) in conns {
            let _ = stream.shutdown(std::net::Shutdown::Both);
            let _ = thread.join();
        }
        // The socket file stays, as Nix leaves it: a client that connects to it now gets
        // "connection refused" and goes back to taking gc.lock.
    }
}

fn accept_loop(
    listener: UnixListener,
    store_dir: StoreDir,
    shared: Arc<SharedRoots>,
    stop: Arc<AtomicBool>,
    conns: Connections,
) {
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = stream else { continue };
        let Ok(handle) = stream.try_clone() else {
            continue;
        };
        let (store_dir, shared) = (store_dir.clone(), shared.clone());
        let spawned = std::thread::Builder::new()
            .name("gc-roots-client".into())
            .spawn(move || serve_client(stream, &store_dir, &shared));
        if let Ok(t) = spawned {
            conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((handle, t));
        }
    }
}

fn serve_client(stream: UnixStream, store_dir: &StoreDir, shared: &SharedRoots) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut lines = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        match lines.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let path = line.strip_suffix('\n').unwrap_or(&line);
        match store_dir.parse(path) {
            Ok(p) => {
                let hash = p.hash_part().to_string();
                tracing::debug!("got new GC root '{path}'");
                let mut s = shared.lock();
                s.temp_roots.insert(hash.clone());
                s.new_roots.push(hash.clone());
                while s.pending.contains(&hash) {
                    s = shared.wakeup.wait(s).unwrap_or_else(|e| e.into_inner());
                }
            }
            Err(_) => tracing::error!("received garbage instead of a root from client"),
        }
        if out.write_all(b"1").is_err() {
            return;
        }
    }
}
