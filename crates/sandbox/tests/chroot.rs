//! Chroot mode, run for real: these tests need root (namespaces, mounts). Without root they
//! fail when CI is set and are skipped otherwise. As root, one more test re-runs all of them
//! but the [`ROOT_ONLY`] ones as an unprivileged uid with no passwd entry, where every
//! builder gets a user namespace of its own ([`UserNamespace`]) instead of a build user.
//!
//! Builders are `/bin/sh -c` scripts with /bin, /lib, /lib64 and /usr bound read-only.

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use nixb_sandbox::{
    spawn, start, BindMount, BuildUserIds, ChrootSpec, Isolation, NetNsPool, Network, Personality,
    SandboxError, SandboxSpec, UserNamespace,
};

/// Set in the environment of the unprivileged re-run (see
/// [`every_test_but_the_root_only_ones_passes_as_an_unprivileged_uid`]).
const UNPRIVILEGED_RUN: &str = "NIXB_TEST_UNPRIVILEGED";

/// A uid and gid that no host account has: a caller without root and without a name.
const UNPRIVILEGED_ID: u32 = 54321;

/// Tests that need root itself, not only namespaces: a build user with no namespace of its
/// own, or a network namespace made ahead of time (CAP_SYS_ADMIN in the host's).
const ROOT_ONLY: &[&str] = &[
    "capabilities_are_dropped_even_without_a_build_user",
    "pooled_network_namespace_is_just_as_private",
    "a_uid_range_builder_chowns_to_several_of_its_ids",
    "every_test_but_the_root_only_ones_passes_as_an_unprivileged_uid",
];

/// Whether this process runs the tests without root (the re-run), builders in user
/// namespaces.
fn unprivileged() -> bool {
    !nix::unistd::geteuid().is_root()
}

/// Root, or the unprivileged re-run, whose builders use a user namespace instead.
fn have_root() -> bool {
    std::env::var_os(UNPRIVILEGED_RUN).is_some()
        || nixb_testsupport::required(&[nixb_testsupport::Need::Root])
}

/// A temporary directory holding the chroot root, the build directory and a fake store.
/// Refuses to delete anything if a mount under it is visible here: that would mean the
/// sandbox's mounts leaked into our namespace, and deleting would recurse into /usr.
struct Scratch {
    dir: Option<tempfile::TempDir>,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            dir: Some(tempfile::tempdir().unwrap()),
        }
    }
    fn path(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let dir = self.dir.take().unwrap();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let p = dir.path().display().to_string();
        if mounts.contains(&p) {
            let _ = dir.keep();
            panic!("sandbox mounts under {p} leaked into the host namespace");
        }
    }
}

struct Case {
    scratch: Scratch,
    spec: ChrootSpec,
    user: Option<BuildUserIds>,
    cwd: PathBuf,
    /// Start with `spawn` (returns after the exec) instead of `start` (returns at once, as
    /// the engine does; setup failures come from `wait`).
    sync: bool,
    /// `SandboxSpec::announce`.
    announce: Option<std::os::fd::RawFd>,
}

const STORE: &str = "/nix/store";

fn nobody() -> Option<BuildUserIds> {
    Some(BuildUserIds {
        uid: 65534,
        gid: 65534,
        supplementary: vec![],
    })
}

