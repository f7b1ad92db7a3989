//! `LocalStore`: a Nix store on the local file system and its validity database, laid out
//! exactly as Nix 2.x lays it out so that nixb and Nix can take turns on one store.
//!
//! ```text
//! $NIX_STORE_DIR/<hash>-<name>          the store paths (read-only, mtime 1)
//! $NIX_STORE_DIR/<hash>-<name>.lock     PathLocks while a path is being built or added
//! $NIX_STATE_DIR/db/db.sqlite           validity database (see `db`), WAL mode
//! $NIX_STATE_DIR/db/schema              "10"
//! $NIX_STATE_DIR/db/big-lock            shared flock held by every open store for its
//!                                       whole life; exclusive only to create or upgrade
//!                                       the schema
//! $NIX_STATE_DIR/gc.lock                a collector holds it exclusively while it runs;
//!                                       adding a temporary root takes it shared for a moment
//! $NIX_STATE_DIR/gc-socket/socket       where a running collector takes temporary roots
//! $NIX_STATE_DIR/temproots/<pid>        this process's temporary roots: absolute store
//!                                       paths, each followed by a NUL, exclusively locked
//!                                       while the process lives
//! $NIX_STATE_DIR/gcroots, profiles      created empty, as Nix does
//! ```
//!
//! What a row holds is in [`ValidPathInfo`]. The invariant kept here is Nix's: a path is
//! registered only together with, or after, everything it references, in one
//! transaction; [`LocalStore::register_valid_paths`] refuses anything else and writes
//! nothing then.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::canon::{canonicalise_path_metadata, CanonError, InodesSeen};
use crate::db::{Db, DbError, PathRow, SCHEMA_VERSION};
use crate::derivation::{hash_derivation_modulo, Derivation, DrvError, DrvHashCache};
use crate::hash::{Encoding, Hash, HashAlgo, Hasher};
use crate::locks::{lock_file, open_lock_file, LockError, LockType, PathLocks};
use crate::nar::{dump_to_sink, hash_path, restore_path, NarError};
use crate::path::{PathError, StoreDir, StorePath};
use crate::temproots::{RootsOwner, TempRootsFile};

/// Where the store and its state live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    pub store_dir: StoreDir,
    pub state_dir: PathBuf,
    pub log_dir: PathBuf,
}

impl StoreConfig {
    /// A private store under `root`: `<root>/store`, `<root>/state` and `<root>/log`, the
    /// layout of `nixb_testsupport::TestStore`. Fails when `<root>/store` is not a valid
    /// store directory (not absolute or not UTF-8).
    pub fn under(root: &Path) -> Result<StoreConfig, StoreError> {
        let store = root.join("store");
        let store_dir = store
            .to_str()
            .ok_or_else(|| format!("'{}' is not valid utf-8", store.display()))
            .and_then(|s| StoreDir::new(s).map_err(|e| e.to_string()))
            .map_err(|reason| StoreError::Setting {
                setting: "store directory",
                reason,
            })?;
        Ok(StoreConfig {
            store_dir,
            state_dir: root.join("state"),
            log_dir: root.join("log"),
        })
    }

    /// `NIX_STORE_DIR` (default `/nix/store`), `NIX_STATE_DIR` (`/nix/var/nix`) and
    /// `NIX_LOG_DIR` (`/nix/var/log/nix`); an empty variable counts as unset.
    pub fn from_env() -> Result<StoreConfig, StoreError> {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let store_dir = match var("NIX_STORE_DIR") {
            Some(d) => {
                let s = d.into_string().map_err(|d| StoreError::Setting {
                    setting: "NIX_STORE_DIR",
                    reason: format!("'{}' is not valid utf-8", PathBuf::from(d).display()),
                })?;
                StoreDir::new(s).map_err(|e| StoreError::Setting {
                    setting: "NIX_STORE_DIR",
                    reason: e.to_string(),
                })?
            }
            None => StoreDir::default(),
        };
        let dir = |name: &'static str, default: &str| -> Result<PathBuf, StoreError> {
            let p = var(name)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(default));
            if !p.is_absolute() {
                return Err(StoreError::Setting {
                    setting: name,
                    reason: format!("'{}' is not an absolute path", p.display()),
                });
            }
            Ok(p)
        };
        Ok(StoreConfig {
            store_dir,
            state_dir: dir("NIX_STATE_DIR", "/nix/var/nix")?,
            log_dir: dir("NIX_LOG_DIR", "/nix/var/log/nix")?,
        })
    }

    pub fn db_dir(&self) -> PathBuf {
        self.state_dir.join("db")
    }
}

/// What the database knows about a valid path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidPathInfo {
    pub path: StorePath,
    /// Hash of the path's NAR serialisation (sha256 in practice).
    pub nar_hash: Hash,
    pub nar_size: u64,
    pub deriver: Option<StorePath>,
    pub references: BTreeSet<StorePath>,
    /// Seconds since the epoch; 0 when registering means "now".
    pub registration_time: i64,
    /// Built on this machine (as opposed to substituted or added).
    pub ultimate: bool,
    pub sigs: Vec<String>,
    /// Content address: `fixed:[r:]<algo>:<base32>` or `text:sha256:<base32>`.
    pub ca: Option<String>,
}

