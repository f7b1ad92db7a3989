//! Shared test fixtures: private stores (nixb's `LocalStore` and a real Nix 2.8 store)
//! that share one *logical* store directory but live in different physical places. The
//! real `nix-store --serve --write` runs in its own mount namespace, where the store
//! directory is bind-mounted from the remote's private copy; so copying between the two
//! really moves bytes, exactly as between two machines.

#![allow(dead_code)]

pub mod netns;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use nixb_serve::transport::{spawn_serving, ChildClient, ServeChild};
use nixb_store::derivation::{compute_output_paths, Derivation, DerivationOutput, DrvHashCache};
use nixb_store::local_store::{LocalStore, StoreConfig};
use nixb_store::{StoreDir, StorePath};

pub struct World {
    pub root: tempfile::TempDir,
    pub store_dir: StoreDir,
}

impl World {
    pub fn new() -> World {
        let root = tempfile::tempdir().unwrap();
        let store = root.path().join("store");
        std::fs::create_dir_all(&store).unwrap();
        let store_dir = StoreDir::new(store.to_str().unwrap()).unwrap();
        World { root, store_dir }
    }

    pub fn path(&self, s: &str) -> PathBuf {
        self.root.path().join(s)
    }

    /// nixb's local store on the real store directory.
    pub fn local(&self, name: &str) -> LocalStore {
        LocalStore::open(StoreConfig {
            store_dir: self.store_dir.clone(),
            state_dir: self.path(&format!("{name}/state")),
            log_dir: self.path(&format!("{name}/log")),
        })
        .unwrap()
    }

