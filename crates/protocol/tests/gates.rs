//! Every version gate on both sides of its boundary, and the fixtures for the minors Nix
//! 2.8 does not speak (1.35-1.38), written by hand from the protocol's facts by
//! fixtures/written/make.py (independently of this crate's code; sources cited there).

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nixb_protocol::handshake::{client_handshake, server_handshake};
use nixb_protocol::ops::{
    AddToStoreNarRequest, AddToStoreOldRequest, AddToStoreRequest, DataTransfer,
};
use nixb_protocol::types::{
    BuildResult, BuildStatus, DerivedPath, OutputsSpec, PathInfo, ValidPathInfo,
};
use nixb_protocol::wire::{WireReader, WireWriter};
use nixb_protocol::{
    ClientInfo, Ctx, Op, ProtocolError, RemoteError, Request, Response, ServerInfo, StderrFrame,
    TrustedFlag, Version,
};
use nixb_store::{Hash, HashAlgo, StoreDir, StorePath};

const STORE: &str = "/nix/store";
const P: &str = "/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-hello";
const BASE: &str = "00bgd045z0d4icpbc2yyz4gx48ak44la-hello";
const DRV: &str = "/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-hello.drv";

fn written(name: &str) -> Vec<u8> {
    let p: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/written")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn cx(minor: u8) -> Ctx {
    Ctx::new(Version::new(1, minor), StoreDir::new(STORE).unwrap())
}

fn path(s: &str) -> StorePath {
    StoreDir::new(STORE).unwrap().parse(s).unwrap()
}

fn encode(f: impl FnOnce(&mut WireWriter<&mut Vec<u8>>)) -> Vec<u8> {
    let mut v = Vec::new();
    let mut w = WireWriter::new(&mut v);
    f(&mut w);
    w.flush().unwrap();
    drop(w);
    v
}

fn req_bytes(req: &Request, minor: u8) -> Vec<u8> {
    encode(|w| req.write(w, &cx(minor)).unwrap())
}

/// Reads a request back (after its op number) at `minor`, checking nothing is left.
fn req_back(bytes: &[u8], minor: u8) -> Request {
    let mut r = WireReader::new(bytes);
    let op = Op::read(&mut r).unwrap();
    let req = Request::read(op, &mut r, &cx(minor)).unwrap();
    assert_eq!(r.offset(), bytes.len() as u64, "bytes left at 1.{minor}");
    req
}

fn u64s(ns: &[u64]) -> Vec<u8> {
    ns.iter().flat_map(|n| n.to_le_bytes()).collect()
}

fn s(b: &str) -> Vec<u8> {
    let mut v = (b.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(b.as_bytes());
    v.resize(v.len() + (8 - b.len() % 8) % 8, 0);
    v
}

/// Fixture name, client minor, daemon minor, daemon's Nix version, trust, client
/// features, daemon features, features both have.
type HandshakeCase<'a> = (
    &'a str,
    u8,
    u8,
    &'a str,
    Option<TrustedFlag>,
    &'a [&'a str],
    &'a [&'a str],
    &'a [&'a str],
);

#[test]
fn written_handshakes_for_1_35_to_1_38_match_both_sides() {
    let cases: &[HandshakeCase] = &[
        (
            "handshake_1_35",
            35,
            35,
            "2.15.0",
            Some(TrustedFlag::Trusted),
            &[],
            &[],
            &[],
        ),
        (
            "handshake_1_37",
            37,
            37,
            "2.20.0",
            Some(TrustedFlag::NotTrusted),
            &[],
            &[],
            &[],
        ),
        (
            "handshake_1_38",
            38,
            38,
            "2.24.0",
            None,
            &["feature-a", "feature-b"],
            &["feature-b", "feature-c"],
            &["feature-b"],
        ),
        // A 1.38 client and a 1.35 daemon agree on 1.35: no feature sets travel.
        (
            "handshake_1_38_to_1_35",
            38,
            35,
            "2.15.0",
            Some(TrustedFlag::Trusted),
            &["feature-a"],
            &["feature-b"],
            &[],
        ),
    ];
    for &(name, client_minor, daemon_minor, nix_version, trusted, cf, df, both) in cases {
        let client = written(&format!("{name}.client.bin"));
        let daemon = written(&format!("{name}.daemon.bin"));
        let set = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        let info = ServerInfo {
            version: Version::new(1, daemon_minor),
            nix_version: nix_version.into(),
            trusted,
            features: set(df),
        };
        let mut r = WireReader::new(&client[..]);
        let mut hs = None;
        let out = encode(|w| {
            hs = Some(server_handshake(&mut r, w, &info).unwrap());
            StderrFrame::Last
                .write(w, Version::new(1, daemon_minor))
                .unwrap();
        });
        assert_eq!(out, daemon, "{name}: daemon side");
        assert_eq!(r.offset(), client.len() as u64, "{name}");
        let hs = hs.unwrap();
        assert_eq!(hs.version, Version::new(1, client_minor.min(daemon_minor)));
        assert_eq!(hs.features, set(both), "{name}");

        let cinfo = ClientInfo {
            version: Version::new(1, client_minor),
            features: set(cf),
        };
        let mut r = WireReader::new(&daemon[..]);
        let mut chs = None;
        let out = encode(|w| chs = Some(client_handshake(&mut r, w, &cinfo).unwrap()));
        assert_eq!(out, client, "{name}: client side");
        let chs = chs.unwrap();
        assert_eq!(chs.trusted, trusted, "{name}");
        assert_eq!(chs.daemon_nix_version.as_deref(), Some(nix_version));
        assert_eq!(chs.features, set(both), "{name}");
        assert_eq!(
            StderrFrame::read(&mut r, chs.version).unwrap(),
            StderrFrame::Last
        );
    }
}

