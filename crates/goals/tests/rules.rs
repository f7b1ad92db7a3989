//! Fixed outputs, reference restrictions, exportReferencesGraph, timeouts, log limits, the
//! failure cache.

mod common;

use std::time::{Duration, Instant};

use common::*;
use nixb_goals::{Event, FailureKind};
use nixb_store::{Hash, HashAlgo};

fn sha256(data: &[u8]) -> Hash {
    Hash::digest(HashAlgo::Sha256, data)
}

#[test]
fn fixed_output_flat_good_and_bad_hash() {
    let t = TestStore::new();
    let good = t.add_drv(spec("fetched", "echo -n hello > $out").fixed(false, sha256(b"hello")));
    let (outcome, _) = t.realise(&[&good]);
    assert_eq!(outcome.exit_status, 0, "{:?}", outcome.failures);
    // Content address as Nix 2.x renders it: fixed:<algo>:<base32> (with r: when recursive).
    assert_eq!(
        t.store.ca(&t.out(&good)),
        Some(format!("fixed:{}", sha256(b"hello").to_base32_typed()))
    );

    let wanted = sha256(b"something else");
    let bad = t.add_drv(spec("fetched2", "echo -n hello > $out").fixed(false, wanted.clone()));
    let (outcome, _) = t.realise(&[&bad]);
    assert_eq!(outcome.exit_status, 102);
    assert_eq!(outcome.failures[0].kind, FailureKind::HashMismatch);
    // The wording of Nix 2.8 (see `nix-store -r` of a fixed-output derivation with a wrong hash).
    assert_eq!(
        outcome.failures[0].message,
        format!(
            "hash mismatch in fixed-output derivation '{}':\n  specified: {}\n     got:    {}",
            t.print(&bad),
            wanted.encode(nixb_store::Encoding::Sri),
            "sha256-LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ="
        )
    );
    assert!(!t.store.is_valid_path(&t.out(&bad)).unwrap());
    // Fixed-output failures are not cached even with cache-failure on.
    let mut cfg = t.cfg.clone();
    cfg.cache_failure = true;
    t.realise_with(&[&bad], &cfg);
    assert!(!t.store.has_path_failed(&t.out(&bad)).unwrap());
}

#[test]
fn fixed_output_flat_must_be_a_plain_file_and_recursive_hashes_the_nar() {
    let t = TestStore::new();
    let exe = t.add_drv(
        spec("exe", "echo -n hello > $out; /bin/chmod +x $out").fixed(false, sha256(b"hello")),
    );
    let (outcome, _) = t.realise(&[&exe]);
    // Fixed-output failures are never permanent (they are usually the network's fault).
    assert_eq!(outcome.exit_status, 1);
    assert!(
        outcome.failures[0]
            .message
            .contains("should be a non-executable regular file"),
        "{:?}",
        outcome.failures
    );

    // The recursive hash of a directory holding one file, computed by our NAR code on an
    // identical tree made here.
    let model = t.root().join("model");
    std::fs::create_dir(&model).unwrap();
    std::fs::write(model.join("f"), "hi").unwrap();
    let (h, _) = nixb_store::nar::hash_path(&model, HashAlgo::Sha256).unwrap();
    let rec = t.add_drv(spec("rec", "/bin/mkdir $out; echo -n hi > $out/f").fixed(true, h));
    let (outcome, _) = t.realise(&[&rec]);
    assert_eq!(outcome.exit_status, 0, "{:?}", outcome.failures);
}

#[test]
fn allowed_and_disallowed_references() {
    let t = TestStore::new();
    let dep = t.add_drv(spec("dep", "echo dep > $out"));
    let dep_out = t.print(&t.out(&dep));
    let refers = |name: &str, var: &str, val: &str| {
        t.add_drv(
            spec(name, "echo $dep > $out")
                .input(&dep, &["out"])
                .env("dep", &dep_out)
                .env(var, val),
        )
    };
    let ok = refers("ok", "allowedReferences", &dep_out);
    let (outcome, _) = t.realise(&[&ok]);
    assert_eq!(outcome.exit_status, 0, "{:?}", outcome.failures);

    let bad = refers("bad", "allowedReferences", "");
    let (outcome, _) = t.realise(&[&bad]);
    assert_eq!(outcome.exit_status, 100);
    assert_eq!(
        outcome.failures[0].message,
        format!(
            "output '{}' is not allowed to refer to the following paths:\n  {dep_out}",
            t.print(&t.out(&bad))
        )
    );
    assert!(!t.store.is_valid_path(&t.out(&bad)).unwrap());

    let bad2 = refers("bad2", "disallowedRequisites", &dep_out);
    assert_eq!(t.realise(&[&bad2]).0.exit_status, 100);
    let fine = refers("fine", "disallowedReferences", "out");
    assert_eq!(t.realise(&[&fine]).0.exit_status, 0);
}