impl ValidPathInfo {
    /// An info with no references, deriver, signatures or content address, registered now.
    pub fn new(path: StorePath, nar_hash: Hash, nar_size: u64) -> ValidPathInfo {
        ValidPathInfo {
            path,
            nar_hash,
            nar_size,
            deriver: None,
            references: BTreeSet::new(),
            registration_time: 0,
            ultimate: false,
            sigs: Vec::new(),
            ca: None,
        }
    }
}

/// What [`LocalStore::verify`] found; nothing is changed by verifying.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Paths registered as valid that are not in the store directory.
    pub missing: Vec<StorePath>,
    /// `(path, hash in the database, hash of the contents)`.
    pub hash_mismatches: Vec<(StorePath, Hash, Hash)>,
    /// `(path, size in the database, size of the contents' NAR)`.
    pub size_mismatches: Vec<(StorePath, u64, u64)>,
    /// `(path, reference)` where the reference is not valid.
    pub broken_references: Vec<(StorePath, StorePath)>,
    /// Database rows that could not be read back (bad path, hash or reference), with why.
    pub unreadable: Vec<(String, String)>,
    /// How many valid paths were examined.
    pub checked: usize,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty()
            && self.hash_mismatches.is_empty()
            && self.size_mismatches.is_empty()
            && self.broken_references.is_empty()
            && self.unreadable.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("setting {setting}: {reason}")]
    Setting {
        setting: &'static str,
        reason: String,
    },
    #[error("{step} '{}': {source}", path.display())]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Nar(#[from] NarError),
    #[error(transparent)]
    Canon(#[from] CanonError),
    #[error(transparent)]
    Derivation(#[from] DrvError),
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("schema file {}: {reason}", file.display())]
    Schema { file: PathBuf, reason: String },
    #[error("database {}: row of {path}: {reason}", db.display())]
    Corrupt {
        db: PathBuf,
        path: String,
        reason: String,
    },
    #[error("path '{0}' is not valid")]
    NotValid(String),
    #[error("cannot register '{path}': it refers to '{reference}', which is neither valid nor being registered")]
    DanglingReference { path: String, reference: String },
    #[error("cannot register '{0}': its references form a cycle")]
    Cycle(String),
    #[error("cannot invalidate '{path}': still referenced by {}", referrers.join(", "))]
    HasReferrers {
        path: String,
        referrers: Vec<String>,
    },
    #[error(
        "derivation '{drv}' has incorrect output '{output}' ({found}), should be '{expected}'"
    )]
    WrongOutput {
        drv: String,
        output: String,
        found: String,
        expected: String,
    },
    #[error("path '{path}' changed while it was being added to the store")]
    Changed { path: String },
    #[error("garbage collector socket {}: {reason}", socket.display())]
    GcSocket { socket: PathBuf, reason: String },
}

fn io_err(step: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { step, path, source }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Where the temporary roots taken through a store go: the process's own file, unless the
/// calling thread acts for an owner of its own (see [`LocalStore::roots_of_this_thread`]).
#[derive(Default)]
struct TempRoots {
    /// `temproots/<pid>`, created with the first root.
    process: Option<TempRootsFile>,
    /// The threads acting for an owner of their own, and that owner.
    threads: Vec<(std::thread::ThreadId, Arc<RootsOwner>)>,
}

/// An open local store. One per process is the intended use; it is `Send` and `Sync`
/// (the database connection sits behind a mutex).
pub struct LocalStore {
    config: StoreConfig,
    db: Mutex<Db>,
    /// Held with a shared lock for as long as the store is open (see the module doc).
    big_lock: File,
    /// Temporary roots: this process's file, created on first use, and the threads that
    /// take roots for an owner of their own.
    temp_roots: Mutex<TempRoots>,
    /// `hashDerivationModulo` of derivations checked at registration, so registering a
    /// chain of derivations reads each input once.
    drv_hashes: Mutex<DrvHashCache>,
}

impl Drop for LocalStore {
    fn drop(&mut self) {
        // As for path locks: release the shared big lock now, not when the last copy of
        // the descriptor (possibly in a child forked by another thread) is closed.
        let _ = lock_file(&self.big_lock, LockType::None, false);
    }
}

impl std::fmt::Debug for LocalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalStore")
            .field("config", &self.config)
            .finish()
    }
}

