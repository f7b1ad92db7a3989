//! Collections while builds run, in loops, both ways round: `nixb gc` while `nixb realise`
//! and real `nix-store -r` build, and `nix-store --gc` while `nixb realise` builds. The
//! derivations are rooted (as `nix-instantiate --add-root` does); their outputs are not, so
//! every collection deletes the previous round's outputs while the next round builds them
//! again. No build may fail, and after the loops the store must verify clean.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nixb_tests::{run, run_str, TestStore};

const ROUNDS: usize = 4;

const EXPR: &str = r#"
let
  mk = name: deps: derivation {
    inherit name deps;
    PATH = "/bin:/usr/bin";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    src = builtins.toFile "src-${name}" "source of ${name}";
    args = [ "-c" ''
      mkdir $out; cat $src > $out/file
      i=0; for d in $deps; do test -e $d/file; ln -s $d $out/dep$i; i=$((i+1)); done
    '' ];
  };
  chain = tag: let a = mk "a-${tag}" []; b = mk "b-${tag}" [ a ]; in mk "c-${tag}" [ a b ];
in [ (chain "nixb") (chain "nix") ]
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
    let drvs = run_str(
        t.nix("nix-instantiate")
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
    assert_eq!(drvs.len(), 2, "{drvs:?}");
    // Builds go through the output of the last derivation of each chain.
    let (ours, theirs) = (drvs[0].clone(), drvs[1].clone());

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
