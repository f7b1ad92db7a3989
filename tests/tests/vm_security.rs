//! The sandbox and build users, attacked for real: run by `cargo xtask test-vm` in a VM as
//! root, with the guest's `/nix/store` (1775 root:nixbld), group `nixbld` (gid 30000, members
//! nixbld1..8 = uids 30001..30008), the real `nixb` (`$NIXB_BIN`) and real Nix 2.8 (the
//! host's `/usr` over 9p). Builds use `sandbox = true` and `build-users-group = nixbld`; the
//! builders are the guest's static busybox bound in as `/bin/sh`, or python3 with `/usr`
//! bound in.
//!
//! Each attack is an attempt the builder makes; the test asserts that it failed, and failed
//! for the reason the isolation gives (the errno text in the build log, or the engine's
//! rejection), and that nothing changed outside.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const BUILD_UIDS: std::ops::RangeInclusive<u32> = 30001..=30008;

fn in_vm() {
    assert_eq!(
        std::env::var("NIXB_IN_VM").as_deref(),
        Ok("1"),
        "VM tests need the guest that `cargo xtask test-vm` sets up (root, build users)"
    );
    assert!(nix::unistd::geteuid().is_root(), "VM tests run as root");
}

fn nixb_bin() -> PathBuf {
    PathBuf::from(std::env::var_os("NIXB_BIN").expect("NIXB_BIN is set by the VM suite"))
}

fn nonce() -> String {
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    format!("{}-{}", t.as_nanos(), std::process::id())
}

/// A nix.conf directory (and a place for files) for one test.
struct Env {
    dir: tempfile::TempDir,
    /// Extra environment (a private store for the pool test).
    vars: Vec<(String, String)>,
}

impl Env {
    fn new(extra_paths: &str, extra_conf: &str) -> Env {
        in_vm();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("nix.conf"),
            format!(
                "sandbox = true\nbuild-users-group = nixbld\n\
                 sandbox-paths = /bin/sh=/bin/busybox /bin/busybox {extra_paths}\n{extra_conf}"
            ),
        )
        .unwrap();
        Env {
            dir,
            vars: Vec::new(),
        }
    }

    fn python() -> Env {
        Env::new("/usr /lib? /lib64?", "")
    }

    fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        c.env("NIX_CONF_DIR", self.dir.path())
            .env("HOME", self.dir.path())
            .env("XDG_CACHE_HOME", self.dir.path().join("cache"));
        for (k, v) in &self.vars {
            c.env(k, v);
        }
        c
    }

    fn nixb(&self) -> Command {
        self.cmd(nixb_bin())
    }

    /// A derivation made by real `nix-instantiate` from `attrs` (Nix attribute text).
    fn drv(&self, attrs: &str) -> String {
        let f = self.dir.path().join(format!("d-{}.nix", nonce()));
        std::fs::write(
            &f,
            format!(
                "derivation ({{ system = builtins.currentSystem; nonce = \"{}\"; }} // {{ {attrs} }})",
                nonce()
            ),
        )
        .unwrap();
        ok(self.cmd("nix-instantiate").arg(&f)).trim().to_string()
    }

    /// A busybox-shell derivation running `script` (Nix '' string contents).
    fn sh(&self, name: &str, script: &str, more: &str) -> String {
        self.drv(&format!(
            "name = \"{name}\"; builder = \"/bin/sh\"; args = [ \"-c\" ''\n{script}\n'' ]; {more}"
        ))
    }

    fn realise(&self, drv: &str) -> Output {
        run(self.nixb().args(["realise", drv]))
    }

    fn log(&self, drv: &str) -> String {
        String::from_utf8_lossy(&run(self.nixb().args(["log", drv])).stdout).into_owned()
    }

    fn output(&self, drv: &str) -> String {
        ok(self.cmd("nix-store").args(["-q", "--outputs", drv]))
            .trim()
            .to_string()
    }

    /// Builds `drv`, asserting that the build failed permanently; returns log + stderr.
    fn must_fail(&self, drv: &str) -> String {
        let out = self.realise(drv);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(100),
            "the build of {drv} was expected to fail\nstderr: {stderr}"
        );
        format!("{}\n{stderr}", self.log(drv))
    }

    fn must_build(&self, drv: &str) -> String {
        let out = self.realise(drv);
        assert!(
            out.status.success(),
            "building {drv}: {}\nstderr: {}\nlog: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log(drv)
        );
        self.output(drv)
    }
}

