//! The gc.lock / gc-socket protocol in both directions: a temporary root added while a
//! collection runs is honoured whether the collector is nixb or real Nix 2.8 and whether
//! the client is nixb's `LocalStore::add_temp_root` or real `nix-store --add`; and a
//! client whose path is being deleted gets its acknowledgement only after the deletion.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use nixb_gc::server::{RootsServer, SharedRoots};
use nixb_gc::{collect_garbage, GcAction, GcEvent, GcOptions};
use nixb_store::local_store::{LocalStore, StoreConfig};
use nixb_store::{StoreDir, StorePath};
use nixb_testsupport::TestStore;

/// A private store (`nixb_testsupport::TestStore`).
struct Env {
    t: TestStore,
    root: PathBuf,
}

impl Env {
    fn new() -> Env {
        let t = TestStore::with_conf("sandbox = false\nbuild-users-group =\nsubstituters =\n");
        let root = t.root.path().to_path_buf();
        Env { t, root }
    }

    fn config(&self) -> StoreConfig {
        StoreConfig::under(&self.root).unwrap()
    }

    fn nix(&self, prog: &str) -> Command {
        self.t.nix(prog)
    }

    /// Adds files with a store that is then closed, so that nothing keeps them alive.
    fn add_dead(&self, names: &[&str]) -> Vec<StorePath> {
        let store = LocalStore::open(self.config()).unwrap();
        let paths = names
            .iter()
            .map(|n| {
                let f = self.root.join(n);
                std::fs::write(&f, format!("contents of {n}\n")).unwrap();
                store.add_to_store(&f, None).unwrap()
            })
            .collect();
        drop(store);
        paths
    }
}

#[test]
fn server_holds_the_ack_while_the_path_is_pending() {
    let d = tempfile::tempdir().unwrap();
    let store_dir = StoreDir::new("/nix/store").unwrap();
    let shared = Arc::new(SharedRoots::default());
    let server = RootsServer::start(d.path(), store_dir, shared.clone()).unwrap();
    let hash = "0123456789abcdfghijklmnpqrsvwxyz";
    shared.lock().pending.insert(hash);
    let mut c = UnixStream::connect(d.path().join("gc-socket/socket")).unwrap();
    c.write_all(format!("/nix/store/{hash}-foo\n").as_bytes())
        .unwrap();
    // Once recorded, the server thread can only be waiting for `pending` to clear.
    while !shared.lock().temp_roots.contains(hash) {
        std::thread::yield_now();
    }
    c.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(
        c.read(&mut b).unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "acknowledged while the path was being deleted"
    );
    c.set_nonblocking(false).unwrap();
    shared.finish_pending();
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"1");
    // Garbage is acknowledged too (and ignored), as Nix does.
    c.write_all(b"not a path\n").unwrap();
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"1");
    assert_eq!(shared.lock().temp_roots.len(), 1);
    drop(server);
}

/// In batches and with every row at once (all three paths are dead).
#[test]
fn temp_root_added_during_a_nixb_collection_is_honoured() {
    for batch_size in [1, 0] {
        temp_root_added_during_a_collection_is_honoured(batch_size);
    }
}

