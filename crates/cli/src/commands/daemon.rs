//! `nixb daemon`: the Nix daemon protocol on this store, for Nix's own clients. Listens on
//! `--socket`, else `NIX_DAEMON_SOCKET_PATH`, else `$NIX_STATE_DIR/daemon-socket/socket`;
//! `--stdio` serves one trusted connection on stdin/stdout, as `nix-daemon --stdio`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use nixb_daemon::{Daemon, DaemonConfig, Stopper, TrustConfig};

#[derive(Args)]
pub struct DaemonArgs {
    /// Serve one connection on stdin/stdout instead of listening on a socket
    #[arg(long, conflicts_with = "socket")]
    pub stdio: bool,
    /// The socket to listen on
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

pub fn run(args: DaemonArgs, options: &[String]) -> Result<u8> {
    let settings = super::settings(options)?;
    let store = super::open_store()?;
    let socket = match (&args.socket, std::env::var_os("NIX_DAEMON_SOCKET_PATH")) {
        (Some(p), _) => p.clone(),
        (None, Some(p)) if !p.is_empty() => PathBuf::from(p),
        _ => store.config().state_dir.join("daemon-socket/socket"),
    };
    let config = DaemonConfig {
        worker: super::realise::settings_worker_config(&settings, &store),
        trust: TrustConfig {
            trusted_users: settings.trusted_users.clone(),
            allowed_users: settings.allowed_users.clone(),
        },
        nix_version: format!("nixb {}", env!("CARGO_PKG_VERSION")),
    };
    let daemon = Arc::new(Daemon::new(store, config));
    if args.stdio {
        daemon
            .serve(std::io::stdin().lock(), std::io::stdout().lock(), true)
            .context("serving the connection on stdin/stdout")?;
        return Ok(0);
    }
    let stopper = Stopper::new(&socket);
    // Before any other thread exists, so that all of them leave the signals to one.
    nixb_daemon::listen::stop_on_signals(stopper.clone())?;
    let listener = nixb_daemon::listen::bind(&socket)?;
    daemon.listen(listener, &stopper)?;
    Ok(0)
}
