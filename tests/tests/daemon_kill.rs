//! `nixb daemon` stopped while a real Nix 2.8 client (`nix-store -r` through
//! `NIX_REMOTE=unix://...`) has it building: by SIGKILL, and by SIGTERM. The builder
//! writes part of its output, says it has started (its pid, in a file the test waits
//! for) and waits for a release file. Either way the client must exit with an error
//! rather than hang, the builder must not outlive the daemon, real Nix's `nix-store --verify --check-contents` must find the
//! store consistent (every valid path on disk with its registered hash), the output
//! must not be valid, and a restarted daemon must then build it.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use nixb_tests::{run, run_ok, run_str, TestStore};

/// How long anything may take before the test calls it a hang.
const WATCHDOG: Duration = Duration::from_secs(120);

const SLOW: &str = r#"
derivation {
  name = "slow";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  marks = "@MARKS@";
  args = [ "-c" "echo partial > $out; echo $$ > $marks/started.tmp; /bin/mv $marks/started.tmp $marks/started; while [ ! -e $marks/release ]; do /bin/sleep 0.05; done; echo done > $out" ];
}
"#;

struct Setup {
    t: TestStore,
    marks: PathBuf,
    socket: PathBuf,
    drv: String,
    out: String,
}

fn setup() -> Setup {
    let t = TestStore::new();
    let marks = t.root.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    let expr = t.file(
        "slow.nix",
        &SLOW.replace("@MARKS@", marks.to_str().unwrap()),
    );
    // Instantiated straight into the store, before any daemon runs.
    let drv = run_str(t.nix("nix-instantiate").arg(&expr), None);
    let out = run_str(t.nix("nix-store").args(["-q", "--outputs"]).arg(&drv), None);
    let socket = t.root.path().join("daemon.sock");
    Setup {
        t,
        marks,
        socket,
        drv,
        out,
    }
}

fn start_daemon(s: &Setup) -> Child {
    let mut child =
        s.t.nixb()
            .arg("daemon")
            .arg("--socket")
            .arg(&s.socket)
            .stdin(Stdio::null())
            .spawn()
            .expect("starting nixb daemon");
    let deadline = Instant::now() + WATCHDOG;
    while UnixStream::connect(&s.socket).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the daemon exited early: {status}");
        }
        assert!(Instant::now() < deadline, "the daemon never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// `nix-store -r DRV` through the daemon, output kept for the failure message.
fn realise(s: &Setup) -> Child {
    s.t.nix("nix-store")
        .env("NIX_REMOTE", format!("unix://{}", s.socket.display()))
        .arg("-r")
        .arg(&s.drv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting nix-store -r")
}

/// Waits for `child` to exit, killing it and failing the test past the watchdog.
fn wait_with_watchdog(child: &mut Child, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + WATCHDOG;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The builder's pid, once it has said it started.
fn wait_for_builder(s: &Setup, client: &mut Child) -> Pid {
    let started = s.marks.join("started");
    let deadline = Instant::now() + WATCHDOG;
    loop {
        if let Ok(text) = std::fs::read_to_string(&started) {
            return Pid::from_raw(text.trim().parse().expect("the builder's pid"));
        }
        if let Some(status) = client.try_wait().unwrap() {
            let out = client.wait_with_output_ref();
            panic!("the client exited before the build started: {status}\n{out}");
        }
        assert!(Instant::now() < deadline, "the builder never started");
        std::thread::sleep(Duration::from_millis(20));
    }
}

trait OutputRef {
    fn wait_with_output_ref(&mut self) -> String;
}

impl OutputRef for Child {
    fn wait_with_output_ref(&mut self) -> String {
        use std::io::Read;
        let mut out = String::new();
        if let Some(mut e) = self.stderr.take() {
            let _ = e.read_to_string(&mut out);
        }
        out
    }
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn alive(pid: Pid) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => !matches!(
            stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next()),
            Some('Z') | Some('X')
        ),
        Err(_) => false,
    }
}

fn wait_dead(pid: Pid, what: &str) {
    let deadline = Instant::now() + WATCHDOG;
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "{what}: process {pid} still runs"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Real Nix, on the store directly: nothing valid is missing or differs from its hash,
/// and the interrupted output is not valid.
fn assert_consistent(s: &Setup) {
    let verify = run(
        s.t.nix("nix-store").args(["--verify", "--check-contents"]),
        None,
    );
    let err = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success(), "nix-store --verify: {err}");
    assert!(!err.contains("error"), "nix-store --verify: {err}");
    let valid = run(
        s.t.nix("nix-store").arg("--check-validity").arg(&s.out),
        None,
    );
    assert!(
        !valid.status.success(),
        "the interrupted output '{}' is registered as valid",
        s.out
    );
}

/// The client's exit after the daemon went away: an error, promptly.
fn assert_client_failed(client: &mut Child) {
    let status = wait_with_watchdog(client, "the client after the daemon's death");
    let err = client.wait_with_output_ref();
    assert!(!status.success(), "the client succeeded: {err}");
    assert!(err.contains("error"), "the client said: {err}");
}

/// Released, the build succeeds through a fresh daemon.
fn rebuild(s: &Setup) {
    std::fs::write(s.marks.join("release"), "").unwrap();
    let mut daemon = start_daemon(s);
    let mut client = realise(s);
    let status = wait_with_watchdog(&mut client, "the rebuild");
    let err = client.wait_with_output_ref();
    assert!(status.success(), "the rebuild failed: {err}");
    assert_eq!(std::fs::read_to_string(&s.out).unwrap(), "done\n");
    let _ = kill(Pid::from_raw(daemon.id() as i32), Signal::SIGTERM);
    wait_with_watchdog(&mut daemon, "the daemon's stop");
    assert_consistent_after_rebuild(s);
}

fn assert_consistent_after_rebuild(s: &Setup) {
    run_ok(
        s.t.nix("nix-store").args(["--verify", "--check-contents"]),
        None,
    );
    run_ok(
        s.t.nix("nix-store").arg("--check-validity").arg(&s.out),
        None,
    );
}

fn socket_gone(p: &Path) -> bool {
    !p.exists()
}

#[test]
fn sigkill_mid_build_fails_the_client_and_leaves_a_consistent_store() {
    nixb_testsupport::require!(Nix);
    let s = setup();
    let mut daemon = start_daemon(&s);
    let mut client = realise(&s);
    let builder = wait_for_builder(&s, &mut client);

    kill(Pid::from_raw(daemon.id() as i32), Signal::SIGKILL).unwrap();
    daemon.wait().unwrap();
    assert_client_failed(&mut client);
    // The builder does not outlive its daemon (it would go on writing into the store).
    wait_dead(builder, "the builder after the daemon's SIGKILL");

    assert_consistent(&s);
    rebuild(&s);
}

#[test]
fn sigterm_mid_build_stops_the_build_and_removes_the_socket() {
    nixb_testsupport::require!(Nix);
    let s = setup();
    let mut daemon = start_daemon(&s);
    let mut client = realise(&s);
    let builder = wait_for_builder(&s, &mut client);

    kill(Pid::from_raw(daemon.id() as i32), Signal::SIGTERM).unwrap();
    wait_with_watchdog(&mut daemon, "the daemon after SIGTERM");
    assert!(socket_gone(&s.socket), "the socket was left behind");
    assert_client_failed(&mut client);
    wait_dead(builder, "the builder after the daemon's SIGTERM");

    assert_consistent(&s);
    rebuild(&s);
}
