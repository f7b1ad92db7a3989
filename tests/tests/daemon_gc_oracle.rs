//! The collector's operations through `nixb daemon` against real `nix-daemon` 2.8, with
//! real Nix 2.8 clients: `nix-store --gc` (`--print-roots`, `--print-live`,
//! `--print-dead`, `--max-freed`), `nix-store --delete`, `nix-store -q --roots`,
//! `nix-collect-garbage`, `nix-store --optimise`, `nix store sign`: on one store, restored
//! in place between the two daemons, the same outputs, exit codes, deleted paths and
//! signatures. Then a connection's temporary roots (held by both collectors while it is
//! open, released when it closes), and systemd socket activation.

use std::collections::BTreeSet;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use nixb_tests::{run, run_ok, run_str, RunningDaemon, TestStore};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Which {
    Nix,
    Nixb,
}

fn socket_of(t: &TestStore) -> PathBuf {
    t.root.path().join("daemon.sock")
}

fn start(t: &TestStore, which: Which) -> RunningDaemon {
    let socket = socket_of(t);
    match which {
        Which::Nix => {
            let mut cmd = t.nix("nix-daemon");
            cmd.env("NIX_DAEMON_SOCKET_PATH", &socket);
            RunningDaemon::start(cmd, &socket)
        }
        Which::Nixb => {
            let mut cmd = t.nixb();
            cmd.arg("daemon").arg("--socket").arg(&socket);
            RunningDaemon::start(cmd, &socket)
        }
    }
}

/// A real Nix client command talking to the daemon on the test store's socket.
fn client(t: &TestStore, program: &str) -> Command {
    let mut c = t.nix(program);
    c.env("NIX_REMOTE", format!("unix://{}", socket_of(t).display()));
    c
}

fn cp(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success(), "cp -a {} {}", from.display(), to.display());
}

/// Removes a tree whose store paths are read-only.
fn remove_tree(p: &Path) {
    if std::fs::symlink_metadata(p).is_ok() {
        let _ = Command::new("chmod").arg("-R").arg("u+w").arg(p).status();
        std::fs::remove_dir_all(p).unwrap();
    }
}

/// The store, its database and roots, copied aside; restored in place (store paths name
/// their directory, so the store cannot move).
struct Snapshot {
    dir: tempfile::TempDir,
}

const SAVED: &[&str] = &["store", "state/db", "state/gcroots", "files"];

impl Snapshot {
    fn take(t: &TestStore) -> Snapshot {
        let dir = tempfile::tempdir().unwrap();
        for (i, rel) in SAVED.iter().enumerate() {
            cp(&t.root.path().join(rel), &dir.path().join(i.to_string()));
        }
        Snapshot { dir }
    }

    fn restore(&self, t: &TestStore) {
        for (i, rel) in SAVED.iter().enumerate() {
            let dest = t.root.path().join(rel);
            remove_tree(&dest);
            cp(&self.dir.path().join(i.to_string()), &dest);
        }
        remove_tree(&t.state_dir().join("temproots"));
        std::fs::create_dir_all(t.state_dir().join("temproots")).unwrap();
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        let _ = Command::new("chmod")
            .arg("-R")
            .arg("u+w")
            .arg(self.dir.path())
            .status();
    }
}

const EXPR: &str = r#"
let
  mk = name: deps: derivation {
    inherit name deps;
    PATH = "/bin:/usr/bin";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" ''
      mkdir $out
      # The same bytes in every output: something for the optimiser to share.
      i=0; while [ $i -lt 2000 ]; do echo "a line that every output has"; i=$((i+1)); done > $out/common
      echo ${name} > $out/name
      i=0; for d in $deps; do echo $d > $out/dep$i; i=$((i+1)); done
    '' ];
  };
  base = mk "base" [];
  shared = mk "shared" [ base ];
in {
  a-rooted = mk "rooted" [ shared ];
  b-indirect = mk "indirect" [ base ];
  c-dead = mk "dead" [ shared ];
  d-dead2 = mk "dead2" [ (mk "dead2dep" []) ];
  e-deleted = mk "deleted" [];
}
"#;

