//! **Test only**: `nix-store --serve [--write]` on standard input/output, backed by the
//! store named by `NIX_STORE_DIR`/`NIX_STATE_DIR`/`NIX_LOG_DIR`, building with the
//! unsandboxed [`nixb_serve::testing::UnsandboxedBuilder`]. Lets the crate's tests (and
//! real Nix clients driven by them) talk to the server in a separate process. The real
//! entry point is `nixb serve` in the cli, with the engine as builder.

use std::process::ExitCode;

use nixb_serve::server::serve;
use nixb_serve::testing::UnsandboxedBuilder;
use nixb_store::local_store::{LocalStore, StoreConfig};

fn main() -> ExitCode {
    let mut write = false;
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "--write" => write = true,
            // Accept being called as `nix-store --serve --write` by a client's ssh.
            "--serve" => {}
            other => {
                eprintln!("nixb-serve-test: unknown argument '{other}'");
                return ExitCode::from(2);
            }
        }
    }
    let store = match StoreConfig::from_env().and_then(LocalStore::open) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("nixb-serve-test: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut builder = UnsandboxedBuilder {
        log: Box::new(std::io::stderr()),
    };
    match serve(
        std::io::stdin().lock(),
        std::io::stdout().lock(),
        &store,
        &mut builder,
        write,
    ) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
