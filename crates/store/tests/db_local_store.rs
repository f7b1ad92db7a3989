//! LocalStore against its own database: registration and queries, the closure invariant,
//! atomicity, derivation outputs, the failed-path cache, temporary roots, verification
//! and several writers at once. Expected values come from the test's own construction
//! (which paths refer to which), from sha256 of known bytes, or from rusqlite reading the
//! file directly, never from the code under test.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nixb_store::derivation::{compute_output_paths, Derivation, DerivationOutput, DrvHashCache};
use nixb_store::local_store::{LocalStore, StoreConfig, StoreError, ValidPathInfo};
use nixb_store::locks::{lock_file, LockType};
use nixb_store::{Hash, HashAlgo, StoreDir, StorePath};

fn config(root: &Path) -> StoreConfig {
    StoreConfig {
        store_dir: StoreDir::new(root.join("store").to_str().unwrap()).unwrap(),
        state_dir: root.join("state"),
        log_dir: root.join("log"),
    }
}

fn open(root: &Path) -> LocalStore {
    LocalStore::open(config(root)).unwrap()
}

/// A made-up store path with a distinct hash per `n`.
fn fake(n: u8, name: &str) -> StorePath {
    StorePath::from_hash_and_name(&[n; 20], name).unwrap()
}

fn info(p: &StorePath, refs: &[&StorePath]) -> ValidPathInfo {
    let mut i = ValidPathInfo::new(
        p.clone(),
        Hash::digest(HashAlgo::Sha256, p.base_name()),
        100 + p.name().len() as u64,
    );
    i.references = refs.iter().map(|r| (*r).clone()).collect();
    i
}

fn set(ps: &[&StorePath]) -> BTreeSet<StorePath> {
    ps.iter().map(|p| (*p).clone()).collect()
}

fn raw_db(root: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(root.join("state/db/db.sqlite")).unwrap()
}

#[test]
fn open_creates_nix_layout() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    assert!(dir.path().join("store").is_dir());
    for d in [
        "state/db",
        "state/temproots",
        "state/gcroots",
        "state/profiles",
    ] {
        assert!(dir.path().join(d).is_dir(), "{d} missing");
    }
    assert_eq!(
        std::fs::read_to_string(dir.path().join("state/db/schema")).unwrap(),
        "10"
    );
    let mode: String = raw_db(dir.path())
        .query_row("pragma journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    // While open, the big lock is held shared: another shared lock works, an exclusive not.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.path().join("state/db/big-lock"))
        .unwrap();
    assert!(!lock_file(&f, LockType::Write, false).unwrap());
    assert!(lock_file(&f, LockType::Read, false).unwrap());
    lock_file(&f, LockType::None, false).unwrap();
    drop(s);
    assert!(lock_file(&f, LockType::Write, false).unwrap());
}

/// Spare lock files an earlier nixb kept in `$NIX_STATE_DIR/nixb-lock-pool/` (which Nix
/// knows nothing about) are deleted, read-only ones and all, when the store is opened.
#[test]
fn open_deletes_a_lock_pool_left_by_an_earlier_version() {
    let d = tempfile::tempdir().unwrap();
    let pool = d.path().join("state/nixb-lock-pool");
    std::fs::create_dir_all(&pool).unwrap();
    std::fs::write(pool.join("1234-0"), "").unwrap();
    std::fs::write(pool.join("1234-1"), "x").unwrap();
    std::fs::set_permissions(pool.join("1234-1"), std::fs::Permissions::from_mode(0o400)).unwrap();
    drop(open(d.path()));
    assert!(!pool.exists(), "{} is still there", pool.display());
    assert!(d.path().join("state/db/db.sqlite").exists());
}

#[test]
fn refuses_unknown_schema_versions() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    let schema = dir.path().join("state/db/schema");
    for v in ["11", "7", "ten"] {
        std::fs::write(&schema, v).unwrap();
        let e = LocalStore::open(config(dir.path())).unwrap_err();
        assert!(matches!(e, StoreError::Schema { .. }), "{v}: {e}");
        assert!(e.to_string().contains("schema"), "{e}");
    }
}

