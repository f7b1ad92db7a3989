//! Building what the VM runs: `nixb` and the test executables, found through cargo's JSON
//! messages rather than guessed from file names.
//!
//! VM tests follow one convention: a package that has VM tests declares a cargo feature
//! `vm`, and its VM test targets (`tests/vm_*.rs`) carry `required-features = ["vm"]`, with
//! test functions named `vm_*`. A host `cargo test` therefore neither builds nor lists them;
//! here each such package is built once more with `--features vm`. Every other workspace
//! test executable is also considered, and any of them that lists a test containing the
//! filter (default `vm_`) runs in the VM too.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub struct Workspace {
    pub root: PathBuf,
    pub target_dir: PathBuf,
    /// Names of workspace packages that declare a `vm` feature.
    pub vm_packages: Vec<String>,
    /// Package id -> manifest directory.
    pub package_dirs: BTreeMap<String, PathBuf>,
}

pub struct TestExe {
    pub path: PathBuf,
    pub package_dir: PathBuf,
    /// The test target's name (`vm_security` for `tests/vm_security.rs`).
    pub name: String,
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

pub fn workspace() -> Result<Workspace> {
    let out = cargo()
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .current_dir(crate::workspace_root())
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata failed");
    }
    let meta: Value = serde_json::from_slice(&out.stdout).context("parsing cargo metadata")?;
    let s = |v: &Value| v.as_str().map(PathBuf::from);
    let root = s(&meta["workspace_root"]).context("cargo metadata: no workspace_root")?;
    let target_dir = s(&meta["target_directory"]).context("cargo metadata: no target_directory")?;
    let mut vm_packages = Vec::new();
    let mut package_dirs = BTreeMap::new();
    for p in meta["packages"].as_array().into_iter().flatten() {
        let (Some(name), Some(id), Some(manifest)) = (
            p["name"].as_str(),
            p["id"].as_str(),
            p["manifest_path"].as_str(),
        ) else {
            continue;
        };
        if p["features"].get("vm").is_some() {
            vm_packages.push(name.to_string());
        }
        if let Some(dir) = Path::new(manifest).parent() {
            package_dirs.insert(id.to_string(), dir.to_path_buf());
        }
    }
    Ok(Workspace {
        root,
        target_dir,
        vm_packages,
        package_dirs,
    })
}

/// An executable cargo reported: (package id, path, is a test harness).
struct Artifact {
    package_id: String,
    path: PathBuf,
    test: bool,
    bin_name: String,
}

fn cargo_json(args: &[&str], root: &Path) -> Result<Vec<Artifact>> {
    eprintln!("xtask test-vm: cargo {}", args.join(" "));
    let out = cargo()
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("cargo {} failed", args.join(" "));
    }
    let mut found = Vec::new();
    for line in out.stdout.split(|&b| b == b'\n') {
        let Ok(msg) = serde_json::from_slice::<Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        found.push(Artifact {
            package_id: msg["package_id"].as_str().unwrap_or_default().to_string(),
            path: PathBuf::from(exe),
            test: msg["profile"]["test"].as_bool().unwrap_or(false),
            bin_name: msg["target"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        });
    }
    Ok(found)
}

/// Builds `nixb` and returns its path.
pub fn build_nixb(ws: &Workspace) -> Result<PathBuf> {
    let arts = cargo_json(&["build", "-p", "nixb-cli", "--bin", "nixb"], &ws.root)?;
    arts.into_iter()
        .find(|a| !a.test && a.bin_name == "nixb")
        .map(|a| a.path)
        .context("cargo build reported no nixb executable")
}

/// Builds the test executables of `only` (every workspace package but xtask when empty),
/// VM-featured packages with `--features vm`.
pub fn build_tests(ws: &Workspace, only: &[String]) -> Result<Vec<TestExe>> {
    let mut arts = Vec::new();
    for p in &ws.vm_packages {
        if only.is_empty() || only.contains(p) {
            arts.extend(cargo_json(
                &["test", "--no-run", "-p", p, "--features", "vm"],
                &ws.root,
            )?);
        }
    }
    if only.is_empty() {
        let mut args = vec!["test", "--no-run", "--workspace", "--exclude", "xtask"];
        for p in &ws.vm_packages {
            args.extend(["--exclude", p.as_str()]);
        }
        arts.extend(cargo_json(&args, &ws.root)?);
    } else {
        let rest: Vec<&String> = only
            .iter()
            .filter(|p| !ws.vm_packages.contains(p))
            .collect();
        if !rest.is_empty() {
            let mut args = vec!["test", "--no-run"];
            for p in rest {
                args.extend(["-p", p.as_str()]);
            }
            arts.extend(cargo_json(&args, &ws.root)?);
        }
    }
    let mut exes = Vec::new();
    for a in arts.into_iter().filter(|a| a.test) {
        let package_dir = ws
            .package_dirs
            .get(&a.package_id)
            .cloned()
            .unwrap_or_else(|| ws.root.clone());
        if !exes.iter().any(|e: &TestExe| e.path == a.path) {
            exes.push(TestExe {
                path: a.path,
                package_dir,
                name: a.bin_name,
            });
        }
    }
    Ok(exes)
}

/// Does the test executable have a test whose name contains `filter`? Listing runs nothing.
pub fn has_tests_matching(exe: &Path, filter: &str) -> Result<bool> {
    let out = Command::new(exe)
        .args([filter, "--list", "--format", "terse"])
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("listing the tests of {}", exe.display()))?;
    if !out.status.success() {
        bail!(
            "listing the tests of {} failed ({})",
            exe.display(),
            out.status
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.ends_with(": test")))
}
