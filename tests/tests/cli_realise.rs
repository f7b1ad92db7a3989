//! `nixb realise` through the command line: exit statuses, `--print-build-trace`, `--json`,
//! settings from nix.conf and `--option`, `nixb log`, and clear errors. Derivations are made
//! with `nixb derivation add`, so these tests need no real Nix.

use nixb_tests::{run, run_str, TestStore};
use serde_json::json;

/// Adds a derivation whose builder is `/bin/sh -c script`, returning its .drv path.
fn add_drv(t: &TestStore, name: &str, script: &str, extra_env: &[(&str, &str)]) -> String {
    let mut env = serde_json::Map::new();
    env.insert("name".into(), json!(name));
    env.insert("builder".into(), json!("/bin/sh"));
    env.insert("system".into(), json!(system()));
    env.insert("out".into(), json!(""));
    for (k, v) in extra_env {
        env.insert((*k).into(), json!(v));
    }
    let drv = json!({
        "outputs": { "out": { "path": "" } },
        "inputSrcs": [],
        "inputDrvs": {},
        "system": system(),
        "builder": "/bin/sh",
        "args": ["-c", script],
        "env": env,
    });
    run_str(
        t.nixb().args(["derivation", "add"]),
        Some(drv.to_string().as_bytes()),
    )
}

fn system() -> String {
    format!("{}-linux", std::env::consts::ARCH)
}

#[test]
fn success_prints_outputs_and_trace_lines() {
    let t = TestStore::new();
    let drv = add_drv(
        &t,
        "ok",
        "echo hello from the builder; echo done > $out",
        &[],
    );
    let out = run(
        t.nixb().args(["realise", "--print-build-trace", &drv]),
        None,
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let outpath = stdout.trim();
    assert!(
        outpath.starts_with(&t.store_dir().display().to_string()),
        "{stdout}"
    );
    assert_eq!(std::fs::read_to_string(outpath).unwrap(), "done\n");
    // The original's trace format: `@ build-started DRV - PLATFORM LOGFILE`, `@ build-succeeded DRV -`.
    let started = stderr
        .lines()
        .find(|l| l.starts_with("@ build-started "))
        .unwrap_or_else(|| panic!("{stderr}"));
    let words: Vec<&str> = started.split(' ').collect();
    assert_eq!(
        &words[..5],
        ["@", "build-started", drv.as_str(), "-", system().as_str()],
        "{started}"
    );
    assert!(
        words[5].starts_with(&t.log_dir().display().to_string()),
        "{started}"
    );
    assert!(
        stderr.contains(&format!("@ build-succeeded {drv} -")),
        "{stderr}"
    );
    assert!(
        stderr.contains("hello from the builder"),
        "build output echoed: {stderr}"
    );
    // A relative path to the .drv works too (resolved as Nix does).
    let rel = format!("store/{}", drv.rsplit('/').next().unwrap());
    let by_rel = run_str(
        t.nixb().args(["realise", &rel]).current_dir(t.root.path()),
        None,
    );
    assert_eq!(by_rel, outpath);
    // `nixb log` by drv and by output path.
    assert_eq!(
        run_str(t.nixb().args(["log", &drv]), None),
        "hello from the builder"
    );
    assert_eq!(
        run_str(t.nixb().args(["log", outpath]), None),
        "hello from the builder"
    );
    // A second realise is a no-op that prints the same path.
    let again = run(
        t.nixb().args(["realise", "--print-build-trace", &drv]),
        None,
    );
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), outpath);
    assert!(!String::from_utf8_lossy(&again.stderr).contains("@ build-started"));
}

#[test]
fn failure_exits_100_with_trace_and_json() {
    let t = TestStore::new();
    let drv = add_drv(&t, "bad", "echo about to fail; exit 3", &[]);
    let out = run(
        t.nixb().args(["realise", "--print-build-trace", &drv]),
        None,
    );
    assert_eq!(out.status.code(), Some(100));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("@ build-failed {drv} - 1 ")),
        "{stderr}"
    );
    assert!(stderr.contains("about to fail"), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "no output path printed for a failed build"
    );

    let out = run(t.nixb().args(["realise", "--json", &drv]), None);
    assert_eq!(out.status.code(), Some(100));
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l}: {e}")))
        .collect();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert!(kinds.contains(&"build-planned"), "{kinds:?}");
    assert!(kinds.contains(&"build-started"), "{kinds:?}");
    assert!(kinds.contains(&"build-failed"), "{kinds:?}");
    let failed = events
        .iter()
        .find(|e| e["event"] == "build-failed")
        .unwrap();
    assert_eq!(failed["drv"], json!(drv));
    assert_eq!(failed["kind"], json!("builder-failed"));
    assert!(events
        .iter()
        .any(|e| e["event"] == "log" && e["line"] == "about to fail"));
}

