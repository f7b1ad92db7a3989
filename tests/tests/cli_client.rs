//! nixb as a client: `nixb realise --log-format internal-json` against real Nix 2.8's
//! structured log, and `--store unix://SOCKET` / `NIX_REMOTE` making `realise`, `query`,
//! `add` and `log` talk to a daemon, nixb's and real `nix-daemon` 2.8, on private stores,
//! with real Nix 2.8's client through the same daemon as the oracle.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nixb_tests::{run, run_ok, run_str, RunningDaemon, TestStore};
use serde_json::Value;

fn conf() -> &'static str {
    // No substituters: the oracle would otherwise spend its time on cache.nixos.org.
    "sandbox = false\nbuild-users-group =\nsubstituters =\n"
}

fn start_nixb_daemon(t: &TestStore, socket: &Path) -> RunningDaemon {
    let mut cmd = t.nixb();
    cmd.env_remove("NIX_REMOTE")
        .arg("daemon")
        .arg("--socket")
        .arg(socket);
    RunningDaemon::start(cmd, socket)
}

fn start_nix_daemon(t: &TestStore, socket: &Path) -> RunningDaemon {
    // With no writable state directory yet, nix-daemon would take itself for a client.
    run_ok(t.nix("nix-store").arg("--init"), None);
    let mut cmd = t.nix("nix-daemon");
    cmd.env("NIX_DAEMON_SOCKET_PATH", socket);
    RunningDaemon::start(cmd, socket)
}

/// `nixb` working on the store directly (whatever the test runner's environment says).
fn nixb_local(t: &TestStore) -> Command {
    let mut c = t.nixb();
    c.env_remove("NIX_REMOTE");
    c
}

/// `nixb --store unix://SOCKET`.
fn nixb_client(t: &TestStore, socket: &Path) -> Command {
    let mut c = nixb_local(t);
    c.arg("--store").arg(format!("unix://{}", socket.display()));
    c
}