#[test]
fn written_build_results_for_1_36_and_1_37() {
    for (minor, cpu) in [(36u8, None), (37, Some(1_500_000))] {
        let bytes = written(&format!("build_result_1_{minor}.bin"));
        let mut r = WireReader::new(&bytes[..]);
        let br = BuildResult::read(&mut r, &cx(minor)).unwrap();
        assert_eq!(r.offset(), bytes.len() as u64, "1.{minor}");
        assert_eq!(br.status, BuildStatus::Built);
        assert_eq!((br.times_built, br.start_time, br.stop_time), (1, 30, 50));
        assert_eq!(br.cpu_user, cpu);
        assert_eq!(br.cpu_system, None);
        let (id, json) = br.built_outputs.iter().next().unwrap();
        assert_eq!(
            *json,
            BuildResult::realisation_json(
                id,
                &path(&format!("/nix/store/{}-hello", "0".repeat(32)))
            )
        );
        assert_eq!(encode(|w| br.write(w, &cx(minor)).unwrap()), bytes);
    }
}

#[test]
fn handshake_gates_at_every_version_both_sides_live() {
    // Client and server over a socket pair, the client offering each minor.
    for minor in 21..=38u8 {
        let (a, b) = UnixStream::pair().unwrap();
        let info = ServerInfo {
            version: Version::MAX,
            nix_version: "nixb".into(),
            trusted: Some(TrustedFlag::Trusted),
            features: BTreeSet::from(["x".to_string()]),
        };
        let server = std::thread::spawn(move || {
            let mut r = WireReader::new(a.try_clone().unwrap());
            let mut w = WireWriter::new(a);
            server_handshake(&mut r, &mut w, &info).unwrap()
        });
        let cinfo = ClientInfo {
            version: Version::new(1, minor),
            features: BTreeSet::from(["x".to_string(), "y".to_string()]),
        };
        let mut r = WireReader::new(b.try_clone().unwrap());
        let mut w = WireWriter::new(b);
        let c = client_handshake(&mut r, &mut w, &cinfo).unwrap();
        let s = server.join().unwrap();
        assert_eq!(
            (c.version, s.version),
            (Version::new(1, minor), Version::new(1, minor))
        );
        // 1.33: the daemon's version string; 1.35: trust; 1.38: features.
        assert_eq!(c.daemon_nix_version.is_some(), minor >= 33, "1.{minor}");
        assert_eq!(c.trusted.is_some(), minor >= 35, "1.{minor}");
        assert_eq!(
            c.features.len(),
            if minor >= 38 { 1 } else { 0 },
            "1.{minor}"
        );
        assert_eq!(s.features, c.features);
    }
}