#[test]
fn export_references_graph_writes_the_closure() {
    let t = TestStore::new();
    let src = t.add_text("src", "text");
    let dep = t.add_drv(
        spec("dep", "echo $src > $out")
            .src(&src)
            .env("src", &t.print(&src)),
    );
    let g = t.add_drv(
        spec("graph", "/bin/cat refs > $out")
            .input(&dep, &["out"])
            .env(
                "exportReferencesGraph",
                &format!("refs {}", t.print(&t.out(&dep))),
            ),
    );
    let (outcome, _) = t.realise(&[&g]);
    assert_eq!(outcome.exit_status, 0, "{:?}", outcome.failures);
    let text = std::fs::read_to_string(t.real(&t.out(&g))).unwrap();
    // The layout Nix 2.8 writes (observed with a real exportReferencesGraph build).
    let (d, s) = (t.print(&t.out(&dep)), t.print(&src));
    let mut blocks = [format!("{d}\n\n1\n{s}\n"), format!("{s}\n\n0\n")];
    blocks.sort();
    assert_eq!(text, blocks.concat());
}

#[test]
fn max_silent_time_and_timeout_kill_the_builder() {
    let t = TestStore::new();
    let silent = t.add_drv(spec("silent", "echo start; /bin/sleep 30; echo x > $out"));
    let mut cfg = t.cfg.clone();
    cfg.max_silent_time = Some(Duration::from_secs(1));
    let start = Instant::now();
    let (outcome, events) = t.realise_with(&[&silent], &cfg);
    assert!(start.elapsed() < Duration::from_secs(10));
    assert_eq!(outcome.exit_status, 101);
    assert_eq!(outcome.failures[0].kind, FailureKind::TimedOut);
    assert_eq!(
        outcome.failures[0].message,
        format!(
            "building of '{}' timed out after 1 seconds of silence",
            t.print(&silent)
        )
    );
    assert!(log_of(&events, &silent).contains("start"));

    // Chatty but endless: only the overall timeout stops it.
    let chatty = t.add_drv(spec(
        "chatty",
        "while :; do echo tick; /bin/sleep 0.2; done",
    ));
    let mut cfg = t.cfg.clone();
    cfg.max_silent_time = Some(Duration::from_secs(5));
    cfg.timeout = Some(Duration::from_secs(1));
    let start = Instant::now();
    let (outcome, _) = t.realise_with(&[&chatty], &cfg);
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(outcome.exit_status, 101);
    assert_eq!(
        outcome.failures[0].message,
        format!(
            "building of '{}' timed out after 1 seconds",
            t.print(&chatty)
        )
    );
    assert_eq!(std::fs::read_dir(&cfg.build_dir_root).unwrap().count(), 0);
}

#[test]
fn log_limit_kills_the_builder() {
    let t = TestStore::new();
    let noisy = t.add_drv(spec(
        "noisy",
        "while :; do echo 0123456789abcdef0123456789abcdef; done",
    ));
    let mut cfg = t.cfg.clone();
    cfg.log.max_size = Some(10_000);
    let (outcome, events) = t.realise_with(&[&noisy], &cfg);
    assert_eq!(outcome.exit_status, 1);
    assert_eq!(outcome.failures[0].kind, FailureKind::LogLimitExceeded);
    assert_eq!(
        outcome.failures[0].message,
        format!(
            "building of '{}' killed after writing more than 10000 bytes of log output",
            t.print(&noisy)
        )
    );
    let logged = log_of(&events, &noisy).len();
    assert!(logged > 10_000 && logged < 200_000, "{logged}");
}

#[test]
fn failure_cache_refuses_a_second_attempt() {
    let t = TestStore::new();
    let counter = t.root().join("runs");
    let bad = t.add_drv(spec(
        "bad",
        &format!("echo run >> {}; exit 1", counter.display()),
    ));
    let mut cfg = t.cfg.clone();
    cfg.cache_failure = true;
    assert_eq!(t.realise_with(&[&bad], &cfg).0.exit_status, 100);
    assert!(t.store.has_path_failed(&t.out(&bad)).unwrap());
    let (outcome, events) = t.realise_with(&[&bad], &cfg);
    assert_eq!(outcome.exit_status, 100);
    assert_eq!(outcome.failures[0].kind, FailureKind::CachedFailure);
    assert!(started(&events).is_empty());
    assert_eq!(std::fs::read_to_string(&counter).unwrap(), "run\n");
    // Without the cache it is tried again.
    assert_eq!(t.realise(&[&bad]).0.exit_status, 100);
    assert_eq!(std::fs::read_to_string(&counter).unwrap(), "run\nrun\n");
}

#[test]
fn missing_input_source_fails_the_dependent() {
    let t = TestStore::new();
    // A source path that was never added: valid in nobody's eyes.
    let ghost =
        nixb_store::StorePath::from_base_name("00000000000000000000000000000000-ghost").unwrap();
    let drv = t.add_drv(spec("needs-ghost", "echo > $out").src(&ghost));
    let (outcome, events) = t.realise(&[&drv]);
    assert_eq!(outcome.exit_status, 1);
    assert!(started(&events).is_empty());
    assert!(events.iter().any(|e| matches!(
        e,
        Event::BuildFailed {
            kind: FailureKind::DependencyFailed,
            ..
        }
    )));
}

#[test]
fn max_jobs_zero_cannot_build() {
    let t = TestStore::new();
    let drv = t.add_drv(spec("x", "echo > $out"));
    let mut cfg = t.cfg.clone();
    cfg.max_jobs = 0;
    let targets = [nixb_store::DerivedPath::Built {
        drv,
        outputs: vec![],
    }];
    let e = nixb_goals::realise(&t.store, &targets, &cfg, &mut nixb_goals::NullSink).unwrap_err();
    assert_eq!(
        e.to_string(),
        "unable to start any build; either increase '--max-jobs' or enable remote builds"
    );
}