/// Real Nix's client through the daemon on `socket`.
fn nix_client(t: &TestStore, program: &str, socket: &Path) -> Command {
    let mut c = t.nix(program);
    c.env("NIX_REMOTE", format!("unix://{}", socket.display()));
    c
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const TWO_OUTPUTS: &str = r#"
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
  args = [ "-c" "read x < ${dep}; echo $x ${dep} > $out" ];
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

fn instantiate(t: &TestStore, name: &str, expr: &str) -> String {
    let file = t.file(name, expr);
    run_str(t.nix("nix-instantiate").arg(file), None)
}

/// Deletes `paths` from the store with real Nix (no daemon running, no root holds them).
fn delete(t: &TestStore, paths: &str) {
    let mut cmd = t.nix("nix-store");
    cmd.arg("--delete");
    for p in paths.lines() {
        cmd.arg(p);
    }
    run_ok(&mut cmd, None);
}

/// The `@nix` lines of a run's stderr, parsed.
fn structured(o: &Output) -> Vec<Value> {
    stderr(o)
        .lines()
        .filter_map(|l| l.strip_prefix("@nix "))
        .map(|j| serde_json::from_str(j).unwrap_or_else(|e| panic!("{j}: {e}")))
        .collect()
}

/// The build activity's lines (its start, results and stop), its id replaced by 0.
fn build_activity(lines: &[Value]) -> Vec<Value> {
    let id = lines
        .iter()
        .find(|l| l["action"] == "start" && l["type"] == 105)
        .unwrap_or_else(|| panic!("no build activity in {lines:#?}"))["id"]
        .clone();
    lines
        .iter()
        .filter(|l| l["id"] == id)
        .map(|l| {
            let mut l = l.clone();
            l["id"] = 0.into();
            l
        })
        .collect()
}

/// The ids of the activities of `kind` started, each checked to be stopped too.
fn started_and_stopped(lines: &[Value], kind: u64) -> usize {
    let ids: Vec<&Value> = lines
        .iter()
        .filter(|l| l["action"] == "start" && l["type"] == kind)
        .map(|l| &l["id"])
        .collect();
    for id in &ids {
        assert!(
            lines
                .iter()
                .any(|l| l["action"] == "stop" && &l["id"] == *id),
            "activity {id} of type {kind} never stopped: {lines:#?}"
        );
    }
    ids.len()
}

/// The last progress (done, expected, running, failed) of the `Builds` activity.
fn last_builds_progress(lines: &[Value]) -> Value {
    let id = lines
        .iter()
        .find(|l| l["action"] == "start" && l["type"] == 104)
        .unwrap_or_else(|| panic!("no Builds activity in {lines:#?}"))["id"]
        .clone();
    lines
        .iter()
        .rev()
        .find(|l| l["action"] == "result" && l["id"] == id && l["type"] == 105)
        .unwrap_or_else(|| panic!("no progress of the Builds activity in {lines:#?}"))["fields"]
        .clone()
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut in_escape = false;
    for c in s.chars() {
        match (in_escape, c) {
            (false, '\u{1b}') => in_escape = true,
            (false, c) => out.push(c),
            (true, c) if c.is_ascii_alphabetic() => in_escape = false,
            (true, _) => {}
        }
    }
    out
}

/// The error line of a failed build in the structured log.
fn error_line(lines: &[Value]) -> Value {
    lines
        .iter()
        .find(|l| l["action"] == "msg" && l["level"] == 0 && l.get("raw_msg").is_some())
        .unwrap_or_else(|| panic!("no error line in {lines:#?}"))
        .clone()
}

/// `nixb realise --log-format internal-json` prints the build's activity line for line as
/// `nix-store -r --log-format internal-json` does, inside the same enclosing activities.
///
/// What Nix 2.8 prints that nixb does not: the `querying info about missing paths`
/// activity (type 0, level 6) around each query of missing paths, the `this derivation
/// will be built:` messages, and the enclosing activities' progress repeated on every
/// change of any of them (nixb repeats only the `Builds` progress, when it changes).
#[test]
fn internal_json_is_nix_structured_log() {
    nixb_testsupport::require!(Nix);
    let t = TestStore::with_conf(conf());
    let drv = instantiate(&t, "good.nix", TWO_OUTPUTS);

    let nix = run(
        t.nix("nix-store")
            .args(["-r", "--log-format", "internal-json"])
            .arg(&drv),
        None,
    );
    assert!(nix.status.success(), "{}", stderr(&nix));
    delete(&t, &stdout(&nix));
    let nixb = run(
        nixb_local(&t)
            .args(["realise", "--log-format", "internal-json"])
            .arg(&drv),
        None,
    );
    assert!(nixb.status.success(), "{}", stderr(&nixb));
    // The same outputs (Nix prints them in path order, nixb in output-name order).
    let sorted = |o: &Output| {
        let mut v: Vec<String> = stdout(o).lines().map(str::to_string).collect();
        v.sort();
        v
    };
    assert_eq!(sorted(&nixb), sorted(&nix));

    let (expected, got) = (structured(&nix), structured(&nixb));
    // The oracle's build: started with the derivation, two lines, stopped.
    let build = build_activity(&expected);
    assert_eq!(build.len(), 4, "{build:#?}");
    assert_eq!(build[0]["fields"][0], Value::String(drv.clone()));
    assert_eq!(build_activity(&got), build);
    // The enclosing Realise (102), Builds (104) and CopyPaths (103) activities.
    for kind in [102, 103, 104] {
        assert_eq!(started_and_stopped(&expected, kind), 1, "type {kind}");
        assert_eq!(started_and_stopped(&got, kind), 1, "type {kind}");
    }
    let progress = last_builds_progress(&expected);
    assert_eq!(progress, serde_json::json!([1, 1, 0, 0]));
    assert_eq!(last_builds_progress(&got), progress);
    // Every line nixb prints is one Nix's JSON logger could print: the same keys.
    for l in &got {
        let mut keys: Vec<&String> = l.as_object().unwrap().keys().collect();
        keys.sort();
        assert!(
            expected.iter().any(|e| {
                let mut k: Vec<&String> = e.as_object().unwrap().keys().collect();
                k.sort();
                k == keys && e["action"] == l["action"]
            }),
            "nixb printed a line of a shape Nix did not: {l}"
        );
    }

    // A failed build: the same activity, then the error, with the same exit status.
    let failing = instantiate(&t, "failing.nix", FAILING);
    let nix = run(
        t.nix("nix-store")
            .args(["-r", "--log-format", "internal-json"])
            .arg(&failing),
        None,
    );
    let nixb = run(
        nixb_local(&t)
            .args(["realise", "--log-format", "internal-json"])
            .arg(&failing),
        None,
    );
    assert_eq!(nix.status.code(), Some(100), "{}", stderr(&nix));
    assert_eq!(nixb.status.code(), nix.status.code(), "{}", stderr(&nixb));
    let (expected, got) = (structured(&nix), structured(&nixb));
    assert_eq!(build_activity(&got), build_activity(&expected));
    let (e, g) = (error_line(&expected), error_line(&got));
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&g), keys(&e));
    for field in ["msg", "raw_msg"] {
        assert_eq!(
            strip_ansi(g[field].as_str().unwrap()),
            strip_ansi(e[field].as_str().unwrap()),
            "{field}"
        );
    }
}

