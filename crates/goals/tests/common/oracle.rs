//! Real Nix as the oracle: `nix-store` and `nix-instantiate` run against a private store
//! under one directory (`store`, `state`, `log`, `etc/nix.conf`, `tmp` as TMPDIR), never the
//! host's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Nix {
    pub root: PathBuf,
    /// Variables set (`Some`) or removed (`None`) for every command.
    pub env: Vec<(String, Option<String>)>,
}

impl Nix {
    /// A private store under `root`: no sandbox, no build users, no substituters, 3 cores.
    pub fn new(root: &Path) -> Nix {
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
            env: Vec::new(),
        }
    }

    pub fn store(&self) -> String {
        self.root.join("store").display().to_string()
    }

    /// Nix's build directories are made here.
    pub fn build_root(&self) -> String {
        self.root.join("tmp").display().to_string()
    }

    /// Runs `cmd` against the private store, whatever its exit status.
    pub fn output(&self, cmd: &str, args: &[&str]) -> Output {
        let r = &self.root;
        let mut c = Command::new(cmd);
        c.args(args)
            .env("NIX_STORE_DIR", r.join("store"))
            .env("NIX_STATE_DIR", r.join("state"))
            .env("NIX_LOG_DIR", r.join("log"))
            .env("NIX_CONF_DIR", r.join("etc"))
            .env("TMPDIR", r.join("tmp"));
        for (k, v) in &self.env {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c.output().unwrap_or_else(|e| panic!("running {cmd}: {e}"))
    }

    /// Runs `cmd`, which must succeed, and returns its trimmed stdout.
    pub fn run(&self, cmd: &str, args: &[&str]) -> String {
        let o = self.output(cmd, args);
        assert!(
            o.status.success(),
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap().trim().to_string()
    }

    /// Writes `expr` to `e.nix` (and `script` to `./script`, for `builtins.readFile`) and
    /// instantiates it, or its attribute `attr`; returns the derivation path.
    pub fn instantiate(&self, expr: &str, script: &str, attr: Option<&str>) -> String {
        std::fs::write(self.root.join("script"), script).unwrap();
        let file = self.root.join("e.nix");
        std::fs::write(&file, expr).unwrap();
        let file = file.to_str().unwrap();
        match attr {
            Some(a) => self.run("nix-instantiate", &[file, "-A", a]),
            None => self.run("nix-instantiate", &[file]),
        }
    }

    /// Instantiates `expr` and realises it: the derivation and its built outputs.
    pub fn build(&self, expr: &str, script: &str) -> (String, Vec<String>) {
        let drv = self.instantiate(expr, script, None);
        let outs = self.run("nix-store", &["-r", &drv]);
        (drv, outs.lines().map(str::to_string).collect())
    }

    /// `nix-store -r drv`: the output paths, or the exit status and the message of the
    /// last `error: ` line.
    pub fn realise(&self, drv: &str) -> Result<Vec<String>, (i32, String)> {
        let o = self.output("nix-store", &["-r", drv]);
        if o.status.success() {
            let out = String::from_utf8(o.stdout).unwrap();
            return Ok(out.lines().map(str::to_string).collect());
        }
        let err = String::from_utf8_lossy(&o.stderr);
        let msg = err
            .lines()
            .filter_map(|l| l.strip_prefix("error: "))
            .next_back()
            .unwrap_or_else(|| panic!("nix-store -r {drv} failed without an error line: {err}"));
        Err((o.status.code().unwrap_or(-1), msg.to_string()))
    }
}

/// `env` output as a map (multi-line values keep their first line).
pub fn parse_env(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Replaces the build directory of derivation `name` (whatever its number) by `@build`.
pub fn norm_build(text: &str, build_root: &str, name: &str) -> String {
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
