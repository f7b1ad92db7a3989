//! Builders that Nix runs inside its own process (`builder = "builtin:<name>"`):
//! `builtin:buildenv` (user environments for `nix-env`), `builtin:fetchurl`
//! (`<nix/fetchurl.nix>`) and `builtin:unpack-channel` (`<nix/unpack-channel.nix>`, the
//! channel tarballs of `nix-channel --update`).
//!
//! nixb runs them in a nixb executable started as the builder (`<exe> __nixb-builtin
//! <name>`, see [`WorkerConfig::builtin_builder`](crate::WorkerConfig)), so a builtin build
//! gets the build's user, directory, log, timeouts and cgroup like any other. It runs outside
//! the chroot (the executable and its libraries are not in it); what the chroot would have
//! promised is checked by the goal before the start instead: every path a builtin is asked
//! to read is an input of the derivation ([`paths_read`]).
//!
//! A derivation of a builtin builder has the platform `builtin` and builds on any machine.

pub mod buildenv;
pub mod fetchurl;
pub mod unpack_channel;

use std::collections::BTreeMap;

/// The first argument by which a nixb executable runs a builtin builder.
pub const BUILTIN_ARG: &str = "__nixb-builtin";

const PREFIX: &str = "builtin:";

/// The builtin builders nixb has.
pub const KNOWN: &[&str] = &["buildenv", "fetchurl", "unpack-channel"];

/// `Some(name)` when `builder` is `builtin:<name>`.
pub fn builtin_name(builder: &str) -> Option<&str> {
    builder.strip_prefix(PREFIX)
}

/// The store paths (as written in the environment) that the builtin `name` reads, for the
/// goal to check against the derivation's inputs; `Err` names what is malformed.
pub fn paths_read(name: &str, env: &BTreeMap<String, String>) -> Result<Vec<String>, String> {
    match name {
        "buildenv" => Ok(buildenv::parse_derivations(attr(env, "derivations")?)?
            .into_iter()
            .map(|p| p.path)
            .collect()),
        "unpack-channel" => Ok(vec![attr(env, "src")?.to_owned()]),
        _ => Ok(Vec::new()),
    }
}

fn attr<'a>(env: &'a BTreeMap<String, String>, name: &str) -> Result<&'a str, String> {
    env.get(name)
        .map(String::as_str)
        .ok_or_else(|| format!("attribute '{name}' missing"))
}

/// The builder process: runs the builtin `name` on this process's environment (the
/// derivation's). A failure is printed to stderr, which is the build log, as `error: …`,
/// and the exit code is 1.
pub fn main(name: Option<&str>) -> u8 {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let result = match name {
        Some("buildenv") => buildenv::run(&env),
        Some("fetchurl") => fetchurl::run(&env),
        Some("unpack-channel") => unpack_channel::run(&env),
        Some(other) => Err(format!("unsupported builtin builder '{other}'")),
        None => Err(format!(
            "'{BUILTIN_ARG}' needs the name of a builtin builder ({})",
            KNOWN.join(", ")
        )),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}