fn run(c: &mut Command) -> Output {
    c.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {c:?}: {e}"))
}

fn ok(c: &mut Command) -> String {
    let out = run(c);
    assert!(
        out.status.success(),
        "{c:?}: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn assert_has(text: &str, what: &str) {
    assert!(text.contains(what), "expected '{what}' in:\n{text}");
}

/// Some line of `text` contains every one of `parts` (busybox words its errors
/// `cat: can't open '<path>': <errno text>`).
fn assert_line(text: &str, parts: &[&str]) {
    assert!(
        text.lines().any(|l| parts.iter().all(|p| l.contains(p))),
        "expected a line with {parts:?} in:\n{text}"
    );
}

/// Pids of processes running as a build user.
fn build_user_processes() -> Vec<(u32, u32)> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|u| u.parse::<u32>().ok());
        if let Some(uid) = uid.filter(|u| BUILD_UIDS.contains(u)) {
            found.push((pid, uid));
        }
    }
    found
}

#[test]
fn vm_reading_an_undeclared_store_path_fails() {
    let env = Env::new("", "");
    let secret = env.dir.path().join("secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let secret = ok(env.cmd("nix-store").arg("--add").arg(&secret))
        .trim()
        .to_string();
    let drv = env.sh("sneaky", &format!("cat {secret} > $out"), "");
    let log = env.must_fail(&drv);
    assert_line(&log, &[&secret, "No such file or directory"]);
    // Declared, the same read works (so the failure above is the sandbox's doing).
    let drv = env.sh(
        "honest",
        &format!("cat {secret} > $out"),
        &format!("src = builtins.storePath \"{secret}\";"),
    );
    let out = env.must_build(&drv);
    assert_eq!(std::fs::read_to_string(out).unwrap(), "s3cret\n");
}

#[test]
fn vm_connecting_to_the_guests_loopback_fails() {
    let env = Env::python();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let drv = env.drv(&format!(
        "name = \"connect\"; builder = \"/usr/bin/python3\"; args = [ \"-c\" ''\n\
         import socket\n\
         socket.create_connection((\"127.0.0.1\", {port}), timeout=5).sendall(b\"leak\")\n\
         open(__import__(\"os\").environ[\"out\"], \"w\").write(\"x\")\n'' ];"
    ));
    let log = env.must_fail(&drv);
    assert_has(&log, "ConnectionRefusedError");
    assert!(
        listener.accept().is_err(),
        "the builder reached the listener"
    );
}

#[test]
fn vm_host_processes_are_invisible() {
    let env = Env::new("", "");
    let me = std::process::id();
    let drv = env.sh(
        "proc",
        &format!(
            "ls /proc | grep '^[0-9]' > /tmp/pids; cat /tmp/pids\n\
             cat /proc/{me}/status > $out"
        ),
        "",
    );
    let log = env.must_fail(&drv);
    assert_line(
        &log,
        &[&format!("/proc/{me}/status"), "No such file or directory"],
    );
    // The listing shows only the sandbox (sh, ls, grep at most), PID 1 among them.
    let pids: Vec<u32> = log
        .lines()
        .take_while(|l| !l.contains("No such file"))
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert!(
        pids.contains(&1) && pids.len() <= 3,
        "pids seen: {pids:?}\n{log}"
    );
}

#[test]
fn vm_writing_outside_outputs_and_tmp_fails_or_stays_inside() {
    let env = Env::new("", "");
    let input = env.dir.path().join("input");
    std::fs::write(&input, "in\n").unwrap();
    let input = ok(env.cmd("nix-store").arg("--add").arg(&input))
        .trim()
        .to_string();
    let n = nonce();
    let drv = env.sh(
        "vandal",
        &format!(
            "echo x >> /etc/passwd || echo REFUSED-ETC\n\
             echo x >> {input} || echo REFUSED-INPUT\n\
             echo x > /nix/store/nixb-evil-{n} ; echo x > /tmp/nixb-evil-{n}\n\
             echo x > /nix/var/nixb-evil-{n} || echo REFUSED-VAR\n\
             echo ok > $out"
        ),
        &format!("src = builtins.storePath \"{input}\";"),
    );
    let out = env.must_build(&drv);
    let log = env.log(&drv);
    assert_line(&log, &["/etc/passwd", "Permission denied"]);
    // The build user is refused by the file's mode (0444 root) before the read-only bind
    // is even consulted; as root it would be "Read-only file system" (see goals' host tests).
    assert!(
        log.lines().any(|l| l.contains(input.as_str())
            && (l.contains("Permission denied") || l.contains("Read-only file system"))),
        "{log}"
    );
    assert_has(&log, "REFUSED-INPUT");
    assert_has(&log, "REFUSED-VAR");
    assert_eq!(std::fs::read_to_string(&input).unwrap(), "in\n");
    assert!(!Path::new(&format!("/nix/store/nixb-evil-{n}")).exists());
    assert!(!Path::new(&format!("/tmp/nixb-evil-{n}")).exists());
    assert!(!std::fs::read_to_string("/etc/passwd")
        .unwrap()
        .ends_with("x\n"));
    assert_eq!(std::fs::read_to_string(out).unwrap(), "ok\n");
}

#[test]
fn vm_background_processes_are_killed() {
    // In the chroot (PID namespace) and outside it (relaxed + __noChroot: the build user's
    // processes are killed by uid).
    let env = Env::new("", "");
    let drv = env.sh(
        "daemon",
        "(setsid sleep 1000 &) ; sleep 1000 & echo ok > $out",
        "",
    );
    env.must_build(&drv);
    assert_eq!(
        build_user_processes(),
        vec![],
        "a builder's process survived"
    );

    let relaxed = Env::new("", "sandbox = relaxed\n");
    let drv = relaxed.sh(
        "daemon-nochroot",
        "(/bin/busybox setsid /bin/busybox sleep 1000 &) ; /bin/busybox sleep 1000 & echo ok > $out",
        "__noChroot = \"1\";",
    );
    relaxed.must_build(&drv);
    assert_eq!(
        build_user_processes(),
        vec![],
        "a builder's process survived"
    );
}

#[test]
fn vm_setuid_and_setgid_files_cannot_be_made() {
    let env = Env::new("", "");
    let drv = env.sh(
        "setuid",
        "set -e; mkdir $out; touch $out/f; chmod u+s $out/f",
        "",
    );
    assert_has(&env.must_fail(&drv), "Operation not permitted");
    let drv = env.sh("setgid", "set -e; mkdir $out; chmod g+s $out", "");
    assert_has(&env.must_fail(&drv), "Operation not permitted");
}

#[test]
fn vm_hard_links_to_shadow_cannot_be_smuggled() {
    assert!(
        Path::new("/etc/shadow").exists()
            || std::fs::write("/etc/shadow", "root:*:1::::::\n").is_ok()
    );
    let env = Env::new("", "");
    let drv = env.sh("shadow", "set -e; mkdir $out; ln /etc/shadow $out/s", "");
    assert_has(&env.must_fail(&drv), "No such file or directory");
    // Outside the chroot the link may be refused by the kernel (protected_hardlinks) or made;
    // either way no output owned by someone else is accepted.
    let relaxed = Env::new("", "sandbox = relaxed\n");
    let drv = relaxed.sh(
        "shadow-nochroot",
        "set -e; /bin/busybox mkdir $out; /bin/busybox ln /etc/shadow $out/s",
        "__noChroot = \"1\";",
    );
    let log = relaxed.must_fail(&drv);
    assert!(
        log.contains("Operation not permitted") || log.contains("wrong ownership"),
        "{log}"
    );
}

#[test]
fn vm_world_writable_outputs_are_rejected() {
    let env = Env::new("", "");
    let drv = env.sh("ww", "mkdir $out; chmod 777 $out", "");
    let log = env.must_fail(&drv);
    assert_has(&log, "suspicious ownership or permission");
    assert_has(&log, "group- or world-writable");
}

#[test]
fn vm_escaping_through_the_tmp_dir_fails() {
    let env = Env::new("", "");
    let drv = env.sh(
        "escape",
        "ln -s /etc/shadow $TMPDIR/s; ln -s / $TMPDIR/root\n\
         cat $TMPDIR/s || echo REFUSED-LINK\n\
         ls $TMPDIR/root/root || echo REFUSED-ROOT\n\
         cat $TMPDIR/../../../../../../etc/shadow > $out",
        "",
    );
    let log = env.must_fail(&drv);
    assert_has(&log, "REFUSED-LINK");
    assert_has(&log, "REFUSED-ROOT");
    assert_line(&log, &["/etc/shadow", "No such file or directory"]);
}

#[test]
fn vm_mounting_fails() {
    let env = Env::new("", "");
    let drv = env.sh("mount", "set -e; mount -t tmpfs none /tmp; echo > $out", "");
    let log = env.must_fail(&drv);
    assert!(
        log.to_lowercase().contains("permission denied") || log.contains("Operation not permitted"),
        "{log}"
    );
}

#[test]
fn vm_the_hostname_outside_cannot_change() {
    let before = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let env = Env::new("", "");
    let drv = env.sh("hostname", "set -e; hostname evil; echo > $out", "");
    let log = env.must_fail(&drv);
    assert_has(&log, "Operation not permitted");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap(),
        before
    );
}