/// `--log-format` takes Nix's values and names them when given another.
#[test]
fn log_format_rejects_unknown_values_naming_the_accepted_ones() {
    let t = TestStore::new();
    let out = run(
        nixb_local(&t).args(["realise", "--log-format", "fancy", "/nowhere.drv"]),
        None,
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("'fancy'"), "{err}");
    for v in [
        "raw",
        "raw-with-logs",
        "internal-json",
        "bar",
        "bar-with-logs",
    ] {
        assert!(err.contains(v), "{v} missing from: {err}");
    }
}

/// Builds, queries, adds and reads logs through the daemon on `socket`, comparing each
/// answer of `nixb --store` with real Nix 2.8's client through the same daemon, and the
/// outputs with `expected_outputs` (a local `nixb realise`'s).
fn through_daemon(
    t: &TestStore,
    socket: &Path,
    tag: &str,
    drv: &str,
    expected_outputs: &str,
    dependent: &str,
    failing: &str,
) {
    let realise = run(nixb_client(t, socket).arg("realise").arg(drv), None);
    let realise_err = stderr(&realise);
    assert_eq!(realise.status.code(), Some(0), "{realise_err}");
    assert_eq!(stdout(&realise), expected_outputs);
    assert!(
        realise_err.contains("building the first line") && realise_err.contains("a second line"),
        "the builder's log is shown: {realise_err}"
    );

    // NIX_REMOTE=unix://… and NIX_REMOTE=daemon with NIX_DAEMON_SOCKET_PATH choose the
    // daemon as --store does: a dependency graph built through it.
    let dep_out = run_str(
        nixb_local(t)
            .env("NIX_REMOTE", format!("unix://{}", socket.display()))
            .arg("realise")
            .arg(dependent),
        None,
    );
    let again = run_str(
        nixb_local(t)
            .env("NIX_REMOTE", "daemon")
            .env("NIX_DAEMON_SOCKET_PATH", socket)
            .arg("realise")
            .arg(dependent),
        None,
    );
    assert_eq!(again, dep_out);

    let out = expected_outputs.lines().last().unwrap().to_string();
    // Each query form against nix-store -q through the same daemon.
    for (flag, path) in [
        ("--outputs", drv),
        ("--references", dep_out.as_str()),
        ("--referrers", out.as_str()),
        ("--requisites", dep_out.as_str()),
        ("--hash", out.as_str()),
        ("--size", out.as_str()),
        ("--deriver", out.as_str()),
    ] {
        let ours = run(nixb_client(t, socket).args(["query", flag]).arg(path), None);
        let theirs = run(
            nix_client(t, "nix-store", socket)
                .args(["-q", flag])
                .arg(path),
            None,
        );
        assert!(ours.status.success(), "query {flag}: {}", stderr(&ours));
        assert!(theirs.status.success(), "-q {flag}: {}", stderr(&theirs));
        let sorted = |s: String| {
            let mut v: Vec<String> = s.lines().map(str::to_string).collect();
            v.sort();
            v
        };
        assert_eq!(
            sorted(stdout(&ours)),
            sorted(stdout(&theirs)),
            "query {flag} {path}"
        );
    }
    let requisites = run_str(
        nixb_client(t, socket)
            .args(["query", "--requisites"])
            .arg(&dep_out),
        None,
    );
    assert_eq!(requisites.lines().count(), 2, "{requisites}");
    let valid = run(
        nixb_client(t, socket)
            .args(["query", "--valid"])
            .arg(&out)
            .arg(format!(
                "{}/00000000000000000000000000000000-gone",
                store_dir(t)
            )),
        None,
    );
    assert_eq!(valid.status.code(), Some(1));
    assert_eq!(stdout(&valid), out);
    assert!(stderr(&valid).contains("not valid: "), "{}", stderr(&valid));
    let invalid = run(
        nixb_client(t, socket)
            .args(["query", "--hash"])
            .arg(format!(
                "{}/00000000000000000000000000000000-gone",
                store_dir(t)
            )),
        None,
    );
    assert_eq!(invalid.status.code(), Some(1));
    assert!(
        stderr(&invalid).contains("is not valid"),
        "{}",
        stderr(&invalid)
    );

    // Adding a file and a directory: the path Nix's client gets from the same daemon.
    let file = t.file("to-add/hello.txt", "hello through a daemon\n");
    t.file("to-add/dir/inner", "inner\n");
    let dir = file.parent().unwrap().join("dir");
    for p in [&file, &dir] {
        let ours = run_str(nixb_client(t, socket).arg("add").arg(p), None);
        let theirs = run_str(nix_client(t, "nix-store", socket).arg("--add").arg(p), None);
        assert_eq!(ours, theirs, "add {}", p.display());
    }

    // The build log, read from the log directory as nix-store -l does.
    let ours = run(nixb_client(t, socket).arg("log").arg(&out), None);
    let theirs = run(nix_client(t, "nix-store", socket).arg("-l").arg(&out), None);
    assert!(ours.status.success(), "{}", stderr(&ours));
    assert_eq!(ours.stdout, theirs.stdout);
    assert!(stdout(&ours).contains("building the first line"));

    // The roots that keep a path alive, one of them made here.
    let gcroots = t.state_dir().join("gcroots");
    std::fs::create_dir_all(&gcroots).unwrap();
    let root = gcroots.join(format!("client-test-{tag}"));
    std::os::unix::fs::symlink(&out, &root).unwrap();
    let ours = run(
        nixb_client(t, socket).args(["query", "--roots"]).arg(&out),
        None,
    );
    let theirs = run(
        nix_client(t, "nix-store", socket)
            .args(["-q", "--roots"])
            .arg(&out),
        None,
    );
    assert!(ours.status.success(), "{}", stderr(&ours));
    assert!(theirs.status.success(), "{}", stderr(&theirs));
    let sorted = |o: &Output| {
        let mut v: Vec<String> = stdout(o).lines().map(str::to_string).collect();
        v.sort();
        v
    };
    assert_eq!(sorted(&ours), sorted(&theirs));
    assert!(
        stdout(&ours).contains(&format!("{} -> {out}", root.display())),
        "{}",
        stdout(&ours)
    );
    std::fs::remove_file(&root).unwrap();

    // A failed build: Nix's exit status for it, and the builder's error.
    let fail = run(nixb_client(t, socket).arg("realise").arg(failing), None);
    assert_eq!(fail.status.code(), Some(100), "{}", stderr(&fail));
    let err = stderr(&fail);
    assert!(
        err.contains(&format!(
            "error: builder for '{failing}' failed with exit code 3"
        )),
        "{err}"
    );
    assert!(!err.contains('\u{1b}'), "colours on a pipe: {err:?}");

    // --log-format internal-json passes the daemon's activities on as Nix's client does:
    // two derivations alike but for their names, one built by each client.
    let fresh = |name: &str| {
        let expr = format!(
            r#"derivation {{ name = "{name}"; system = builtins.currentSystem; builder = "/bin/sh";
                 args = [ "-c" "echo one; echo two >&2; echo x > $out" ]; }}"#
        );
        instantiate(t, &format!("{name}.nix"), &expr)
    };
    let (theirs_drv, ours_drv) = (
        fresh(&format!("fresh-{tag}-a")),
        fresh(&format!("fresh-{tag}-b")),
    );
    let theirs = run(
        nix_client(t, "nix-store", socket)
            .args(["-r", "--log-format", "internal-json"])
            .arg(&theirs_drv),
        None,
    );
    let ours = run(
        nixb_client(t, socket)
            .args(["realise", "--log-format", "internal-json"])
            .arg(&ours_drv),
        None,
    );
    assert!(theirs.status.success(), "{}", stderr(&theirs));
    assert!(ours.status.success(), "{}", stderr(&ours));
    let unname = |lines: Vec<Value>, drv: &str| -> Vec<Value> {
        lines
            .iter()
            .map(|l| serde_json::from_str(&l.to_string().replace(drv, "DRV")).unwrap())
            .collect()
    };
    let expected = unname(build_activity(&structured(&theirs)), &theirs_drv);
    assert_eq!(expected.len(), 4, "{expected:#?}");
    assert_eq!(
        unname(build_activity(&structured(&ours)), &ours_drv),
        expected
    );

    // --json: the daemon's build shown as the engine's own events are.
    let json_drv = fresh(&format!("fresh-{tag}-c"));
    let out = run(
        nixb_client(t, socket)
            .args(["realise", "--json"])
            .arg(&json_drv),
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let events: Vec<Value> = stderr(&out)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let want = [
        serde_json::json!({"event": "build-started", "drv": json_drv}),
        serde_json::json!({"event": "log", "drv": json_drv, "line": "one"}),
        serde_json::json!({"event": "log", "drv": json_drv, "line": "two"}),
        serde_json::json!({"event": "build-succeeded", "drv": json_drv}),
    ];
    for e in want {
        assert!(events.contains(&e), "{e} missing from {events:#?}");
    }
}