fn out_str(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn err_str(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn sorted(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s.lines().map(String::from).collect();
    v.sort();
    v
}

/// Lines of `stderr` that start with `prefix`, sorted (the collector's order follows the
/// directory's, which no two stores share).
fn lines_with(stderr: &str, prefix: &str) -> Vec<String> {
    sorted(
        &stderr
            .lines()
            .filter(|l| l.starts_with(prefix))
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

/// The error a client printed, from its first `error:` on.
fn error_of(o: &Output) -> String {
    let e = err_str(o);
    e.find("error:")
        .map(|at| e[at..].to_string())
        .unwrap_or_default()
}

fn store_entries(t: &TestStore) -> BTreeSet<String> {
    std::fs::read_dir(t.store_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".links")
        .collect()
}

/// What one daemon's run showed.
#[derive(Debug, PartialEq)]
struct Observed {
    print_roots: (Option<i32>, Vec<String>),
    query_roots: (Option<i32>, Vec<String>),
    print_live: (Option<i32>, Vec<String>),
    print_dead: (Option<i32>, Vec<String>),
    optimise: (Option<i32>, Vec<String>),
    sign: Option<i32>,
    sigs: String,
    delete_live: (Option<i32>, String, String),
    delete_dead: (Option<i32>, String, Vec<String>),
    gc: (Option<i32>, String, Vec<String>, Vec<String>),
    collect: (Option<i32>, String, Vec<String>),
    max_freed_code: Option<i32>,
    /// The paths `--max-freed 1` deleted (sorted).
    max_freed_deleted: Vec<String>,
    max_freed_stops: bool,
    entries: BTreeSet<String>,
    verify: (Option<i32>, String),
}

struct Fixture {
    outs: std::collections::BTreeMap<String, String>,
    key: PathBuf,
}

/// Builds the graph with real Nix (no daemon) and lays the roots: a gcroots link to
/// `rooted`, an indirect root (`files/result`) to `indirect`.
fn populate(t: &TestStore) -> Fixture {
    let expr = t.file("graph.nix", EXPR);
    let mut outs = std::collections::BTreeMap::new();
    for attr in ["a-rooted", "b-indirect", "c-dead", "d-dead2", "e-deleted"] {
        let out = run_str(
            t.nix("nix-build")
                .arg(&expr)
                .args(["-A", attr, "--no-out-link"]),
            None,
        );
        outs.insert(attr.to_string(), out);
    }
    std::os::unix::fs::symlink(&outs["a-rooted"], t.state_dir().join("gcroots/rooted")).unwrap();
    run_ok(
        t.nix("nix-store")
            .arg("--add-root")
            .arg(t.root.path().join("files/result"))
            .arg("--indirect")
            .arg("-r")
            .arg(&outs["b-indirect"]),
        None,
    );
    let key = t.root.path().join("files/key.sec");
    run_ok(
        t.nix("nix-store")
            .args(["--generate-binary-cache-key", "test-key-1"])
            .arg(&key)
            .arg(t.root.path().join("files/key.pub")),
        None,
    );
    Fixture { outs, key }
}

fn scenario(t: &TestStore, f: &Fixture) -> Observed {
    let o = &f.outs;
    let roots = run(client(t, "nix-store").args(["--gc", "--print-roots"]), None);
    let qroots = run(
        client(t, "nix-store")
            .args(["-q", "--roots"])
            .arg(&o["a-rooted"]),
        None,
    );
    let live = run(client(t, "nix-store").args(["--gc", "--print-live"]), None);
    let dead = run(client(t, "nix-store").args(["--gc", "--print-dead"]), None);
    let optimise = run(client(t, "nix-store").arg("--optimise"), None);
    let sign = run(
        client(t, "nix")
            .args(["store", "sign", "-k"])
            .arg(&f.key)
            .arg(&o["a-rooted"]),
        None,
    );
    let sigs = run(
        client(t, "nix")
            .args(["path-info", "--sigs"])
            .arg(&o["a-rooted"]),
        None,
    );
    let delete_live = run(
        client(t, "nix-store").arg("--delete").arg(&o["a-rooted"]),
        None,
    );
    let delete_dead = run(
        client(t, "nix-store").arg("--delete").arg(&o["e-deleted"]),
        None,
    );
    let gc = run(client(t, "nix-store").arg("--gc"), None);
    // Once the indirect root's link goes, what it kept is garbage too.
    std::fs::remove_file(t.root.path().join("files/result")).unwrap();
    let collect = run(&mut client(t, "nix-collect-garbage"), None);
    let entries = store_entries(t);
    std::fs::remove_file(t.state_dir().join("gcroots/rooted")).unwrap();
    // Which paths go before the limit is reached follows the store directory's order
    // (Nix 2.8 walks it with readdir, and so does nixb): both daemons see the same
    // order here, since the store is restored from the same snapshot by the same `cp -a`
    // and the same paths were deleted before, so the deleted paths are compared too.
    let max_freed = run(
        client(t, "nix-store").args(["--gc", "--max-freed", "1"]),
        None,
    );
    let verify = run(
        client(t, "nix-store").args(["--verify", "--check-contents"]),
        None,
    );
    let gc_err = err_str(&gc);
    Observed {
        print_roots: (roots.status.code(), sorted(&out_str(&roots))),
        query_roots: (qroots.status.code(), sorted(&out_str(&qroots))),
        print_live: (live.status.code(), sorted(&out_str(&live))),
        print_dead: (dead.status.code(), sorted(&out_str(&dead))),
        optimise: (
            optimise.status.code(),
            lines_with(&err_str(&optimise), "")
                .into_iter()
                .filter(|l| l.contains("freed by hard-linking"))
                .collect(),
        ),
        sign: sign.status.code(),
        sigs: out_str(&sigs),
        delete_live: (
            delete_live.status.code(),
            out_str(&delete_live),
            error_of(&delete_live),
        ),
        delete_dead: (
            delete_dead.status.code(),
            out_str(&delete_dead),
            lines_with(&err_str(&delete_dead), "deleting '"),
        ),
        gc: (
            gc.status.code(),
            out_str(&gc),
            lines_with(&gc_err, "deleting '"),
            lines_with(&gc_err, "note: currently hard linking saves"),
        ),
        collect: (
            collect.status.code(),
            out_str(&collect),
            lines_with(&err_str(&collect), "deleting '"),
        ),
        max_freed_code: max_freed.status.code(),
        max_freed_deleted: lines_with(&err_str(&max_freed), "deleting '"),
        max_freed_stops: err_str(&max_freed).contains("deleted more than 1 bytes; stopping"),
        entries,
        verify: (verify.status.code(), error_of(&verify)),
    }
}

#[test]
fn collecting_through_nixb_daemon_matches_nix_daemon() {
    nixb_testsupport::require!(Nix);
    let t = TestStore::with_conf("sandbox = false\nbuild-users-group =\nsubstituters =\n");
    let fixture = populate(&t);
    let snapshot = Snapshot::take(&t);

    let mut nix = start(&t, Which::Nix);
    let expected = scenario(&t, &fixture);
    nix.stop();
    drop(nix);

    snapshot.restore(&t);
    let mut nixb = start(&t, Which::Nixb);
    let got = scenario(&t, &fixture);
    assert!(nixb.stop().success());

    // The oracle's own answers, checked for what they must say.
    let o = &fixture.outs;
    assert_eq!(expected.print_roots.0, Some(0));
    let roots_text = expected.print_roots.1.join("\n");
    assert!(roots_text.contains(&format!("gcroots/rooted -> {}", o["a-rooted"])));
    assert!(roots_text.contains(&format!("files/result -> {}", o["b-indirect"])));
    assert!(expected.print_dead.1.contains(&o["c-dead"]), "{expected:?}");
    assert!(!expected.print_dead.1.contains(&o["a-rooted"]));
    assert!(expected.print_live.1.contains(&o["a-rooted"]));
    assert_eq!(expected.optimise.0, Some(0));
    assert_eq!(expected.optimise.1.len(), 1, "{expected:?}");
    assert_eq!(expected.sign, Some(0));
    assert!(expected.sigs.contains("test-key-1:"), "{expected:?}");
    assert_eq!(expected.delete_live.0, Some(1));
    assert!(
        expected.delete_live.2.contains("still alive"),
        "{expected:?}"
    );
    assert_eq!(expected.delete_dead.0, Some(0));
    assert!(expected.delete_dead.1.starts_with("1 store paths deleted"));
    assert_eq!(expected.gc.0, Some(0));
    assert!(!expected.gc.2.is_empty());
    assert_eq!(expected.gc.3.len(), 1, "{expected:?}");
    assert!(!expected.collect.2.is_empty(), "{expected:?}");
    assert_eq!(expected.max_freed_code, Some(0));
    assert!(!expected.max_freed_deleted.is_empty(), "{expected:?}");
    assert!(expected.max_freed_stops);
    assert_eq!(expected.verify, (Some(0), String::new()));

    assert_eq!(got, expected);
}

/// Paths `nix-store --gc --print-dead` (real Nix, on the store directly) lists.
fn nix_dead(t: &TestStore) -> BTreeSet<String> {
    run_str(t.nix("nix-store").args(["--gc", "--print-dead"]), None)
        .lines()
        .map(String::from)
        .collect()
}

/// Paths `nixb gc --print-dead` lists.
fn nixb_dead(t: &TestStore) -> BTreeSet<String> {
    run_str(t.nixb().args(["gc", "--print-dead"]), None)
        .lines()
        .map(String::from)
        .collect()
}

fn protocol_client(t: &TestStore) -> nixb_protocol::Client<UnixStream, UnixStream> {
    let s = UnixStream::connect(socket_of(t)).unwrap();
    let info = nixb_protocol::ClientInfo {
        version: nixb_protocol::Version::new(1, 34),
        features: Default::default(),
    };
    let store_dir = nixb_store::StoreDir::new(t.store_dir().to_str().unwrap()).unwrap();
    nixb_protocol::Client::connect(s.try_clone().unwrap(), s, store_dir, &info).unwrap()
}

/// A temporary root that a client adds through the daemon is honoured by both engines'
/// collectors while its connection is open and by the daemon's own `CollectGarbage`;
/// once the connection closes it no longer is. The same through `nix-daemon`.
#[test]
fn a_connections_temporary_roots_last_as_long_as_the_connection() {
    nixb_testsupport::require!(Nix);
    let t = TestStore::with_conf("sandbox = false\nbuild-users-group =\nsubstituters =\n");
    let file = t.file("temp.txt", "held by a connection\n");
    let path = run_str(t.nix("nix-store").arg("--add").arg(&file), None);
    run_ok(t.nix("nix-store").arg("--init"), None);
    let store_dir = nixb_store::StoreDir::new(t.store_dir().to_str().unwrap()).unwrap();
    let p = store_dir.parse(&path).unwrap();

    let mut seen = Vec::new();
    for which in [Which::Nix, Which::Nixb] {
        assert!(
            nix_dead(&t).contains(&path),
            "{which:?}: dead to start with"
        );
        let mut d = start(&t, which);
        let mut c = protocol_client(&t);
        let r = c
            .request(
                &nixb_protocol::Request::AddTempRoot(p.clone()),
                None,
                &mut |_| {},
            )
            .unwrap();
        assert_eq!(r, nixb_protocol::Response::One);
        let through_daemon = run_str(client(&t, "nix-store").args(["--gc", "--print-dead"]), None);
        let held = (
            nix_dead(&t).contains(&path),
            nixb_dead(&t).contains(&path),
            through_daemon.lines().any(|l| l == path),
        );
        drop(c);
        // Released when the connection ends: poll until a collector sees it dead.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !nix_dead(&t).contains(&path) {
            assert!(
                Instant::now() < deadline,
                "{which:?}: the root outlived its connection"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let released = nixb_dead(&t).contains(&path);
        assert!(d.stop().success() || which == Which::Nix);
        seen.push((which, held, released));
    }
    assert_eq!(
        seen,
        vec![
            (Which::Nix, (false, false, false), true),
            (Which::Nixb, (false, false, false), true)
        ]
    );
}

/// What a build through the daemon protects goes with the connection that asked for it,
/// not with the daemon's last connection: once `nix-store -r` has ended, its derivation
/// and output are dead to real Nix's collector while another client stays connected.
/// The same through `nix-daemon`, whose per-connection process takes them with it.
#[test]
fn a_builds_roots_go_with_its_connection_while_others_stay() {
    nixb_testsupport::require!(Nix);
    let t = TestStore::with_conf("sandbox = false\nbuild-users-group =\nsubstituters =\n");
    let expr = t.file(
        "one.nix",
        r#"derivation {
  name = "rooted-while-wanted";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo built > $out" ];
}"#,
    );
    let drv = run_str(t.nix("nix-instantiate").arg(&expr), None);
    let out = run_str(t.nix("nix-store").args(["-q", "--outputs", &drv]), None);

    let mut seen = Vec::new();
    for which in [Which::Nix, Which::Nixb] {
        let mut d = start(&t, which);
        let bystander = protocol_client(&t);
        let built = run_str(client(&t, "nix-store").args(["-r", &drv]), None);
        assert_eq!(built, out, "{which:?}");
        // A connection's end is seen by the daemon a moment after its client exits.
        let deadline = Instant::now() + Duration::from_secs(20);
        let released = loop {
            let dead = nix_dead(&t);
            if dead.contains(&out) && dead.contains(&drv) {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        drop(bystander);
        assert!(d.stop().success() || which == Which::Nix);
        run_ok(t.nix("nix-store").args(["--delete", &out]), None);
        seen.push((which, released));
    }
    assert_eq!(seen, vec![(Which::Nix, true), (Which::Nixb, true)]);
}

/// Started by a systemd socket unit: the socket comes as descriptor 3 with `LISTEN_FDS=1`
/// and `LISTEN_PID`; clients reach the daemon through it, and on SIGTERM the daemon
/// leaves the socket's file to systemd. A `LISTEN_PID` of another process is refused.
#[test]
fn socket_activation_serves_the_socket_systemd_passes() {
    nixb_testsupport::require!(Nix);
    let t = TestStore::new();
    let socket = socket_of(&t);
    let listener = UnixListener::bind(&socket).unwrap();
    let spawn = |pid: &str| {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let fd = listener.as_raw_fd();
        // `exec` keeps the shell's pid, so `$$` is the daemon's.
        let mut sh = Command::new("/bin/sh");
        sh.envs(t.env())
            .env("NIXB", nixb_tests::nixb_binary())
            .env("LISTEN_FDS", "1")
            .arg("-c")
            .arg(format!("LISTEN_PID={pid} exec \"$NIXB\" daemon"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        // SAFETY: between fork and exec only dup2 and fcntl run, both async-signal-safe.
        unsafe {
            sh.pre_exec(move || {
                if fd == 3 {
                    nix::fcntl::fcntl(
                        3,
                        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                    )?;
                } else {
                    nix::unistd::dup2(fd, 3)?;
                }
                Ok(())
            });
        }
        sh.spawn().unwrap()
    };

    // Another process's LISTEN_PID: refused, as nix-daemon refuses it.
    let mut wrong = spawn("1");
    let deadline = Instant::now() + Duration::from_secs(120);
    while wrong.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = wrong.kill();
            panic!("a daemon with another process's LISTEN_PID went on serving");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let wrong = wrong.wait_with_output().unwrap();
    assert!(!wrong.status.success());
    assert!(
        err_str(&wrong).contains("unexpected systemd environment variables"),
        "{}",
        err_str(&wrong)
    );

    let mut d = RunningDaemon::adopt(spawn("$$"));
    let file = t.file("via-systemd.txt", "through the activated socket\n");
    let added = run_str(client(&t, "nix-store").arg("--add").arg(&file), None);
    // Where real Nix puts the file: its NAR hash, as `nix-store --add` hashes it.
    let hash = run_str(
        Command::new("nix-hash")
            .args(["--type", "sha256", "--base32"])
            .arg(&file),
        None,
    );
    let expected = run_str(
        t.nix("nix-store")
            .args(["--print-fixed-path", "--recursive", "sha256"])
            .arg(&hash)
            .arg("via-systemd.txt"),
        None,
    );
    assert_eq!(added, expected);
    assert!(d.stop().success());
    assert!(socket.exists(), "the socket belongs to systemd");
    drop(listener);
}

/// A client of the test store's daemon as an untrusted uid.
fn as_untrusted(t: &TestStore, program: &str) -> Command {
    nixb_tests::as_untrusted(t, &client(t, program))
}

/// What an untrusted client saw.
#[derive(Debug, PartialEq)]
struct Untrusted {
    roots: (Option<i32>, Vec<String>),
    dead: (Option<i32>, Vec<String>),
    sign: (Option<i32>, String),
    repair: (Option<i32>, String),
    import: Option<i32>,
}

/// An untrusted uid, as Nix 2.8's daemon treats it: runtime and temporary roots censored
/// in `--print-roots`, collection allowed (a restricted setting given is ignored),
/// signatures, repair and unsigned imports refused. The same through both daemons.
#[test]
fn an_untrusted_uid_is_treated_as_nix_daemon_treats_it() {
    nixb_testsupport::require!(Nix, Root, Program("setpriv"));
    let t = TestStore::with_conf(
        "sandbox = false\nbuild-users-group =\nsubstituters =\nallowed-users = *\ntrusted-users = root\n",
    );
    let fixture = populate(&t);
    // The uid must reach the socket, the store and its own home.
    nixb_tests::open_to_untrusted(&t);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fixture.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let export = t.root.path().join("files/export.nar");
    let exported = run_ok(
        t.nix("nix-store")
            .arg("--export")
            .arg(&fixture.outs["c-dead"]),
        None,
    );
    std::fs::write(&export, &exported).unwrap();
    let store_dir = nixb_store::StoreDir::new(t.store_dir().to_str().unwrap()).unwrap();
    let held = store_dir.parse(&fixture.outs["d-dead2"]).unwrap();

    let mut seen = Vec::new();
    for which in [Which::Nix, Which::Nixb] {
        let mut d = start(&t, which);
        // A temporary root of another (trusted) connection, to be censored.
        let mut c = protocol_client(&t);
        c.request(
            &nixb_protocol::Request::AddTempRoot(held.clone()),
            None,
            &mut |_| {},
        )
        .unwrap();
        let roots = run(
            as_untrusted(&t, "nix-store").args(["--gc", "--print-roots"]),
            None,
        );
        let dead = run(
            as_untrusted(&t, "nix-store").args([
                "--gc",
                "--print-dead",
                "--option",
                "keep-outputs",
                "true",
            ]),
            None,
        );
        let sign = run(
            as_untrusted(&t, "nix")
                .args(["store", "sign", "-k"])
                .arg(&fixture.key)
                .arg(&fixture.outs["a-rooted"]),
            None,
        );
        let repair = run(
            as_untrusted(&t, "nix-store").args(["--verify", "--repair"]),
            None,
        );
        let import = run(
            as_untrusted(&t, "nix-store").arg("--import"),
            Some(&exported),
        );
        drop(c);
        d.stop();
        seen.push(Untrusted {
            roots: (roots.status.code(), sorted(&out_str(&roots))),
            dead: (dead.status.code(), sorted(&out_str(&dead))),
            sign: (sign.status.code(), error_of(&sign)),
            repair: (repair.status.code(), error_of(&repair)),
            import: import.status.code(),
        });
    }
    let (expected, got) = (&seen[0], &seen[1]);
    // The oracle's own answers, checked for what they must say.
    assert!(
        expected
            .roots
            .1
            .contains(&format!("{{censored}} -> {}", fixture.outs["d-dead2"])),
        "{expected:?}"
    );
    assert_eq!(expected.dead.0, Some(0));
    assert!(
        !expected.dead.1.contains(&fixture.outs["d-dead2"]),
        "{expected:?}"
    );
    assert_eq!(expected.sign.0, Some(1));
    assert!(expected.sign.1.contains("not privileged"), "{expected:?}");
    assert_eq!(expected.repair.0, Some(1));
    assert_ne!(expected.import, Some(0));
    assert_eq!(got, expected);
}
