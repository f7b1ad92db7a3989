//! What only a root guest with cgroup v2 and a block device can show, run by `cargo xtask
//! test-vm` (see vm_security.rs for the guest): a cgroup per build leaves nothing of the build
//! running, a `uid-range` build owns 65536 ids, and the resource report counts what a builder
//! really used.

mod vm_common;

use std::path::{Path, PathBuf};
use vm_common::*;

const MIB: u64 = 1024 * 1024;

/// A plain (unsandboxed) builder that starts a daemon the textbook way: a double fork, a new
/// session, every descriptor closed; the daemon writes its pid to `<pid_dir>/daemon` and
/// sleeps. The builder waits for the pid file, then succeeds.
fn daemonising(env: &Env, pid_dir: &Path) -> String {
    let bb = "/bin/busybox";
    let pid_file = pid_dir.join("daemon");
    let pid_file = pid_file.display();
    env.sh(
        "daemonising",
        &format!(
            "{bb} setsid {bb} sh -c '{bb} sh -c \"exec 0</dev/null 1>/dev/null 2>&1; \
             echo \\$\\$ > {pid_file}; exec {bb} sleep 100000\" & exit 0'\n\
             while [ ! -s {pid_file} ]; do {bb} sleep 0.05; done\n\
             echo ok > $out"
        ),
        "__noChroot = \"1\";",
    )
}

/// The daemon's pid, and whether it still runs (a zombie waiting for the guest's init to
/// reap it has ended).
fn daemon_alive(pid_dir: &Path) -> (u32, bool) {
    let pid: u32 = std::fs::read_to_string(pid_dir.join("daemon"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let alive = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| {
            !s.lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'))
        })
        .unwrap_or(false);
    (pid, alive)
}

fn pid_dir(env: &Env, name: &str) -> PathBuf {
    let d = env.dir.path().join(name);
    std::fs::create_dir(&d).unwrap();
    // Build users write the pid file too; the test's temporary directory is root's 0700.
    std::fs::set_permissions(
        env.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    d
}

#[test]
fn vm_a_daemonising_grandchild_does_not_outlive_its_build_in_a_cgroup() {
    // As a build user: the cgroup is removed, no process of the build user is left.
    let env = Env::with_mode(Mode::UseCgroups, "", "sandbox = relaxed\n");
    let pids = pid_dir(&env, "pids");
    env.must_build(&daemonising(&env, &pids));
    let (pid, alive) = daemon_alive(&pids);
    assert!(!alive, "the daemon {pid} survived its build");
    assert_eq!(processes_of(&GROUP_UIDS), vec![]);

    // As root without build users only the cgroup can find the daemon: without it (the
    // control) the daemon outlives the build, which the process-group kill cannot prevent.
    let root_conf = "sandbox = false\nbuild-users-group =\n";
    let control = Env::with_mode(Mode::BuildUsers, "", root_conf);
    let pids = pid_dir(&control, "pids");
    control.must_build(&daemonising(&control, &pids));
    let (pid, alive) = daemon_alive(&pids);
    if alive {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::SIGKILL,
        )
        .unwrap();
    }
    assert!(
        alive,
        "without a cgroup the daemon {pid} was expected to survive"
    );

    let env = Env::with_mode(Mode::UseCgroups, "", root_conf);
    let pids = pid_dir(&env, "pids");
    env.must_build(&daemonising(&env, &pids));
    let (pid, alive) = daemon_alive(&pids);
    assert!(!alive, "the daemon {pid} survived its build");
}

#[test]
fn vm_a_uid_range_build_chowns_to_many_uids() {
    let env = Env::with_mode(Mode::AutoAllocateUids, "", "");
    let drv = env.sh(
        "uid-range",
        "set -e; mkdir $out\n\
         for u in 1 1000 30000 65534; do echo $u > $out/f$u; chown $u:$u $out/f$u; done\n\
         mkdir $TMPDIR/d; chown 4242:4343 $TMPDIR/d\n\
         ls -ln $out $TMPDIR > $out/listing\n\
         id -u > $out/uid; cat /proc/self/uid_map > $out/uid_map",
        "requiredSystemFeatures = [ \"uid-range\" ];",
    );
    let out = PathBuf::from(env.must_build(&drv));
    let read = |f: &str| std::fs::read_to_string(out.join(f)).unwrap();
    // Root of its namespace, with a whole block of ids from Nix's range...
    assert_eq!(read("uid"), "0\n");
    let map: Vec<u32> = read("uid_map")
        .split_whitespace()
        .map(|w| w.parse().unwrap())
        .collect();
    assert_eq!((map[0], map[2]), (0, 65536), "{map:?}");
    assert!(
        map[1] >= AUTO_START_ID && (map[1] - AUTO_START_ID).is_multiple_of(65536),
        "{map:?}"
    );
    // ...whose chowns took effect inside (ls -ln: mode, links, uid, gid, ...).
    let listing = read("listing");
    for u in ["1", "1000", "30000", "65534"] {
        assert!(
            listing.lines().any(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.len() > 8 && w[2] == u && w[3] == u && w[8] == format!("f{u}")
            }),
            "no f{u} owned by {u}:{u} in\n{listing}"
        );
    }
    assert!(
        listing.lines().any(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.len() > 8 && w[2] == "4242" && w[3] == "4343" && w[8] == "d"
        }),
        "{listing}"
    );
    // Registered as Nix registers outputs: every file owned by the store's owner (root
    // here) with the canonical modes, and real Nix finds its contents as registered.
    for f in ["f1", "f1000", "f30000", "f65534", "listing"] {
        let st = std::fs::symlink_metadata(out.join(f)).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            (st.uid(), st.gid(), st.mode() & 0o7777),
            (0, 0, 0o444),
            "{f}"
        );
    }
    let verify = run(env.cmd("nix-store").args(["--verify", "--check-contents"]));
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
}