#[test]
fn a_peer_below_1_21_or_of_another_major_is_refused() {
    let client = u64s(&[0x6e697863, 1 << 8 | 20]);
    let info = ServerInfo {
        version: Version::MAX,
        nix_version: "nixb".into(),
        trusted: None,
        features: BTreeSet::new(),
    };
    let e = server_handshake(
        &mut WireReader::new(&client[..]),
        &mut WireWriter::new(Vec::new()),
        &info,
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "the client's protocol version 1.20 is too old (nixb needs at least 1.21)"
    );
    let daemon = u64s(&[0x6478696f, 2 << 8 | 1]);
    let cinfo = ClientInfo {
        version: Version::MAX,
        features: BTreeSet::new(),
    };
    let e = client_handshake(
        &mut WireReader::new(&daemon[..]),
        &mut WireWriter::new(Vec::new()),
        &cinfo,
    )
    .unwrap_err();
    assert!(matches!(e, ProtocolError::Major { .. }), "{e}");
    let bad = u64s(&[0x1234]);
    let e = server_handshake(
        &mut WireReader::new(&bad[..]),
        &mut WireWriter::new(Vec::new()),
        &info,
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "worker protocol mismatch: expected magic 0x6e697863, got 0x1234"
    );
}

#[test]
fn gate_1_22_substitutable_path_infos_carry_content_addresses() {
    let req = Request::QuerySubstitutablePathInfos(BTreeMap::from([(path(P), "x".to_string())]));
    let at21 = req_bytes(&req, 21);
    let at22 = req_bytes(&req, 22);
    // op, count, path; then from 1.22 the content address str("x") = 16 bytes.
    assert_eq!(at21, [u64s(&[30, 1]), s(P)].concat());
    assert_eq!(at22, [u64s(&[30, 1]), s(P), s("x")].concat());
    assert_eq!(req_back(&at22, 22), req);
    let Request::QuerySubstitutablePathInfos(m) = req_back(&at21, 21) else {
        panic!()
    };
    assert_eq!(m[&path(P)], "");
}

#[test]
fn gate_1_23_add_to_store_nar_data_is_framed_from_1_23() {
    let req = Request::AddToStoreNar(AddToStoreNarRequest {
        info: ValidPathInfo {
            path: path(P),
            info: PathInfo {
                deriver: None,
                nar_hash: Hash::digest(HashAlgo::Sha256, b""),
                references: BTreeSet::new(),
                registration_time: 0,
                nar_size: 0,
                ultimate: false,
                sigs: BTreeSet::new(),
                ca: None,
            },
        },
        repair: false,
        dont_check_sigs: false,
    });
    assert_eq!(req.data(&cx(22)), DataTransfer::Tunnelled);
    assert_eq!(req.data(&cx(23)), DataTransfer::Framed);
    assert_eq!(req_back(&req_bytes(&req, 23), 23), req);
}

#[test]
fn gate_1_25_add_to_store_changes_form() {
    let new = Request::AddToStore(AddToStoreRequest {
        name: "t".into(),
        method: "text:sha256".into(),
        references: BTreeSet::new(),
        repair: false,
    });
    let old = Request::AddToStoreOld(AddToStoreOldRequest {
        base_name: "t".into(),
        fixed: true,
        recursive: true,
        hash_algo: "sha256".into(),
    });
    // From 1.25: name, method, references, repair; framed data.
    assert_eq!(
        req_bytes(&new, 25),
        [u64s(&[7]), s("t"), s("text:sha256"), u64s(&[0, 0])].concat()
    );
    assert_eq!(req_back(&req_bytes(&new, 25), 25), new);
    assert_eq!(new.data(&cx(25)), DataTransfer::Framed);
    // Before: base name, fixed, recursive, hash algorithm; a plain NAR follows.
    assert_eq!(
        req_bytes(&old, 24),
        [u64s(&[7]), s("t"), u64s(&[1, 1]), s("sha256")].concat()
    );
    assert_eq!(req_back(&req_bytes(&old, 24), 24), old);
    assert_eq!(old.data(&cx(24)), DataTransfer::Nar);
    // Each form is refused at the other side of the boundary, before a byte is written.
    let mut out = Vec::new();
    assert!(new.write(&mut WireWriter::new(&mut out), &cx(24)).is_err());
    assert!(old.write(&mut WireWriter::new(&mut out), &cx(25)).is_err());
    assert!(out.is_empty());
}

#[test]
fn gate_1_26_error_frames_become_structured() {
    let e = RemoteError::new("boom");
    let f = StderrFrame::Error(e.clone());
    let at25 = encode(|w| f.write(w, Version::new(1, 25)).unwrap());
    let at26 = encode(|w| f.write(w, Version::new(1, 26)).unwrap());
    // Before 1.26: message and exit status.
    assert_eq!(at25, [u64s(&[0x63787470]), s("boom"), u64s(&[1])].concat());
    // From 1.26: "Error", level, name, message, no position, no traces.
    assert_eq!(
        at26,
        [
            u64s(&[0x63787470]),
            s("Error"),
            u64s(&[0]),
            s("Error"),
            s("boom"),
            u64s(&[0, 0])
        ]
        .concat()
    );
    for (b, minor) in [(&at25, 25), (&at26, 26)] {
        let back = StderrFrame::read(&mut WireReader::new(&b[..]), Version::new(1, minor)).unwrap();
        assert_eq!(back, f, "1.{minor}");
    }
}

