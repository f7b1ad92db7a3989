//! The builder's exact environment, compared with what real Nix 2.8 gives the same
//! builder (when `nix-store` is installed; required under CI=true).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::oracle::*;
use common::*;

const SCRIPT: &str = "/usr/bin/env > $out";

/// Our builder's environment for a derivation named `envdump`.
fn nixb_env(t: &TestStore, fixed: bool) -> BTreeMap<String, String> {
    let mut s = spec("envdump", SCRIPT).env("impureEnvVars", "FOO_IMPURE BAR_MISSING");
    if fixed {
        // The output is fixed ("x"); the environment goes to the build log.
        s = spec("envdump", "/usr/bin/env >&2; echo -n x > $out")
            .env("impureEnvVars", "FOO_IMPURE BAR_MISSING")
            // As nix-instantiate puts them into the environment.
            .env("outputHashMode", "flat")
            .env("outputHashAlgo", "sha256")
            .env(
                "outputHash",
                "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881",
            )
            .fixed(
                false,
                nixb_store::Hash::digest(nixb_store::HashAlgo::Sha256, b"x"),
            );
    }
    let drv = t.add_drv(s);
    let mut cfg = t.cfg.clone();
    cfg.cores = 3;
    cfg.impure_env = BTreeMap::from([("FOO_IMPURE".to_string(), "xyz".to_string())]);
    let (outcome, events) = t.realise_with(&[&drv], &cfg);
    assert_eq!(outcome.exit_status, 0, "{:?}", outcome.failures);
    if fixed {
        parse_env(&log_of(&events, &drv))
    } else {
        parse_env(&std::fs::read_to_string(t.real(&t.out(&drv))).unwrap())
    }
}

#[test]
fn environment_is_exactly_the_documented_one() {
    let t = TestStore::new();
    let env = nixb_env(&t, false);
    let keys: Vec<&str> = env.keys().map(String::as_str).collect();
    // build.cc's startBuilder plus Nix 2.x's NIX_LOG_FD and TERM, and the derivation's own
    // variables (name, builder, system, out, impureEnvVars).
    assert_eq!(
        keys,
        [
            "HOME",
            "NIX_BUILD_CORES",
            "NIX_BUILD_TOP",
            "NIX_LOG_FD",
            "NIX_STORE",
            "PATH",
            "PWD",
            "TEMP",
            "TEMPDIR",
            "TERM",
            "TMP",
            "TMPDIR",
            "builder",
            "impureEnvVars",
            "name",
            "out",
            "system"
        ]
    );
    assert_eq!(env["PATH"], "/path-not-set");
    assert_eq!(env["HOME"], "/homeless-shelter");
    assert_eq!(env["NIX_STORE"], t.dir().as_str());
    assert_eq!(env["NIX_BUILD_CORES"], "3");
    assert_eq!(env["NIX_LOG_FD"], "2");
    let top = &env["NIX_BUILD_TOP"];
    let prefix = format!("{}/nix-build-envdump.drv-", t.cfg.build_dir_root.display());
    assert!(top.starts_with(&prefix), "{top}");
    for k in ["TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"] {
        assert_eq!(&env[k], top, "{k}");
    }

    let t2 = TestStore::new();
    let fixed = nixb_env(&t2, true);
    assert_eq!(fixed["NIX_OUTPUT_CHECKED"], "1");
    assert_eq!(fixed["FOO_IMPURE"], "xyz");
    assert_eq!(fixed["BAR_MISSING"], "");
}

/// Runs real Nix on the same derivation in a private store and returns the environment its
/// builder saw, with that store's dir and Nix's build dir.
fn nix_env(root: &Path, fixed: bool) -> (BTreeMap<String, String>, String) {
    let mut nix = Nix::new(root);
    nix.env = vec![
        ("FOO_IMPURE".into(), Some("xyz".into())),
        ("BAR_MISSING".into(), None),
    ];
    let expr = if fixed {
        r#"derivation { name = "envdump"; system = builtins.currentSystem; builder = "/bin/sh";
           args = ["-c" "/usr/bin/env >&2; echo -n x > $out"]; impureEnvVars = ["FOO_IMPURE" "BAR_MISSING"];
           outputHashMode = "flat"; outputHashAlgo = "sha256";
           outputHash = "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"; }"#
    } else {
        r#"derivation { name = "envdump"; system = builtins.currentSystem; builder = "/bin/sh";
           args = ["-c" "/usr/bin/env > $out"]; impureEnvVars = ["FOO_IMPURE" "BAR_MISSING"]; }"#
    };
    let (drv, outs) = nix.build(expr, "");
    let text = if fixed {
        nix.run("nix-store", &["-l", &drv])
    } else {
        std::fs::read_to_string(&outs[0]).unwrap()
    };
    (parse_env(&text), nix.store())
}

#[test]
fn environment_matches_real_nix() {
    nixb_testsupport::require!(Nix);
    for fixed in [false, true] {
        let oracle_dir = tempfile::tempdir().unwrap();
        let (theirs, their_store) = nix_env(oracle_dir.path(), fixed);
        let t = TestStore::new();
        let ours = nixb_env(&t, fixed);
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>(),
            "fixed-output: {fixed}"
        );
        for (k, v) in &theirs {
            // Values differ only where they name the store or the build directory.
            let norm_theirs = v
                .replace(&their_store, "@store")
                .replace("nix-build-envdump.drv-0", "@build");
            let norm_ours = ours[k].replace(t.dir().as_str(), "@store");
            let norm_ours = match norm_ours.rfind("nix-build-envdump.drv-") {
                Some(_) if k != "out" => "@build".to_string(),
                _ => norm_ours,
            };
            let norm_theirs = if norm_theirs.ends_with("@build") {
                "@build".to_string()
            } else {
                norm_theirs
            };
            if k == "out" {
                // Output paths depend on the store dir; check the shape only.
                assert!(norm_ours.starts_with("@store/") && norm_theirs.starts_with("@store/"));
                continue;
            }
            assert_eq!(
                norm_ours, norm_theirs,
                "variable {k} (fixed-output: {fixed})"
            );
        }
    }
}
