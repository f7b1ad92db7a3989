//! --check and --repair: rebuilding valid outputs at redirected paths and rewriting them back.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use nixb_goals::{BuildMode, Event, FailureKind};
use nixb_store::HashAlgo;

fn nar_hash(t: &TestStore, p: &nixb_store::StorePath) -> nixb_store::Hash {
    nixb_store::nar::hash_path(&t.real(p), HashAlgo::Sha256)
        .unwrap()
        .0
}

#[test]
fn check_accepts_a_deterministic_build_with_self_references() {
    let t = TestStore::new();
    let drv = t.add_drv(spec(
        "det",
        "/bin/mkdir $out; echo $out > $out/self; echo fixed > $out/data",
    ));
    assert_eq!(t.realise(&[&drv]).0.exit_status, 0);
    let out = t.out(&drv);
    let before = nar_hash(&t, &out);
    let mut cfg = t.cfg.clone();
    cfg.build_mode = BuildMode::Check;
    let (outcome, events) = t.realise_with(&[&drv], &cfg);
    assert_eq!(outcome.exit_status, 0, "{:?}", outcome.failures);
    assert!(events.iter().any(|e| matches!(
        e,
        Event::BuildStarted {
            mode: BuildMode::Check,
            ..
        }
    )));
    // The registered output is untouched and no redirected copy is left in the store.
    assert_eq!(nar_hash(&t, &out), before);
    let names: Vec<String> = std::fs::read_dir(t.dir().as_path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with("-det"))
        .collect();
    assert_eq!(names, [out.base_name()]);
}

#[test]
fn check_reports_a_nondeterministic_build() {
    let t = TestStore::new();
    let drv = t.add_drv(spec(
        "nondet",
        "/bin/cat /proc/sys/kernel/random/uuid > $out",
    ));
    assert_eq!(t.realise(&[&drv]).0.exit_status, 0);
    let out = t.out(&drv);
    let before = std::fs::read(t.real(&out)).unwrap();
    let mut cfg = t.cfg.clone();
    cfg.build_mode = BuildMode::Check;
    let (outcome, _) = t.realise_with(&[&drv], &cfg);
    assert_eq!(outcome.exit_status, 104);
    assert_eq!(outcome.failures[0].kind, FailureKind::NotDeterministic);
    assert_eq!(
        outcome.failures[0].message,
        format!(
            "derivation '{}' may not be deterministic: output '{}' differs",
            t.print(&drv),
            t.print(&out)
        )
    );
    assert_eq!(
        std::fs::read(t.real(&out)).unwrap(),
        before,
        "check must not replace the output"
    );
    assert!(t.store.is_valid_path(&out).unwrap());
}

#[test]
fn check_of_an_unbuilt_derivation_is_refused() {
    let t = TestStore::new();
    let drv = t.add_drv(spec("never", "echo > $out"));
    let mut cfg = t.cfg.clone();
    cfg.build_mode = BuildMode::Check;
    let (outcome, events) = t.realise_with(&[&drv], &cfg);
    assert_eq!(outcome.exit_status, 1);
    assert!(started(&events).is_empty());
    assert!(outcome.failures[0]
        .message
        .contains("are not valid, so checking is not possible"));
}

fn corrupt(t: &TestStore, p: &nixb_store::StorePath, file: Option<&str>) {
    let real = t.real(p);
    let target = match file {
        Some(f) => {
            std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o755)).unwrap();
            real.join(f)
        }
        None => real,
    };
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&target, "corrupted\n").unwrap();
}

#[test]
fn repair_rebuilds_a_corrupted_output_in_place() {
    let t = TestStore::new();
    let drv = t.add_drv(spec("fragile", "/bin/mkdir $out; echo $out > $out/self"));
    assert_eq!(t.realise(&[&drv]).0.exit_status, 0);
    let out = t.out(&drv);
    let registered = t.store.query_path_info(&out).unwrap().unwrap().nar_hash;
    corrupt(&t, &out, Some("self"));
    assert_ne!(nar_hash(&t, &out), registered);

    // A normal realise trusts the database.
    let (_, events) = t.realise(&[&drv]);
    assert!(started(&events).is_empty());

    let mut cfg = t.cfg.clone();
    cfg.build_mode = BuildMode::Repair;
    let (outcome, events) = t.realise_with(&[&drv], &cfg);
    assert_eq!(outcome.exit_status, 0, "{:?}", outcome.failures);
    assert_eq!(started(&events), vec![drv.clone()]);
    assert_eq!(nar_hash(&t, &out), registered);
    assert_eq!(
        std::fs::read_to_string(t.real(&out).join("self")).unwrap(),
        format!("{}\n", t.print(&out))
    );
}

#[test]
fn repair_fixes_the_closure_of_intact_outputs() {
    let t = TestStore::new();
    let dep = t.add_drv(spec("dep", "echo dep > $out"));
    let dep_out = t.print(&t.out(&dep));
    let top = t.add_drv(
        spec("top", "echo $dep > $out")
            .input(&dep, &["out"])
            .env("dep", &dep_out),
    );
    assert_eq!(t.realise(&[&top]).0.exit_status, 0);
    let dep_path = t.out(&dep);
    let registered = t
        .store
        .query_path_info(&dep_path)
        .unwrap()
        .unwrap()
        .nar_hash;
    corrupt(&t, &dep_path, None);

    let mut cfg = t.cfg.clone();
    cfg.build_mode = BuildMode::Repair;
    let (outcome, events) = t.realise_with(&[&top], &cfg);
    assert_eq!(outcome.exit_status, 0, "{:?}", outcome.failures);
    assert_eq!(started(&events), vec![dep.clone()]);
    assert_eq!(nar_hash(&t, &dep_path), registered);
    assert!(events.iter().any(|e| matches!(e, Event::Message { text, .. } if text.contains("found corrupted or missing path"))));
}
