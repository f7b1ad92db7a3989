//! `nixb daemon` against real Nix 2.8 clients. Each scenario runs twice on the same
//! private store location: once through real `nix-daemon` 2.8 (the oracle), then, on a
//! wiped store, through `nixb daemon`; the clients' outputs, exit codes and error lines
//! must agree (registration times aside).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use nixb_tests::{run, RunningDaemon, TestStore};

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
    wipe(&t);

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

/// A graph whose dependency has three outputs (one used), a failing derivation, and
/// derivations for `nix-shell` (no stdenv: nix-shell sources `$stdenv/setup` only where
/// there is one, and takes its shell from `NIX_BUILD_SHELL`).
const GRAPH: &str = r#"
rec {
  multi = derivation { name = "multi"; system = builtins.currentSystem; builder = "/bin/sh";
    outputs = [ "out" "lib" "dev" ];
    args = [ "-c" "echo multi-building; echo o > $out; echo l > $lib; /bin/mkdir $dev; echo $lib > $dev/lib-path; /bin/ln -s lib-path $dev/link" ]; };
  uses = derivation { name = "uses-lib"; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" "echo uses-building; read x < ${multi.lib}; echo $x > $out" ]; };
  fails = derivation { name = "dep-fails"; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" "echo failing-now; exit 4" ]; };
  shell = derivation { name = "shell-env"; system = builtins.currentSystem; builder = "/bin/sh";
    dep = uses; greeting = "hi"; args = [ "-c" "exit 1" ]; };
  badshell = derivation { name = "bad-shell"; system = builtins.currentSystem; builder = "/bin/sh";
    dep = fails; args = [ "-c" "exit 1" ]; };
}
"#;

/// One client command as seen: exit code, stdout, stderr (normalised where the step
/// says so).
#[derive(Debug, PartialEq)]
struct Step {
    name: &'static str,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// How a step's output is compared.
enum Keep {
    /// stdout and stderr as they are.
    All,
    /// stdout as its length and sha256 (a NAR, an export), stderr as it is.
    BinaryOut,
    /// stdout, and only the stderr lines containing this (the rest is the engine's own
    /// progress, worded differently by nixb's engine).
    StderrLinesWith(&'static str),
    /// stdout, and the stderr lines sorted: independent builds may start in either order.
    UnorderedStderr,
}

fn step(name: &'static str, o: &Output, keep: Keep) -> Step {
    let stderr = err_str(o);
    let (stdout, stderr) = match keep {
        Keep::All => (out_str(o), stderr),
        Keep::BinaryOut => {
            let h = nixb_store::Hash::digest(nixb_store::HashAlgo::Sha256, &o.stdout);
            (
                format!("{} bytes, {}", o.stdout.len(), h.to_base32_typed()),
                stderr,
            )
        }
        Keep::UnorderedStderr => {
            let mut lines: Vec<&str> = stderr.lines().collect();
            lines.sort_unstable();
            (out_str(o), lines.join("\n"))
        }
        Keep::StderrLinesWith(s) => (
            out_str(o),
            stderr
                .lines()
                .filter(|l| l.contains(s))
                .collect::<Vec<_>>()
                .join("\n"),
        ),
    };
    Step {
        name,
        code: o.status.code(),
        stdout,
        stderr,
    }
}

/// The steps nixb's daemon gave are those Nix's gave, one by one; the differing ones listed.
fn assert_same_steps(got: &[Step], expected: &[Step]) {
    assert_eq!(got.len(), expected.len(), "number of steps");
    let differing: Vec<String> = got
        .iter()
        .zip(expected)
        .filter(|(g, e)| g != e)
        .map(|(g, e)| format!("step '{}':\n  nixb: {g:?}\n  nix:  {e:?}", e.name))
        .collect();
    assert!(differing.is_empty(), "{}", differing.join("\n"));
}

/// Every file under `dir`, relative, with its sha256.
fn tree_listing(dir: &Path) -> String {
    fn walk(root: &Path, d: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(d) else {
            return;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let h = nixb_store::Hash::digest(
                    nixb_store::HashAlgo::Sha256,
                    std::fs::read(&p).unwrap(),
                );
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                out.push(format!("{rel} {}", h.to_base32_typed()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out.join("\n")
}

/// The names under `dir` and where each symlink points.
fn links_listing(dir: &Path) -> String {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            match std::fs::read_link(&p) {
                Ok(target) => format!("{name} -> {}", target.display()),
                Err(_) => name,
            }
        })
        .collect();
    out.sort();
    out.join("\n")
}

/// Waits until the daemon has dropped the temporary roots of the connections that have
/// ended: every `temproots` file empty or gone. A client's connection ends a moment after
/// the client exits (Nix's per-connection process exits and removes its file; nixb's daemon
/// empties its file once no connection is left), so a collection started right after a
/// build could still see the build's roots.
fn settle(t: &TestStore) {
    let dir = t.state_dir().join("temproots");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let held: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0))
                    .collect()
            })
            .unwrap_or_default();
        if held.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "temporary roots still held: {held:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Makes a store path's single file writable and overwrites it.
fn corrupt(path: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(path, "corrupted\n").unwrap();
}

/// The second scenario: multi-output graphs with `nix build -L` and `nix-build`, `nix
/// store ping`, `nix-store --dump`, `--add-fixed`, `--export` / `--import`, `--verify
/// --check-contents`, `nix copy` to and from a binary cache (with and without signature
/// checking), `nix-shell --run`, `nix-env --set` into a profile, corruption found and
/// repaired (`--verify --check-contents --repair`, `-r --repair`), and build logs sent with
/// `nix store copy-log` (AddBuildLog).
fn scenario_more(t: &TestStore) -> Vec<Step> {
    let graph = t.file("graph.nix", GRAPH);
    let files = t.root.path().join("files");
    let cache = format!("file://{}", files.join("cache").display());
    let mut steps = Vec::new();
    let nix = |args: &[&str]| {
        let mut c = client(t, "nix");
        c.args(args);
        c
    };
    let shell = |attr: &str, cmd: &str| {
        let mut c = client(t, "nix-shell");
        c.env("NIX_BUILD_SHELL", "bash")
            .arg(&graph)
            .args(["-A", attr, "--run", cmd]);
        c
    };

    // What a build would do (`QueryMissing`): the whole graph first, and once the inputs
    // are built, the last derivation alone.
    let dry_run = || {
        let mut c = client(t, "nix-build");
        c.arg("--dry-run").arg(&graph).args(["-A", "shell"]);
        c
    };
    steps.push(step(
        "nix-build --dry-run",
        &run(&mut dry_run(), None),
        Keep::All,
    ));

    // Two builders, log lines prefixed with each one's name; the dependency's three
    // outputs all registered though one is used.
    let o = run(
        client(t, "nix")
            .args(["build", "-L", "--no-link", "--json", "-f"])
            .arg(&graph)
            .arg("uses"),
        None,
    );
    steps.push(step("nix build -L", &o, Keep::All));
    let o = run(&mut dry_run(), None);
    steps.push(step("nix-build --dry-run, inputs built", &o, Keep::All));
    let o = run(
        client(t, "nix-build")
            .arg(&graph)
            .args(["-A", "multi", "-o"])
            .arg(files.join("result")),
        None,
    );
    steps.push(step("nix-build multi-output", &o, Keep::All));
    let multi_drv = out_str(&run(
        client(t, "nix-instantiate")
            .arg(&graph)
            .args(["-A", "multi"]),
        None,
    ));
    let o = run(
        client(t, "nix-store")
            .args(["-q", "--outputs"])
            .arg(&multi_drv),
        None,
    );
    steps.push(step("outputs", &o, Keep::All));
    let multi_outs = out_str(&o);
    let dev = multi_outs
        .lines()
        .find(|l| l.ends_with("-dev"))
        .unwrap_or_default()
        .to_string();

    let o = run(&mut nix(&["store", "ping"]), None);
    let mut ping = step("nix store ping", &o, Keep::All);
    // The daemon's own version string differs by design.
    ping.stderr = ping
        .stderr
        .lines()
        .map(|l| {
            if l.starts_with("Version: ") {
                "Version: <daemon>"
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    steps.push(ping);

    let o = run(client(t, "nix-store").arg("--dump").arg(&dev), None);
    steps.push(step("--dump", &o, Keep::BinaryOut));

    let fixed = t.file("fixed.txt", "fixed\n");
    t.file("fdir/a", "a\n");
    let o = run(
        client(t, "nix-store")
            .args(["--add-fixed", "sha256"])
            .arg(&fixed),
        None,
    );
    steps.push(step("--add-fixed", &o, Keep::All));
    let o = run(
        client(t, "nix-store")
            .args(["--add-fixed", "--recursive", "sha1"])
            .arg(files.join("fdir")),
        None,
    );
    steps.push(step("--add-fixed --recursive", &o, Keep::All));

    let uses_drv = out_str(&run(
        client(t, "nix-instantiate")
            .arg(&graph)
            .args(["-A", "uses"]),
        None,
    ));
    let uses = out_str(&run(
        client(t, "nix-store")
            .args(["-q", "--outputs"])
            .arg(&uses_drv),
        None,
    ));
    let export = run(client(t, "nix-store").arg("--export").arg(&uses), None);
    steps.push(step("--export", &export, Keep::BinaryOut));
    // Nothing holds the path once its builder's connection is gone.
    settle(t);
    let o = run(client(t, "nix-store").arg("--delete").arg(&uses), None);
    steps.push(step("--delete", &o, Keep::All));
    let o = run(client(t, "nix-store").arg("--import"), Some(&export.stdout));
    steps.push(step("--import", &o, Keep::All));
    let o = run(
        client(t, "nix-store").args(["--verify", "--check-contents"]),
        None,
    );
    steps.push(step("--verify --check-contents", &o, Keep::All));

    // nix copy both ways: from the daemon's store into a binary cache, then back.
    let o = run(&mut nix(&["copy", "--to", &cache, &uses]), None);
    steps.push(step("nix copy --to", &o, Keep::All));
    steps.push(Step {
        name: "the binary cache",
        code: None,
        stdout: tree_listing(&files.join("cache")),
        stderr: String::new(),
    });
    settle(t);
    let o = run(client(t, "nix-store").arg("--delete").arg(&uses), None);
    steps.push(step("--delete again", &o, Keep::All));
    // Unsigned, and the client asks for signatures to be checked.
    let o = run(&mut nix(&["copy", "--from", &cache, &uses]), None);
    steps.push(step("nix copy --from, unsigned", &o, Keep::All));
    let o = run(
        &mut nix(&["copy", "--no-check-sigs", "--from", &cache, &uses]),
        None,
    );
    steps.push(step("nix copy --from --no-check-sigs", &o, Keep::All));
    let o = run(
        client(t, "nix-store")
            .args(["-q", "--hash", "--references"])
            .arg(&uses),
        None,
    );
    steps.push(step("copied back", &o, Keep::All));

    let o = run(&mut shell("shell", "echo $greeting; cat $dep"), None);
    steps.push(step("nix-shell --run", &o, Keep::All));
    let o = run(&mut shell("shell", "exit 7"), None);
    steps.push(step("nix-shell --run exit 7", &o, Keep::All));
    let o = run(&mut shell("badshell", "true"), None);
    steps.push(step("nix-shell, input fails", &o, Keep::All));

    let o = run(
        client(t, "nix-env")
            .arg("-p")
            .arg(files.join("profile"))
            .arg("--set")
            .arg(&uses),
        None,
    );
    steps.push(step("nix-env --set", &o, Keep::All));
    steps.push(Step {
        name: "profile links",
        code: None,
        stdout: links_listing(&files),
        stderr: String::new(),
    });

    // Corruption: found by --check-contents, repaired from the deriver by a trusted client.
    corrupt(&uses);
    let o = run(
        client(t, "nix-store").args(["--verify", "--check-contents"]),
        None,
    );
    steps.push(step("--verify finds corruption", &o, Keep::All));
    let o = run(
        client(t, "nix-store")
            .args(["-r", "--repair"])
            .arg(&uses_drv),
        None,
    );
    steps.push(step("-r --repair", &o, Keep::StderrLinesWith("error")));
    steps.push(Step {
        name: "repaired by -r --repair",
        code: None,
        stdout: std::fs::read_to_string(&uses).unwrap(),
        stderr: String::new(),
    });
    corrupt(&uses);
    let o = run(
        client(t, "nix-store").args(["--verify", "--check-contents", "--repair"]),
        None,
    );
    steps.push(step(
        "--verify --repair",
        &o,
        Keep::StderrLinesWith("modified"),
    ));
    steps.push(Step {
        name: "repaired by --verify --repair",
        code: None,
        stdout: std::fs::read_to_string(&uses).unwrap(),
        stderr: String::new(),
    });

    // AddBuildLog: the log goes to the cache, is lost here, and comes back.
    let o = run(
        &mut nix(&["store", "copy-log", "--to", &cache, &uses_drv]),
        None,
    );
    steps.push(step("copy-log --to", &o, Keep::All));
    let base = Path::new(&uses_drv).file_name().unwrap().to_str().unwrap();
    let log_file = t
        .log_dir()
        .join("drvs")
        .join(&base[..2])
        .join(format!("{}.bz2", &base[2..]));
    std::fs::remove_file(&log_file).unwrap();
    let remote = format!("unix://{}", socket_of(t).display());
    let o = run(
        &mut nix(&[
            "store", "copy-log", "--from", &cache, "--to", &remote, &uses_drv,
        ]),
        None,
    );
    steps.push(step("copy-log --from (AddBuildLog)", &o, Keep::All));
    let o = run(client(t, "nix-store").arg("-l").arg(&uses_drv), None);
    steps.push(step("nix-store -l", &o, Keep::All));

    // Paths gone from disk: one nothing refers to (removed from the database), one that
    // a valid path refers to (an error).
    let fixed_path = steps
        .iter()
        .find(|s| s.name == "--add-fixed")
        .map(|s| s.stdout.clone())
        .unwrap_or_default();
    let lib = multi_outs
        .lines()
        .find(|l| l.ends_with("-lib"))
        .unwrap_or_default()
        .to_string();
    for gone in [&fixed_path, &lib] {
        let _ = Command::new("chmod")
            .arg("-R")
            .arg("u+w")
            .arg(gone)
            .status();
        std::fs::remove_file(gone).unwrap();
    }
    // The client's own time limits, sent with SetOptions.
    let silent = t.file(
        "silent.nix",
        r#"derivation { name = "silent"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "/bin/sleep 30; echo > $out" ]; }"#,
    );
    let silent_drv = out_str(&run(client(t, "nix-instantiate").arg(&silent), None));
    for (setting, name) in [
        ("max-silent-time", "client's max-silent-time"),
        ("timeout", "client's timeout"),
    ] {
        let o = run(
            client(t, "nix-store")
                .args(["-r", "--option", setting, "1"])
                .arg(&silent_drv),
            None,
        );
        steps.push(step(name, &o, Keep::All));
    }

    let o = run(client(t, "nix-store").arg("--verify"), None);
    steps.push(step("--verify, paths gone", &o, Keep::All));
    let o = run(
        client(t, "nix-store")
            .arg("--check-validity")
            .arg(&fixed_path)
            .arg(&lib),
        None,
    );
    steps.push(step("valid after --verify", &o, Keep::All));
    steps
}

#[test]
fn more_nix_clients_see_the_same_through_nixb_daemon_as_through_nix_daemon() {
    nixb_testsupport::require!(Nix);
    let t = TestStore::with_conf("sandbox = false\nbuild-users-group =\nsubstituters =\n");

    let mut nix_daemon = start_nix(&t);
    let expected = scenario_more(&t);
    nix_daemon.stop();
    drop(nix_daemon);
    wipe(&t);
    std::fs::remove_dir_all(t.root.path().join("files")).unwrap();

    let mut nixb_daemon = start_nixb(&t);
    let got = scenario_more(&t);
    assert!(nixb_daemon.stop().success());
    // Read-only store paths would keep the temp dir from being removed.
    wipe(&t);

    // The oracle's own answers, checked for what they must say.
    let by_name = |name: &str| expected.iter().find(|s| s.name == name).unwrap();
    for ok in [
        "nix build -L",
        "nix-build multi-output",
        "--import",
        "nix copy --from --no-check-sigs",
        "nix-shell --run",
        "-r --repair",
        "--verify --repair",
        "copy-log --from (AddBuildLog)",
    ] {
        assert_eq!(by_name(ok).code, Some(0), "{:?}", by_name(ok));
    }
    assert!(by_name("nix build -L")
        .stderr
        .contains("multi> multi-building"));
    assert!(by_name("nix build -L")
        .stderr
        .contains("uses-lib> uses-building"));
    assert_eq!(by_name("outputs").stdout.lines().count(), 3);
    assert_eq!(by_name("nix copy --from, unsigned").code, Some(1));
    assert!(by_name("nix copy --from, unsigned")
        .stderr
        .contains("lacks a valid signature"));
    assert_eq!(by_name("nix-shell --run").stdout, "hi\nl");
    assert_eq!(by_name("nix-shell --run exit 7").code, Some(7));
    // Through a daemon, Nix 2.8's client reports a timed-out build as an error (exit 1).
    assert_eq!(by_name("client's max-silent-time").code, Some(1));
    assert!(by_name("client's max-silent-time")
        .stderr
        .contains("timed out after 1 seconds of silence"));
    assert_eq!(by_name("client's timeout").code, Some(1));
    assert!(by_name("client's timeout")
        .stderr
        .contains("timed out after 1 seconds"));
    assert_eq!(by_name("nix-shell, input fails").code, Some(1));
    assert_eq!(by_name("--verify finds corruption").code, Some(1));
    assert_eq!(by_name("repaired by -r --repair").stdout, "l\n");
    assert_eq!(by_name("repaired by --verify --repair").stdout, "l\n");
    assert_eq!(by_name("nix-store -l").stdout, "uses-building");
    assert!(by_name("--verify, paths gone")
        .stderr
        .contains("disappeared, removing from database"));
    assert!(by_name("--verify, paths gone")
        .stderr
        .contains("disappeared, but it still has valid referrers!"));

    assert_same_steps(&got, &expected);
}

/// What an untrusted uid may add and do, as Nix 2.8's daemon decides: a content-addressed
/// path or one signed by a key in `trusted-public-keys` goes in, an unsigned input-addressed
/// one does not even with `--no-check-sigs`; repairing and adding build logs are refused.
fn scenario_untrusted(t: &TestStore) -> Vec<Step> {
    let graph = t.file("graph.nix", GRAPH);
    let files = t.root.path().join("files");
    let plain = format!("file://{}", files.join("cache").display());
    let signed = format!(
        "file://{}?secret-key={}",
        files.join("signed").display(),
        files.join("key").display()
    );
    let nix = |args: &[&str]| {
        let mut c = client(t, "nix");
        c.args(args);
        c
    };
    let untrusted = |args: &[&str]| nixb_tests::as_untrusted(t, &nix(args));

    // Set up as root: a content-addressed path and a built one, in an unsigned and a
    // signed cache, then gone from the store; the build log in the unsigned cache.
    let added = nixb_tests::run_str(
        client(t, "nix-store")
            .arg("--add")
            .arg(t.file("added.txt", "added\n")),
        None,
    );
    let drv = out_str(&run(
        client(t, "nix-instantiate")
            .arg(&graph)
            .args(["-A", "uses"]),
        None,
    ));
    let built = nixb_tests::run_str(client(t, "nix-store").arg("-r").arg(&drv), None);
    nixb_tests::run_ok(&mut nix(&["copy", "--to", &plain, &added, &built]), None);
    nixb_tests::run_ok(&mut nix(&["copy", "--to", &signed, &built]), None);
    nixb_tests::run_ok(&mut nix(&["store", "copy-log", "--to", &plain, &drv]), None);
    settle(t);
    nixb_tests::run_ok(
        client(t, "nix-store")
            .arg("--delete")
            .arg(&added)
            .arg(&built),
        None,
    );

    let plain_from = plain.clone();
    let signed_from = format!("file://{}", files.join("signed").display());
    let remote = format!("unix://{}", socket_of(t).display());
    let mut steps = Vec::new();
    let o = run(
        &mut untrusted(&["copy", "--from", &plain_from, &added]),
        None,
    );
    steps.push(step("content-addressed", &o, Keep::All));
    let o = run(
        &mut untrusted(&["copy", "--no-check-sigs", "--from", &plain_from, &built]),
        None,
    );
    steps.push(step("unsigned, --no-check-sigs", &o, Keep::All));
    let o = run(
        &mut untrusted(&["copy", "--from", &signed_from, &built]),
        None,
    );
    steps.push(step("signed by a trusted key", &o, Keep::All));
    let o = run(
        &mut nixb_tests::as_untrusted(t, client(t, "nix-store").args(["-r", "--repair"]).arg(&drv)),
        None,
    );
    steps.push(step("-r --repair", &o, Keep::All));
    let o = run(
        &mut untrusted(&[
            "store",
            "copy-log",
            "--from",
            &plain_from,
            "--to",
            &remote,
            &drv,
        ]),
        None,
    );
    steps.push(step(
        "copy-log (AddBuildLog)",
        &o,
        Keep::StderrLinesWith("error"),
    ));
    let o = run(
        client(t, "nix-store")
            .arg("--check-validity")
            .arg(&added)
            .arg(&built),
        None,
    );
    steps.push(step("valid afterwards", &o, Keep::All));
    steps
}

#[test]
fn an_untrusted_uid_adds_and_repairs_as_through_nix_daemon() {
    nixb_testsupport::require!(Nix, Root, Program("setpriv"));
    let t = TestStore::new();
    let key = t.root.path().join("files/key");
    let secret = nixb_tests::run_ok(
        t.nix("nix")
            .args(["key", "generate-secret", "--key-name", "test-1"]),
        None,
    );
    std::fs::create_dir_all(key.parent().unwrap()).unwrap();
    std::fs::write(&key, &secret).unwrap();
    let public = nixb_tests::run_str(
        t.nix("nix").args(["key", "convert-secret-to-public"]),
        Some(&secret),
    );
    std::fs::write(
        t.root.path().join("etc/nix.conf"),
        format!(
            "sandbox = false\nbuild-users-group =\nsubstituters =\nallowed-users = *\n\
             trusted-users = root\ntrusted-public-keys = {public}\n"
        ),
    )
    .unwrap();

    let mut seen = Vec::new();
    for nixb in [false, true] {
        let mut d = if nixb { start_nixb(&t) } else { start_nix(&t) };
        nixb_tests::open_to_untrusted(&t);
        seen.push(scenario_untrusted(&t));
        d.stop();
        drop(d);
        wipe(&t);
        for sub in ["cache", "signed"] {
            let _ = std::fs::remove_dir_all(t.root.path().join("files").join(sub));
        }
    }
    let (expected, got) = (&seen[0], &seen[1]);
    // The oracle's own answers, checked for what they must say.
    let code = |name: &str| expected.iter().find(|s| s.name == name).unwrap().code;
    assert_eq!(code("content-addressed"), Some(0), "{expected:?}");
    assert_eq!(code("unsigned, --no-check-sigs"), Some(1), "{expected:?}");
    assert_eq!(code("signed by a trusted key"), Some(0), "{expected:?}");
    assert_eq!(code("-r --repair"), Some(1), "{expected:?}");
    assert_eq!(code("copy-log (AddBuildLog)"), Some(1), "{expected:?}");
    assert_same_steps(got, expected);
}

/// Packages for `nix-env -i`: files that collide (`bin/tool`), a priority that settles a
/// collision (`b`), a package whose propagated package comes along (`c` brings `d`), two
/// outputs installed together (`m`), and one that conflicts at equal priority (`e`).
const PROFILE_PACKAGES: &str = r#"
let
  pkg = name: files: extra: derivation ({
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    args = [ "-c" ''
      for f in ${files}; do mkdir -p $out/''${f%/*}; echo "${name} $f" > $out/$f; done
      ${extra}
    '' ];
  });
in rec {
  a = pkg "a" "bin/a bin/tool share/man/man1/a.1 share/.hidden nix-support/setup-hook share/info/dir" "";
  b = pkg "b" "bin/b bin/tool share/man/man1/b.1 lib/libb" "" // { meta.priority = 3; };
  d = pkg "d" "bin/d bin/tool share/doc/d" "";
  c = pkg "c" "bin/c" "mkdir -p $out/nix-support; echo ${d} > $out/nix-support/propagated-user-env-packages";
  e = pkg "e" "bin/a" "";
  m = derivation {
    name = "m";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    outputs = [ "out" "man" ];
    PATH = "/usr/bin:/bin";
    args = [ "-c" "mkdir -p $out/bin $man/share/man/man1; echo m > $out/bin/m; echo m > $man/share/man/man1/m.1" ];
  } // { meta.outputsToInstall = [ "out" "man" ]; };
}
"#;

/// Every entry under `dir`, relative: directories with a `/`, symlinks with their target.
fn profile_tree(dir: &Path) -> String {
    fn walk(root: &Path, d: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            match std::fs::read_link(&p) {
                Ok(target) => out.push(format!("{rel} -> {}", target.display())),
                Err(_) if p.is_dir() => {
                    out.push(format!("{rel}/"));
                    walk(root, &p, out);
                }
                Err(_) => out.push(rel),
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out.join("\n")
}

/// `nix-env -i` into a profile (the `builtin:buildenv` user environment), a query, a
/// conflict at equal priority, and an uninstall.
fn scenario_profiles(t: &TestStore) -> Vec<Step> {
    let pkgs = t.file("packages.nix", PROFILE_PACKAGES);
    let profile = t.root.path().join("files/profile");
    std::fs::create_dir_all(profile.parent().unwrap()).unwrap();
    let nix_env = || {
        let mut c = client(t, "nix-env");
        c.arg("-p").arg(&profile).arg("-f").arg(&pkgs);
        c
    };
    let generation = |name: &'static str| {
        let target = std::fs::canonicalize(&profile).unwrap();
        let dump = run(client(t, "nix-store").arg("--dump").arg(&target), None);
        vec![
            Step {
                name,
                code: None,
                stdout: format!("{}\n{}", target.display(), profile_tree(&target)),
                stderr: String::new(),
            },
            step(name, &dump, Keep::BinaryOut),
        ]
    };
    let mut steps = Vec::new();
    let o = run(nix_env().args(["-iA", "a", "b", "c", "m"]), None);
    steps.push(step("nix-env -i", &o, Keep::UnorderedStderr));
    steps.extend(generation("the profile"));
    let o = run(nix_env().arg("-q"), None);
    steps.push(step("nix-env -q", &o, Keep::All));
    let o = run(nix_env().args(["-iA", "e"]), None);
    steps.push(step("nix-env -i, conflict", &o, Keep::All));
    let o = run(nix_env().args(["-e", "b"]), None);
    steps.push(step("nix-env -e", &o, Keep::All));
    steps.extend(generation("after uninstalling"));

    // builtin:fetchurl through <nix/fetchurl.nix>: a plain file, an executable one, and a
    // NAR unpacked.
    let blob = t.file("fetch/blob.txt", "fetched\n");
    let tool = t.file("fetch/tool.sh", "#!/bin/sh\necho tool\n");
    std::fs::set_permissions(&tool, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    t.file("fetch/tree/f", "in the tree\n");
    let tree = blob.parent().unwrap().join("tree");
    let nar = nixb_tests::run(t.nix("nix-store").arg("--dump").arg(&tree), None).stdout;
    let nar_file = blob.parent().unwrap().join("tree.nar");
    std::fs::write(&nar_file, nar).unwrap();
    let hash = |flat: bool, p: &Path| {
        let mut c = t.nix("nix-hash");
        c.args(["--type", "sha256", "--base32"]);
        if flat {
            c.arg("--flat");
        }
        nixb_tests::run_str(c.arg(p), None)
    };
    let fetches = t.file(
        "fetches.nix",
        &format!(
            r#"{{
  plain = import <nix/fetchurl.nix> {{ url = "file://{}"; sha256 = "{}"; }};
  exec = import <nix/fetchurl.nix> {{ url = "file://{}"; sha256 = "{}"; executable = true; }};
  unpacked = import <nix/fetchurl.nix> {{ url = "file://{}"; sha256 = "{}"; unpack = true; }};
  wrong = import <nix/fetchurl.nix> {{ url = "file://{}"; sha256 = "{}"; }};
}}"#,
            blob.display(),
            hash(true, &blob),
            tool.display(),
            hash(false, &tool),
            nar_file.display(),
            hash(false, &tree),
            tool.display(),
            hash(true, &blob),
        ),
    );
    for attr in ["plain", "exec", "unpacked", "wrong"] {
        let o = run(
            client(t, "nix-build")
                .arg("--no-out-link")
                .arg(&fetches)
                .args(["-A", attr]),
            None,
        );
        let name = match attr {
            "plain" => "fetchurl",
            "exec" => "fetchurl, executable",
            "unpacked" => "fetchurl, unpack",
            _ => "fetchurl, wrong hash",
        };
        steps.push(step(name, &o, Keep::StderrLinesWith("error")));
        if o.status.success() {
            let dump = run(client(t, "nix-store").arg("--dump").arg(out_str(&o)), None);
            steps.push(step(name, &dump, Keep::BinaryOut));
        }
    }

    // nix-channel: the channel's tarball (xz) is unpacked by builtin:unpack-channel
    // (<nix/unpack-channel.nix>, built through the daemon) into the channels profile.
    let files = t.root.path().join("files");
    t.file("chan-src/mychan-1/default.nix", "{ }: { answer = 42; }\n");
    t.file("chan-src/mychan-1/lib/util.nix", "x: x\n");
    let tarball = files.join("mychan.tar.xz");
    nixb_tests::run_ok(
        // The same bytes for both daemons' runs: the same tarball path and derivation.
        Command::new("tar")
            .args([
                "--sort=name",
                "--mtime=@1",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
            ])
            .arg("-cJf")
            .arg(&tarball)
            .arg("-C")
            .arg(files.join("chan-src"))
            .arg("mychan-1"),
        None,
    );
    let home = files.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let channel = |args: &[&str]| {
        let mut c = client(t, "nix-channel");
        c.env("HOME", &home).env("USER", "root").args(args);
        c
    };
    let url = format!("file://{}", tarball.display());
    let o = run(&mut channel(&["--add", &url, "mychan"]), None);
    steps.push(step("nix-channel --add", &o, Keep::All));
    let o = run(&mut channel(&["--update"]), None);
    steps.push(step(
        "nix-channel --update",
        &o,
        Keep::StderrLinesWith("error"),
    ));
    let channels = t.state_dir().join("profiles/per-user/root/channels");
    if let Ok(target) = std::fs::canonicalize(&channels) {
        let dump = run(client(t, "nix-store").arg("--dump").arg(&target), None);
        steps.push(Step {
            name: "the channels profile",
            code: None,
            stdout: format!("{}\n{}", target.display(), profile_tree(&target)),
            stderr: String::new(),
        });
        steps.push(step("the channels profile", &dump, Keep::BinaryOut));
        // The unpacked channel itself: `<out>/mychan`, the tarball's one top directory
        // renamed.
        let unpacked = std::fs::canonicalize(target.join("mychan")).unwrap();
        let out = unpacked.parent().unwrap();
        let dump = run(client(t, "nix-store").arg("--dump").arg(out), None);
        steps.push(Step {
            name: "the channel",
            code: None,
            stdout: format!("{}\n{}", out.display(), profile_tree(out)),
            stderr: String::new(),
        });
        steps.push(step("the channel", &dump, Keep::BinaryOut));
    }
    steps
}

#[test]
fn nix_env_installs_the_same_profiles_through_nixb_daemon_as_through_nix_daemon() {
    nixb_testsupport::require!(Nix);
    let t = TestStore::with_conf("sandbox = false\nbuild-users-group =\nsubstituters =\n");
    let mut seen = Vec::new();
    for nixb in [false, true] {
        let mut d = if nixb { start_nixb(&t) } else { start_nix(&t) };
        seen.push(scenario_profiles(&t));
        d.stop();
        drop(d);
        wipe(&t);
        let _ = std::fs::remove_dir_all(t.root.path().join("files"));
    }
    let (expected, got) = (&seen[0], &seen[1]);
    // The oracle's own answers, checked for what they must say.
    let by_name = |name: &str| expected.iter().find(|s| s.name == name).unwrap();
    assert_eq!(by_name("nix-env -i").code, Some(0), "{expected:?}");
    let tree = &by_name("the profile").stdout;
    for line in [
        "bin/",
        "bin/d -> ",
        "share/man/man1/m.1 -> ",
        "manifest.nix -> ",
    ] {
        assert!(tree.contains(line), "{line} missing from {tree}");
    }
    assert!(tree.contains("-b/bin/tool"), "{tree}");
    assert!(
        !tree.contains("setup-hook") && !tree.contains(".hidden"),
        "{tree}"
    );
    assert_eq!(
        by_name("nix-env -i, conflict").code,
        Some(1),
        "{expected:?}"
    );
    assert!(by_name("after uninstalling").stdout.contains("-a/bin/tool"));
    assert_eq!(
        by_name("nix-channel --update").code,
        Some(0),
        "{expected:?}"
    );
    let channel = &by_name("the channel").stdout;
    for line in ["\nmychan/\n", "mychan/default.nix", "mychan/lib/util.nix"] {
        assert!(channel.contains(line), "{line} missing from {channel}");
    }
    for ok in ["fetchurl", "fetchurl, executable", "fetchurl, unpack"] {
        assert_eq!(by_name(ok).code, Some(0), "{expected:?}");
    }
    assert_eq!(
        by_name("fetchurl, wrong hash").code,
        Some(1),
        "{expected:?}"
    );
    assert_same_steps(got, expected);
}

/// `nix copy` straight from one daemon to another, nixb's to Nix's and back: two stores at
/// the same store path, the Nix daemon in a mount namespace of its own where its store
/// directory is mounted over that path. Nix's client reads the source store's files itself
/// (a `unix://` store is a local file system store to it), so it runs where the source
/// store is mounted: in the Nix daemon's namespace when copying from it. Each copy must
/// arrive valid with the source's NAR hashes and references, and pass the receiving
/// daemon's `--verify --check-contents`.
#[test]
fn nix_copy_between_a_nixb_daemon_and_a_nix_daemon_both_ways() {
    nixb_testsupport::require!(Nix, Root, Program("unshare"), Program("nsenter"));
    let t = TestStore::with_conf("sandbox = false\nbuild-users-group =\nsubstituters =\n");
    let nixb_socket = socket_of(&t);
    let mut nixb_daemon = start_nixb(&t);

    // The Nix daemon's own store, state and log directories; the store mounted at the
    // shared store path inside its namespace only.
    let other = t.root.path().join("other");
    for d in ["store", "state", "log"] {
        std::fs::create_dir_all(other.join(d)).unwrap();
    }
    let nix_socket = t.root.path().join("nix-daemon.sock");
    let script = format!(
        "mount --bind '{}' '{}' && NIX_STORE_DIR='{}' nix-store --init && exec nix-daemon",
        other.join("store").display(),
        t.store_dir().display(),
        t.store_dir().display()
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .envs(t.env())
        .env("NIX_STATE_DIR", other.join("state"))
        .env("NIX_LOG_DIR", other.join("log"))
        .env("NIX_DAEMON_SOCKET_PATH", &nix_socket);
    let mut nix_daemon = RunningDaemon::start(cmd, &nix_socket);

    let at = |socket: &Path, program: &str| {
        let mut c = t.nix(program);
        c.env("NIX_REMOTE", format!("unix://{}", socket.display()));
        c
    };
    let uri = |socket: &Path| format!("unix://{}", socket.display());
    let expr = |tag: &str| {
        format!(
            r#"let dep = derivation {{ name = "dep-{tag}"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo {tag} > $out" ]; }};
in derivation {{ name = "top-{tag}"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "read x < ${{dep}}; echo $x ${{dep}} > $out" ]; }}"#
        )
    };
    // What a daemon says about a path and its closure, for comparison across daemons.
    let describe = |socket: &Path, path: &str| -> String {
        let q = |args: &[&str], paths: &[&str]| {
            nixb_tests::run_str(at(socket, "nix-store").args(args).args(paths), None)
        };
        let closure = q(&["-q", "--requisites"], &[path]);
        let all: Vec<&str> = closure.lines().collect();
        [
            closure.clone(),
            q(&["-q", "--hash"], &all),
            q(&["-q", "--size"], &all),
            q(&["-q", "--references"], &[path]),
        ]
        .join("\n")
    };

    let nix_ns = nix_daemon.pid().to_string();
    for (from, to, tag) in [
        (&nixb_socket, &nix_socket, "a"),
        (&nix_socket, &nixb_socket, "b"),
    ] {
        let file = t.file(&format!("{tag}.nix"), &expr(tag));
        let built =
            nixb_tests::run_str(at(from, "nix-build").arg("--no-out-link").arg(&file), None);
        let mut copy = if from == &nix_socket {
            let mut c = t.nix("nsenter");
            c.args(["--mount", "--target", &nix_ns, "nix"])
                .args(["--extra-experimental-features", "nix-command"]);
            c
        } else {
            t.nix("nix")
        };
        let o = run(
            copy.args([
                "copy",
                "--no-check-sigs",
                "--from",
                &uri(from),
                "--to",
                &uri(to),
            ])
            .arg(&built),
            None,
        );
        assert!(o.status.success(), "nix copy {tag}: {}", err_str(&o));
        assert_eq!(describe(to, &built), describe(from, &built), "copy {tag}");
        let o = run(
            at(to, "nix-store").args(["--verify", "--check-contents"]),
            None,
        );
        assert!(
            o.status.success() && !err_str(&o).contains("error"),
            "verify after copy {tag}: {}",
            err_str(&o)
        );
        let contents = std::fs::read_to_string(&built);
        assert!(
            contents.is_ok_and(|c| c.starts_with(tag)),
            "copy {tag} is not the built output"
        );
    }
    nix_daemon.stop();
    assert!(nixb_daemon.stop().success());
    wipe(&t);
    let _ = Command::new("chmod")
        .arg("-R")
        .arg("u+w")
        .arg(&other)
        .status();
}
