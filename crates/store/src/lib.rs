//! The Nix store as data: store paths and hashes, NAR archives, derivations, reference
//! scanning, metadata canonicalisation, path locks and the SQLite validity database.
//!
//! Everything here agrees byte for byte with Nix 2.x's on-disk formats. This crate never
//! forks or spawns processes and never prints; it reports failures as typed errors that
//! name the file, path or byte offset at fault.

pub mod canon;
pub mod db;
pub mod delete;
pub mod derivation;
pub mod hash;
pub mod local_store;
pub mod locks;
pub mod nar;
pub mod optimise;
pub mod path;
pub mod refscan;

pub use hash::{Encoding, Hash, HashAlgo, Hasher};
pub use path::{DerivedPath, StoreDir, StorePath};
