//! The client against the real thing: `nix-daemon --stdio` 2.8 on a private store, at
//! several client versions from 1.21 to 1.38 (the daemon answers each in that version's
//! format, so this also checks the version gates against real Nix). Expected values come
//! from real Nix run beside the daemon (`nix-instantiate`, `nix-store -q`, `--dump`).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use nixb_protocol::stderr::{Field, ResultType};
use nixb_protocol::types::{BuildMode, ClientSettings, DerivedPath, OutputsSpec};
use nixb_protocol::{Client, ClientInfo, ProtocolError, StderrFrame, Version};
use nixb_store::{StoreDir, StorePath};

struct Store {
    root: tempfile::TempDir,
}

impl Store {
    fn new() -> Store {
        let root = tempfile::Builder::new()
            .prefix("nixb-protocol-")
            .tempdir()
            .unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(
            root.path().join("etc/nix.conf"),
            "sandbox = false\nbuild-users-group =\nsubstituters =\n",
        )
        .unwrap();
        Store { root }
    }

    fn dir(&self) -> PathBuf {
        self.root.path().join("store")
    }

    fn store_dir(&self) -> StoreDir {
        StoreDir::new(self.dir().to_str().unwrap()).unwrap()
    }

    fn nix(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        let r = self.root.path();
        c.env("NIX_STORE_DIR", r.join("store"))
            .env("NIX_STATE_DIR", r.join("state"))
            .env("NIX_LOG_DIR", r.join("log"))
            .env("NIX_CONF_DIR", r.join("etc"))
            .env("HOME", r)
            .env_remove("NIX_REMOTE");
        c
    }

    /// Runs a Nix command and returns its trimmed stdout.
    fn run(&self, prog: &str, args: &[&str]) -> String {
        let out = self.nix(prog).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{prog} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    fn daemon(&self) -> (Child, Client<ChildStdout, ChildStdin>) {
        self.daemon_at(Version::MAX)
    }

    fn daemon_at(&self, v: Version) -> (Child, Client<ChildStdout, ChildStdin>) {
        let mut child = self
            .nix("nix-daemon")
            .arg("--stdio")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let info = ClientInfo {
            version: v,
            features: BTreeSet::new(),
        };
        let client = Client::connect(stdout, stdin, self.store_dir(), &info).unwrap();
        (child, client)
    }

    fn path(&self, s: &str) -> StorePath {
        self.store_dir().parse(s).unwrap()
    }
}

fn stop(mut child: Child, client: Client<ChildStdout, ChildStdin>) {
    drop(client);
    let status = child.wait().unwrap();
    assert!(status.success(), "nix-daemon exited with {status}");
}

const HELLO_NIX: &str = r#"derivation {
  name = "hello";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo building hello; echo hi > $out" ];
}"#;

fn instantiate(store: &Store, expr: &str) -> (StorePath, StorePath) {
    let file = store.root.path().join("expr.nix");
    std::fs::write(&file, expr).unwrap();
    let drv = store.run("nix-instantiate", &[file.to_str().unwrap()]);
    let out = store.run("nix-store", &["-q", "--outputs", &drv]);
    (store.path(&drv), store.path(&out))
}