#[test]
fn register_and_query() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let (a, b, c, d) = (fake(1, "a"), fake(2, "b"), fake(3, "c"), fake(4, "d"));
    let drv = fake(9, "x.drv");
    // c -> b -> a, c -> c (self), d alone.
    let mut ic = info(&c, &[&b, &c]);
    ic.deriver = Some(drv.clone());
    ic.ultimate = true;
    ic.sigs = vec!["k1:AAAA".into(), "k2:BBBB".into()];
    ic.ca = Some("fixed:r:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s".into());
    ic.registration_time = 1234;
    s.register_valid_paths(&[info(&a, &[]), info(&b, &[&a]), ic.clone(), info(&d, &[])])
        .unwrap();

    assert!(s.is_valid_path(&a).unwrap());
    assert!(!s.is_valid_path(&fake(5, "a")).unwrap());
    assert_eq!(s.query_path_info(&c).unwrap().unwrap(), ic);
    assert_eq!(s.query_path_info(&fake(5, "a")).unwrap(), None);
    assert_eq!(s.query_references(&c).unwrap(), set(&[&b, &c]));
    assert_eq!(s.query_referrers(&a).unwrap(), set(&[&b]));
    assert_eq!(s.query_referrers(&c).unwrap(), set(&[&c]));
    assert_eq!(s.compute_closure(&set(&[&c])).unwrap(), set(&[&a, &b, &c]));
    assert_eq!(
        s.compute_closure(&set(&[&b, &d])).unwrap(),
        set(&[&a, &b, &d])
    );
    assert!(matches!(
        s.query_references(&fake(5, "a")),
        Err(StoreError::NotValid(_))
    ));

    // What is on disk is in Nix's format: read the row back with plain SQL.
    let (hash, time, deriver, size, ultimate, sigs): (String, i64, String, i64, i64, String) = raw_db(dir.path())
        .query_row(
            "select hash, registrationTime, deriver, narSize, ultimate, sigs from ValidPaths where path = ?1",
            [s.store_dir().print(&c)],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
        )
        .unwrap();
    assert_eq!(
        hash,
        format!(
            "sha256:{}",
            Hash::digest(HashAlgo::Sha256, c.base_name()).to_hex()
        )
    );
    assert_eq!(time, 1234);
    assert_eq!(deriver, s.store_dir().print(&drv));
    assert_eq!(size, 100 + 1);
    assert_eq!(ultimate, 1);
    assert_eq!(sigs, "k1:AAAA k2:BBBB");
    // Unset optional columns are NULL, as Nix leaves them.
    let (u, sg, ca, dv): (Option<i64>, Option<String>, Option<String>, Option<String>) =
        raw_db(dir.path())
            .query_row(
                "select ultimate, sigs, ca, deriver from ValidPaths where path = ?1",
                [s.store_dir().print(&a)],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap();
    assert_eq!((u, sg, ca, dv), (None, None, None, None));
    // Registration time 0 means now.
    let t = s.query_path_info(&a).unwrap().unwrap().registration_time;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((now - t).abs() < 60, "registration time {t} vs now {now}");
}

#[test]
fn dangling_reference_refused_and_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let (a, b, missing) = (fake(1, "a"), fake(2, "b"), fake(7, "missing"));
    let e = s
        .register_valid_paths(&[info(&a, &[]), info(&b, &[&a, &missing])])
        .unwrap_err();
    match &e {
        StoreError::DanglingReference { path, reference } => {
            assert!(
                path.ends_with("-b") && reference.ends_with("-missing"),
                "{e}"
            );
        }
        other => panic!("unexpected {other}"),
    }
    assert!(
        !s.is_valid_path(&a).unwrap(),
        "a was written although the transaction failed"
    );
    let n: i64 = raw_db(dir.path())
        .query_row("select count(*) from ValidPaths", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0);
    // Registered in the right order (or together) the same paths are fine.
    s.register_valid_paths(&[info(&missing, &[])]).unwrap();
    s.register_valid_paths(&[info(&b, &[&a, &missing]), info(&a, &[])])
        .unwrap();
    assert_eq!(
        s.compute_closure(&set(&[&b])).unwrap(),
        set(&[&a, &b, &missing])
    );
}

#[test]
fn reference_cycles_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let (a, b, c) = (fake(1, "a"), fake(2, "b"), fake(3, "c"));
    let e = s
        .register_valid_paths(&[info(&a, &[&c]), info(&b, &[&a]), info(&c, &[&b])])
        .unwrap_err();
    assert!(matches!(e, StoreError::Cycle(_)), "{e}");
    assert!(!s.is_valid_path(&a).unwrap());
}

