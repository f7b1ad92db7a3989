//! `nixb realise` end to end, on derivations made by real `nix-instantiate`, compared with
//! real `nix-store -r` on the same store; concurrency between nixb processes; and crashes
//! (`kill -9`) at random moments.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nixb_tests::{run, run_ok, run_str, TestStore};

/// A graph with a diamond, multiple outputs, a runtime reference and a builder log line.
/// `marker` is a host directory where every builder run leaves a file, so tests can count
/// how often each derivation was built.
fn graph_expr(marker: &Path, sleep: &str) -> String {
    format!(
        r#"
let
  mk = name: attrs: derivation ({{
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    marker = "{marker}";
    args = [ "-c" ''
      set -e
      /bin/sleep {sleep}
      echo "building $name"
      echo $$ > $marker/$name.$$
      /bin/mkdir -p $out
      echo "$name" > $out/name
      for d in $deps; do echo "$d" >> $out/deps; done
      if [ -n "$dev" ]; then /bin/mkdir -p $dev; echo "dev of $out" > $dev/info; fi
    '' ];
  }} // attrs);
  base = mk "base" {{ deps = ""; }};
  left = mk "left" {{ deps = [ base ]; }};
  right = mk "right" {{ deps = [ base ]; outputs = [ "out" "dev" ]; }};
in mk "top" {{ deps = [ left right right.dev ]; }}
"#,
        marker = marker.display(),
    )
}

fn instantiate(t: &TestStore, expr: &str) -> String {
    let f = t.file("graph.nix", expr);
    run_str(t.nix("nix-instantiate").arg(f), None)
}

/// Every derivation in the closure of `drv`, by name, with the output paths.
fn outputs_by_name(t: &TestStore, drv: &str) -> BTreeMap<String, Vec<String>> {
    let mut m = BTreeMap::new();
    for d in run_str(
        t.nix("nix-store").args(["-q", "--requisites"]).arg(drv),
        None,
    )
    .lines()
    {
        if d.ends_with(".drv") {
            let outs = run_str(t.nix("nix-store").args(["-q", "--outputs"]).arg(d), None);
            m.insert(d.to_string(), outs.lines().map(str::to_string).collect());
        }
    }
    m
}

fn builds_of(marker: &Path, name: &str) -> usize {
    std::fs::read_dir(marker)
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{name}."))
        })
        .count()
}

#[test]
fn same_results_as_nix_store_r_and_nix_accepts_the_store() {
    nixb_testsupport::require!(Nix);
    let t = TestStore::new();
    let marker = t.root.path().join("marker");
    std::fs::create_dir_all(&marker).unwrap();
    let drv = instantiate(&t, &graph_expr(&marker, "0"));

    let printed = run_str(t.nixb().args(["realise", &drv]), None);
    let outs = outputs_by_name(&t, &drv);
    let top_out = outs[&drv][0].clone();
    assert_eq!(printed, top_out, "realise prints the output path");
    for name in ["base", "left", "right", "top"] {
        assert_eq!(builds_of(&marker, name), 1, "{name} built once (diamond)");
    }

    // What nixb registered, as real Nix reads it.
    let mut ours = BTreeMap::new();
    for paths in outs.values() {
        for p in paths {
            let hash = run_str(t.nix("nix-store").args(["-q", "--hash"]).arg(p), None);
            let refs = run_str(t.nix("nix-store").args(["-q", "--references"]).arg(p), None);
            ours.insert(p.clone(), (hash, refs));
        }
    }
    let verify = run(
        t.nix("nix-store").args(["--verify", "--check-contents"]),
        None,
    );
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(!String::from_utf8_lossy(&verify.stderr).contains("error"));
    // Real Nix prints nixb's (bzip2) logs.
    let log = run_str(t.nix("nix-store").arg("-l").arg(&drv), None);
    assert!(log.contains("building top"), "nix-store -l printed: {log}");

    // Now let real Nix build the same derivations in the same store.
    let all: Vec<&String> = outs.values().flatten().collect();
    run_ok(t.nix("nix-store").arg("--delete").args(&all), None);
    for p in &all {
        assert!(
            !Path::new(p).exists(),
            "{p} still there after nix-store --delete"
        );
    }
    run_ok(t.nix("nix-store").args(["-r", &drv]), None);
    for (p, (hash, refs)) in &ours {
        let h = run_str(t.nix("nix-store").args(["-q", "--hash"]).arg(p), None);
        let r = run_str(t.nix("nix-store").args(["-q", "--references"]).arg(p), None);
        assert_eq!(&h, hash, "NAR hash of {p}: nix vs nixb");
        assert_eq!(&r, refs, "references of {p}: nix vs nixb");
    }
}

