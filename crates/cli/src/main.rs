#![doc = include_str!("../README.md")]

mod commands;
mod remote;
mod render;
mod settings;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// A Nix-compatible build engine: realise derivations into a Nix store that real Nix can share.
///
/// Locations come from the environment, as for Nix: NIX_STORE_DIR (default /nix/store),
/// NIX_STATE_DIR (/nix/var/nix), NIX_LOG_DIR (/nix/var/log/nix), NIX_CONF_DIR (/etc/nix;
/// settings are read from its nix.conf).
#[derive(Parser)]
#[command(name = "nixb", version, propagate_version = true, max_term_width = 100)]
pub struct Cli {
    /// Say more about what happens (repeat for more)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only print errors
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Override a setting from nix.conf (may be repeated; refused by commands that read no
    /// settings)
    #[arg(long = "option", global = true, num_args = 2, value_names = ["NAME", "VALUE"], action = clap::ArgAction::Append)]
    pub options: Vec<String>,
    /// The store: 'local', 'daemon' or 'unix://PATH' (a daemon's socket, nixb's or Nix's);
    /// NIX_REMOTE if not given. realise, query, add and log work through a daemon; the others
    /// refuse one
    #[arg(long, global = true, value_name = "URI")]
    pub store: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Build or fetch derivation outputs and print their paths
    #[command(after_help = "\
Examples:
  nixb realise /nix/store/…-hello.drv            build every output of hello
  nixb realise '/nix/store/…-hello.drv!out,dev'  build only out and dev
  nixb realise --max-jobs 4 --keep-going A.drv B.drv
  nixb realise --check /nix/store/…-hello.drv    rebuild and compare with the registered outputs

Exit status: 0 success, 100 a build failed (+1 timed out, +2 fixed-output hash mismatch,
+4 not deterministic under --check), 1 any other error.")]
    Realise(commands::realise::RealiseArgs),
    /// Query the validity database
    #[command(after_help = "\
Examples:
  nixb query --outputs /nix/store/…-hello.drv
  nixb query --requisites /nix/store/…-hello-2.12
  nixb query --hash /nix/store/…-hello-2.12")]
    Query(commands::query::QueryArgs),
    /// Print the build log of a derivation or of an output path (decompressed)
    #[command(after_help = "Example:\n  nixb log /nix/store/…-hello.drv")]
    Log(commands::log::LogArgs),
    /// Add files or directories to the store, as `nix-store --add`, and print their paths
    #[command(after_help = "Example:\n  nixb add ./builder.sh ./src")]
    Add(commands::add::AddArgs),
    /// Write derivations into the store, or show them as JSON
    #[command(subcommand)]
    Derivation(commands::derivation::DerivationCommand),
    /// Write the NAR serialisation of a path to stdout
    #[command(after_help = "Example:\n  nixb dump /nix/store/…-hello-2.12 > hello.nar")]
    Dump(commands::nar::DumpArgs),
    /// Unpack a NAR from stdin into DEST (which must not exist)
    #[command(after_help = "Example:\n  nixb restore ./unpacked < hello.nar")]
    Restore(commands::nar::RestoreArgs),
    /// Hash a path (its NAR serialisation) or a file (its contents)
    #[command(subcommand)]
    Hash(commands::hash::HashCommand),
    /// Check the validity database against the store
    #[command(after_help = "Example:\n  nixb verify --check-contents")]
    Verify(commands::verify::VerifyArgs),
    /// Collect garbage: delete store paths no root keeps alive (as nix-store --gc)
    Gc(commands::gc::GcArgs),
    /// A substituter for Nix binary caches, speaking the engine's external-program protocol
    #[command(after_help = "\
Examples:
  nixb substitute --cache file:///srv/cache --query       then 'info /nix/store/…-hello' on stdin
  nixb substitute --substitute /nix/store/…-hello /tmp/x  unpack, print the expected hash

Without --cache, the file://, http:// and https:// entries of `substituters` are used.")]
    Substitute(commands::substitute::SubstituteArgs),
    /// Copy the closure of store paths into a file:// binary cache (signed with secret-key-files)
    #[command(after_help = "Example:\n  nixb copy --to file:///srv/cache /nix/store/…-hello-2.12")]
    Copy(commands::copy::CopyArgs),
    /// Serve this store with the `nix-store --serve` protocol on stdin/stdout
    #[command(after_help = "\
Example (as the forced command of an SSH key, so that other machines can build here):
  command=\"nixb serve --write\" ssh-ed25519 AAAA... builder@client")]
    Serve(commands::serve::ServeArgs),
    /// The build hook: offload builds to the machines of `builders` over SSH
    #[command(after_help = "\
The engine runs it itself when `builders` is set; by hand:
  echo '1 x86_64-linux /nix/store/…-hello.drv ' | nixb build-remote x86_64-linux 0 0 0")]
    BuildRemote(commands::build_remote::BuildRemoteArgs),
    /// Serve this store to Nix clients with the Nix daemon protocol (as `nix-daemon`)
    #[command(after_help = "\
Example (then `NIX_REMOTE=daemon nix-build ...` builds through nixb):
  nixb daemon                      # on $NIX_STATE_DIR/daemon-socket/socket
  nixb daemon --socket /tmp/nixb.sock
  nixb daemon --stdio              # one connection on stdin/stdout (ssh-ng://)
Started by a systemd socket unit (LISTEN_FDS=1, LISTEN_PID), it serves the socket
systemd passes as descriptor 3 and leaves that socket's file in place when it stops.")]
    Daemon(commands::daemon::DaemonArgs),
}

/// Flags shared by commands that print hashes.
#[derive(Args, Clone, Copy)]
pub struct HashFormat {
    /// Print in base16
    #[arg(long, group = "fmt")]
    pub base16: bool,
    /// Print in Nix's base32
    #[arg(long, group = "fmt")]
    pub base32: bool,
    /// Print in base64
    #[arg(long, group = "fmt")]
    pub base64: bool,
    /// Print as an SRI hash (the default)
    #[arg(long, group = "fmt")]
    pub sri: bool,
}

fn main() -> ExitCode {
    // A builder of a `builtin:` derivation (started by the worker, never by hand): no
    // command line of nixb's own, the derivation's environment only.
    let mut args = std::env::args_os();
    if args
        .nth(1)
        .is_some_and(|a| a == nixb_goals::builtins::BUILTIN_ARG)
    {
        let name = args.next().map(|n| n.to_string_lossy().into_owned());
        return ExitCode::from(nixb_goals::builtins::main(name.as_deref()));
    }
    let cli = Cli::parse();
    render::init(cli.verbose, cli.quiet);
    match commands::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            render::error(&e);
            ExitCode::from(1)
        }
    }
}
