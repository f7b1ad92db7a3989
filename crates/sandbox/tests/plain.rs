//! Plain mode: a clone sharing the caller's memory, exec in a new session, no namespaces.

mod common;

use std::ffi::OsString;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nixb_sandbox::{spawn, Isolation, Personality, SandboxError, SandboxSpec};

fn log_pipe() -> (std::fs::File, OwnedFd) {
    let (r, w) = nix::unistd::pipe().expect("pipe");
    (std::fs::File::from(r), w)
}

fn sh(script: &str, cwd: PathBuf, log: OwnedFd) -> SandboxSpec {
    SandboxSpec {
        program: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        env: vec![
            ("FOO".into(), "bar baz".into()),
            ("PATH".into(), "/usr/bin:/bin".into()),
        ],
        cwd,
        log_fd: log,
        user: None,
        personality: Personality::default(),
        isolation: Isolation::Plain,
        announce: None,
        cgroup: None,
    }
}

fn read_all(mut f: std::fs::File) -> String {
    let mut s = String::new();
    f.read_to_string(&mut s).expect("read log");
    s
}

#[test]
fn env_cwd_argv0_and_both_streams_reach_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let (r, w) = log_pipe();
    let script = "echo \"foo=$FOO\"; echo \"pwd=$(pwd)\"; echo \"arg0=$0\"; \
                  echo err >&2; env | grep -c . ; read x; echo \"stdin=$?\"";
    let mut b = spawn(sh(script, dir.path().to_path_buf(), w)).expect("spawn");
    let out = read_all(r);
    let st = b.wait().unwrap();
    assert!(st.success(), "{st:?} {out}");
    let cwd = dir.path().canonicalize().unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "foo=bar baz");
    assert_eq!(lines[1], format!("pwd={}", cwd.display()));
    assert_eq!(lines[2], "arg0=sh");
    assert_eq!(lines[3], "err");
    // Only the two variables given (sh adds PWD, and OLDPWD/SHLVL depending on the shell):
    // nothing of the test's own environment may leak in.
    assert!(!out.contains("CARGO"), "{out}");
    // stdin is /dev/null: read hits EOF at once and fails.
    assert_eq!(*lines.last().unwrap(), "stdin=1");
}

#[test]
fn exit_status_is_returned() {
    let (r, w) = log_pipe();
    let mut b = spawn(sh("exit 7", "/".into(), w)).unwrap();
    drop(r);
    assert_eq!(b.wait().unwrap().code(), Some(7));
    // A second wait returns the same status rather than failing with ECHILD.
    assert_eq!(b.wait().unwrap().code(), Some(7));
}

#[test]
fn missing_cwd_names_the_chdir_step() {
    let (_r, w) = log_pipe();
    let err = spawn(sh("true", "/tmp/nix-build-nonexistent-0".into(), w)).unwrap_err();
    match &err {
        SandboxError::Setup { step, errno } => {
            assert_eq!(step, "chdir to /tmp/nix-build-nonexistent-0");
            assert_eq!(*errno, nix::errno::Errno::ENOENT);
        }
        other => panic!("expected a setup error, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "setting up the builder: chdir to /tmp/nix-build-nonexistent-0: \
         ENOENT: No such file or directory"
    );
}

#[test]
fn missing_program_names_the_exec_step() {
    let (_r, w) = log_pipe();
    let mut spec = sh("true", "/".into(), w);
    spec.program = "/nonexistent/builder".into();
    match spawn(spec).unwrap_err() {
        SandboxError::Setup { step, errno } => {
            assert_eq!(step, "executing /nonexistent/builder");
            assert_eq!(errno, nix::errno::Errno::ENOENT);
        }
        other => panic!("expected a setup error, got {other:?}"),
    }
}

/// `start` does not wait for a plain builder's exec: a program that cannot be executed is
/// reported by `wait` (and again by `try_wait`), naming the step, as `spawn` reports it.
#[test]
fn a_plain_start_reports_a_failed_exec_from_wait() {
    let (_r, w) = log_pipe();
    let mut spec = sh("true", "/".into(), w);
    spec.program = "/nonexistent/builder".into();
    let mut b = nixb_sandbox::start(spec).expect("start returns before the exec");
    for got in [b.wait().map(|_| ()), b.try_wait().map(|_| ())] {
        match got.unwrap_err() {
            SandboxError::Setup { step, errno } => {
                assert_eq!(step, "executing /nonexistent/builder");
                assert_eq!(errno, nix::errno::Errno::ENOENT);
            }
            other => panic!("expected a setup error, got {other:?}"),
        }
    }
}

#[test]
fn nul_in_environment_is_rejected_before_forking() {
    let (_r, w) = log_pipe();
    let mut spec = sh("true", "/".into(), w);
    spec.env.push(("BAD".into(), OsString::from("a\0b")));
    let err = spawn(spec).unwrap_err();
    assert!(matches!(err, SandboxError::InvalidSpec(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "invalid sandbox spec: environment variable BAD contains a NUL byte"
    );
}

fn alive(pid: i32) -> bool {
    // A zombie still answers kill(0); look at its state instead.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[test]
fn kill_takes_the_whole_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let (r, w) = log_pipe();
    // A grandchild that would outlive the builder, then the builder itself blocks.
    let script = format!(
        "sleep 1000 & echo $! > {}; echo ready; wait",
        pidfile.display()
    );
    let mut b = spawn(sh(&script, "/".into(), w)).unwrap();
    let mut buf = [0u8; 6];
    let mut r = r;
    r.read_exact(&mut buf).unwrap();
    let grandchild: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(grandchild));
    b.kill().unwrap();
    let st = b.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(9));
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(grandchild) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!alive(grandchild), "grandchild {grandchild} survived kill");
}

