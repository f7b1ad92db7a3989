//! End-to-end builds with real `/bin/sh` builders in a private store.

mod common;

use std::collections::BTreeSet;

use common::*;
use nixb_goals::{Event, FailureKind};

#[test]
fn simple_build_registers_its_output() {
    let t = TestStore::new();
    let drv = t.add_drv(spec("hello", "echo building; echo hello > $out"));
    let (outcome, events) = t.realise(&[&drv]);
    assert_eq!(outcome.exit_status, 0, "{:?}", outcome.failures);
    let out = t.out(&drv);
    assert_eq!(std::fs::read_to_string(t.real(&out)).unwrap(), "hello\n");
    let info = t
        .store
        .query_path_info(&out)
        .unwrap()
        .expect("output registered");
    assert_eq!(info.deriver.as_ref(), Some(&drv));
    // Independently hashed: the registered NAR hash is that of the file on disk.
    let (h, n) = nixb_store::nar::hash_path(&t.real(&out), nixb_store::HashAlgo::Sha256).unwrap();
    assert_eq!((info.nar_hash, info.nar_size), (h, n));
    assert!(log_of(&events, &drv).contains("building\n"));
    assert_eq!(outcome.outputs.len(), 1);
    assert_eq!(outcome.outputs[0].1["out"], out);
    // Metadata canonicalised: read-only, mtime 1.
    let md = std::fs::metadata(t.real(&out)).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(md.mode() & 0o777, 0o444);
    assert_eq!(md.mtime(), 1);
    // The build directory is gone.
    assert_eq!(std::fs::read_dir(&t.cfg.build_dir_root).unwrap().count(), 0);
    // A second realise builds nothing.
    let (outcome, events) = t.realise(&[&drv]);
    assert_eq!(outcome.exit_status, 0);
    assert!(started(&events).is_empty());
    // The log went to Nix's layout.
    let log = nixb_logs::read_log(&t.cfg.log.log_dir, drv.base_name()).unwrap();
    assert_eq!(String::from_utf8(log).unwrap(), "building\n");
}

#[test]
fn chain_and_diamond_build_each_derivation_once() {
    let t = TestStore::new();
    let counter = t.root().join("counter");
    let c = counter.display().to_string();
    let base = t.add_drv(spec("base", &format!("echo base >> {c}; echo base > $out")));
    let left = t.add_drv(
        spec(
            "left",
            &format!("echo left >> {c}; read x < $base; echo $x-left > $out"),
        )
        .input(&base, &["out"])
        .env("base", &t.print(&t.out(&base))),
    );
    let right = t.add_drv(
        spec(
            "right",
            &format!("echo right >> {c}; read x < $base; echo $x-right > $out"),
        )
        .input(&base, &["out"])
        .env("base", &t.print(&t.out(&base))),
    );
    let top = t.add_drv(
        spec(
            "top",
            &format!("echo top >> {c}; read a < $l; read b < $r; echo $a $b $l $r > $out"),
        )
        .input(&left, &["out"])
        .input(&right, &["out"])
        .env("l", &t.print(&t.out(&left)))
        .env("r", &t.print(&t.out(&right))),
    );
    let mut cfg = t.cfg.clone();
    cfg.max_jobs = 2;
    let (outcome, _) = t.realise_with(&[&top, &left], &cfg);
    assert_eq!(outcome.exit_status, 0, "{:?}", outcome.failures);
    let runs = std::fs::read_to_string(&counter).unwrap();
    let mut lines: Vec<&str> = runs.lines().collect();
    assert_eq!(lines[0], "base");
    assert_eq!(lines[3], "top");
    lines.sort();
    assert_eq!(lines, ["base", "left", "right", "top"]);
    assert_eq!(
        std::fs::read_to_string(t.real(&t.out(&top))).unwrap(),
        format!(
            "base-left base-right {} {}\n",
            t.print(&t.out(&left)),
            t.print(&t.out(&right))
        )
    );
    // References were found by scanning.
    let refs = t.store.query_references(&t.out(&top)).unwrap();
    assert_eq!(refs, BTreeSet::from([t.out(&left), t.out(&right)]));
}

