//! Sandboxed builds through the engine (`sandbox = true | relaxed`), as root without build
//! users (those are exercised in the VM). Builders are the host's static busybox, bound in
//! as `/bin/sh` through `sandbox-paths`, or python3 with the host's `/usr` bound in.
//!
//! Needs root (namespaces, mounts). Without it the tests fail when `CI` is set and are
//! skipped with a note otherwise. As root, one more test re-runs all the others as a uid
//! without a passwd entry, where builds get a user namespace of their own instead.

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use common::*;
use nixb_goals::{Event, SandboxMode, WorkerConfig};
use nixb_store::{Hash, HashAlgo};

const BUSYBOX: &str = "/usr/bin/busybox";

/// Set in the environment of the unprivileged re-run
/// ([`every_test_passes_as_an_unprivileged_uid`]).
const UNPRIVILEGED_RUN: &str = "NIXB_TEST_UNPRIVILEGED";

/// A uid and gid that no host account has: a caller without root and without a name.
const UNPRIVILEGED_ID: u32 = 54321;

/// Root, or the unprivileged re-run, whose builds use a user namespace instead.
fn have_root() -> bool {
    std::env::var_os(UNPRIVILEGED_RUN).is_some()
        || nixb_testsupport::required(&[nixb_testsupport::Need::Root])
}

fn sandboxed(t: &TestStore, mode: SandboxMode) -> WorkerConfig {
    assert!(
        std::path::Path::new(BUSYBOX).exists(),
        "{BUSYBOX} (static busybox) is needed as the sandboxed /bin/sh"
    );
    let mut cfg = t.cfg.clone();
    cfg.sandbox = mode;
    cfg.sandbox_paths = vec![format!("/bin/sh={BUSYBOX}")];
    cfg
}

/// `sandboxed` plus the host's `/usr` (and the `/lib*` links into it) for python3.
fn with_python(t: &TestStore, mode: SandboxMode) -> WorkerConfig {
    let mut cfg = sandboxed(t, mode);
    for p in ["/usr", "/lib?", "/lib64?", "/lib32?"] {
        cfg.sandbox_paths.push(p.to_string());
    }
    cfg
}

