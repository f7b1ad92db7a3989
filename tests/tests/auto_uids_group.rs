//! `auto-allocate-uids` with a `build-users-group` that names no group, as root on the host
//! (no user or group is made: the group's name is one nobody has). A build without a sandbox
//! runs with the group's gid, so it cannot start: nixb fails as Nix does, naming the setting
//! and the group, and real Nix 2.8 (which has no `auto-allocate-uids`, warns that it does not
//! know the setting, and needs the group for every build as root) fails on the same store with
//! the same message. Neither leaves the output behind.

use nixb_tests::{run, run_str, TestStore};
use serde_json::json;

const GROUP: &str = "nixb-test-no-such-group";

fn add_drv(t: &TestStore, name: &str, script: &str) -> String {
    let system = format!("{}-linux", std::env::consts::ARCH);
    let drv = json!({
        "outputs": { "out": { "path": "" } },
        "inputSrcs": [],
        "inputDrvs": {},
        "system": system,
        "builder": "/bin/sh",
        "args": ["-c", script],
        "env": { "name": name, "builder": "/bin/sh", "system": system, "out": "" },
    });
    run_str(
        t.nixb().args(["derivation", "add"]),
        Some(drv.to_string().as_bytes()),
    )
}

#[test]
fn a_missing_build_users_group_fails_a_build_without_sandbox_as_in_nix() {
    nixb_testsupport::require!(Root, Nix);
    assert!(
        nix::unistd::Group::from_name(GROUP).unwrap().is_none(),
        "the host has a group named {GROUP}"
    );
    // A range of uids no other test on this host uses.
    let t = TestStore::with_conf(&format!(
        "sandbox = false\nbuild-users-group = {GROUP}\nauto-allocate-uids = true\n\
         start-id = 930000000\nid-count = 65536\nsubstituters =\n"
    ));
    let drv = add_drv(&t, "needs-group", "echo built > $out");
    let out_path = run_str(t.nixb().args(["query", "--outputs", &drv]), None);
    let want = format!("the group '{GROUP}' specified in 'build-users-group' does not exist");

    let nix = run(t.nix("nix-store").args(["--realise", &drv]), None);
    let nix_err = String::from_utf8_lossy(&nix.stderr);
    assert!(!nix.status.success(), "Nix 2.8 built it: {nix_err}");
    assert!(nix_err.contains(&want), "Nix 2.8 said: {nix_err}");

    let nixb = run(t.nixb().args(["realise", &drv]), None);
    let nixb_err = String::from_utf8_lossy(&nixb.stderr);
    assert!(!nixb.status.success(), "nixb built it: {nixb_err}");
    assert!(nixb_err.contains(&want), "nixb said: {nixb_err}");
    // And why a group is wanted at all with automatically allocated uids.
    assert!(nixb_err.contains("'auto-allocate-uids'"), "{nixb_err}");
    assert!(
        !std::path::Path::new(&out_path).exists(),
        "{out_path} was left behind"
    );
}
