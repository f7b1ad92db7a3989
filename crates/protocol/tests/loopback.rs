//! Client and ServerConnection talking to each other over a socket pair, for the data
//! paths a real daemon's tests do not reach from this crate: a NAR streamed after
//! `STDERR_LAST`, output through `STDERR_WRITE`, input pulled with `STDERR_READ`, framed
//! uploads bounded by size, and a daemon error that leaves the connection usable.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use nixb_protocol::types::{PathInfo, ValidPathInfo};
use nixb_protocol::{
    Client, ClientInfo, ProtocolError, RemoteError, Request, Response, ServerConnection,
    ServerInfo, Version,
};
use nixb_store::{Hash, HashAlgo, StoreDir};

const P: &str = "/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-hello";

/// A NAR of one regular file holding "hi\n", worked out by hand.
fn nar() -> Vec<u8> {
    let s = |b: &[u8]| {
        let mut v = (b.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(b);
        v.resize(v.len() + (8 - b.len() % 8) % 8, 0);
        v
    };
    [
        s(b"nix-archive-1"),
        s(b"("),
        s(b"type"),
        s(b"regular"),
        s(b"contents"),
        s(b"hi\n"),
        s(b")"),
    ]
    .concat()
}

fn run(
    minor: u8,
    daemon: impl FnOnce(&mut ServerConnection<UnixStream, UnixStream>) + Send + 'static,
    client: impl FnOnce(&mut Client<UnixStream, UnixStream>),
) {
    let store = StoreDir::new("/nix/store").unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    let sd = store.clone();
    let t = std::thread::spawn(move || {
        let info = ServerInfo {
            version: Version::MAX,
            nix_version: "nixb".into(),
            trusted: None,
            features: BTreeSet::new(),
        };
        let mut conn = ServerConnection::accept(a.try_clone().unwrap(), a, sd, &info).unwrap();
        daemon(&mut conn);
    });
    let info = ClientInfo {
        version: Version::new(1, minor),
        features: BTreeSet::new(),
    };
    let mut c = Client::connect(b.try_clone().unwrap(), b, store, &info).unwrap();
    client(&mut c);
    drop(c);
    t.join().unwrap();
}

#[test]
fn nar_from_path_is_streamed_after_last() {
    run(
        34,
        |conn| {
            let req = conn.read_request().unwrap().unwrap();
            assert!(matches!(req, Request::NarFromPath(_)));
            assert_eq!(
                conn.finish_nar(&mut &nar()[..]).unwrap(),
                nar().len() as u64
            );
            assert!(conn.read_request().unwrap().is_none());
        },
        |c| {
            let p = c.ctx().store_dir.parse(P).unwrap();
            let mut got = Vec::new();
            assert_eq!(c.nar_from_path(&p, &mut got).unwrap(), nar().len() as u64);
            assert_eq!(got, nar());
        },
    );
}

#[test]
fn export_goes_through_stderr_write_and_import_through_stderr_read() {
    let export: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
    let e2 = export.clone();
    run(
        34,
        move |conn| {
            let req = conn.read_request().unwrap().unwrap();
            assert!(matches!(req, Request::ExportPath { .. }));
            conn.tunnel_sink().write_all(&e2).unwrap();
            conn.finish(&req, &Response::One).unwrap();
            // ImportPaths: pull the client's whole input through STDERR_READ.
            let req = conn.read_request().unwrap().unwrap();
            assert_eq!(req, Request::ImportPaths);
            let mut got = vec![0u8; e2.len()];
            conn.tunnel().read_exact(&mut got).unwrap();
            assert_eq!(got, e2);
            let imported = conn.ctx().store_dir.parse(P).unwrap();
            conn.finish(&req, &Response::PathList(vec![imported]))
                .unwrap();
        },
        |c| {
            let p = c.ctx().store_dir.parse(P).unwrap();
            let mut got = Vec::new();
            c.export_path(&p, &mut got).unwrap();
            assert_eq!(got, export);
            let resp = c
                .request(&Request::ImportPaths, Some(&mut &export[..]), &mut |_| {})
                .unwrap();
            assert_eq!(resp, Response::PathList(vec![p]));
        },
    );
}

#[test]
fn a_framed_upload_is_bounded_and_an_error_keeps_the_connection() {
    for minor in [22u8, 34] {
        run(
            minor,
            |conn| {
                let req = conn.read_request().unwrap().unwrap();
                let Request::AddToStoreNar(a) = &req else {
                    panic!("{req:?}")
                };
                let max = a.info.info.nar_size;
                // The NAR is bigger than announced: refused once it crosses the size.
                let mut sink = Vec::new();
                let e = if conn.ctx().at_least(23) {
                    let mut f = conn.framed().with_max_total(max);
                    let e = std::io::copy(&mut f, &mut sink).unwrap_err();
                    // Skip the rest, keeping the stream in step for the next request.
                    f.finish().unwrap();
                    e
                } else {
                    // Before 1.23 the daemon pulls what it needs and stops there.
                    let mut t = conn.tunnel().take(max + 1);
                    std::io::copy(&mut t, &mut sink).unwrap();
                    std::io::Error::other("nar longer than announced")
                };
                assert!(sink.len() as u64 <= max + 1);
                conn.fail(&RemoteError::new(format!("nar too long: {e}")))
                    .unwrap();
                let req = conn.read_request().unwrap().unwrap();
                conn.finish(&req, &Response::Bool(true)).unwrap();
            },
            |c| {
                let p = c.ctx().store_dir.parse(P).unwrap();
                let info = ValidPathInfo {
                    path: p.clone(),
                    info: PathInfo {
                        deriver: None,
                        nar_hash: Hash::digest(HashAlgo::Sha256, nar()),
                        references: BTreeSet::new(),
                        registration_time: 0,
                        nar_size: 16,
                        ultimate: false,
                        sigs: BTreeSet::new(),
                        ca: None,
                    },
                };
                let e = c
                    .add_to_store_nar(&info, &mut &nar()[..], false, false)
                    .unwrap_err();
                assert!(
                    matches!(&e, ProtocolError::InOp { source, .. } if matches!(**source, ProtocolError::Remote(_))),
                    "{e}"
                );
                assert!(e.to_string().contains("nar too long"), "{e}");
                assert!(c.is_valid_path(&p).unwrap());
            },
        );
    }
}

/// At 1.38 the daemon answers the feature exchange with everything else it has to say
/// (its Nix version, the trust flag, the end of the start-up channel) before it reads the
/// client's obsolete fields: a client that has sent only its features already finds all
/// of it, so the greeting takes one round trip less.
#[test]
fn the_daemon_says_all_it_has_before_reading_the_obsolete_fields() {
    use nixb_protocol::handshake::{WORKER_MAGIC_1, WORKER_MAGIC_2};
    use nixb_protocol::wire::{WireReader, WireWriter};

    let (a, b) = UnixStream::pair().unwrap();
    let server = std::thread::spawn(move || {
        let info = ServerInfo {
            version: Version::MAX,
            nix_version: "nixb-test".into(),
            trusted: Some(nixb_protocol::TrustedFlag::Trusted),
            features: BTreeSet::new(),
        };
        let sd = StoreDir::new("/nix/store").unwrap();
        ServerConnection::accept(a.try_clone().unwrap(), a, sd, &info)
            .map(|c| c.handshake().clone())
    });
    b.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut w = WireWriter::new(b.try_clone().unwrap());
    let mut r = WireReader::new(b.try_clone().unwrap());
    w.write_u64(WORKER_MAGIC_1, "magic").unwrap();
    w.write_u64(Version::MAX.to_wire(), "version").unwrap();
    w.flush().unwrap();
    assert_eq!(r.read_u64("magic").unwrap(), WORKER_MAGIC_2);
    assert_eq!(r.read_u64("version").unwrap(), Version::MAX.to_wire());
    w.write_u64(0, "no features").unwrap();
    w.flush().unwrap();
    // Nothing more sent: all of this must already be on its way.
    assert_eq!(r.read_u64("daemon features").unwrap(), 0);
    assert_eq!(r.read_string("nix version").unwrap(), "nixb-test");
    assert_eq!(r.read_u64("trusted").unwrap(), 1);
    assert_eq!(r.read_u64("stderr last").unwrap(), 0x616c7473);
    // Now the obsolete fields: cpu affinity 1 with cpu 3, reserveSpace.
    for n in [1, 3, 0] {
        w.write_u64(n, "obsolete").unwrap();
    }
    w.flush().unwrap();
    let hs = server.join().unwrap().unwrap();
    assert_eq!(hs.cpu_affinity, Some(3));
    assert_eq!(hs.version, Version::MAX);
}
