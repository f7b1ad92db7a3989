//! Checking and registering the outputs of a finished build (the original's
//! `registerOutputs`).
//!
//! For each output the builder had to produce, in order:
//!
//! ```text
//! exists?                       else "failed to produce output path"
//! not group/world-writable      else "suspicious ownership or permission"
//! hash rewriting (check/repair) canonicalise first, so a rewrite cannot follow a planted link
//! fixed-output hash             flat: a non-executable regular file's hash; recursive: NAR hash
//! canonicalise metadata         mtime 1, modes 0444/0555, owner
//! scan                          NAR hash, size, references among inputs and outputs
//! --check: compare NAR hash     with the registered one ("may not be deterministic")
//! ```
//!
//! then the reference restrictions, auto-optimise, and one transaction registering all
//! outputs with the derivation as deriver.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nixb_store::{Encoding, StorePath};

use crate::config::BuildMode;
use crate::error::{quoted, Rejection};
use crate::event::{FailureKind, Level};
use crate::refcheck;
use crate::services::Step;

use super::build::RunningBuild;
use super::plan::BuildPlan;
use crate::store::NewOutput;

fn misc(context: String) -> impl FnOnce(String) -> Rejection {
    move |e| Rejection::misc(format!("{context}: {e}"))
}

/// Moves `tmp` over `path` ([`nixb_store::delete::replace_path`]).
fn replace_valid_path(path: &Path, tmp: &Path) -> Result<(), Rejection> {
    nixb_store::delete::replace_path(path, tmp).map_err(|e| {
        misc(format!(
            "replacing '{}' by '{}'",
            path.display(),
            tmp.display()
        ))(e.to_string())
    })
}

