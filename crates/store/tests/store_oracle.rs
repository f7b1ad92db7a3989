//! LocalStore against real Nix 2.8 on one private store (temp dir; the host's /nix is
//! never touched): `add_to_store` puts things where `nix-store --add` does, Nix accepts
//! and verifies what nixb registered, and nixb reads what Nix registered.
//!
//! Needs `nix-store` and `nix-instantiate`. Without them the tests fail under CI=true and
//! are skipped (with a message) otherwise.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nixb_store::derivation::{
    compute_output_paths, Derivation, DerivationOutput, DrvError, DrvHashCache,
};
use nixb_store::local_store::{LocalStore, StoreConfig, ValidPathInfo};
use nixb_store::{HashAlgo, StoreDir, StorePath};
use nixb_testsupport::TestStore;

/// A private store (`nixb_testsupport::TestStore`) with the few oracle calls these tests
/// make.
struct Env {
    t: TestStore,
    root: PathBuf,
}

impl Env {
    fn new() -> Env {
        let t = TestStore::with_conf("sandbox = false\nbuild-users-group =\nsubstituters =\n");
        let root = t.root.path().to_path_buf();
        Env { t, root }
    }

    fn config(&self) -> StoreConfig {
        StoreConfig::under(&self.root).unwrap()
    }

    fn cmd(&self, prog: &str) -> Command {
        self.t.nix(prog)
    }

    /// Runs a Nix command; panics with its stderr when it fails. Returns (stdout, stderr).
    fn run(&self, prog: &str, args: &[&str]) -> (String, String) {
        let o = self.cmd(prog).args(args).output().unwrap();
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(
            o.status.success(),
            "{prog} {args:?} failed ({}):\n{err}",
            o.status
        );
        (out, err)
    }

    fn q(&self, flag: &str, path: &str) -> Vec<String> {
        let (out, _) = self.run("nix-store", &["-q", flag, path]);
        let mut v: Vec<String> = out.lines().map(String::from).collect();
        v.sort();
        v
    }
}