/// A `.drv` never changes once valid, so the worker reads each one a bounded number of times
/// however often the graph names it (base: its own goal, and both dependents' input
/// closures; top: its goal and the outcome's output list): once to plan, and once more
/// when its inputs are there (a goal waiting for inputs holds only its outputs, so that a
/// wide graph's pending goals stay small). Inputs' output paths are never read again.
#[test]
fn each_derivation_is_read_once_and_again_after_its_inputs() {
    let t = TestStore::new();
    let base = t.add_drv(spec("base", "echo base > $out"));
    let mut mid = Vec::new();
    for name in ["left", "right"] {
        mid.push(
            t.add_drv(
                spec(name, "read x < $base; echo $x > $out")
                    .input(&base, &["out"])
                    .env("base", &t.print(&t.out(&base))),
            ),
        );
    }
    let top = t.add_drv(
        spec("top", "read a < $l; read b < $r; echo $a $b > $out")
            .input(&mid[0], &["out"])
            .input(&mid[1], &["out"])
            .env("l", &t.print(&t.out(&mid[0])))
            .env("r", &t.print(&t.out(&mid[1]))),
    );
    t.store.take_drv_reads();
    let (outcome, _) = t.realise(&[&top]);
    assert_eq!(outcome.exit_status, 0, "{:?}", outcome.failures);
    let reads = t.store.take_drv_reads();
    let expected: std::collections::BTreeMap<_, _> =
        [(&base, 1), (&mid[0], 2), (&mid[1], 2), (&top, 2)]
            .into_iter()
            .map(|(d, n)| (d.clone(), n))
            .collect();
    assert_eq!(reads, expected);
}

#[test]
fn multiple_outputs_and_wanted_subsets() {
    let t = TestStore::new();
    let drv = t.add_drv(
        spec("multi", "echo o > $out; echo d > $dev; echo $out > $doc")
            .outputs(&["out", "dev", "doc"]),
    );
    let targets = [nixb_store::DerivedPath::Built {
        drv: drv.clone(),
        outputs: vec!["dev".into()],
    }];
    let mut sink = nixb_goals::VecSink::default();
    let outcome = nixb_goals::realise(&t.store, &targets, &t.cfg, &mut sink).unwrap();
    assert_eq!(outcome.exit_status, 0, "{:?}", outcome.failures);
    let outs = t.outputs(&drv);
    assert_eq!(outcome.outputs[0].1.keys().collect::<Vec<_>>(), ["dev"]);
    // A build always produces and registers every output.
    for p in outs.values() {
        assert!(t.store.is_valid_path(p).unwrap());
    }
    assert_eq!(outs["dev"].name(), "multi-dev");
    let doc_refs = t.store.query_references(&outs["doc"]).unwrap();
    assert_eq!(doc_refs, BTreeSet::from([outs["out"].clone()]));
}

#[test]
fn failure_stops_without_keep_going_and_continues_with_it() {
    let t = TestStore::new();
    let bad = t.add_drv(spec("bad", "echo oops; exit 3"));
    let slow_ok = t.add_drv(spec("ok", "/bin/sleep 1; echo ok > $out"));
    let (outcome, events) = t.realise(&[&bad, &slow_ok]);
    assert_eq!(outcome.exit_status, 100);
    assert!(!t.store.is_valid_path(&t.out(&slow_ok)).unwrap());
    let failed: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::BuildFailed {
                drv,
                reason,
                permanent,
                ..
            } => Some((drv.clone(), reason.clone(), *permanent)),
            _ => None,
        })
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].0, bad);
    assert_eq!(
        failed[0].1,
        format!("builder for '{}' failed with exit code 3", t.print(&bad))
    );
    assert!(failed[0].2);
    assert_eq!(
        std::fs::read_dir(&t.cfg.build_dir_root).unwrap().count(),
        0,
        "no builder left behind"
    );

    let mut cfg = t.cfg.clone();
    cfg.keep_going = true;
    let dependent = t.add_drv(spec("dep", "echo > $out").input(&bad, &["out"]));
    let (outcome, events) = t.realise_with(&[&dependent, &slow_ok], &cfg);
    assert_eq!(outcome.exit_status, 100);
    assert!(t.store.is_valid_path(&t.out(&slow_ok)).unwrap());
    let kinds: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::BuildFailed { drv, kind, .. } => Some((drv.clone(), *kind)),
            _ => None,
        })
        .collect();
    assert!(kinds.contains(&(bad.clone(), FailureKind::BuilderFailed)));
    assert!(kinds.contains(&(dependent.clone(), FailureKind::DependencyFailed)));
}

