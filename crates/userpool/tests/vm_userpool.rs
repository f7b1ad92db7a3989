//! Build users for real: run by `cargo xtask test-vm` in a VM, as root, where the guest has
//! group `nixbld` (gid 30000) with members nixbld1..nixbld8 (uids 30001..30008, in that
//! order), an empty group `nixbempty` and a group `nixbextra` (30200) holding nixbld2.
//! Built only with the `vm` feature; run with `--test-threads=1` (the tests share the users).

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nixb_userpool::{
    acquire, acquire_or_fail, check_store_permissions, chown_tmp_dir, kill_user, UserPoolConfig,
    UserPoolError,
};

const GID: u32 = 30000;

fn setup() -> (tempfile::TempDir, UserPoolConfig) {
    assert_eq!(
        std::env::var("NIXB_IN_VM").as_deref(),
        Ok("1"),
        "VM tests need the guest that `cargo xtask test-vm` sets up (root, build users)"
    );
    assert!(nix::unistd::geteuid().is_root(), "VM tests run as root");
    let state = tempfile::tempdir().unwrap();
    let cfg = UserPoolConfig {
        group: "nixbld".into(),
        state_dir: state.path().to_path_buf(),
    };
    (state, cfg)
}

/// Another process holding a build user (or not) until dropped.
struct Holder {
    child: Child,
    line: String,
}

impl Holder {
    fn spawn(cfg: &UserPoolConfig, as_user: Option<u32>) -> Holder {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vm_helper"));
        cmd.arg("hold").arg(&cfg.group).arg(&cfg.state_dir);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        if let Some(uid) = as_user {
            cmd.uid(uid).gid(GID);
        }
        let mut child = cmd.spawn().expect("spawning vm_helper");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        Holder {
            child,
            line: line.trim_end().to_string(),
        }
    }

    fn uid(&self) -> u32 {
        let rest = self
            .line
            .strip_prefix("uid=")
            .unwrap_or_else(|| panic!("helper said '{}'", self.line));
        rest.split(' ').next().unwrap().parse().unwrap()
    }

    fn release(mut self) {
        drop(self.child.stdin.take());
        self.child.wait().unwrap();
    }
}

#[test]
fn vm_first_free_member_with_its_groups() {
    let (_state, cfg) = setup();
    let a = acquire(&cfg).unwrap().expect("a free user");
    assert_eq!((a.uid, a.gid, a.name.as_str()), (30001, GID, "nixbld1"));
    assert_eq!(a.lock_path(), cfg.state_dir.join("userpool/30001"));
    assert_eq!(a.supplementary_gids, vec![GID]);
    let b = acquire(&cfg).unwrap().expect("a second free user");
    assert_eq!((b.uid, b.name.as_str()), (30002, "nixbld2"));
    let mut groups = b.supplementary_gids.clone();
    groups.sort();
    assert_eq!(groups, vec![GID, 30200], "nixbld2 is also in nixbextra");
    drop(a);
    let c = acquire(&cfg).unwrap().expect("nixbld1 again");
    assert_eq!(c.uid, 30001, "a released user is handed out again");
}

#[test]
fn vm_two_processes_get_different_users() {
    let (_state, cfg) = setup();
    let p1 = Holder::spawn(&cfg, None);
    let p2 = Holder::spawn(&cfg, None);
    let mine = acquire(&cfg).unwrap().expect("a free user");
    let uids = [p1.uid(), p2.uid(), mine.uid];
    assert_eq!(
        uids,
        [30001, 30002, 30003],
        "each process skips the users the others hold"
    );
    p1.release();
    p2.release();
}

#[test]
fn vm_exhausted_pool() {
    let (_state, cfg) = setup();
    let others: Vec<Holder> = (0..4).map(|_| Holder::spawn(&cfg, None)).collect();
    let mine: Vec<_> = (0..4)
        .map(|_| acquire(&cfg).unwrap().expect("a free user"))
        .collect();
    let mut uids: Vec<u32> = others
        .iter()
        .map(Holder::uid)
        .chain(mine.iter().map(|u| u.uid))
        .collect();
    uids.sort();
    assert_eq!(uids, (30001..=30008).collect::<Vec<_>>());

    assert!(acquire(&cfg).unwrap().is_none());
    let late = Holder::spawn(&cfg, None);
    assert_eq!(
        late.line, "none",
        "another process must not get a user either"
    );
    late.release();
    let err = acquire_or_fail(&cfg).unwrap_err();
    assert_eq!(
        err.to_string(),
        "all build users are currently in use; consider creating additional users and adding them to the 'nixbld' group"
    );

    // A user another process held comes back once that process is gone.
    let mut others = others;
    let freed = others.remove(2);
    let freed_uid = freed.uid();
    freed.release();
    assert_eq!(
        acquire(&cfg).unwrap().expect("the freed user").uid,
        freed_uid
    );
    others.into_iter().for_each(Holder::release);
}

