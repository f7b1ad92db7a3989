//! The built-in substituter on the real SQLite store: binary caches written by
//! `copy_to_file_cache`, read in-process by the worker's threads. A corrupt NAR in the
//! first cache is passed over for the next one; a fetch still running when the worker
//! stops (a build failed without keep-going) leaves nothing behind and no lock held.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{add_local_drv, local_store, remove_tree, spec, worker_config};
use nixb_binarycache::write::{copy_to_file_cache, WriteOptions};
use nixb_binarycache::{CacheOptions, Compression, SecretKey, TrustedKeys};
use nixb_goals::{realise, Event, Substituter, VecSink, WorkerConfig};
use nixb_store::local_store::LocalStore;
use nixb_store::locks::PathLocks;
use nixb_store::{DerivedPath, Hash, HashAlgo, StorePath};

fn key() -> SecretKey {
    SecretKey::from_seed("test-cache-1", &[7u8; 32])
}

fn config(root: &Path, caches: &[String]) -> WorkerConfig {
    let mut cfg = worker_config(root);
    cfg.substituters = caches
        .iter()
        .map(|url| Substituter::BinaryCache { url: url.clone() })
        .collect();
    let mut keys = TrustedKeys::new();
    keys.add(key().to_public());
    cfg.cache_options = CacheOptions {
        trusted_keys: keys,
        require_sigs: true,
        attempts: 1,
        ..CacheOptions::default()
    };
    cfg
}

/// Two text paths, `top` referring to `dep`, published signed and uncompressed at
/// `<root>/cache`; then the store is emptied. Returns (dep, top, NAR hash of each as
/// the store crate computed it before publishing).
fn published(root: &Path) -> (StorePath, StorePath, BTreeMap<StorePath, Hash>) {
    let store = local_store(root);
    let dep = store
        .add_text_to_store("dep", b"dependency contents\n", &BTreeSet::new())
        .unwrap();
    let top_text = format!("top, referring to {}\n", store.store_dir().print(&dep));
    let top = store
        .add_text_to_store("top", top_text.as_bytes(), &BTreeSet::from([dep.clone()]))
        .unwrap();
    let mut hashes = BTreeMap::new();
    for p in [&dep, &top] {
        let real = store.store_dir().to_path(p);
        let (h, _) = nixb_store::nar::hash_path(&real, HashAlgo::Sha256).unwrap();
        hashes.insert(p.clone(), h);
    }
    copy_to_file_cache(
        &store,
        &root.join("cache"),
        &BTreeSet::from([top.clone()]),
        &WriteOptions {
            compression: Compression::None,
            secret_keys: vec![key()],
            jobs: 1,
        },
    )
    .unwrap();
    drop(store);
    for d in ["store", "state"] {
        remove_tree(&root.join(d));
    }
    (dep, top, hashes)
}

/// The NAR file the narinfo of `p` in `cache` points to.
fn nar_file(cache: &Path, p: &StorePath) -> PathBuf {
    let narinfo =
        std::fs::read_to_string(cache.join(format!("{}.narinfo", p.hash_part()))).unwrap();
    let url = narinfo
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap();
    cache.join(url)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn a_corrupt_nar_in_the_first_cache_is_passed_over_for_the_next() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (dep, top, hashes) = published(root);
    // The first cache has a copy of everything, with one byte of dep's contents changed
    // (uncompressed, so the archive stays well-formed and only its hash tells).
    let bad = root.join("bad-cache");
    copy_dir(&root.join("cache"), &bad);
    let nar_path = nar_file(&bad, &dep);
    let mut nar = std::fs::read(&nar_path).unwrap();
    let at = nar.windows(8).position(|w| w == b"contents").unwrap() + 16;
    assert_eq!(nar[at], b'd', "unexpected NAR layout");
    nar[at] = b'D';
    std::fs::write(&nar_path, &nar).unwrap();

    let bad_url = format!("file://{}", bad.display());
    let good_url = format!("file://{}", root.join("cache").display());
    let store = local_store(root);
    let cfg = config(root, &[bad_url.clone(), good_url.clone()]);
    let mut sink = VecSink::default();
    let outcome = realise(&store, &[DerivedPath::Opaque(top.clone())], &cfg, &mut sink).unwrap();
    assert_eq!(outcome.exit_status, 0, "{:#?}", sink.0);

    let about = |p: &StorePath| -> Vec<String> {
        sink.0
            .iter()
            .filter_map(|e| match e {
                Event::SubstituterStarted { path, substituter } if path == p => {
                    Some(format!("started {substituter}"))
                }
                Event::SubstituterFailed {
                    path,
                    status,
                    message,
                } if path == p => Some(format!("failed {status} {message}")),
                Event::SubstituterSucceeded { path } if path == p => Some("succeeded".into()),
                _ => None,
            })
            .collect()
    };
    let dep_events = about(&dep);
    assert_eq!(dep_events.len(), 4, "{dep_events:#?}");
    assert_eq!(dep_events[0], format!("started {bad_url}"));
    assert!(
        dep_events[1].starts_with("failed 256 ") && dep_events[1].contains("NarHash mismatch"),
        "{}",
        dep_events[1]
    );
    assert_eq!(dep_events[2], format!("started {good_url}"));
    assert_eq!(dep_events[3], "succeeded");
    // top's NAR in the first cache is intact: taken from there.
    assert_eq!(
        about(&top),
        vec![format!("started {bad_url}"), "succeeded".into()]
    );

    for p in [&dep, &top] {
        let info = store.query_path_info(p).unwrap().expect("registered");
        assert_eq!(info.nar_hash, hashes[p]);
        assert!(
            info.sigs.iter().any(|s| s.starts_with("test-cache-1:")),
            "{:?}",
            info.sigs
        );
        assert!(!info.ultimate);
    }
    assert_eq!(
        store.query_references(&top).unwrap(),
        BTreeSet::from([dep.clone()])
    );
    let real = store.store_dir().to_path(&dep);
    assert_eq!(
        std::fs::read_to_string(&real).unwrap(),
        "dependency contents\n"
    );
    // The lock files, kept until the worker finished, are gone.
    let locks: Vec<_> = std::fs::read_dir(store.store_dir().as_str())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".lock"))
        .collect();
    assert!(locks.is_empty(), "{locks:?}");
}

