//! Replays exchanges recorded between Nix 2.8 clients and `nix-daemon --stdio` 2.8
//! (fixtures/nix-2.8, made by fixtures/record.sh) byte for byte: both sides of the
//! handshake are re-run against the other side's recorded bytes, and every request,
//! stderr frame, response and data transfer is parsed and written again, which must
//! give back exactly the recorded bytes and consume each stream to its end.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use nixb_protocol::framed::{write_frames, FramedReader};
use nixb_protocol::handshake::{client_handshake, server_handshake};
use nixb_protocol::nar::copy_nar;
use nixb_protocol::ops::DataTransfer;
use nixb_protocol::types::DerivedPath;
use nixb_protocol::wire::{WireReader, WireWriter};
use nixb_protocol::{ClientInfo, Ctx, Request, Response, ServerInfo, StderrFrame, Version};
use nixb_store::StoreDir;

const STORE: &str = "/tmp/nixb-protocol-rec/store";
const VERSIONS_STORE: &str = "/tmp/nixb-protocol-rec-v/store";

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nix-2.8")
}

fn versions_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/versions")
}

fn encode(f: impl FnOnce(&mut WireWriter<&mut Vec<u8>>)) -> Vec<u8> {
    let mut v = Vec::new();
    let mut w = WireWriter::new(&mut v);
    f(&mut w);
    w.flush().unwrap();
    drop(w);
    v
}

/// Checks that what was parsed from `bytes[start..r.offset()]` writes back identically.
fn same(what: &str, bytes: &[u8], start: u64, end: u64, again: &[u8]) {
    let orig = &bytes[start as usize..end as usize];
    assert!(
        orig == again,
        "{what}: bytes {start}..{end} differ when written again\nrecorded: {orig:?}\nwritten:  {again:?}"
    );
}

/// One replayed exchange: the requests and what answered them.
struct Exchange {
    requests: Vec<Request>,
    responses: Vec<Option<Response>>,
    frames: Vec<StderrFrame>,
    /// The framed data of each request that had some, joined.
    framed: Vec<Vec<u8>>,
}

fn replay(name: &str) -> Exchange {
    replay_in(&fixture_dir(), STORE, name, Version::NIX_2_8)
}

