//! What the engine needs from the store, as a trait: the worker is written against this
//! small surface rather than the whole `LocalStore`, which keeps the dependency narrow and
//! lets tests hand it a store that fails on purpose.
//!
//! Errors from the store are carried as text: the store's own messages already name the
//! database, path or step at fault, and the engine only reports them.

use std::collections::BTreeSet;

use nixb_store::derivation::Derivation;
use nixb_store::{Hash, StoreDir, StorePath};

/// A store operation failed; the message is the store's own.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StoreFault(pub String);

impl StoreFault {
    pub fn from_error(e: impl std::fmt::Display) -> StoreFault {
        StoreFault(e.to_string())
    }
}

/// What the engine reads about a valid path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathInfo {
    pub nar_hash: Hash,
    pub nar_size: u64,
    pub references: BTreeSet<StorePath>,
    pub deriver: Option<StorePath>,
    /// Its content address (`text:sha256:…`, `fixed:[r:]<algo>:…`), if it has one.
    pub ca: Option<String>,
}

/// A freshly built output to register.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewOutput {
    pub path: StorePath,
    pub nar_hash: Hash,
    pub nar_size: u64,
    pub references: BTreeSet<StorePath>,
    /// The derivation that built it.
    pub deriver: StorePath,
    /// Content address of a fixed output: `fixed:[r:]<algo>:<base32>`.
    pub ca: Option<String>,
}

pub trait BuildStore {
    fn store_dir(&self) -> &StoreDir;
    fn is_valid_path(&self, p: &StorePath) -> Result<bool, StoreFault>;
    fn query_path_info(&self, p: &StorePath) -> Result<Option<PathInfo>, StoreFault>;
    fn query_references(&self, p: &StorePath) -> Result<BTreeSet<StorePath>, StoreFault>;
    /// The closure (requisites) of `paths`, including them.
    fn compute_closure(
        &self,
        paths: &BTreeSet<StorePath>,
    ) -> Result<BTreeSet<StorePath>, StoreFault>;
    fn read_derivation(&self, drv: &StorePath) -> Result<Derivation, StoreFault>;
    /// Registers all `outputs` in one transaction (an already valid path is replaced, as
    /// after a repair).
    fn register_outputs(&self, outputs: &[NewOutput]) -> Result<(), StoreFault>;
    fn has_path_failed(&self, p: &StorePath) -> Result<bool, StoreFault>;
    fn register_failed_path(&self, p: &StorePath) -> Result<(), StoreFault>;
    /// Protects `p` from the garbage collector while the worker runs.
    fn add_temp_root(&self, p: &StorePath) -> Result<(), StoreFault>;
    /// Registers a path a substituter produced (not built here, so not "ultimate"); an
    /// already valid path is replaced, as after a repair. Its references are valid.
    fn register_substitute(&self, info: &SubstitutedPath) -> Result<(), StoreFault> {
        Err(StoreFault(format!(
            "this store cannot register substituted path '{}'",
            self.store_dir().print(&info.path)
        )))
    }
    /// Registers several substituted paths, all or none (one transaction where the store
    /// has them). Each path's references are valid or in `infos`.
    fn register_substitutes(&self, infos: &[SubstitutedPath]) -> Result<(), StoreFault> {
        infos.iter().try_for_each(|i| self.register_substitute(i))
    }
}

/// A path a substituter produced, to register.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubstitutedPath {
    pub path: StorePath,
    pub nar_hash: Hash,
    pub nar_size: u64,
    pub references: BTreeSet<StorePath>,
    pub deriver: Option<StorePath>,
    /// Signatures the binary cache had for it (`keyname:base64`), kept as Nix does.
    pub sigs: Vec<String>,
    /// Its content address, if the cache gave one.
    pub ca: Option<String>,
}