impl LocalStore {
    /// Opens the store, creating the store directory, the state directories and the
    /// database (with schema 10) when they do not exist yet.
    pub fn open(config: StoreConfig) -> Result<LocalStore, StoreError> {
        let db_dir = config.db_dir();
        for d in [
            config.store_dir.as_path(),
            config.state_dir.as_path(),
            &db_dir,
            &config.state_dir.join("temproots"),
            &config.state_dir.join("gcroots"),
            &config.state_dir.join("profiles"),
        ] {
            std::fs::create_dir_all(d).map_err(io_err("creating directory", d))?;
        }

        let big_lock_path = db_dir.join("big-lock");
        let big_lock = open_lock_file(&big_lock_path, true)?.ok_or_else(|| StoreError::Io {
            step: "opening",
            path: big_lock_path.clone(),
            source: io::ErrorKind::NotFound.into(),
        })?;
        if !lock_file(&big_lock, LockType::Read, false)? {
            tracing::info!(
                "waiting for the big nix store lock ({})...",
                big_lock_path.display()
            );
            lock_file(&big_lock, LockType::Read, true)?;
        }

        let schema_file = db_dir.join("schema");
        let db_file = db_dir.join("db.sqlite");
        let db = match read_schema(&schema_file)? {
            Some(v) => {
                check_schema(&schema_file, v)?;
                Db::open(&db_file, false)?
            }
            None => {
                // Create under the exclusive lock so that two processes opening a new
                // store at once do not both initialise it. Drop the shared lock first:
                // two processes both holding it and both waiting to upgrade would
                // deadlock.
                if !lock_file(&big_lock, LockType::Write, false)? {
                    lock_file(&big_lock, LockType::None, false)?;
                    lock_file(&big_lock, LockType::Write, true)?;
                }
                let db = match read_schema(&schema_file)? {
                    Some(v) => {
                        check_schema(&schema_file, v)?;
                        Db::open(&db_file, false)?
                    }
                    None => {
                        let db = Db::open(&db_file, true)?;
                        write_atomically(&schema_file, SCHEMA_VERSION.to_string().as_bytes())?;
                        db
                    }
                };
                lock_file(&big_lock, LockType::Read, true)?;
                db
            }
        };

        // Earlier versions kept released lock files in this directory for reuse, which
        // did not pay (BENCHMARKS.md, "tuning on real file systems"); what they left goes.
        let retired_pool = config.state_dir.join("nixb-lock-pool");
        if retired_pool.exists() {
            if let Err(e) = crate::delete::delete_path(&retired_pool) {
                tracing::warn!("{e}; it holds only spare lock files and may be deleted");
            }
        }
        Ok(LocalStore {
            config,
            db: Mutex::new(db),
            big_lock,
            temp_roots: Mutex::new(TempRoots::default()),
            drv_hashes: Mutex::new(DrvHashCache::new()),
        })
    }