#[test]
fn reregistering_updates_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let a = fake(1, "a");
    let mut i = info(&a, &[]);
    i.registration_time = 50;
    s.register_valid_paths(&[i.clone()]).unwrap();
    let mut j = i.clone();
    j.nar_hash = Hash::digest(HashAlgo::Sha256, "other");
    j.nar_size = 999;
    j.ultimate = true;
    j.registration_time = 60;
    s.register_valid_paths(&[j.clone()]).unwrap();
    let got = s.query_path_info(&a).unwrap().unwrap();
    assert_eq!(
        (got.nar_hash, got.nar_size, got.ultimate),
        (j.nar_hash, 999, true)
    );
    // The original registration time stays, as in Nix.
    assert_eq!(got.registration_time, 50);
    let n: i64 = raw_db(dir.path())
        .query_row("select count(*) from ValidPaths", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
}

#[test]
fn invalidate_only_without_referrers() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let (a, b) = (fake(1, "a"), fake(2, "b"));
    s.register_valid_paths(&[info(&a, &[&a]), info(&b, &[&a, &b])])
        .unwrap();
    let e = s.invalidate_path(&a).unwrap_err();
    assert!(matches!(e, StoreError::HasReferrers { .. }), "{e}");
    assert!(s.is_valid_path(&a).unwrap());
    s.invalidate_path(&b).unwrap();
    s.invalidate_path(&a).unwrap();
    assert!(!s.is_valid_path(&a).unwrap() && !s.is_valid_path(&b).unwrap());
    let n: i64 = raw_db(dir.path())
        .query_row("select count(*) from Refs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0);
}

#[test]
fn failed_path_cache() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let (a, b) = (fake(1, "a"), fake(2, "b"));
    assert!(!s.has_path_failed(&a).unwrap());
    s.register_failed_path(&a).unwrap();
    s.register_failed_path(&b).unwrap();
    s.register_failed_path(&a).unwrap(); // twice is fine
    assert!(s.has_path_failed(&a).unwrap() && s.has_path_failed(&b).unwrap());
    drop(s);
    let s = open(dir.path()); // persists
    assert!(s.has_path_failed(&a).unwrap());
    s.clear_failed_paths(&set(&[&a])).unwrap();
    assert!(!s.has_path_failed(&a).unwrap());
    assert!(s.has_path_failed(&b).unwrap());
}

fn hello_drv(store: &StoreDir, src: &StorePath) -> Derivation {
    let mut drv = Derivation {
        outputs: BTreeMap::from([
            ("out".to_string(), DerivationOutput::default()),
            ("dev".to_string(), DerivationOutput::default()),
        ]),
        input_drvs: BTreeMap::new(),
        input_srcs: BTreeSet::from([src.clone()]),
        platform: "x86_64-linux".into(),
        builder: "/bin/sh".into(),
        args: vec!["-c".into(), "echo hi".into()],
        env: BTreeMap::from([
            ("name".to_string(), "hello".to_string()),
            ("builder".to_string(), "/bin/sh".to_string()),
            ("system".to_string(), "x86_64-linux".to_string()),
        ]),
    };
    let mut no_inputs = |p: &StorePath| -> Result<Derivation, nixb_store::derivation::DrvError> {
        panic!("no input derivations expected, asked for {p}")
    };
    compute_output_paths(store, &mut drv, &mut no_inputs, &mut DrvHashCache::new()).unwrap();
    drv
}

