//! `passAsFile`, `__structuredAttrs` and `exportReferencesGraph` in a structured derivation:
//! the files and variables our builder gets, and the errors, compared byte for byte with what
//! real Nix 2.8 gives the same builder (when `nix-store` is installed; required under
//! CI=true).

mod common;

use common::oracle::*;
use common::*;

const PAF_SCRIPT: &str = "/usr/bin/env > $out; echo @@ >> $out; /bin/cat $fooPath >> $out; \
     echo @@ >> $out; /bin/cat $barPath >> $out; echo @@ >> $out; /bin/ls -a $NIX_BUILD_TOP >> $out";

// Sourcing .attrs.sh checks that bash accepts it; the files and the environment are copied out.
const SA_SCRIPT: &str = ". $NIX_ATTRS_SH_FILE; /bin/mkdir ${outputs[out]}; \
     /bin/cp $NIX_ATTRS_JSON_FILE $NIX_ATTRS_SH_FILE ${outputs[out]}/; \
     /usr/bin/env > ${outputs[out]}/env; /bin/ls -a $NIX_BUILD_TOP > ${outputs[out]}/ls; \
     echo $s > ${outputs[dev]}";

#[test]
fn pass_as_file_matches_real_nix() {
    nixb_testsupport::require!(Nix);
    let oracle = tempfile::tempdir().unwrap();
    let nix = Nix::new(oracle.path());
    let (_, outs) = nix.build(
        r#"derivation { name = "paf"; system = builtins.currentSystem; builder = "/bin/sh";
           args = ["-c" (builtins.readFile ./script)];
           foo = "hello 'x'\nline2 é"; bar = ""; baz = "keep"; passAsFile = ["foo" "bar" "missing"]; }"#,
        PAF_SCRIPT,
    );
    let theirs = std::fs::read_to_string(&outs[0]).unwrap();
    let theirs = norm_build(&theirs, &nix.build_root(), "paf");

    let t = TestStore::new();
    let drv = t.add_drv(
        spec("paf", PAF_SCRIPT)
            .env("foo", "hello 'x'\nline2 é")
            .env("bar", "")
            .env("baz", "keep")
            .env("passAsFile", "foo bar missing"),
    );
    let mut cfg = t.cfg.clone();
    cfg.cores = 3;
    let (outcome, _) = t.realise_with(&[&drv], &cfg);
    assert_eq!(outcome.exit_status, 0, "{:?}", outcome.failures);
    let ours = std::fs::read_to_string(t.real(&t.out(&drv))).unwrap();
    let ours = norm_build(&ours, &cfg.build_dir_root.display().to_string(), "paf");

    let (their_env, their_files) = theirs.split_once("@@\n").unwrap();
    let (our_env, our_files) = ours.split_once("@@\n").unwrap();
    // The file contents and the build directory's listing, byte for byte.
    assert_eq!(our_files, their_files);
    assert!(
        their_files.contains("hello 'x'\nline2 é@@\n@@\n"),
        "{their_files}"
    );
    let (their_env, our_env) = (parse_env(their_env), parse_env(our_env));
    assert_eq!(
        our_env.keys().collect::<Vec<_>>(),
        their_env.keys().collect::<Vec<_>>()
    );
    for k in ["fooPath", "barPath", "passAsFile", "baz", "NIX_BUILD_TOP"] {
        assert_eq!(our_env[k], their_env[k], "{k}");
    }
    assert!(!our_env.contains_key("foo") && !our_env.contains_key("missingPath"));
}