fn check_version(store: &Store, v: Version, text: &str) {
    let (child, mut c) = store.daemon_at(v);
    let expect = v.min(Version::NIX_2_8);
    assert_eq!(c.ctx().version, expect);
    assert_eq!(
        c.handshake().daemon_nix_version.is_some(),
        expect >= Version::new(1, 33)
    );
    c.set_options(&ClientSettings::default()).unwrap();

    // A text file: the path real Nix computes for builtins.toFile.
    let want = store.run(
        "nix-instantiate",
        &[
            "--eval",
            "--readonly-mode",
            "-E",
            &format!("builtins.toFile \"t.txt\" {text:?}"),
        ],
    );
    let want = want.trim_matches('"');
    let added = c
        .add_to_store(
            "t.txt",
            "text:sha256",
            &BTreeSet::new(),
            &mut text.as_bytes(),
        )
        .unwrap();
    assert_eq!(store.store_dir().print(&added.path), want, "at {v}");
    assert!(c.is_valid_path(&added.path).unwrap());

    // QueryPathInfo against nix-store -q --hash / --size.
    let info = c.query_path_info(&added.path).unwrap().unwrap();
    let hash = store.run("nix-store", &["-q", "--hash", want]);
    assert_eq!(info.nar_hash.to_base32_typed(), hash, "at {v}");
    let size = store.run("nix-store", &["-q", "--size", want]);
    assert_eq!(info.nar_size.to_string(), size);
    assert!(info.references.is_empty());
    assert_eq!(
        info.ca.as_deref().map(|c| c.starts_with("text:sha256:")),
        Some(true)
    );

    // Building all outputs ("drv!*" from 1.30, a bare .drv before) and named ones.
    let expr = HELLO_NIX.replace("echo hi", &format!("echo {v}"));
    let (drv, out) = instantiate(store, &expr);
    let all = DerivedPath::Built {
        drv: drv.clone(),
        outputs: OutputsSpec::All,
    };
    let missing = c.query_missing(std::slice::from_ref(&all)).unwrap();
    assert_eq!(missing.will_build, BTreeSet::from([drv.clone()]), "at {v}");
    c.build_paths(&[all], BuildMode::Normal, &mut |_| {})
        .unwrap();
    assert!(c.is_valid_path(&out).unwrap());
    let named = DerivedPath::Built {
        drv: drv.clone(),
        outputs: OutputsSpec::Names(vec!["out".into()]),
    };
    c.build_paths(&[named], BuildMode::Normal, &mut |_| {})
        .unwrap();
    // Asking for the .drv file itself needs 1.30.
    let opaque = c.build_paths(&[DerivedPath::Opaque(drv)], BuildMode::Normal, &mut |_| {});
    assert_eq!(
        opaque.is_ok(),
        v >= Version::new(1, 30),
        "at {v}: {opaque:?}"
    );
    stop(child, c);
}

#[test]
fn client_talks_to_nix_daemon_2_8() {
    nixb_testsupport::require!(Nix);
    let store = Store::new();
    let (child, mut c) = store.daemon();
    // We offer 1.38; Nix 2.8 speaks 1.34, so both use 1.34.
    assert_eq!(c.ctx().version, Version::NIX_2_8);
    let nix_version = store.run("nix-store", &["--version"]);
    assert_eq!(
        Some(nix_version.rsplit(' ').next().unwrap()),
        c.handshake().daemon_nix_version.as_deref()
    );
    c.set_options(&ClientSettings::default()).unwrap();

    let missing = store.path(&format!(
        "{}/{}-nothing",
        store.dir().display(),
        "0".repeat(32)
    ));
    assert!(!c.is_valid_path(&missing).unwrap());
    assert_eq!(c.query_path_info(&missing).unwrap(), None);

    // build_paths of a derivation written by nix-instantiate.
    let (drv, out) = instantiate(&store, HELLO_NIX);
    assert!(!c.is_valid_path(&out).unwrap());
    let mut frames = Vec::new();
    c.build_paths(
        &[DerivedPath::Built {
            drv: drv.clone(),
            outputs: OutputsSpec::All,
        }],
        BuildMode::Normal,
        &mut |f| frames.push(f.clone()),
    )
    .unwrap();
    assert!(c.is_valid_path(&out).unwrap());
    assert_eq!(
        std::fs::read_to_string(store.dir().join(out.base_name())).unwrap(),
        "hi\n"
    );
    // The builder's output came back as a build-log-line result of an activity.
    assert!(
        frames.iter().any(|f| matches!(f,
            StderrFrame::Result { kind: ResultType::BuildLogLine, fields, .. }
                if fields.first() == Some(&Field::string("building hello")))),
        "{frames:?}"
    );

    // NarFromPath gives what nix-store --dump gives.
    let mut nar = Vec::new();
    c.nar_from_path(&out, &mut nar).unwrap();
    let dump = store
        .nix("nix-store")
        .args([
            "--dump",
            store.dir().join(out.base_name()).to_str().unwrap(),
        ])
        .output()
        .unwrap()
        .stdout;
    assert_eq!(nar, dump);

    // An error from the daemon is a Remote error and the connection goes on.
    let e = c
        .build_paths(
            &[DerivedPath::Opaque(missing.clone())],
            BuildMode::Normal,
            &mut |_| {},
        )
        .unwrap_err();
    assert!(
        matches!(&e, ProtocolError::InOp { source, .. } if matches!(**source, ProtocolError::Remote(_))),
        "{e}"
    );
    assert!(c.is_valid_path(&out).unwrap());
    stop(child, c);
}

