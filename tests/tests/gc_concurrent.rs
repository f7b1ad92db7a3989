//! Collections while builds and substitutions run, in loops, both ways round: `nixb gc`
//! and `nix-store --gc` while `nixb realise` and real `nix-store -r` build one pair of
//! chains and substitute another from a binary cache. The derivations are rooted (as
//! `nix-instantiate --add-root` does); their outputs are not, so every collection deletes
//! the previous round's outputs while the next round builds or substitutes them again. No
//! build or substitution may fail, and after the loops the store must verify clean.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nixb_tests::{run, run_str, TestStore};

const ROUNDS: usize = 4;

/// Four chains: two to build (`nixb`, `nix`), two to substitute (`sub-nixb`, `sub-nix`),
/// whose builders refuse to run once the file `$GC_TEST_NOBUILD` (read at instantiation)
/// exists, so that they can only come from the cache then.
const EXPR: &str = r#"
let
  nobuild = builtins.getEnv "GC_TEST_NOBUILD";
  mk = name: deps: derivation {
    inherit name deps;
    PATH = "/bin:/usr/bin";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    src = builtins.toFile "src-${name}" "source of ${name}";
    args = [ "-c" ''
      case $name in *sub-*) if test -e ${nobuild}; then echo must be substituted; exit 1; fi;; esac
      mkdir $out; cat $src > $out/file
      i=0; for d in $deps; do test -e $d/file; ln -s $d $out/dep$i; i=$((i+1)); done
    '' ];
  };
  chain = tag: let a = mk "a-${tag}" []; b = mk "b-${tag}" [ a ]; in mk "c-${tag}" [ a b ];
in [ (chain "nixb") (chain "nix") (chain "sub-nixb") (chain "sub-nix") ]
"#;

fn gc_loop(
    stop: Arc<AtomicBool>,
    mut gc: impl FnMut() -> Command + Send + 'static,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) {
            let out = gc().output().unwrap();
            assert!(out.status.success(), "collection failed: {out:?}");
            n += 1;
        }
        n
    })
}

fn verify_clean(t: &TestStore) {
    let out = run(
        t.nix("nix-store").args(["--verify", "--check-contents"]),
        None,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !err.contains("error"),
        "nix-store --verify --check-contents: {err}"
    );
}

#[test]
fn collections_during_builds_never_break_a_build() {
    nixb_testsupport::require!(Nix);
    let t = TestStore::with_conf("sandbox = false\nbuild-users-group =\nsubstituters =\n");
    let expr = t.file("chains.nix", EXPR);
    let roots = t.state_dir().join("gcroots");
    std::fs::create_dir_all(&roots).unwrap();
    let nobuild = t.root.path().join("nobuild");
    let drvs = run_str(
        t.nix("nix-instantiate")
            .env("GC_TEST_NOBUILD", &nobuild)
            .arg("--add-root")
            .arg(roots.join("drv"))
            .arg("--indirect")
            .arg(&expr),
        None,
    );
    let drvs: Vec<String> = drvs
        .lines()
        .map(|l| {
            std::fs::read_link(l)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| l.to_string())
        })
        .collect();
    assert_eq!(drvs.len(), 4, "{drvs:?}");
    // Builds go through the output of the last derivation of each chain.
    let (ours, theirs) = (drvs[0].clone(), drvs[1].clone());
    let (ours_sub, theirs_sub) = (drvs[2].clone(), drvs[3].clone());

    // The substituted chains, built once, go to a binary cache; from then on their
    // builders refuse to run.
    let cache = format!("file://{}", t.root.path().join("cache").display());
    for d in [&ours_sub, &theirs_sub] {
        let out = run_str(t.nix("nix-store").args(["-r", d]), None);
        let copy = run(
            t.nix("nix")
                .args([
                    "--extra-experimental-features",
                    "nix-command",
                    "copy",
                    "--to",
                ])
                .arg(&cache)
                .arg(out.trim()),
            None,
        );
        assert!(
            copy.status.success(),
            "nix copy: {}",
            String::from_utf8_lossy(&copy.stderr)
        );
    }
    std::fs::write(&nobuild, "").unwrap();
    let from_cache = [
        "--option",
        "substituters",
        cache.as_str(),
        "--option",
        "require-sigs",
        "false",
    ];

    for collector in ["nixb", "nix-store"] {
        let stop = Arc::new(AtomicBool::new(false));
        let gc = {
            let env = t.env();
            let bin = nixb_tests::nixb_binary();
            gc_loop(stop.clone(), move || {
                let mut c = if collector == "nixb" {
                    let mut c = Command::new(&bin);
                    c.arg("gc");
                    c
                } else {
                    let mut c = Command::new("nix-store");
                    c.arg("--gc");
                    c
                };
                c.envs(env.iter().map(|(k, v)| (*k, v.clone())));
                c
            })
        };
        for round in 0..ROUNDS {
            let out = run(t.nixb().args(["realise", &ours]), None);
            assert!(
                out.status.success(),
                "round {round} under {collector}: nixb realise failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let out = run(t.nix("nix-store").args(["-r", &theirs]), None);
            assert!(
                out.status.success(),
                "round {round} under {collector}: nix-store -r failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let out = run(
                t.nixb().arg("realise").args(from_cache).arg(&ours_sub),
                None,
            );
            assert!(
                out.status.success(),
                "round {round} under {collector}: nixb realise from the cache failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let out = run(
                t.nix("nix-store")
                    .arg("-r")
                    .args(from_cache)
                    .arg(&theirs_sub),
                None,
            );
            assert!(
                out.status.success(),
                "round {round} under {collector}: nix-store -r from the cache failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        stop.store(true, Ordering::SeqCst);
        let collections = gc.join().unwrap();
        assert!(collections > 0, "no collection ran alongside the builds");
        verify_clean(&t);
        // The rooted derivations are still there.
        for d in &drvs {
            assert!(
                PathBuf::from(d).exists(),
                "{d} was collected under {collector}"
            );
        }
    }
}
