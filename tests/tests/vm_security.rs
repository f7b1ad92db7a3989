//! The sandbox and build users, attacked for real: run by `cargo xtask test-vm` in a VM as
//! root, with the guest's `/nix/store` (1775 root:nixbld), group `nixbld` (gid 30000, members
//! nixbld1..8 = uids 30001..30008), the real `nixb` (`$NIXB_BIN`) and real Nix 2.8 (the
//! host's `/usr` over 9p). Builds use `sandbox = true` and `build-users-group = nixbld`; the
//! builders are the guest's static busybox bound in as `/bin/sh`, or python3 with `/usr`
//! bound in.
//!
//! The guest runs this suite once per isolation mode (`NIXB_VM_MODE`, see
//! [`vm_common::Mode`]): with the group's build users, with `auto-allocate-uids` (a block of
//! uids per build, the builder 1000:100 in a user namespace), and with `use-cgroups` (where
//! every build must also have had its cgroup, removed afterwards).
//!
//! Each attack is an attempt the builder makes; the test asserts that it failed, and failed
//! for the reason the isolation gives (the errno text in the build log, or the engine's
//! rejection), and that nothing changed outside.

mod vm_common;

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use vm_common::*;

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
    // A build user is refused by the mode; the namespace's user (auto-allocate-uids) owns
    // the chroot's files and is refused by the read-only mount.
    assert!(
        log.lines().any(|l| l.contains("/etc/passwd")
            && (l.contains("Permission denied") || l.contains("Read-only file system"))),
        "{log}"
    );
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
        processes_of(&env.mode.build_uids()),
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
        processes_of(&relaxed.mode.build_uids()),
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
        &format!(
            "mkdir $out; id -u > $out/uid; id -g > $out/gid; ({WHO}) > $out/who\n\
             cat /proc/self/cgroup > $out/cgroup; chown 0 $TMPDIR || echo REFUSED-CHOWN"
        ),
        "",
    );
    let out = PathBuf::from(env.must_build(&drv));
    let read = |f: &str| std::fs::read_to_string(out.join(f)).unwrap();
    let num = |f: &str| read(f).trim().parse::<u32>().unwrap();
    let outside = outside_uid(&read("who"));
    assert!(
        env.mode.build_uids().contains(&outside),
        "builder ran as uid {outside} outside"
    );
    match env.mode {
        Mode::BuildUsers | Mode::UseCgroups => {
            assert_eq!((num("uid"), num("gid")), (outside, GROUP_GID));
        }
        // Nix's sandbox build user, mapped onto the block's first id.
        Mode::AutoAllocateUids => assert_eq!((num("uid"), num("gid")), (1000, 100)),
    }
    // In the build's own cgroup (no cgroup namespace), or in the caller's.
    let cgroup = read("cgroup");
    if env.mode == Mode::UseCgroups {
        assert!(cgroup.starts_with("0::/nixb-"), "{cgroup}");
    } else {
        assert_eq!(cgroup, "0::/\n");
    }
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
    // Contents of its own: a fixed output's path depends only on its hash, and the suite
    // runs once per mode on one store (an output already valid would not be built).
    let contents = format!("good {}", nonce());
    let good = env.dir.path().join("good");
    std::fs::write(&good, &contents).unwrap();
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
         open(out, \"w\").write(\"{contents}\")\n\
         fd = os.open(out, os.O_RDWR)\n\
         s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
         s.connect(\"\\0{name}\")\n\
         socket.send_fds(s, [b\"x\"], [fd])\n\
         s.recv(1)\n\
         print(\"passed\")\n'' ];"
    ));
    let built = env.realise(&drv);
    let stderr = String::from_utf8_lossy(&built.stderr).into_owned();
    assert!(built.status.success(), "{stderr}");
    let out = env.output(&drv);
    let log = env.log(&drv);
    assert!(log.contains("passed"), "log: {log}\nstderr: {stderr}");
    let mut f = std::fs::File::from(receiver.join().unwrap());
    // The descriptor works (the attack is real)...
    f.write_all(b"EVIL\n").unwrap();
    f.sync_all().unwrap();
    drop(f);
    // ...but reaches nothing registered.
    assert_eq!(std::fs::read_to_string(&out).unwrap(), contents);
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