#[test]
fn every_client_version_from_1_21_gets_its_own_format_from_nix_daemon() {
    nixb_testsupport::require!(Nix);
    let store = Store::new();
    for minor in [21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 33, 34, 35, 38] {
        check_version(
            &store,
            Version::new(1, minor),
            &format!("text at 1.{minor}\n"),
        );
    }
}

fn nar_of(store: &Store, name: &str, contents: &str) -> (Vec<u8>, nixb_store::Hash) {
    let f = store.root.path().join(name);
    std::fs::write(&f, contents).unwrap();
    let mut nar = Vec::new();
    nixb_store::nar::dump_path(&f, &mut nar).unwrap();
    let h = nixb_store::Hash::digest(nixb_store::HashAlgo::Sha256, &nar);
    (nar, h)
}

fn info_for(
    store: &Store,
    base: &str,
    nar: &[u8],
    h: nixb_store::Hash,
    references: BTreeSet<StorePath>,
) -> nixb_protocol::types::ValidPathInfo {
    nixb_protocol::types::ValidPathInfo {
        path: store.path(&format!("{}/{base}", store.dir().display())),
        info: nixb_protocol::types::PathInfo {
            deriver: None,
            nar_hash: h,
            references,
            registration_time: 0,
            nar_size: nar.len() as u64,
            ultimate: false,
            sigs: BTreeSet::new(),
            ca: None,
        },
    }
}

#[test]
fn nars_go_in_framed_tunnelled_and_several_at_once() {
    nixb_testsupport::require!(Nix);
    let store = Store::new();
    // AddToStoreNar: framed from 1.23, pulled with STDERR_READ at 1.21 and 1.22.
    for minor in [21u8, 22, 23, 34] {
        let (child, mut c) = store.daemon_at(Version::new(1, minor));
        c.set_options(&ClientSettings::default()).unwrap();
        let (nar, h) = nar_of(&store, "f", &format!("nar at 1.{minor}\n"));
        let base = format!("{:0>32}-nar-{minor}", minor);
        let info = info_for(&store, &base, &nar, h.clone(), BTreeSet::new());
        c.add_to_store_nar(&info, &mut &nar[..], false, true)
            .unwrap();
        assert!(c.is_valid_path(&info.path).unwrap());
        let p = format!("{}/{base}", store.dir().display());
        assert_eq!(
            store.run("nix-store", &["-q", "--hash", &p]),
            h.to_base32_typed()
        );
        let dumped = store
            .nix("nix-store")
            .args(["--dump", &p])
            .output()
            .unwrap()
            .stdout;
        assert_eq!(dumped, nar, "at 1.{minor}");
        stop(child, c);
    }

    // AddMultipleToStore: two paths, the second referring to the first.
    let (child, mut c) = store.daemon();
    c.set_options(&ClientSettings::default()).unwrap();
    let (nar_a, ha) = nar_of(&store, "a", "a\n");
    let a = info_for(
        &store,
        &format!("{:a>32}-a", ""),
        &nar_a,
        ha,
        BTreeSet::new(),
    );
    let (nar_b, hb) = nar_of(
        &store,
        "b",
        &format!("b refers to {}\n", a.path.base_name()),
    );
    let b = info_for(
        &store,
        &format!("{:b>32}-b", ""),
        &nar_b,
        hb,
        BTreeSet::from([a.path.clone()]),
    );
    let mut ra = &nar_a[..];
    let mut rb = &nar_b[..];
    let mut items: Vec<(_, &mut dyn std::io::Read)> =
        vec![(a.clone(), &mut ra), (b.clone(), &mut rb)];
    c.add_multiple_to_store(&mut items, false, true).unwrap();
    let pb = format!("{}/{}", store.dir().display(), b.path.base_name());
    let pa = format!("{}/{}", store.dir().display(), a.path.base_name());
    assert_eq!(store.run("nix-store", &["-q", "--references", &pb]), pa);
    assert_eq!(
        c.query_path_from_hash_part(b.path.hash_part()).unwrap(),
        Some(b.path.clone())
    );
    stop(child, c);
}