impl Case {
    fn new() -> Case {
        let scratch = Scratch::new();
        let build = scratch.path().join("nix-build-test-0");
        std::fs::create_dir(&build).unwrap();
        // The build directory must be usable by the build user.
        std::fs::set_permissions(&build, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        let mut spec = ChrootSpec::new(
            scratch.path().join("root"),
            STORE.into(),
            build.clone(),
            65534,
            65534,
        );
        for d in ["/bin", "/usr"] {
            spec.binds.push(BindMount::same(d).read_only());
        }
        for d in ["/lib", "/lib64"] {
            spec.binds.push(BindMount::same(d).read_only().optional());
        }
        // Without root: no build user, the caller mapped to 1000:100 in a namespace instead.
        let user = if unprivileged() {
            spec.user_namespace = Some(UserNamespace::for_caller());
            None
        } else {
            nobody()
        };
        Case {
            scratch,
            spec,
            user,
            cwd: build,
            sync: false,
            announce: None,
        }
    }

    /// A fake store path with one file, bound in at `/nix/store/<name>`.
    fn input(&mut self, name: &str, contents: &str) -> PathBuf {
        let host = self.scratch.path().join("store").join(name);
        std::fs::create_dir_all(&host).unwrap();
        std::fs::write(host.join("file"), contents).unwrap();
        let inside = Path::new(STORE).join(name);
        self.spec.binds.push(BindMount {
            target: inside.clone(),
            source: host,
            optional: false,
            read_only: false,
        });
        inside
    }

    /// As [`Case::input`], bound read-only.
    fn input_ro(&mut self, name: &str, contents: &str) -> PathBuf {
        let inside = self.input(name, contents);
        if let Some(b) = self.spec.binds.last_mut() {
            b.read_only = true;
        }
        inside
    }

    /// A store input that is a regular file (not a directory), bound read-only at
    /// `/nix/store/<name>`.
    fn file_input_ro(&mut self, name: &str, contents: &str) {
        let file = self.scratch.path().join("store").join(name);
        std::fs::write(&file, contents).unwrap();
        self.spec.binds.push(BindMount {
            target: Path::new("/nix/store").join(name),
            source: file,
            optional: false,
            read_only: true,
        });
    }

    fn spawn(self, script: &str) -> Result<(Running, std::fs::File), SandboxError> {
        let (r, w): (OwnedFd, OwnedFd) = nix::unistd::pipe().unwrap();
        let spec = SandboxSpec {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![
                ("PATH".into(), "/usr/bin:/bin".into()),
                ("HOME".into(), "/homeless-shelter".into()),
            ],
            cwd: self.cwd.clone(),
            log_fd: w,
            user: self.user.clone(),
            personality: Personality::default(),
            isolation: Isolation::Chroot(self.spec),
            announce: self.announce,
            cgroup: None,
        };
        let root = match &spec.isolation {
            Isolation::Chroot(c) => c.root.clone(),
            Isolation::Plain => unreachable!(),
        };
        let b = if self.sync {
            spawn(spec)?
        } else {
            start(spec)?
        };
        Ok((
            Running {
                builder: b,
                root,
                _scratch: self.scratch,
            },
            std::fs::File::from(r),
        ))
    }

    fn run(self, script: &str) -> (ExitStatus, String, PathBuf, Scratch) {
        let (mut running, mut log) = self.spawn(script).expect("spawn");
        let mut out = String::new();
        log.read_to_string(&mut out).unwrap();
        let st = running.builder.wait().unwrap();
        (st, out, running.root, running._scratch)
    }
}

struct Running {
    builder: nixb_sandbox::Builder,
    root: PathBuf,
    _scratch: Scratch,
}

fn ok(case: Case, script: &str) -> String {
    let (st, out, _, _s) = case.run(script);
    assert!(st.success(), "builder failed ({st:?}):\n{out}");
    out
}

#[test]
fn builder_is_pid_1_and_sees_only_its_own_processes() {
    if !have_root() {
        return;
    }
    let out = ok(
        Case::new(),
        "echo $$; for p in /proc/[0-9]*; do echo ${p#/proc/}; done",
    );
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("1"));
    let pids: Vec<u32> = lines.map(|l| l.parse().unwrap()).collect();
    // The shell itself and at most a subshell; the host has hundreds of processes.
    assert!(pids.contains(&1), "{pids:?}");
    assert!(pids.iter().all(|&p| p < 10), "{pids:?}");
}

#[test]
fn hostname_domainname_and_only_loopback() {
    if !have_root() {
        return;
    }
    let out = ok(
        Case::new(),
        "cat /proc/sys/kernel/hostname /proc/sys/kernel/domainname; \
         tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '",
    );
    assert_eq!(out, "localhost\n(none)\nlo\n");
}

#[test]
fn no_capabilities_no_new_privs_and_seccomp_as_nobody() {
    if !have_root() {
        return;
    }
    let out = ok(
        Case::new(),
        "id -u; id -g; grep -E '^(Cap|NoNewPrivs|Seccomp:)' /proc/self/status",
    );
    let ids = if unprivileged() {
        "1000\n100\n"
    } else {
        "65534\n65534\n"
    };
    let expected = ids.to_string()
        + "\
        CapInh:\t0000000000000000\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\n\
        CapBnd:\t0000000000000000\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\nSeccomp:\t2\n";
    assert_eq!(out, expected);
}

#[test]
fn capabilities_are_dropped_even_without_a_build_user() {
    if !have_root() {
        return;
    }
    let mut c = Case::new();
    c.user = None;
    let out = ok(c, "id -u; grep -E '^Cap(Eff|Bnd)' /proc/self/status");
    assert_eq!(
        out,
        "0\nCapEff:\t0000000000000000\nCapBnd:\t0000000000000000\n"
    );
}

