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

use anyhow::{bail, Result};

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
