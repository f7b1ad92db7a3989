//! Nix binary caches: the `file://` and `http(s)://` caches that `nix copy --to` writes and
//! Nix substitutes from.
//!
//! - [`narinfo`]: the `.narinfo` and `nix-cache-info` formats (strict parser, Nix's printer)
//! - [`signing`]: ed25519 keys in Nix's `name:base64` form, narinfo fingerprints and signatures
//! - [`cache`]: reading a cache, streaming a NAR through decompression and hashing into place
//! - [`substitute`]: making paths and closures valid in a `LocalStore` from caches
//! - [`protocol`]: the Nix 1.x external substituter protocol (`--query`, `--substitute`)
//! - [`write`]: writing a `file://` cache as `nix copy --to` does
//!
//! This crate never prints (it logs through `tracing`) and never spawns processes; the
//! substituter protocol side reads and writes the streams it is given.

#![forbid(unsafe_code)]

pub mod cache;
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
