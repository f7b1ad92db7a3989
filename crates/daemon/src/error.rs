//! The daemon's errors. Most are reported to the client that caused them (as Nix's
//! `STDERR_ERROR`) and end only that operation; `Protocol` errors leave the stream out of
//! step and end the connection.

use nixb_protocol::ProtocolError;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("{0}")]
    Wire(#[from] nixb_protocol::wire::WireError),
    #[error(transparent)]
    Store(#[from] nixb_store::local_store::StoreError),
    #[error(transparent)]
    Import(#[from] nixb_serve::ServeError),
    #[error(transparent)]
    Goals(#[from] nixb_goals::GoalsError),
    #[error(transparent)]
    Gc(#[from] nixb_gc::GcError),
    #[error(transparent)]
    Optimise(#[from] nixb_store::optimise::OptimiseError),
    #[error(transparent)]
    Db(#[from] nixb_store::db::DbError),
    #[error("{step} '{path}': {source}")]
    Io {
        step: &'static str,
        path: String,
        source: std::io::Error,
    },
    /// Refused for this client (untrusted, not allowed, not supported yet); the message
    /// is what the client prints.
    #[error("{0}")]
    Refused(String),
    /// The answer broke off after it had started (a NAR whose dump failed half-way):
    /// nothing more can be said on this connection.
    #[error("{0}")]
    Broken(String),
    /// A build the client asked for failed; `status` is Nix's exit status for it.
    #[error("{message}")]
    Build { status: u64, message: String },
    #[error("socket '{path}': {source}")]
    Socket {
        path: String,
        source: std::io::Error,
    },
}

pub type Result<T, E = DaemonError> = std::result::Result<T, E>;
