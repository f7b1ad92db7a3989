//! `cargo xtask lint`: the hygiene checks `cargo xtask test` runs before any test.
//!
//! - `cargo fmt --all --check`: every file formatted;
//! - `cargo clippy --workspace --all-targets -- -D warnings`, with the workspace's lint table
//!   (`[workspace.lints]` in the root `Cargo.toml`, which denies
//!   `clippy::undocumented_unsafe_blocks`);
//! - no unused dependency (below).
//!
//! The unused-dependency check is ours rather than `cargo-udeps` (which needs a nightly
//! compiler) or `cargo-machete` (one more tool to compile on every CI run): it is the same
//! textual test those make, in a page of code. A dependency counts as used when its crate
//! name appears as a path root (`name::`, `use name`, `extern crate name`) in the files
//! that can use it: `src/` for a normal dependency, any Rust file of the package for a
//! dev-dependency, `build.rs` for a build dependency. A normal dependency used only by
//! tests is reported too: it belongs under `[dev-dependencies]`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

pub fn run(_args: &[String]) -> Result<()> {
    let root = crate::workspace_root();
    let cargo = |args: &[&str]| -> Result<()> {
        eprintln!("xtask lint: cargo {}", args.join(" "));
        let status = Command::new(env!("CARGO"))
            .current_dir(&root)
            .args(args)
            .status()
            .with_context(|| format!("running cargo {}", args.join(" ")))?;
        if !status.success() {
            bail!("cargo {} failed", args.join(" "));
        }
        Ok(())
    };
    cargo(&["fmt", "--all", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--quiet",
        "--",
        "-D",
        "warnings",
    ])?;
    eprintln!("xtask lint: unused dependencies");
    let unused = unused_dependencies(&root)?;
    if !unused.is_empty() {
        for u in &unused {
            eprintln!("  {u}");
        }
        bail!(
            "{} unused dependenc{} (remove {}, or move a test-only one to [dev-dependencies])",
            unused.len(),
            if unused.len() == 1 { "y" } else { "ies" },
            if unused.len() == 1 { "it" } else { "them" }
        );
    }
    Ok(())
}

/// `<manifest>: <section> '<name>' is not used` for every unused dependency.
pub fn unused_dependencies(root: &Path) -> Result<Vec<String>> {
    let out = Command::new(env!("CARGO"))
        .current_dir(root)
        .args(["metadata", "--format-version", "1", "--filter-platform"])
        .arg(host_triple())
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing cargo metadata's output")?;
    let packages = meta["packages"].as_array().context("metadata: packages")?;
    // Library crate name of every package, by package name (`md-5` is `md5`).
    let mut lib_names: BTreeMap<&str, String> = BTreeMap::new();
    for p in packages {
        let name = p["name"].as_str().unwrap_or_default();
        let lib = p["targets"].as_array().into_iter().flatten().find(|t| {
            t["kind"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|k| matches!(k.as_str(), Some("lib" | "rlib" | "proc-macro")))
        });
        if let Some(lib) = lib {
            lib_names.insert(name, lib["name"].as_str().unwrap_or(name).replace('-', "_"));
        }
    }
    let members: Vec<&str> = meta["workspace_members"]
        .as_array()
        .context("metadata: workspace_members")?
        .iter()
        .filter_map(|m| m.as_str())
        .collect();
    let mut unused = Vec::new();
    for p in packages {
        if !members.contains(&p["id"].as_str().unwrap_or_default()) {
            continue;
        }
        let manifest = PathBuf::from(p["manifest_path"].as_str().unwrap_or_default());
        let dir = manifest.parent().unwrap_or(Path::new("."));
        let src = read_rust_files(&dir.join("src"))?;
        let all = read_rust_files(dir)?;
        let build = std::fs::read_to_string(dir.join("build.rs")).unwrap_or_default();
        for d in p["dependencies"].as_array().into_iter().flatten() {
            let name = d["name"].as_str().unwrap_or_default();
            let ident = match d["rename"].as_str() {
                Some(r) => r.replace('-', "_"),
                None => lib_names
                    .get(name)
                    .cloned()
                    .unwrap_or_else(|| name.replace('-', "_")),
            };
            let (section, text) = match d["kind"].as_str() {
                Some("dev") => ("dev-dependency", &all),
                Some("build") => ("build-dependency", &build),
                _ => ("dependency", &src),
            };
            if !mentions_crate(text, &ident) {
                unused.push(format!(
                    "{}: {section} '{name}' is not used",
                    manifest.strip_prefix(root).unwrap_or(&manifest).display()
                ));
            }
        }
    }
    Ok(unused)
}

