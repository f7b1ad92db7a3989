//! `passAsFile` and `__structuredAttrs`: the files and variables our builder gets, compared
//! byte for byte with what real Nix 2.8 gives the same builder (when `nix-store` is
//! installed; required under CI=true).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const PAF_SCRIPT: &str = "/usr/bin/env > $out; echo @@ >> $out; /bin/cat $fooPath >> $out; \
     echo @@ >> $out; /bin/cat $barPath >> $out; echo @@ >> $out; /bin/ls -a $NIX_BUILD_TOP >> $out";

// Sourcing .attrs.sh checks that bash accepts it; the files and the environment are copied out.
const SA_SCRIPT: &str = ". $NIX_ATTRS_SH_FILE; /bin/mkdir ${outputs[out]}; \
     /bin/cp $NIX_ATTRS_JSON_FILE $NIX_ATTRS_SH_FILE ${outputs[out]}/; \
     /usr/bin/env > ${outputs[out]}/env; /bin/ls -a $NIX_BUILD_TOP > ${outputs[out]}/ls; \
     echo $s > ${outputs[dev]}";

fn have_nix() -> bool {
    let ok = Command::new("nix-store")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "nix-store is required for this test under CI=true"
        );
        eprintln!("skipping: nix-store not installed");
    }
    ok
}

struct Nix {
    root: PathBuf,
}

impl Nix {
    fn new(root: &Path) -> Nix {
        for d in ["etc", "tmp"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(
            root.join("etc/nix.conf"),
            "sandbox = false\nbuild-users-group =\nsubstituters =\ncores = 3\n",
        )
        .unwrap();
        Nix {
            root: root.to_path_buf(),
        }
    }

    fn store(&self) -> String {
        self.root.join("store").display().to_string()
    }

    fn run(&self, cmd: &str, args: &[&str]) -> String {
        let r = &self.root;
        let o = Command::new(cmd)
            .args(args)
            .env("NIX_STORE_DIR", r.join("store"))
            .env("NIX_STATE_DIR", r.join("state"))
            .env("NIX_LOG_DIR", r.join("log"))
            .env("NIX_CONF_DIR", r.join("etc"))
            .env("TMPDIR", r.join("tmp"))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap().trim().to_string()
    }

    /// Instantiates `expr` (which may read the script from `./script`) and returns the
    /// derivation and its built outputs.
    fn build(&self, expr: &str, script: &str) -> (String, Vec<String>) {
        std::fs::write(self.root.join("script"), script).unwrap();
        let file = self.root.join("e.nix");
        std::fs::write(&file, expr).unwrap();
        let drv = self.run("nix-instantiate", &[file.to_str().unwrap()]);
        let outs = self.run("nix-store", &["-r", &drv]);
        (drv, outs.lines().map(str::to_string).collect())
    }
}

fn parse_env(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Replaces the build directory of derivation `name` (whatever its number) by `@build`.
fn norm_build(text: &str, build_root: &str, name: &str) -> String {
    let prefix = format!("{build_root}/nix-build-{name}.drv-");
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find(&prefix) {
        out.push_str(&rest[..i]);
        out.push_str("@build");
        rest = rest[i + prefix.len()..].trim_start_matches(|c: char| c.is_ascii_digit());
    }
    out.push_str(rest);
    out
}

#[test]
fn pass_as_file_matches_real_nix() {
    if !have_nix() {
        return;
    }
    let oracle = tempfile::tempdir().unwrap();
    let nix = Nix::new(oracle.path());
    let (_, outs) = nix.build(
        r#"derivation { name = "paf"; system = builtins.currentSystem; builder = "/bin/sh";
           args = ["-c" (builtins.readFile ./script)];
           foo = "hello 'x'\nline2 é"; bar = ""; baz = "keep"; passAsFile = ["foo" "bar" "missing"]; }"#,
        PAF_SCRIPT,
    );
    let theirs = std::fs::read_to_string(&outs[0]).unwrap();
    let theirs = norm_build(
        &theirs,
        &oracle.path().join("tmp").display().to_string(),
        "paf",
    );

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
    if !have_nix() {
        return;
    }
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
    let their_build = oracle.path().join("tmp").display().to_string();
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