#[test]
fn timeouts_from_flags_options_and_nix_conf_exit_101() {
    // From nix.conf, with the Nix 1.x alias.
    let t = TestStore::with_conf("build-max-silent-time = 1\n");
    let drv = add_drv(&t, "silent", "/bin/sleep 30; echo > $out", &[]);
    let start = std::time::Instant::now();
    let out = run(t.nixb().args(["realise", &drv]), None);
    assert_eq!(
        out.status.code(),
        Some(101),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        start.elapsed() < std::time::Duration::from_secs(20),
        "the builder was not killed"
    );

    // From --option and from the flag.
    let t = TestStore::new();
    let drv = add_drv(
        &t,
        "slow",
        "while true; do echo tick; /bin/sleep 0.2; done",
        &[],
    );
    let out = run(
        t.nixb().args(["realise", "--option", "timeout", "1", &drv]),
        None,
    );
    assert_eq!(
        out.status.code(),
        Some(101),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(t.nixb().args(["realise", "--timeout", "1", &drv]), None);
    assert_eq!(out.status.code(), Some(101));
}

#[test]
fn keep_going_builds_what_it_can() {
    let t = TestStore::new();
    let bad = add_drv(&t, "bad", "exit 1", &[]);
    let good = add_drv(&t, "good", "/bin/sleep 0.5; echo > $out", &[]);
    // Without keep-going the good build may be stopped; with it, it completes.
    let out = run(
        t.nixb()
            .args(["realise", "--keep-going", "--max-jobs", "1", &bad, &good]),
        None,
    );
    assert_eq!(out.status.code(), Some(100));
    let printed = String::from_utf8_lossy(&out.stdout);
    let good_out = run_str(t.nixb().args(["query", "--outputs", &good]), None);
    assert!(
        printed.contains(&good_out),
        "keep-going still prints the good output: {printed}"
    );
    assert!(run(t.nixb().args(["query", "--valid", &good_out]), None)
        .status
        .success());
}

#[test]
fn bad_settings_and_arguments_are_named() {
    let t = TestStore::with_conf("max-jobs = many\n");
    let drv = add_drv(&t, "x", "echo > $out", &[]);
    let out = run(t.nixb().args(["realise", &drv]), None);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nix.conf:1") && err.contains("max-jobs") && err.contains("'many'"),
        "{err}"
    );

    let t = TestStore::new();
    let out = run(
        t.nixb().args([
            "realise",
            "--option",
            "sandbox",
            "perhaps",
            "/nix/store/x.drv",
        ]),
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--option") && err.contains("sandbox") && err.contains("perhaps"),
        "{err}"
    );

    let missing = format!(
        "{}/00000000000000000000000000000000-missing.drv",
        t.store_dir().display()
    );
    let out = run(t.nixb().args(["realise", &missing]), None);
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.drv"));

    // A malformed .drv file: the error names the file and the byte offset.
    let bogus = t
        .store_dir()
        .join("00000000000000000000000000000000-bogus.drv");
    std::fs::create_dir_all(t.store_dir()).unwrap();
    std::fs::write(&bogus, "Derive([(\"out\",").unwrap();
    let out = run(t.nixb().args(["derivation", "show"]).arg(&bogus), None);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bogus.drv"), "{err}");
}

#[test]
fn hostile_nar_restore_is_refused_and_names_the_destination() {
    let t = TestStore::new();
    // A NAR whose directory entry is named "..".
    fn s(buf: &mut Vec<u8>, x: &[u8]) {
        buf.extend_from_slice(&(x.len() as u64).to_le_bytes());
        buf.extend_from_slice(x);
        buf.resize(buf.len().div_ceil(8) * 8, 0);
    }
    let mut nar = Vec::new();
    for w in [
        &b"nix-archive-1"[..],
        b"(",
        b"type",
        b"directory",
        b"entry",
        b"(",
        b"name",
        b"..",
        b"node",
        b"(",
        b"type",
        b"regular",
        b"contents",
    ] {
        s(&mut nar, w);
    }
    s(&mut nar, b"pwned");
    for w in [&b")"[..], b")", b")"] {
        s(&mut nar, w);
    }
    let dest = t.root.path().join("unpack/dest");
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    let out = run(t.nixb().arg("restore").arg(&dest), Some(&nar));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&dest.display().to_string()), "{err}");
    assert!(!t.root.path().join("unpack/pwned").exists());
    assert!(!t.root.path().join("pwned").exists());
}