fn store_dir(t: &TestStore) -> String {
    t.store_dir().display().to_string()
}

#[test]
fn realise_query_add_log_through_nixb_and_nix_daemons() {
    nixb_testsupport::require!(Nix);
    let t = TestStore::with_conf(conf());
    let drv = instantiate(&t, "good.nix", TWO_OUTPUTS);
    let dependent = instantiate(&t, "dependent.nix", DEPENDENT);
    let failing = instantiate(&t, "failing.nix", FAILING);

    // The local answer, then its outputs removed so that each daemon builds them again.
    let local = run(nixb_local(&t).arg("realise").arg(&drv), None);
    assert!(local.status.success(), "{}", stderr(&local));
    let expected = stdout(&local);
    assert_eq!(expected.lines().count(), 2, "{expected}");
    let local_fail = run(nixb_local(&t).arg("realise").arg(&failing), None);
    assert_eq!(local_fail.status.code(), Some(100));
    delete(&t, &expected);

    let socket: PathBuf = t.root.path().join("nix-daemon.sock");
    let daemon = start_nix_daemon(&t, &socket);
    through_daemon(&t, &socket, "nix", &drv, &expected, &dependent, &failing);
    drop(daemon);

    // nix-daemon's temporary roots die with it; nixb's daemon starts on a store whose
    // outputs are gone again.
    let dep_out = run_str(
        t.nix("nix-store").args(["-q", "--outputs"]).arg(&dependent),
        None,
    );
    delete(&t, &format!("{expected}\n{dep_out}"));
    let socket: PathBuf = t.root.path().join("nixb-daemon.sock");
    let daemon = start_nixb_daemon(&t, &socket);
    through_daemon(&t, &socket, "nixb", &drv, &expected, &dependent, &failing);
    drop(daemon);
}

