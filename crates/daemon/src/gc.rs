//! The collector's operations, as Nix 2.8's daemon answers them: `FindRoots` (censored
//! for a client that is not trusted), `CollectGarbage` for every allowed client (ignoring
//! liveness is refused to all), `AddPermRoot` (trusted only, as in later Nix),
//! `OptimiseStore`, and `AddSignatures` (trusted only). The collector's progress reaches
//! the client as Nix's informational lines.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use nixb_gc::{GcAction, GcEvent, GcOptions, RootDirs};
use nixb_protocol::types::{GcAction as WireGcAction, GcOptions as WireGcOptions, GcResults};
use nixb_protocol::{ServerConnection, StderrFrame};
use nixb_store::StorePath;

use crate::connection::Session;
use crate::error::{DaemonError, Result};

/// Nix's `lvlInfo`: the level of the lines below.
const LVL_INFO: u64 = 3;

fn mib(bytes: f64) -> String {
    format!("{:.2} MiB", bytes / (1024.0 * 1024.0))
}

/// Nix's `canonPath` of an absolute path, without following symlinks.
fn canon(p: &str) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in Path::new(p).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

impl Session<'_> {
    /// A line the client prints on stderr, when its verbosity shows Nix's info level.
    pub(crate) fn info<R: Read, W: Write>(
        &self,
        conn: &mut ServerConnection<R, W>,
        line: &str,
    ) -> Result<()> {
        if self.verbosity >= LVL_INFO {
            conn.frame(&StderrFrame::Next(format!("{line}\n").into_bytes()))?;
        }
        Ok(())
    }

    fn root_dirs(&self) -> RootDirs {
        let config = self.daemon.store().config();
        RootDirs::new(config.store_dir.clone(), config.state_dir.clone())
    }

    /// `FindRoots`: every root and what makes it one; runtime and temporary roots are
    /// censored for a client that is not trusted.
    pub(crate) fn find_roots(&self) -> Result<Vec<(String, StorePath)>> {
        let store = self.daemon.store();
        let mut is_valid = |p: &StorePath| Ok(store.is_valid_path(p)?);
        let roots = nixb_gc::find_roots(&self.root_dirs(), !self.trusted, &mut is_valid)?;
        Ok(roots
            .into_iter()
            .flat_map(|(p, links)| links.into_iter().map(move |l| (l, p.clone())))
            .collect())
    }

    /// `CollectGarbage`.
    pub(crate) fn collect_garbage<R: Read, W: Write>(
        &mut self,
        conn: &mut ServerConnection<R, W>,
        wire: &WireGcOptions,
    ) -> Result<GcResults> {
        if wire.ignore_liveness {
            return Err(DaemonError::Refused(
                "you are not allowed to ignore liveness".into(),
            ));
        }
        let action = match wire.action {
            WireGcAction::ReturnLive => GcAction::ReturnLive,
            WireGcAction::ReturnDead => GcAction::ReturnDead,
            WireGcAction::DeleteDead => GcAction::DeleteDead,
            WireGcAction::DeleteSpecific => GcAction::DeleteSpecific(wire.paths_to_delete.clone()),
        };
        let deleting = matches!(action, GcAction::DeleteDead | GcAction::DeleteSpecific(_));
        let specific = matches!(action, GcAction::DeleteSpecific(_));
        let mut opts = GcOptions::new(action);
        opts.max_freed = wire.max_freed;
        opts.keep_outputs = self.daemon.config().gc.keep_outputs;
        opts.keep_derivations = self.daemon.config().gc.keep_derivations;

        let mut pruned = false;
        let mut sent: Result<()> = Ok(());
        let verbose = self.verbosity >= LVL_INFO;
        let max_freed = wire.max_freed;
        let result = {
            let mut say = |line: String| {
                if verbose && sent.is_ok() {
                    sent = conn
                        .frame(&StderrFrame::Next(format!("{line}\n").into_bytes()))
                        .map_err(DaemonError::from);
                }
            };
            nixb_gc::collect_garbage(self.daemon.store(), &opts, &mut |e| match e {
                GcEvent::WaitingForLock => {
                    say("waiting for the big garbage collector lock...".into())
                }
                GcEvent::FindingRoots => say("finding garbage collector roots...".into()),
                GcEvent::Determined { .. } if !specific && max_freed > 0 => say(if deleting {
                    "deleting garbage...".into()
                } else {
                    "determining live/dead paths...".into()
                }),
                GcEvent::Deleted { path, .. } => say(format!("deleting '{path}'")),
                GcEvent::LimitReached { max_freed } => {
                    say(format!("deleted more than {max_freed} bytes; stopping"))
                }
                GcEvent::PruningLinks => {
                    pruned = true;
                    say("deleting unused links...".into())
                }
                _ => {}
            })
        };
        sent?;
        let results = match result {
            Ok(r) => r,
            Err(nixb_gc::GcError::StillAlive { path }) => {
                return Err(DaemonError::Refused(format!(
                    "Cannot delete path '{path}' since it is still alive. To find out why, \
                     use: nix-store --query --roots"
                )))
            }
            Err(e) => return Err(e.into()),
        };
        if pruned {
            let saved = self.links_saving()?;
            self.info(
                conn,
                &format!("note: currently hard linking saves {saved:.2} MiB"),
            )?;
        }
        Ok(GcResults {
            paths: results.paths,
            bytes_freed: results.bytes_freed,
        })
    }

    /// What hard links to `.links` save now, in MiB, as Nix reckons it after pruning:
    /// the extra links' sizes, less the shared copies and the directory itself.
    fn links_saving(&self) -> Result<f64> {
        let links = self.daemon.store().store_dir().as_path().join(".links");
        let io = |step: &'static str, p: &Path| {
            let path = p.display().to_string();
            move |source| DaemonError::Io { step, path, source }
        };
        // A Nix store always has `.links` (Nix makes it when it opens the store), and its
        // own size counts in the figure.
        std::fs::create_dir_all(&links).map_err(io("creating", &links))?;
        let entries = std::fs::read_dir(&links).map_err(io("opening directory", &links))?;
        let (mut actual, mut unshared) = (0i64, 0i64);
        for e in entries {
            let e = e.map_err(io("reading directory", &links))?;
            let m = match std::fs::symlink_metadata(e.path()) {
                Ok(m) => m,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => return Err(io("getting attributes of", &e.path())(err)),
            };
            if m.nlink() != 1 {
                actual += m.size() as i64;
                unshared += (m.nlink() as i64 - 1) * m.size() as i64;
            }
        }
        let overhead = std::fs::metadata(&links)
            .map_err(io("statting", &links))?
            .blocks() as i64
            * 512;
        Ok((unshared - actual - overhead) as f64 / (1024.0 * 1024.0))
    }

    /// `AddPermRoot`: a symlink `gc_root` to `path`, registered as an indirect root.
    pub(crate) fn add_perm_root(&mut self, path: &StorePath, gc_root: &str) -> Result<String> {
        if !self.trusted {
            return Err(DaemonError::Refused(
                "you are not privileged to create perm roots\n\nhint: you can just do this \
                 client-side without special privileges, and probably want to do that instead."
                    .into(),
            ));
        }
        if !gc_root.starts_with('/') {
            return Err(DaemonError::Refused(format!(
                "garbage collector root '{gc_root}' is not an absolute path"
            )));
        }
        let root = canon(gc_root);
        let root_s = root.to_string_lossy().into_owned();
        let store_dir = self.dir().clone();
        let in_store = |p: &str| {
            p.strip_prefix(store_dir.as_str())
                .is_some_and(|rest| rest.len() > 1 && rest.starts_with('/'))
        };
        if in_store(&root_s) {
            return Err(DaemonError::Refused(format!(
                "creating a garbage collector root ({root_s}) in the Nix store is forbidden \
                 (are you running nix-build inside the store?)"
            )));
        }
        self.add_temp_root(path)?;
        // An existing link into the store is replaced; anything else is left alone.
        if let Ok(m) = std::fs::symlink_metadata(&root) {
            let into_store = m.file_type().is_symlink()
                && std::fs::read_link(&root).is_ok_and(|t| in_store(&t.to_string_lossy()));
            if !into_store {
                return Err(DaemonError::Refused(format!(
                    "cannot create symlink '{root_s}'; already exists"
                )));
            }
        }
        let dir = root.parent().unwrap_or(Path::new("/"));
        let tmp = dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            root.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(store_dir.print(path), &tmp).map_err(|source| {
            DaemonError::Io {
                step: "creating symlink",
                path: tmp.display().to_string(),
                source,
            }
        })?;
        std::fs::rename(&tmp, &root).map_err(|source| {
            let _ = std::fs::remove_file(&tmp);
            DaemonError::Io {
                step: "creating symlink",
                path: root_s.clone(),
                source,
            }
        })?;
        self.add_indirect_root(&root_s)?;
        Ok(root_s)
    }

    /// `OptimiseStore`: every valid path hard-linked to `.links`, each protected by a
    /// temporary root while it is done.
    pub(crate) fn optimise_store<R: Read, W: Write>(
        &mut self,
        conn: &mut ServerConnection<R, W>,
    ) -> Result<()> {
        let store = self.daemon.store();
        let store_path = store.store_dir().as_path().to_path_buf();
        let paths = store.query_all_valid_paths()?;
        let mut seen = nixb_store::optimise::load_links_inodes(&store_path)?;
        let mut stats = nixb_store::optimise::OptimiseStats::default();
        for p in &paths {
            self.add_temp_root(p)?;
            // Collected meanwhile.
            if !store.is_valid_path(p)? {
                continue;
            }
            let file = store.store_dir().to_path(p);
            stats += nixb_store::optimise::optimise_path(&store_path, &file, &mut seen)?;
        }
        self.info(
            conn,
            &format!(
                "{} freed by hard-linking {} files",
                mib(stats.bytes_freed as f64),
                stats.files_linked
            ),
        )
    }

    /// `AddSignatures`: merged into the path's signatures (a sorted set, as Nix keeps it).
    pub(crate) fn add_signatures(&self, path: &StorePath, sigs: &BTreeSet<String>) -> Result<()> {
        if !self.trusted {
            return Err(DaemonError::Refused(
                "you are not privileged to add signatures".into(),
            ));
        }
        let printed = self.dir().print(path);
        let store = self.daemon.store();
        let found = store.with_db(|db| {
            db.transaction("adding signatures", |db| {
                let Some(mut row) = db.path_row(&printed)? else {
                    return Ok(false);
                };
                let mut all: BTreeSet<String> = row
                    .sigs
                    .as_deref()
                    .unwrap_or("")
                    .split_ascii_whitespace()
                    .map(String::from)
                    .collect();
                all.extend(sigs.iter().cloned());
                row.sigs = (!all.is_empty()).then(|| all.into_iter().collect::<Vec<_>>().join(" "));
                db.update_path(&row)?;
                Ok::<bool, nixb_store::db::DbError>(true)
            })
        });
        match found {
            Ok(true) => Ok(()),
            Ok(false) => Err(DaemonError::Refused(format!(
                "path '{printed}' is not valid"
            ))),
            Err(e) => Err(e.into()),
        }
    }
}