    pub fn store_dir(&self) -> &StoreDir {
        &self.config.store_dir
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// Runs `f` with the database to itself, for whole-store readers and writers (the
    /// garbage collector) that work on rows and ids rather than one path at a time.
    pub fn with_db<T>(&self, f: impl FnOnce(&Db) -> T) -> T {
        f(&self.db())
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Db> {
        // A panic while holding the lock cannot leave the database half written (the
        // transaction rolls back), so a poisoned mutex is safe to keep using.
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn print(&self, p: &StorePath) -> String {
        self.config.store_dir.print(p)
    }

    fn parse_stored(
        &self,
        db: &Db,
        row_path: &str,
        s: &str,
        what: &str,
    ) -> Result<StorePath, StoreError> {
        self.config
            .store_dir
            .parse(s)
            .map_err(|e| StoreError::Corrupt {
                db: db.file().to_path_buf(),
                path: row_path.to_string(),
                reason: format!("{what} '{s}': {e}"),
            })
    }

    /// Every valid path, from the database (whether or not it is on disk, as Nix's
    /// `queryAllValidPaths`), in one statement.
    pub fn query_all_valid_paths(&self) -> Result<BTreeSet<StorePath>, StoreError> {
        let db = self.db();
        let mut out = BTreeSet::new();
        let mut bad = None;
        db.scan_valid_paths(|_, path, _| match self.config.store_dir.parse(path) {
            Ok(p) => {
                out.insert(p);
            }
            Err(e) => {
                bad.get_or_insert_with(|| (path.to_owned(), e.to_string()));
            }
        })?;
        if let Some((path, reason)) = bad {
            return Err(StoreError::Corrupt {
                db: db.file().to_path_buf(),
                path,
                reason: format!("not a store path: {reason}"),
            });
        }
        Ok(out)
    }

    /// The valid path whose hash part is `hash_part`, if any (Nix's
    /// `queryPathFromHashPart`). A `hash_part` that is not 32 characters of Nix base32
    /// matches nothing.
    pub fn query_path_from_hash_part(
        &self,
        hash_part: &str,
    ) -> Result<Option<StorePath>, StoreError> {
        let well_formed = hash_part.len() == 32
            && hash_part
                .bytes()
                .all(|b| b"0123456789abcdfghijklmnpqrsvwxyz".contains(&b));
        if !well_formed {
            return Ok(None);
        }
        let prefix = format!("{}/{hash_part}-", self.config.store_dir.as_str());
        let db = self.db();
        match db.path_with_prefix(&prefix)? {
            Some(found) => self.parse_stored(&db, &found, &found, "path").map(Some),
            None => Ok(None),
        }
    }

    pub fn is_valid_path(&self, p: &StorePath) -> Result<bool, StoreError> {
        Ok(self.db().path_id(&self.print(p))?.is_some())
    }

    pub fn query_path_info(&self, p: &StorePath) -> Result<Option<ValidPathInfo>, StoreError> {
        let db = self.db();
        let printed = self.print(p);
        let Some((row, row_refs)) = db.path_row_with_references(&printed)? else {
            return Ok(None);
        };
        let corrupt = |reason: String| StoreError::Corrupt {
            db: db.file().to_path_buf(),
            path: printed.clone(),
            reason,
        };
        let nar_hash = Hash::parse_typed(&row.hash)
            .map_err(|e| corrupt(format!("hash '{}': {e}", row.hash)))?;
        let deriver = match &row.deriver {
            Some(d) if !d.is_empty() => Some(self.parse_stored(&db, &printed, d, "deriver")?),
            _ => None,
        };
        let mut references = BTreeSet::new();
        for r in &row_refs {
            references.insert(self.parse_stored(&db, &printed, r, "reference")?);
        }
        let nar_size = match row.nar_size {
            None => 0,
            Some(n) => u64::try_from(n).map_err(|_| corrupt(format!("negative narSize {n}")))?,
        };
        Ok(Some(ValidPathInfo {
            path: p.clone(),
            nar_hash,
            nar_size,
            deriver,
            references,
            registration_time: row.registration_time,
            ultimate: row.ultimate,
            sigs: row
                .sigs
                .as_deref()
                .unwrap_or("")
                .split_whitespace()
                .map(String::from)
                .collect(),
            ca: row.ca.filter(|c| !c.is_empty()),
        }))
    }

    fn require_id(&self, db: &Db, p: &StorePath) -> Result<i64, StoreError> {
        let printed = self.print(p);
        db.path_id(&printed)?.ok_or(StoreError::NotValid(printed))
    }

    /// What `p` refers to; an error when `p` is not valid.
    pub fn query_references(&self, p: &StorePath) -> Result<BTreeSet<StorePath>, StoreError> {
        let db = self.db();
        let id = self.require_id(&db, p)?;
        let printed = self.print(p);
        db.references(id)?
            .iter()
            .map(|r| self.parse_stored(&db, &printed, r, "reference"))
            .collect()
    }

    /// The valid paths that refer to `p` (empty when `p` is not valid).
    pub fn query_referrers(&self, p: &StorePath) -> Result<BTreeSet<StorePath>, StoreError> {
        let db = self.db();
        let printed = self.print(p);
        db.referrers(&printed)?
            .iter()
            .map(|r| self.parse_stored(&db, r, r, "referrer"))
            .collect()
    }

    /// The closure of `paths` under references (Nix's "requisites"), including `paths`
    /// themselves; an error when any path in it is not valid.
    pub fn compute_closure(
        &self,
        paths: &BTreeSet<StorePath>,
    ) -> Result<BTreeSet<StorePath>, StoreError> {
        let db = self.db();
        let mut closure = BTreeSet::new();
        let mut todo: Vec<StorePath> = paths.iter().cloned().collect();
        while let Some(p) = todo.pop() {
            if closure.contains(&p) {
                continue;
            }
            let id = self.require_id(&db, &p)?;
            let printed = self.print(&p);
            for r in db.references(id)? {
                let r = self.parse_stored(&db, &printed, &r, "reference")?;
                if !closure.contains(&r) {
                    todo.push(r);
                }
            }
            closure.insert(p);
        }
        Ok(closure)
    }

    /// Output name to path, as recorded when the derivation was registered.
    pub fn query_derivation_outputs(
        &self,
        drv: &StorePath,
    ) -> Result<BTreeMap<String, StorePath>, StoreError> {
        let db = self.db();
        let id = self.require_id(&db, drv)?;
        let printed = self.print(drv);
        db.derivation_outputs(id)?
            .into_iter()
            .map(|(name, p)| {
                Ok((
                    name,
                    self.parse_stored(&db, &printed, &p, "derivation output")?,
                ))
            })
            .collect()
    }

    /// Valid derivations that have `out` among their outputs.
    pub fn query_valid_derivers(&self, out: &StorePath) -> Result<Vec<StorePath>, StoreError> {
        let db = self.db();
        db.valid_derivers(&self.print(out))?
            .iter()
            .map(|d| self.parse_stored(&db, d, d, "deriver"))
            .collect()
    }

    /// Registers `infos` in one transaction. An already valid path has its hash, size,
    /// signatures, content address and `ultimate` replaced (as after a repair). Refused,
    /// with nothing written, when a reference is neither valid nor among `infos` (a path
    /// may refer to itself), when references among `infos` form a cycle, or when a
    /// `.drv` among them lists output paths that do not follow from its contents. For
    /// each `.drv`, whose file must already be in the store, its outputs are recorded
    /// in `DerivationOutputs`.
    pub fn register_valid_paths(&self, infos: &[ValidPathInfo]) -> Result<(), StoreError> {
        check_acyclic(infos, &self.config.store_dir)?;
        // Read and check derivations before taking the database's write lock.
        let mut drv_outputs: Vec<(String, BTreeMap<String, StorePath>)> = Vec::new();
        for info in infos.iter().filter(|i| i.path.is_derivation()) {
            let drv = self.read_invalid_derivation(&info.path)?;
            self.check_derivation_outputs(&info.path, &drv)?;
            drv_outputs.push((self.print(&info.path), drv.output_paths()));
        }
        let time = now();
        let db = self.db();
        db.transaction("registering valid paths", |db| {
            let mut ids: HashMap<String, i64> = HashMap::new();
            for info in infos {
                let row = self.to_row(info, time);
                let id = match db.path_id(&row.path)? {
                    Some(id) => {
                        db.update_path(&row)?;
                        id
                    }
                    None => db.insert_path(&row)?,
                };
                ids.insert(row.path, id);
            }
            for info in infos {
                let from = self.print(&info.path);
                let from_id = ids[&from];
                for r in &info.references {
                    let to = self.print(r);
                    let to_id = match ids.get(&to) {
                        Some(id) => *id,
                        None => db
                            .path_id(&to)?
                            .ok_or_else(|| StoreError::DanglingReference {
                                path: from.clone(),
                                reference: to.clone(),
                            })?,
                    };
                    db.add_reference(from_id, to_id)?;
                }
            }
            for (drv, outputs) in &drv_outputs {
                for (name, out) in outputs {
                    db.add_derivation_output(ids[drv], name, &self.print(out))?;
                }
            }
            Ok::<(), StoreError>(())
        })
    }

    fn to_row(&self, info: &ValidPathInfo, time: i64) -> PathRow {
        PathRow {
            id: 0,
            path: self.print(&info.path),
            // Nix stores base16 with the algorithm prefix, whatever it prints elsewhere.
            hash: info.nar_hash.to_typed(Encoding::Base16),
            registration_time: if info.registration_time == 0 {
                time
            } else {
                info.registration_time
            },
            deriver: info.deriver.as_ref().map(|d| self.print(d)),
            nar_size: (info.nar_size > 0).then_some(info.nar_size as i64),
            ultimate: info.ultimate,
            sigs: (!info.sigs.is_empty()).then(|| info.sigs.join(" ")),
            ca: info.ca.clone().filter(|c| !c.is_empty()),
        }
    }

    /// Nix's `checkDerivationOutputs`: a fixed output must sit where its hash puts it, and
    /// every other output where `hashDerivationModulo` puts it. Outputs without a path
    /// (deferred) are not checked.
    fn check_derivation_outputs(
        &self,
        drv_path: &StorePath,
        drv: &Derivation,
    ) -> Result<(), StoreError> {
        let store = &self.config.store_dir;
        let name = drv.name()?.into_owned();
        let wrong =
            |output: &str, found: &StorePath, expected: &StorePath| StoreError::WrongOutput {
                drv: store.print(drv_path),
                output: output.to_string(),
                found: store.print(found),
                expected: store.print(expected),
            };
        if let Some(f) = drv.fixed_output()? {
            let expected = store.make_fixed_output_path(f.recursive, &f.hash, &name)?;
            if let Some(found) = drv.outputs.get("out").and_then(|o| o.path.as_ref()) {
                if *found != expected {
                    return Err(wrong("out", found, &expected));
                }
            }
            return Ok(());
        }
        if drv.outputs.values().all(|o| o.path.is_none()) {
            return Ok(());
        }
        let mut cache = self.drv_hashes.lock().unwrap_or_else(|p| p.into_inner());
        let mut resolve = |p: &StorePath| Derivation::read(store, &store.to_path(p));
        let h = hash_derivation_modulo(store, drv, true, &mut resolve, &mut cache)?;
        for (output, o) in &drv.outputs {
            if let Some(found) = &o.path {
                let expected = store.make_output_path(output, &h, &name)?;
                if *found != expected {
                    return Err(wrong(output, found, &expected));
                }
            }
        }
        Ok(())
    }

    /// Removes `p` from the database (not from disk). Refused while another valid path
    /// refers to it.
    pub fn invalidate_path(&self, p: &StorePath) -> Result<(), StoreError> {
        let printed = self.print(p);
        let db = self.db();
        db.transaction("invalidating path", |db| {
            let Some(id) = db.path_id(&printed)? else {
                return Ok(());
            };
            let referrers: Vec<String> = db
                .referrers(&printed)?
                .into_iter()
                .filter(|r| *r != printed)
                .collect();
            if !referrers.is_empty() {
                return Err(StoreError::HasReferrers {
                    path: printed.clone(),
                    referrers,
                });
            }
            db.delete_path(id)?;
            Ok(())
        })
    }

    /// Parses a valid `.drv`.
    pub fn read_derivation(&self, drv: &StorePath) -> Result<Derivation, StoreError> {
        if !self.is_valid_path(drv)? {
            return Err(StoreError::NotValid(self.print(drv)));
        }
        self.read_invalid_derivation(drv)
    }

    fn read_invalid_derivation(&self, drv: &StorePath) -> Result<Derivation, StoreError> {
        let store = &self.config.store_dir;
        Ok(Derivation::read(store, &store.to_path(drv))?)
    }

    /// Copies `src` (file, executable, symlink or directory tree) into the store as
    /// `nix-store --add` does: the path is the recursive-sha256 fixed-output path of its
    /// NAR, named `name` or else after `src`'s last component.
    pub fn add_to_store(&self, src: &Path, name: Option<&str>) -> Result<StorePath, StoreError> {
        let name = match name {
            Some(n) => n.to_string(),
            None => src
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| StoreError::Io {
                    step: "taking the store path name from",
                    path: src.to_path_buf(),
                    source: io::Error::new(io::ErrorKind::InvalidInput, "no utf-8 file name"),
                })?
                .to_string(),
        };
        let (nar_hash, nar_size) = hash_path(src, HashAlgo::Sha256)?;
        let path = self
            .config
            .store_dir
            .make_fixed_output_path(true, &nar_hash, &name)?;
        if self.is_valid_path(&path)? {
            return Ok(path);
        }
        self.add_temp_root(&path)?;
        let dest = self.config.store_dir.to_path(&path);
        let mut locks = self.lock_for_adding(&dest)?;
        if !self.is_valid_path(&path)? {
            remove_tree(&dest)?;
            let (copied_hash, copied_size) = copy_via_nar(src, &dest)?;
            if copied_hash != nar_hash || copied_size != nar_size {
                let _ = remove_tree(&dest);
                return Err(StoreError::Changed {
                    path: src.display().to_string(),
                });
            }
            canonicalise_path_metadata(&dest, None, &mut InodesSeen::new())?;
            let mut info = ValidPathInfo::new(path.clone(), nar_hash.clone(), nar_size);
            info.ca = Some(format!("fixed:r:{}", nar_hash.to_typed(Encoding::Base32)));
            self.register_valid_paths(&[info])?;
        }
        locks.set_deletion(true);
        Ok(path)
    }

    /// Locks `dest` (waiting for another process that holds it) before a path is added.
    fn lock_for_adding(&self, dest: &Path) -> Result<PathLocks, StoreError> {
        let dest = dest.to_path_buf();
        match PathLocks::lock(std::slice::from_ref(&dest), true, None)? {
            Some(locks) => Ok(locks),
            // Only a non-waiting lock can come back empty; kept as an error, not a panic.
            None => Err(StoreError::Io {
                step: "locking",
                path: dest,
                source: io::ErrorKind::WouldBlock.into(),
            }),
        }
    }

    /// Writes a text file (such as a `.drv`) into the store at its text path, with the
    /// given references, which must be valid.
    pub fn add_text_to_store(
        &self,
        name: &str,
        contents: &[u8],
        refs: &BTreeSet<StorePath>,
    ) -> Result<StorePath, StoreError> {
        let store = &self.config.store_dir;
        let path = store.make_text_path(name, contents, refs)?;
        if self.is_valid_path(&path)? {
            return Ok(path);
        }
        self.add_temp_root(&path)?;
        let dest = store.to_path(&path);
        let mut locks = self.lock_for_adding(&dest)?;
        if !self.is_valid_path(&path)? {
            remove_tree(&dest)?;
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&dest)
                .map_err(io_err("creating", &dest))?;
            f.write_all(contents).map_err(io_err("writing", &dest))?;
            f.sync_all().map_err(io_err("syncing", &dest))?;
            drop(f);
            canonicalise_path_metadata(&dest, None, &mut InodesSeen::new())?;
            let (nar_hash, nar_size) = hash_path(&dest, HashAlgo::Sha256)?;
            let mut info = ValidPathInfo::new(path.clone(), nar_hash, nar_size);
            info.references = refs.clone();
            info.ca = Some(format!(
                "text:{}",
                Hash::digest(HashAlgo::Sha256, contents).to_typed(Encoding::Base32)
            ));
            self.register_valid_paths(&[info])?;
        }
        locks.set_deletion(true);
        Ok(path)
    }

    /// Writes `drv` as a `.drv` (referring to its input sources and derivations, which
    /// must be valid) and registers it with its outputs.
    pub fn add_derivation(&self, drv: &Derivation) -> Result<StorePath, StoreError> {
        let store = &self.config.store_dir;
        let name = format!("{}.drv", drv.name()?);
        self.add_text_to_store(&name, drv.to_aterm(store).as_bytes(), &drv.references())
    }

    pub fn has_path_failed(&self, p: &StorePath) -> Result<bool, StoreError> {
        Ok(self.db().has_failed(&self.print(p))?)
    }

    /// Remembers that building `p` failed, so later runs can fail fast.
    pub fn register_failed_path(&self, p: &StorePath) -> Result<(), StoreError> {
        let printed = self.print(p);
        let db = self.db();
        db.transaction("recording failed path", |db| db.add_failed(&printed, now()))
            .map_err(StoreError::from)
    }

    pub fn clear_failed_paths(&self, paths: &BTreeSet<StorePath>) -> Result<(), StoreError> {
        let db = self.db();
        db.transaction("clearing failed paths", |db| {
            for p in paths {
                db.clear_failed(&self.print(p))?;
            }
            Ok::<(), StoreError>(())
        })
    }

    /// Makes `profiles/per-user/<name>` and `gcroots/per-user/<name>` (mode 0755, owned
    /// by `uid`), where a user's profiles and their roots go: what Nix's daemon does for
    /// every user that connects, so that `nix-env` and `nix-channel` find their profile
    /// directory. Directories that exist already are left as they are.
    pub fn create_user(&self, name: &str, uid: u32) -> Result<(), StoreError> {
        use std::os::unix::fs::PermissionsExt;
        for top in ["profiles", "gcroots"] {
            let per_user = self.config.state_dir.join(top).join("per-user");
            let dir = per_user.join(name);
            if std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
                continue;
            }
            std::fs::create_dir_all(&dir).map_err(io_err("creating directory", &dir))?;
            for d in [&per_user, &dir] {
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
                    .map_err(io_err("setting the permissions of", d))?;
            }
            std::os::unix::fs::chown(&dir, Some(uid), None)
                .map_err(io_err("changing the owner of", &dir))?;
        }
        Ok(())
    }

