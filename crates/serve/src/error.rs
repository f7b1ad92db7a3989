//! The crate's error type. Every variant names what it is about: the store path, the
//! peer, the machine, the field and byte offset on the wire.

use nixb_store::local_store::StoreError;
use nixb_store::nar::NarError;
use nixb_store::path::PathError;

use crate::wire::WireError;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Wire(#[from] WireError),
    /// Anything that went wrong while talking to one peer, with the peer's name.
    #[error("{peer}: {source}")]
    Peer {
        peer: String,
        #[source]
        source: Box<ServeError>,
    },
    #[error("'nix-store --serve' protocol mismatch: expected magic {expected:#x}, got {got:#x}{}", stderr_note(.stderr))]
    BadMagic {
        expected: u64,
        got: u64,
        stderr: String,
    },
    #[error("peer closed the connection during the handshake{}", stderr_note(.stderr))]
    HandshakeEof { stderr: String },
    #[error("handshake failed: {reason}{}", stderr_note(.stderr))]
    HandshakeFailed { reason: String, stderr: String },
    #[error("unsupported 'nix-store --serve' protocol version {0:#x} (need 2.x, at least 2.4)")]
    Version(u64),
    #[error("bad store path '{value}' in {what}: {source}")]
    Path {
        what: &'static str,
        value: String,
        #[source]
        source: PathError,
    },
    #[error("bad {what} '{value}' for '{path}': {reason}")]
    Field {
        what: &'static str,
        path: String,
        value: String,
        reason: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("nar of '{path}': {source}")]
    Nar {
        path: String,
        #[source]
        source: NarError,
    },
    #[error("nar of '{path}' has hash {got}, expected {expected}; nothing registered")]
    HashMismatch {
        path: String,
        expected: String,
        got: String,
    },
    #[error("nar of '{path}' is {got} bytes, expected {expected}; nothing registered")]
    SizeMismatch {
        path: String,
        expected: u64,
        got: u64,
    },
    #[error("cannot import '{path}': it refers to '{reference}', which is neither valid nor imported before it")]
    MissingReference { path: String, reference: String },
    #[error("path '{0}' is not valid")]
    NotValid(String),
    #[error("export stream at byte {offset}: {reason}")]
    Export { offset: u64, reason: String },
    #[error("peer reported failure ({code}) {step}")]
    Refused { step: String, code: u64 },
    #[error("unknown serve command {0}")]
    UnknownCommand(u64),
    #[error("{0} is not allowed (the server was started without --write)")]
    NotAllowed(&'static str),
    #[error("derivation '{drv}': {reason}")]
    Derivation { drv: String, reason: String },
    #[error("{step} '{path}': {source}")]
    Io {
        step: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("starting '{program}': {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("build of '{drv}': {reason}")]
    Builder { drv: String, reason: String },
}

fn stderr_note(s: &str) -> String {
    let s = s.trim();
    if s.is_empty() {
        String::new()
    } else {
        format!(" (peer said: {s})")
    }
}

impl ServeError {
    pub fn peer(peer: &str, e: ServeError) -> ServeError {
        match e {
            // Name the peer once, however deep the call chain that failed.
            e @ ServeError::Peer { .. } => e,
            e => ServeError::Peer {
                peer: peer.to_string(),
                source: Box::new(e),
            },
        }
    }

    pub fn nar(path: impl Into<String>) -> impl FnOnce(NarError) -> ServeError {
        let path = path.into();
        move |source| ServeError::Nar { path, source }
    }
}