#[test]
fn vm_builders_do_not_run_as_root() {
    let env = Env::new("", "");
    let drv = env.sh(
        "whoami",
        "id -u > $out; id -g >> $out; chown 0 $TMPDIR || echo REFUSED-CHOWN",
        "",
    );
    let out = env.must_build(&drv);
    let ids: Vec<u32> = std::fs::read_to_string(out)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert!(
        BUILD_UIDS.contains(&ids[0]),
        "builder ran as uid {}",
        ids[0]
    );
    assert_eq!(ids[1], 30000);
    assert_has(&env.log(&drv), "REFUSED-CHOWN");
}

/// CVE-2024-27297: a fixed-output builder (host network namespace) hands a writable
/// descriptor of its output to a listener outside, which writes through it after the build.
#[test]
fn vm_a_descriptor_passed_out_of_a_fixed_output_build_cannot_change_the_output() {
    use nix::sys::socket::{
        bind, listen, recvmsg, socket, AddressFamily, Backlog, ControlMessageOwned, MsgFlags,
        SockFlag, SockType, UnixAddr,
    };
    let env = Env::python();
    let name = format!("nixb-vm-fd-{}", nonce());
    let sock = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(
        sock.as_raw_fd(),
        &UnixAddr::new_abstract(name.as_bytes()).unwrap(),
    )
    .unwrap();
    listen(&sock, Backlog::new(1).unwrap()).unwrap();
    let receiver = std::thread::spawn(move || -> OwnedFd {
        let conn = nix::sys::socket::accept(sock.as_raw_fd()).unwrap();
        let mut buf = [0u8; 8];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<UnixAddr>(conn, &mut iov, Some(&mut cmsg), MsgFlags::empty()).unwrap();
        let mut got = None;
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(fds) = c {
                got = fds.first().copied();
            }
        }
        // SAFETY: `conn` is the accepted descriptor, open until closed below.
        nix::unistd::write(unsafe { std::os::fd::BorrowedFd::borrow_raw(conn) }, b"k").unwrap();
        nix::unistd::close(conn).unwrap();
        // SAFETY: a descriptor just received over SCM_RIGHTS, owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(got.expect("a descriptor was passed")) }
    });
    let good = env.dir.path().join("good");
    std::fs::write(&good, "good\n").unwrap();
    let good_hash = ok(Command::new("nix-hash")
        .args(["--type", "sha256", "--flat", "--base32"])
        .arg(&good))
    .trim()
    .to_string();
    let drv = env.drv(&format!(
        "name = \"fd-leak\"; builder = \"/usr/bin/python3\"; \
         outputHashMode = \"flat\"; outputHashAlgo = \"sha256\"; outputHash = \"{good_hash}\"; \
         args = [ \"-c\" ''\n\
         import os, socket\n\
         out = os.environ[\"out\"]\n\
         open(out, \"w\").write(\"good\\n\")\n\
         fd = os.open(out, os.O_RDWR)\n\
         s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
         s.connect(\"\\0{name}\")\n\
         socket.send_fds(s, [b\"x\"], [fd])\n\
         s.recv(1)\n\
         print(\"passed\")\n'' ];"
    ));
    let out = env.must_build(&drv);
    assert_has(&env.log(&drv), "passed");
    let mut f = std::fs::File::from(receiver.join().unwrap());
    // The descriptor works (the attack is real)...
    f.write_all(b"EVIL\n").unwrap();
    f.sync_all().unwrap();
    drop(f);
    // ...but reaches nothing registered.
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "good\n");
    let verify = run(env.cmd("nix-store").args(["--verify", "--check-contents"]));
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success(), "nix-store --verify: {stderr}");
    assert!(!stderr.contains("was modified"), "{stderr}");
}

