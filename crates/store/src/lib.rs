#![doc = include_str!("../README.md")]

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
pub mod temproots;

pub use hash::{Encoding, Hash, HashAlgo, Hasher};
pub use path::{DerivedPath, StoreDir, StorePath};