/// Waits (up to a minute) until the build log of `drv` exists under `log_dir`, that is,
/// until its builder was started.
fn wait_for_build_log(log_dir: &Path, drv: &str) {
    let base = Path::new(drv).file_name().unwrap().to_str().unwrap();
    let dir = log_dir.join("drvs").join(&base[..2]);
    let start = std::time::Instant::now();
    loop {
        let found = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(&base[2..]));
        if found {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no build log of {drv} in {} after a minute",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn finish(env: &Env, c: Child) -> (String, String) {
    let pid = c.id();
    let out = c.wait_with_output().unwrap();
    env.check_after_build(pid, &out);
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
    let a = env.sh("who-a", &format!("({WHO}) > $out; sleep 2"), "");
    let b = env.sh("who-b", &format!("({WHO}) > $out; sleep 2"), "");
    let (ca, cb) = (spawn_realise(&env, &a), spawn_realise(&env, &b));
    let (oa, _) = finish(&env, ca);
    let (ob, _) = finish(&env, cb);
    let ua = outside_uid(&std::fs::read_to_string(oa).unwrap());
    let ub = outside_uid(&std::fs::read_to_string(ob).unwrap());
    assert_ne!(ua, ub, "two concurrent builds shared a build user");
}

#[test]
fn vm_a_third_build_waits_when_the_two_users_are_taken() {
    // Two build users (a group of two, or two blocks of automatically allocated uids), and
    // a store of their own.
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
    let mode = Mode::current();
    let (conf, users, busy) = match mode {
        Mode::BuildUsers | Mode::UseCgroups => (
            "build-users-group = nixbtwo\n".to_string(),
            vec![30006, 30007],
            "all build users are currently in use; consider creating additional users and \
             adding them to the 'nixbtwo' group"
                .to_string(),
        ),
        Mode::AutoAllocateUids => (
            format!("id-count = {}\n", 2 * 65536),
            vec![AUTO_START_ID, AUTO_START_ID + 65536],
            format!(
                "all 2 blocks of automatically allocated uids (from {AUTO_START_ID}, \
                 'id-count' 131072) are in use"
            ),
        ),
    };
    let mut env = Env::new("", &format!("{conf}build-poll-interval = 1\n"));
    let root = env.dir.path().to_path_buf();
    env.private_store(&root);
    if mode != Mode::AutoAllocateUids {
        std::os::unix::fs::chown(root.join("store"), Some(0), Some(30300)).unwrap();
    }
    let drvs: Vec<String> = (0..3)
        .map(|i| {
            env.sh(
                &format!("slow-{i}"),
                &format!("({WHO}) > $out; sleep 6"),
                "",
            )
        })
        .collect();
    // Each realise is started once the one before has its builder running (its log file
    // is created after its uid was taken), so the third finds both uids in use however
    // slowly the machine starts processes; a fixed pause did not always suffice under
    // emulation.
    let mut children = Vec::new();
    for (i, d) in drvs.iter().enumerate() {
        children.push(spawn_realise(&env, d));
        if i < 2 {
            wait_for_build_log(&root.join("log"), d);
        }
    }
    let results: Vec<(String, String)> = children.into_iter().map(|c| finish(&env, c)).collect();
    let uids: Vec<u32> = results
        .iter()
        .map(|(o, _)| outside_uid(&std::fs::read_to_string(o).unwrap()))
        .collect();
    assert_ne!(uids[0], uids[1]);
    for u in &uids {
        assert!(users.contains(u), "uid {u} is not one of {users:?}");
    }
    assert_has(&results[2].1, &busy);
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
