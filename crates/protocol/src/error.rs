//! The crate's error type. Every variant names what it is about: the operation, the
//! field and byte offset on the wire, the version that lacks a feature.

use nixb_store::path::PathError;

use crate::stderr::RemoteError;
use crate::version::Version;
use crate::wire::WireError;

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error(transparent)]
    Wire(#[from] WireError),
    /// Anything that went wrong inside one operation, with the operation's name.
    #[error("{op}: {source}")]
    InOp {
        op: &'static str,
        #[source]
        source: Box<ProtocolError>,
    },
    #[error("worker protocol mismatch: expected magic {expected:#x}, got {got:#x}")]
    BadMagic { expected: u64, got: u64 },
    #[error("the {peer}'s protocol version {version} is too old (nixb needs at least {min})")]
    TooOld {
        peer: &'static str,
        version: Version,
        min: Version,
    },
    #[error("the {peer}'s protocol major version {version} is not supported (nixb speaks 1.x)")]
    Major {
        peer: &'static str,
        version: Version,
    },
    #[error("unknown worker operation {0}")]
    UnknownOp(u64),
    #[error("unknown stderr message type {kind:#x} at byte {offset}")]
    UnknownStderr { kind: u64, offset: u64 },
    #[error("unknown {what} {value} at byte {offset}")]
    UnknownValue {
        what: &'static str,
        value: u64,
        offset: u64,
    },
    #[error("bad store path '{value}' in {what}: {source}")]
    Path {
        what: &'static str,
        value: String,
        #[source]
        source: PathError,
    },
    #[error("bad {what} '{value}': {reason}")]
    Field {
        what: &'static str,
        value: String,
        reason: String,
    },
    #[error("{what} needs protocol {needs} or later; this connection speaks {version}")]
    NeedsVersion {
        what: &'static str,
        needs: Version,
        version: Version,
    },
    #[error("nar at byte {offset}: {reason}")]
    Nar { offset: u64, reason: String },
    #[error("{what}: the peer sent {kind}, which this exchange does not allow")]
    Unexpected {
        what: &'static str,
        kind: &'static str,
    },
    /// The daemon answered with `STDERR_ERROR`.
    #[error("daemon error: {0}")]
    Remote(RemoteError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl ProtocolError {
    /// Names the operation, once, however deep the call chain that failed.
    pub fn in_op(op: &'static str) -> impl FnOnce(ProtocolError) -> ProtocolError {
        move |e| match e {
            e @ ProtocolError::InOp { .. } => e,
            e => ProtocolError::InOp {
                op,
                source: Box::new(e),
            },
        }
    }

    /// True when the peer went away (end of stream).
    pub fn is_eof(&self) -> bool {
        match self {
            ProtocolError::Wire(w) => w.is_eof(),
            ProtocolError::InOp { source, .. } => source.is_eof(),
            _ => false,
        }
    }
}

pub type Result<T, E = ProtocolError> = std::result::Result<T, E>;
