//! A cgroup v2 per builder, for real: made below this process's own cgroup, which needs
//! root (or delegation). Without it the tests fail when CI is set and are skipped otherwise.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use nixb_sandbox::{start, CgroupRoot, Isolation, Personality, SandboxSpec};

fn cgroup_root() -> Option<CgroupRoot> {
    match CgroupRoot::open() {
        Ok(r) => Some(r),
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "cgroup tests need a cgroup v2 hierarchy this process may write to, and CI is set: {e}"
            );
            eprintln!("skipping: {e}");
            None
        }
    }
}

fn sh(script: &str, cwd: PathBuf, log: OwnedFd, cgroup: Option<PathBuf>) -> SandboxSpec {
    SandboxSpec {
        program: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        cwd,
        log_fd: log,
        user: None,
        personality: Personality::default(),
        isolation: Isolation::Plain,
        announce: None,
        cgroup,
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

/// The builder starts a daemon (a new session: out of its process group) and exits.
/// The daemon's pid, once the builder has been reaped.
fn run_daemonising_builder(cgroup: Option<PathBuf>) -> i32 {
    let dir = tempfile::tempdir().unwrap();
    let (r, w) = nix::unistd::pipe().unwrap();
    // The daemon says its own pid ($! may be a subshell's).
    let script = "setsid sh -c 'echo $$ > pid.tmp && mv pid.tmp pid; exec sleep 1000' \
                  </dev/null >/dev/null 2>&1 & while [ ! -e pid ]; do :; done; cat pid";
    let mut b = start(sh(script, dir.path().to_path_buf(), w, cgroup)).expect("start");
    let mut out = String::new();
    std::fs::File::from(r).read_to_string(&mut out).unwrap();
    let st = b.wait().unwrap();
    assert!(st.success(), "{st:?} {out}");
    out.trim().parse().expect("the daemon's pid")
}

#[test]
fn a_daemonising_grandchild_dies_with_its_builders_cgroup_which_is_removed() {
    let Some(root) = cgroup_root() else {
        return;
    };
    // Without a cgroup the daemon outlives the process-group kill: what the cgroup is for.
    let escaped = run_daemonising_builder(None);
    assert!(alive(escaped), "the daemon did not even start");
    // SAFETY: kill(2) of the daemon this test started.
    unsafe { libc::kill(escaped, libc::SIGKILL) };

    let cg = root.create().unwrap();
    let daemon = run_daemonising_builder(Some(cg.clone()));
    // `wait` returned only once the cgroup was empty: no polling needed here.
    assert!(!alive(daemon), "process {daemon} outlived its build");
    // Removed off the waiting thread.
    nixb_sandbox::settle_cgroups();
    assert!(!cg.exists(), "cgroup {} left behind", cg.display());
}

#[test]
fn kill_takes_the_whole_cgroup_and_usage_comes_from_it() {
    let Some(root) = cgroup_root() else {
        return;
    };
    let cg = root.create().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (r, w) = nix::unistd::pipe().unwrap();
    // Busy for a moment (CPU time to report), then a daemon, then wait forever.
    let script = "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; \
                  setsid sh -c 'echo $$ > pid.tmp && mv pid.tmp pid; exec sleep 1000' \
                  </dev/null >/dev/null 2>&1 & while [ ! -e pid ]; do :; done; cat pid; \
                  exec sleep 1000";
    let mut b = start(sh(script, dir.path().to_path_buf(), w, Some(cg.clone()))).unwrap();
    let mut log = std::fs::File::from(r);
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while log.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    let daemon: i32 = String::from_utf8(line).unwrap().trim().parse().unwrap();
    let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap();
    assert!(
        // The daemon and the builder (and `cat`, perhaps still exiting).
        procs.lines().any(|p| p == daemon.to_string()) && procs.lines().count() >= 2,
        "{procs}"
    );
    b.kill().unwrap();
    b.wait().unwrap();
    assert!(!alive(daemon));
    nixb_sandbox::settle_cgroups();
    assert!(!cg.exists());
    let usage = b.resource_usage().unwrap();
    assert!(
        usage.user + usage.system > std::time::Duration::ZERO,
        "{usage:?}"
    );
}

/// The kernel's version as (major, minor).
fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Runs a builder in a new cgroup that prints its own `/proc/self/cgroup`; how it got there
/// and what it printed.
fn entry_and_own_cgroup(root: &CgroupRoot) -> (Option<nixb_sandbox::CgroupEntry>, String, PathBuf) {
    let cg = root.create().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (r, w) = nix::unistd::pipe().unwrap();
    let mut b = start(sh(
        "cat /proc/self/cgroup",
        dir.path().to_path_buf(),
        w,
        Some(cg.clone()),
    ))
    .unwrap();
    let mut out = String::new();
    std::fs::File::from(r).read_to_string(&mut out).unwrap();
    assert!(b.wait().unwrap().success(), "{out}");
    (b.cgroup_entry(), out, cg)
}

#[test]
fn builders_are_born_in_their_cgroup_or_move_in_where_clone3_is_off() {
    let Some(root) = cgroup_root() else {
        return;
    };
    let in_it = |out: &str, cg: &std::path::Path| {
        let name = cg.file_name().unwrap().to_str().unwrap();
        out.lines()
            .any(|l| l.starts_with("0::") && l.ends_with(&format!("/{name}")))
    };
    let (entry, out, cg) = entry_and_own_cgroup(&root);
    assert!(in_it(&out, &cg), "not in {}: {out}", cg.display());
    // CLONE_INTO_CGROUP is Linux 5.7's; nixb asks for it on x86_64.
    if cfg!(target_arch = "x86_64") && kernel_version() >= (5, 7) {
        assert_eq!(entry, Some(nixb_sandbox::CgroupEntry::Clone3));
    } else {
        assert!(
            matches!(entry, Some(nixb_sandbox::CgroupEntry::Procs { .. })),
            "{entry:?}"
        );
    }
    // The way of kernels without the flag: the child's own write to cgroup.procs.
    nixb_sandbox::set_clone_into_cgroup(false);
    let (entry, out, cg) = entry_and_own_cgroup(&root);
    nixb_sandbox::set_clone_into_cgroup(true);
    assert!(in_it(&out, &cg), "not in {}: {out}", cg.display());
    assert_eq!(
        entry,
        Some(nixb_sandbox::CgroupEntry::Procs { refused: None })
    );
    // Without a cgroup, no entry.
    let dir = tempfile::tempdir().unwrap();
    let (_r, w) = nix::unistd::pipe().unwrap();
    let mut b = start(sh("true", dir.path().to_path_buf(), w, None)).unwrap();
    b.wait().unwrap();
    assert_eq!(b.cgroup_entry(), None);
}
