//! One engine for every client of `nixb daemon`, seen from real Nix 2.8 clients
//! (`nix-store -r` through `NIX_REMOTE=unix://...`), sandbox off.
//!
//! Builders record into a directory outside the store: each appends its name to `built`
//! and, under a `mkdir` lock, counts the builders running at that moment into `levels`.
//! From those the test tells that each derivation was built once and that no more than
//! `max-jobs` builders ever ran at once, whichever clients asked for them.

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use nixb_tests::{run_str, TestStore};

/// How long anything may take before the test calls it a hang.
const WATCHDOG: Duration = Duration::from_secs(180);

const MAX_JOBS: usize = 2;
const CLIENTS: usize = 8;

/// Six leaves, six mids on two leaves each, and a top per client on two mids each: the
/// clients' closures overlap. Every builder holds its slot a moment so that builds
/// overlap in time.
const GRAPH: &str = r#"
let
  mk = name: deps: derivation {
    inherit name deps;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    marks = "@MARKS@";
    args = [ "-c" ''
      lock() { while ! /bin/mkdir $marks/lock 2>/dev/null; do /bin/sleep 0.01; done; }
      lock; read n < $marks/running; n=$((n + 1)); echo $n > $marks/running
      echo $n >> $marks/levels; echo $name >> $marks/built; /bin/rmdir $marks/lock
      echo building $name
      /bin/sleep 0.2
      lock; read n < $marks/running; echo $((n - 1)) > $marks/running; /bin/rmdir $marks/lock
      echo $name > $out
    '' ];
  };
  at = builtins.elemAt;
  mod = a: b: a - b * (a / b);
  leaves = builtins.genList (i: mk "leaf${toString i}" []) 6;
  mids = builtins.genList (i: mk "mid${toString i}" [ (at leaves i) (at leaves (mod (i + 1) 6)) ]) 6;
in builtins.genList (i: mk "top${toString i}" [ (at mids (mod i 6)) (at mids (mod (i + 2) 6)) ]) @CLIENTS@
"#;

/// Waits for the client whose builder holds on until `$marks/release` exists.
const LONELY: &str = r#"
derivation {
  name = "lonely";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  marks = "@MARKS@";
  args = [ "-c" "echo $$ > $marks/lonely.tmp; /bin/mv $marks/lonely.tmp $marks/lonely-started; while [ ! -e $marks/release ]; do /bin/sleep 0.05; done; echo finished > $marks/lonely-finished; echo done > $out" ];
}
"#;

struct Setup {
    t: TestStore,
    marks: PathBuf,
    socket: PathBuf,
}

fn setup() -> Setup {
    let t = TestStore::with_conf(&format!(
        "sandbox = false\nbuild-users-group =\nsubstituters =\nmax-jobs = {MAX_JOBS}\n"
    ));
    let marks = t.root.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    std::fs::write(marks.join("running"), "0\n").unwrap();
    let socket = t.root.path().join("daemon.sock");
    Setup { t, marks, socket }
}

/// Instantiates `expr` (with `@MARKS@` filled in) straight into the store.
fn instantiate(s: &Setup, name: &str, expr: &str) -> Vec<String> {
    let expr = expr
        .replace("@MARKS@", s.marks.to_str().unwrap())
        .replace("@CLIENTS@", &CLIENTS.to_string());
    let file = s.t.file(name, &expr);
    run_str(s.t.nix("nix-instantiate").arg(&file), None)
        .lines()
        .map(str::to_string)
        .collect()
}

