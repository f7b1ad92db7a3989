//! `auto-allocate-uids` through the engine, as root on the host without any build user:
//! builds take a block of uids from `start-id` on and run in a user namespace mapped onto
//! it; a `uid-range` build is root in there with all 65536. Without root the tests fail
//! when CI is set and are skipped otherwise.

mod common;

use common::*;
use nixb_goals::{SandboxMode, WorkerConfig};

const BUSYBOX: &str = "/usr/bin/busybox";

fn have_root() -> bool {
    nixb_testsupport::required(&[nixb_testsupport::Need::Root])
}

/// A range nobody else uses on this host, so that parallel tests do not meet.
fn auto(t: &TestStore, start_id: u32) -> WorkerConfig {
    let mut cfg = t.cfg.clone();
    cfg.sandbox = SandboxMode::On;
    cfg.sandbox_paths = vec![format!("/bin/sh={BUSYBOX}")];
    cfg.auto_allocate_uids = true;
    cfg.start_id = start_id;
    cfg.id_count = 4 * 65536;
    cfg.build_users_group = Some("no-such-group-nixb".into());
    // The blocks' lock files in the test's own state directory, never the host's.
    cfg.state_dir = t.root().join("state");
    cfg.system_features.insert("uid-range".into());
    cfg
}

#[test]
fn builds_run_as_1000_inside_mapped_onto_an_allocated_block() {
    if !have_root() {
        return;
    }
    let t = TestStore::new();
    let first = 900_000_000;
    let cfg = auto(&t, first);
    let drv = t.add_drv(spec(
        "auto",
        "exec > $out; id -u; id -g; cat /proc/self/uid_map /proc/self/gid_map",
    ));
    let (outcome, events) = t.realise_with(&[&drv], &cfg);
    assert_eq!(outcome.exit_status, 0, "{}", log_of(&events, &drv));
    let out = std::fs::read_to_string(t.real(&t.out(&drv))).unwrap();
    let words: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(
        words,
        [
            "1000",
            "100",
            "1000",
            &first.to_string(),
            "1",
            "100",
            &first.to_string(),
            "1"
        ],
        "{out}"
    );
    // The block was locked where Nix keeps its own, and is free again.
    let block = nixb_userpool::acquire_auto(&nixb_userpool::AutoUidConfig {
        state_dir: cfg.state_dir.clone(),
        start_id: first,
        id_count: 65536,
    })
    .unwrap()
    .expect("the block released after the build");
    assert_eq!(block.lock_path(), t.root().join("state/userpool2/slot-0"));
}

#[test]
fn a_uid_range_build_is_root_inside_and_chowns_to_its_other_ids() {
    if !have_root() {
        return;
    }
    let t = TestStore::new();
    let first = 910_000_000;
    let cfg = auto(&t, first);
    let drv = t.add_drv(
        spec(
            "range",
            "cd $TMPDIR && touch a b && chown 1:2 a && chown 65535:1000 b && \
             (id -u; cat /proc/self/uid_map; stat -c '%u:%g' a b) > $out",
        )
        .env("requiredSystemFeatures", "uid-range"),
    );
    let (outcome, events) = t.realise_with(&[&drv], &cfg);
    assert_eq!(outcome.exit_status, 0, "{}", log_of(&events, &drv));
    let out = std::fs::read_to_string(t.real(&t.out(&drv))).unwrap();
    let words: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(
        words,
        ["0", "0", &first.to_string(), "65536", "1:2", "65535:1000"],
        "{out}"
    );

    // Without the feature offered, the derivation is not built here.
    let mut cfg = cfg;
    cfg.system_features.remove("uid-range");
    let other = t.add_drv(spec("range2", "echo > $out").env("requiredSystemFeatures", "uid-range"));
    let (outcome, _) = t.realise_with(&[&other], &cfg);
    assert_ne!(outcome.exit_status, 0);
}