#[test]
fn derivations_record_their_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let src = s
        .add_text_to_store("builder.sh", b"echo hi\n", &BTreeSet::new())
        .unwrap();
    let drv = hello_drv(s.store_dir(), &src);
    let drv_path = s.add_derivation(&drv).unwrap();
    assert_eq!(drv_path, drv.drv_path(s.store_dir()).unwrap());
    assert_eq!(s.query_references(&drv_path).unwrap(), set(&[&src]));
    assert_eq!(s.read_derivation(&drv_path).unwrap(), drv);
    let outs = s.query_derivation_outputs(&drv_path).unwrap();
    assert_eq!(outs, drv.output_paths());
    assert_eq!(outs.len(), 2);
    assert!(outs["dev"].name().ends_with("hello-dev"));
    assert_eq!(
        s.query_valid_derivers(&outs["out"]).unwrap(),
        vec![drv_path.clone()]
    );
    assert!(s.query_valid_derivers(&src).unwrap().is_empty());
    // Content address of a text path: text:sha256:<base32 of the contents' sha256>.
    let ca = s.query_path_info(&drv_path).unwrap().unwrap().ca.unwrap();
    let aterm = std::fs::read(s.store_dir().to_path(&drv_path)).unwrap();
    assert_eq!(
        ca,
        format!("text:{}", Hash::digest(HashAlgo::Sha256, &aterm))
    );
    // Invalidating the .drv drops its DerivationOutputs rows.
    s.invalidate_path(&drv_path).unwrap();
    assert!(s.query_valid_derivers(&outs["out"]).unwrap().is_empty());
}

#[test]
fn derivation_with_wrong_output_path_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let src = s
        .add_text_to_store("builder.sh", b"echo hi\n", &BTreeSet::new())
        .unwrap();
    let mut drv = hello_drv(s.store_dir(), &src);
    let bogus = fake(3, "hello");
    drv.outputs.get_mut("out").unwrap().path = Some(bogus.clone());
    drv.env.insert("out".into(), s.store_dir().print(&bogus));
    let e = s.add_derivation(&drv).unwrap_err();
    assert!(matches!(e, StoreError::WrongOutput { .. }), "{e}");
    assert!(e.to_string().contains("incorrect output 'out'"), "{e}");
    let drv_path = drv.drv_path(s.store_dir()).unwrap();
    assert!(!s.is_valid_path(&drv_path).unwrap());
}

#[test]
fn add_text_requires_valid_references() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let ghost = fake(6, "ghost");
    let e = s.add_text_to_store("t", b"x", &set(&[&ghost])).unwrap_err();
    assert!(matches!(e, StoreError::DanglingReference { .. }), "{e}");
}

