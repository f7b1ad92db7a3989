//! Remote builds through the engine over real SSH: `nixb realise` with `builders` naming
//! a machines file of `ssh://root@10.x.x.x` hosts, its build hook `nixb build-remote`,
//! and test hosts that are network namespaces made here, each with Debian's sshd on the
//! namespace's address (see `crates/serve/tests/common/netns.rs`). One host runs real
//! Nix 2.8 `nix-store --serve --write`, another `nixb serve --write`, each on its own
//! physical store mounted over the shared logical store directory, so bytes really move.
//!
//! Checked: a graph split between the two hosts gives the outputs a local build gives
//! (real `nix-store --realise --check` rebuilds them here and compares, real
//! `nix-store --verify --check-contents` accepts the store); a remote failure is a build
//! failure (100, `@ build-failed`, the remote log shown); an unreachable host is named
//! and passed over for another host or a local build; a remote timeout is honoured and
//! reported as a timeout (101); `builders-use-substitutes` makes the host fetch inputs
//! from its own cache instead of receiving them; a failing hook traces `@ hook-failed`
//! alone. Needs root, `ip`, `sshd` and real Nix; under `CI=true` none of it may be
//! missing.

#[path = "../../crates/serve/tests/common/netns.rs"]
mod netns;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use netns::SshHost;
use nixb_tests::{nixb_binary, run, run_ok, run_str, TestStore};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn can_run() -> bool {
    // Both checks run, so that CI=true reports whichever is missing.
    let nix = nixb_testsupport::required(&[nixb_testsupport::Need::Nix]);
    netns::can_run() && nix
}

fn write_exe(path: &Path, body: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, body).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Server {
    /// Real Nix 2.8 `nix-store --serve --write`.
    Nix,
    /// `nixb serve --write`.
    Nixb,
}

/// A test host: its namespace and sshd, and the store its forced command serves.
struct Remote {
    host: SshHost,
    dir: PathBuf,
    store_dir: PathBuf,
}

impl Remote {
    /// A host in its own namespace serving a private physical store at the logical
    /// store directory of `t`, with `conf` as its nix.conf (read by both servers).
    fn start(t: &TestStore, name: &str, server: Server, conf: &str) -> Remote {
        let dir = t.root.path().join("hosts").join(name);
        let store = t.store_dir();
        std::fs::create_dir_all(&store).unwrap();
        for d in ["phys", "etc", "home"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::write(dir.join("etc/nix.conf"), conf).unwrap();
        let program = match server {
            Server::Nix => "nix-store --serve --write".to_string(),
            Server::Nixb => format!("{} serve --write", nixb_binary().display()),
        };
        let forced = dir.join("forced-command");
        write_exe(
            &forced,
            &format!(
                r#"#!/bin/sh
echo "$SSH_ORIGINAL_COMMAND" >> {d}/commands.log
export NIX_STORE_DIR={store} NIX_STATE_DIR={d}/state NIX_LOG_DIR={d}/log NIX_CONF_DIR={d}/etc HOME={d}/home
exec unshare --mount --propagation private sh -c 'mount --bind "$1" "$2" && shift 2 && exec "$@"' sh {d}/phys {store} {program}
"#,
                d = dir.display(),
                store = store.display(),
            ),
        );
        let host = SshHost::start(&dir.join("ssh"), &forced);
        Remote {
            host,
            dir,
            store_dir: store,
        }
    }

    /// What clients asked the host to run, one line per login.
    fn commands(&self) -> String {
        std::fs::read_to_string(self.dir.join("commands.log")).unwrap_or_default()
    }

    /// The host's copy of a store path (its physical store).
    fn phys(&self, path: &str) -> PathBuf {
        let rel = Path::new(path).strip_prefix(&self.store_dir).unwrap();
        self.dir.join("phys").join(rel)
    }

    /// Real Nix on the host's database (queries only: the files are under `phys`).
    fn nix(&self, program: &str) -> std::process::Command {
        let mut c = std::process::Command::new(program);
        c.env("NIX_STORE_DIR", &self.store_dir)
            .env("NIX_STATE_DIR", self.dir.join("state"))
            .env("NIX_LOG_DIR", self.dir.join("log"))
            .env("NIX_CONF_DIR", self.dir.join("etc"))
            .env("HOME", self.dir.join("home"));
        if program == "nix" {
            c.args(["--extra-experimental-features", "nix-command"]);
        }
        c
    }
}

const HOST_CONF: &str =
    "sandbox = false\nbuild-users-group =\nsubstituters =\nsystem-features = onnix onnixb\n";

/// `nixb realise --print-build-trace` with `builders = @<machines file>`, and ssh told to
/// read no user configuration; killed after 300 s.
fn realise(t: &TestStore, machines: &[String]) -> std::process::Command {
    let file = t.file("machines", &(machines.join("\n") + "\n"));
    // Under coreutils' timeout: a remote build that is never stopped must fail the test
    // (exit 124), not hang it.
    let mut c = std::process::Command::new("timeout");
    c.envs(t.env()).arg("300").arg(nixb_binary());
    c.env(
        "NIX_SSHOPTS",
        "-F /dev/null -oConnectTimeout=10 -oIdentitiesOnly=yes",
    )
    .args(["realise", "--print-build-trace", "--option", "builders"])
    .arg(format!("@{}", file.display()));
    c
}

/// The `.drv` of the derivation called `name` among `drvs`.
fn drv_named<'a>(drvs: &'a str, name: &str) -> &'a str {
    drvs.lines()
        .find(|l| l.ends_with(&format!("-{name}.drv")))
        .unwrap_or_else(|| panic!("no {name}.drv in {drvs}"))
}