fn output_of(s: &Setup, drv: &str) -> String {
    run_str(s.t.nix("nix-store").args(["-q", "--outputs", drv]), None)
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

fn stop_daemon(mut daemon: Child) {
    let _ = kill(Pid::from_raw(daemon.id() as i32), Signal::SIGTERM);
    wait_with_watchdog(&mut daemon, "the daemon's stop");
}

/// `nix-store -r DRV` through the daemon.
fn realise(s: &Setup, drv: &str) -> Child {
    s.t.nix("nix-store")
        .env("NIX_REMOTE", format!("unix://{}", s.socket.display()))
        .arg("-r")
        .arg(drv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting nix-store -r")
}

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

/// Waits for a client (watchdog first, so that a hang fails the test), returning its
/// status, stdout and stderr.
fn finish(mut child: Child, what: &str) -> (std::process::ExitStatus, String, String) {
    use std::io::Read;
    // Both pipes are drained on threads so that a chatty client never blocks.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let o = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let e = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = wait_with_watchdog(&mut child, what);
    (status, o.join().unwrap(), e.join().unwrap())
}

fn wait_for_file(p: &Path, what: &str) -> String {
    let deadline = Instant::now() + WATCHDOG;
    loop {
        if let Ok(text) = std::fs::read_to_string(p) {
            return text;
        }
        assert!(Instant::now() < deadline, "{what} never happened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn alive(pid: Pid) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(
            stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next()),
            Some('Z') | Some('X')
        ),
        Err(_) => false,
    }
}

/// Waits until `pid` has exited; `what` names it when it never does.
fn wait_until_gone(pid: Pid, what: &str) {
    let deadline = Instant::now() + WATCHDOG;
    while alive(pid) {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn counts(marks: &Path) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for name in std::fs::read_to_string(marks.join("built"))
        .unwrap_or_default()
        .lines()
    {
        *m.entry(name.to_string()).or_default() += 1;
    }
    m
}

#[test]
fn eight_clients_share_one_engine_and_its_build_slots() {
    nixb_testsupport::require!(Nix);
    let s = setup();
    let tops = instantiate(&s, "graph.nix", GRAPH);
    assert_eq!(tops.len(), CLIENTS);
    let daemon = start_daemon(&s);

    let clients: Vec<Child> = tops.iter().map(|d| realise(&s, d)).collect();
    for (i, (client, drv)) in clients.into_iter().zip(&tops).enumerate() {
        let (status, out, err) = finish(client, &format!("client {i}"));
        assert!(status.success(), "client {i} failed: {err}");
        assert_eq!(out.trim(), output_of(&s, drv), "client {i}'s result");
        // Each client is shown the builds of its own closure only: no other top.
        for j in (0..CLIENTS).filter(|&j| j != i) {
            assert!(
                !err.contains(&format!("-top{j}.drv")),
                "client {i} was shown the build of top{j}: {err}"
            );
        }
    }
    stop_daemon(daemon);

    let built = counts(&s.marks);
    assert_eq!(built.len(), 6 + 6 + CLIENTS, "built: {built:?}");
    for (name, n) in &built {
        assert_eq!(*n, 1, "{name} was built {n} times");
    }
    let levels = std::fs::read_to_string(s.marks.join("levels")).unwrap();
    let max = levels
        .lines()
        .map(|l| l.trim().parse::<usize>().unwrap())
        .max()
        .unwrap();
    assert!(
        max <= MAX_JOBS,
        "{max} builders ran at once with max-jobs = {MAX_JOBS}"
    );
}

#[test]
fn a_client_that_hangs_up_stops_its_own_build_and_no_other() {
    nixb_testsupport::require!(Nix);
    let s = setup();
    let lonely = instantiate(&s, "lonely.nix", LONELY).remove(0);
    let lonely_out = output_of(&s, &lonely);
    let tops = instantiate(&s, "graph.nix", GRAPH);
    let daemon = start_daemon(&s);

    let mut quitter = realise(&s, &lonely);
    let pid = wait_for_file(&s.marks.join("lonely-started"), "the lonely build's start");
    let builder = Pid::from_raw(pid.trim().parse().expect("the builder's pid"));

    // Another client is served while the lonely build runs (no daemon-wide lock).
    let (status, out, err) = finish(realise(&s, &tops[0]), "the other client");
    assert!(status.success(), "the other client failed: {err}");
    assert_eq!(out.trim(), output_of(&s, &tops[0]));
    assert!(alive(builder), "the lonely build was stopped early");

    // The quitter goes away mid-build: its builder is killed.
    let other = realise(&s, &tops[1]);
    quitter.kill().unwrap();
    quitter.wait().unwrap();
    wait_until_gone(builder, "the builder of a client that hung up still runs");
    // Released now, a builder still running would finish and write its mark.
    std::fs::write(s.marks.join("release"), "").unwrap();
    let (status, out, err) = finish(other, "the client after the hang-up");
    assert!(status.success(), "the other client failed: {err}");
    assert_eq!(out.trim(), output_of(&s, &tops[1]));
    stop_daemon(daemon);

    assert!(
        !s.marks.join("lonely-finished").exists(),
        "the lonely builder went on after its client left"
    );
    let valid = nixb_tests::run(
        s.t.nix("nix-store")
            .arg("--check-validity")
            .arg(&lonely_out),
        None,
    );
    assert!(!valid.status.success(), "the cancelled output is valid");
    assert!(
        !Path::new(&lonely_out).exists(),
        "the cancelled output is on disk"
    );
}

/// The client's writing end of `nixb daemon --stdio`'s standard input, which the test can
/// close while the client waits for a reply on another thread.
#[derive(Clone)]
struct Closeable(std::sync::Arc<std::sync::Mutex<Option<std::process::ChildStdin>>>);

impl std::io::Write for Closeable {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0.lock().unwrap().as_mut() {
            Some(w) => w.write(buf),
            None => Err(std::io::ErrorKind::BrokenPipe.into()),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self.0.lock().unwrap().as_mut() {
            Some(w) => w.flush(),
            None => Ok(()),
        }
    }
}

#[test]
fn a_stdio_client_that_hangs_up_stops_its_build() {
    nixb_testsupport::require!(Nix);
    let s = setup();
    let lonely = instantiate(&s, "lonely.nix", LONELY).remove(0);
    let lonely_out = output_of(&s, &lonely);
    // On pipes, as a parent process or `ssh` without a socket gives them.
    let mut daemon =
        s.t.nixb()
            .args(["daemon", "--stdio"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting nixb daemon --stdio");
    let input = Closeable(std::sync::Arc::new(std::sync::Mutex::new(
        daemon.stdin.take(),
    )));
    let output = daemon.stdout.take().unwrap();
    let store_dir = nixb_store::StoreDir::new(s.t.store_dir().to_str().unwrap()).unwrap();
    let info = nixb_protocol::ClientInfo {
        version: nixb_protocol::Version::new(1, 34),
        features: Default::default(),
    };
    let mut client =
        nixb_protocol::Client::connect(output, input.clone(), store_dir.clone(), &info).unwrap();
    let drv = store_dir.parse(&lonely).unwrap();
    let waiting = std::thread::spawn(move || {
        client.build_paths(
            &[nixb_protocol::types::DerivedPath::Built {
                drv,
                outputs: nixb_protocol::types::OutputsSpec::All,
            }],
            nixb_protocol::types::BuildMode::Normal,
            &mut |_| {},
        )
    });
    let pid = wait_for_file(&s.marks.join("lonely-started"), "the lonely build's start");
    let builder = Pid::from_raw(pid.trim().parse().expect("the builder's pid"));

    // The client closes its end mid-build: the builder is killed and the daemon ends.
    input.0.lock().unwrap().take();
    wait_until_gone(
        builder,
        "the builder of a stdio client that hung up still runs",
    );
    wait_with_watchdog(&mut daemon, "the stdio daemon's end");
    assert!(
        waiting.join().unwrap().is_err(),
        "the build was reported done"
    );
    std::fs::write(s.marks.join("release"), "").unwrap();
    assert!(!s.marks.join("lonely-finished").exists());
    assert!(
        !Path::new(&lonely_out).exists(),
        "the cancelled output is on disk"
    );
}