#[test]
fn host_files_are_invisible_bound_paths_visible() {
    if !have_root() {
        return;
    }
    let mut c = Case::new();
    let secret = c.scratch.path().join("secret");
    std::fs::write(&secret, "host secret").unwrap();
    let input = c.input("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-input", "input contents");
    let script = format!(
        "cat {input}/file; echo; \
         if cat {secret} 2>/dev/null; then echo LEAK; fi; \
         ls /; ls /etc; \
         if ls /nix/store/../../root 2>/dev/null; then echo LEAK; fi; \
         touch /usr/x 2>/dev/null && echo WRITABLE; true",
        input = input.display(),
        secret = secret.display()
    );
    let out = ok(c, &script);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("input contents"));
    let rest: Vec<&str> = lines.collect();
    assert!(!out.contains("LEAK") && !out.contains("WRITABLE"), "{out}");
    // The root holds exactly what the spec made: no /home, /root, /var, /sys ...
    let top: Vec<&str> = rest
        .iter()
        .take_while(|l| **l != "group")
        .copied()
        .collect();
    assert_eq!(
        top,
        ["bin", "dev", "etc", "lib", "lib64", "nix", "proc", "tmp", "usr"],
        "{out}"
    );
    assert_eq!(&rest[top.len()..], ["group", "hosts", "passwd"]);
}

#[test]
fn minimal_dev() {
    if !have_root() {
        return;
    }
    let out = ok(
        Case::new(),
        "ls /dev; echo x > /dev/null; head -c 4 /dev/zero | wc -c; \
         echo shm > /dev/shm/f && cat /dev/shm/f; test -c /dev/pts/ptmx && echo pts",
    );
    assert_eq!(
        out,
        "fd\nfull\nnull\nptmx\npts\nrandom\nshm\nstderr\nstdin\nstdout\ntty\nurandom\nzero\n4\nshm\npts\n"
    );
}

#[test]
fn kvm_is_bound_only_when_asked_for() {
    if !have_root() {
        return;
    }
    if !Path::new("/dev/kvm").exists() {
        eprintln!("no /dev/kvm on this host");
        return;
    }
    let mut c = Case::new();
    c.spec.kvm = true;
    let out = ok(c, "test -c /dev/kvm && echo kvm");
    assert_eq!(out, "kvm\n");
}

#[test]
fn setuid_and_setgid_bits_are_refused_by_seccomp() {
    if !have_root() {
        return;
    }
    let out = ok(
        Case::new(),
        "touch f; chmod 755 f && echo plain-ok; \
         chmod u+s f 2>&1 || echo suid-refused; chmod g+s f 2>&1 || echo sgid-refused; \
         stat -c %a f",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "plain-ok");
    assert!(out.contains("Operation not permitted"), "{out}");
    assert!(
        out.contains("suid-refused") && out.contains("sgid-refused"),
        "{out}"
    );
    assert_eq!(*lines.last().unwrap(), "755");
}

fn listener() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

fn connect_script(port: u16) -> String {
    format!(
        "if bash -c 'echo hi > /dev/tcp/127.0.0.1/{port}' 2>/tmp/err; then echo connected; \
         else cat /tmp/err; fi"
    )
}

#[test]
fn private_network_cannot_reach_the_host_loopback() {
    if !have_root() {
        return;
    }
    let (_l, port) = listener();
    let out = ok(Case::new(), &connect_script(port));
    // Refused, not unreachable: lo is up, but nothing listens on it in the sandbox's netns.
    assert!(out.contains("Connection refused"), "{out}");
}

#[test]
fn pooled_network_namespace_is_just_as_private() {
    if !have_root() {
        return;
    }
    let pool = NetNsPool::new(2).unwrap();
    pool.wait_ready(1);
    let (_l, port) = listener();
    let mut c = Case::new();
    c.spec.network = Network::Prepared(pool.take().expect("a pooled namespace"));
    let script = format!(
        "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; {}",
        connect_script(port)
    );
    let out = ok(c, &script);
    assert!(out.starts_with("lo\n"), "{out}");
    assert!(out.contains("Connection refused"), "{out}");
}

#[test]
fn fixed_output_mode_keeps_the_host_network() {
    if !have_root() {
        return;
    }
    let (l, port) = listener();
    let accept = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).unwrap();
        buf
    });
    let mut c = Case::new();
    c.spec.network = Network::Host;
    let out = ok(c, &connect_script(port));
    assert_eq!(out, "connected\n");
    assert_eq!(accept.join().unwrap(), "hi\n");
}

#[test]
fn outputs_land_in_the_chroot_store() {
    if !have_root() {
        return;
    }
    let (st, out, root, _s) = Case::new().run(
        "mkdir /nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-out && \
         echo built > /nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-out/result",
    );
    assert!(st.success(), "{out}");
    let result =
        nixb_sandbox::chroot_store_dir(&root).join("bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-out/result");
    assert_eq!(std::fs::read_to_string(result).unwrap(), "built\n");
}

#[test]
fn missing_cwd_inside_names_the_step() {
    if !have_root() {
        return;
    }
    let mut c = Case::new();
    c.cwd = "/tmp/nix-build-missing-0".into();
    c.sync = true;
    match c.spawn("true") {
        Err(SandboxError::Setup { step, errno }) => {
            assert_eq!(step, "chdir to /tmp/nix-build-missing-0");
            assert_eq!(errno, nix::errno::Errno::ENOENT);
        }
        Err(e) => panic!("expected a setup error, got {e}"),
        Ok(_) => panic!("spawn succeeded with a missing cwd"),
    }
}