const GRAPH: &str = r#"
let
  mk = name: feature: deps: builtins.derivation {
    inherit name deps; system = builtins.currentSystem; builder = "/bin/sh";
    requiredSystemFeatures = [ feature ];
    args = [ "-c" "echo ${name} > $out; for d in $deps; do echo $d >> $out; while read -r l; do echo \"$l\" >> $out; done < $d; done; echo log-of-${name} >&2" ];
  };
  a = mk "a" "onnix" [];
  b = mk "b" "onnixb" [ a ];
in mk "top" "onnix" [ a b ]
"#;

#[test]
fn a_graph_builds_on_a_real_nix_host_and_a_nixb_host_like_a_local_build() {
    if !can_run() {
        return;
    }
    let t = TestStore::with_conf(HOST_CONF);
    let nixhost = Remote::start(&t, "nixhost", Server::Nix, HOST_CONF);
    let nixbhost = Remote::start(&t, "nixbhost", Server::Nixb, HOST_CONF);
    let expr = t.file("graph.nix", GRAPH);
    let top = run_str(t.nix("nix-instantiate").arg(&expr), None);
    let drvs = run_str(t.nix("nix-store").args(["-qR"]).arg(&top), None);
    let (a, b) = (drv_named(&drvs, "a"), drv_named(&drvs, "b"));
    // No local build slots: everything must go over ssh.
    let res = run(
        realise(
            &t,
            &[
                nixhost.host.machines_line("x86_64-linux", 1, 1, "onnix"),
                nixbhost.host.machines_line("x86_64-linux", 1, 1, "onnixb"),
            ],
        )
        .args(["--max-jobs", "0"])
        .arg(&top),
        None,
    );
    let err = text(&res.stderr);
    assert!(
        res.status.success(),
        "{err}\nsshd nixhost: {}\nsshd nixbhost: {}",
        nixhost.host.sshd_log(),
        nixbhost.host.sshd_log()
    );
    let (on_nix, on_nixb) = (nixhost.host.uri(), nixbhost.host.uri());
    for (drv, uri) in [(a, &on_nix), (b, &on_nixb), (top.as_str(), &on_nix)] {
        assert!(
            err.contains(&format!("building '{drv}' on '{uri}'")),
            "{drv} not built on {uri}: {err}"
        );
        assert!(err.contains(&format!("@ build-succeeded {drv} -")), "{err}");
    }
    // The remote builders' logs came back.
    for n in ["a", "b", "top"] {
        assert!(err.contains(&format!("log-of-{n}")), "{err}");
    }
    assert!(nixhost.commands().contains("nix-store --serve --write"));
    assert!(nixbhost.commands().contains("nix-store --serve --write"));

    let out = text(&res.stdout).trim().to_string();
    let outputs: Vec<String> = run_str(t.nix("nix-store").args(["-qR"]).arg(&out), None)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(outputs.len(), 3, "{outputs:?}");
    // Each output was built where its feature is: b's output exists on the nixb host
    // (with the bytes we have), a's and top's on the Nix host.
    for o in &outputs {
        let here = std::fs::read(o).unwrap();
        let host = if o.ends_with("-b") {
            &nixbhost
        } else {
            &nixhost
        };
        assert_eq!(std::fs::read(host.phys(o)).unwrap(), here, "{o}");
    }
    // b was built by nixb serve and copied to us; the Nix host registered the same NAR
    // hash for a as we did after importing it.
    let a_out = outputs.iter().find(|o| o.ends_with("-a")).unwrap();
    assert_eq!(
        run_str(nixhost.nix("nix-store").args(["-q", "--hash", a_out]), None),
        run_str(t.nix("nix-store").args(["-q", "--hash", a_out]), None)
    );
    // Real Nix rebuilds all three here and finds the outputs identical to what the
    // hosts built, and the store's contents match their registered hashes.
    run_ok(
        t.nix("nix-store")
            .args(["--realise", "--check", "--max-jobs", "1"])
            .args(["--option", "builders", ""])
            .arg(a)
            .arg(b)
            .arg(&top),
        None,
    );
    run_ok(
        t.nix("nix-store").args(["--verify", "--check-contents"]),
        None,
    );
}

