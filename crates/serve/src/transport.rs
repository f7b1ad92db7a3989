//! Reaching a serving peer: a child process whose standard input and output carry the
//! protocol and whose standard error carries the remote's messages and build logs.
//! [`SshTarget`] runs `nix-store --serve --write` on a machine through `ssh` (as Nix's
//! legacy SSH store: `-x -a -oBatchMode=yes`, the machine's key and pinned host key);
//! [`spawn_serving`] runs any command, e.g. a local `nix-store --serve --write` against a
//! private store in tests.
//!
//! Standard error is drained by a thread (a full pipe would stall the remote) into a
//! caller-given sink, and its tail is kept so that a peer that dies during the handshake
//! (ssh cannot connect, `nix-store` missing) is reported with what it said.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nixb_store::StoreDir;

use crate::client::ServeClient;
use crate::error::ServeError;

/// How much of the peer's standard error is kept for error messages.
const STDERR_TAIL: usize = 16 * 1024;

pub type ChildClient = ServeClient<ChildStdout, ChildStdin>;

/// The process behind a [`ChildClient`].
pub struct ServeChild {
    child: Child,
    stderr_thread: Option<JoinHandle<()>>,
    tail: Arc<Mutex<Vec<u8>>>,
    program: String,
}

impl ServeChild {
    /// The last bytes the peer wrote to standard error.
    pub fn stderr_tail(&self) -> String {
        let t = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&t).into_owned()
    }

    /// Waits for the peer to exit (after the client was closed) and for its standard
    /// error to be drained; returns its exit status.
    pub fn wait(mut self) -> Result<std::process::ExitStatus, ServeError> {
        let status = self.child.wait().map_err(|source| ServeError::Spawn {
            program: self.program.clone(),
            source,
        })?;
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
        Ok(status)
    }

    /// Kills the peer (when a session is abandoned mid-request).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
    }
}

fn drain_stderr(
    mut from: impl Read + Send + 'static,
    mut sink: Box<dyn Write + Send>,
    tail: Arc<Mutex<Vec<u8>>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            // A sink that fails (its reader went away) must not stop the draining.
            let _ = sink.write_all(&buf[..n]);
            let _ = sink.flush();
            let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
            t.extend_from_slice(&buf[..n]);
            if t.len() > STDERR_TAIL {
                let cut = t.len() - STDERR_TAIL;
                t.drain(..cut);
            }
        }
    })
}

/// Starts `cmd` and opens a serve session with it. `peer` names it in errors; the
/// child's standard error goes to `log`.
pub fn spawn_serving(
    mut cmd: Command,
    peer: &str,
    store_dir: StoreDir,
    log: Box<dyn Write + Send>,
) -> Result<(ChildClient, ServeChild), ServeError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| {
        ServeError::peer(
            peer,
            ServeError::Spawn {
                program: program.clone(),
                source,
            },
        )
    })?;
    let tail = Arc::new(Mutex::new(Vec::new()));
    let stderr_thread = child
        .stderr
        .take()
        .map(|e| drain_stderr(e, log, tail.clone()));
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        let _ = child.kill();
        return Err(ServeError::peer(
            peer,
            ServeError::Spawn {
                program,
                source: std::io::Error::other("no pipes to the child"),
            },
        ));
    };
    let mut handle = ServeChild {
        child,
        stderr_thread,
        tail,
        program,
    };
    match ServeClient::new(stdout, stdin, store_dir, peer) {
        Ok(c) => Ok((c, handle)),
        Err(e) => {
            // The child most likely died (ssh could not connect). Our ends of its pipes
            // are closed now; give it a moment to exit on its own so that everything it
            // said is in the tail, then make sure it is gone.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while std::time::Instant::now() < deadline {
                match handle.child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) => std::thread::sleep(std::time::Duration::from_millis(20)),
                }
            }
            let _ = handle.child.kill();
            let _ = handle.child.wait();
            if let Some(t) = handle.stderr_thread.take() {
                let _ = t.join();
            }
            let said = handle.stderr_tail();
            Err(attach_stderr(e, said))
        }
    }
}