#[test]
fn gate_1_27_query_valid_paths_gets_the_substitute_flag() {
    let req = Request::QueryValidPaths {
        paths: BTreeSet::from([path(P)]),
        substitute: true,
    };
    assert_eq!(req_bytes(&req, 26), [u64s(&[31, 1]), s(P)].concat());
    assert_eq!(
        req_bytes(&req, 27),
        [u64s(&[31, 1]), s(P), u64s(&[1])].concat()
    );
    assert_eq!(req_back(&req_bytes(&req, 27), 27), req);
    let Request::QueryValidPaths { substitute, .. } = req_back(&req_bytes(&req, 26), 26) else {
        panic!()
    };
    assert!(!substitute);
}

#[test]
fn gates_1_28_1_29_1_37_build_result_fields() {
    let mut br = BuildResult::new(BuildStatus::Built);
    br.times_built = 1;
    br.built_outputs.insert("sha256:aa!out".into(), "{}".into());
    br.cpu_user = Some(7);
    let len = |minor: u8| encode(|w| br.write(w, &cx(minor)).unwrap()).len();
    // status + empty message = 16 bytes; 1.28 adds the map (count 8, the 13-byte id
    // in 8 + 16, "{}" in 8 + 8: 48 bytes); 1.29 the four numbers (32); 1.37 the two
    // optional CPU times (tag and value 16, tag 8).
    assert_eq!(len(27), 16);
    assert_eq!(len(28), 16 + 48);
    assert_eq!(len(29), 16 + 32 + 48);
    assert_eq!(len(36), len(29));
    assert_eq!(len(37), len(36) + 24);
    for minor in [27, 28, 29, 36, 37] {
        let b = encode(|w| br.write(w, &cx(minor)).unwrap());
        let back = BuildResult::read(&mut WireReader::new(&b[..]), &cx(minor)).unwrap();
        assert_eq!(back.cpu_user, if minor >= 37 { Some(7) } else { None });
        assert_eq!(back.times_built, if minor >= 29 { 1 } else { 0 });
        assert_eq!(back.built_outputs.len(), if minor >= 28 { 1 } else { 0 });
    }
}

#[test]
fn gate_1_30_derived_paths() {
    let all = DerivedPath::Built {
        drv: path(DRV),
        outputs: OutputsSpec::All,
    };
    let some = DerivedPath::Built {
        drv: path(DRV),
        outputs: OutputsSpec::Names(vec!["dev".into(), "out".into()]),
    };
    let drv_itself = DerivedPath::Opaque(path(DRV));
    assert_eq!(all.to_wire(&cx(29)).unwrap(), DRV);
    assert_eq!(all.to_wire(&cx(30)).unwrap(), format!("{DRV}!*"));
    assert_eq!(some.to_wire(&cx(29)).unwrap(), format!("{DRV}!dev,out"));
    assert_eq!(some.to_wire(&cx(30)).unwrap(), format!("{DRV}!dev,out"));
    assert!(drv_itself.to_wire(&cx(29)).is_err());
    assert_eq!(drv_itself.to_wire(&cx(30)).unwrap(), DRV);
    // The same string means different things either side of 1.30.
    assert_eq!(DerivedPath::parse(&cx(29), DRV).unwrap(), all);
    assert_eq!(DerivedPath::parse(&cx(30), DRV).unwrap(), drv_itself);
    for minor in [29, 30] {
        for p in [&all, &some] {
            let w = p.to_wire(&cx(minor)).unwrap();
            assert_eq!(&DerivedPath::parse(&cx(minor), &w).unwrap(), p);
        }
    }
    assert!(DerivedPath::parse(&cx(30), &format!("{DRV}!bad name")).is_err());
}