#[test]
fn a_started_builder_reports_its_failed_step_when_waited_for() {
    if !have_root() {
        return;
    }
    let mut c = Case::new();
    c.cwd = "/tmp/nix-build-missing-0".into();
    let (mut running, mut log) = c.spawn("echo ran").expect("start returns before the setup");
    let mut out = String::new();
    log.read_to_string(&mut out).unwrap();
    assert_eq!(out, "", "nothing ran");
    for _ in 0..2 {
        // On every call, not only the first.
        match running.builder.wait() {
            Err(SandboxError::Setup { step, errno }) => {
                assert_eq!(step, "chdir to /tmp/nix-build-missing-0");
                assert_eq!(errno, nix::errno::Errno::ENOENT);
            }
            other => panic!("expected a setup error, got {other:?}"),
        }
    }
    // A failing exec is a setup step too.
    let mut c = Case::new();
    c.input("00000000000000000000000000000000-noexec", "x");
    let (r, w): (OwnedFd, OwnedFd) = nix::unistd::pipe().unwrap();
    drop(r);
    let spec = SandboxSpec {
        program: "/nix/store/00000000000000000000000000000000-noexec/file".into(),
        args: vec![],
        env: vec![],
        cwd: c.cwd.clone(),
        log_fd: w,
        user: c.user.clone(),
        personality: Personality::default(),
        isolation: Isolation::Chroot(c.spec),
        announce: None,
        cgroup: None,
    };
    let mut b = start(spec).expect("start");
    let e = b.wait().expect_err("exec of a non-executable file");
    assert_eq!(
        e.to_string(),
        "setting up the builder: executing /nix/store/00000000000000000000000000000000-noexec/file: \
         EACCES: Permission denied"
    );
}

#[test]
fn missing_required_bind_source_is_reported_by_the_parent() {
    if !have_root() {
        return;
    }
    let mut c = Case::new();
    c.spec.binds.push(BindMount::same("/no/such/input"));
    let err = c.spawn("true").err().expect("missing source refused");
    assert!(
        err.to_string().starts_with(
            "preparing the sandbox: getting attributes of bind source /no/such/input: "
        ),
        "{err}"
    );
}

fn host_pid_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

#[test]
fn kill_takes_everything_in_the_sandbox() {
    if !have_root() {
        return;
    }
    let (mut running, mut log) = Case::new()
        .spawn("setsid sleep 1000 & sleep 1000 & echo ready; wait")
        .unwrap();
    let mut buf = [0u8; 6];
    log.read_exact(&mut buf).unwrap();
    let pid = running.builder.pid.as_raw();
    // Every process in the sandbox's PID namespace, seen from here: all descendants of the
    // builder, including the one that left its session.
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    let victims: Vec<i32> = children
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(victims.len(), 2, "{children}");
    running.builder.kill().unwrap();
    let st = running.builder.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(9));
    let deadline = Instant::now() + Duration::from_secs(5);
    while victims.iter().any(|&v| host_pid_alive(v)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    for v in victims {
        assert!(!host_pid_alive(v), "process {v} survived the kill");
    }
}

