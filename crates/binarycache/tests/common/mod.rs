//! A private real-Nix store (the oracle) that builds a small graph and publishes it in
//! binary caches, and helpers to compare with what nixb did.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use nixb_binarycache::{BinaryCache, CacheOptions, PublicKey, TrustedKeys};
use nixb_store::local_store::{LocalStore, StoreConfig};
use nixb_store::{StoreDir, StorePath};

pub struct Oracle {
    pub tmp: tempfile::TempDir,
    pub root: PathBuf,
    pub secret_key: String,
    pub public_key: String,
    /// The top-level output of the graph.
    pub top: String,
    /// Every path of its closure, as `nix-store -q --requisites` printed them.
    pub closure: Vec<String>,
    /// `nix-store -q --hash` of each closure path, in the same order.
    pub hashes: Vec<String>,
}

const GRAPH: &str = r#"
let
  mk = name: deps: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/bin:/usr/bin";
    args = [ "-c" ''
      mkdir -p $out/sub/deeper
      echo ${name} > $out/f
      ${builtins.concatStringsSep "\n" (map (d: "echo ${d} > $out/dep-${d.name}") deps)}
      ln -s f $out/link
      ln -s /dangling/target $out/sub/dangling
      printf '#!/bin/sh\necho hi\n' > $out/sub/exe
      chmod +x $out/sub/exe
      head -c 70000 /dev/zero | tr '\0' '${name}' > $out/sub/deeper/big
      touch $out/sub/deeper/empty
    '' ];
  };
  a = mk "a" [];
  b = mk "b" [ a ];
  c = mk "c" [ a ];
  d = mk "d" [ b c ];
  single = derivation { name = "single"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo plain > $out" ]; };
  top = mk "top" [ d single ];
in top
"#;

impl Oracle {
    pub fn store_dir(&self) -> String {
        format!("{}/store", self.root.display())
    }

    pub fn nix(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("NIX_STORE_DIR", self.root.join("store"))
            .env("NIX_STATE_DIR", self.root.join("state"))
            .env("NIX_LOG_DIR", self.root.join("log"))
            .env("NIX_CONF_DIR", self.root.join("etc"))
            .env_remove("NIX_REMOTE");
        c
    }

    pub fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self.nix(program).args(args).output().expect("running nix");
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// Builds the graph with real Nix, signed with a fresh key, and records its closure.
    pub fn build() -> Oracle {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().to_path_buf();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        let mut o = Oracle {
            tmp,
            root: root.clone(),
            secret_key: String::new(),
            public_key: String::new(),
            top: String::new(),
            closure: vec![],
            hashes: vec![],
        };
        o.secret_key = o.run(
            "nix",
            &[
                "--extra-experimental-features",
                "nix-command",
                "key",
                "generate-secret",
                "--key-name",
                "oracle-1",
            ],
        );
        let mut c = o.nix("nix");
        c.args([
            "--extra-experimental-features",
            "nix-command",
            "key",
            "convert-secret-to-public",
        ]);
        c.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(o.secret_key.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        o.public_key = String::from_utf8(out.stdout).unwrap().trim().to_string();
        std::fs::write(root.join("sk"), &o.secret_key).unwrap();
        std::fs::write(
            root.join("etc/nix.conf"),
            format!(
                "sandbox = false\nbuild-users-group =\nsubstituters =\nsecret-key-files = {}\n",
                root.join("sk").display()
            ),
        )
        .unwrap();
        std::fs::write(root.join("graph.nix"), GRAPH).unwrap();
        let drv = o.run(
            "nix-instantiate",
            &[root.join("graph.nix").to_str().unwrap()],
        );
        o.top = o.run("nix-store", &["-r", drv.trim()]).trim().to_string();
        o.closure = o
            .run("nix-store", &["-q", "--requisites", &o.top])
            .lines()
            .map(String::from)
            .collect();
        assert_eq!(o.closure.len(), 6, "the graph has six outputs");
        o.hashes = o
            .closure
            .iter()
            .map(|p| o.run("nix-store", &["-q", "--hash", p]).trim().to_string())
            .collect();
        o
    }

    /// `nix copy --to file://DIR?compression=C` of the top path's closure.
    pub fn copy_to(&self, dir: &Path, compression: &str) {
        let url = format!("file://{}?compression={compression}", dir.display());
        self.run(
            "nix",
            &[
                "--extra-experimental-features",
                "nix-command",
                "copy",
                "--to",
                &url,
                &self.top,
            ],
        );
    }

    /// Removes the store and its state so that the next test sees an empty store at the
    /// same store directory (which the cache's StoreDir requires).
    pub fn wipe_store(&self) {
        for d in ["store", "state"] {
            let p = self.root.join(d);
            if p.exists() {
                let _ = Command::new("chmod").args(["-R", "u+w"]).arg(&p).status();
                std::fs::remove_dir_all(&p).unwrap();
            }
        }
    }

    pub fn open_store(&self) -> LocalStore {
        LocalStore::open(StoreConfig {
            store_dir: StoreDir::new(self.store_dir()).unwrap(),
            state_dir: self.root.join("state"),
            log_dir: self.root.join("log"),
        })
        .expect("opening nixb store")
    }

    pub fn trusted(&self) -> TrustedKeys {
        let mut t = TrustedKeys::new();
        t.add(PublicKey::parse(&self.public_key).unwrap());
        t
    }

    pub fn options(&self) -> CacheOptions {
        CacheOptions {
            trusted_keys: self.trusted(),
            require_sigs: true,
            ..CacheOptions::default()
        }
    }

    pub fn open_cache(&self, url: &str, opts: CacheOptions) -> BinaryCache {
        BinaryCache::open(url, &StoreDir::new(self.store_dir()).unwrap(), opts)
            .expect("opening cache")
    }

    pub fn top_path(&self) -> StorePath {
        StoreDir::new(self.store_dir())
            .unwrap()
            .parse(&self.top)
            .unwrap()
    }

    pub fn top_set(&self) -> BTreeSet<StorePath> {
        [self.top_path()].into_iter().collect()
    }

    /// Real Nix agrees that the whole closure is valid, intact and has the hashes the
    /// original build had.
    pub fn assert_closure_matches(&self) {
        for (p, h) in self.closure.iter().zip(&self.hashes) {
            assert_eq!(
                self.run("nix-store", &["-q", "--hash", p]).trim(),
                h,
                "NAR hash of {p}"
            );
        }
        let out = self
            .nix("nix-store")
            .args(["--verify", "--check-contents"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "nix-store --verify failed: {stderr}");
        assert!(
            !stderr.contains("modified") && !stderr.contains("invalid"),
            "nix-store --verify complained: {stderr}"
        );
        let refs = self.run("nix-store", &["-q", "--requisites", &self.top]);
        let mut got: Vec<&str> = refs.lines().collect();
        let mut want: Vec<&str> = self.closure.iter().map(String::as_str).collect();
        got.sort();
        want.sort();
        assert_eq!(got, want, "closure as real Nix sees it");
    }

    /// Names in the store directory other than the ones nixb's store creates for itself.
    pub fn store_entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.root.join("store"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.retain(|n| n != ".links");
        v.sort();
        v
    }
}