#[test]
fn gate_1_31_realisations() {
    let reg = Request::RegisterDrvOutput {
        id_or_json: "sha256:aa!out".into(),
        // A base name: Nix 2.8 reads it with `StorePath(readString(from))`.
        output_path: BASE.into(),
    };
    assert_eq!(
        req_bytes(&reg, 30),
        [u64s(&[42]), s("sha256:aa!out"), s(BASE)].concat()
    );
    assert_eq!(req_back(&req_bytes(&reg, 30), 30), reg);
    let json = Request::RegisterDrvOutput {
        id_or_json: "{}".into(),
        output_path: String::new(),
    };
    assert_eq!(req_bytes(&json, 31), [u64s(&[42]), s("{}")].concat());
    assert_eq!(req_back(&req_bytes(&json, 31), 31), json);
    // The answer to QueryRealisation: paths before 1.31, realisations (JSON) from 1.31;
    // a Nix without ca-derivations answers with an empty set either way.
    let q = Request::QueryRealisation("sha256:aa!out".into());
    let empty = u64s(&[0]);
    let r30 = Response::read(&q, &mut WireReader::new(&empty[..]), &cx(30)).unwrap();
    let r31 = Response::read(&q, &mut WireReader::new(&empty[..]), &cx(31)).unwrap();
    assert_eq!(r30, Response::Paths(BTreeSet::new()));
    assert_eq!(r31, Response::Strings(Vec::new()));
    let one = [u64s(&[1]), s(P)].concat();
    assert_eq!(
        Response::read(&q, &mut WireReader::new(&one[..]), &cx(30)).unwrap(),
        Response::Paths(BTreeSet::from([path(P)]))
    );
    assert_eq!(
        Response::read(&q, &mut WireReader::new(&one[..]), &cx(31)).unwrap(),
        Response::Strings(vec![P.into()])
    );
}

#[test]
fn unknown_operations_and_hostile_lengths_are_named() {
    let bytes = u64s(&[99]);
    let e = Op::read(&mut WireReader::new(&bytes[..])).unwrap_err();
    assert_eq!(e.to_string(), "unknown worker operation 99");
    // IsValidPath with a 2^60-byte path: refused before allocation, naming op and field.
    let bytes = u64s(&[1, 1 << 60]);
    let mut r = WireReader::new(&bytes[..]);
    let op = Op::read(&mut r).unwrap();
    let e = Request::read(op, &mut r, &cx(34)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "IsValidPath: path at byte 8 is 1152921504606846976 bytes long, more than the 4096 allowed"
    );
    // A client that stops mid-frame.
    let mut bytes = u64s(&[26]);
    bytes.extend_from_slice(&s(P)[..20]);
    let mut r = WireReader::new(&bytes[..]);
    let op = Op::read(&mut r).unwrap();
    let e = Request::read(op, &mut r, &cx(34)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "QueryPathInfo: stream ends at byte 28 while reading path"
    );
    assert!(e.is_eof());
    // A path outside the store.
    let bytes = [u64s(&[1]), s("/etc/passwd")].concat();
    let mut r = WireReader::new(&bytes[..]);
    let op = Op::read(&mut r).unwrap();
    let e = Request::read(op, &mut r, &cx(34)).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("IsValidPath: bad store path '/etc/passwd' in path"),
        "{e}"
    );
}

#[test]
fn hostile_daemon_frames_are_named_errors() {
    let v = Version::NIX_2_8;
    let bytes = u64s(&[0x1234]);
    let e = StderrFrame::read(&mut WireReader::new(&bytes[..]), v).unwrap_err();
    assert_eq!(
        e.to_string(),
        "unknown stderr message type 0x1234 at byte 0"
    );
    // A 2^60-byte log line, refused before allocation.
    let bytes = u64s(&[0x6f6c6d67, 1 << 60]);
    let e = StderrFrame::read(&mut WireReader::new(&bytes[..]), v).unwrap_err();
    assert_eq!(
        e.to_string(),
        "log line at byte 8 is 1152921504606846976 bytes long, more than the 16777216 allowed"
    );
    // An activity with an unknown field type, and an error claiming a position.
    let bytes = u64s(&[0x53545254, 1, 0, 105, 0, 1, 9]);
    let e = StderrFrame::read(&mut WireReader::new(&bytes[..]), v).unwrap_err();
    assert_eq!(e.to_string(), "unknown field type 9 at byte 48");
    let bytes = [
        u64s(&[0x63787470]),
        s("Error"),
        u64s(&[0]),
        s("Error"),
        s("m"),
        u64s(&[1]),
    ]
    .concat();
    let e = StderrFrame::read(&mut WireReader::new(&bytes[..]), v).unwrap_err();
    assert!(e.to_string().starts_with("unknown error position 1"), "{e}");
}