/// Many read-only inputs (overlay mode where the kernel has overlayfs, else bind mode) and
/// few (bind mode): the same view from inside, the same outputs outside, and on disk nothing
/// but the outputs in the store directory.
fn store_view(n_inputs: usize) {
    let mut c = Case::new();
    let mut inputs = Vec::new();
    for i in 0..n_inputs {
        inputs.push(c.input_ro(&format!("{i:032}-ro"), &format!("ro {i}")));
    }
    let rw = c.input("wwwwwwwwwwwwwwwwwwwwwwwwwwwwwwww-rw", "rw");
    // Writable for the build user (nobody) as far as permissions go: only the mount decides.
    std::fs::set_permissions(
        c.scratch
            .path()
            .join("store/wwwwwwwwwwwwwwwwwwwwwwwwwwwwwwww-rw"),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    for i in 0..n_inputs {
        std::fs::set_permissions(
            c.scratch.path().join(format!("store/{i:032}-ro")),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
    }
    let undeclared = c
        .scratch
        .path()
        .join("store/uuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuu-undeclared");
    std::fs::create_dir_all(&undeclared).unwrap();
    let script = format!(
        "cat {first}/file; echo; cat {last}/file; echo; \
         touch {first}/new 2>/dev/null && echo RO-WRITABLE; \
         touch {last}/new 2>/dev/null && echo RO-WRITABLE; \
         rm -rf {last} 2>/dev/null; test -d {last} || echo REMOVED; \
         touch {rw}/new && echo rw-writable; \
         ls /nix/store | grep -c ro$; \
         test -e /nix/store/uuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuu-undeclared && echo LEAK; \
         touch / 2>/dev/null; touch /new 2>/dev/null && echo ROOT-WRITABLE; \
         touch /tmp/t && echo tmp-writable; \
         mkdir /nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-out && \
         echo built > /nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-out/result && \
         echo out > /nix/store/cccccccccccccccccccccccccccccccc-file",
        first = inputs[0].display(),
        last = inputs[n_inputs - 1].display(),
        rw = rw.display(),
    );
    let (st, out, root, _s) = c.run(&script);
    assert!(st.success(), "{out}");
    assert_eq!(
        out,
        format!(
            "ro 0\nro {}\nrw-writable\n{n_inputs}\ntmp-writable\n",
            n_inputs - 1
        )
    );
    let store = nixb_sandbox::chroot_store_dir(&root);
    let mut names: Vec<String> = std::fs::read_dir(&store)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut expected = vec![
        "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-out".to_string(),
        "cccccccccccccccccccccccccccccccc-file".to_string(),
    ];
    // Overlay mode leaves no input mount points on disk, bind mode one per input.
    let overlay = !names.contains(&format!("{:032}-ro", 0));
    let mut work = root.clone().into_os_string();
    work.push(".work");
    assert!(
        !Path::new(&work).exists(),
        "overlay work directory left after the builder was reaped"
    );
    let kernel_has_overlay = std::fs::read_to_string("/proc/filesystems")
        .unwrap()
        .lines()
        .any(|l| l.ends_with("\toverlay"));
    assert_eq!(
        overlay,
        n_inputs >= 8 && kernel_has_overlay,
        "overlay mode for many inputs when the kernel has overlayfs"
    );
    if !overlay {
        // Bind mode: the inputs' mount points are on disk, next to the outputs.
        expected.extend((0..n_inputs).map(|i| format!("{i:032}-ro")));
        expected.push("wwwwwwwwwwwwwwwwwwwwwwwwwwwwwwww-rw".into());
        expected.sort();
    }
    assert_eq!(names, expected);
    assert_eq!(
        std::fs::read_to_string(store.join("bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-out/result")).unwrap(),
        "built\n"
    );
    // Output files belong to the builder (nobody), not to root.
    use std::os::unix::fs::MetadataExt;
    // Without root: the caller's, whose ids the builder has in its namespace.
    let md = std::fs::metadata(store.join("cccccccccccccccccccccccccccccccc-file")).unwrap();
    let builder_ids = if unprivileged() {
        (UNPRIVILEGED_ID, UNPRIVILEGED_ID)
    } else {
        (65534, 65534)
    };
    assert_eq!((md.uid(), md.gid()), builder_ids);
    // The writable input was written through to the host.
    assert!(c_input_host(&root, "wwwwwwwwwwwwwwwwwwwwwwwwwwwwwwww-rw")
        .join("new")
        .exists());
}

/// The host directory of a `Case::input` (scratch/store/<name>), from the chroot root
/// (scratch/root).
fn c_input_host(root: &Path, name: &str) -> PathBuf {
    root.parent().unwrap().join("store").join(name)
}

#[test]
fn many_read_only_inputs() {
    if !have_root() {
        return;
    }
    store_view(40);
}

#[test]
fn few_read_only_inputs() {
    if !have_root() {
        return;
    }
    store_view(3);
}

/// This process's umask, from /proc/self/status (reading it with umask(2) would change it
/// for the other tests running in parallel).
fn own_umask() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .map(|s| s.trim().to_string())
        .expect("Umask line in /proc/self/status")
}

#[test]
fn skeleton_modes_are_exact_and_the_builder_keeps_the_callers_umask() {
    if !have_root() {
        return;
    }
    // The child creates the skeleton under a zero umask and puts the caller's back before
    // the exec: the modes must not depend on the umask, and the builder must get ours.
    let out = ok(
        Case::new(),
        "stat -c '%n %a' /tmp /etc /etc/passwd /etc/group /etc/hosts /proc /nix /nix/store; umask",
    );
    let mut lines: Vec<&str> = out.lines().collect();
    let umask = lines.pop().unwrap_or_default().to_string();
    assert_eq!(
        lines,
        [
            "/tmp 1777",
            "/etc 755",
            "/etc/passwd 644",
            "/etc/group 644",
            "/etc/hosts 644",
            "/proc 555",
            "/nix 755",
            // The store directory is the chroot directory on disk (1770 root:gid: closed to
            // other local users; 0700 without root, the builder being its owner).
            if unprivileged() {
                "/nix/store 700"
            } else {
                "/nix/store 1770"
            },
        ],
        "{out}"
    );
    assert_eq!(
        umask.trim_start_matches('0'),
        own_umask().trim_start_matches('0'),
        "{out}"
    );
}

#[test]
fn spawn_traced_times_every_step_up_to_the_exec() {
    if !have_root() {
        return;
    }
    let mut case = Case::new();
    case.input_ro("00000000000000000000000000000000-traced", "x");
    let (r, w): (OwnedFd, OwnedFd) = nix::unistd::pipe().unwrap();
    drop(r);
    let spec = SandboxSpec {
        program: "/bin/true".into(),
        args: vec![],
        env: vec![],
        cwd: case.cwd.clone(),
        log_fd: w,
        user: case.user.clone(),
        personality: Personality::default(),
        isolation: Isolation::Chroot(case.spec),
        announce: None,
        cgroup: None,
    };
    let (mut b, trace) = nixb_sandbox::spawn_traced(spec).expect("spawn_traced");
    assert!(b.wait().unwrap().success());
    let names: Vec<&str> = trace.steps.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names[..2], ["preparing", "clone"], "{names:#?}");
    assert_eq!(names.last(), Some(&"exec"), "{names:#?}");
    for want in [
        "making all mounts private",
        "installing the seccomp filter",
        if unprivileged() {
            "setuid to 1000"
        } else {
            "setuid to 65534"
        },
    ] {
        assert!(names.contains(&want), "{want} missing: {names:#?}");
    }
    assert!(names
        .iter()
        .any(|n| n.starts_with("bind mounting") && n.ends_with("-traced")));
    let total: Duration = trace.steps.iter().map(|(_, d)| *d).sum();
    assert!(
        total > Duration::ZERO && total < Duration::from_secs(10),
        "{total:?}"
    );
}

