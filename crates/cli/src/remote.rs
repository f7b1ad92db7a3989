//! Client mode: which store a command works on (`--store URI`, else `NIX_REMOTE`, as Nix
//! reads them), and a connection to a daemon (nixb's or Nix's) over the worker protocol.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nixb_protocol::types::ClientSettings;
use nixb_protocol::{Client, ClientInfo, StderrFrame, Version};
use nixb_store::StoreDir;

/// The store a command works on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUri {
    /// The store opened directly (`local`, or nothing said).
    Local,
    /// A daemon listening on a unix socket (`daemon`, `unix://PATH`).
    Daemon {
        socket: PathBuf,
        /// Where the choice came from and what it said, for messages:
        /// `--store 'daemon'` or `NIX_REMOTE='daemon'`.
        origin: String,
    },
}

impl StoreUri {
    /// `--store` if given, otherwise `NIX_REMOTE` if set and not empty, otherwise local.
    pub fn resolve(flag: Option<&str>) -> Result<StoreUri> {
        match flag {
            Some(v) => StoreUri::parse(v, &format!("--store '{v}'")),
            None => match std::env::var("NIX_REMOTE") {
                Ok(v) if !v.is_empty() => StoreUri::parse(&v, &format!("NIX_REMOTE='{v}'")),
                _ => Ok(StoreUri::Local),
            },
        }
    }

    /// `local`; `daemon` (the socket `NIX_DAEMON_SOCKET_PATH`, or
    /// `$NIX_STATE_DIR/daemon-socket/socket`); `unix://PATH` (`unix://` alone: the
    /// same default socket).
    pub fn parse(value: &str, origin: &str) -> Result<StoreUri> {
        let socket = match value {
            "local" => return Ok(StoreUri::Local),
            "daemon" => default_socket(),
            v => match v.strip_prefix("unix://") {
                Some("") => default_socket(),
                Some(p) if p.contains('?') => bail!(
                    "{origin}: store URI parameters (after '?') are not supported; \
                     use 'unix://PATH'"
                ),
                Some(p) => PathBuf::from(p),
                None => bail!(
                    "{origin} names a store nixb cannot open; the stores it opens are \
                     'local' (the store itself, also when nothing is set), 'daemon' (the \
                     daemon's socket, NIX_DAEMON_SOCKET_PATH or \
                     $NIX_STATE_DIR/daemon-socket/socket) and 'unix://PATH'"
                ),
            },
        };
        Ok(StoreUri::Daemon {
            socket,
            origin: origin.to_string(),
        })
    }
}

/// Where Nix's daemon listens: `NIX_DAEMON_SOCKET_PATH`, else
/// `$NIX_STATE_DIR/daemon-socket/socket` (`NIX_STATE_DIR` defaults to /nix/var/nix).
pub fn default_socket() -> PathBuf {
    if let Some(p) = std::env::var_os("NIX_DAEMON_SOCKET_PATH").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let state = std::env::var_os("NIX_STATE_DIR")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/nix/var/nix"));
    state.join("daemon-socket/socket")
}

/// The store directory the daemon's paths are printed in: the client's own
/// (`NIX_STORE_DIR`), as Nix's client assumes.
pub fn store_dir() -> Result<StoreDir> {
    Ok(nixb_store::local_store::StoreConfig::from_env()
        .context("reading the store location from the environment")?
        .store_dir)
}

/// A connection to a daemon.
pub struct Remote {
    pub client: Client<UnixStream, UnixStream>,
    pub dir: StoreDir,
    pub socket: PathBuf,
}

impl Remote {
    /// Connects to the daemon on `socket`, shows what it says on greeting (on stderr,
    /// through `on_frame`) and sends `settings` (Nix's client always sends its options
    /// first).
    pub fn connect(
        socket: &Path,
        origin: &str,
        settings: &ClientSettings,
        on_frame: &mut dyn FnMut(&StderrFrame),
    ) -> Result<Remote> {
        let dir = store_dir()?;
        let ctx = || {
            format!(
                "connecting to the daemon at {} ({origin})",
                socket.display()
            )
        };
        let stream = UnixStream::connect(socket).with_context(ctx)?;
        let reader = stream.try_clone().with_context(ctx)?;
        let info = ClientInfo {
            version: Version::MAX,
            features: Default::default(),
        };
        let mut client = Client::connect(reader, stream, dir.clone(), &info).with_context(ctx)?;
        for f in &client.startup_frames {
            on_frame(f);
        }
        client
            .set_options(settings)
            .with_context(|| format!("sending options to the daemon at {}", socket.display()))?;
        Ok(Remote {
            client,
            dir,
            socket: socket.to_path_buf(),
        })
    }

    /// Connects with default options (verbosity as `-v`/`-q` say), for the commands
    /// that read no settings.
    pub fn connect_plain(socket: &Path, origin: &str) -> Result<Remote> {
        let settings = ClientSettings {
            verbosity: u64::from(crate::render::nix_verbosity()),
            ..ClientSettings::default()
        };
        Remote::connect(socket, origin, &settings, &mut |f| {
            if let StderrFrame::Next(line) = f {
                if crate::render::verbosity() >= 1 {
                    eprint!("{}", String::from_utf8_lossy(line));
                }
            }
        })
    }

    /// The context for an operation's error: `asking the daemon at SOCKET to WHAT`.
    pub fn ctx(&self, what: impl std::fmt::Display) -> String {
        format!("asking the daemon at {} to {what}", self.socket.display())
    }
}

/// The daemon's own error (`STDERR_ERROR`) inside `e`, if that is what `e` is.
pub fn remote_error(e: &nixb_protocol::ProtocolError) -> Option<&nixb_protocol::RemoteError> {
    match e {
        nixb_protocol::ProtocolError::Remote(r) => Some(r),
        nixb_protocol::ProtocolError::InOp { source, .. } => remote_error(source),
        _ => None,
    }
}

/// A daemon's error as Nix's client reports it (the daemon's message alone), any other
/// failure of the exchange with what was being asked.
pub fn op_error(remote: &Remote, what: &str, e: nixb_protocol::ProtocolError) -> anyhow::Error {
    match remote_error(&e) {
        Some(r) => anyhow::anyhow!("{}", crate::render::daemon_text(&r.message)),
        None => anyhow::Error::new(e).context(remote.ctx(what)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_uris_as_nix_reads_them() {
        assert_eq!(StoreUri::parse("local", "x").unwrap(), StoreUri::Local);
        assert_eq!(
            StoreUri::parse("unix:///run/d.sock", "x").unwrap(),
            StoreUri::Daemon {
                socket: "/run/d.sock".into(),
                origin: "x".into()
            }
        );
        let StoreUri::Daemon { socket, .. } = StoreUri::parse("daemon", "x").unwrap() else {
            panic!("daemon is a daemon store");
        };
        assert_eq!(socket, default_socket());
        let e = StoreUri::parse("ssh://host", "--store 'ssh://host'")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--store 'ssh://host' names a store"), "{e}");
        assert!(e.contains("'unix://PATH'"), "{e}");
        assert!(StoreUri::parse("unix:///s?trusted=1", "x").is_err());
    }
}
