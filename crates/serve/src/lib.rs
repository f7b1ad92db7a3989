#![doc = include_str!("../README.md")]
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
