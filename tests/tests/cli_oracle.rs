//! The foundations, checked through the `nixb` command line against real Nix 2.8 on one
//! private store: NAR dumps, `add`, `derivation add`, queries, verification.

use std::os::unix::fs::PermissionsExt;

use nixb_tests::{run, run_ok, run_str, TestStore};

/// A small tree with every node type NAR knows.
fn make_tree(t: &TestStore) -> std::path::PathBuf {
    let root = t.root.path().join("files/tree");
    std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
    std::fs::write(root.join("a file"), "hello\n").unwrap();
    std::fs::write(root.join("sub/run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(
        root.join("sub/run.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(root.join("sub/deeper/empty"), "").unwrap();
    std::os::unix::fs::symlink("../a file", root.join("sub/link")).unwrap();
    std::os::unix::fs::symlink("/does/not/exist", root.join("dangling")).unwrap();
    root
}

#[test]
fn dump_is_byte_identical_to_nix_store_dump() {
    nixb_testsupport::require!(Nix);
    let t = TestStore::new();
    let tree = make_tree(&t);
    let ours = run_ok(t.nixb().arg("dump").arg(&tree), None);
    let theirs = run_ok(t.nix("nix-store").arg("--dump").arg(&tree), None);
    assert!(
        ours == theirs,
        "nixb dump differs from nix-store --dump ({} vs {} bytes)",
        ours.len(),
        theirs.len()
    );
    // And it restores to a tree that dumps the same.
    let dest = t.root.path().join("restored");
    run_ok(t.nixb().arg("restore").arg(&dest), Some(&theirs));
    assert!(run_ok(t.nix("nix-store").arg("--dump").arg(&dest), None) == theirs);
}

#[test]
fn hash_path_agrees_with_nix_hash_path_in_every_encoding() {
    nixb_testsupport::require!(Nix);
    let t = TestStore::new();
    let tree = make_tree(&t);
    for (flag, nixflag) in [
        ("--sri", "--sri"),
        ("--base32", "--base32"),
        ("--base16", "--base16"),
        ("--base64", "--base64"),
    ] {
        for algo in ["sha256", "sha1", "sha512", "md5"] {
            let ours = run_str(
                t.nixb()
                    .args(["hash", "path", "--type", algo, flag])
                    .arg(&tree),
                None,
            );
            let theirs = run_str(
                t.nix("nix")
                    .args(["hash", "path", "--type", algo, nixflag])
                    .arg(&tree),
                None,
            );
            assert_eq!(ours, theirs, "{algo} {flag}");
        }
    }
    let file = tree.join("a file");
    let ours = run_str(t.nixb().args(["hash", "file", "--base32"]).arg(&file), None);
    let theirs = run_str(
        t.nix("nix").args(["hash", "file", "--base32"]).arg(&file),
        None,
    );
    assert_eq!(ours, theirs);
}

#[test]
fn add_gives_the_path_nix_store_add_gives_and_nix_accepts_it() {
    nixb_testsupport::require!(Nix);
    let ours_store = TestStore::new();
    let theirs_store = TestStore::new();
    // Same content, different temp roots: copy one tree into both.
    let tree = make_tree(&ours_store);
    let file = ours_store.file("single.txt", "just a file\n");
    for src in [&tree, &file] {
        let ours = run_str(ours_store.nixb().arg("add").arg(src), None);
        let theirs = run_str(theirs_store.nix("nix-store").arg("--add").arg(src), None);
        // Store dirs differ, so compare base names... and the full path against a Nix add
        // into *our* store below.
        let base = |p: &str| p.rsplit('/').next().unwrap().to_string();
        assert_ne!(base(&ours), "");
        let theirs_in_ours = run_str(ours_store.nix("nix-store").arg("--add").arg(src), None);
        assert_eq!(
            ours, theirs_in_ours,
            "nix-store --add into the same store gives another path"
        );
        assert_eq!(base(&ours).len(), base(&theirs).len());
        // Real Nix reads what nixb registered.
        let h = run_str(
            ours_store
                .nix("nix-store")
                .args(["-q", "--hash"])
                .arg(&ours),
            None,
        );
        let h_ours = run_str(ours_store.nixb().args(["query", "--hash"]).arg(&ours), None);
        assert_eq!(h, h_ours);
    }
    let verify = run(
        ours_store
            .nix("nix-store")
            .args(["--verify", "--check-contents"]),
        None,
    );
    assert!(
        verify.status.success(),
        "nix-store --verify failed: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        !String::from_utf8_lossy(&verify.stderr).contains("error"),
        "nix-store --verify complained: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
}

const NIX_EXPR: &str = r#"
let
  src = builtins.toFile "builder.sh" "echo building; echo $msg > $out";
  dep = derivation {
    name = "dep";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-e" src ];
    msg = "quotes \" backslash \\ tab \t newline \n dollar $ unicode ✓";
  };
in derivation {
  name = "top";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-e" src ];
  outputs = [ "out" "dev" ];
  inherit dep;
  msg = "top";
}
"#;

#[test]
fn derivation_add_from_nix_json_reproduces_nix_instantiate() {
    nixb_testsupport::require!(Nix);
    let nix_side = TestStore::new();
    let expr = nix_side.file("top.nix", NIX_EXPR);
    let drv = run_str(nix_side.nix("nix-instantiate").arg(&expr), None);
    let drv = drv.lines().last().unwrap().to_string();
    let json = run_ok(
        nix_side
            .nix("nix")
            .args(["show-derivation", "-r"])
            .arg(&drv),
        None,
    );
    let all: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&json).unwrap();

    // Let real Nix forget the derivations (the toFile source stays valid), then have nixb
    // add each one again (dependencies first) from Nix's JSON.
    let expected: std::collections::BTreeMap<String, Vec<u8>> = all
        .keys()
        .map(|k| (k.clone(), std::fs::read(k).unwrap()))
        .collect();
    run_ok(
        nix_side.nix("nix-store").arg("--delete").args(all.keys()),
        None,
    );
    for k in all.keys() {
        assert!(
            !std::path::Path::new(k).exists(),
            "{k} survived nix-store --delete"
        );
    }
    let mut order: Vec<&String> = all.keys().collect();
    order.sort_by_key(|k| !k.ends_with("-dep.drv")); // dep before top
    for key in order {
        let expected_bytes = &expected[key];
        let one = serde_json::json!({ key.clone(): all[key].clone() });
        let printed = run_str(
            nix_side.nixb().args(["derivation", "add"]),
            Some(one.to_string().as_bytes()),
        );
        assert_eq!(
            &printed, key,
            "nixb derivation add gives another path than nix-instantiate"
        );
        assert!(
            &std::fs::read(key).unwrap() == expected_bytes,
            "{key}: bytes differ from nix-instantiate's"
        );
        let shown = run_ok(nix_side.nixb().args(["derivation", "show"]).arg(key), None);
        let shown: serde_json::Value = serde_json::from_slice(&shown).unwrap();
        assert_eq!(
            shown[key.as_str()],
            all[key],
            "nixb derivation show differs from nix show-derivation"
        );
    }
    // Real Nix still sees a consistent store and the drv's outputs through nixb.
    let ours = run_str(nix_side.nixb().args(["query", "--outputs"]).arg(&drv), None);
    let theirs = run_str(
        nix_side
            .nix("nix-store")
            .args(["-q", "--outputs"])
            .arg(&drv),
        None,
    );
    let mut a: Vec<_> = ours.lines().collect();
    let mut b: Vec<_> = theirs.lines().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    let refs = run_str(
        nix_side
            .nix("nix-store")
            .args(["-q", "--references"])
            .arg(&drv),
        None,
    );
    let refs_ours = run_str(
        nix_side.nixb().args(["query", "--references"]).arg(&drv),
        None,
    );
    let mut a: Vec<_> = refs.lines().collect();
    let mut b: Vec<_> = refs_ours.lines().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    let verify = run(
        nix_side
            .nix("nix-store")
            .args(["--verify", "--check-contents"]),
        None,
    );
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
}

#[test]
fn nixb_reads_what_real_nix_registered() {
    nixb_testsupport::require!(Nix);
    let t = TestStore::new();
    let tree = make_tree(&t);
    let p = run_str(t.nix("nix-store").arg("--add").arg(&tree), None);
    for q in [
        "--hash",
        "--size",
        "--references",
        "--requisites",
        "--deriver",
    ] {
        let ours = run_str(t.nixb().args(["query", q]).arg(&p), None);
        let theirs = run_str(t.nix("nix-store").args(["-q", q]).arg(&p), None);
        assert_eq!(ours, theirs, "query {q}");
    }
    let ok = run(t.nixb().args(["verify", "--check-contents"]), None);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[test]
fn errors_are_clear_and_exit_1() {
    let t = TestStore::new();
    let out = run(
        t.nixb().args(["query", "--hash", "/not/in/the/store"]),
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains("/not/in/the/store"), "{err}");
    let out = run(t.nixb().args(["derivation", "add"]), Some(b"{ not json"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("JSON"));
}

/// `requiredSystemFeatures` against `system-features`, as real Nix 2.8 decides it: a missing
/// feature is an error (exit 1, the same message), `extra-system-features` adds one, and
/// `__structuredAttrs` derivations name their features as a list.
#[test]
fn required_system_features_are_checked_as_nix_checks_them() {
    nixb_testsupport::require!(Nix);
    let t = TestStore::with_conf(
        "sandbox = false\nbuild-users-group =\nsubstituters =\nsystem-features = benchmark\n",
    );
    let expr = t.file(
        "features.nix",
        r#"let mk = name: attrs: derivation ({
             inherit name; system = builtins.currentSystem; builder = "/bin/sh";
             args = [ "-c" "echo ok > $out" ]; requiredSystemFeatures = [ "foo" "benchmark" ];
           } // attrs);
           in [ (mk "plain" {}) (mk "structured" {
             __structuredAttrs = true; builder = "/bin/bash";
             args = [ "-c" "source .attrs.sh; echo ok > \${outputs[out]}" ];
           }) ]"#,
    );
    let drvs = run_str(t.nix("nix-instantiate").arg(&expr), None);
    for drv in drvs.lines() {
        let theirs = run(t.nix("nix-store").args(["-r", drv]), None);
        assert_eq!(theirs.status.code(), Some(1), "{theirs:?}");
        let theirs_err = String::from_utf8_lossy(&theirs.stderr);
        let expected = theirs_err
            .lines()
            .find_map(|l| l.strip_prefix("error: "))
            .unwrap_or_else(|| panic!("no error line from nix-store -r: {theirs_err}"));
        assert!(expected.contains("{benchmark, foo}"), "{expected}");
        let ours = run(t.nixb().args(["realise", drv]), None);
        let ours_err = String::from_utf8_lossy(&ours.stderr);
        assert_eq!(ours.status.code(), Some(1), "{ours_err}");
        assert!(
            ours_err.contains(expected),
            "nixb's error differs from Nix's\n  nix:  {expected}\n  nixb: {ours_err}"
        );
        let built = run(
            t.nixb()
                .args(["realise", "--option", "extra-system-features", "foo", drv]),
            None,
        );
        assert_eq!(
            built.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&built.stderr)
        );
        let out = String::from_utf8_lossy(&built.stdout);
        assert_eq!(std::fs::read_to_string(out.trim()).unwrap(), "ok\n");
    }
}

/// A build that no machine of `builders` can take and the local machine cannot do either:
/// nixb reports the derivation, what it requires and every machine considered, in the
/// words and layout of Nix 2.8's build hook, and ends (with --max-jobs 0) with Nix's
/// reason; without builders, with Nix's other reason.
#[test]
fn a_build_no_machine_can_take_names_the_features_and_machines() {
    nixb_testsupport::require!(Nix);
    let t = TestStore::with_conf("sandbox = false\nbuild-users-group =\nsubstituters =\n");
    let expr = t.file(
        "kvm.nix",
        r#"derivation { name = "needs-foo"; system = builtins.currentSystem; builder = "/bin/sh";
             args = [ "-c" "echo ok > $out" ]; requiredSystemFeatures = [ "foo" "bar" ]; }"#,
    );
    let drv = run_str(t.nix("nix-instantiate").arg(&expr), None);
    let system = format!("{}-linux", std::env::consts::ARCH);
    let machines = format!("ssh://nohost {system} - 3 1 kvm,big");
    let errors = |out: &std::process::Output| -> Vec<String> {
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .map(|l| l.trim_end_matches('.').to_owned())
            .collect()
    };
    for max_jobs in ["0", "1"] {
        let theirs = run(
            t.nix("nix-store")
                .args(["-r", &drv, "--builders", &machines, "--max-jobs", max_jobs]),
            None,
        );
        let ours = run(
            t.nixb()
                .args(["realise", &drv, "--option", "builders", &machines])
                .args(["--max-jobs", max_jobs]),
            None,
        );
        assert_eq!(theirs.status.code(), Some(1), "{theirs:?}");
        assert_eq!(ours.status.code(), Some(1), "{ours:?}");
        let (theirs, ours) = (errors(&theirs), errors(&ours));
        // Nix's block, from its first line to the last machine line.
        let start = theirs
            .iter()
            .position(|l| l == "Failed to find a machine for remote build!")
            .unwrap_or_else(|| panic!("no machine report from Nix: {theirs:#?}"));
        let block = &theirs[start..start + 6];
        assert!(block[5].starts_with('('), "{block:#?}");
        let at = ours
            .iter()
            .position(|l| l.ends_with(&block[0]))
            .unwrap_or_else(|| panic!("no machine report from nixb: {ours:#?}"));
        for (i, want) in block.iter().enumerate().skip(1) {
            assert!(
                ours[at + i].ends_with(want.as_str()),
                "{ours:#?}\nwant {want}"
            );
        }
        let their_error = theirs.iter().find(|l| l.starts_with("error: ")).unwrap();
        assert!(
            ours.contains(their_error),
            "Nix: {their_error}\nnixb: {ours:#?}"
        );
    }
    let theirs = run(
        t.nix("nix-store").args(["-r", &drv, "--max-jobs", "0"]),
        None,
    );
    let ours = run(t.nixb().args(["realise", &drv, "--max-jobs", "0"]), None);
    let their_error = errors(&theirs)
        .into_iter()
        .find(|l| l.starts_with("error: "))
        .unwrap();
    assert!(
        errors(&ours).contains(&their_error),
        "{ours:?}\nwant {their_error}"
    );
}