#[test]
fn add_to_store_copies_canonically() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("sub/f"), b"data").unwrap();
    std::fs::write(src.join("run"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(src.join("run"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("sub/f", src.join("link")).unwrap();
    let p = s.add_to_store(&src, None).unwrap();
    assert_eq!(p.name(), "src");
    let dest = s.store_dir().to_path(&p);
    assert_eq!(std::fs::read(dest.join("sub/f")).unwrap(), b"data");
    assert_eq!(
        std::fs::read_link(dest.join("link")).unwrap(),
        Path::new("sub/f")
    );
    let mode = |f: &str| {
        std::fs::symlink_metadata(dest.join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(
        (mode("run"), mode("sub/f"), mode("sub")),
        (0o555, 0o444, 0o555)
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(dest.join("sub/f")).unwrap().mtime(), 1);
    let i = s.query_path_info(&p).unwrap().unwrap();
    assert_eq!(
        i.ca.as_deref(),
        Some(format!("fixed:r:{}", i.nar_hash).as_str())
    );
    assert!(!dir
        .path()
        .join("store")
        .join(format!("{}.lock", p.base_name()))
        .exists());
    // Adding again is a no-op returning the same path; a different name gives another.
    assert_eq!(s.add_to_store(&src, None).unwrap(), p);
    assert_ne!(s.add_to_store(&src, Some("other")).unwrap(), p);
    assert!(s.verify(true).unwrap().is_clean());
}

#[test]
fn temp_roots_file_as_nix_writes_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let (a, b) = (fake(1, "a"), fake(2, "b"));
    s.add_temp_root(&a).unwrap();
    s.add_temp_root(&b).unwrap();
    let f = dir
        .path()
        .join("state/temproots")
        .join(std::process::id().to_string());
    let expected = format!("{}\0{}\0", s.store_dir().print(&a), s.store_dir().print(&b));
    assert_eq!(std::fs::read_to_string(&f).unwrap(), expected);
    // A path already recorded is not written again.
    s.add_temp_root(&a).unwrap();
    assert_eq!(std::fs::read_to_string(&f).unwrap(), expected);
    // The store keeps gc.lock open between roots but never leaves it locked: a collector
    // can take it exclusively right away.
    let gc = std::fs::File::options()
        .read(true)
        .write(true)
        .open(dir.path().join("state/gc.lock"))
        .unwrap();
    assert!(lock_file(&gc, LockType::Write, false).unwrap());
    lock_file(&gc, LockType::None, false).unwrap();
    // Locked exclusively while the store is open, so a collector knows we are alive.
    let other = std::fs::File::open(&f).unwrap();
    assert!(!lock_file(&other, LockType::Read, false).unwrap());
    drop(s);
    assert!(lock_file(&other, LockType::Read, false).unwrap());
}

#[test]
fn verify_reports_missing_and_corrupt_paths() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let good = s
        .add_text_to_store("good", b"fine", &BTreeSet::new())
        .unwrap();
    let bad = s
        .add_text_to_store("bad", b"original", &BTreeSet::new())
        .unwrap();
    let gone = s
        .add_text_to_store("gone", b"soon", &BTreeSet::new())
        .unwrap();
    assert!(s.verify(true).unwrap().is_clean());
    let bad_file = s.store_dir().to_path(&bad);
    std::fs::set_permissions(&bad_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&bad_file, b"tampered").unwrap();
    std::fs::remove_file(s.store_dir().to_path(&gone)).unwrap();
    let r = s.verify(false).unwrap();
    assert_eq!(r.missing, vec![gone.clone()]);
    assert!(
        r.hash_mismatches.is_empty(),
        "contents checked without check_contents"
    );
    let r = s.verify(true).unwrap();
    assert_eq!(r.checked, 3);
    assert_eq!(r.missing, vec![gone]);
    assert_eq!(r.hash_mismatches.len(), 1);
    assert_eq!(r.hash_mismatches[0].0, bad);
    assert!(r.hash_mismatches.iter().all(|m| m.0 != good));
}

#[test]
fn concurrent_writers_share_the_database() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let root = dir.path().to_path_buf();
            std::thread::spawn(move || {
                // Each thread its own connection, as separate processes would have.
                let s = open(&root);
                for i in 0..25u8 {
                    let base = fake(t * 50 + i + 1, &format!("p{t}-{i}"));
                    let dep = fake(t * 50 + i + 26, &format!("d{t}-{i}"));
                    s.register_valid_paths(&[info(&dep, &[]), info(&base, &[&dep])])
                        .unwrap();
                    s.register_failed_path(&base).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let n: i64 = raw_db(dir.path())
        .query_row("select count(*) from ValidPaths", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 200);
    let r: i64 = raw_db(dir.path())
        .query_row("select count(*) from Refs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(r, 100);
}

#[test]
fn config_from_env_defaults() {
    // Only the pure parts: the defaults when the variables are unset are Nix's.
    let c = StoreConfig {
        store_dir: StoreDir::default(),
        state_dir: "/nix/var/nix".into(),
        log_dir: "/nix/var/log/nix".into(),
    };
    if std::env::var_os("NIX_STORE_DIR").is_none()
        && std::env::var_os("NIX_STATE_DIR").is_none()
        && std::env::var_os("NIX_LOG_DIR").is_none()
    {
        assert_eq!(StoreConfig::from_env().unwrap(), c);
    }
    assert_eq!(c.db_dir(), Path::new("/nix/var/nix/db"));
}

/// While a collector runs it holds `gc.lock` exclusively and takes new temporary roots
/// on `gc-socket/socket`: one absolute path and a newline per root, answered by "1".
/// Play the collector and check the root arrives there and in the roots file.
#[test]
fn temp_root_goes_to_a_running_collector() {
    use std::io::{BufRead, BufReader, Write};
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let state = dir.path().join("state");
    let gc_lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(state.join("gc.lock"))
        .unwrap();
    assert!(lock_file(&gc_lock, LockType::Write, false).unwrap());
    std::fs::create_dir_all(state.join("gc-socket")).unwrap();
    let listener = std::os::unix::net::UnixListener::bind(state.join("gc-socket/socket")).unwrap();
    let collector = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&conn).read_line(&mut line).unwrap();
        (&conn).write_all(b"1").unwrap();
        line
    });
    let a = fake(1, "a");
    s.add_temp_root(&a).unwrap();
    let got = collector.join().unwrap();
    assert_eq!(got, format!("{}\n", s.store_dir().print(&a)));
    let f = state.join("temproots").join(std::process::id().to_string());
    assert_eq!(
        std::fs::read_to_string(f).unwrap(),
        format!("{}\0", s.store_dir().print(&a))
    );
}

/// A thread acting for an owner of its own (a daemon connection) roots paths in the
/// owner's file, `temproots/<pid>-<n>`, which goes with the owner; other threads, and the
/// same thread once its guard is dropped, root them in the process's file.
#[test]
fn a_threads_roots_go_to_its_owner_and_with_it() {
    use nixb_store::temproots::RootsOwner;
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let state = dir.path().join("state");
    let (a, b, c) = (fake(1, "a"), fake(2, "b"), fake(3, "c"));
    let owner = Arc::new(RootsOwner::new(&state, s.store_dir().clone(), 7));
    let owners_file = state
        .join("temproots")
        .join(format!("{}-7", std::process::id()));
    let process_file = state.join("temproots").join(std::process::id().to_string());
    let guard = s.roots_of_this_thread(owner.clone());
    s.add_temp_root(&a).unwrap();
    std::thread::scope(|sc| {
        sc.spawn(|| s.add_temp_root(&b).unwrap());
    });
    drop(guard);
    s.add_temp_root(&c).unwrap();
    let printed = |ps: &[&StorePath]| {
        ps.iter()
            .map(|p| format!("{}\0", s.store_dir().print(p)))
            .collect::<String>()
    };
    assert_eq!(owner.path().as_deref(), Some(owners_file.as_path()));
    assert_eq!(
        std::fs::read_to_string(&owners_file).unwrap(),
        printed(&[&a])
    );
    assert_eq!(
        std::fs::read_to_string(&process_file).unwrap(),
        printed(&[&b, &c])
    );
    drop(owner);
    assert!(!owners_file.exists());
    assert!(process_file.exists());
}

/// The output locks are BSD flock locks, the kind Nix 2.x takes: util-linux's flock(1)
/// (an independent process using flock(2)) must conflict with them both ways.
#[test]
fn path_locks_conflict_with_flock_1() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("out");
    let lf = dir.path().join("out.lock");
    let held = nixb_store::locks::PathLocks::lock(std::slice::from_ref(&p), false, None)
        .unwrap()
        .unwrap();
    let st = std::process::Command::new("flock")
        .args(["-n", "-E", "7"])
        .arg(&lf)
        .arg("true")
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(7), "flock(1) got a lock nixb holds");
    drop(held);
    let mut child = std::process::Command::new("flock")
        .arg(&lf)
        .args(["sh", "-c", "echo ready; sleep 2"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // flock(1) runs the command only once it holds the lock.
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut ready,
    )
    .unwrap();
    assert_eq!(ready.trim(), "ready");
    assert!(
        nixb_store::locks::PathLocks::lock(std::slice::from_ref(&p), false, None)
            .unwrap()
            .is_none()
    );
    child.wait().unwrap();
    assert!(
        nixb_store::locks::PathLocks::lock(std::slice::from_ref(&p), false, None)
            .unwrap()
            .is_some()
    );
}

/// All valid paths come from the database in one query, and a hash part finds exactly its
/// path: not the next one in the table's order, and nothing for a malformed hash part.
#[test]
fn all_valid_paths_and_path_from_hash_part() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let (a, b) = (fake(1, "a"), fake(3, "b"));
    s.register_valid_paths(&[info(&a, &[]), info(&b, &[&a])])
        .unwrap();
    assert_eq!(s.query_all_valid_paths().unwrap(), set(&[&a, &b]));
    assert_eq!(
        s.query_path_from_hash_part(a.hash_part()).unwrap(),
        Some(a.clone())
    );
    assert_eq!(
        s.query_path_from_hash_part(b.hash_part()).unwrap(),
        Some(b.clone())
    );
    // A path not registered whose hash part sorts between a's and b's: the next row (b)
    // must not be taken for it.
    let between = fake(2, "c");
    assert!(a.hash_part() < between.hash_part() && between.hash_part() < b.hash_part());
    assert_eq!(
        s.query_path_from_hash_part(between.hash_part()).unwrap(),
        None
    );
    assert_eq!(
        s.query_path_from_hash_part(&a.hash_part()[..31]).unwrap(),
        None
    );
    assert_eq!(s.query_path_from_hash_part("e").unwrap(), None);
}