#[test]
fn pidfd_becomes_readable_on_exit() {
    let (r, w) = log_pipe();
    let mut b = spawn(sh("sleep 0.2", "/".into(), w)).unwrap();
    drop(r);
    let mut pfd = libc::pollfd {
        fd: b.pidfd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    assert_eq!(n, 0, "pidfd readable while the builder runs");
    assert!(b.try_wait().unwrap().is_none());
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, 10_000) };
    assert_eq!(n, 1);
    assert!(b.try_wait().unwrap().unwrap().success());
}

#[test]
fn builder_runs_as_the_given_user() {
    let (r, w) = log_pipe();
    let mut spec = sh("id -u; id -g; id -G", "/".into(), w);
    spec.user = Some(nixb_sandbox::BuildUserIds {
        uid: 65534,
        gid: 65534,
        supplementary: vec![65534],
    });
    let mut b = spawn(spec).unwrap();
    let out = read_all(r);
    assert!(b.wait().unwrap().success(), "{out}");
    assert_eq!(out, "65534\n65534\n65534\n");
}

#[test]
fn personality_uname26_and_linux32() {
    let (r, w) = log_pipe();
    let mut spec = sh("uname -r; uname -m", "/".into(), w);
    spec.personality = Personality::for_platform("i686-linux", "x86_64-linux", true);
    let mut b = spawn(spec).unwrap();
    let out = read_all(r);
    assert!(b.wait().unwrap().success(), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    // UNAME26 maps 6.x to 2.6.(40 + x) (kernel/sys.c override_release).
    assert!(lines[0].starts_with("2.6."), "{out}");
    if cfg!(target_arch = "x86_64") {
        assert_eq!(lines[1], "i686");
    }
}

/// The builder shares the worker's memory until it execs, so signals are blocked around the
/// clone: the builder must still start with an empty mask and default dispositions, and the
/// caller's own mask must come back exactly as it was.
#[test]
fn signal_mask_and_dispositions_are_reset_and_the_callers_mask_restored() {
    extern "C" fn on_usr1(_: libc::c_int) {}
    // SAFETY: plain signal(2)/pthread_sigmask(3) calls; SIGUSR1, SIGUSR2 and SIGRTMIN+3 are
    // used by no other test in this binary, and the mask is this thread's own.
    let before = unsafe {
        libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t);
        libc::signal(libc::SIGUSR2, libc::SIG_IGN);
        libc::signal(
            libc::SIGRTMIN() + 3,
            on_usr1 as *const () as libc::sighandler_t,
        );
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut before: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut before);
        before
    };
    let (r, w) = log_pipe();
    let mut b = spawn(sh("exec cat /proc/self/status", "/".into(), w)).unwrap();
    let out = read_all(r);
    assert!(b.wait().unwrap().success(), "{out}");
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {name} in {out}"))
            .to_string()
    };
    // Rust's runtime ignores SIGPIPE and this test ignores SIGUSR2: neither may reach the
    // builder; nor may the blocked SIGTERM and SIGHUP.
    assert_eq!(field("SigBlk:"), "0000000000000000");
    assert_eq!(field("SigIgn:"), "0000000000000000");
    // SAFETY: reading this thread's mask into a zeroed set.
    let after = unsafe {
        let mut after: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut after);
        after
    };
    for sig in 1..=64 {
        // SAFETY: sigismember on initialised sets.
        let (was, is) = unsafe {
            (
                libc::sigismember(&before, sig),
                libc::sigismember(&after, sig),
            )
        };
        assert_eq!(
            was, is,
            "signal {sig} blocked before spawn: {was}, after: {is}"
        );
    }
    // SAFETY: as above.
    assert_eq!(unsafe { libc::sigismember(&after, libc::SIGTERM) }, 1);
    // SAFETY: `after` is an initialised sigset_t.
    assert_eq!(unsafe { libc::sigismember(&after, libc::SIGUSR1) }, 0);
}