#[test]
fn concurrent_processes_build_each_derivation_once() {
    nixb_testsupport::require!(Nix);
    let t = TestStore::new();
    let marker = t.root.path().join("marker");
    std::fs::create_dir_all(&marker).unwrap();
    let drv = instantiate(&t, &graph_expr(&marker, "0.3"));
    let left = run_str(
        t.nix("nix-store").args(["-q", "--references"]).arg(&drv),
        None,
    )
    .lines()
    .find(|l| l.ends_with("-left.drv"))
    .unwrap()
    .to_string();
    // Three processes on overlapping targets.
    let children: Vec<_> = [&drv, &left, &drv]
        .iter()
        .map(|target| {
            let mut c = t.nixb();
            c.args([
                "realise",
                target.as_str(),
                "--option",
                "build-poll-interval",
                "1",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for name in ["base", "left", "right", "top"] {
        assert_eq!(
            builds_of(&marker, name),
            1,
            "{name} built exactly once across processes"
        );
    }
}

fn pid_alive(pid: i32) -> bool {
    // Signal 0 tests for existence; a zombie counts as gone (it runs nothing).
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty() && !stat.contains(") Z ")
}

#[test]
fn kill_9_never_leaves_half_registered_paths_or_builders() {
    nixb_testsupport::require!(Nix);
    let t = TestStore::new();
    let marker = t.root.path().join("marker");
    std::fs::create_dir_all(&marker).unwrap();
    let drv = instantiate(&t, &graph_expr(&marker, "0.2"));
    // Build directories go to a private TMPDIR so leftovers can be counted.
    let build_tmp = t.root.path().join("build-tmp");
    std::fs::create_dir_all(&build_tmp).unwrap();
    // Deterministic "random" moments across the whole run (about 1 s long).
    let mut seed: u64 = 0x9e3779b97f4a7c15;
    for round in 0..8 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = Duration::from_millis(50 + seed % 900);
        let mut child = t
            .nixb()
            .args(["realise", &drv])
            .env("TMPDIR", &build_tmp)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let _ = Command::new("kill")
            .args(["-9", &child.id().to_string()])
            .status();
        let _ = child.wait();
        // No builder (nor its children) survives nixb: each is killed once nixb is gone,
        // by the process that watches it, so allow that a moment (a bound, not a wait).
        for e in std::fs::read_dir(&marker).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let pid: i32 = name.rsplit('.').next().unwrap().parse().unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while pid_alive(pid) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            assert!(
                !pid_alive(pid),
                "round {round}: builder {name} survived kill -9 of nixb by 30 s"
            );
        }
        // The store is consistent: every valid path is complete.
        let verify = run(
            t.nix("nix-store").args(["--verify", "--check-contents"]),
            None,
        );
        assert!(
            verify.status.success() && !String::from_utf8_lossy(&verify.stderr).contains("error"),
            "round {round}: {}",
            String::from_utf8_lossy(&verify.stderr)
        );
    }
    // A rerun finishes the job, building only what is missing.
    let before: usize = std::fs::read_dir(&marker).unwrap().count();
    let valid_before: Vec<String> = outputs_by_name(&t, &drv)
        .values()
        .flatten()
        .filter(|p| {
            run(t.nixb().args(["query", "--valid"]).arg(p), None)
                .status
                .success()
        })
        .cloned()
        .collect();
    run_ok(
        t.nixb().args(["realise", &drv]).env("TMPDIR", &build_tmp),
        None,
    );
    let after: usize = std::fs::read_dir(&marker).unwrap().count();
    let drvs = outputs_by_name(&t, &drv);
    let missing_drvs = drvs
        .values()
        .filter(|outs| outs.iter().any(|o| !valid_before.contains(o)))
        .count();
    assert_eq!(
        after - before,
        missing_drvs,
        "rerun builds exactly the derivations with missing outputs"
    );
    // Stale build directories of the killed runs are gone after the rerun.
    let leftovers: Vec<String> = std::fs::read_dir(&build_tmp)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("nix-build-"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "stale build directories left behind: {leftovers:?}"
    );
}