#[test]
fn export_path_streams_what_nix_store_export_writes() {
    nixb_testsupport::require!(Nix);
    let store = Store::new();
    let (child, mut c) = store.daemon();
    c.set_options(&ClientSettings::default()).unwrap();
    let added = c
        .add_to_store(
            "e.txt",
            "text:sha256",
            &BTreeSet::new(),
            &mut &b"export me\n"[..],
        )
        .unwrap();
    let mut got = Vec::new();
    c.export_path(&added.path, &mut got).unwrap();
    stop(child, c);
    let p = store.store_dir().print(&added.path);
    let want = store
        .nix("nix-store")
        .args(["--export", &p])
        .output()
        .unwrap()
        .stdout;
    // nix-store --export writes u64(1) before each path's export and u64(0) after the
    // last; ExportPath answers one path's export alone.
    assert_eq!(
        [&1u64.to_le_bytes()[..], &got, &0u64.to_le_bytes()].concat(),
        want
    );
}

/// How Nix 2.8 without the ca-derivations feature answers the realisation operations:
/// RegisterDrvOutput with an error naming the feature (the connection goes on), and
/// QueryRealisation not at all: the daemon process dies on an assertion (its SQLite
/// statement for realisations is prepared only with the feature) and the client sees the
/// connection end. A daemon built on this crate should answer the latter with an empty
/// set instead (of paths before 1.31, of realisations from 1.31), which is what Nix's
/// client makes of "no realisation".
#[test]
fn realisation_operations_on_nix_2_8_without_ca_derivations() {
    nixb_testsupport::require!(Nix);
    let store = Store::new();
    for minor in [30u8, 31, 34] {
        let (mut child, mut c) = store.daemon_at(Version::new(1, minor));
        c.set_options(&ClientSettings::default()).unwrap();
        let id = format!("sha256:{}!out", "ab".repeat(32));
        let out = format!("{}/{}-x", store.dir().display(), "0".repeat(32));
        let json = format!(
            "{{\"dependentRealisations\":{{}},\"id\":\"{id}\",\"outPath\":\"{}-x\",\"signatures\":[]}}",
            "0".repeat(32)
        );
        let req = nixb_protocol::Request::RegisterDrvOutput {
            id_or_json: if minor >= 31 { json } else { id.clone() },
            // Before 1.31 the output path travels as a base name (Nix 2.8 reads it with
            // `StorePath(readString(from))`; a full path is refused).
            output_path: if minor >= 31 {
                String::new()
            } else {
                format!("{}-x", "0".repeat(32))
            },
        };
        let e = c.request(&req, None, &mut |_| {}).unwrap_err();
        assert!(
            e.to_string().contains("ca-derivations"),
            "at 1.{minor}: {e}"
        );
        assert!(!c.is_valid_path(&store.path(&out)).unwrap());

        let e = c
            .request(
                &nixb_protocol::Request::QueryRealisation(id),
                None,
                &mut |_| {},
            )
            .unwrap_err();
        assert!(e.is_eof(), "at 1.{minor}: {e}");
        drop(c);
        assert!(!child.wait().unwrap().success());
    }
}