/// Replays `<name>.{client,daemon}.bin` of a client offering `client_version` to
/// nix-daemon 2.8 (which offers 1.34).
fn replay_in(dir: &Path, store: &str, name: &str, client_version: Version) -> Exchange {
    let client = std::fs::read(dir.join(format!("{name}.client.bin"))).unwrap();
    let daemon = std::fs::read(dir.join(format!("{name}.daemon.bin"))).unwrap();
    let store_dir = StoreDir::new(store).unwrap();
    let version = client_version.min(Version::NIX_2_8);

    // The daemon's side of the handshake against the client's recorded bytes.
    let mut cr = WireReader::new(&client[..]);
    let info = ServerInfo {
        version: Version::NIX_2_8,
        nix_version: "2.8.0".into(),
        trusted: None,
        features: BTreeSet::new(),
    };
    let mut hs = None;
    let written = encode(|w| {
        hs = Some(server_handshake(&mut cr, w, &info).unwrap());
        StderrFrame::Last.write(w, version).unwrap();
    });
    let hs = hs.unwrap();
    assert_eq!(hs.version, version, "{name}");
    assert_eq!(hs.peer_version, client_version, "{name}");
    same(
        &format!("{name}: daemon handshake"),
        &daemon,
        0,
        written.len() as u64,
        &written,
    );

    // The client's side against the daemon's recorded bytes.
    let mut dr = WireReader::new(&daemon[..]);
    let cinfo = ClientInfo {
        version: client_version,
        features: BTreeSet::new(),
    };
    let mut chs = None;
    let written = encode(|w| chs = Some(client_handshake(&mut dr, w, &cinfo).unwrap()));
    let chs = chs.unwrap();
    assert_eq!(
        chs.daemon_nix_version.as_deref(),
        (version >= Version::new(1, 33)).then_some("2.8.0")
    );
    assert_eq!(chs.trusted, None);
    same(
        &format!("{name}: client handshake"),
        &client,
        0,
        cr.offset(),
        &written,
    );
    assert_eq!(
        StderrFrame::read(&mut dr, chs.version).unwrap(),
        StderrFrame::Last
    );

    let cx = Ctx::new(hs.version, store_dir);
    let mut ex = Exchange {
        requests: Vec::new(),
        responses: Vec::new(),
        frames: Vec::new(),
        framed: Vec::new(),
    };
    loop {
        let start = cr.offset();
        let Some(n) = cr.read_u64_or_eof("operation").unwrap() else {
            break;
        };
        let op = nixb_protocol::Op::from_u64(n).unwrap_or_else(|| panic!("{name}: op {n}"));
        let req = Request::read(op, &mut cr, &cx).unwrap();
        let again = encode(|w| req.write(w, &cx).unwrap());
        same(
            &format!("{name}: {op:?} request"),
            &client,
            start,
            cr.offset(),
            &again,
        );

        let data = req.data(&cx);
        match data {
            DataTransfer::Framed => {
                let start = cr.offset();
                let frames = FramedReader::new(&mut cr).read_frames().unwrap();
                let again = encode(|w| write_frames(w, &frames).unwrap());
                same(
                    &format!("{name}: {op:?} framed data"),
                    &client,
                    start,
                    cr.offset(),
                    &again,
                );
                ex.framed.push(frames.concat());
            }
            DataTransfer::Nar => {
                let start = cr.offset();
                let mut nar = Vec::new();
                copy_nar(&mut cr, &mut nar).unwrap();
                same(
                    &format!("{name}: {op:?} nar"),
                    &client,
                    start,
                    cr.offset(),
                    &nar,
                );
            }
            DataTransfer::None | DataTransfer::Tunnelled => {}
        }

        // The daemon's frames up to LAST or ERROR, then the answer.
        let mut final_frame = None;
        while final_frame.is_none() {
            let start = dr.offset();
            let f = StderrFrame::read(&mut dr, cx.version).unwrap();
            let again = encode(|w| f.write(w, cx.version).unwrap());
            same(
                &format!("{name}: {op:?} stderr frame"),
                &daemon,
                start,
                dr.offset(),
                &again,
            );
            if let StderrFrame::Read(_) = f {
                // The client answers a READ with a string of input.
                let start = cr.offset();
                let b = cr.read_bytes("read reply").unwrap();
                let again = encode(|w| w.write_bytes(&b, "read reply").unwrap());
                same(
                    &format!("{name}: {op:?} read reply"),
                    &client,
                    start,
                    cr.offset(),
                    &again,
                );
            }
            if f.is_final() {
                final_frame = Some(f.clone());
            }
            ex.frames.push(f);
        }
        let resp = if final_frame == Some(StderrFrame::Last) {
            let start = dr.offset();
            let resp = Response::read(&req, &mut dr, &cx).unwrap();
            let again = encode(|w| resp.write_for(&req, w, &cx).unwrap());
            same(
                &format!("{name}: {op:?} response"),
                &daemon,
                start,
                dr.offset(),
                &again,
            );
            Some(resp)
        } else {
            None
        };
        ex.requests.push(req);
        ex.responses.push(resp);
    }
    assert_eq!(
        cr.offset(),
        client.len() as u64,
        "{name}: client bytes left over"
    );
    assert_eq!(
        dr.offset(),
        daemon.len() as u64,
        "{name}: daemon bytes left over"
    );
    ex
}

fn ops(ex: &Exchange) -> Vec<&'static str> {
    ex.requests.iter().map(|r| r.op().name()).collect()
}

#[test]
fn every_recorded_exchange_replays_byte_for_byte() {
    let mut names: Vec<String> = std::fs::read_dir(fixture_dir())
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().into_string().unwrap();
            n.strip_suffix(".client.bin").map(str::to_string)
        })
        .collect();
    names.sort();
    assert!(names.len() >= 20, "fixtures missing: {names:?}");
    for n in &names {
        let ex = replay(n);
        eprintln!("{n}: {:?}", ops(&ex));
    }
}

