//! The build engine: a worker that runs goals (derivation and substitution goals) until the
//! paths the caller asked for are valid, building what is missing.
//!
//! Everything runs on one thread. The worker calls awake goals, then waits in one `poll()`
//! over its builders' log pipes and exit descriptors, with the timeout set to the nearest
//! deadline (max-silent-time, timeout, lock polling). Goals never print: they report
//! events to the caller's sink.

pub mod build_dir;
pub mod config;
pub mod env;
pub mod event;
pub mod graph;
pub mod refcheck;

pub use config::{BuildMode, WorkerConfig};
pub use event::{Event, EventSink, FailureKind, Level, NullSink, VecSink};