    /// Drops every temporary root this process holds in its own file: `temproots/<pid>` is
    /// emptied (and stays locked, so collectors keep treating the process as alive). For
    /// a long-running process such as a daemon once nothing it serves needs them, as a
    /// Nix daemon's per-connection process takes its roots with it when it exits. The
    /// roots of the owners of [`LocalStore::roots_of_this_thread`] are theirs.
    pub fn release_temp_roots(&self) -> Result<(), StoreError> {
        let mut roots = self.temp_roots.lock().unwrap_or_else(|e| e.into_inner());
        match &mut roots.process {
            Some(file) => file.clear(),
            None => Ok(()),
        }
    }

    /// Protects `p` from a garbage collector (Nix's or ours) until this process exits,
    /// through `temproots/<pid>` as Nix 2.x keeps it (see [`crate::temproots`]); or, on a
    /// thread acting for an owner of its own, until that owner is dropped.
    pub fn add_temp_root(&self, p: &StorePath) -> Result<(), StoreError> {
        let mut roots = self.temp_roots.lock().unwrap_or_else(|e| e.into_inner());
        let me = std::thread::current().id();
        if let Some((_, owner)) = roots.threads.iter().find(|(t, _)| *t == me) {
            let owner = Arc::clone(owner);
            // Another thread's roots need not wait for this owner's file.
            drop(roots);
            return owner.add(p);
        }
        let file = match roots.process.take() {
            Some(f) => f,
            None => TempRootsFile::create(
                &self.config.state_dir,
                self.config.store_dir.clone(),
                &std::process::id().to_string(),
            )?,
        };
        roots.process.insert(file).add(p)
    }

