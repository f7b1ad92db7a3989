#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

pub mod cache;
pub mod fetch;
pub mod narinfo;
pub mod protocol;
pub mod signing;
pub mod substitute;
pub mod write;

pub use cache::{BinaryCache, CacheError, CacheOptions};
pub use narinfo::{CacheInfo, Compression, NarInfo, NarInfoError};
pub use signing::{KeyError, PublicKey, SecretKey, TrustedKeys};
pub use substitute::{
    substitute, substitute_closure, substitute_from, ClosureReport, Outcome, SubstituteError,
};
pub use write::{copy_to_file_cache, WriteError, WriteOptions};