/// Builders started at once from several threads while others allocate: the children share
/// the address space with all of them until exec, so this is where touching the allocator or
/// a lock in the child would corrupt memory or hang. Every builder must report its own
/// output and status, and setup failures must keep naming their step.
#[test]
fn concurrent_spawns_from_several_threads() {
    let churn = common::AllocationChurn::start();
    let workers: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..40 {
                    let (r, w) = log_pipe();
                    let spec = sh(&format!("echo {t}-{i}; exit {}", i % 3), "/".into(), w);
                    let mut b = spawn(spec).expect("spawn");
                    let out = read_all(r);
                    let st = b.wait().unwrap();
                    assert_eq!(out, format!("{t}-{i}\n"));
                    assert_eq!(st.code(), Some(i % 3));
                    let (_r, w) = log_pipe();
                    match spawn(sh("true", "/nonexistent-nixb-test-dir".into(), w)) {
                        Err(SandboxError::Setup { step, errno }) => {
                            assert_eq!(step, "chdir to /nonexistent-nixb-test-dir");
                            assert_eq!(errno, nix::errno::Errno::ENOENT);
                        }
                        other => panic!("expected a chdir failure, got {other:?}"),
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("spawning thread");
    }
    drop(churn);
}

/// A pipe for `SandboxSpec::announce`: the read end non-blocking, so that a test sees what
/// is in it at that moment rather than waiting for more.
fn announce_pipe() -> (std::fs::File, OwnedFd) {
    // Close-on-exec as the engine's: other tests' children must not keep a copy.
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
    // Only the read end: the child's write blocks for room as in the engine.
    nix::fcntl::fcntl(
        r.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    (std::fs::File::from(r), w)
}

/// What is in the pipe now; "EOF" appended once every write end is closed.
fn available(f: &mut std::fs::File) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match f.read(&mut buf) {
            Ok(0) => {
                out.extend_from_slice(b"EOF");
                break;
            }
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("reading the announce pipe: {e}"),
        }
    }
    String::from_utf8(out).unwrap()
}

/// Everything up to the end of file, which may take a moment: a child that another test's
/// thread is starting holds a copy of every descriptor until its exec.
fn until_eof(f: &mut std::fs::File) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut out = String::new();
    loop {
        out.push_str(&available(f));
        if out.ends_with("EOF") {
            return out;
        }
        assert!(Instant::now() < deadline, "no end of file after {out:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The line is in the pipe by the time the builder's first command has run, names the pid
/// the Builder holds, and the child keeps no copy of the descriptor (end of file once ours
/// is closed, while the builder still runs).
#[test]
fn the_builder_announces_its_pid_before_it_runs() {
    let (log, w) = log_pipe();
    let (mut ann, ann_w) = announce_pipe();
    let mut spec = sh("echo started; sleep 100", "/".into(), w);
    spec.announce = Some(ann_w.as_raw_fd());
    let mut b = nixb_sandbox::start(spec).expect("start");
    let mut first = [0u8; 8];
    let mut log = log;
    log.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"started\n");
    assert_eq!(available(&mut ann), format!("+{}\n", b.pid));
    drop(ann_w);
    assert_eq!(
        until_eof(&mut ann),
        "EOF",
        "a copy of the descriptor was kept"
    );
    assert!(alive(b.pid.as_raw()));
    b.kill().unwrap();
    b.wait().unwrap();
}

/// A reader that is gone (a dead watchdog) makes the write fail with EPIPE and queues a
/// SIGPIPE, blocked in the child: the builder must neither fail nor die of it later.
#[test]
fn a_builder_whose_announcement_nobody_reads_still_runs() {
    let (log, w) = log_pipe();
    let (ann, ann_w) = announce_pipe();
    drop(ann);
    let mut spec = sh("echo ok", "/".into(), w);
    spec.announce = Some(ann_w.as_raw_fd());
    let mut b = spawn(spec).expect("spawn");
    let out = read_all(log);
    let st = b.wait().unwrap();
    assert!(st.success(), "{st:?} {out}");
    assert_eq!(out, "ok\n");
}

/// A setup that fails inside `spawn`: the child said `+`, `spawn` reaped it and says `-`
/// for the same pid, so a watchdog lists nothing that could be reused.
#[test]
fn a_failed_setup_is_retracted() {
    let (_log, w) = log_pipe();
    let (mut ann, ann_w) = announce_pipe();
    let mut spec = sh("true", "/tmp/nix-build-nonexistent-0".into(), w);
    spec.announce = Some(ann_w.as_raw_fd());
    assert!(matches!(spawn(spec), Err(SandboxError::Setup { .. })));
    drop(ann_w);
    let got = until_eof(&mut ann);
    let pid = got
        .strip_prefix('+')
        .and_then(|r| r.split_once('\n'))
        .map(|(pid, _)| pid)
        .expect("a '+' line first");
    assert!(pid.parse::<i32>().unwrap() > 1, "{got:?}");
    assert_eq!(got, format!("+{pid}\n-{pid}\nEOF"));
}

/// The descriptor must not be the log pipe (the child closes it before redirecting output).
#[test]
fn the_log_pipe_cannot_be_the_announcing_descriptor() {
    let (_log, w) = log_pipe();
    let fd = w.as_raw_fd();
    let mut spec = sh("true", "/".into(), w);
    spec.announce = Some(fd);
    let err = spawn(spec).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid sandbox spec: the announcing descriptor is the log pipe"
    );
}
