//! Harness for nixb's end-to-end tests: the private store, the `nixb` binary and the
//! command helpers of [`nixb_testsupport::store`], under the names the tests use.
//!
//! Oracle tests start with `nixb_testsupport::require!(Nix)`: under `CI=true` a missing
//! `nix-store` fails them (the test command installs `nix-bin`); elsewhere they are skipped
//! with a `SKIPPED` line on stderr.

#![forbid(unsafe_code)]

pub use nixb_testsupport::store::{nixb_binary, run, run_ok, run_str, TestStore};
