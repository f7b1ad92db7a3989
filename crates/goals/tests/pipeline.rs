//! The order in which the worker finishes builds and starts new ones, and the build log
//! made while the builder already runs.

mod common;

use common::*;
use nixb_goals::{Event, FailureKind};
use nixb_store::StorePath;

/// The build events in the order they were reported, as ("started" | "succeeded" |
/// "failed", derivation name).
fn build_events(events: &[Event]) -> Vec<(&'static str, String)> {
    let name = |d: &StorePath| d.name().trim_end_matches(".drv").to_string();
    events
        .iter()
        .filter_map(|e| match e {
            Event::BuildStarted { drv, .. } => Some(("started", name(drv))),
            Event::BuildSucceeded { drv } => Some(("succeeded", name(drv))),
            Event::BuildFailed { drv, .. } => Some(("failed", name(drv))),
            _ => None,
        })
        .collect()
}

/// With one build slot and three independent builds, the slot the first build frees goes
/// to the next one before the first is checked and registered: each build starts before
/// its predecessor is reported done. Expected order worked out by hand from that rule.
#[test]
fn a_freed_slot_starts_the_next_build_before_the_exited_one_is_registered() {
    let t = TestStore::new();
    let drvs: Vec<StorePath> = ["a", "b", "c"]
        .iter()
        .map(|n| t.add_drv(spec(n, "echo $name > $out").env("name", n)))
        .collect();
    let mut cfg = t.cfg.clone();
    cfg.max_jobs = 1;
    let refs: Vec<&StorePath> = drvs.iter().collect();
    let (outcome, events) = t.realise_with(&refs, &cfg);
    assert_eq!(outcome.exit_status, 0, "{:?}", outcome.failures);
    let got = build_events(&events);
    let s = |k: &'static str, n: &str| (k, n.to_string());
    assert_eq!(
        got,
        [
            s("started", "a"),
            s("started", "b"),
            s("succeeded", "a"),
            s("started", "c"),
            s("succeeded", "b"),
            s("succeeded", "c"),
        ],
        "{got:?}"
    );
    // Deferring the registration lost nothing: every output is valid and reads back.
    for (d, n) in drvs.iter().zip(["a", "b", "c"]) {
        let out = t.out(d);
        assert!(t.store.query_path_info(&out).unwrap().is_some(), "{n}");
        assert_eq!(
            std::fs::read_to_string(t.real(&out)).unwrap(),
            format!("{n}\n")
        );
    }
}

/// A builder that failed is dealt with at once: without keep-going the run stops before the
/// slot it freed goes to the next build, which therefore never starts.
#[test]
fn a_failed_build_stops_the_run_before_its_slot_is_reused() {
    let t = TestStore::new();
    let bad = t.add_drv(spec("bad", "exit 3"));
    let good = t.add_drv(spec("good", "echo good > $out"));
    let mut cfg = t.cfg.clone();
    cfg.max_jobs = 1;
    cfg.keep_going = false;
    let (outcome, events) = t.realise_with(&[&bad, &good], &cfg);
    assert_eq!(outcome.exit_status, 100, "{:?}", outcome.failures);
    assert_eq!(started(&events), vec![bad]);
    assert!(t.store.query_path_info(&t.out(&good)).unwrap().is_none());
}

/// The log file is made on a helper thread while the builder runs. When it cannot be made
/// (here the log directory is a regular file), the build still fails with the error naming
/// the derivation and the file, not permanently (exit status 1, as the original's failure
/// to open the log before the builder started), and its output is not registered: both for
/// a builder that prints (found at its first output) and one that stays silent (found when
/// it exits).
#[test]
fn a_log_that_cannot_be_created_fails_the_build() {
    for (name, script) in [
        ("loud", "echo hello; echo x > $out"),
        ("quiet", "echo x > $out"),
    ] {
        let t = TestStore::new();
        let drv = t.add_drv(spec(name, script));
        let blocked = t.root().join("not-a-dir");
        std::fs::write(&blocked, "").unwrap();
        let mut cfg = t.cfg.clone();
        cfg.log.log_dir = blocked.clone();
        let (outcome, events) = t.realise_with(&[&drv], &cfg);
        assert_eq!(outcome.exit_status, 1, "{name}: {:?}", outcome.failures);
        assert_eq!(outcome.failures.len(), 1, "{name}");
        let f = &outcome.failures[0];
        assert_eq!(f.path, drv, "{name}");
        assert_eq!(f.kind, FailureKind::SetupFailed, "{name}");
        assert!(
            f.message
                .starts_with(&format!("creating the build log of '{}': ", t.print(&drv))),
            "{name}: {}",
            f.message
        );
        assert!(
            f.message.contains(&blocked.display().to_string()),
            "{name}: {}",
            f.message
        );
        assert!(
            t.store.query_path_info(&t.out(&drv)).unwrap().is_none(),
            "{name}"
        );
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, Event::BuildSucceeded { .. })),
            "{name}"
        );
    }
}

/// A derivation that is not valid still gets its substitution goal (a valid one goes straight
/// on without one): with no substituter to provide it, the goal fails as the original words
/// it, not permanently.
#[test]
fn a_missing_derivation_fails_through_its_substitution_goal() {
    let t = TestStore::new();
    let missing =
        StorePath::from_base_name("0123456789abcdfghijklmnpqrsvwxyz-missing.drv").unwrap();
    let (outcome, events) = t.realise(&[&missing]);
    assert_eq!(outcome.exit_status, 1, "{:?}", outcome.failures);
    let f = outcome
        .failures
        .iter()
        .find(|f| f.path == missing)
        .expect("a failure for the derivation");
    assert_eq!(
        f.message,
        format!("cannot build missing derivation '{}'", t.print(&missing))
    );
    assert!(started(&events).is_empty());
}