    /// Until the returned guard is dropped, the temporary roots this thread takes through
    /// the store (adding paths, importing them) are `owner`'s instead of the process's:
    /// for a daemon connection, whose roots go when it ends.
    pub fn roots_of_this_thread(&self, owner: Arc<RootsOwner>) -> ThreadRoots<'_> {
        let me = std::thread::current().id();
        let mut roots = self.temp_roots.lock().unwrap_or_else(|e| e.into_inner());
        roots.threads.retain(|(t, _)| *t != me);
        roots.threads.push((me, owner));
        ThreadRoots { store: self }
    }

    /// Checks every valid path: present on disk, references valid, and with
    /// `check_contents` also that the NAR hash and size still match. Changes nothing.
    pub fn verify(&self, check_contents: bool) -> Result<VerifyReport, StoreError> {
        let all = self.db().all_paths()?;
        let mut report = VerifyReport::default();
        for printed in all {
            let p = match self.config.store_dir.parse(&printed) {
                Ok(p) => p,
                Err(e) => {
                    report.unreadable.push((printed, e.to_string()));
                    continue;
                }
            };
            report.checked += 1;
            let info = match self.query_path_info(&p) {
                Ok(Some(i)) => i,
                Ok(None) => continue, // invalidated meanwhile
                Err(e) => {
                    report.unreadable.push((printed, e.to_string()));
                    continue;
                }
            };
            for r in &info.references {
                if !self.is_valid_path(r)? {
                    report.broken_references.push((p.clone(), r.clone()));
                }
            }
            let file = self.config.store_dir.to_path(&p);
            if std::fs::symlink_metadata(&file).is_err() {
                report.missing.push(p);
                continue;
            }
            if check_contents {
                let (h, size) = hash_path(&file, info.nar_hash.algo())?;
                if h != info.nar_hash {
                    report
                        .hash_mismatches
                        .push((p.clone(), info.nar_hash.clone(), h));
                }
                if info.nar_size != 0 && size != info.nar_size {
                    report.size_mismatches.push((p, info.nar_size, size));
                }
            }
        }
        Ok(report)
    }
}