#[test]
fn started_builders_leave_the_parents_memory_and_errno_alone() {
    if !have_root() {
        return;
    }
    // A started child shares our memory, this thread's errno included, while it sets up its
    // sandbox (where some calls fail on purpose: no handler can be reset for SIGKILL). Here the
    // parent keeps making a failing call of its own and checks that errno stays its own, from
    // several threads at once, with another thread allocating all the time.
    let churn = common::AllocationChurn::start();
    let workers: Vec<_> = (0..3)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..12 {
                    let mut c = Case::new();
                    if i % 4 == 3 {
                        c.cwd = "/tmp/nix-build-missing-0".into();
                    }
                    let (mut running, mut log) = c
                        .spawn(&format!("echo {t}-{i}; exit {}", i % 3))
                        .expect("start");
                    let mut checked = 0;
                    loop {
                        // SAFETY: close of a descriptor that cannot be open.
                        let r = unsafe { libc::close(-1) };
                        assert_eq!(r, -1);
                        assert_eq!(nix::errno::Errno::last(), nix::errno::Errno::EBADF);
                        checked += 1;
                        if checked > 200 && running.builder.try_wait().is_ok_and(|s| s.is_some()) {
                            break;
                        }
                        if checked > 200 && running.builder.try_wait().is_err() {
                            break;
                        }
                    }
                    let mut out = String::new();
                    log.read_to_string(&mut out).unwrap();
                    let st = running.builder.wait();
                    if i % 4 == 3 {
                        assert!(matches!(st, Err(SandboxError::Setup { .. })), "{st:?}");
                        assert_eq!(out, "");
                    } else {
                        assert_eq!(out, format!("{t}-{i}\n"));
                        assert_eq!(st.unwrap().code(), Some(i % 3));
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("starting thread");
    }
    drop(churn);
}

/// (major, minor) of the running kernel, from uname.
fn kernel_version() -> (u32, u32) {
    let u = nix::sys::utsname::uname().unwrap();
    let release = u.release().to_string_lossy().into_owned();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// The overlay's lower layer made by the parent in a detached tmpfs (the default; Linux 6.15
/// accepts such a layer) and by the child (the fallback for older kernels, forced here): the
/// same view from inside, outputs on disk, nothing else there; and the child waits for the
/// parent only in the first case.
#[test]
fn overlay_lower_layer_made_by_the_parent_or_by_the_child() {
    if !have_root() {
        return;
    }
    let kernel_has_overlay = std::fs::read_to_string("/proc/filesystems")
        .unwrap()
        .lines()
        .any(|l| l.ends_with("\toverlay"));
    for parent_makes_it in [false, true] {
        nixb_sandbox::set_detached_lower(parent_makes_it);
        let mut c = Case::new();
        let n = 12;
        for i in 0..n {
            c.input_ro(&format!("{i:032}-in"), &format!("in {i}"));
        }
        // A file input: its mount point is a file in the lower layer.
        c.file_input_ro("ffffffffffffffffffffffffffffffff-f", "a file\n");
        let (r, w): (OwnedFd, OwnedFd) = nix::unistd::pipe().unwrap();
        let root = c.spec.root.clone();
        let spec = SandboxSpec {
            program: "/bin/sh".into(),
            args: vec![
                "-c".into(),
                format!(
                    "cat /nix/store/{:032}-in/file; echo; cat /nix/store/ffffffffffffffffffffffffffffffff-f; \
                     ls /nix/store | wc -l; touch /nix/store/{:032}-in/x 2>/dev/null && echo WRITABLE; \
                     mkdir /nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-out && echo ok > /nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-out/r; \
                     echo f > /nix/store/cccccccccccccccccccccccccccccccc-f",
                    n - 1,
                    0
                )
                .into(),
            ],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            cwd: c.cwd.clone(),
            log_fd: w,
            user: c.user.clone(),
            personality: Personality::default(),
            isolation: Isolation::Chroot(c.spec),
            announce: None,
            cgroup: None,
        };
        let (mut b, trace) = nixb_sandbox::spawn_traced(spec).expect("spawn_traced");
        let mut out = String::new();
        std::fs::File::from(r).read_to_string(&mut out).unwrap();
        assert!(b.wait().unwrap().success(), "{out}");
        assert_eq!(out, format!("in {}\na file\n{}\n", n - 1, n + 1));
        let names: Vec<&str> = trace.steps.iter().map(|(s, _)| s.as_str()).collect();
        let waited = names.contains(&"waiting for the parent to make the store's mount points");
        let overlay = names
            .iter()
            .any(|s| s.starts_with("mounting the store directory overlay"));
        assert_eq!(overlay, kernel_has_overlay, "{names:#?}");
        // Without root the parent cannot make a file system (fsopen needs CAP_SYS_ADMIN in
        // its user namespace, the host's): the child makes the lower layer.
        assert_eq!(
            waited,
            parent_makes_it && overlay && kernel_version() >= (6, 15) && !unprivileged(),
            "{names:#?}"
        );
        assert_eq!(trace.parallel.is_empty(), !waited, "{:?}", trace.parallel);
        if !waited {
            // The child made the mount points itself.
            assert!(names
                .iter()
                .any(|s| s.starts_with("creating directory") && s.ends_with("-in")));
        }
        let mut on_disk: Vec<String> = std::fs::read_dir(nixb_sandbox::chroot_store_dir(&root))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        assert_eq!(
            on_disk,
            [
                "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-out",
                "cccccccccccccccccccccccccccccccc-f"
            ]
        );
        assert_eq!(
            std::fs::read_to_string(root.join("bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-out/r")).unwrap(),
            "ok\n"
        );
    }
    nixb_sandbox::set_detached_lower(true);
}

/// A mount point that cannot be made in the overlay's lower layer (here below a file input):
/// the parent reports it by name when it makes that layer (the child, told to stop, is
/// reaped), or the child does when it makes it itself; with `spawn` and with `start`.
#[test]
fn a_mount_point_that_cannot_be_made_is_named() {
    if !have_root() {
        return;
    }
    for sync in [true, false] {
        let mut c = Case::new();
        c.sync = sync;
        for i in 0..10 {
            c.input_ro(&format!("{i:032}-in"), "x");
        }
        c.file_input_ro("ffffffffffffffffffffffffffffffff-f", "a file\n");
        let dir = c.scratch.path().join("somedir");
        std::fs::create_dir(&dir).unwrap();
        c.spec.binds.push(BindMount {
            target: "/nix/store/ffffffffffffffffffffffffffffffff-f/sub".into(),
            source: dir,
            optional: false,
            read_only: true,
        });
        let e = match c.spawn("true") {
            Err(e) => e,
            Ok((mut running, _log)) => match running.builder.wait() {
                Err(e) => e,
                Ok(st) => panic!("a bind below a file input worked ({st:?})"),
            },
        };
        let msg = e.to_string();
        assert!(
            msg.contains("/nix/store/ffffffffffffffffffffffffffffffff-f/sub"),
            "sync {sync}: {msg}"
        );
        assert!(
            matches!(e, SandboxError::Prepare { .. } | SandboxError::Setup { .. }),
            "{e:?}"
        );
    }
}

/// A close-on-exec pipe for `SandboxSpec::announce`, the read end non-blocking.
fn announce_pipe() -> (std::fs::File, OwnedFd) {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&r),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    (std::fs::File::from(r), w)
}

/// What is in the pipe now.
fn available(f: &mut std::fs::File) -> String {
    let mut buf = [0u8; 256];
    match f.read(&mut buf) {
        Ok(n) => String::from_utf8(buf[..n].to_vec()).unwrap(),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => String::new(),
        Err(e) => panic!("reading the announce pipe: {e}"),
    }
}

/// A chroot builder is PID 1 of its namespace, yet announces the pid the host (and the
/// Builder) knows it by, before its first command runs; the child keeps no copy of the
/// descriptor once it has written.
#[test]
fn a_chroot_builder_announces_its_host_pid() {
    if !have_root() {
        return;
    }
    let (mut ann, ann_w) = announce_pipe();
    let mut c = Case::new();
    c.announce = Some(std::os::fd::AsRawFd::as_raw_fd(&ann_w));
    let (mut running, mut log) = c.spawn("echo $$; sleep 100").unwrap();
    let mut first = [0u8; 2];
    log.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"1\n", "the builder is PID 1 inside");
    let pid = running.builder.pid.as_raw();
    assert!(pid > 1);
    assert_eq!(available(&mut ann), format!("+{pid}\n"));
    drop(ann_w);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // End of file: an empty read that is not EWOULDBLOCK.
        let mut buf = [0u8; 16];
        match ann.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => panic!("more lines: {:?}", &buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "a copy of the descriptor was kept"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("{e}"),
        }
    }
    running.builder.kill().unwrap();
    running.builder.wait().unwrap();
}

