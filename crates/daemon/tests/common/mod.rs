//! What the daemon's socket tests share: a daemon on a fresh store in a temporary
//! directory, serving a socket there from a thread of its own, clients greeted at
//! protocol 1.34, and a listing of a directory tree to compare before and after.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use nixb_daemon::{Daemon, DaemonConfig, Stopper, TrustConfig};
use nixb_protocol::{Client, ClientInfo, Version};
use nixb_store::local_store::{LocalStore, StoreConfig};
use nixb_store::StoreDir;

/// The version the test clients offer (Nix 2.8's).
pub const V: Version = Version::new(1, 34);

/// A daemon on a store under a temporary directory (removed when this is dropped), laid
/// out as `nixb_testsupport`'s stores are, so real Nix can be pointed at it.
pub struct TestDaemon {
    pub store: nixb_testsupport::store::TestStore,
    pub store_dir: StoreDir,
    pub daemon: Arc<Daemon>,
}

/// A daemon listening on `<root>/socket`, until [`Listening::stop`].
pub struct Listening {
    pub sock: PathBuf,
    stopper: Stopper,
    server: JoinHandle<nixb_daemon::Result<()>>,
}

impl TestDaemon {
    /// A fresh store with the default trust settings (only root trusted).
    pub fn new() -> TestDaemon {
        let dirs = nixb_testsupport::store::TestStore::new();
        let store_dir = StoreDir::new(dirs.store_dir().to_str().unwrap()).unwrap();
        let store = LocalStore::open(StoreConfig {
            store_dir: store_dir.clone(),
            state_dir: dirs.state_dir(),
            log_dir: dirs.log_dir(),
        })
        .unwrap();
        let config = DaemonConfig {
            worker: nixb_goals::WorkerConfig::new(dirs.log_dir()),
            trust: TrustConfig::default(),
            nix_version: "nixb-test".into(),
            gc: Default::default(),
        };
        TestDaemon {
            store: dirs,
            store_dir,
            daemon: Arc::new(Daemon::new(store, config)),
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.daemon.store().config().state_dir.clone()
    }

    /// Binds `<root>/socket` and accepts connections on a thread of its own.
    pub fn listen(&self) -> Listening {
        let sock = self.store.root.path().join("socket");
        let listener = nixb_daemon::listen::bind(&sock).unwrap();
        let stopper = Stopper::new(&sock);
        let d = Arc::clone(&self.daemon);
        let st = stopper.clone();
        let server = std::thread::spawn(move || d.listen(listener, &st));
        Listening {
            sock,
            stopper,
            server,
        }
    }
}

impl Listening {
    /// Stops accepting and waits for the accept loop, which must end without an error.
    pub fn stop(self) {
        self.stopper.stop();
        self.server.join().unwrap().unwrap();
    }
}

/// Greets the daemon at the other end of `s` (kept open by the caller).
pub fn connect(s: &UnixStream, store_dir: &StoreDir) -> Client<UnixStream, UnixStream> {
    let info = ClientInfo {
        version: V,
        features: BTreeSet::new(),
    };
    Client::connect(
        s.try_clone().unwrap(),
        s.try_clone().unwrap(),
        store_dir.clone(),
        &info,
    )
    .unwrap()
}

/// Connects to `sock` and greets the daemon.
pub fn connect_to(sock: &Path, store_dir: &StoreDir) -> Client<UnixStream, UnixStream> {
    connect(&UnixStream::connect(sock).unwrap(), store_dir)
}

/// Everything under `dir`, relative, sorted.
pub fn listing(dir: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries {
            let e = e.unwrap();
            let p = e.path();
            // Freed lock files are pooled there for reuse.
            if e.file_name() == "nixb-lock-pool" {
                continue;
            }
            out.push(p.strip_prefix(root).unwrap().to_path_buf());
            if e.file_type().unwrap().is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}
