//! Nothing unverified gets in: wrong hashes, wrong sizes, missing references, truncated
//! or malformed streams and a lying peer are refused with a message naming the path,
//! and leave neither a registration nor a file behind.

mod common;

use std::collections::BTreeSet;
use std::os::unix::net::UnixStream;

use common::*;
use nixb_serve::import::{add_nar_to_store, import_paths, EXPORT_MAGIC};
use nixb_serve::proto::{write_path_info, Command, SERVE_MAGIC_1, SERVE_MAGIC_2};
use nixb_serve::server::serve;
use nixb_serve::testing::UnsandboxedBuilder;
use nixb_serve::wire::{WireReader, WireWriter};
use nixb_serve::{ServeClient, ServeError};
use nixb_store::local_store::ValidPathInfo;
use nixb_store::{Hash, HashAlgo, StorePath};

/// A NAR of a small tree and the info that truly describes it at a made-up path.
fn sample(w: &World, name: &str) -> (ValidPathInfo, Vec<u8>) {
    let src = w.path(&format!("sample-{name}"));
    std::fs::create_dir_all(src.join("d")).unwrap();
    std::fs::write(src.join("d/f"), format!("contents of {name}\n")).unwrap();
    let nar = nar_of(&src);
    let hash = Hash::digest(HashAlgo::Sha256, &nar);
    let path = w
        .store_dir
        .make_fixed_output_path(true, &hash, name)
        .unwrap();
    (ValidPathInfo::new(path, hash, nar.len() as u64), nar)
}

fn assert_absent(w: &World, store: &nixb_store::local_store::LocalStore, p: &StorePath) {
    assert!(!store.is_valid_path(p).unwrap());
    assert!(
        std::fs::symlink_metadata(w.store_dir.to_path(p)).is_err(),
        "{p} left on disk"
    );
}

#[test]
fn a_correct_nar_is_added_once() {
    let w = World::new();
    let store = w.local("l");
    let (info, nar) = sample(&w, "good");
    assert!(add_nar_to_store(&store, &info, &mut &nar[..]).unwrap());
    assert!(
        !add_nar_to_store(&store, &info, &mut &nar[..]).unwrap(),
        "second add is a no-op"
    );
    assert_eq!(
        store.query_path_info(&info.path).unwrap().unwrap().nar_hash,
        info.nar_hash
    );
    assert_eq!(nar_of(&w.store_dir.to_path(&info.path)), nar);
}

#[test]
fn wrong_hash_is_refused_and_nothing_stays() {
    let w = World::new();
    let store = w.local("l");
    let (mut info, nar) = sample(&w, "lie");
    info.nar_hash = Hash::digest(HashAlgo::Sha256, b"something else");
    let e = add_nar_to_store(&store, &info, &mut &nar[..]).unwrap_err();
    assert!(matches!(e, ServeError::HashMismatch { .. }), "{e}");
    assert!(
        e.to_string().contains(&w.store_dir.print(&info.path)),
        "{e}"
    );
    assert_absent(&w, &store, &info.path);
}

#[test]
fn wrong_size_is_refused() {
    let w = World::new();
    let store = w.local("l");
    let (mut info, nar) = sample(&w, "size");
    info.nar_size += 8;
    let e = add_nar_to_store(&store, &info, &mut &nar[..]).unwrap_err();
    assert!(matches!(e, ServeError::SizeMismatch { .. }), "{e}");
    assert_absent(&w, &store, &info.path);
}

#[test]
fn a_missing_reference_is_refused_before_anything_is_written() {
    let w = World::new();
    let store = w.local("l");
    let (mut info, nar) = sample(&w, "orphan");
    let (other, _) = sample(&w, "never-added");
    info.references.insert(other.path.clone());
    let e = add_nar_to_store(&store, &info, &mut &nar[..]).unwrap_err();
    assert!(matches!(e, ServeError::MissingReference { .. }), "{e}");
    assert_absent(&w, &store, &info.path);
}

#[test]
fn a_truncated_nar_leaves_nothing() {
    let w = World::new();
    let store = w.local("l");
    let (info, nar) = sample(&w, "cut");
    let e = add_nar_to_store(&store, &info, &mut &nar[..nar.len() - 20]).unwrap_err();
    assert!(matches!(e, ServeError::Nar { .. }), "{e}");
    assert_absent(&w, &store, &info.path);
}

