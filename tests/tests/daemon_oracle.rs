//! `nixb daemon` against real Nix 2.8 clients. Each scenario runs twice on the same
//! private store location: once through real `nix-daemon` 2.8 (the oracle), then, on a
//! wiped store, through `nixb daemon`; the clients' outputs, exit codes and error lines
//! must agree (registration times aside).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use nixb_tests::{run, TestStore};

/// A daemon process serving the test store on `socket`, stopped with SIGTERM on drop.
struct RunningDaemon {
    child: Child,
}

impl RunningDaemon {
    fn start(mut cmd: Command, socket: &Path) -> RunningDaemon {
        let child = cmd
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("starting the daemon");
        let mut d = RunningDaemon { child };
        // Ready once the socket accepts a connection.
        let deadline = Instant::now() + Duration::from_secs(60);
        while UnixStream::connect(socket).is_err() {
            if let Some(status) = d.child.try_wait().unwrap() {
                panic!("the daemon exited early: {status}");
            }
            assert!(Instant::now() < deadline, "the daemon never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    /// SIGTERM, then the exit status.
    fn stop(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        self.child.wait().unwrap()
    }
}

impl Drop for RunningDaemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
    }
}

fn socket_of(t: &TestStore) -> PathBuf {
    t.root.path().join("daemon.sock")
}

fn start_nixb(t: &TestStore) -> RunningDaemon {
    let socket = socket_of(t);
    let mut cmd = t.nixb();
    cmd.arg("daemon").arg("--socket").arg(&socket);
    RunningDaemon::start(cmd, &socket)
}

fn start_nix(t: &TestStore) -> RunningDaemon {
    // With no writable state directory yet, nix-daemon would take itself for a client
    // and forward every connection to its own socket.
    nixb_tests::run_ok(t.nix("nix-store").arg("--init"), None);
    let socket = socket_of(t);
    let mut cmd = t.nix("nix-daemon");
    cmd.env("NIX_DAEMON_SOCKET_PATH", &socket);
    RunningDaemon::start(cmd, &socket)
}

/// A client command talking to the daemon on the test store's socket.
fn client(t: &TestStore, program: &str) -> Command {
    let mut c = t.nix(program);
    c.env("NIX_REMOTE", format!("unix://{}", socket_of(t).display()));
    c
}

fn wipe(t: &TestStore) {
    for d in [t.store_dir(), t.state_dir(), t.log_dir()] {
        if d.exists() {
            // Store paths are read-only once registered.
            let _ = Command::new("chmod").arg("-R").arg("u+w").arg(&d).status();
            std::fs::remove_dir_all(&d).unwrap();
        }
    }
}

const GOOD: &str = r#"
derivation {
  name = "two-outputs";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  outputs = [ "out" "dev" ];
  args = [ "-c" "echo building the first line; echo a second line >&2; echo out > $out; echo dev > $dev" ];
}
"#;

const DEPENDENT: &str = r#"
let dep = derivation {
  name = "dep";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo dep > $out" ];
};
in derivation {
  name = "uses-dep";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo log-of-uses-dep; read x < ${dep}; echo $x > $out" ];
}
"#;

const FAILING: &str = r#"
derivation {
  name = "fails";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo about to fail; exit 3" ];
}
"#;

/// What one run of the scenario observed, for comparison.
#[derive(Debug, PartialEq)]
struct Observed {
    added: String,
    drv: String,
    realise_stdout: String,
    realise_code: Option<i32>,
    realise_log_seen: bool,
    references: String,
    outputs: String,
    path_info: serde_json::Value,
    dependent_refs: String,
    fail_code: Option<i32>,
    fail_error: String,
    build_l_code: Option<i32>,
    build_l_log_seen: bool,
    query_hash: String,
}

fn out_str(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn err_str(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn scenario(t: &TestStore) -> Observed {
    let file = t.file("hello.txt", "hello daemon\n");
    let good = t.file("good.nix", GOOD);
    let dependent = t.file("dependent.nix", DEPENDENT);
    let failing = t.file("failing.nix", FAILING);

    let add = run(client(t, "nix-store").arg("--add").arg(&file), None);
    assert!(add.status.success(), "{}", err_str(&add));

    let inst = run(client(t, "nix-instantiate").arg(&good), None);
    assert!(inst.status.success(), "{}", err_str(&inst));
    let drv = out_str(&inst);

    let realise = run(client(t, "nix-store").arg("-r").arg(&drv), None);
    let realise_err = err_str(&realise);

    let references = run(
        client(t, "nix-store")
            .args(["-q", "--references"])
            .arg(&drv),
        None,
    );
    let outputs = run(
        client(t, "nix-store").args(["-q", "--outputs"]).arg(&drv),
        None,
    );
    let out_path = out_str(&outputs)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    let info = run(
        client(t, "nix")
            .args(["path-info", "--json"])
            .arg(&out_path),
        None,
    );
    assert!(info.status.success(), "{}", err_str(&info));
    let mut path_info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    for entry in path_info.as_array_mut().unwrap() {
        entry.as_object_mut().unwrap().remove("registrationTime");
    }
    let hash = run(
        client(t, "nix-store").args(["-q", "--hash"]).arg(&out_path),
        None,
    );

    // A graph of two: the dependency is built first, the reference is recorded.
    let dep_drv = out_str(&run(client(t, "nix-instantiate").arg(&dependent), None));
    let dep_out = run(client(t, "nix-store").arg("-r").arg(&dep_drv), None);
    assert!(dep_out.status.success(), "{}", err_str(&dep_out));
    let dependent_refs = run(
        client(t, "nix-store")
            .args(["-q", "--references"])
            .arg(out_str(&dep_out)),
        None,
    );

    let fail_drv = out_str(&run(client(t, "nix-instantiate").arg(&failing), None));
    let fail = run(client(t, "nix-store").arg("-r").arg(&fail_drv), None);
    // The whole error, from its first line (the builder's log tail included).
    let fail_err = err_str(&fail);
    let fail_error = fail_err
        .find("error:")
        .map(|at| fail_err[at..].to_string())
        .unwrap_or_default();

    // `nix build -L` shows the builder's lines prefixed with the derivation's name.
    let fresh = t.file(
        "fresh.nix",
        r#"derivation { name = "fresh"; system = builtins.currentSystem; builder = "/bin/sh";
             args = [ "-c" "echo a-line-from-the-builder; echo x > $out" ]; }"#,
    );
    let build_l = run(
        client(t, "nix")
            .args(["build", "-L", "--no-link", "-f"])
            .arg(&fresh),
        None,
    );

    Observed {
        added: out_str(&add),
        drv,
        realise_stdout: out_str(&realise),
        realise_code: realise.status.code(),
        realise_log_seen: realise_err.contains("building the first line")
            && realise_err.contains("a second line"),
        references: out_str(&references),
        outputs: out_str(&outputs),
        path_info,
        dependent_refs: out_str(&dependent_refs),
        fail_code: fail.status.code(),
        fail_error,
        build_l_code: build_l.status.code(),
        build_l_log_seen: err_str(&build_l).contains("fresh> a-line-from-the-builder"),
        query_hash: out_str(&hash),
    }
}

#[test]
fn nix_clients_see_the_same_through_nixb_daemon_as_through_nix_daemon() {
    nixb_testsupport::require!(Nix);
    // No substituters: the oracle would otherwise spend its time on cache.nixos.org.
    let t = TestStore::with_conf("sandbox = false\nbuild-users-group =\nsubstituters =\n");

    let mut nix_daemon = start_nix(&t);
    let expected = scenario(&t);
    nix_daemon.stop();
    drop(nix_daemon);
    wipe(&t);

    let mut nixb_daemon = start_nixb(&t);
    let got = scenario(&t);
    let status = nixb_daemon.stop();

    // The oracle's own answers, checked for what they must say.
    assert_eq!(expected.realise_code, Some(0));
    assert!(expected.realise_log_seen);
    assert_eq!(expected.outputs.lines().count(), 2);
    assert_eq!(expected.fail_code, Some(1), "{expected:?}");
    assert_eq!(expected.build_l_code, Some(0));
    assert!(expected.build_l_log_seen);

    assert_eq!(got, expected);

    // SIGTERM: a clean exit, and the socket is gone.
    assert!(status.success(), "{status}");
    assert!(!socket_of(&t).exists());
}

#[test]
fn stdio_serves_one_connection() {
    nixb_testsupport::require!(Nix);
    let t = TestStore::new();
    let file = t.file("a.txt", "over stdio\n");
    // Real Nix adds the file to the store directly (the oracle's answer)...
    let expected = nixb_tests::run_str(t.nix("nix-store").arg("--add").arg(&file), None);
    // ...and `nixb daemon --stdio` answers an `ssh-ng`-style client on a pipe pair:
    // here nixb's own protocol client through the binary's stdin and stdout.
    let mut child = t
        .nixb()
        .args(["daemon", "--stdio"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let store_dir = nixb_store_dir(&t);
    let info = nixb_protocol::ClientInfo {
        version: nixb_protocol::Version::new(1, 34),
        features: Default::default(),
    };
    let mut c = nixb_protocol::Client::connect(stdout, stdin, store_dir.clone(), &info).unwrap();
    let p = store_dir.parse(&expected).unwrap();
    let r = c
        .request(
            &nixb_protocol::Request::IsValidPath(p.clone()),
            None,
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(r, nixb_protocol::Response::Bool(true));
    let r = c
        .request(&nixb_protocol::Request::QueryPathInfo(p), None, &mut |_| {})
        .unwrap();
    let nixb_protocol::Response::PathInfo(Some(info)) = r else {
        panic!("{r:?}")
    };
    let nix_hash = nixb_tests::run_str(
        t.nix("nix-store").args(["-q", "--hash"]).arg(&expected),
        None,
    );
    assert_eq!(info.nar_hash.to_base32_typed(), nix_hash);
    drop(c);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}

fn nixb_store_dir(t: &TestStore) -> nixb_store::StoreDir {
    nixb_store::StoreDir::new(t.store_dir().to_str().unwrap()).unwrap()
}

/// A client of protocol 1.37 or later gets each build's CPU times in its BuildResult (Nix
/// fills them from a cgroup; nixb from the builder's rusage, or its cgroup); a 1.34 client,
/// whose BuildResult has no such fields, gets the same build without them.
#[test]
fn build_results_carry_cpu_times_from_1_37() {
    use nixb_protocol::types::{BuildMode, DerivedPath, OutputsSpec};
    let t = TestStore::new();
    let system = format!("{}-linux", std::env::consts::ARCH);
    // Busy for a while in user mode, then a little in the kernel.
    let busy = |name: &str| {
        let drv = serde_json::json!({
            "outputs": { "out": { "path": "" } },
            "inputSrcs": [], "inputDrvs": {}, "system": system, "builder": "/bin/sh",
            "args": ["-c", "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done; echo $i > $out"],
            "env": { "name": name, "builder": "/bin/sh", "system": system, "out": "" },
        });
        nixb_tests::run_str(
            t.nixb().args(["derivation", "add"]),
            Some(drv.to_string().as_bytes()),
        )
    };
    let store_dir = nixb_store_dir(&t);
    for (minor, name) in [(37, "busy-new"), (34, "busy-old")] {
        let drv = store_dir.parse(&busy(name)).unwrap();
        let mut child = t
            .nixb()
            .args(["daemon", "--stdio"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (stdin, stdout) = (child.stdin.take().unwrap(), child.stdout.take().unwrap());
        let info = nixb_protocol::ClientInfo {
            version: nixb_protocol::Version::new(1, minor),
            features: Default::default(),
        };
        let mut c =
            nixb_protocol::Client::connect(stdout, stdin, store_dir.clone(), &info).unwrap();
        let started = std::time::Instant::now();
        let r = c
            .request(
                &nixb_protocol::Request::BuildPathsWithResults {
                    paths: vec![DerivedPath::Built {
                        drv: drv.clone(),
                        outputs: OutputsSpec::All,
                    }],
                    mode: BuildMode::Normal,
                },
                None,
                &mut |_| {},
            )
            .unwrap();
        let wall = started.elapsed();
        let nixb_protocol::Response::BuildResults(results) = r else {
            panic!("{r:?}")
        };
        let result = &results[0].result;
        assert!(result.error_msg.is_empty(), "{result:?}");
        if minor >= 37 {
            let (user, system) = (result.cpu_user.unwrap(), result.cpu_system.unwrap());
            // The loop takes tens of milliseconds of CPU at least, and no more than the
            // request's wall time.
            assert!(user + system > 10_000, "{result:?}");
            assert!(
                (user + system) as u128 <= wall.as_micros(),
                "{result:?} in {wall:?}"
            );
        } else {
            assert_eq!((result.cpu_user, result.cpu_system), (None, None));
        }
        drop(c);
        assert!(child.wait().unwrap().success());
    }
}