fn failure_reason(events: &[Event]) -> String {
    events
        .iter()
        .find_map(|e| match e {
            Event::BuildFailed { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

fn sha256(data: &[u8]) -> Hash {
    Hash::digest(HashAlgo::Sha256, data)
}

#[test]
fn builder_is_pid_1_named_localhost_and_sees_only_the_sandbox() {
    if !have_root() {
        return;
    }
    let t = TestStore::new();
    let cfg = sandboxed(&t, SandboxMode::On);
    let drv = t.add_drv(spec(
        "ident",
        "mkdir $out; echo $$ > $out/pid; hostname > $out/host; \
         ls /proc | grep -c '^[0-9]' > $out/nprocs; ls / > $out/root",
    ));
    let (outcome, events) = t.realise_with(&[&drv], &cfg);
    assert_eq!(
        outcome.exit_status,
        0,
        "{:?} {}",
        outcome.failures,
        log_of(&events, &drv)
    );
    let out = t.real(&t.out(&drv));
    let read = |f: &str| std::fs::read_to_string(out.join(f)).unwrap();
    assert_eq!(read("pid"), "1\n");
    assert_eq!(read("host"), "localhost\n");
    // sh, ls and grep (a pipeline of this script) at most; the host runs far more.
    let n: usize = read("nprocs").trim().parse().unwrap();
    assert!(n <= 3, "builder saw {n} processes");
    // The host's root has e.g. /root, /var, /boot; the chroot only what nixb put there.
    let root = read("root");
    for absent in ["root", "var", "home", "boot"] {
        assert!(
            !root.lines().any(|l| l == absent),
            "chroot has /{absent}: {root}"
        );
    }
    // The chroot is gone after the build, and the output is owned by us, canonical.
    let chroot = t
        .dir()
        .as_path()
        .join(format!("{}.chroot", drv.base_name()));
    assert!(!chroot.exists(), "chroot left behind");
    let md = std::fs::metadata(out.join("pid")).unwrap();
    let us = nix::unistd::geteuid().as_raw();
    assert_eq!((md.uid(), md.mode() & 0o7777, md.mtime()), (us, 0o444, 1));
}

#[test]
fn undeclared_store_paths_are_invisible_and_declared_inputs_visible() {
    if !have_root() {
        return;
    }
    let t = TestStore::new();
    let cfg = sandboxed(&t, SandboxMode::On);
    let secret = t.add_text("secret", "s3cret\n");
    let secret_s = t.print(&secret);

    let sneaky = t.add_drv(spec("sneaky", &format!("cat {secret_s} > $out")));
    let (outcome, events) = t.realise_with(&[&sneaky], &cfg);
    assert_eq!(
        outcome.exit_status, 100,
        "reading an undeclared path succeeded"
    );
    assert!(
        log_of(&events, &sneaky).contains("No such file or directory"),
        "{}",
        log_of(&events, &sneaky)
    );
    assert!(failure_reason(&events).contains("failed with exit code 1"));
    assert!(!t.real(&t.out(&sneaky)).exists());

    let honest = t.add_drv(spec("honest", &format!("cat {secret_s} > $out")).src(&secret));
    let (outcome, events) = t.realise_with(&[&honest], &cfg);
    assert_eq!(outcome.exit_status, 0, "{}", log_of(&events, &honest));
    assert_eq!(
        std::fs::read_to_string(t.real(&t.out(&honest))).unwrap(),
        "s3cret\n"
    );
    // And the reference to it was found.
    let refs = t.store.query_references(&t.out(&honest)).unwrap();
    assert!(
        refs.is_empty(),
        "a copy of the contents is not a reference: {refs:?}"
    );

    // Inputs are read-only inside, even for a builder running as root.
    let vandal =
        t.add_drv(spec("vandal", &format!("echo x > {secret_s} && echo ok > $out")).src(&secret));
    let (outcome, events) = t.realise_with(&[&vandal], &cfg);
    assert_eq!(outcome.exit_status, 100, "{}", log_of(&events, &vandal));
    assert!(log_of(&events, &vandal).contains("Read-only file system"));
    assert_eq!(
        std::fs::read_to_string(t.real(&secret)).unwrap(),
        "s3cret\n"
    );
}

#[test]
fn sandbox_paths_store_entries_bring_their_closure() {
    if !have_root() {
        return;
    }
    let t = TestStore::new();
    let dep = t.add_text("dep", "dep-contents\n");
    let top = t
        .store
        .add_text_to_store(
            "top",
            t.print(&dep).as_bytes(),
            &std::collections::BTreeSet::from([dep.clone()]),
        )
        .unwrap();
    let mut cfg = sandboxed(&t, SandboxMode::On);
    cfg.sandbox_paths.push(t.print(&top));
    cfg.sandbox_paths.push("/nonexistent-nixb-path?".into());
    let drv = t.add_drv(spec(
        "closure",
        &format!("cat $(cat {}) > $out", t.print(&top)),
    ));
    let (outcome, events) = t.realise_with(&[&drv], &cfg);
    assert_eq!(outcome.exit_status, 0, "{}", log_of(&events, &drv));
    assert_eq!(
        std::fs::read_to_string(t.real(&t.out(&drv))).unwrap(),
        "dep-contents\n"
    );

    // A missing required entry is a setup failure naming it.
    let mut cfg = sandboxed(&t, SandboxMode::On);
    cfg.sandbox_paths.push("/nonexistent-nixb-path".into());
    let drv2 = t.add_drv(spec("missing", "echo > $out"));
    let (outcome, events) = t.realise_with(&[&drv2], &cfg);
    assert_ne!(outcome.exit_status, 0);
    assert!(
        failure_reason(&events).contains("/nonexistent-nixb-path"),
        "{}",
        failure_reason(&events)
    );
}

fn netns_of_host() -> String {
    std::fs::read_link("/proc/self/ns/net")
        .unwrap()
        .display()
        .to_string()
}

#[test]
fn fixed_output_builds_share_the_host_network_and_others_do_not() {
    if !have_root() {
        return;
    }
    let t = TestStore::new();
    let cfg = with_python(&t, SandboxMode::On);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let script = |tag: &str| {
        format!(
            "import os, socket\n\
             print('netns', os.readlink('/proc/self/ns/net'))\n\
             try:\n    socket.create_connection(('127.0.0.1', {port}), timeout=5).sendall(b'{tag}')\n    print('connected')\n\
             except OSError as e:\n    print('refused', e)\n\
             open(os.environ['out'], 'w').write('fetched\\n')\n"
        )
    };
    let fod = t.add_drv(
        spec("fod", &script("fod"))
            .builder("/usr/bin/python3")
            .fixed(false, sha256(b"fetched\n")),
    );
    let (outcome, events) = t.realise_with(&[&fod], &cfg);
    let log = log_of(&events, &fod);
    assert_eq!(outcome.exit_status, 0, "{log}");
    assert!(log.contains(&format!("netns {}", netns_of_host())), "{log}");
    assert!(log.contains("connected"), "{log}");
    let (mut conn, _) = listener.accept().expect("the fixed-output build connected");
    let mut got = String::new();
    conn.set_nonblocking(false).unwrap();
    conn.read_to_string(&mut got).unwrap();
    assert_eq!(got, "fod");

    let plain = t.add_drv(spec("plain", &script("plain")).builder("/usr/bin/python3"));
    let (outcome, events) = t.realise_with(&[&plain], &cfg);
    let log = log_of(&events, &plain);
    assert_eq!(outcome.exit_status, 0, "{log}");
    assert!(log.contains("netns net:["), "{log}");
    assert!(
        !log.contains(&format!("netns {}", netns_of_host())),
        "{log}"
    );
    assert!(log.contains("refused"), "{log}");
    assert!(
        listener.accept().is_err(),
        "the sandboxed build reached the host"
    );
}

#[test]
fn no_chroot_is_honoured_only_when_relaxed() {
    if !have_root() {
        return;
    }
    let t = TestStore::new();
    // A host file outside everything the chroot binds.
    let host_file = t.root().join("host-file");
    std::fs::write(&host_file, "on the host\n").unwrap();
    let drv = t.add_drv(
        spec(
            "impure",
            &format!("{BUSYBOX} cat {} > $out", host_file.display()),
        )
        .env("__noChroot", "1"),
    );
    let (outcome, events) = t.realise_with(&[&drv], &sandboxed(&t, SandboxMode::On));
    assert_eq!(outcome.exit_status, 100);
    assert_eq!(
        failure_reason(&events),
        format!(
            "derivation '{}' has '__noChroot' set, but that's not allowed when 'sandbox' is 'true'",
            t.print(&drv)
        )
    );
    assert!(started(&events).is_empty(), "the builder must not start");

    let (outcome, events) = t.realise_with(&[&drv], &sandboxed(&t, SandboxMode::Relaxed));
    assert_eq!(outcome.exit_status, 0, "{}", log_of(&events, &drv));
    assert_eq!(
        std::fs::read_to_string(t.real(&t.out(&drv))).unwrap(),
        "on the host\n"
    );

    // Relaxed still sandboxes derivations that do not ask otherwise.
    let other = t.add_drv(spec(
        "sandboxed",
        &format!("cat {} > $out", host_file.display()),
    ));
    let (outcome, _) = t.realise_with(&[&other], &sandboxed(&t, SandboxMode::Relaxed));
    assert_eq!(outcome.exit_status, 100);
}

#[test]
fn failed_outputs_come_out_of_the_chroot_with_keep_failed() {
    if !have_root() {
        return;
    }
    let t = TestStore::new();
    let mut cfg = sandboxed(&t, SandboxMode::On);
    cfg.keep_failed = true;
    let drv = t.add_drv(spec("broken", "echo partial > $out; exit 3"));
    let (outcome, _) = t.realise_with(&[&drv], &cfg);
    assert_eq!(outcome.exit_status, 100);
    let out = t.real(&t.out(&drv));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "partial\n");
    assert!(!t.store.is_valid_path(&t.out(&drv)).unwrap());
    let chroot = t
        .dir()
        .as_path()
        .join(format!("{}.chroot", drv.base_name()));
    assert!(!chroot.exists());
}

/// CVE-2024-27297: a fixed-output builder (host network namespace) passes a writable
/// descriptor of its output to a process outside over an abstract unix socket; that process
/// writes through it after the build. The registered output must not change.
#[test]
fn a_descriptor_passed_out_of_a_fixed_output_build_cannot_change_the_output() {
    if !have_root() {
        return;
    }
    use nix::sys::socket::{
        bind, listen, recvmsg, socket, AddressFamily, Backlog, ControlMessageOwned, MsgFlags,
        SockFlag, SockType, UnixAddr,
    };
    let t = TestStore::new();
    let cfg = with_python(&t, SandboxMode::On);
    let name = format!("nixb-goals-test-fd-{}", std::process::id());
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
        // Tell the builder we have it, so it may exit.
        // SAFETY: `conn` is the accepted connection, open until the close below.
        nix::unistd::write(unsafe { std::os::fd::BorrowedFd::borrow_raw(conn) }, b"k").unwrap();
        nix::unistd::close(conn).unwrap();
        // SAFETY: `got` was received just now by SCM_RIGHTS: a new descriptor nothing else owns.
        unsafe { OwnedFd::from_raw_fd(got.expect("a descriptor was passed")) }
    });
    let script = format!(
        "import os, socket\n\
         out = os.environ['out']\n\
         open(out, 'w').write('good\\n')\n\
         fd = os.open(out, os.O_RDWR)\n\
         s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
         s.connect('\\0{name}')\n\
         socket.send_fds(s, [b'x'], [fd])\n\
         s.recv(1)\n\
         print('passed')\n"
    );
    let drv = t.add_drv(
        spec("fd-leak", &script)
            .builder("/usr/bin/python3")
            .fixed(false, sha256(b"good\n")),
    );
    let (outcome, events) = t.realise_with(&[&drv], &cfg);
    assert_eq!(outcome.exit_status, 0, "{}", log_of(&events, &drv));
    assert!(log_of(&events, &drv).contains("passed"));
    let fd = receiver.join().unwrap();
    // The attack itself works: the descriptor is writable...
    let mut f = std::fs::File::from(fd);
    f.write_all(b"EVIL\n").unwrap();
    f.sync_all().unwrap();
    drop(f);
    // ...but it no longer reaches the registered output.
    let out = t.out(&drv);
    assert_eq!(std::fs::read_to_string(t.real(&out)).unwrap(), "good\n");
    let info = t.store.query_path_info(&out).unwrap().unwrap();
    let (h, _) = nixb_store::nar::hash_path(&t.real(&out), HashAlgo::Sha256).unwrap();
    assert_eq!(info.nar_hash, h);
}

/// The builder is started without waiting for the sandbox's setup; a step that fails later
/// (here the exec) must still fail the goal with a message naming it, and leave no chroot or
/// build directory behind.
#[test]
fn a_setup_step_failing_after_the_start_names_the_step() {
    if !have_root() {
        return;
    }
    let t = TestStore::new();
    let cfg = sandboxed(&t, SandboxMode::On);
    let drv = t.add_drv(spec("nobuilder", "").builder("/nonexistent/builder"));
    let (outcome, events) = t.realise_with(&[&drv], &cfg);
    assert_eq!(outcome.exit_status, 1, "{:?}", outcome.failures);
    let msg = &outcome.failures[0].message;
    assert!(
        msg.contains("setting up the builder: executing /nonexistent/builder: ENOENT"),
        "{msg}"
    );
    assert!(
        msg.starts_with(&format!(
            "failed to set up the build environment for '{}'",
            t.print(&drv)
        )),
        "{msg}"
    );
    assert!(!events
        .iter()
        .any(|e| matches!(e, Event::BuildSucceeded { .. })));
    let chroot = t
        .dir()
        .as_path()
        .join(format!("{}.chroot", drv.base_name()));
    assert!(!chroot.exists());
    assert_eq!(std::fs::read_dir(&t.cfg.build_dir_root).unwrap().count(), 0);
}

/// A builder that touches ~200 MiB of memory and writes 50 MB: the build's resource event
/// says so within 10%, and comes before the build's success.
#[test]
fn the_resource_report_shows_peak_memory_and_bytes_written() {
    if !have_root() {
        return;
    }
    let t = TestStore::new();
    let cfg = with_python(&t, SandboxMode::On);
    let script = "import os\n\
        b = b'x' * (200 * 1024 * 1024)\n\
        with open(os.environ['out'], 'wb') as f:\n    f.write(memoryview(b)[:50_000_000])\n";
    let drv = t.add_drv(spec("hungry", script).builder("/usr/bin/python3"));
    let (outcome, events) = t.realise_with(&[&drv], &cfg);
    assert_eq!(outcome.exit_status, 0, "{}", log_of(&events, &drv));
    let at = |want: fn(&Event) -> bool| events.iter().position(want).unwrap();
    let usage = events
        .iter()
        .find_map(|e| match e {
            Event::BuildResources { drv: d, usage } if d == &drv => Some(*usage),
            _ => None,
        })
        .expect("a BuildResources event");
    assert!(
        at(|e| matches!(e, Event::BuildResources { .. }))
            < at(|e| matches!(e, Event::BuildSucceeded { .. }))
    );
    let mib = 1024 * 1024;
    let within = |got: u64, want: u64| got >= want * 9 / 10 && got <= want * 11 / 10;
    assert!(
        within(usage.peak_memory, 200 * mib),
        "peak memory {} MiB, not ~200 MiB",
        usage.peak_memory / mib
    );
    assert!(
        within(usage.written_bytes, 50_000_000),
        "written {} bytes, not ~50 MB",
        usage.written_bytes
    );
    assert!(usage.user + usage.system > std::time::Duration::ZERO);
}

/// Every other test of this file, re-run by this test binary as a uid and gid without a
/// passwd entry (`setpriv`): builds then run in a user namespace of their own. The re-run
/// must pass as many tests as it lists: none may skip.
#[test]
fn every_test_passes_as_an_unprivileged_uid() {
    const ME: &str = "every_test_passes_as_an_unprivileged_uid";
    if !nix::unistd::geteuid().is_root() {
        have_root();
        return;
    }
    nixb_testsupport::rerun_unprivileged(UNPRIVILEGED_ID, (UNPRIVILEGED_RUN, "1"), &[ME]);
}