/// A source tree with a file, an executable, a subdirectory and a relative symlink.
fn make_tree(at: &Path) {
    std::fs::create_dir_all(at.join("sub/deeper")).unwrap();
    std::fs::write(at.join("sub/deeper/data"), b"some bytes\n").unwrap();
    std::fs::write(at.join("empty"), b"").unwrap();
    std::fs::write(at.join("run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(at.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("sub/deeper/data", at.join("link")).unwrap();
}

#[test]
fn add_to_store_matches_nix_store_add() {
    nixb_testsupport::require!(Nix);
    let env = Env::new();
    let src = env.root.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("plain.txt"), b"hello\n").unwrap();
    std::fs::write(src.join("exe"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(src.join("exe"), std::fs::Permissions::from_mode(0o755)).unwrap();
    make_tree(&src.join("tree"));
    std::os::unix::fs::symlink("/some/where/else", src.join("sym")).unwrap();

    // nixb first, into a store it creates; Nix then adds the same sources to that store.
    let store = LocalStore::open(env.config()).unwrap();
    for name in ["plain.txt", "exe", "tree", "sym"] {
        let ours = store.add_to_store(&src.join(name), None).unwrap();
        let (out, _) = env.run("nix-store", &["--add", src.join(name).to_str().unwrap()]);
        assert_eq!(out.trim(), store.store_dir().print(&ours), "{name}");
    }
    drop(store);
    let (_, err) = env.run("nix-store", &["--verify", "--check-contents"]);
    assert!(
        !err.contains("modified") && !err.contains("disappeared"),
        "nix-store --verify complained:\n{err}"
    );

    // And the other way round in a fresh store: Nix first, nixb must find the same paths
    // already valid (so it computes the same path from the same hash).
    let env2 = Env::new();
    for name in ["plain.txt", "exe", "tree", "sym"] {
        let (out, _) = env2.run("nix-store", &["--add", src.join(name).to_str().unwrap()]);
        let store = LocalStore::open(env2.config()).unwrap();
        let p = store.add_to_store(&src.join(name), None).unwrap();
        assert_eq!(store.store_dir().print(&p), out.trim(), "{name}");
    }
}

fn drv_with(store: &StoreDir, name: &str, srcs: &[&StorePath]) -> Derivation {
    let mut drv = Derivation {
        outputs: BTreeMap::from([
            ("out".to_string(), DerivationOutput::default()),
            ("doc".to_string(), DerivationOutput::default()),
        ]),
        input_drvs: BTreeMap::new(),
        input_srcs: srcs.iter().map(|p| (*p).clone()).collect(),
        platform: "x86_64-linux".into(),
        builder: "/bin/sh".into(),
        args: vec!["-c".into(), "echo > $out".into()],
        env: BTreeMap::from([
            ("name".to_string(), name.to_string()),
            ("builder".to_string(), "/bin/sh".to_string()),
            ("system".to_string(), "x86_64-linux".to_string()),
        ]),
    };
    let mut none =
        |p: &StorePath| -> Result<Derivation, DrvError> { panic!("unexpected input {p}") };
    compute_output_paths(store, &mut drv, &mut none, &mut DrvHashCache::new()).unwrap();
    drv
}

#[test]
fn nix_accepts_what_nixb_registered() {
    nixb_testsupport::require!(Nix);
    let env = Env::new();
    let store = LocalStore::open(env.config()).unwrap();
    let sd = store.store_dir().clone();
    let a = store
        .add_text_to_store("a.txt", b"leaf\n", &BTreeSet::new())
        .unwrap();
    // b's contents mention a, as a real reference would.
    let b_text = format!("uses {}\n", sd.print(&a));
    let b = store
        .add_text_to_store("b.txt", b_text.as_bytes(), &BTreeSet::from([a.clone()]))
        .unwrap();
    let drv = drv_with(&sd, "thing", &[&b]);
    let drv_path = store.add_derivation(&drv).unwrap();

    // An output as a build would register it: contents written, deriver set, ultimate.
    let out = drv.outputs["out"].path.clone().unwrap();
    let doc = drv.outputs["doc"].path.clone().unwrap();
    let mut infos = Vec::new();
    for (p, text) in [
        (&out, format!("{}\n", sd.print(&b))),
        (&doc, "docs\n".to_string()),
    ] {
        let f = sd.to_path(p);
        std::fs::write(&f, text).unwrap();
        let mut seen = nixb_store::canon::InodesSeen::new();
        nixb_store::canon::canonicalise_path_metadata(&f, None, &mut seen).unwrap();
        let (h, n) = nixb_store::nar::hash_path(&f, HashAlgo::Sha256).unwrap();
        let mut i = ValidPathInfo::new(p.clone(), h, n);
        i.deriver = Some(drv_path.clone());
        i.ultimate = true;
        if *p == out {
            i.references = BTreeSet::from([b.clone()]);
        }
        infos.push(i);
    }
    store.register_valid_paths(&infos).unwrap();
    let info_out = store.query_path_info(&out).unwrap().unwrap();
    drop(store);

    let pr = |p: &StorePath| sd.print(p);
    assert_eq!(env.q("--references", &pr(&b)), vec![pr(&a)]);
    assert_eq!(env.q("--references", &pr(&out)), vec![pr(&b)]);
    assert_eq!(env.q("--references", &pr(&drv_path)), vec![pr(&b)]);
    assert_eq!(env.q("--referrers", &pr(&a)), vec![pr(&b)]);
    let mut req = vec![pr(&a), pr(&b), pr(&out)];
    req.sort();
    assert_eq!(env.q("--requisites", &pr(&out)), req);
    assert_eq!(env.q("--deriver", &pr(&out)), vec![pr(&drv_path)]);
    let mut outs = vec![pr(&out), pr(&doc)];
    outs.sort();
    assert_eq!(env.q("--outputs", &pr(&drv_path)), outs);
    // Nix prints the hash in base32 with its algorithm; ours is stored in base16.
    assert_eq!(
        env.q("--hash", &pr(&out)),
        vec![info_out.nar_hash.to_string()]
    );
    assert_eq!(
        env.q("--size", &pr(&out)),
        vec![info_out.nar_size.to_string()]
    );
    // Nix computes the NAR hash itself from the file: it must equal ours.
    let (dumped, _) = env.run("nix-hash", &["--type", "sha256", "--base32", &pr(&out)]);
    assert_eq!(
        format!("sha256:{}", dumped.trim()),
        info_out.nar_hash.to_string()
    );
    let (_, err) = env.run("nix-store", &["--verify", "--check-contents"]);
    assert!(
        !err.contains("modified") && !err.contains("disappeared") && !err.contains("error"),
        "nix-store --verify complained:\n{err}"
    );
    // Nix also reads the derivation nixb wrote, and finds its outputs valid.
    let (shown, _) = env.run(
        "nix",
        &[
            "--extra-experimental-features",
            "nix-command",
            "show-derivation",
            &pr(&drv_path),
        ],
    );
    assert!(shown.contains(&pr(&doc)), "{shown}");
    let (built, _) = env.run(
        "nix-store",
        &["--realise", &format!("{}!out", pr(&drv_path))],
    );
    assert_eq!(
        built.trim(),
        pr(&out),
        "nix-store --realise rebuilt or disagreed"
    );
}

#[test]
fn nixb_reads_what_nix_registered() {
    nixb_testsupport::require!(Nix);
    let env = Env::new();
    let src = env.root.join("tree");
    make_tree(&src);
    let (added, _) = env.run("nix-store", &["--add", src.to_str().unwrap()]);
    let added = added.trim().to_string();
    let nix_file = env.root.join("t.nix");
    std::fs::write(
        &nix_file,
        format!(
            r#"let dep = derivation {{ name = "dep"; system = "x86_64-linux"; builder = "/bin/sh"; args = ["-c" "echo dep > $out"]; }};
in derivation {{ name = "top"; system = "x86_64-linux"; builder = "/bin/sh"; outputs = ["out" "lib"];
   args = ["-c" "echo ${{dep}} > $out; echo > $lib"]; src = {added}; }}"#
        ),
    )
    .unwrap();
    let (drv_out, _) = env.run("nix-instantiate", &[nix_file.to_str().unwrap()]);
    let drv_printed = drv_out.trim().to_string();
    let (built, _) = env.run("nix-store", &["--realise", &drv_printed]);
    let built: Vec<String> = built.lines().map(String::from).collect();
    assert_eq!(built.len(), 2, "{built:?}");

    let store = LocalStore::open(env.config()).unwrap();
    let sd = store.store_dir().clone();
    let drv_path = sd.parse(&drv_printed).unwrap();
    let mut all: Vec<String> = env.q("--requisites", &drv_printed);
    all.extend(built.iter().cloned());
    for printed in &all {
        let p = sd.parse(printed).unwrap();
        let info = store
            .query_path_info(&p)
            .unwrap()
            .unwrap_or_else(|| panic!("{printed} not valid to nixb"));
        assert_eq!(
            env.q("--hash", printed),
            vec![info.nar_hash.to_string()],
            "{printed}"
        );
        assert_eq!(
            env.q("--size", printed),
            vec![info.nar_size.to_string()],
            "{printed}"
        );
        let refs: Vec<String> = info.references.iter().map(|r| sd.print(r)).collect();
        assert_eq!(env.q("--references", printed), refs, "{printed}");
        let deriver = env.q("--deriver", printed);
        let ours = info
            .deriver
            .as_ref()
            .map(|d| sd.print(d))
            .unwrap_or_else(|| "unknown-deriver".into());
        assert_eq!(deriver, vec![ours], "{printed}");
    }
    // The built outputs reference the dependency's output, found by Nix's scanner.
    let outs = store.query_derivation_outputs(&drv_path).unwrap();
    let mut ours: Vec<String> = outs.values().map(|p| sd.print(p)).collect();
    ours.sort();
    assert_eq!(env.q("--outputs", &drv_printed), ours);
    assert_eq!(
        store.query_valid_derivers(&outs["lib"]).unwrap(),
        vec![drv_path.clone()]
    );
    let closure = store
        .compute_closure(&BTreeSet::from([outs["out"].clone()]))
        .unwrap();
    let mut theirs = env.q("--requisites", &sd.print(&outs["out"]));
    theirs.sort();
    assert_eq!(
        closure.iter().map(|p| sd.print(p)).collect::<Vec<_>>(),
        theirs
    );
    // The derivation parses, and a fresh add_to_store of the same tree is the same path.
    assert_eq!(store.read_derivation(&drv_path).unwrap().outputs.len(), 2);
    assert_eq!(sd.print(&store.add_to_store(&src, None).unwrap()), added);
    assert!(store.verify(true).unwrap().is_clean());
}

#[test]
fn nix_waits_for_an_output_lock_held_by_nixb() {
    nixb_testsupport::require!(Nix);
    let env = Env::new();
    let store = LocalStore::open(env.config()).unwrap();
    let sd = store.store_dir().clone();
    let mut drv = drv_with(&sd, "locked", &[]);
    drv.outputs.remove("doc");
    drv.env.remove("doc");
    let mut none =
        |p: &StorePath| -> Result<Derivation, DrvError> { panic!("unexpected input {p}") };
    for o in drv.outputs.values_mut() {
        o.path = None;
    }
    drv.env.remove("out");
    compute_output_paths(&sd, &mut drv, &mut none, &mut DrvHashCache::new()).unwrap();
    let drv_path = store.add_derivation(&drv).unwrap();
    let out = drv.outputs["out"].path.clone().unwrap();

    let locks = nixb_store::locks::PathLocks::lock(&[sd.to_path(&out)], false, None)
        .unwrap()
        .expect("output lock free at first");
    let mut nix = env
        .cmd("nix-store")
        .args(["--realise", &sd.print(&drv_path)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Nix says when it finds the output lock taken: wait for that, not for a while.
    let mut stderr = std::io::BufReader::new(nix.stderr.take().unwrap());
    let mut said = String::new();
    loop {
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
        said.push_str(&line);
        if line.contains("waiting for lock on") {
            break;
        }
        assert!(
            n != 0,
            "nix-store ended its stderr without waiting for the output lock nixb holds: {said}"
        );
    }
    let early = nix.try_wait().unwrap();
    assert!(
        early.is_none(),
        "nix-store finished ({early:?}) while nixb held the output lock"
    );
    assert!(!store.is_valid_path(&out).unwrap());
    drop(locks);
    std::io::Read::read_to_string(&mut stderr, &mut said).unwrap();
    let o = nix.wait_with_output().unwrap();
    assert!(o.status.success(), "{said}");
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), sd.print(&out));
    assert!(store.is_valid_path(&out).unwrap());
}
