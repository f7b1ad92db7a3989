//! Records one exchange per client version (1.21 to 1.34) between nixb's `Client` and
//! real `nix-daemon --stdio` 2.8, for tests/fixtures/versions/: the daemon's bytes are
//! real Nix answering that version. The store lives at /tmp/nixb-protocol-rec-v (its path
//! is part of the bytes) and is created afresh.
//!
//! Run: cargo run -p nixb-protocol --example record_versions

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use nixb_protocol::types::{BuildMode, ClientSettings, DerivedPath, OutputsSpec};
use nixb_protocol::{Client, ClientInfo, Request, Version};
use nixb_store::StoreDir;

struct Tee<T> {
    inner: T,
    copy: File,
}

impl<T: Read> Read for Tee<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.copy.write_all(&buf[..n])?;
        Ok(n)
    }
}

impl<T: Write> Write for Tee<T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.copy.write_all(&buf[..n])?;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

const ROOT: &str = "/tmp/nixb-protocol-rec-v";

fn nix(prog: &str) -> Command {
    let mut c = Command::new(prog);
    c.env("NIX_STORE_DIR", format!("{ROOT}/store"))
        .env("NIX_STATE_DIR", format!("{ROOT}/state"))
        .env("NIX_LOG_DIR", format!("{ROOT}/log"))
        .env("NIX_CONF_DIR", format!("{ROOT}/etc"))
        .env("HOME", ROOT)
        .env_remove("NIX_REMOTE");
    c
}

fn run(prog: &str, args: &[&str]) -> String {
    let out = nix(prog).args(args).output().expect("running nix");
    assert!(out.status.success(), "{prog} {args:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn main() {
    let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/versions");
    let _ = std::fs::remove_dir_all(ROOT);
    std::fs::create_dir_all(format!("{ROOT}/etc")).unwrap();
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::write(
        format!("{ROOT}/etc/nix.conf"),
        "sandbox = false\nbuild-users-group =\nsubstituters =\n",
    )
    .unwrap();
    let store_dir = StoreDir::new(format!("{ROOT}/store")).unwrap();
    for minor in [21u8, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34] {
        let v = Version::new(1, minor);
        let expr = format!(
            "derivation {{ name = \"v{minor}\"; system = builtins.currentSystem; \
             builder = \"/bin/sh\"; args = [ \"-c\" \"echo building {minor}; echo {minor} > $out\" ]; }}"
        );
        let drv = run("nix-instantiate", &["-E", &expr]);
        let drv = store_dir.parse(&drv).unwrap();
        let mut child = nix("nix-daemon")
            .arg("--stdio")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let name = format!("v1_{minor}");
        let r = Tee {
            inner: child.stdout.take().unwrap(),
            copy: File::create(out_dir.join(format!("{name}.daemon.bin"))).unwrap(),
        };
        let w = Tee {
            inner: child.stdin.take().unwrap(),
            copy: File::create(out_dir.join(format!("{name}.client.bin"))).unwrap(),
        };
        let info = ClientInfo {
            version: v,
            features: BTreeSet::new(),
        };
        let mut c = Client::connect(r, w, store_dir.clone(), &info).unwrap();
        c.set_options(&ClientSettings::default()).unwrap();
        let text = format!("text at 1.{minor}\n");
        let added = c
            .add_to_store(
                "t.txt",
                "text:sha256",
                &BTreeSet::new(),
                &mut text.as_bytes(),
            )
            .unwrap();
        c.is_valid_path(&added.path).unwrap();
        c.query_valid_paths(&BTreeSet::from([added.path.clone(), drv.clone()]), false)
            .unwrap();
        let all = DerivedPath::Built {
            drv: drv.clone(),
            outputs: OutputsSpec::All,
        };
        c.query_missing(std::slice::from_ref(&all)).unwrap();
        c.build_paths(&[all], BuildMode::Normal, &mut |_| {})
            .unwrap();
        let outs = c
            .request(
                &Request::QueryDerivationOutputMap(drv.clone()),
                None,
                &mut |_| {},
            )
            .unwrap();
        c.add_temp_root(&added.path).unwrap();
        c.nar_from_path(&added.path, &mut io::sink()).unwrap();
        // An error: a path that is not valid cannot be built.
        let bogus = store_dir
            .parse(&format!("{ROOT}/store/{}-bogus", "0".repeat(32)))
            .unwrap();
        let _ = c.build_paths(
            &[DerivedPath::Opaque(bogus)],
            BuildMode::Normal,
            &mut |_| {},
        );
        drop(c);
        assert!(child.wait().unwrap().success());
        eprintln!("{name}: {outs:?}");
    }
}
