//! Hostile and untrusted clients against an in-process daemon on a unix socket: absurd
//! lengths and unknown operations get an error naming them and a hang-up, while another
//! connection keeps being served; an untrusted client cannot import an unsigned NAR; a
//! stop removes the socket. The expected values are worked out by hand.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use nixb_daemon::{Daemon, DaemonConfig, Stopper, TrustConfig};
use nixb_protocol::types::{PathInfo, ValidPathInfo};
use nixb_protocol::wire::{WireReader, WireWriter};
use nixb_protocol::{Client, ClientInfo, Request, Response, StderrFrame, Version};
use nixb_store::local_store::{LocalStore, StoreConfig};
use nixb_store::{Hash, HashAlgo, StoreDir};

struct Setup {
    _root: tempfile::TempDir,
    store_dir: StoreDir,
    daemon: Arc<Daemon>,
}

fn setup() -> Setup {
    let root = tempfile::tempdir().unwrap();
    let store_dir = StoreDir::new(root.path().join("store").to_str().unwrap()).unwrap();
    let store = LocalStore::open(StoreConfig {
        store_dir: store_dir.clone(),
        state_dir: root.path().join("state"),
        log_dir: root.path().join("log"),
    })
    .unwrap();
    let config = DaemonConfig {
        worker: nixb_goals::WorkerConfig::new(root.path().join("log")),
        trust: TrustConfig::default(),
        nix_version: "nixb-test".into(),
        gc: Default::default(),
    };
    Setup {
        _root: root,
        store_dir,
        daemon: Arc::new(Daemon::new(store, config)),
    }
}

const V: Version = Version::new(1, 34);

fn connect(s: &UnixStream, store_dir: &StoreDir) -> Client<UnixStream, UnixStream> {
    let info = ClientInfo {
        version: V,
        features: BTreeSet::new(),
    };
    Client::connect(
        s.try_clone().unwrap(),
        s.try_clone().unwrap(),
        store_dir.clone(),
        &info,
    )
    .unwrap()
}

/// Sends `words` raw after the greeting and returns the daemon's error frame; then the
/// daemon must hang up.
fn raw_attack(sock: &std::path::Path, store_dir: &StoreDir, words: &[u64]) -> String {
    let s = UnixStream::connect(sock).unwrap();
    let _client = connect(&s, store_dir);
    let mut w = WireWriter::new(s.try_clone().unwrap());
    for word in words {
        w.write_u64(*word, "attack").unwrap();
    }
    w.flush().unwrap();
    let mut r = WireReader::new(s.try_clone().unwrap());
    let frame = StderrFrame::read(&mut r, V).unwrap();
    let StderrFrame::Error(e) = frame else {
        panic!("expected an error frame, got {frame:?}")
    };
    // Out of step: the daemon closes the connection.
    let mut rest = Vec::new();
    let n = std::io::Read::read_to_end(&mut s.try_clone().unwrap(), &mut rest).unwrap();
    assert_eq!(n, 0, "the daemon kept talking: {rest:?}");
    e.message
}

#[test]
fn absurd_lengths_and_unknown_ops_end_only_their_connection() {
    let t = setup();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("socket");
    let listener = nixb_daemon::listen::bind(&sock).unwrap();
    let stopper = Stopper::new(&sock);
    let d = Arc::clone(&t.daemon);
    let st = stopper.clone();
    let server = std::thread::spawn(move || d.listen(listener, &st));

    // A well-behaved client, connected before the attacks.
    let good = UnixStream::connect(&sock).unwrap();
    let mut good = connect(&good, &t.store_dir);

    // AddTextToStore (8) whose name claims 2^60 bytes.
    let msg = raw_attack(&sock, &t.store_dir, &[8, 1 << 60]);
    assert!(msg.contains("1152921504606846976"), "{msg}");
    // An operation number no Nix has.
    let msg = raw_attack(&sock, &t.store_dir, &[999]);
    assert!(msg.contains("999"), "{msg}");

    // The first client is still served: it adds a text and finds it valid.
    let added = good
        .request(
            &Request::AddTextToStore {
                name: "after-the-attacks".into(),
                text: b"still here".to_vec(),
                references: BTreeSet::new(),
            },
            None,
            &mut |_| {},
        )
        .unwrap();
    let Response::Path(p) = added else {
        panic!("{added:?}")
    };
    assert!(p.base_name().ends_with("-after-the-attacks"));
    assert!(good.is_valid_path(&p).unwrap());
    // An operation that is not supported yet is an error, and the connection goes on.
    let err = good
        .request(
            &Request::RegisterDrvOutput {
                id_or_json: "{}".into(),
                output_path: String::new(),
            },
            None,
            &mut |_| {},
        )
        .unwrap_err();
    assert!(err.to_string().contains("RegisterDrvOutput"), "{err}");
    assert!(good.is_valid_path(&p).unwrap());
    drop(good);

    stopper.stop();
    server.join().unwrap().unwrap();
    assert!(!sock.exists(), "the socket was not removed");
}