/// Two derivations, one for each host, whose builders run `script` (with `$n` the name).
fn pair(t: &TestStore, file: &str, script: &str) -> (String, String) {
    let expr = t.file(
        file,
        &format!(
            r#"let mk = n: f: builtins.derivation {{ name = n; system = builtins.currentSystem; builder = "/bin/sh"; requiredSystemFeatures = [ f ]; args = [ "-c" "n=${{n}}; {script}" ]; }};
in [ (mk "for-nix" "onnix") (mk "for-nixb" "onnixb") ]"#
        ),
    );
    let drvs = run_str(t.nix("nix-instantiate").arg(&expr), None);
    let mut l = drvs.lines().map(str::to_string);
    (l.next().unwrap(), l.next().unwrap())
}

#[test]
fn a_remote_failure_is_a_build_failure_on_either_host() {
    if !can_run() {
        return;
    }
    let t = TestStore::with_conf(HOST_CONF);
    let nixhost = Remote::start(&t, "nixhost", Server::Nix, HOST_CONF);
    let nixbhost = Remote::start(&t, "nixbhost", Server::Nixb, HOST_CONF);
    let (d1, d2) = pair(&t, "bad.nix", "echo going down on $n; exit 3");
    let res = run(
        realise(
            &t,
            &[
                nixhost.host.machines_line("x86_64-linux", 1, 1, "onnix"),
                nixbhost.host.machines_line("x86_64-linux", 1, 1, "onnixb"),
            ],
        )
        .args(["--max-jobs", "0", "--keep-going"])
        .arg(&d1)
        .arg(&d2),
        None,
    );
    let err = text(&res.stderr);
    assert_eq!(res.status.code(), Some(100), "{err}");
    for d in [&d1, &d2] {
        assert!(err.contains(&format!("@ build-failed {d} - 1 ")), "{err}");
    }
    // A remote build failure is not a hook failure.
    assert!(!err.contains("@ hook-failed"), "{err}");
    assert!(err.contains("going down on for-nix\n"), "{err}");
    assert!(err.contains("going down on for-nixb\n"), "{err}");
    assert!(!nixhost.commands().is_empty() && !nixbhost.commands().is_empty());
}

