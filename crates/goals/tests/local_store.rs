//! The engine on the real SQLite store: real Nix 2.8 must accept what nixb built and
//! registered, and two processes realising the same derivation build it once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nixb_goals::{realise, VecSink, WorkerConfig};
use nixb_store::derivation::{compute_output_paths, Derivation, DerivationOutput, DrvHashCache};
use nixb_store::local_store::{LocalStore, StoreConfig};
use nixb_store::{DerivedPath, StoreDir, StorePath};

fn open(root: &Path) -> LocalStore {
    LocalStore::open(StoreConfig {
        store_dir: StoreDir::new(root.join("store").to_str().unwrap()).unwrap(),
        state_dir: root.join("state"),
        log_dir: root.join("log"),
    })
    .unwrap()
}

fn config(root: &Path) -> WorkerConfig {
    let mut cfg = WorkerConfig::new(root.join("log"));
    cfg.build_dir_root = root.join("build");
    std::fs::create_dir_all(&cfg.build_dir_root).unwrap();
    cfg.impure_env = BTreeMap::new();
    cfg.build_poll_interval = Duration::from_millis(100);
    cfg
}

fn add_drv(
    store: &LocalStore,
    system: &str,
    name: &str,
    script: &str,
    inputs: &[&StorePath],
) -> StorePath {
    let mut env = BTreeMap::new();
    for (k, v) in [
        ("name", name),
        ("builder", "/bin/sh"),
        ("system", system),
        ("out", ""),
    ] {
        env.insert(k.to_string(), v.to_string());
    }
    let mut input_drvs = BTreeMap::new();
    for (i, d) in inputs.iter().enumerate() {
        let out = store.read_derivation(d).unwrap().output_paths()["out"].clone();
        env.insert(format!("in{i}"), store.store_dir().print(&out));
        input_drvs.insert((*d).clone(), BTreeSet::from(["out".to_string()]));
    }
    let mut drv = Derivation {
        outputs: BTreeMap::from([(
            "out".to_string(),
            DerivationOutput {
                path: None,
                fixed: None,
            },
        )]),
        input_drvs,
        input_srcs: BTreeSet::new(),
        platform: system.into(),
        builder: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        env,
    };
    let dir = store.store_dir().clone();
    compute_output_paths(
        &dir,
        &mut drv,
        &mut |p| {
            store
                .read_derivation(p)
                .map_err(|e| nixb_store::derivation::DrvError::Invalid {
                    drv: p.to_string(),
                    msg: e.to_string(),
                })
        },
        &mut DrvHashCache::new(),
    )
    .unwrap();
    store.add_derivation(&drv).unwrap()
}

fn realise_all(store: &LocalStore, cfg: &WorkerConfig, drvs: &[&StorePath]) -> i32 {
    let targets: Vec<DerivedPath> = drvs
        .iter()
        .map(|d| DerivedPath::Built {
            drv: (*d).clone(),
            outputs: vec![],
        })
        .collect();
    let mut sink = VecSink::default();
    let outcome = realise(store, &targets, cfg, &mut sink).unwrap();
    assert!(outcome.failures.is_empty() || outcome.exit_status != 0);
    outcome.exit_status
}

fn have_nix() -> bool {
    Command::new("nix-store")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn nix_store(root: &Path, args: &[&str]) -> (bool, String) {
    let etc = root.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(
        etc.join("nix.conf"),
        "sandbox = false\nbuild-users-group =\nsubstituters =\n",
    )
    .unwrap();
    let o = Command::new("nix-store")
        .args(args)
        .env("NIX_STORE_DIR", root.join("store"))
        .env("NIX_STATE_DIR", root.join("state"))
        .env("NIX_LOG_DIR", root.join("log"))
        .env("NIX_CONF_DIR", &etc)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    (o.status.success(), text)
}

#[test]
fn real_nix_accepts_what_nixb_built() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let store = open(root);
    let cfg = config(root);
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

    if !have_nix() {
        assert!(
            std::env::var_os("CI").is_none(),
            "nix-store is required for this test under CI=true"
        );
        eprintln!("skipping the Nix half: nix-store not installed");
        return;
    }
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
        let store = open(&root);
        let cfg = config(&root);
        let drv = slow_drv(&store, &cfg, &root);
        std::process::exit(realise_all(&store, &cfg, &[&drv]));
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let store = open(root);
    let cfg = config(root);
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
