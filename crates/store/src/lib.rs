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

pub use hash::{Encoding, Hash, HashAlgo, Hasher};
pub use path::{DerivedPath, StoreDir, StorePath};

/// Whether the benchmark switch `NIXB_BENCH_PLAIN` (a comma-separated list of mechanism
/// names, read only by `cargo xtask bench tuning`) turns `name` off, for an A/B of a
/// tuning against the plain way. Unset, every mechanism is on.
pub fn bench_plain(name: &str) -> bool {
    std::env::var("NIXB_BENCH_PLAIN").is_ok_and(|v| v.split(',').any(|m| m.trim() == name))
}