/// Values known from what record.sh did, not from the code under test.
#[test]
fn recorded_exchanges_mean_what_the_commands_did() {
    // nix-store --add hello.txt ("hello\n"): AddToStore (1.25 form) of a NAR-hashed
    // fixed path; the NAR of a 6-byte file is 120 bytes (worked by hand: 13-byte magic
    // in 24, five tokens of 16, the length and padded contents in 16).
    let ex = replay("add-text");
    let Request::AddToStore(a) = &ex.requests[1] else {
        panic!("{:?}", ex.requests[1])
    };
    assert_eq!(a.name, "hello.txt");
    assert_eq!(a.method, "fixed:r:sha256");
    assert!(a.references.is_empty());
    let Some(Response::ValidPathInfo(v)) = &ex.responses[1] else {
        panic!("{:?}", ex.responses[1])
    };
    assert_eq!(v.path.name(), "hello.txt");
    assert_eq!(v.info.nar_size, 120);
    assert_eq!(
        v.info
            .ca
            .as_deref()
            .map(|c| c.starts_with("fixed:r:sha256:")),
        Some(true)
    );

    // The failing builder exits 3: the daemon ends BuildPaths with STDERR_ERROR (the
    // 1.26+ structured form) naming the exit code, and sends no answer.
    let ex = replay("realise-fail");
    let Some(StderrFrame::Error(e)) = ex.frames.last() else {
        panic!("{:?}", ex.frames.last())
    };
    assert!(
        e.message.contains("failed with exit code 3"),
        "{}",
        e.message
    );
    assert_eq!(ex.responses.last(), Some(&None));
    // Its build log reached the client as a BuildLogLine result.
    assert!(ex.frames.iter().any(|f| matches!(f,
        StderrFrame::Result { kind: nixb_protocol::stderr::ResultType::BuildLogLine, fields, .. }
            if fields.first() == Some(&nixb_protocol::stderr::Field::string("about to fail")))));

    // nix-build -o result: the derivation's outputs are asked for by name or all at once,
    // and the result link becomes an indirect root.
    let ex = replay("nix-build");
    let built = ex.requests.iter().find_map(|r| match r {
        Request::BuildPaths { paths, .. } => Some(paths.clone()),
        _ => None,
    });
    let built = built.unwrap();
    assert!(
        matches!(&built[0], DerivedPath::Built { drv, .. } if drv.name() == "hello.drv"),
        "{built:?}"
    );
    assert!(ex.requests.iter().any(|r| matches!(r,
        Request::AddIndirectRoot(p) if p == "/tmp/nixb-protocol-rec/result")));

    // nix build: BuildPathsWithResults, whose results carry the outputs as Nix 2.8's
    // realisation JSON.
    let ex = replay("nix-build-new");
    let Some(Response::BuildResults(res)) = ex.responses.last().unwrap() else {
        panic!("{:?}", ex.responses.last())
    };
    assert_eq!(res.len(), 1);
    let (id, json) = res[0]
        .result
        .built_outputs
        .iter()
        .find(|(k, _)| k.ends_with("!out"))
        .unwrap();
    assert!(id.starts_with("sha256:"));
    assert!(json.contains("-hello\""), "{json}");

    // nix copy: AddMultipleToStore with the one path, inside its framed data.
    let ex = replay("copy-to");
    assert!(matches!(ex.requests[2], Request::AddMultipleToStore { .. }));
    let payload = &ex.framed[0];
    let mut r = WireReader::new(&payload[..]);
    assert_eq!(nixb_protocol::ops::read_multiple_header(&mut r).unwrap(), 1);
    let cx = Ctx::new(Version::NIX_2_8, StoreDir::new(STORE).unwrap());
    let info = nixb_protocol::ops::read_multiple_item(&mut r, &cx).unwrap();
    assert_eq!(info.path.name(), "other.txt");
    let mut nar = Vec::new();
    copy_nar(&mut r, &mut nar).unwrap();
    assert_eq!(nar.len() as u64, info.info.nar_size);
    // "other\n" is 6 bytes: the same 120-byte NAR shape as hello.txt above.
    assert_eq!(nar.len(), 120);
    assert_eq!(r.offset(), payload.len() as u64);
}