fn temp_root_added_during_a_collection_is_honoured(batch_size: usize) {
    let env = Env::new();
    let dead = env.add_dead(&["a", "b", "c"]);
    let store = LocalStore::open(env.config()).unwrap();
    let dir = store.store_dir().clone();
    let nix = nixb_testsupport::required(&[nixb_testsupport::Need::Nix]);
    let mut opts = GcOptions::new(GcAction::DeleteDead);
    opts.batch_size = batch_size;
    let mut saw_determined = false;
    let result = collect_garbage(&store, &opts, &mut |e| {
        if let GcEvent::Determined { dead: n, .. } = e {
            saw_determined = true;
            assert_eq!(n, 3);
            // nixb as a client: gc.lock is held, so the root goes over the socket.
            let client = LocalStore::open(env.config()).unwrap();
            client.add_temp_root(&dead[0]).unwrap();
            // Real Nix as a client: adding a path that is (still) valid makes it a
            // temporary root first.
            if nix {
                let st = env
                    .nix("nix-store")
                    .arg("--add")
                    .arg(env.root.join("b"))
                    .output()
                    .unwrap();
                assert!(st.status.success(), "{st:?}");
                assert_eq!(
                    String::from_utf8_lossy(&st.stdout).trim(),
                    dir.print(&dead[1])
                );
            }
            // The client's root lives as long as its store; keep it past the collection.
            std::mem::forget(client);
        }
    })
    .unwrap();
    assert!(saw_determined);
    let deleted: Vec<String> = result.paths.into_iter().collect();
    let mut expected = vec![dir.print(&dead[2])];
    if !nix {
        expected.insert(0, dir.print(&dead[1]));
        expected.sort();
    }
    assert_eq!(deleted, expected);
    assert!(store.is_valid_path(&dead[0]).unwrap());
    assert!(dir.to_path(&dead[0]).exists());
    let report = store.verify(true).unwrap();
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn nixb_temp_root_added_during_nix_store_gc_is_honoured() {
    nixb_testsupport::require!(Nix);
    let env = Env::new();
    let dead = env.add_dead(&["kept", "gone"]);
    let dir = env.config().store_dir;
    // Nix 2.8 reads this file after finding its roots and before deleting anything: a
    // FIFO stops it there, holding gc.lock and serving its socket.
    let fifo = env.root.join("sync");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let gc = env
        .nix("nix-store")
        .arg("--gc")
        .env("_NIX_TEST_GC_SYNC", &fifo)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Opening for writing returns once nix-store has opened it for reading.
    let sync = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    let client = LocalStore::open(env.config()).unwrap();
    client.add_temp_root(&dead[0]).unwrap();
    drop(sync);
    let out = gc.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(client.is_valid_path(&dead[0]).unwrap());
    assert!(dir.to_path(&dead[0]).exists());
    assert!(!client.is_valid_path(&dead[1]).unwrap());
    assert!(!dir.to_path(&dead[1]).exists());
}

/// A path registered while a collection runs that refers to a dead path (by a client that
/// took no temporary root for it) keeps that path, whether the rows go in batches or all
/// at once: that deletion then refuses, deleting nothing, and the batches keep the path.
#[test]
fn a_path_registered_meanwhile_keeps_the_dead_path_it_refers_to() {
    for batch_size in [1, 0] {
        let env = Env::new();
        let dead = env.add_dead(&["a", "b", "c"]);
        let store = LocalStore::open(env.config()).unwrap();
        let dir = store.store_dir().clone();
        let late = dir
            .parse(&format!("{}/{}-late", dir.as_str(), "x".repeat(32)))
            .unwrap();
        let mut opts = GcOptions::new(GcAction::DeleteDead);
        opts.batch_size = batch_size;
        let result = collect_garbage(&store, &opts, &mut |e| {
            if let GcEvent::Determined { dead: n, .. } = e {
                assert_eq!(n, 3);
                let client = LocalStore::open(env.config()).unwrap();
                let file = dir.to_path(&late);
                std::fs::write(&file, dir.print(&dead[0])).unwrap();
                let (hash, size) =
                    nixb_store::nar::hash_path(&file, nixb_store::HashAlgo::Sha256).unwrap();
                let mut info =
                    nixb_store::local_store::ValidPathInfo::new(late.clone(), hash, size);
                info.references.insert(dead[0].clone());
                client.register_valid_paths(&[info]).unwrap();
            }
        })
        .unwrap();
        let deleted: Vec<String> = result.paths.into_iter().collect();
        let mut expected = vec![dir.print(&dead[1]), dir.print(&dead[2])];
        expected.sort();
        assert_eq!(deleted, expected, "batch size {batch_size}");
        for p in [&dead[0], &late] {
            assert!(store.is_valid_path(p).unwrap(), "batch size {batch_size}");
            assert!(dir.to_path(p).exists());
        }
        let report = store.verify(true).unwrap();
        assert!(report.is_clean(), "batch size {batch_size}: {report:?}");
    }
}