#[test]
fn an_unreachable_host_is_named_and_another_host_or_the_local_machine_builds() {
    if !can_run() {
        return;
    }
    let t = TestStore::with_conf(HOST_CONF);
    let nixhost = Remote::start(&t, "nixhost", Server::Nix, HOST_CONF);
    // Nothing listens on port 2299 in the host's namespace: the connection is refused.
    // Its higher speed makes it the first choice.
    let dead = format!("ssh://root@{}:2299", nixhost.host.ip);
    let dead_line = format!(
        "{dead} x86_64-linux {} 1 10 onnix",
        nixhost.host.client_key.display()
    );
    let (for_nix, _) = pair(&t, "one.nix", "echo built by $n > $out");

    // Elsewhere: the dead host is passed over for the live one.
    let res = run(
        realise(
            &t,
            &[
                dead_line.clone(),
                nixhost.host.machines_line("x86_64-linux", 1, 1, "onnix"),
            ],
        )
        .args(["--max-jobs", "0"])
        .arg(&for_nix),
        None,
    );
    let err = text(&res.stderr);
    assert!(res.status.success(), "{err}");
    assert!(err.contains(&format!("cannot build on '{dead}'")), "{err}");
    assert!(err.contains("Connection refused"), "{err}");
    assert!(
        err.contains(&format!("building '{for_nix}' on '{}'", nixhost.host.uri())),
        "{err}"
    );
    let out = text(&res.stdout).trim().to_string();
    assert!(nixhost.phys(&out).exists());

    // Locally: the only host is dead and a local slot is free.
    let (local_drv, _) = pair(&t, "two.nix", "echo local build of $n > $out");
    let before = nixhost.commands().lines().count();
    let res = run(
        realise(&t, &[dead_line])
            .args(["--max-jobs", "1"])
            .arg(&local_drv),
        None,
    );
    let err = text(&res.stderr);
    assert!(res.status.success(), "{err}");
    assert!(err.contains(&format!("cannot build on '{dead}'")), "{err}");
    let out = text(&res.stdout).trim().to_string();
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "local build of for-nix\n"
    );
    assert!(!nixhost.phys(&out).exists());
    assert_eq!(nixhost.commands().lines().count(), before);
}

#[test]
fn a_remote_timeout_is_honoured_and_reported_as_a_timeout() {
    if !can_run() {
        return;
    }
    let t = TestStore::with_conf(HOST_CONF);
    let nixhost = Remote::start(&t, "nixhost", Server::Nix, HOST_CONF);
    let nixbhost = Remote::start(&t, "nixbhost", Server::Nixb, HOST_CONF);
    let (d1, d2) = pair(&t, "slow.nix", "echo started $n; while true; do :; done");
    let start = Instant::now();
    let res = run(
        realise(
            &t,
            &[
                nixhost.host.machines_line("x86_64-linux", 1, 1, "onnix"),
                nixbhost.host.machines_line("x86_64-linux", 1, 1, "onnixb"),
            ],
        )
        .args(["--max-jobs", "0", "--keep-going", "--timeout", "2"])
        .arg(&d1)
        .arg(&d2),
        None,
    );
    let took = start.elapsed();
    let err = text(&res.stderr);
    // Nix's exit status with only the timeout bit: 0x60 | 0x04 | 0x01.
    assert_eq!(res.status.code(), Some(101), "{err}");
    assert!(
        took < Duration::from_secs(90),
        "took {took:?}: the timeout was not passed on"
    );
    for d in [&d1, &d2] {
        assert!(
            err.contains(&format!("@ build-failed {d} - timeout")),
            "{err}"
        );
    }
    assert!(err.contains("started for-nix\n"), "{err}");
    assert!(err.contains("started for-nixb\n"), "{err}");
    assert!(!err.contains("@ hook-failed"), "{err}");
}

/// A binary cache (written by real `nix copy`, signed) that the hosts substitute from.
fn signed_cache(t: &TestStore, paths: &[&str]) -> (PathBuf, String) {
    let keys = t.root.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    run_ok(
        t.nix("nix-store")
            .args(["--generate-binary-cache-key", "netns-cache-1"])
            .arg(keys.join("sk"))
            .arg(keys.join("pk")),
        None,
    );
    let cache = t.root.path().join("cache");
    run_ok(
        t.nix("nix")
            .args(["copy", "--to"])
            .arg(format!(
                "file://{}?secret-key={}",
                cache.display(),
                keys.join("sk").display()
            ))
            .args(paths),
        None,
    );
    let pk = std::fs::read_to_string(keys.join("pk"))
        .unwrap()
        .trim()
        .to_string();
    (cache, pk)
}

