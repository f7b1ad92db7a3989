//! What the worker reports while it runs. Goals never print: they hand [`Event`]s to the
//! [`EventSink`] the caller gave [`crate::realise`], and the caller renders them (progress
//! line, plain log lines, `@ build-started` trace lines, JSON ...).

use std::path::PathBuf;

use nixb_store::StorePath;

use crate::config::BuildMode;

/// Why a build failed, for renderers and for the exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The builder exited unsuccessfully or produced bad outputs.
    BuilderFailed,
    /// max-silent-time or timeout ran out.
    TimedOut,
    /// max-build-log-size was exceeded.
    LogLimitExceeded,
    /// A fixed-output derivation produced content with another hash.
    HashMismatch,
    /// `--check` found an output that differs from the registered one.
    NotDeterministic,
    /// The failed-path cache says this derivation failed before.
    CachedFailure,
    /// An input derivation could not be built.
    DependencyFailed,
    /// Setting up the build failed before the builder ran (tmp dir, env, spawn ...).
    SetupFailed,
}

/// How loud a [`Event::Message`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A builder process was started for `drv`, producing `outputs`.
    BuildStarted {
        drv: StorePath,
        outputs: Vec<StorePath>,
        mode: BuildMode,
        platform: String,
        /// Where the build log goes, if it is kept.
        log_file: Option<PathBuf>,
    },
    /// Bytes the builder wrote to stdout/stderr, in the order they arrived.
    BuildLog { drv: StorePath, chunk: Vec<u8> },
    /// The builder of `drv` has exited (and been reaped): what it and its descendants used.
    /// Comes before the build's `BuildSucceeded` or `BuildFailed`.
    BuildResources {
        drv: StorePath,
        usage: nixb_sandbox::ResourceUsage,
    },
    /// The outputs of `drv` were built and registered (or checked, under `--check`).
    BuildSucceeded { drv: StorePath },
    /// A derivation goal failed. `permanent` is the original's "permanent failure": it
    /// would fail again and is worth caching.
    BuildFailed {
        drv: StorePath,
        kind: FailureKind,
        reason: String,
        permanent: bool,
    },
    /// A substituter was started to fetch `path` (`@ substituter-started PATH SUB`).
    SubstituterStarted {
        path: StorePath,
        substituter: String,
    },
    /// Bytes a substituter wrote to its standard error.
    SubstituterLog { path: StorePath, chunk: Vec<u8> },
    /// `path` was substituted and registered (`@ substituter-succeeded PATH`).
    SubstituterSucceeded { path: StorePath },
    /// A substituter failed to provide `path`; the next one is tried
    /// (`@ substituter-failed PATH STATUS MSG`). `status` is the raw wait status, or
    /// `timeout`.
    SubstituterFailed {
        path: StorePath,
        status: String,
        message: String,
    },
    /// A line the build hook wrote on its standard error (messages, not the build log).
    HookOutput { drv: StorePath, text: String },
    /// The build hook itself failed (not the remote build: that is `BuildFailed`),
    /// `@ hook-failed DRV - STATUS MSG`.
    HookFailed {
        drv: StorePath,
        status: String,
        message: String,
    },
    /// A derivation goal found outputs that neither are valid nor could be substituted:
    /// `drv` will be built (here or through the hook). Counting these gives a progress
    /// display its total; it grows as the worker discovers the graph.
    BuildPlanned { drv: StorePath },
    /// Some goal is waiting for a lock held by another process or for a build slot.
    WaitingForLocks,
    /// Anything else worth telling the user (notes, warnings, corrupted paths ...).
    Message { level: Level, text: String },
}

/// Receives the worker's events: a client's end of the scheduler.
pub trait EventSink {
    fn event(&mut self, e: Event);

    /// Protects `p` from garbage collectors for as long as this client needs it, for a
    /// client that keeps temporary roots of its own (a daemon connection: until the
    /// connection ends). Called for the paths the goals this client needs are using, and
    /// again for those a goal had taken before the client needed it. `None`: the client
    /// keeps no roots, and the store's own (the process's) hold them.
    fn keep_temp_root(&mut self, _p: &StorePath) -> Option<Result<(), String>> {
        None
    }
}

/// Collects events into a vector (handy for tests and for callers that render later).
#[derive(Debug, Default)]
pub struct VecSink(pub Vec<Event>);

impl EventSink for VecSink {
    fn event(&mut self, e: Event) {
        self.0.push(e);
    }
}

/// Drops every event.
#[derive(Debug, Default)]
pub struct NullSink;

impl EventSink for NullSink {
    fn event(&mut self, _e: Event) {}
}

impl<F: FnMut(Event)> EventSink for F {
    fn event(&mut self, e: Event) {
        self(e)
    }
}