/// A started builder whose setup fails after `start` returned: the child's `+` line is
/// there, and no `-`: the caller, who got the Builder, says that once it has reaped it.
#[test]
fn a_started_builder_that_fails_later_leaves_the_retraction_to_the_caller() {
    if !have_root() {
        return;
    }
    let (mut ann, ann_w) = announce_pipe();
    let mut c = Case::new();
    c.cwd = "/tmp/nix-build-missing-0".into();
    c.announce = Some(std::os::fd::AsRawFd::as_raw_fd(&ann_w));
    let (mut running, _log) = c.spawn("true").expect("start returns before the setup");
    let pid = running.builder.pid.as_raw();
    assert!(matches!(
        running.builder.wait(),
        Err(SandboxError::Setup { .. })
    ));
    assert_eq!(available(&mut ann), format!("+{pid}\n"));
}

/// Every test of this file but [`ROOT_ONLY`], re-run by this test binary as a uid and gid
/// without a passwd entry (`setpriv`), so that builders get a user namespace of their own.
/// The count of passed tests must be the count listed: none may skip.
#[test]
fn every_test_but_the_root_only_ones_passes_as_an_unprivileged_uid() {
    if unprivileged() {
        // In the re-run this test is skipped by name; run directly without root it is the
        // other tests that run or skip.
        have_root();
        return;
    }
    nixb_testsupport::rerun_unprivileged(UNPRIVILEGED_ID, (UNPRIVILEGED_RUN, "1"), ROOT_ONLY);
}

