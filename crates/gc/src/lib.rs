#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

pub mod collect;
pub mod delete;
pub mod graph;
pub mod roots;
pub mod server;
pub mod temproots;

use std::path::PathBuf;

pub use collect::{collect_garbage, GcAction, GcEvent, GcOptions, GcResults};
pub use roots::{find_roots, print_roots, RootDirs, Roots};
pub use temproots::{RootsOwner, TempRootsFile};

/// Everything a collection can fail with.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("{step} '{}': {source}", path.display())]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Db(#[from] nixb_store::db::DbError),
    #[error(transparent)]
    Store(#[from] nixb_store::local_store::StoreError),
    #[error(transparent)]
    Lock(#[from] nixb_store::locks::LockError),
    #[error("temporary roots file '{}': {reason}", file.display())]
    TempRoots { file: PathBuf, reason: String },
    #[error("validity database: {what}")]
    Corrupt { what: String },
    #[error("cannot delete path '{path}' since it is still alive; to find out why, use: nixb query --roots {path}")]
    StillAlive { path: String },
}