fn attach_stderr(e: ServeError, said: String) -> ServeError {
    match e {
        ServeError::Peer { peer, source } => ServeError::Peer {
            peer,
            source: Box::new(attach_stderr(*source, said)),
        },
        ServeError::HandshakeEof { .. } => ServeError::HandshakeEof { stderr: said },
        ServeError::BadMagic { expected, got, .. } => ServeError::BadMagic {
            expected,
            got,
            stderr: said,
        },
        e if said.trim().is_empty() => e,
        e => ServeError::HandshakeFailed {
            reason: e.to_string(),
            stderr: said,
        },
    }
}

/// How to reach a machine over SSH.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SshTarget {
    /// `[user@]host`, as ssh takes it.
    pub host: String,
    pub port: Option<u16>,
    /// Private key file (`-i`).
    pub key: Option<PathBuf>,
    /// The host's public key line (`ssh-ed25519 AAAA...`), pinned through a private
    /// known-hosts file so no interactive confirmation is ever needed.
    pub public_host_key: Option<String>,
    /// Command run remotely, `nix-store` by default.
    pub remote_program: String,
    /// Extra options given before the host (tests point `-F` at their own config).
    pub extra_args: Vec<String>,
}

impl SshTarget {
    pub fn new(host: impl Into<String>) -> SshTarget {
        SshTarget {
            host: host.into(),
            port: None,
            key: None,
            public_host_key: None,
            remote_program: "nix-store".into(),
            extra_args: Vec::new(),
        }
    }

    /// The `ssh` command line; `known_hosts` is the file holding the pinned key.
    pub fn command(&self, known_hosts: Option<&std::path::Path>) -> Command {
        let mut c = Command::new("ssh");
        // No X11 or agent forwarding, never prompt: a build machine must not be able to
        // reach back into the user's session, and a prompt would hang the build.
        c.args(["-x", "-a", "-oBatchMode=yes"]);
        if let Some(p) = self.port {
            c.arg("-p").arg(p.to_string());
        }
        if let Some(k) = &self.key {
            c.arg("-i").arg(k);
        }
        if let Some(f) = known_hosts {
            c.arg(format!("-oUserKnownHostsFile={}", f.display()));
            c.arg("-oStrictHostKeyChecking=yes");
        }
        c.args(&self.extra_args);
        c.arg(&self.host);
        c.arg("--");
        c.arg(&self.remote_program).args(["--serve", "--write"]);
        c
    }

    /// Connects: runs `ssh` and opens a serve session. An unreachable machine, refused
    /// key or missing `nix-store` is an error naming `ssh://host` with ssh's own words.
    pub fn connect(
        &self,
        store_dir: StoreDir,
        log: Box<dyn Write + Send>,
    ) -> Result<(ChildClient, ServeChild, Option<tempfile_lite::TempFile>), ServeError> {
        let peer = match self.port {
            Some(p) => format!("ssh://{}:{p}", self.host),
            None => format!("ssh://{}", self.host),
        };
        let known = match &self.public_host_key {
            Some(k) => {
                let host = self.host.rsplit('@').next().unwrap_or(&self.host);
                let host = match self.port {
                    Some(p) => format!("[{host}]:{p}"),
                    None => host.to_string(),
                };
                Some(
                    tempfile_lite::TempFile::with_contents(
                        format!("{host} {}\n", k.trim()).as_bytes(),
                    )
                    .map_err(|source| ServeError::Io {
                        step: "writing known hosts file for",
                        path: peer.clone(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        let cmd = self.command(known.as_ref().map(|k| k.path()));
        let (c, h) = spawn_serving(cmd, &peer, store_dir, log)?;
        Ok((c, h, known))
    }
}

/// A temporary file removed on drop (the pinned known-hosts file must outlive the ssh
/// process, so the caller keeps it with the session).
pub mod tempfile_lite {
    use std::io::Write;
    use std::path::{Path, PathBuf};

    pub struct TempFile(PathBuf);

    impl TempFile {
        pub fn with_contents(data: &[u8]) -> std::io::Result<TempFile> {
            use std::sync::atomic::{AtomicU64, Ordering};
            static N: AtomicU64 = AtomicU64::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let p =
                std::env::temp_dir().join(format!("nixb-known-hosts-{}-{n}", std::process::id()));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&p)?;
            f.write_all(data)?;
            Ok(TempFile(p))
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}
