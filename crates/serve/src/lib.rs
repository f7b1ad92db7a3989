//! Remote builds the way Nix does them: the `nix-store --serve` protocol (a
//! [client](client::ServeClient) that drives any Nix machine, and a [server](server::serve)
//! so nixb machines can build for others), the `nix-store --export` stream, Nix
//! machines files with per-machine build slots, the transport that reaches a machine
//! (SSH or a local child), and the build-hook protocol of the original engine, on which
//! `nixb build-remote` is built.
//!
//! This crate never builds anything itself: a server hands builds to a
//! [`server::RemoteBuilder`] its caller provides (the engine), and a client asks the
//! remote to build. What it does to the local store is add verified paths, through
//! [`nixb_store::local_store::LocalStore`], keeping the closure invariant.

#![forbid(unsafe_code)]

pub mod client;
pub mod error;
pub mod hook;
pub mod import;
pub mod machines;
pub mod proto;
pub mod server;
pub mod testing;
pub mod transport;
pub mod wire;

pub use client::ServeClient;
pub use error::ServeError;
pub use proto::{BuildOptions, BuildResult, BuildStatus};