#[test]
fn structured_attrs_match_real_nix() {
    nixb_testsupport::require!(Nix);
    let oracle = tempfile::tempdir().unwrap();
    let nix = Nix::new(oracle.path());
    let (drv_path, outs) = nix.build(
        r#"derivation { name = "sa"; system = builtins.currentSystem; builder = "/bin/bash";
           __structuredAttrs = true; outputs = ["out" "dev"]; args = ["-c" (builtins.readFile ./script)];
           s = "it's \"q\" \\ \n\ttab é"; i = 42; neg = -7; big = 3000000000; f = 1.5; fw = 2.0;
           t = true; fa = false; n = null; l = ["a" 1 true]; ln = ["a" [1]]; el = [];
           a = { x = "1"; "y z" = 2; b = false; "it's" = null; }; an = { x = { y = 1; }; }; ea = {};
           "bad-name" = "v"; _ok9 = "u"; passAsFile = ["s"]; ctl = "\r"; }"#,
        SA_SCRIPT,
    );
    // The derivation's own __json, handed to ours unchanged.
    let shown = nix.run(
        "nix",
        &[
            "--extra-experimental-features",
            "nix-command",
            "show-derivation",
            &drv_path,
        ],
    );
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    let json = shown[&drv_path]["env"]["__json"]
        .as_str()
        .unwrap()
        .to_string();
    let (dev, out): (Vec<&String>, Vec<&String>) =
        outs.iter().partition(|o| o.ends_with("-sa-dev"));
    let (their_out, their_dev) = (out[0], dev[0]);
    let their_build = nix.build_root();
    let theirs = |f: &str| {
        let text = std::fs::read_to_string(format!("{their_out}/{f}")).unwrap();
        let text = text.replace(their_dev, "@dev").replace(their_out, "@out");
        let text = text.replace(&nix.store(), "@store");
        norm_build(&text, &their_build, "sa")
    };

    let t = TestStore::new();
    let drv = t.add_drv(
        spec("sa", SA_SCRIPT)
            .builder("/bin/bash")
            .outputs(&["out", "dev"])
            .env("__json", &json),
    );
    let mut cfg = t.cfg.clone();
    cfg.cores = 3;
    let (outcome, _) = t.realise_with(&[&drv], &cfg);
    assert_eq!(outcome.exit_status, 0, "{:?}", outcome.failures);
    let o = t.outputs(&drv);
    let (our_out, our_dev) = (t.print(&o["out"]), t.print(&o["dev"]));
    let our_build = cfg.build_dir_root.display().to_string();
    let ours = |f: &str| {
        let text = std::fs::read_to_string(format!("{our_out}/{f}")).unwrap();
        let text = text.replace(&our_dev, "@dev").replace(&our_out, "@out");
        let text = text.replace(t.dir().as_str(), "@store");
        norm_build(&text, &our_build, "sa")
    };

    assert_eq!(ours(".attrs.json"), theirs(".attrs.json"));
    assert_eq!(ours(".attrs.sh"), theirs(".attrs.sh"));
    assert_eq!(ours("ls"), theirs("ls"));
    // Independent checks of what the comparison relies on.
    let sh = theirs(".attrs.sh");
    assert!(sh.contains("declare big=-1294967296\n"), "{sh}");
    assert!(sh.contains("declare -A outputs=(['dev']='@dev' ['out']='@out' )\n"));
    assert!(!sh.contains("bad-name") && !sh.contains(" ln=") && !sh.contains(" f="));
    let (our_env, their_env) = (parse_env(&ours("env")), parse_env(&theirs("env")));
    assert_eq!(our_env, their_env);
    assert_eq!(their_env["NIX_ATTRS_SH_FILE"], "@build/.attrs.sh");
    assert!(!their_env.contains_key("s") && !their_env.contains_key("out"));
    // The dev output got the string through bash's reading of .attrs.sh.
    assert_eq!(
        std::fs::read_to_string(&our_dev).unwrap(),
        std::fs::read_to_string(their_dev).unwrap()
    );
}

// Exits on any failure (so an unset `outputs` cannot make it write outside its output), and
// copies out the files it got and its build directory's listing.
const GRAPH_SCRIPT: &str = "set -eu; . $NIX_ATTRS_SH_FILE; /bin/mkdir ${outputs[out]}; \
     /bin/cp $NIX_ATTRS_JSON_FILE $NIX_ATTRS_SH_FILE ${outputs[out]}/; \
     /bin/ls -a $NIX_BUILD_TOP > ${outputs[out]}/ls";