fn read_schema(file: &Path) -> Result<Option<u32>, StoreError> {
    match std::fs::read_to_string(file) {
        Ok(s) if s.trim().is_empty() => Ok(None),
        Ok(s) => s
            .trim()
            .parse::<u32>()
            .map(Some)
            .map_err(|_| StoreError::Schema {
                file: file.to_path_buf(),
                reason: format!("'{}' is not a schema version number", s.trim()),
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("reading", file)(e)),
    }
}

fn check_schema(file: &Path, found: u32) -> Result<(), StoreError> {
    if found == SCHEMA_VERSION {
        return Ok(());
    }
    let reason = if found > SCHEMA_VERSION {
        format!("store has schema version {found}, newer than the {SCHEMA_VERSION} nixb supports")
    } else {
        format!("store has schema version {found}; nixb uses {SCHEMA_VERSION}: upgrade it by opening it once with nix 2.x")
    };
    Err(StoreError::Schema {
        file: file.to_path_buf(),
        reason,
    })
}

fn write_atomically(file: &Path, contents: &[u8]) -> Result<(), StoreError> {
    let tmp = file.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, contents).map_err(io_err("writing", &tmp))?;
    std::fs::rename(&tmp, file).map_err(io_err("renaming into place", file))
}

/// Rejects registrations whose references among themselves form a cycle (a path
/// referring to itself is fine); Nix refuses those too, as no order of building could
/// have produced them.
fn check_acyclic(infos: &[ValidPathInfo], store: &StoreDir) -> Result<(), StoreError> {
    let index: HashMap<&StorePath, usize> = infos
        .iter()
        .enumerate()
        .map(|(i, x)| (&x.path, i))
        .collect();
    // 0 = unvisited, 1 = on the current DFS path, 2 = done.
    let mut state = vec![0u8; infos.len()];
    for start in 0..infos.len() {
        if state[start] != 0 {
            continue;
        }
        let mut stack: Vec<(usize, Vec<usize>)> = Vec::new();
        let edges = |i: usize| -> Vec<usize> {
            infos[i]
                .references
                .iter()
                .filter(|r| **r != infos[i].path)
                .filter_map(|r| index.get(r).copied())
                .collect()
        };
        state[start] = 1;
        stack.push((start, edges(start)));
        while let Some((node, next)) = stack.last_mut() {
            match next.pop() {
                Some(n) if state[n] == 1 => {
                    return Err(StoreError::Cycle(store.print(&infos[n].path)))
                }
                Some(n) if state[n] == 0 => {
                    state[n] = 1;
                    let e = edges(n);
                    stack.push((n, e));
                }
                Some(_) => {}
                None => {
                    state[*node] = 2;
                    stack.pop();
                }
            }
        }
    }
    Ok(())
}