/// `uid-range`: 65536 ids from an unused block (as `auto-allocate-uids` hands them out),
/// mapped by the parent; the builder is root in its namespace and can `chown` to several of
/// its ids, which land on the block's ids outside.
#[test]
fn a_uid_range_builder_chowns_to_several_of_its_ids() {
    if unprivileged() {
        // The parent must be root to map a range; in the re-run this test is skipped.
        have_root();
        return;
    }
    let first = 872_415_232 + 7 * 65536;
    let mut c = Case::new();
    c.user = None;
    c.spec.user_namespace = Some(UserNamespace::range(first, 65536));
    std::os::unix::fs::chown(&c.cwd, Some(first), Some(first)).unwrap();
    let (st, out, root, _s) = c.run(
        "id -u; id -g; cat /proc/self/uid_map; \
         mkdir /nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-out && cd /nix/store/*-out && \
         touch a b c && chown 1:1 a && chown 1000:100 b && chown 65535:65535 c && \
         grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status",
    );
    assert!(st.success(), "{out}");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("0"), "{out}");
    assert_eq!(lines.next(), Some("0"), "{out}");
    let map: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(map, ["0", &first.to_string(), "65536"], "{out}");
    // Capabilities over its own namespaces only; still no new privileges, still filtered.
    let rest: Vec<&str> = lines.collect();
    assert!(rest[0].starts_with("CapEff:\t") && rest[0] != "CapEff:\t0000000000000000");
    assert_eq!(rest[1..], ["NoNewPrivs:\t1", "Seccomp:\t2"], "{out}");
    use std::os::unix::fs::MetadataExt;
    let dir = nixb_sandbox::chroot_store_dir(&root).join("bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-out");
    let owner = |f: &str| {
        let md = std::fs::metadata(dir.join(f)).unwrap();
        (md.uid(), md.gid())
    };
    assert_eq!(owner("a"), (first + 1, first + 1));
    assert_eq!(owner("b"), (first + 1000, first + 100));
    assert_eq!(owner("c"), (first + 65535, first + 65535));
    assert_eq!(
        std::fs::metadata(&dir).unwrap().uid(),
        first,
        "root inside is the block's first id outside"
    );
}