/// Store choices nixb cannot honour are errors naming them; commands that work on the
/// store directly refuse a daemon instead of going around it.
#[test]
fn unusable_store_choices_are_named() {
    let t = TestStore::new();
    let out = run(
        nixb_local(&t).args(["--store", "ssh://builder", "query", "--hash", "/x"]),
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("--store 'ssh://builder'"),
        "{}",
        stderr(&out)
    );

    let out = run(
        nixb_local(&t)
            .env("NIX_REMOTE", "auto?root=/x")
            .args(["add", "/etc/hostname"]),
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("NIX_REMOTE='auto?root=/x'"),
        "{}",
        stderr(&out)
    );

    let missing = t.root.path().join("no-daemon.sock");
    let out = run(
        nixb_local(&t)
            .env("NIX_REMOTE", "daemon")
            .env("NIX_DAEMON_SOCKET_PATH", &missing)
            .args(["query", "--hash", "/x"]),
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("daemon at {}", missing.display())),
        "{}",
        stderr(&out)
    );

    let out = run(
        nixb_local(&t).env("NIX_REMOTE", "daemon").args(["gc"]),
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("'nixb gc' works on the store directly")
            && err.contains("NIX_REMOTE='daemon'"),
        "{err}"
    );
    // The daemon itself serves the store here whatever NIX_REMOTE says; an explicit
    // --store naming a daemon is refused.
    let out = run(
        nixb_local(&t).args(["--store", "daemon", "daemon", "--socket", "/nonexistent/s"]),
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("'nixb daemon' works on the store directly"),
        "{}",
        stderr(&out)
    );
}