    /// The command running real `nix-store --serve --write` for remote `name`, whose
    /// store directory is `<root>/<name>/phys` mounted over the shared logical one.
    pub fn nix_serve_command(&self, name: &str) -> Command {
        let phys = self.remote_phys(name);
        let etc = self.path(&format!("{name}/etc"));
        std::fs::create_dir_all(&phys).unwrap();
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(
            etc.join("nix.conf"),
            "sandbox = false\nbuild-users-group =\nsubstituters =\n",
        )
        .unwrap();
        let mut c = Command::new("unshare");
        c.args(["--mount", "--propagation", "private", "sh", "-c"]);
        c.arg(r#"mount --bind "$1" "$2" && exec nix-store --serve --write"#);
        c.arg("sh").arg(&phys).arg(self.store_dir.as_str());
        self.nix_env(&mut c, name);
        c
    }

    pub fn remote_phys(&self, name: &str) -> PathBuf {
        self.path(&format!("{name}/phys"))
    }

    fn nix_env(&self, c: &mut Command, name: &str) {
        c.env("NIX_STORE_DIR", self.store_dir.as_str())
            .env("NIX_STATE_DIR", self.path(&format!("{name}/state")))
            .env("NIX_LOG_DIR", self.path(&format!("{name}/log")))
            .env("NIX_CONF_DIR", self.path(&format!("{name}/etc")))
            .env_remove("NIX_REMOTE");
    }

    /// Runs a real `nix-store` command against remote `name` (in its namespace).
    pub fn nix_store(&self, name: &str, args: &[&str]) -> String {
        let mut c = Command::new("unshare");
        c.args(["--mount", "--propagation", "private", "sh", "-c"]);
        c.arg(r#"mount --bind "$1" "$2" && shift 2 && exec nix-store "$@""#);
        c.arg("sh")
            .arg(self.remote_phys(name))
            .arg(self.store_dir.as_str())
            .args(args);
        self.nix_env(&mut c, name);
        let o = c.output().unwrap();
        assert!(
            o.status.success(),
            "nix-store {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    pub fn connect_nix(&self, name: &str) -> (ChildClient, ServeChild, Log) {
        let log = Log::default();
        let (c, h) = spawn_serving(
            self.nix_serve_command(name),
            &format!("nix-store --serve ({name})"),
            self.store_dir.clone(),
            Box::new(log.clone()),
        )
        .unwrap();
        (c, h, log)
    }
}

/// A log sink the test can read afterwards.
#[derive(Clone, Default)]
pub struct Log(pub Arc<Mutex<Vec<u8>>>);

impl Log {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Log {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A source file and a script referring to it, added to `store`; returns (file, script).
pub fn add_sources(w: &World, store: &LocalStore, tag: &str) -> (StorePath, StorePath) {
    let src = w.path(&format!("src-{tag}"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("data"), format!("payload {tag}\n")).unwrap();
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::os::unix::fs::symlink("../data", src.join("sub/link")).unwrap();
    let a = store
        .add_to_store(&src, Some(&format!("input-{tag}")))
        .unwrap();
    let text = format!("cat {}/data\n", w.store_dir.print(&a));
    let b = store
        .add_text_to_store(
            &format!("script-{tag}"),
            text.as_bytes(),
            &BTreeSet::from([a.clone()]),
        )
        .unwrap();
    (a, b)
}

/// A derivation running `script` with /bin/sh, with `inputs` as input sources.
pub fn make_drv(
    w: &World,
    name: &str,
    script: &str,
    inputs: &[&StorePath],
    outputs: &[&str],
) -> Derivation {
    let mut env = BTreeMap::new();
    env.insert("name".to_string(), name.to_string());
    env.insert("system".to_string(), "x86_64-linux".to_string());
    env.insert("builder".to_string(), "/bin/sh".to_string());
    for (i, p) in inputs.iter().enumerate() {
        env.insert(format!("in{i}"), w.store_dir.print(p));
    }
    let mut drv = Derivation {
        outputs: outputs
            .iter()
            .map(|o| (o.to_string(), DerivationOutput::default()))
            .collect(),
        input_drvs: BTreeMap::new(),
        input_srcs: inputs.iter().map(|p| (*p).clone()).collect(),
        platform: "x86_64-linux".into(),
        builder: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        env,
    };
    compute_output_paths(
        &w.store_dir,
        &mut drv,
        &mut |p| panic!("no input derivations expected, asked for {p}"),
        &mut DrvHashCache::new(),
    )
    .unwrap();
    drv
}

pub fn nar_of(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    nixb_store::nar::dump_path(path, &mut v).unwrap();
    v
}

impl World {
    /// The command running nixb's test server (`nixb-serve-test --write`) for remote
    /// `name`, in its own mount namespace as for real Nix.
    pub fn nixb_serve_command(&self, name: &str) -> Command {
        let phys = self.remote_phys(name);
        std::fs::create_dir_all(&phys).unwrap();
        let mut c = Command::new("unshare");
        c.args(["--mount", "--propagation", "private", "sh", "-c"]);
        c.arg(r#"mount --bind "$1" "$2" && exec "$3" --write"#);
        c.arg("sh")
            .arg(&phys)
            .arg(self.store_dir.as_str())
            .arg(env!("CARGO_BIN_EXE_nixb-serve-test"));
        self.nix_env(&mut c, name);
        c
    }

    pub fn connect_nixb(&self, name: &str) -> (ChildClient, ServeChild, Log) {
        let log = Log::default();
        let (c, h) = spawn_serving(
            self.nixb_serve_command(name),
            &format!("nixb serve ({name})"),
            self.store_dir.clone(),
            Box::new(log.clone()),
        )
        .unwrap();
        (c, h, log)
    }

    /// A fake `ssh` in `<root>/bin` that ignores host and options and runs nixb's test
    /// server for remote `name`: lets real Nix's `ssh://` client talk to our server.
    pub fn fake_ssh_to_nixb(&self, name: &str) -> PathBuf {
        let bin = self.path("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let phys = self.remote_phys(name);
        std::fs::create_dir_all(&phys).unwrap();
        let script = format!(
            "#!/bin/sh\necho \"fake ssh $*\" >> {log}\nexport NIX_STORE_DIR={store} NIX_STATE_DIR={state} NIX_LOG_DIR={logdir}\nexec unshare --mount --propagation private sh -c 'mount --bind \"$1\" \"$2\" && exec \"$3\" --write' sh {phys} {store} {exe}\n",
            log = self.path("ssh.log").display(),
            store = self.store_dir.as_str(),
            state = self.path(&format!("{name}/state")).display(),
            logdir = self.path(&format!("{name}/log")).display(),
            phys = phys.display(),
            exe = env!("CARGO_BIN_EXE_nixb-serve-test"),
        );
        let p = bin.join("ssh");
        std::fs::write(&p, script).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        bin
    }

    /// Runs a real Nix command as a *client* whose own store is `<root>/<name>/phys`
    /// (mounted over the logical store dir), with `extra_path` first in PATH.
    pub fn nix_client(
        &self,
        name: &str,
        extra_path: &Path,
        cmd: &str,
        args: &[&str],
    ) -> std::process::Output {
        let phys = self.remote_phys(name);
        let etc = self.path(&format!("{name}/etc"));
        std::fs::create_dir_all(&phys).unwrap();
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(
            etc.join("nix.conf"),
            "sandbox = false\nbuild-users-group =\nsubstituters =\nexperimental-features = nix-command\n",
        )
        .unwrap();
        let mut c = Command::new("unshare");
        c.args(["--mount", "--propagation", "private", "sh", "-c"]);
        c.arg(r#"mount --bind "$1" "$2" && shift 2 && exec "$@""#);
        c.arg("sh")
            .arg(&phys)
            .arg(self.store_dir.as_str())
            .arg(cmd)
            .args(args);
        self.nix_env(&mut c, name);
        let path = format!(
            "{}:{}",
            extra_path.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        c.env("PATH", path);
        c.output().unwrap()
    }
}