#[test]
fn builders_use_substitutes_lets_each_host_fetch_inputs_from_its_own_cache() {
    if !can_run() {
        return;
    }
    let t = TestStore::with_conf(HOST_CONF);
    // Four inputs, all in the cache; a derivation per input and host.
    let mut srcs = Vec::new();
    for i in 0..4 {
        let f = t.file(&format!("in{i}.txt"), &format!("input {i}\n"));
        srcs.push(run_str(t.nix("nix-store").arg("--add").arg(&f), None));
    }
    let src_refs: Vec<&str> = srcs.iter().map(String::as_str).collect();
    let (cache, pk) = signed_cache(&t, &src_refs);
    let conf = format!(
        "{HOST_CONF}substituters = file://{}\ntrusted-public-keys = {pk}\nrequire-sigs = true\n",
        cache.display()
    );
    let nixhost = Remote::start(&t, "nixhost", Server::Nix, &conf);
    let nixbhost = Remote::start(&t, "nixbhost", Server::Nixb, &conf);
    let machines = [
        nixhost.host.machines_line("x86_64-linux", 1, 1, "onnix"),
        nixbhost.host.machines_line("x86_64-linux", 1, 1, "onnixb"),
    ];
    let drv = |i: usize, feature: &str| {
        let e = t.file(
            &format!("use{i}.nix"),
            &format!(
                r#"builtins.derivation {{ name = "use{i}"; system = builtins.currentSystem; builder = "/bin/sh"; requiredSystemFeatures = [ "{feature}" ]; src = builtins.storePath {src}; args = [ "-c" "read -r l < $src; echo \"$l\" > $out" ]; }}"#,
                src = srcs[i]
            ),
        );
        run_str(t.nix("nix-instantiate").arg(&e), None)
    };
    // The signatures each host has on an input: substituted paths carry the cache's,
    // paths received from us carry none (ours are unsigned).
    let sigs = |host: &Remote, path: &str| {
        run_str(host.nix("nix").args(["path-info", "--sigs", path]), None)
    };
    for (flag, first) in [("false", 0), ("true", 2)] {
        let (on_nix, on_nixb) = (drv(first, "onnix"), drv(first + 1, "onnixb"));
        let res = run(
            realise(&t, &machines)
                .args(["--max-jobs", "0"])
                .args(["--option", "builders-use-substitutes", flag])
                .arg(&on_nix)
                .arg(&on_nixb),
            None,
        );
        let err = text(&res.stderr);
        assert!(res.status.success(), "{flag}: {err}");
        for (host, src) in [(&nixhost, &srcs[first]), (&nixbhost, &srcs[first + 1])] {
            let s = sigs(host, src);
            assert_eq!(
                s.contains("netns-cache-1:"),
                flag == "true",
                "{} with builders-use-substitutes = {flag}: {s}\n{err}",
                host.host.uri()
            );
        }
        let outs = text(&res.stdout);
        for (o, i) in outs.lines().zip([first, first + 1]) {
            assert_eq!(std::fs::read_to_string(o).unwrap(), format!("input {i}\n"));
        }
    }
}

#[test]
fn a_failing_hook_is_traced_as_hook_failed_only() {
    nixb_testsupport::require!(Nix);
    let t = TestStore::new();
    // A hook that accepts, reads the path lists, says why it gives up and exits 1: a hook
    // failure, not a build failure.
    let hook = t.root.path().join("bin/failing-hook");
    write_exe(
        &hook,
        "#!/bin/sh\nread -r req\necho '# accept' >&2\nread -r inputs\nread -r outputs\necho 'hook: giving up' >&2\nexit 1\n",
    );
    let expr = t.file(
        "x.nix",
        r#"builtins.derivation { name = "x"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo x > $out" ]; }"#,
    );
    let drv = run_str(t.nix("nix-instantiate").arg(&expr), None);
    let res = run(
        t.nixb()
            .args(["realise", "--print-build-trace", "--max-jobs", "0"])
            .args(["--option", "build-hook"])
            .arg(&hook)
            .arg(&drv),
        None,
    );
    let err = text(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{err}");
    let traces: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("@ ") && l.contains(&drv) && l.contains("failed"))
        .collect();
    // The original: `@ hook-failed DRV - STATUS MSG` in place of `@ build-failed`.
    assert_eq!(traces.len(), 1, "{err}");
    assert!(
        traces[0].starts_with(&format!("@ hook-failed {drv} - 256 ")),
        "{err}"
    );
    assert!(err.contains("hook: giving up"), "{err}");
}
