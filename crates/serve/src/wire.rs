//! The wire encoding (u64 little endian, padded strings, string lists) that
//! `nix-store --serve` shares with the worker protocol and the export format. It lives in
//! [`nixb_protocol::wire`]; this module re-exports it so that there is one copy.

pub use nixb_protocol::wire::*;