#[test]
fn export_stream_with_bad_magic_is_refused_at_its_offset() {
    let w = World::new();
    let store = w.local("l");
    let (info, nar) = sample(&w, "exp");
    let mut bytes = Vec::new();
    {
        let mut wr = WireWriter::new(&mut bytes);
        wr.write_u64(1, "").unwrap();
        wr.write_raw(&nar, "").unwrap();
        wr.write_u64(EXPORT_MAGIC + 1, "").unwrap();
        wr.flush().unwrap();
    }
    let e = import_paths(&store, &mut WireReader::new(&bytes[..])).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "export stream at byte {}: expected export magic 0x4558494e, got 0x4558494f",
            8 + nar.len()
        )
    );
    assert_absent(&w, &store, &info.path);
    // Not an export stream at all.
    let e = import_paths(&store, &mut WireReader::new(&7u64.to_le_bytes()[..])).unwrap_err();
    assert!(e.to_string().contains("expected 0 or 1"), "{e}");
}

/// A peer that announces a path with the true hash but then sends another NAR.
#[test]
fn a_lying_peer_is_caught_by_the_client() {
    let w = World::new();
    let store = w.local("l");
    let (info, _nar) = sample(&w, "claimed");
    let (_, other_nar) = sample(&w, "delivered");
    let (ours, theirs) = UnixStream::pair().unwrap();
    let dir = w.store_dir.clone();
    let claimed = info.clone();
    let peer = std::thread::spawn(move || {
        let mut r = WireReader::new(&theirs);
        let mut wr = WireWriter::new(&theirs);
        assert_eq!(r.read_u64("").unwrap(), SERVE_MAGIC_1);
        r.read_u64("").unwrap();
        wr.write_u64(SERVE_MAGIC_2, "").unwrap();
        wr.write_u64(0x207, "").unwrap();
        wr.flush().unwrap();
        assert_eq!(r.read_u64("").unwrap(), Command::QueryPathInfos as u64);
        r.read_strings("").unwrap();
        write_path_info(&mut wr, &dir, &claimed, 0x207).unwrap();
        wr.write_str("", "").unwrap();
        wr.flush().unwrap();
        assert_eq!(r.read_u64("").unwrap(), Command::DumpStorePath as u64);
        r.read_string("").unwrap();
        wr.write_raw(&other_nar, "").unwrap();
        wr.flush().unwrap();
    });
    let mut c = ServeClient::new(&ours, &ours, w.store_dir.clone(), "liar").unwrap();
    let e = c
        .copy_paths_from(&store, &BTreeSet::from([info.path.clone()]))
        .unwrap_err();
    let msg = e.to_string();
    assert!(msg.starts_with("liar: nar of '"), "{msg}");
    assert!(
        matches!(e, ServeError::Peer { ref source, .. } if matches!(**source, ServeError::SizeMismatch { .. } | ServeError::HashMismatch { .. })),
        "{msg}"
    );
    assert_absent(&w, &store, &info.path);
    peer.join().unwrap();
}

#[test]
fn server_without_write_refuses_imports_and_builds() {
    let w = World::new();
    let server_store = w.local("server");
    let client_store = w.local("client");
    let (a, _) = add_sources(&w, &client_store, "ro");
    let (ours, theirs) = UnixStream::pair().unwrap();
    let handle = std::thread::spawn(move || {
        let mut b = UnsandboxedBuilder {
            log: Box::new(std::io::sink()),
        };
        let res = serve(&theirs, &theirs, &server_store, &mut b, false);
        drop(theirs);
        res
    });
    let mut c = ServeClient::new(&ours, &ours, w.store_dir.clone(), "read-only").unwrap();
    // Queries work.
    assert!(c
        .query_valid_paths(&BTreeSet::from([a.clone()]), false, false)
        .unwrap()
        .is_empty());
    let info = client_store.query_path_info(&a).unwrap().unwrap();
    assert!(c.add_to_store_nar(&client_store, &info).is_err());
    drop(c);
    drop(ours);
    let e = handle.join().unwrap().unwrap_err();
    assert_eq!(
        e.to_string(),
        "importing paths is not allowed (the server was started without --write)"
    );
}

#[test]
fn unreachable_peer_is_named_with_what_it_said() {
    let w = World::new();
    let mut cmd = std::process::Command::new("sh");
    cmd.args([
        "-c",
        "echo 'ssh: connect to host nowhere port 22: Connection refused' >&2; exit 255",
    ]);
    let e = nixb_serve::transport::spawn_serving(
        cmd,
        "ssh://nowhere",
        w.store_dir.clone(),
        Box::new(std::io::sink()),
    )
    .err()
    .unwrap();
    let msg = e.to_string();
    assert!(msg.starts_with("ssh://nowhere: "), "{msg}");
    assert!(msg.contains("Connection refused"), "{msg}");
}