/// Serves the files of `dir` over HTTP on 127.0.0.1, holding back the body of every
/// NAR for `stall`. Counts NAR requests.
fn stalling_server(dir: PathBuf, stall: Duration) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let nar_requests = Arc::new(AtomicUsize::new(0));
    let counter = nar_requests.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            let dir = dir.clone();
            let counter = counter.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                if r.read_line(&mut line).is_err() {
                    return;
                }
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                }
                let rel = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                match std::fs::read(dir.join(rel.trim_start_matches('/'))) {
                    Ok(body) => {
                        let _ = write!(
                            s,
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = s.flush();
                        if rel.starts_with("/nar/") {
                            counter.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(stall);
                        }
                        let _ = s.write_all(&body);
                    }
                    Err(_) => {
                        let _ = write!(
                            s,
                            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        );
                    }
                }
            });
        }
    });
    (format!("http://127.0.0.1:{port}"), nar_requests)
}

fn failing_drv(store: &LocalStore, system: &str) -> StorePath {
    add_local_drv(store, spec("fails", "/bin/sleep 0.3; exit 1"), system)
}

#[test]
fn a_fetch_in_flight_when_the_worker_stops_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (dep, _top, _) = published(root);
    let stall = Duration::from_millis(1500);
    let (url, nar_requests) = stalling_server(root.join("cache"), stall);
    let store = local_store(root);
    let mut cfg = config(root, &[url]);
    cfg.keep_going = false;
    // Only the build uses the build slot; the substitution runs beside it.
    cfg.max_jobs = 1;
    let drv = failing_drv(&store, &cfg.system.clone());

    let started = Instant::now();
    let mut sink = VecSink::default();
    let outcome = realise(
        &store,
        &[
            DerivedPath::Opaque(dep.clone()),
            DerivedPath::Built {
                drv,
                outputs: vec![],
            },
        ],
        &cfg,
        &mut sink,
    )
    .unwrap();
    let took = started.elapsed();
    assert_ne!(outcome.exit_status, 0, "{:#?}", sink.0);
    // The NAR was being downloaded when the build failed (0.3 s in) ...
    assert_eq!(nar_requests.load(Ordering::SeqCst), 1, "{:#?}", sink.0);
    // ... and realise returned only once the thread had finished with it.
    assert!(
        took >= stall,
        "returned after {took:?}, before the fetch ended"
    );
    assert!(
        !sink
            .0
            .iter()
            .any(|e| matches!(e, Event::SubstituterSucceeded { .. })),
        "{:#?}",
        sink.0
    );
    assert!(!store.is_valid_path(&dep).unwrap());
    let real = store.store_dir().to_path(&dep);
    assert!(
        std::fs::symlink_metadata(&real).is_err(),
        "what the abandoned fetch unpacked was left at {}",
        real.display()
    );
    // Nobody holds the path's lock any more.
    let lock = PathLocks::lock(std::slice::from_ref(&real), false, None).unwrap();
    assert!(lock.is_some(), "the path lock is still held");
}

#[test]
fn repair_fetches_a_corrupt_path_again_from_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (dep, _top, hashes) = published(root);
    let store = local_store(root);
    let mut cfg = config(root, &[format!("file://{}", root.join("cache").display())]);
    let outcome = realise(
        &store,
        &[DerivedPath::Opaque(dep.clone())],
        &cfg,
        &mut VecSink::default(),
    )
    .unwrap();
    assert_eq!(outcome.exit_status, 0);
    let real = store.store_dir().to_path(&dep);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&real, "corrupted\n").unwrap();

    cfg.build_mode = nixb_goals::BuildMode::Repair;
    let mut sink = VecSink::default();
    let outcome = realise(&store, &[DerivedPath::Opaque(dep.clone())], &cfg, &mut sink).unwrap();
    assert_eq!(outcome.exit_status, 0, "{:#?}", sink.0);
    assert!(sink
        .0
        .iter()
        .any(|e| matches!(e, Event::SubstituterSucceeded { path } if *path == dep)));
    assert_eq!(
        std::fs::read_to_string(&real).unwrap(),
        "dependency contents\n"
    );
    let (h, _) = nixb_store::nar::hash_path(&real, HashAlgo::Sha256).unwrap();
    assert_eq!(h, hashes[&dep]);
    assert_eq!(store.query_path_info(&dep).unwrap().unwrap().nar_hash, h);
    // Canonical again: read-only, and nothing left beside it.
    let mode = std::fs::metadata(&real).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o444);
    let mut tmp_name = real.clone().into_os_string();
    tmp_name.push(".tmp");
    assert!(std::fs::symlink_metadata(PathBuf::from(tmp_name)).is_err());
}