/// The target triple rustc builds for here (dependencies of other platforms are left out
/// of the metadata, so that it needs no download of crates this machine never builds).
fn host_triple() -> String {
    Command::new("rustc")
        .arg("-vV")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        })
        .unwrap_or_else(|| "x86_64-unknown-linux-gnu".to_owned())
}

/// Every `.rs` file below `dir` (not below a `target` directory), concatenated.
fn read_rust_files(dir: &Path) -> Result<String> {
    let mut text = String::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", d.display())),
        };
        for e in entries {
            let e = e.with_context(|| format!("reading {}", d.display()))?;
            let path = e.path();
            let ty = e.file_type()?;
            if ty.is_dir() && e.file_name() != "target" {
                stack.push(path);
            } else if ty.is_file() && path.extension().is_some_and(|x| x == "rs") {
                let source = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                for line in source.lines() {
                    text.push_str(without_comment(line));
                    text.push('\n');
                }
            }
        }
    }
    Ok(text)
}

/// `line` without a trailing `//` comment (doc comments included, which may name a crate
/// in prose). A `//` right after a non-space, as in `http://`, is not taken for one.
fn without_comment(line: &str) -> &str {
    let mut from = 0;
    while let Some(i) = line[from..].find("//") {
        let at = from + i;
        if line[..at]
            .chars()
            .next_back()
            .is_none_or(char::is_whitespace)
        {
            return &line[..at];
        }
        from = at + 2;
    }
    line
}

/// Whether `text` uses crate `ident` as a path root: `ident::`, `use ident` or
/// `extern crate ident`, not preceded by an identifier character (`my_nix::` is not `nix`).
fn mentions_crate(text: &str, ident: &str) -> bool {
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    text.match_indices(ident).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = &text[at + ident.len()..];
        if before.is_some_and(is_ident) {
            return false;
        }
        if after.starts_with("::") {
            // `a::nix::b` names a module of some other crate, not the crate.
            return !text[..at].ends_with("::");
        }
        let ends_word = !after.chars().next().is_some_and(is_ident);
        let head = text[..at].trim_end();
        ends_word && (head.ends_with("use") || head.ends_with("extern crate"))
    })
}

#[cfg(test)]
mod tests {
    use super::{mentions_crate, without_comment};

    #[test]
    fn comments_are_cut_but_urls_are_not() {
        assert_eq!(without_comment("//! see memchr::memmem"), "");
        assert_eq!(without_comment("let x = 1; // nix::foo"), "let x = 1; ");
        assert_eq!(
            without_comment("let u = \"http://x\"; // y"),
            "let u = \"http://x\"; "
        );
    }

    #[test]
    fn path_roots_count_and_lookalikes_do_not() {
        assert!(mentions_crate("let x = nix::unistd::getpid();", "nix"));
        assert!(mentions_crate("use nix;", "nix"));
        assert!(mentions_crate("use nix::{a, b};", "nix"));
        assert!(mentions_crate("extern crate libc;", "libc"));
        assert!(!mentions_crate("let x = my_nix::f();", "nix"));
        assert!(!mentions_crate("let x = crate::nix::f();", "nix"));
        assert!(!mentions_crate("// nix is great", "nix"));
        assert!(!mentions_crate("use nixb_store::StorePath;", "nix"));
        assert!(!mentions_crate("fn use_serde() {}", "serde"));
    }
}
