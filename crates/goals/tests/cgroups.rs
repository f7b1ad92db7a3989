//! `use-cgroups` through the engine: each builder in a cgroup v2 of its own, killed as one
//! and removed. Needs a cgroup v2 hierarchy this process may make cgroups in (root, or
//! delegation); without it the tests fail when CI is set and are skipped otherwise.

mod common;

use common::*;
use nixb_goals::{Event, Level};

fn cgroup_dir() -> Option<std::path::PathBuf> {
    match nixb_sandbox::CgroupRoot::open() {
        Ok(r) => Some(r.dir().to_path_buf()),
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "cgroup tests need a writable cgroup v2 hierarchy and CI is set: {e}"
            );
            eprintln!("skipping: {e}");
            None
        }
    }
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Builds a derivation whose builder starts a daemon (its own session, so out of the
/// builder's process group) and exits; the daemon's pid.
fn build_with_daemon(t: &TestStore, use_cgroups: bool, name: &str) -> (i32, Vec<Event>) {
    let mut cfg = t.cfg.clone();
    cfg.use_cgroups = use_cgroups;
    let drv = t.add_drv(spec(
        name,
        "/usr/bin/setsid /bin/sh -c 'echo $$ > $out.tmp && /bin/mv $out.tmp $out; \
         exec /bin/sleep 1000' </dev/null >/dev/null 2>&1 & \
         while [ ! -e $out ]; do :; done",
    ));
    let (outcome, events) = t.realise_with(&[&drv], &cfg);
    assert_eq!(outcome.exit_status, 0, "{}", log_of(&events, &drv));
    let pid = std::fs::read_to_string(t.real(&t.out(&drv)))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (pid, events)
}

#[test]
fn a_build_that_daemonises_leaves_nothing_running_with_use_cgroups() {
    let Some(dir) = cgroup_dir() else {
        return;
    };
    let t = TestStore::new();
    // Without cgroups the daemon escapes the process-group kill.
    let (escaped, _) = build_with_daemon(&t, false, "escapes");
    let survived = alive(escaped);
    // SAFETY: kill(2) of the daemon this test's build started.
    unsafe { libc::kill(escaped, libc::SIGKILL) };
    assert!(survived, "the daemon did not even start");

    let (daemon, events) = build_with_daemon(&t, true, "confined");
    assert!(!alive(daemon), "process {daemon} outlived its build");
    // No warning; at debug level, how the builder entered its cgroup.
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::Message { level, .. } if *level != Level::Debug)),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Message { level: Level::Debug, text }
            if text.contains("born in it by clone3(CLONE_INTO_CGROUP)")
                || text.contains("moved in by its own write to cgroup.procs"))),
        "{events:?}"
    );
    // Build cgroups are removed off the worker's thread, and empty spares are made ahead.
    nixb_sandbox::settle_cgroups();
    let spares = nixb_sandbox::spare_cgroups();
    for s in &spares {
        let procs = std::fs::read_to_string(s.join("cgroup.procs")).unwrap();
        assert_eq!(procs, "", "spare {} is in use", s.display());
    }
    let ours = format!("nixb-{}-", std::process::id());
    let left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&ours) && !spares.contains(&dir.join(n)))
        .collect();
    assert!(left.is_empty(), "cgroups left behind: {left:?}");
}