pub(crate) fn register_outputs(
    g: &BuildPlan,
    build: &mut RunningBuild,
    cx: &mut Step<'_>,
) -> Result<(), Rejection> {
    let sd = cx.store_dir().clone();
    let drv = g
        .drv
        .as_ref()
        .ok_or_else(|| Rejection::misc("internal error: derivation not loaded".into()))?;
    let drv_q = quoted(&sd, &g.drv_path);
    let from_tmp = RunningBuild::rewriter(&build.rewrites_from_tmp)?;
    let mut infos: Vec<NewOutput> = Vec::new();

    for (name, path) in g.outputs.clone() {
        if !g.missing_paths.contains(&path) {
            continue;
        }
        let real = sd.to_path(&path);
        let redirected = build.redirected.get(&path).map(|p| sd.to_path(p));
        let mut actual = real.clone();
        if let Some(r) = &redirected {
            if g.mode == BuildMode::Repair
                && build.redirected_bad.contains(&path)
                && r.symlink_metadata().is_ok()
            {
                replace_valid_path(&real, r)?;
            }
            if g.mode == BuildMode::Check {
                actual = r.clone();
            }
        }

        let st = match actual.symlink_metadata() {
            Ok(st) => st,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Rejection::build(
                    FailureKind::BuilderFailed,
                    format!(
                        "builder for {drv_q} failed to produce output path {}",
                        quoted(&sd, &path)
                    ),
                ))
            }
            Err(e) => {
                return Err(misc(format!(
                    "getting attributes of path '{}'",
                    actual.display()
                ))(e.to_string()))
            }
        };
        nixb_store::canon::check_suspicious(&actual, None)
            .map_err(|e| Rejection::build(FailureKind::BuilderFailed, e.to_string()))?;

        if !from_tmp.is_empty() {
            cx.message(
                Level::Warn,
                format!("rewriting hashes in '{}'; cross fingers", actual.display()),
            );
            nixb_store::canon::canonicalise_path_metadata(&actual, None, &mut build.inodes_seen)
                .map_err(|e| Rejection::build(FailureKind::BuilderFailed, e.to_string()))?;
            nixb_hashrewrite::rewrite_tree(&actual, &from_tmp).map_err(|e| {
                misc(format!("rewriting hashes in '{}'", actual.display()))(e.to_string())
            })?;
            // The rewrite touched files (mtimes, inodes): canonicalise them afresh.
            build.inodes_seen = nixb_store::canon::InodesSeen::new();
        }

        let fixed = drv.outputs.get(&name).and_then(|o| o.fixed.clone());
        if let Some(f) = &fixed {
            if !f.recursive && (!st.file_type().is_file() || st.permissions().mode() & 0o100 != 0) {
                return Err(Rejection::build(
                    FailureKind::BuilderFailed,
                    format!(
                        "output path {} should be a non-executable regular file since recursive hashing is not enabled (outputHashMode=flat)",
                        quoted(&sd, &path)
                    ),
                ));
            }
            let got = if f.recursive {
                nixb_store::nar::hash_path(&actual, f.hash.algo()).map(|(h, _)| h)
            } else {
                nixb_store::nar::hash_file_flat(&actual, f.hash.algo())
            }
            .map_err(|e| misc(format!("hashing '{}'", actual.display()))(e.to_string()))?;
            if got != f.hash {
                return Err(Rejection::build(
                    FailureKind::HashMismatch,
                    format!(
                        "hash mismatch in fixed-output derivation {drv_q}:\n  specified: {}\n     got:    {}",
                        f.hash.encode(Encoding::Sri),
                        got.encode(Encoding::Sri)
                    ),
                ));
            }
        }

        nixb_store::canon::canonicalise_path_metadata(&actual, None, &mut build.inodes_seen)
            .map_err(|e| Rejection::build(FailureKind::BuilderFailed, e.to_string()))?;

        let scan = nixb_store::refscan::scan_path(&actual, &g.all_paths).map_err(|e| {
            misc(format!("scanning '{}' for references", actual.display()))(e.to_string())
        })?;

        if g.mode == BuildMode::Check {
            let info = cx.store.query_path_info(&path)?.ok_or_else(|| {
                Rejection::misc(format!("path {} is not valid", quoted(&sd, &path)))
            })?;
            if info.nar_hash != scan.nar_hash {
                return Err(Rejection {
                    kind: FailureKind::NotDeterministic,
                    message: format!(
                        "derivation {drv_q} may not be deterministic: output {} differs",
                        quoted(&sd, &path)
                    ),
                    permanent: false,
                });
            }
            continue;
        }

        let ca = fixed.as_ref().map(|f| {
            format!(
                "fixed:{}{}",
                if f.recursive { "r:" } else { "" },
                f.hash.to_base32_typed()
            )
        });
        infos.push(NewOutput {
            path: path.clone(),
            nar_hash: scan.nar_hash,
            nar_size: scan.nar_size,
            references: scan.references,
            deriver: g.drv_path.clone(),
            ca,
        });
    }

    if g.mode == BuildMode::Check {
        return Ok(());
    }

    // Reference restrictions, with closures over what is registered plus the new outputs.
    let new_refs: BTreeMap<StorePath, BTreeSet<StorePath>> = infos
        .iter()
        .map(|i| (i.path.clone(), i.references.clone()))
        .collect();
    let outputs = g.outputs.to_map();
    for info in &infos {
        let closure = || closure_with(cx, &new_refs, &info.path);
        refcheck::check_output(
            &sd,
            &drv.env,
            &outputs,
            &info.path,
            &info.references,
            &closure,
        )
        .map_err(|e| Rejection::build(FailureKind::BuilderFailed, e.to_string()))?;
    }

    if cx.cfg.auto_optimise {
        let mut seen = nixb_store::canon::InodesSeen::new();
        for info in &infos {
            if let Err(e) = nixb_store::optimise::optimise_path(
                sd.as_path(),
                &sd.to_path(&info.path),
                &mut seen,
            ) {
                cx.message(
                    Level::Warn,
                    format!("optimising {}: {e}", quoted(&sd, &info.path)),
                );
            }
        }
    }

    cx.store.register_outputs(&infos)?;
    Ok(())
}

/// The closure of `start`, following the fresh outputs' scanned references and the
/// database for everything else. Errors yield what was found so far (the check then
/// errs on the strict side only for paths it could see).
fn closure_with(
    cx: &Step<'_>,
    new_refs: &BTreeMap<StorePath, BTreeSet<StorePath>>,
    start: &StorePath,
) -> BTreeSet<StorePath> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![start.clone()];
    let mut old = BTreeSet::new();
    while let Some(p) = todo.pop() {
        if !seen.insert(p.clone()) {
            continue;
        }
        match new_refs.get(&p) {
            Some(refs) => todo.extend(refs.iter().cloned()),
            None => {
                old.insert(p);
            }
        }
    }
    if !old.is_empty() {
        if let Ok(c) = cx.store.compute_closure(&old) {
            seen.extend(c);
        }
    }
    seen
}