/// Adds a derivation of the builtin builder `builder` with `env` and `inputs` as sources.
fn add_builtin_drv(t: &TestStore, builder: &str, inputs: &[&str], env: &[(&str, &str)]) -> String {
    let mut e = serde_json::Map::new();
    e.insert("name".into(), json!("user-environment"));
    e.insert("builder".into(), json!(builder));
    e.insert("system".into(), json!("builtin"));
    e.insert("out".into(), json!(""));
    for (k, v) in env {
        e.insert((*k).into(), json!(v));
    }
    let drv = json!({
        "outputs": { "out": { "path": "" } },
        "inputSrcs": inputs,
        "inputDrvs": {},
        "system": "builtin",
        "builder": builder,
        "args": [],
        "env": e,
    });
    run_str(
        t.nixb().args(["derivation", "add"]),
        Some(drv.to_string().as_bytes()),
    )
}

/// Realises `drv` under `sandbox = true` (a builtin runs outside the chroot even so),
/// which must succeed; its output.
fn realise_sandboxed(t: &TestStore, drv: &str) -> std::path::PathBuf {
    let o = run(
        t.nixb()
            .args(["realise", "--option", "sandbox", "true", drv]),
        None,
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{stderr}");
    std::path::PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
}

/// Realises `drv`, which must fail with exit code 100; its stderr.
fn realise_refused(t: &TestStore, drv: &str) -> String {
    let o = run(t.nixb().args(["realise", drv]), None);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(100), "{stderr}");
    stderr
}

#[test]
fn builtin_buildenv_links_inputs_and_refuses_other_paths() {
    let t = TestStore::new();
    let pkg = t.root.path().join("hello");
    std::fs::create_dir_all(pkg.join("bin")).unwrap();
    std::fs::write(pkg.join("bin/hello"), "hi\n").unwrap();
    let manifest = t.root.path().join("manifest");
    std::fs::write(&manifest, "[ ]\n").unwrap();
    let pkg = run_str(t.nixb().arg("add").arg(&pkg), None);
    let manifest = run_str(t.nixb().arg("add").arg(&manifest), None);
    let derivations = format!("1 5 1 {pkg}");
    let env = [
        ("derivations", derivations.as_str()),
        ("manifest", &manifest),
    ];
    let drv = add_builtin_drv(&t, "builtin:buildenv", &[&pkg, &manifest], &env);
    let out = realise_sandboxed(&t, &drv);
    assert_eq!(
        std::fs::read_link(out.join("bin")).unwrap(),
        std::path::Path::new(&pkg).join("bin")
    );
    assert_eq!(
        std::fs::read_link(out.join("manifest.nix")).unwrap(),
        std::path::Path::new(&manifest)
    );
    assert_eq!(
        std::fs::read_to_string(out.join("bin/hello")).unwrap(),
        "hi\n"
    );

    // A path the derivation does not have as an input is refused before anything runs.
    let sneaky = add_builtin_drv(&t, "builtin:buildenv", &[&manifest], &env);
    let stderr = realise_refused(&t, &sneaky);
    assert!(
        stderr.contains(&format!(
            "builtin:buildenv would read '{pkg}', which is not an input of the derivation"
        )),
        "{stderr}"
    );

    let unknown = add_builtin_drv(&t, "builtin:frobnicate", &[], &[]);
    let stderr = realise_refused(&t, &unknown);
    assert!(
        stderr.contains("unsupported builtin builder 'frobnicate'"),
        "{stderr}"
    );
}

#[test]
fn builtin_unpack_channel_unpacks_an_input_and_refuses_other_paths() {
    let t = TestStore::new();
    let dir = t.root.path().join("src");
    std::fs::create_dir_all(dir.join("nixpkgs-unstable/lib")).unwrap();
    std::fs::write(dir.join("nixpkgs-unstable/lib/default.nix"), "{ }\n").unwrap();
    let tarball = t.root.path().join("nixexprs.tar.xz");
    let status = std::process::Command::new("tar")
        .arg("-C")
        .arg(&dir)
        .arg("-cJf")
        .arg(&tarball)
        .arg("nixpkgs-unstable")
        .status()
        .unwrap();
    assert!(status.success());
    let src = run_str(t.nixb().arg("add").arg(&tarball), None);
    let env = [("channelName", "nixpkgs"), ("src", src.as_str())];
    let drv = add_builtin_drv(&t, "builtin:unpack-channel", &[&src], &env);
    let out = realise_sandboxed(&t, &drv);
    assert_eq!(
        std::fs::read_to_string(out.join("nixpkgs/lib/default.nix")).unwrap(),
        "{ }\n"
    );

    // A tarball the derivation does not have as an input is refused before anything runs.
    let sneaky = add_builtin_drv(&t, "builtin:unpack-channel", &[], &env);
    let stderr = realise_refused(&t, &sneaky);
    assert!(
        stderr.contains(&format!(
            "builtin:unpack-channel would read '{src}', which is not an input of the derivation"
        )),
        "{stderr}"
    );
}
