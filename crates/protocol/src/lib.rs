#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

pub mod error;
pub mod framed;
pub mod handshake;
pub mod nar;
pub mod ops;
pub mod stderr;
pub mod types;
pub mod version;
pub mod wire;

pub use error::ProtocolError;
pub use handshake::{ClientInfo, Handshake, ServerInfo, TrustedFlag};
pub use ops::{Op, Request, Response};
pub use stderr::{RemoteError, StderrFrame};
pub use types::Ctx;
pub use version::Version;

pub mod client;
pub mod server;
pub use client::Client;
pub use server::ServerConnection;
