//! The engine on the real SQLite store: real Nix 2.8 must accept what nixb built and
//! registered, and two processes realising the same derivation build it once.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::oracle::Nix;
use common::*;
use nixb_goals::WorkerConfig;
use nixb_store::local_store::LocalStore;
use nixb_store::StorePath;

/// A derivation whose variable `in<i>` names the output of `inputs[i]`.
fn add_drv(
    store: &LocalStore,
    system: &str,
    name: &str,
    script: &str,
    inputs: &[&StorePath],
) -> StorePath {
    let mut s = spec(name, script);
    for (i, d) in inputs.iter().enumerate() {
        let out = store.read_derivation(d).unwrap().output_paths()["out"].clone();
        s = s
            .env(&format!("in{i}"), &store.store_dir().print(&out))
            .input(d, &["out"]);
    }
    add_local_drv(store, s, system)
}

fn realise_all(store: &LocalStore, cfg: &WorkerConfig, drvs: &[&StorePath]) -> i32 {
    let (outcome, _) = realise_drvs(store, drvs, cfg);
    assert!(outcome.failures.is_empty() || outcome.exit_status != 0);
    outcome.exit_status
}

/// `nix-store args` on the store under `root`: whether it succeeded, and stdout then stderr.
fn nix_store(root: &Path, args: &[&str]) -> (bool, String) {
    let o = Nix::new(root).output("nix-store", args);
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    (o.status.success(), text)
}

#[test]
fn real_nix_accepts_what_nixb_built() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let store = local_store(root);
    let cfg = worker_config(root);
    let base = add_drv(
        &store,
        &cfg.system,
        "base",
        "echo building base; echo base > $out",
        &[],
    );
    let top = add_drv(
        &store,
        &cfg.system,
        "top",
        "/bin/mkdir $out; echo $in0 > $out/ref; echo $out > $out/self",
        &[&base],
    );
    assert_eq!(realise_all(&store, &cfg, &[&top]), 0);
    let base_out = store.read_derivation(&base).unwrap().output_paths()["out"].clone();
    let top_out = store.read_derivation(&top).unwrap().output_paths()["out"].clone();
    let info = store.query_path_info(&top_out).unwrap().unwrap();
    assert_eq!(
        info.references,
        BTreeSet::from([base_out.clone(), top_out.clone()])
    );
    assert_eq!(info.deriver.as_ref(), Some(&top));
    assert!(info.ultimate);

    nixb_testsupport::require!(Nix);
    let p = |s: &StorePath| store.store_dir().print(s);
    let (ok, refs) = nix_store(root, &["-q", "--references", &p(&top_out)]);
    assert!(ok, "{refs}");
    let mut refs: Vec<&str> = refs.lines().collect();
    refs.sort();
    let mut want = vec![p(&base_out), p(&top_out)];
    want.sort();
    assert_eq!(refs, want);
    let (ok, deriver) = nix_store(root, &["-q", "--deriver", &p(&top_out)]);
    assert!(ok);
    assert_eq!(deriver.trim(), p(&top));
    let (ok, log) = nix_store(root, &["-l", &p(&base)]);
    assert!(ok, "{log}");
    assert_eq!(log, "building base\n");
    let (ok, report) = nix_store(root, &["--verify", "--check-contents"]);
    assert!(
        ok && !report.contains("error") && !report.contains("modified"),
        "{report}"
    );
    // Nix sees the outputs as valid: realising with Nix builds nothing.
    let (ok, out) = nix_store(root, &["-r", &p(&top)]);
    assert!(ok, "{out}");
    assert!(!out.contains("building"), "{out}");
}

const CHILD_ENV: &str = "NIXB_GOALS_CONCURRENT_ROOT";

fn slow_drv(store: &LocalStore, cfg: &WorkerConfig, root: &Path) -> StorePath {
    let counter: PathBuf = root.join("runs");
    add_drv(
        store,
        &cfg.system,
        "shared",
        &format!(
            "echo run >> {}; /bin/sleep 1; echo done > $out",
            counter.display()
        ),
        &[],
    )
}

#[test]
fn two_processes_build_a_derivation_once() {
    if let Some(root) = std::env::var_os(CHILD_ENV) {
        let root = PathBuf::from(root);
        let store = local_store(&root);
        let cfg = worker_config(&root);
        let drv = slow_drv(&store, &cfg, &root);
        std::process::exit(realise_all(&store, &cfg, &[&drv]));
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let store = local_store(root);
    let cfg = worker_config(root);
    let drv = slow_drv(&store, &cfg, root);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "two_processes_build_a_derivation_once",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, root)
        .spawn()
        .unwrap();
    assert_eq!(realise_all(&store, &cfg, &[&drv]), 0);
    assert!(child.wait().unwrap().success());
    assert_eq!(std::fs::read_to_string(root.join("runs")).unwrap(), "run\n");
    let out = store.read_derivation(&drv).unwrap().output_paths()["out"].clone();
    assert!(store.is_valid_path(&out).unwrap());
}
