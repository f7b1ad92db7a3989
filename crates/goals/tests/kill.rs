//! When the worker dies, even by SIGKILL, its builders die too, and the next worker cleans
//! up the build directory they left.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const CHILD_ENV: &str = "NIXB_GOALS_KILL_TEST_ROOT";

/// Alive and not a zombie (a container's init may be slow to reap).
fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let state = stat
                .rsplit_once(')')
                .map(|(_, r)| r.trim_start().chars().next());
            state != Some(Some('Z'))
        }
        Err(_) => false,
    }
}

fn wait_for_file(p: &Path, limit: Duration) -> String {
    let start = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(p) {
            if s.ends_with('\n') {
                return s;
            }
        }
        assert!(start.elapsed() < limit, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn long_build(t: &TestStore, root: &Path) -> nixb_store::StorePath {
    let r = root.display();
    t.add_drv(spec(
        "long",
        &format!("echo $$ > {r}/pid.tmp; /bin/mv {r}/pid.tmp {r}/pid; /bin/sleep 1000 & echo $! > {r}/bg.tmp; /bin/mv {r}/bg.tmp {r}/bgpid; /bin/sleep 1000"),
    ))
}

#[test]
fn builders_die_with_a_killed_worker() {
    if let Some(root) = std::env::var_os(CHILD_ENV) {
        // The worker process to be killed: realise a build that never ends.
        let root = PathBuf::from(root);
        let t = TestStore::at(tempfile::TempDir::new_in(&root).unwrap());
        let mut cfg = t.cfg.clone();
        cfg.build_dir_root = root.join("build");
        let drv = long_build(&t, &root);
        t.realise_with(&[&drv], &cfg);
        unreachable!("the build never ends");
    }

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir(root.join("build")).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "builders_die_with_a_killed_worker",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, root)
        .spawn()
        .unwrap();
    let pid: i32 = wait_for_file(&root.join("pid"), Duration::from_secs(60))
        .trim()
        .parse()
        .unwrap();
    let bg: i32 = wait_for_file(&root.join("bgpid"), Duration::from_secs(10))
        .trim()
        .parse()
        .unwrap();
    assert!(running(pid) && running(bg));
    assert_eq!(
        std::fs::read_dir(root.join("build")).unwrap().count(),
        2,
        "a build dir and its lock"
    );

    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();

    let start = Instant::now();
    while running(pid) || running(bg) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "builder {pid} or its child {bg} survived the worker"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // The next worker removes what the dead one left in the build directory root.
    let t = TestStore::new();
    let mut cfg = t.cfg.clone();
    cfg.build_dir_root = root.join("build");
    let quick = t.add_drv(spec("quick", "echo > $out"));
    assert_eq!(t.realise_with(&[&quick], &cfg).0.exit_status, 0);
    assert_eq!(std::fs::read_dir(root.join("build")).unwrap().count(), 0);
}