#[test]
fn keep_failed_keeps_the_build_directory() {
    let t = TestStore::new();
    let bad = t.add_drv(spec("bad", "echo left > $TMPDIR/marker; exit 1"));
    let mut cfg = t.cfg.clone();
    cfg.keep_failed = true;
    let (outcome, _) = t.realise_with(&[&bad], &cfg);
    assert_eq!(outcome.exit_status, 100);
    let dirs: Vec<_> = std::fs::read_dir(&cfg.build_dir_root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    assert_eq!(
        std::fs::read_to_string(dirs[0].join("marker")).unwrap(),
        "left\n"
    );
}

#[test]
fn missing_output_is_an_error() {
    let t = TestStore::new();
    let drv = t.add_drv(spec("lazy", "true"));
    let (outcome, _) = t.realise(&[&drv]);
    assert_eq!(outcome.exit_status, 100);
    assert_eq!(
        outcome.failures[0].message,
        format!(
            "builder for '{}' failed to produce output path '{}'",
            t.print(&drv),
            t.print(&t.out(&drv))
        )
    );
}

#[test]
fn background_child_holding_stdout_does_not_keep_the_build_alive() {
    let t = TestStore::new();
    let drv = t.add_drv(spec(
        "bg",
        "(/bin/sleep 30; echo late) & echo done > $out; echo bye",
    ));
    let start = std::time::Instant::now();
    let (outcome, events) = t.realise(&[&drv]);
    assert_eq!(outcome.exit_status, 0, "{:?}", outcome.failures);
    assert!(
        start.elapsed() < std::time::Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
    assert!(log_of(&events, &drv).contains("bye"));
    assert!(!log_of(&events, &drv).contains("late"));
}

#[test]
fn builder_that_closes_its_output_early_still_finishes() {
    let t = TestStore::new();
    let drv = t.add_drv(spec("closer", "exec >&- 2>&-; /bin/sleep 1; echo x > $out"));
    let (outcome, _) = t.realise(&[&drv]);
    assert_eq!(outcome.exit_status, 0, "{:?}", outcome.failures);
    assert!(t.store.is_valid_path(&t.out(&drv)).unwrap());
}

#[test]
fn a_builder_that_cannot_be_executed_fails_the_goal() {
    let t = TestStore::new();
    let drv = t.add_drv(spec("nobuilder", "").builder("/nonexistent/builder"));
    let (outcome, events) = t.realise(&[&drv]);
    assert_eq!(outcome.exit_status, 1);
    let msg = &outcome.failures[0].message;
    assert!(
        msg.starts_with(&format!(
            "failed to set up the build environment for '{}'",
            t.print(&drv)
        )),
        "{msg}"
    );
    assert!(
        msg.contains("No such file or directory") || msg.contains("ENOENT"),
        "{msg}"
    );
    assert!(!events
        .iter()
        .any(|e| matches!(e, Event::BuildSucceeded { .. })));
    assert_eq!(std::fs::read_dir(&t.cfg.build_dir_root).unwrap().count(), 0);
}

#[test]
fn two_targets_wanting_different_outputs_share_one_build() {
    let t = TestStore::new();
    let counter = t.root().join("runs");
    let drv = t.add_drv(
        spec(
            "split",
            &format!(
                "echo run >> {}; echo > $out; echo > $dev",
                counter.display()
            ),
        )
        .outputs(&["out", "dev"]),
    );
    let targets = [
        nixb_store::DerivedPath::Built {
            drv: drv.clone(),
            outputs: vec!["out".into()],
        },
        nixb_store::DerivedPath::Built {
            drv: drv.clone(),
            outputs: vec!["dev".into()],
        },
    ];
    let mut sink = nixb_goals::VecSink::default();
    let outcome = nixb_goals::realise(&t.store, &targets, &t.cfg, &mut sink).unwrap();
    assert_eq!(outcome.exit_status, 0, "{:?}", outcome.failures);
    assert_eq!(std::fs::read_to_string(&counter).unwrap(), "run\n");
    let outs = t.outputs(&drv);
    assert_eq!(
        outcome.outputs[0].1,
        std::collections::BTreeMap::from([("out".to_string(), outs["out"].clone())])
    );
    assert_eq!(
        outcome.outputs[1].1,
        std::collections::BTreeMap::from([("dev".to_string(), outs["dev"].clone())])
    );
}