/// A thread's temporary roots going to an owner of its own (see
/// [`LocalStore::roots_of_this_thread`]); dropping it sends them to the process's file again.
pub struct ThreadRoots<'s> {
    store: &'s LocalStore,
}

impl Drop for ThreadRoots<'_> {
    fn drop(&mut self) {
        let me = std::thread::current().id();
        let mut roots = self
            .store
            .temp_roots
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        roots.threads.retain(|(t, _)| *t != me);
    }
}

/// [`crate::delete::delete_path`] with the store's error type.
fn remove_tree(path: &Path) -> Result<(), StoreError> {
    crate::delete::delete_path(path).map_err(|e| StoreError::Io {
        step: e.step,
        path: e.path,
        source: e.source,
    })
}

/// Feeds restore from a dumping thread and hashes what passes, so that what is in the
/// store is exactly what was hashed, even if `src` changes meanwhile.
struct ChannelReader {
    rx: Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
    hasher: Hasher,
    size: u64,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.recv() {
                Ok(b) => {
                    self.hasher.update(&b);
                    self.size += b.len() as u64;
                    self.buf = b;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Copies `src` to `dest` through a NAR stream; returns the stream's sha256 and size.
fn copy_via_nar(src: &Path, dest: &Path) -> Result<(Hash, u64), StoreError> {
    let (tx, rx) = sync_channel::<Vec<u8>>(16);
    let mut reader = ChannelReader {
        rx,
        buf: Vec::new(),
        pos: 0,
        hasher: Hasher::new(HashAlgo::Sha256),
        size: 0,
    };
    std::thread::scope(|scope| {
        let dumper = scope.spawn(move || {
            dump_to_sink(src, &mut |b| {
                tx.send(b.to_vec()).map_err(|_| {
                    NarError::Sink(io::Error::new(io::ErrorKind::BrokenPipe, "restore stopped"))
                })
            })
        });
        let restored = restore_path(&mut reader, dest);
        // Unblock the dumper if restore stopped early.
        drop(reader.rx);
        let dumped = dumper.join().unwrap_or_else(|_| {
            Err(NarError::Sink(io::Error::other(
                "archiving thread panicked",
            )))
        });
        // A dump error explains a restore error (a truncated stream), so report it first.
        dumped?;
        restored?;
        Ok((reader.hasher.finish(), reader.size))
    })
}