/// Exchanges of nixb's client at each version 1.21 to 1.34 with nix-daemon 2.8
/// (fixtures/versions, made by examples/record_versions.rs): the daemon's side is real
/// Nix answering that version.
#[test]
fn every_version_from_1_21_to_1_34_replays_byte_for_byte() {
    for minor in 21..=34u8 {
        let v = Version::new(1, minor);
        let ex = replay_in(&versions_dir(), VERSIONS_STORE, &format!("v1_{minor}"), v);
        // Below 1.25 the client adds text with AddTextToStore and asks for its info.
        let add: &[&str] = if minor >= 25 {
            &["AddToStore"]
        } else {
            &["AddTextToStore", "QueryPathInfo"]
        };
        let expected: Vec<&str> = ["SetOptions"]
            .iter()
            .chain(add)
            .chain(&[
                "IsValidPath",
                "QueryValidPaths",
                "QueryMissing",
                "BuildPaths",
                "QueryDerivationOutputMap",
                "AddTempRoot",
                "NarFromPath",
                "BuildPaths",
            ])
            .copied()
            .collect();
        assert_eq!(ops(&ex), expected, "at {v}");
        // The last request fails in the daemon: the error frame is in the form this
        // version reads (structured from 1.26) and names the bogus path.
        let Some(StderrFrame::Error(e)) = ex.frames.last() else {
            panic!("at {v}: {:?}", ex.frames.last())
        };
        assert!(e.message.contains("-bogus"), "at {v}: {e:?}");
        // The build log reached the client as an activity result.
        assert!(ex.frames.iter().any(|f| matches!(f,
            StderrFrame::Result { kind: nixb_protocol::stderr::ResultType::BuildLogLine, fields, .. }
                if fields.first() == Some(&nixb_protocol::stderr::Field::string(format!("building {minor}"))))),
            "at {v}");
        // The text file's NAR came back whole: the magic in 24 bytes, five tokens of 16
        // ("(", "type", "regular", "contents", ")"), the length in 8 and 13 bytes of
        // text padded to 16: 128 bytes (worked by hand).
        let at = expected.len() - 2;
        let Some(Some(Response::Nar(nar))) = ex.responses.get(at) else {
            panic!("at {v}: {:?}", ex.responses.get(at))
        };
        assert_eq!(nar.len(), 128, "at {v}");
    }
}

/// The daemon's activities, rendered by `to_internal_json`, are line for line what
/// nix-build 2.8 printed for them with `--log-format internal-json` (it forwards a
/// daemon's activities under their ids), in the same order.
#[test]
fn activities_render_as_nix_internal_json_lines() {
    let ex = replay("nix-build-json");
    let printed = std::fs::read_to_string(fixture_dir().join("nix-build-json.stderr.txt")).unwrap();
    let printed: Vec<&str> = printed.lines().collect();
    let ours: Vec<String> = ex
        .frames
        .iter()
        .filter(|f| !matches!(f, StderrFrame::Next(_)))
        .filter_map(nixb_protocol::stderr::to_internal_json)
        .collect();
    assert!(ours.len() >= 10, "{ours:?}");
    let mut at = 0;
    for line in &ours {
        match printed[at..].iter().position(|p| p == line) {
            Some(i) => at += i + 1,
            None => panic!("not printed by nix-build (in this order): {line}\n{printed:#?}"),
        }
    }
    // The log line with a quote, a tab, a backslash and an escape character.
    assert!(
        ours.iter()
            .any(|l| l.contains(r#""fields":["quote\" tab\tbs\\ esc\u001b[0m end"]"#)),
        "{ours:?}"
    );
}
