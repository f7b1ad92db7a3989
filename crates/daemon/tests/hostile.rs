//! Hostile and untrusted clients against an in-process daemon on a unix socket: absurd
//! lengths and unknown operations get an error naming them and a hang-up, while another
//! connection keeps being served; an untrusted client cannot import an unsigned NAR; a
//! stop removes the socket; a client that stalls mid-frame or hangs up mid-operation
//! leaves no half-written path behind. The expected values are worked out by hand.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use nixb_protocol::types::{PathInfo, ValidPathInfo};
use nixb_protocol::wire::{WireReader, WireWriter};
use nixb_protocol::{Client, Request, Response, StderrFrame};
use nixb_store::{Hash, HashAlgo, StoreDir};

mod common;

use common::{connect, listing, TestDaemon, V};

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
    let t = TestDaemon::new();
    let listening = t.listen();
    let sock = listening.sock.clone();

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

    listening.stop();
    assert!(!sock.exists(), "the socket was not removed");
}

#[test]
fn an_untrusted_client_cannot_import_an_unsigned_nar() {
    let t = TestDaemon::new();
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
        "cannot add path '{}' because it lacks a valid signature",
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

/// The `NEXT` lines a client with `trusted` gets for `SetOptions(settings)`.
fn set_options_lines(trusted: bool, settings: nixb_protocol::types::ClientSettings) -> Vec<String> {
    let t = TestDaemon::new();
    let (ours, theirs) = UnixStream::pair().unwrap();
    let d = Arc::clone(&t.daemon);
    let server = std::thread::spawn(move || d.serve(theirs.try_clone().unwrap(), theirs, trusted));
    let mut c = connect(&ours, &t.store_dir);
    let mut lines = Vec::new();
    c.request(&Request::SetOptions(settings), None, &mut |f| {
        if let StderrFrame::Next(l) = f {
            lines.push(String::from_utf8_lossy(l).into_owned());
        }
    })
    .unwrap();
    drop(c);
    let _ = (&ours).flush();
    ours.shutdown(std::net::Shutdown::Both).unwrap();
    server.join().unwrap().unwrap();
    lines
}

#[test]
fn an_untrusted_clients_restricted_settings_are_ignored_with_a_warning() {
    let mut settings = nixb_protocol::types::ClientSettings::default();
    settings.overrides.insert("sandbox".into(), "false".into());
    settings
        .overrides
        .insert("max-silent-time".into(), "10".into());
    // Nix 2.8's words; max-silent-time is one an untrusted user may set.
    assert_eq!(
        set_options_lines(false, settings),
        [
            "warning: ignoring the client-specified setting 'sandbox', because it is a \
          restricted setting and you are not a trusted user\n"
        ]
    );
}

#[test]
fn a_client_asking_for_more_jobs_than_the_daemon_runs_is_told() {
    // The test daemon runs one build at a time (Nix's default max-jobs).
    let mut settings = nixb_protocol::types::ClientSettings {
        max_build_jobs: 1,
        ..Default::default()
    };
    assert_eq!(
        set_options_lines(true, settings.clone()),
        Vec::<String>::new()
    );
    settings.max_build_jobs = 4;
    let expected = "warning: the daemon runs at most 1 build at a time for all its clients \
                    ('max-jobs' in the daemon's nix.conf); the client's max-jobs 4 does not \
                    raise that\n";
    assert_eq!(set_options_lines(true, settings.clone()), [expected]);
    // The same through the settings overrides, which win over the field.
    settings.max_build_jobs = 1;
    settings.overrides.insert("max-jobs".into(), "4".into());
    assert_eq!(set_options_lines(true, settings), [expected]);
}

/// The NAR of a regular file holding `contents`.
fn file_nar(contents: &[u8]) -> Vec<u8> {
    let mut nar = Vec::new();
    {
        let mut w = WireWriter::new(&mut nar);
        for s in ["nix-archive-1", "(", "type", "regular", "contents"] {
            w.write_str(s, "nar").unwrap();
        }
        w.write_bytes(contents, "nar").unwrap();
        w.write_str(")", "nar").unwrap();
        w.flush().unwrap();
    }
    nar
}

fn nar_info(path: &nixb_store::StorePath, nar: &[u8]) -> ValidPathInfo {
    ValidPathInfo {
        path: path.clone(),
        info: PathInfo {
            deriver: None,
            nar_hash: Hash::digest(HashAlgo::Sha256, nar),
            references: BTreeSet::new(),
            registration_time: 0,
            nar_size: nar.len() as u64,
            ultimate: false,
            sigs: BTreeSet::new(),
            ca: None,
        },
    }
}

/// Polls (the daemon's thread gives no other sign) until `cond` holds.
fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn clients_that_stall_mid_frame_or_hang_up_mid_operation_leave_nothing_behind() {
    let t = TestDaemon::new();
    let listening = t.listen();
    let sock = listening.sock.clone();
    let store = t.daemon.store();
    let state = store.config().state_dir.clone();
    let path = |n: &str, c: char| {
        t.store_dir
            .parse(&format!(
                "{}/{}-{n}",
                t.store_dir.as_str(),
                c.to_string().repeat(32)
            ))
            .unwrap()
    };

    let good_sock = UnixStream::connect(&sock).unwrap();
    let mut good = connect(&good_sock, &t.store_dir);
    let mut served = 0;
    let mut serve = |good: &mut Client<UnixStream, UnixStream>| {
        served += 1;
        let r = good
            .request(
                &Request::AddTextToStore {
                    name: format!("served-{served}"),
                    text: b"served".to_vec(),
                    references: BTreeSet::new(),
                },
                None,
                &mut |_| {},
            )
            .unwrap();
        let Response::Path(p) = r else {
            panic!("{r:?}")
        };
        assert!(good.is_valid_path(&p).unwrap());
    };
    serve(&mut good);
    let state_before = listing(&state);

    // 1. AddToStoreNar whose one frame announces the whole NAR and carries half of it;
    // then silence, with the connection open.
    let contents = vec![b'x'; 100_000];
    let nar = file_nar(&contents);
    let stalled = path("stalled", 'c');
    let s = UnixStream::connect(&sock).unwrap();
    let c = connect(&s, &t.store_dir);
    {
        let mut w = WireWriter::new(s.try_clone().unwrap());
        Request::AddToStoreNar(nixb_protocol::ops::AddToStoreNarRequest {
            info: nar_info(&stalled, &nar),
            repair: false,
            dont_check_sigs: true,
        })
        .write(&mut w, c.ctx())
        .unwrap();
        w.write_u64(nar.len() as u64, "frame length").unwrap();
        w.get_mut().write_all(&nar[..nar.len() / 2]).unwrap();
        w.flush().unwrap();
    }
    let dest = t.store_dir.to_path(&stalled);
    // The daemon is writing the path, unregistered, while the others are served.
    wait_until("the stalled path is being restored", || dest.exists());
    assert!(!good.is_valid_path(&stalled).unwrap());
    serve(&mut good);
    // The client hangs up: the half-written path goes.
    drop(c);
    drop(s);
    wait_until("the stalled path is removed", || !dest.exists());
    assert!(!good.is_valid_path(&stalled).unwrap());
    assert_eq!(listing(&state), state_before, "state directory");
    // Its lock is free: another client adds the same path whole.
    good.add_to_store_nar(&nar_info(&stalled, &nar), &mut &nar[..], false, true)
        .unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), contents);

    // 2. AddMultipleToStore of two paths that breaks off inside the second's NAR.
    let first = path("first", 'f');
    let second = path("second", 'g');
    let nar1 = file_nar(b"first");
    let mut payload = Vec::new();
    {
        let mut w = WireWriter::new(&mut payload);
        nixb_protocol::ops::write_multiple_header(&mut w, 2).unwrap();
        nixb_protocol::ops::write_multiple_item(&mut w, good.ctx(), &nar_info(&first, &nar1))
            .unwrap();
        w.get_mut().write_all(&nar1).unwrap();
        nixb_protocol::ops::write_multiple_item(&mut w, good.ctx(), &nar_info(&second, &nar))
            .unwrap();
        w.get_mut().write_all(&nar[..nar.len() / 2]).unwrap();
        w.flush().unwrap();
    }
    let s = UnixStream::connect(&sock).unwrap();
    let c = connect(&s, &t.store_dir);
    {
        let mut w = WireWriter::new(s.try_clone().unwrap());
        Request::AddMultipleToStore {
            repair: false,
            dont_check_sigs: true,
        }
        .write(&mut w, c.ctx())
        .unwrap();
        w.write_u64(payload.len() as u64 + 4096, "frame length")
            .unwrap();
        w.get_mut().write_all(&payload).unwrap();
        w.flush().unwrap();
    }
    let dest2 = t.store_dir.to_path(&second);
    wait_until("the second path is being restored", || dest2.exists());
    serve(&mut good);
    drop(c);
    drop(s);
    wait_until("the second path is removed", || !dest2.exists());
    assert!(!good.is_valid_path(&second).unwrap());
    // The first path was complete before the break, and is valid and whole.
    assert!(good.is_valid_path(&first).unwrap());
    assert_eq!(
        std::fs::read(t.store_dir.to_path(&first)).unwrap(),
        b"first"
    );
    let report = store.verify(true).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(listing(&state), state_before, "state directory");
    serve(&mut good);

    drop(good);
    listening.stop();
}

/// SIGTERM's stop still ends the accept loop when someone deleted the socket file, so the
/// stop's own connection cannot reach it.
#[test]
fn the_accept_loop_stops_after_its_socket_file_was_deleted() {
    let d = TestDaemon::new();
    let listening = d.listen();
    std::fs::remove_file(&listening.sock).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        listening.stop();
        let _ = tx.send(());
    });
    rx.recv_timeout(std::time::Duration::from_secs(60))
        .expect("the accept loop did not stop after its socket file was deleted");
}