#[test]
fn an_untrusted_client_cannot_import_an_unsigned_nar() {
    let t = setup();
    let (ours, theirs) = UnixStream::pair().unwrap();
    let d = Arc::clone(&t.daemon);
    let server = std::thread::spawn(move || d.serve(theirs.try_clone().unwrap(), theirs, false));
    let mut c = connect(&ours, &t.store_dir);

    // The NAR of a regular file "hi": a complete, valid archive, so only trust refuses it.
    let mut nar = Vec::new();
    {
        let mut w = WireWriter::new(&mut nar);
        for s in [
            "nix-archive-1",
            "(",
            "type",
            "regular",
            "contents",
            "hi",
            ")",
        ] {
            w.write_str(s, "nar").unwrap();
        }
        w.flush().unwrap();
    }
    let path = t
        .store_dir
        .parse(&format!(
            "{}/{}-smuggled",
            t.store_dir.as_str(),
            "a".repeat(32)
        ))
        .unwrap();
    let info = ValidPathInfo {
        path: path.clone(),
        info: PathInfo {
            deriver: None,
            nar_hash: Hash::digest(HashAlgo::Sha256, &nar),
            references: BTreeSet::new(),
            registration_time: 0,
            nar_size: nar.len() as u64,
            ultimate: false,
            sigs: BTreeSet::new(),
            ca: None,
        },
    };
    let err = c
        .add_to_store_nar(&info, &mut &nar[..], false, true)
        .unwrap_err();
    // The client names the operation, then Nix's message.
    let expected = format!(
        "cannot add path '{}' because it lacks a signature by a trusted key",
        t.store_dir.print(&path)
    );
    assert!(err.to_string().ends_with(&expected), "{err}");
    // The framed data was drained: the connection is in step and the path is not there.
    assert!(!c.is_valid_path(&path).unwrap());
    assert!(!t.store_dir.to_path(&path).exists());
    drop(c);
    ours.shutdown(std::net::Shutdown::Both).unwrap();
    server.join().unwrap().unwrap();
}

#[test]
fn an_untrusted_clients_restricted_settings_are_ignored_with_a_warning() {
    let t = setup();
    let (ours, theirs) = UnixStream::pair().unwrap();
    let d = Arc::clone(&t.daemon);
    let server = std::thread::spawn(move || d.serve(theirs.try_clone().unwrap(), theirs, false));
    let mut c = connect(&ours, &t.store_dir);
    let mut settings = nixb_protocol::types::ClientSettings::default();
    settings.overrides.insert("sandbox".into(), "false".into());
    settings
        .overrides
        .insert("max-silent-time".into(), "10".into());
    let mut lines = Vec::new();
    c.request(&Request::SetOptions(settings), None, &mut |f| {
        if let StderrFrame::Next(l) = f {
            lines.push(String::from_utf8_lossy(l).into_owned());
        }
    })
    .unwrap();
    // Nix 2.8's words; max-silent-time is one an untrusted user may set.
    assert_eq!(
        lines,
        [
            "warning: ignoring the client-specified setting 'sandbox', because it is a \
          restricted setting and you are not a trusted user\n"
        ]
    );
    drop(c);
    let _ = (&ours).flush();
    ours.shutdown(std::net::Shutdown::Both).unwrap();
    server.join().unwrap().unwrap();
}
