//! `nixb daemon`: the Nix daemon protocol on this store, for Nix's own clients. Listens on
//! `--socket`, else `NIX_DAEMON_SOCKET_PATH`, else `$NIX_STATE_DIR/daemon-socket/socket`;
//! `--stdio` serves one trusted connection on stdin/stdout, as `nix-daemon --stdio`.
//! Started by a systemd socket unit (`LISTEN_FDS=1`, `LISTEN_PID` our pid), it serves the
//! socket systemd passes as descriptor 3 instead, as `nix-daemon` does.

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
        gc: nixb_daemon::GcConfig {
            keep_outputs: settings.keep_outputs,
            keep_derivations: settings.keep_derivations,
        },
    };
    let daemon = Arc::new(Daemon::new(store, config));
    if args.stdio {
        // Standard input, polled while builds run: a client that goes away cancels them.
        let watch = std::os::fd::AsFd::as_fd(&std::io::stdin())
            .try_clone_to_owned()
            .context("duplicating standard input")?;
        daemon
            .serve_with(
                std::io::stdin().lock(),
                std::io::stdout().lock(),
                true,
                Some(nixb_daemon::hangup::Hangup::of(watch)),
            )
            .context("serving the connection on stdin/stdout")?;
        return Ok(0);
    }
    let (listener, stopper) = match systemd_socket()? {
        Some(fd) => {
            let (listener, path) = nixb_daemon::listen::from_systemd(fd)?;
            (listener, Stopper::for_activated(&path))
        }
        None => (nixb_daemon::listen::bind(&socket)?, Stopper::new(&socket)),
    };
    // Before any other thread exists, so that all of them leave the signals to one.
    nixb_daemon::listen::stop_on_signals(stopper.clone())?;
    daemon.listen(listener, &stopper)?;
    Ok(0)
}

/// The socket systemd passes (descriptor 3) when `LISTEN_FDS` is set: exactly one, for
/// this process, as `nix-daemon` accepts it.
fn systemd_socket() -> Result<Option<std::os::fd::OwnedFd>> {
    let Some(fds) = std::env::var_os("LISTEN_FDS") else {
        return Ok(None);
    };
    let pid = std::env::var_os("LISTEN_PID").unwrap_or_default();
    if pid.to_str() != Some(std::process::id().to_string().as_str()) || fds != "1" {
        anyhow::bail!(
            "unexpected systemd environment variables: LISTEN_FDS={:?} LISTEN_PID={:?} \
             (expected one socket for process {})",
            fds,
            pid,
            std::process::id()
        );
    }
    if nix::fcntl::fcntl(3, nix::fcntl::FcntlArg::F_GETFD).is_err() {
        anyhow::bail!("LISTEN_FDS=1, but descriptor 3 (the socket from systemd) is not open");
    }
    // Builders and other children must not take the variables for their own.
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDNAMES");
    // SAFETY: descriptor 3 is open (checked above), was given to this process by
    // systemd for it alone, and nothing else in the process takes ownership of it.
    Ok(Some(unsafe {
        <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(3)
    }))
}