/// Structured derivations with `exportReferencesGraph`: `ok` exports a multi-path closure of
/// a derivation output, a text source and a directory source, a derivation (whose outputs,
/// one of them a second output, come along), a string, an object and null, and replaces an
/// ordinary attribute; the others are refused by Nix.
const GRAPH_EXPR: &str = r#"
let
  sys = builtins.currentSystem;
  src = builtins.toFile "src.txt" "hello";
  data = ./data;
  dep = derivation { name = "dep"; system = sys; builder = "/bin/sh";
    args = ["-c" "echo ${src} > $out"]; };
  dep2 = derivation { name = "dep2"; system = sys; builder = "/bin/sh";
    args = ["-c" "/bin/mkdir $out; echo ${dep} ${data} > $out/x"]; };
  multi = derivation { name = "multi"; system = sys; builder = "/bin/sh"; outputs = ["out" "lib"];
    args = ["-c" "echo ${dep} > $out; echo lib > $lib"]; };
  fresh = derivation { name = "fresh"; system = "none"; builder = "/bin/sh"; };
  mk = name: attrs: derivation ({ inherit name; system = sys; builder = "/bin/bash";
    __structuredAttrs = true; args = ["-c" (builtins.readFile ./script)]; } // attrs);
in {
  ok = mk "ok" { note = "replaced"; plain = "/tmp/not-a-store-path"; exportReferencesGraph = {
    graph = [ dep2 ]; drvs = [ multi.drvPath ]; srcs = [ data src ]; str = "${dep}/";
    obj = { a = multi.lib; }; none = null; note = [ src ]; }; };
  nonstore = mk "nonstore" { exportReferencesGraph.g = [ "/tmp/foo" ]; };
  inside = mk "inside" { exportReferencesGraph.g = [ "${dep2}/x" ]; };
  number = mk "number" { exportReferencesGraph.g = [ "${dep}" 1 ]; };
  notinput = mk "notinput" {
    exportReferencesGraph.g = [ (builtins.unsafeDiscardStringContext "${dep}") ]; };
  unbuilt = mk "unbuilt" {
    exportReferencesGraph.g = [ (builtins.unsafeDiscardOutputDependency fresh.drvPath) ]; };
  outputs = mk "outputs" { exportReferencesGraph.outputs = [ src ]; };
}
"#;

const GRAPH_CASES: [&str; 7] = [
    "ok", "nonstore", "inside", "number", "notinput", "unbuilt", "outputs",
];

#[test]
fn structured_references_graph_matches_real_nix() {
    use std::collections::{BTreeMap, BTreeSet};

    use nixb_goals::BuildStore;
    use nixb_store::derivation::Derivation;
    use nixb_store::StorePath;

    nixb_testsupport::require!(Nix);
    // Both engines use the same store directory, one after the other, so that paths, their
    // order and every hash in the files can be compared as they are.
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    std::fs::create_dir_all(root.join("data/sub")).unwrap();
    std::fs::write(root.join("data/sub/f"), "data file\n").unwrap();
    let nix = Nix::new(&root);
    let mut drvs = Vec::new();
    let mut theirs = BTreeMap::new();
    for case in GRAPH_CASES {
        let drv = nix.instantiate(GRAPH_EXPR, GRAPH_SCRIPT, Some(case));
        let result = nix.realise(&drv).map(|outs| {
            ["ls", ".attrs.json", ".attrs.sh"]
                .map(|f| std::fs::read_to_string(format!("{}/{f}", outs[0])).unwrap())
        });
        theirs.insert(case, result);
        drvs.push(drv);
    }
    // What the comparison relies on, checked on Nix's side alone.
    let ok = theirs["ok"].as_ref().unwrap();
    assert_eq!(ok[0], ".\n..\n.attrs.json\n.attrs.sh\n");
    for key in ["graph", "drvs", "srcs", "str", "obj", "none", "note"] {
        assert!(
            ok[1].contains(&format!(r#","{key}":["#)),
            "{key}: {}",
            ok[1]
        );
    }
    assert!(ok[1].contains(r#""ca":"fixed:r:sha256:"#) && ok[1].contains(r#""ca":"text:sha256:"#));
    assert!(ok[1].contains("-multi-lib\"") && ok[1].contains("\"closureSize\":"));
    assert!(!ok[2].contains("graph") && ok[2].contains("declare plain="));
    let exit = |case: &str| theirs[case].as_ref().err().map(|e| e.0);
    assert_eq!(exit("notinput"), Some(100));
    for case in ["nonstore", "inside", "number", "unbuilt", "outputs"] {
        assert_eq!(exit(case), Some(1), "{case}: {:?}", theirs[case]);
    }

    // Everything the derivations need, as Nix instantiated it, before its store goes.
    let closure = nix.run(
        "nix-store",
        &[
            &["-qR"][..],
            &drvs.iter().map(String::as_str).collect::<Vec<_>>(),
        ]
        .concat(),
    );
    let store_dir = nixb_store::StoreDir::new(nix.store()).unwrap();
    let mut texts = Vec::new();
    let mut derivations = BTreeMap::new();
    let mut sources = Vec::new();
    for line in closure.lines() {
        let p = store_dir.parse(line).unwrap();
        if p.is_derivation() {
            derivations.insert(
                p.clone(),
                Derivation::read(&store_dir, &store_dir.to_path(&p)).unwrap(),
            );
        } else if p.name() == "data" {
            sources.push(p);
        } else {
            texts.push((p.clone(), std::fs::read(store_dir.to_path(&p)).unwrap()));
        }
    }
    assert_eq!((sources.len(), texts.len()), (1, 1), "{closure}");
    for d in ["store", "state", "log", "tmp"] {
        remove_tree(&root.join(d));
    }

    let t = TestStore::at(tmp);
    assert_eq!(t.dir().as_str(), store_dir.as_str());
    for (p, contents) in &texts {
        let added = t
            .store
            .add_text_to_store(p.name(), contents, &BTreeSet::new())
            .unwrap();
        assert_eq!(&added, p);
    }
    let added = t.store.add_source("data", &root.join("data")).unwrap();
    assert_eq!(added, sources[0]);
    // Derivations after their inputs; each must land where Nix put it.
    let mut left = derivations;
    while !left.is_empty() {
        let ready: Vec<StorePath> = left
            .iter()
            .filter(|(_, d)| {
                d.input_drvs
                    .keys()
                    .all(|i| t.store.is_valid_path(i).unwrap())
            })
            .map(|(p, _)| p.clone())
            .collect();
        assert!(
            !ready.is_empty(),
            "derivations with unknown inputs: {:?}",
            left.keys()
        );
        for p in ready {
            let drv = left.remove(&p).unwrap();
            assert_eq!(t.store.add_derivation(&drv).unwrap(), p);
        }
    }
    for (case, drv) in GRAPH_CASES.iter().zip(&drvs) {
        let drv = store_dir.parse(drv).unwrap();
        let (outcome, _) = t.realise(&[&drv]);
        let ours = if outcome.exit_status == 0 {
            let out = t.print(&t.out(&drv));
            Ok(["ls", ".attrs.json", ".attrs.sh"]
                .map(|f| std::fs::read_to_string(format!("{out}/{f}")).unwrap()))
        } else {
            let failure = outcome
                .failures
                .iter()
                .find(|f| f.path == drv)
                .unwrap_or_else(|| panic!("{case}: {:?}", outcome.failures));
            Err((outcome.exit_status, failure.message.clone()))
        };
        assert_eq!(&ours, &theirs[case], "case {case}");
    }
}