fn spawn_realise(env: &Env, drv: &str) -> Child {
    env.nixb()
        .args(["realise", drv])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(c: Child) -> (String, String) {
    let out = c.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "nixb realise failed ({}): {stderr}",
        out.status
    );
    (
        String::from_utf8(out.stdout).unwrap().trim().to_string(),
        stderr,
    )
}

#[test]
fn vm_concurrent_builds_get_different_build_users() {
    let env = Env::new("", "");
    let a = env.sh("who-a", "id -u > $out; sleep 2", "");
    let b = env.sh("who-b", "id -u > $out; sleep 2", "");
    let (ca, cb) = (spawn_realise(&env, &a), spawn_realise(&env, &b));
    let (oa, _) = finish(ca);
    let (ob, _) = finish(cb);
    let ua = std::fs::read_to_string(oa).unwrap();
    let ub = std::fs::read_to_string(ob).unwrap();
    assert_ne!(ua, ub, "two concurrent builds shared a build user");
}

#[test]
fn vm_a_third_build_waits_when_the_two_users_are_taken() {
    // A group of two users, and a store whose group it is.
    let group = "nixbtwo:x:30300:nixbld6,nixbld7\n";
    let etc = std::fs::read_to_string("/etc/group").unwrap();
    if !etc.contains("nixbtwo:") {
        std::fs::OpenOptions::new()
            .append(true)
            .open("/etc/group")
            .unwrap()
            .write_all(group.as_bytes())
            .unwrap();
    }
    let mut env = Env::new("", "build-users-group = nixbtwo\nbuild-poll-interval = 1\n");
    let root = env.dir.path().to_path_buf();
    let store = root.join("store");
    std::fs::create_dir_all(&store).unwrap();
    std::os::unix::fs::chown(&store, Some(0), Some(30300)).unwrap();
    std::fs::set_permissions(&store, std::os::unix::fs::PermissionsExt::from_mode(0o1775)).unwrap();
    env.vars = vec![
        ("NIX_STORE_DIR".into(), store.display().to_string()),
        (
            "NIX_STATE_DIR".into(),
            root.join("state").display().to_string(),
        ),
        ("NIX_LOG_DIR".into(), root.join("log").display().to_string()),
    ];
    let drvs: Vec<String> = (0..3)
        .map(|i| env.sh(&format!("slow-{i}"), "id -u > $out; sleep 3", ""))
        .collect();
    let mut children = Vec::new();
    for d in &drvs {
        children.push(spawn_realise(&env, d));
        std::thread::sleep(Duration::from_millis(700));
    }
    let results: Vec<(String, String)> = children.into_iter().map(finish).collect();
    let uids: Vec<u32> = results
        .iter()
        .map(|(o, _)| std::fs::read_to_string(o).unwrap().trim().parse().unwrap())
        .collect();
    assert_ne!(uids[0], uids[1]);
    for u in &uids {
        assert!([30006, 30007].contains(u), "uid {u} is not in the group");
    }
    assert_has(
        &results[2].1,
        "all build users are currently in use; consider creating additional users and adding them to the 'nixbtwo' group",
    );
}

#[test]
fn vm_results_equal_real_nix_with_sandbox() {
    let env = Env::new("", "");
    let drv = env.sh(
        "parity",
        "mkdir $out; echo $$ > $out/pid; hostname > $out/host",
        "",
    );
    let out = env.output(&drv);
    // Real Nix first.
    let nix = run(env.cmd("nix-store").args(["-r", &drv]));
    assert!(
        nix.status.success(),
        "nix-store -r: {}",
        String::from_utf8_lossy(&nix.stderr)
    );
    let read = |f: &str| std::fs::read_to_string(Path::new(&out).join(f)).unwrap();
    assert_eq!(
        (read("pid"), read("host")),
        ("1\n".into(), "localhost\n".into())
    );
    let nix_hash = ok(env.cmd("nix-store").args(["-q", "--hash", &out]));
    ok(env.cmd("nix-store").args(["--delete", &out]));
    assert!(!Path::new(&out).exists());
    // Then nixb, on the same store.
    env.must_build(&drv);
    assert_eq!(
        (read("pid"), read("host")),
        ("1\n".into(), "localhost\n".into())
    );
    let nixb_hash = ok(env.cmd("nix-store").args(["-q", "--hash", &out]));
    assert_eq!(nix_hash, nixb_hash);
}
