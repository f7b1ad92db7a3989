//! Errors of the build engine.
//!
//! Two kinds are kept apart. A [`GoalsError`] ends `realise` (the store cannot be read, no
//! build can ever start). A failure of one derivation is not an error: it is reported as an
//! event and in the outcome, and the worker goes on (or stops, without keep-going).

use std::path::PathBuf;

use nixb_store::StorePath;

use crate::event::FailureKind;

#[derive(Debug, thiserror::Error)]
pub enum GoalsError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreFault),
    /// `max-jobs` is 0 and no build hook took the waiting builds: without a hook, the
    /// remedy is more local jobs or remote builders; with one, its machines lacked what
    /// the builds require (the hook has said which, and which machines it considered).
    #[error("unable to start any build; {}", if *.remote {
        "remote machines may not have all required system features"
    } else {
        "either increase '--max-jobs' or enable remote builds"
    })]
    NoBuildSlots { remote: bool },
    #[error("waiting for builders: {0}")]
    Poll(nix::errno::Errno),
    #[error("{step} '{}': {source}", path.display())]
    Io {
        step: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("internal error: {0}")]
    Internal(String),
    /// The shared engine ([`crate::Engine`]) stopped (shut down, or its thread died)
    /// before the request was done.
    #[error("the build engine stopped before the request was done")]
    EngineStopped,
    #[error("starting the build engine's thread: {0}")]
    EngineThread(std::io::Error),
}

/// Why one goal failed; becomes an [`crate::Event::BuildFailed`] and a [`crate::Failure`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum BuildError {
    /// The build itself failed: the builder, its outputs, or the derivation's own rules.
    #[error("{0}")]
    Build(String),
    /// Anything else on the way (store, file system, spawning).
    #[error("{0}")]
    Misc(String),
}

impl BuildError {
    pub(crate) fn misc(context: impl std::fmt::Display, e: impl std::fmt::Display) -> BuildError {
        BuildError::Misc(format!("{context}: {e}"))
    }
}

impl From<crate::store::StoreFault> for BuildError {
    fn from(e: crate::store::StoreFault) -> Self {
        BuildError::Misc(e.to_string())
    }
}

/// Why the outputs of a build were rejected (or the build could not be finished).
#[derive(Debug)]
pub(crate) struct Rejection {
    pub kind: FailureKind,
    pub message: String,
    /// The derivation's fault: it would fail again (cacheable, exit status 100).
    pub permanent: bool,
}

impl Rejection {
    pub fn build(kind: FailureKind, message: String) -> Rejection {
        Rejection {
            kind,
            message,
            permanent: true,
        }
    }

    pub fn misc(message: String) -> Rejection {
        Rejection {
            kind: FailureKind::SetupFailed,
            message,
            permanent: false,
        }
    }
}

impl From<BuildError> for Rejection {
    fn from(e: BuildError) -> Self {
        match e {
            BuildError::Build(m) => Rejection::build(FailureKind::BuilderFailed, m),
            BuildError::Misc(m) => Rejection::misc(m),
        }
    }
}

impl From<crate::store::StoreFault> for Rejection {
    fn from(e: crate::store::StoreFault) -> Self {
        Rejection::misc(e.to_string())
    }
}

/// A path named in an error message.
pub(crate) fn quoted(store: &nixb_store::StoreDir, p: &StorePath) -> String {
    format!("'{}'", store.print(p))
}
