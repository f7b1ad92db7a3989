//! A private store for tests: store, state, log and conf directories under one temp dir,
//! the `nixb` binary, and real Nix 2.8 (the oracle) pointed at the same store.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// A private store: store dir, state dir, log dir and conf dir under one temp dir.
pub struct TestStore {
    pub root: tempfile::TempDir,
}

impl TestStore {
    pub fn new() -> TestStore {
        Self::with_conf("sandbox = false\nbuild-users-group =\n")
    }

    /// A store whose nix.conf holds `conf` (used by real Nix and nixb alike).
    pub fn with_conf(conf: &str) -> TestStore {
        let root = tempfile::Builder::new()
            .prefix("nixb-e2e-")
            .tempdir()
            .expect("creating a temp dir");
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(root.path().join("etc/nix.conf"), conf).unwrap();
        TestStore { root }
    }

    pub fn store_dir(&self) -> PathBuf {
        self.root.path().join("store")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.root.path().join("state")
    }

    pub fn log_dir(&self) -> PathBuf {
        self.root.path().join("log")
    }

    pub fn env(&self) -> Vec<(&'static str, PathBuf)> {
        vec![
            ("NIX_STORE_DIR", self.store_dir()),
            ("NIX_STATE_DIR", self.state_dir()),
            ("NIX_LOG_DIR", self.log_dir()),
            ("NIX_CONF_DIR", self.root.path().join("etc")),
            // Real Nix otherwise wants a writable $HOME for its caches.
            ("HOME", self.root.path().join("home")),
            ("XDG_CACHE_HOME", self.root.path().join("home/.cache")),
        ]
    }

    /// A `nixb` command with this store's environment.
    pub fn nixb(&self) -> Command {
        let mut c = Command::new(nixb_binary());
        c.envs(self.env());
        c
    }

    /// A real-Nix command (`nix-store`, `nix-instantiate`, `nix`) with this store's environment
    /// (and not a daemon's, whatever `NIX_REMOTE` says).
    pub fn nix(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.envs(self.env()).env_remove("NIX_REMOTE");
        if program == "nix" {
            c.args(["--extra-experimental-features", "nix-command"]);
        }
        c
    }

    /// Writes `text` to a file under the temp dir and returns its path.
    pub fn file(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.root.path().join("files").join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Default for TestStore {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs `cmd` (optionally with stdin), asserts success, returns stdout.
pub fn run_ok(cmd: &mut Command, stdin: Option<&[u8]>) -> Vec<u8> {
    let out = run(cmd, stdin);
    assert!(
        out.status.success(),
        "{:?} failed with {}\nstdout: {}\nstderr: {}",
        cmd,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Runs `cmd` and returns its trimmed stdout as a string, asserting success.
pub fn run_str(cmd: &mut Command, stdin: Option<&[u8]>) -> String {
    String::from_utf8(run_ok(cmd, stdin))
        .unwrap()
        .trim()
        .to_string()
}

pub fn run(cmd: &mut Command, stdin: Option<&[u8]>) -> Output {
    use std::io::Write;
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    if let Some(data) = stdin {
        let mut w = child.stdin.take().unwrap();
        let data = data.to_vec();
        // Write from a thread: a large stdin must not deadlock against a full stdout pipe.
        std::thread::spawn(move || {
            let _ = w.write_all(&data);
        });
    }
    child.wait_with_output().unwrap()
}

/// Path of the `nixb` binary, built on first use (the tests package cannot depend on a
/// binary of another package, so it asks cargo to build it).
pub fn nixb_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        // target/<profile>/deps/<test exe> -> target/<profile>
        let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "nixb-cli", "--bin", "nixb"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build for nixb");
        assert!(status.success(), "building nixb failed");
        let bin = profile_dir.join("nixb");
        assert!(bin.exists(), "nixb not found at {}", bin.display());
        bin
    })
    .clone()
}
