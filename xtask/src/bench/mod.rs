//! `cargo xtask bench [GROUP...]`: each group measures nixb side by side with the reference
//! tool in one run and prints ratios. Nothing here asserts a time.

mod daemon;
mod engine;
mod gc;
mod protocol;
mod sandbox;
mod store;
mod substitute;
mod tuning;

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

type Group = (&'static str, fn() -> Result<()>);

const GROUPS: &[Group] = &[
    ("engine", engine::run),
    ("daemon", daemon::run),
    ("protocol", protocol::run),
    ("gc", gc::run),
    ("sandbox", sandbox::run),
    ("store", store::run),
    ("substitute", substitute::run),
    ("tuning", tuning::run),
];

pub fn run(args: &[String]) -> Result<()> {
    for a in args {
        if !GROUPS.iter().any(|(n, _)| n == a) {
            let names: Vec<_> = GROUPS.iter().map(|(n, _)| *n).collect();
            bail!("unknown bench group '{a}' (known: {})", names.join(", "));
        }
    }
    for (name, f) in GROUPS {
        // `tuning` mounts file systems and takes many minutes: only when named.
        let by_default = *name != "tuning";
        if (args.is_empty() && by_default) || args.iter().any(|a| a == name) {
            eprintln!("== bench {name} ==");
            f()?;
        }
    }
    Ok(())
}

/// Points `c` at a private store under `root`, as every group makes them: Nix's
/// variables for the store, state, log and configuration directories, and a home of its
/// own. Callers add what their tools need besides.
pub(crate) fn store_env(c: &mut Command, root: &Path) {
    for (k, d) in [
        ("NIX_STORE_DIR", "store"),
        ("NIX_STATE_DIR", "state"),
        ("NIX_LOG_DIR", "log"),
        ("NIX_CONF_DIR", "etc"),
        ("HOME", "home"),
    ] {
        c.env(k, root.join(d));
    }
}

/// Runs `c` to its end; an error with its standard error when it fails. Its standard
/// output is captured unless the caller sent it elsewhere.
pub(crate) fn run_checked(c: &mut Command) -> Result<()> {
    let out = c
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {c:?}"))?;
    if !out.status.success() {
        bail!(
            "{c:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `c` (a `nix-instantiate` with its arguments) and returns what it printed.
pub(crate) fn instantiate(c: &mut Command) -> Result<String> {
    let out = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .context("running nix-instantiate")?;
    if !out.status.success() {
        bail!(
            "nix-instantiate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The median (the upper one of an even count).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A whole number from the environment variable `var`, `default` when it is unset.
pub(crate) fn env_number(var: &str, default: usize) -> Result<usize> {
    match std::env::var(var) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{var}={v}: not a number")),
        Err(_) => Ok(default),
    }
}

/// A Nix expression of `layers` layers of 25 trivial derivations (one fork+exec of
/// `/bin/sh` each, writing a small file), each node depending on 3 nodes of the layer
/// below; node names start with `tag`. With `top`, one more derivation depends on the
/// last layer and the expression is that derivation; without, it is the last layer.
pub(crate) fn layered_graph(tag: &str, layers: usize, top: bool) -> String {
    let last = if top {
        "mk \"top\" (layer (layers - 1))"
    } else {
        "layer (layers - 1)"
    };
    format!(
        r#"let
  mk = name: deps: derivation {{
    inherit name deps; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" "echo $name > $out" ]; }};
  mod = a: b: a - b * (builtins.div a b);
  width = 25; layers = {layers};
  layer = l: if l == 0 then builtins.genList (i: mk "{tag}l0n${{toString i}}" [ ]) width
    else let below = layer (l - 1); in
      builtins.genList (i: mk "{tag}l${{toString l}}n${{toString i}}" [
        (builtins.elemAt below i)
        (builtins.elemAt below (mod (i * 7 + 3) width))
        (builtins.elemAt below (mod (i * 13 + 5) width))
      ]) width;
in {last}
"#
    )
}
