//! **Test only.** A [`RemoteBuilder`] that runs a derivation's builder directly with
//! `std::process`, as the current user, with no sandbox, no build user and no
//! timeouts. It exists so the server can be exercised (by this crate's tests and by real
//! Nix clients in them) before the engine implements [`RemoteBuilder`]; it must never
//! serve real builds.
//!
//! What it does keep from a real build: the builder's environment is the derivation's
//! plus the variables every Nix builder gets, stale outputs are removed first, outputs
//! are scanned for references among the inputs' closure and the outputs themselves,
//! canonicalised, and registered together with the derivation as deriver.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};

use nixb_store::canon::{canonicalise_path_metadata, InodesSeen};
use nixb_store::derivation::Derivation;
use nixb_store::local_store::{LocalStore, ValidPathInfo};
use nixb_store::refscan::scan_path;
use nixb_store::{DerivedPath, StorePath};

use crate::import::remove_tree;
use crate::proto::{BuildOptions, BuildResult, BuildStatus};
use crate::server::RemoteBuilder;

/// See the module doc: unsandboxed, for tests only.
pub struct UnsandboxedBuilder {
    /// Where the builder's output goes.
    pub log: Box<dyn Write + Send>,
}

impl UnsandboxedBuilder {
    fn run(
        &mut self,
        store: &LocalStore,
        drv_path: &StorePath,
        drv: &Derivation,
    ) -> Result<(), (BuildStatus, String)> {
        let dir = store.store_dir();
        let fail = |s: BuildStatus| move |e: String| (s, e);
        let drv_name = dir.print(drv_path);
        for p in &drv.input_srcs {
            if !store
                .is_valid_path(p)
                .map_err(|e| e.to_string())
                .map_err(fail(BuildStatus::MiscFailure))?
            {
                return Err((
                    BuildStatus::MiscFailure,
                    format!("input '{}' of '{drv_name}' is not valid", dir.print(p)),
                ));
            }
        }
        let outputs: Vec<(String, StorePath)> = drv
            .outputs
            .iter()
            .map(|(n, o)| o.path.clone().map(|p| (n.clone(), p)))
            .collect::<Option<_>>()
            .ok_or((
                BuildStatus::MiscFailure,
                format!("'{drv_name}' has outputs without paths"),
            ))?;
        for (_, p) in &outputs {
            remove_tree(&dir.to_path(p)).map_err(|e| (BuildStatus::MiscFailure, e.to_string()))?;
        }
        let tmp = std::env::temp_dir().join(format!(
            "nixb-test-build-{}-{}",
            std::process::id(),
            drv_path.hash_part()
        ));
        let _ = remove_tree(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| (BuildStatus::MiscFailure, e.to_string()))?;
        let mut child = Command::new(&drv.builder)
            .args(&drv.args)
            .env_clear()
            .envs(&drv.env)
            .env("PATH", "/path-not-set")
            .env("HOME", "/homeless-shelter")
            .env("NIX_STORE", dir.as_str())
            .env("NIX_BUILD_CORES", "1")
            .env("NIX_BUILD_TOP", &tmp)
            .env("TMPDIR", &tmp)
            .env("TMP", &tmp)
            .env("TEMPDIR", &tmp)
            .env("TEMP", &tmp)
            .env("PWD", &tmp)
            .current_dir(&tmp)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                (
                    BuildStatus::MiscFailure,
                    format!("executing '{}': {e}", drv.builder),
                )
            })?;
        // Both streams into the one log (stderr after stdout: a test log needs no
        // interleaving).
        let mut out = child.stdout.take();
        let mut err = child.stderr.take();
        let mut buf = Vec::new();
        let t = std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(e) = err.as_mut() {
                let _ = std::io::Read::read_to_end(e, &mut v);
            }
            v
        });
        if let Some(o) = out.as_mut() {
            let _ = std::io::Read::read_to_end(o, &mut buf);
        }
        let errbuf = t.join().unwrap_or_default();
        let _ = self.log.write_all(&buf);
        let _ = self.log.write_all(&errbuf);
        let _ = self.log.flush();
        let status = child
            .wait()
            .map_err(|e| (BuildStatus::MiscFailure, e.to_string()))?;
        let _ = remove_tree(&tmp);
        if !status.success() {
            return Err((
                BuildStatus::PermanentFailure,
                format!(
                    "builder for '{drv_name}' failed with exit code {}",
                    status.code().unwrap_or(-1)
                ),
            ));
        }
        let inputs = store
            .compute_closure(&drv.input_srcs)
            .map_err(|e| (BuildStatus::MiscFailure, e.to_string()))?;
        let mut candidates: BTreeSet<StorePath> = inputs;
        candidates.extend(outputs.iter().map(|(_, p)| p.clone()));
        let mut infos = Vec::new();
        for (name, p) in &outputs {
            let real = dir.to_path(p);
            if std::fs::symlink_metadata(&real).is_err() {
                return Err((
                    BuildStatus::PermanentFailure,
                    format!(
                        "builder for '{drv_name}' failed to produce output '{name}' at '{}'",
                        dir.print(p)
                    ),
                ));
            }
            canonicalise_path_metadata(&real, None, &mut InodesSeen::new())
                .map_err(|e| (BuildStatus::MiscFailure, e.to_string()))?;
            let scan = scan_path(&real, &candidates)
                .map_err(|e| (BuildStatus::MiscFailure, e.to_string()))?;
            let mut info = ValidPathInfo::new(p.clone(), scan.nar_hash, scan.nar_size);
            info.references = scan.references;
            info.deriver = Some(drv_path.clone());
            info.ultimate = true;
            infos.push(info);
        }
        store
            .register_valid_paths(&infos)
            .map_err(|e| (BuildStatus::MiscFailure, e.to_string()))
    }
}

impl RemoteBuilder for UnsandboxedBuilder {
    fn build_derivation(
        &mut self,
        store: &LocalStore,
        drv_path: &StorePath,
        drv: &Derivation,
        _options: &BuildOptions,
    ) -> BuildResult {
        BuildResult::of_build(|| self.run(store, drv_path, drv))
    }

    fn build_paths(
        &mut self,
        store: &LocalStore,
        paths: &[DerivedPath],
        _options: &BuildOptions,
    ) -> Result<(), (BuildStatus, String)> {
        for p in paths {
            match p {
                DerivedPath::Opaque(p) => {
                    if !store
                        .is_valid_path(p)
                        .map_err(|e| (BuildStatus::MiscFailure, e.to_string()))?
                    {
                        return Err((
                            BuildStatus::MiscFailure,
                            format!("path '{}' is not valid", store.store_dir().print(p)),
                        ));
                    }
                }
                DerivedPath::Built { drv, .. } => {
                    let d = store
                        .read_derivation(drv)
                        .map_err(|e| (BuildStatus::MiscFailure, e.to_string()))?;
                    if !d.input_drvs.is_empty() {
                        return Err((
                            BuildStatus::MiscFailure,
                            "the test builder builds no dependency graphs".into(),
                        ));
                    }
                    let all_valid = d
                        .output_paths()
                        .values()
                        .all(|o| store.is_valid_path(o).unwrap_or(false));
                    if !all_valid {
                        self.run(store, drv, &d)?;
                    }
                }
            }
        }
        Ok(())
    }
}