#[test]
fn vm_group_errors() {
    let (_state, mut cfg) = setup();
    cfg.group = "nixbempty".into();
    assert_eq!(
        acquire(&cfg).unwrap_err().to_string(),
        "the build users group 'nixbempty' has no members"
    );
    cfg.group = "nixb-no-such-group".into();
    assert_eq!(
        acquire(&cfg).unwrap_err().to_string(),
        "the group 'nixb-no-such-group' specified in 'build-users-group' does not exist"
    );
}

#[test]
fn vm_caller_in_the_group_is_refused() {
    let (state, cfg) = setup();
    std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let h = Holder::spawn(&cfg, Some(30003));
    assert_eq!(
        h.line,
        "error: the Nix user (uid 30003) should not be a member of 'nixbld' (it is, as 'nixbld3')"
    );
    h.release();
}

/// Processes (not zombies) whose real uid is `uid`.
fn live_processes_of(uid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap_or("")
                .trim()
                .to_string()
        };
        let ruid: u32 = field("Uid:")
            .split_whitespace()
            .next()
            .unwrap_or("")
            .parse()
            .unwrap_or(u32::MAX);
        let zombie = field("State:").starts_with('Z') || field("State:").starts_with('X');
        if ruid == uid && !zombie {
            out.push(pid);
        }
    }
    out
}

/// The child's exit status, or `None` if it is still running after 10 s (then it is killed,
/// so that a failing test does not hang the VM until its timeout).
fn wait_briefly(child: &mut Child) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

fn spawn_as(uid: u32, script: &str) -> Child {
    Command::new("/bin/sh")
        .args(["-c", script])
        .uid(uid)
        .gid(GID)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawning a process as a build user")
}

#[test]
fn vm_kill_all_processes_of_a_user() {
    let (_state, cfg) = setup();
    let user = acquire(&cfg).unwrap().expect("a free user");
    let bystander = 30008;
    assert_ne!(user.uid, bystander);

    let mut direct = spawn_as(user.uid, "exec sleep 1000");
    // A daemon: its parent exits at once, so it is reparented away from us.
    let mut parent = spawn_as(user.uid, "sleep 1000 </dev/null >/dev/null 2>&1 & echo $!");
    let mut pid_line = String::new();
    BufReader::new(parent.stdout.as_mut().unwrap())
        .read_line(&mut pid_line)
        .unwrap();
    parent.wait().unwrap();
    let daemon: i32 = pid_line.trim().parse().expect("daemon pid");
    let mut other = spawn_as(bystander, "exec sleep 1000");

    let deadline = Instant::now() + Duration::from_secs(10);
    while live_processes_of(user.uid).len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        live_processes_of(user.uid).contains(&daemon),
        "daemon not running"
    );

    user.kill_all_processes().unwrap();

    let status = direct.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "direct child: {status:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !live_processes_of(user.uid).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        live_processes_of(user.uid),
        Vec::<i32>::new(),
        "processes of uid {} survived",
        user.uid
    );
    assert!(
        other.try_wait().unwrap().is_none(),
        "a process of another build user was killed"
    );
    assert!(!live_processes_of(bystander).is_empty());

    // Nothing left to kill is fine too.
    user.kill_all_processes().unwrap();

    kill_user(bystander).unwrap();
    let status = wait_briefly(&mut other).expect("bystander still running after kill_user");
    assert_eq!(status.signal(), Some(libc::SIGKILL));
}

#[test]
fn vm_store_permissions_and_tmp_dir() {
    let (state, cfg) = setup();
    check_store_permissions(Path::new("/nix/store"), GID).unwrap();
    let err = check_store_permissions(Path::new("/nix/store"), 0).unwrap_err();
    assert_eq!(
        err.to_string(),
        "builder does not have write permission to '/nix/store'; try 'chgrp 0 /nix/store; chmod 1775 /nix/store'"
    );

    // Builders must be able to reach the directories below (tempdir makes it 0700).
    std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let store = state.path().join("store");
    std::fs::create_dir(&store).unwrap();
    std::os::unix::fs::chown(&store, Some(0), Some(GID)).unwrap();
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o0775)).unwrap();
    assert!(matches!(
        check_store_permissions(&store, GID),
        Err(UserPoolError::StorePermissions { .. })
    ));
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o1775)).unwrap();
    check_store_permissions(&store, GID).unwrap();

    // With the check passed, a builder of another uid can create in the store but not
    // remove what a third uid created: that is what the mode is for.
    let user = acquire(&cfg).unwrap().expect("a free user");
    let tmp = state.path().join("build-tmp");
    std::fs::create_dir(&tmp).unwrap();
    chown_tmp_dir(&tmp, &user).unwrap();
    let md = std::fs::metadata(&tmp).unwrap();
    assert_eq!((md.uid(), md.gid()), (user.uid, GID));

    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "echo ok > {0}/out && touch {1}/x && echo done",
            tmp.display(),
            store.display()
        ))
        .uid(user.uid)
        .gid(GID)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "builder could not write: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(store.join("theirs"), b"").unwrap();
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("rm -f {}/theirs", store.display()))
        .uid(user.uid)
        .gid(GID)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "sticky store let a builder delete another's file"
    );
}