fn within(got: u64, want: u64) -> bool {
    got >= want * 9 / 10 && got <= want * 11 / 10
}

/// The `build-resources` event of `nixb realise --json`.
fn resources(env: &Env, drv: &str) -> serde_json::Value {
    let child = env
        .nixb()
        .args(["realise", "--json", drv])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    env.check_after_build(pid, &out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}\n{}", env.log(drv));
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "build-resources")
        .unwrap_or_else(|| panic!("no build-resources event: {stderr}"))
}

#[test]
fn vm_the_resource_report_shows_200_mib_touched_and_50_mb_written() {
    // A store on the guest's ext4 RAM disk (on tmpfs nothing counts as written), sandboxed
    // python3: 200 MiB touched (one bytes object), freed, then 50 MB written in 1 MB pieces.
    let disk = tempfile::tempdir_in("/disk").expect("the guest has /disk (ext4)");
    // Build users reach their store through it.
    std::fs::set_permissions(
        disk.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    for mode in [Mode::UseCgroups, Mode::BuildUsers] {
        let mut env = Env::with_mode(mode, "/usr /lib? /lib64?", "");
        env.private_store(&disk.path().join(format!("{mode:?}")));
        let drv = env.drv(&format!(
            "name = \"hungry-{mode:?}\"; builder = \"/usr/bin/python3\"; args = [ \"-c\" ''\n\
             import os\n\
             b = b'x' * (200 * 1024 * 1024)\n\
             del b\n\
             piece = b'y' * 1_000_000\n\
             with open(os.environ['out'], 'wb') as f:\n\
             \x20   for _ in range(50): f.write(piece)\n'' ];"
        ));
        let ev = resources(&env, &drv);
        let peak = ev["peak-memory-bytes"].as_u64().unwrap();
        let written = ev["written-bytes"].as_u64().unwrap();
        assert!(
            within(peak, 200 * MIB) && within(written, 50_000_000),
            "{mode:?}: peak {peak}, written {written}: {ev}"
        );
    }
}
