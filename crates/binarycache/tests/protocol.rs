//! The Nix 1.x substituter protocol over a cache nixb wrote from its own store. Expected
//! answers follow from the protocol's grammar and from sizes computed independently here
//! (the NAR of a one-file text path is 8-byte-aligned framing around the contents).

use std::collections::BTreeSet;
use std::io::Cursor;

use nixb_binarycache::protocol::{run_query, run_substitute};
use nixb_binarycache::{
    copy_to_file_cache, BinaryCache, CacheOptions, Compression, SecretKey, TrustedKeys,
    WriteOptions,
};
use nixb_store::local_store::{LocalStore, StoreConfig};
use nixb_store::StoreDir;

fn store(root: &std::path::Path) -> LocalStore {
    LocalStore::open(StoreConfig {
        store_dir: StoreDir::new(format!("{}/store", root.display())).unwrap(),
        state_dir: root.join("state"),
        log_dir: root.join("log"),
    })
    .unwrap()
}

/// NAR size of a regular non-executable file with `n` bytes of contents.
fn nar_size_of_file(n: u64) -> u64 {
    let s = |len: u64| 8 + len.div_ceil(8) * 8;
    // "nix-archive-1" "(" "type" "regular" "contents" <contents> ")"
    s(13) + s(1) + s(4) + s(7) + s(8) + s(n) + s(1)
}

#[test]
fn query_and_substitute() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let st = store(root);
    let dep = st
        .add_text_to_store("dep", b"hello\n", &BTreeSet::new())
        .unwrap();
    let refs: BTreeSet<_> = [dep.clone()].into_iter().collect();
    let contents = format!("uses {}/store/{}\n", root.display(), dep);
    let top = st
        .add_text_to_store("top", contents.as_bytes(), &refs)
        .unwrap();
    let key = SecretKey::from_seed("proto-1", &[3; 32]);
    let cache_dir = root.join("cache");
    let opts = WriteOptions {
        compression: Compression::Xz,
        secret_keys: vec![key.clone()],
        jobs: 2,
    };
    copy_to_file_cache(&st, &cache_dir, &[top.clone()].into_iter().collect(), &opts).unwrap();
    drop(st);
    std::fs::remove_dir_all(root.join("state")).unwrap();
    let _ = std::process::Command::new("chmod")
        .args(["-R", "u+w"])
        .arg(root.join("store"))
        .status();
    std::fs::remove_dir_all(root.join("store")).unwrap();

    let sd = StoreDir::new(format!("{}/store", root.display())).unwrap();
    let mut trusted = TrustedKeys::new();
    trusted.add(key.to_public());
    let cache = BinaryCache::open(
        &format!("file://{}", cache_dir.display()),
        &sd,
        CacheOptions {
            trusted_keys: trusted,
            ..CacheOptions::default()
        },
    )
    .unwrap();
    let caches = [cache];
    let (ptop, pdep) = (sd.print(&top), sd.print(&dep));
    let missing = format!(
        "{}/store/00000000000000000000000000000000-nope",
        root.display()
    );

    let input = format!("have {ptop} {missing} {pdep}\ninfo {ptop} {missing}\ninfo\n");
    let mut out = Vec::new();
    run_query(&caches, &mut Cursor::new(input), &mut out).unwrap();
    let out = String::from_utf8(out).unwrap();
    let file_size = std::fs::read_to_string(cache_dir.join(format!("{}.narinfo", top.hash_part())))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("FileSize: ").map(String::from))
        .unwrap();
    let expected = format!(
        "\n{ptop}\n{pdep}\n\n{ptop}\n\n1\n{pdep}\n{file_size}\n{}\n\n\n",
        nar_size_of_file(contents.len() as u64)
    );
    assert_eq!(out, expected);

    let err = run_query(&caches, &mut Cursor::new("frobnicate\n"), &mut Vec::new()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "substituter protocol: unknown command 'frobnicate' (expected 'have' or 'info')"
    );

    // --substitute into a scratch destination, as the engine asks (e.g. `<path>.tmp` in repair mode).
    let dest = root.join("dest");
    let (mut out, mut log) = (Vec::new(), Vec::new());
    run_substitute(&caches, &pdep, &dest, &mut out, &mut log).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), b"hello\n");
    let out = String::from_utf8(out).unwrap();
    let (first, hash) = out.split_once('\n').unwrap();
    assert_eq!(first, "");
    // Independently: the NAR hash of that file, as the engine computes it.
    let (h, _) = nixb_store::nar::hash_path(&dest, nixb_store::HashAlgo::Sha256).unwrap();
    assert_eq!(hash, format!("{}\n", h.to_base32_typed()));
    assert!(String::from_utf8(log)
        .unwrap()
        .contains(&format!("fetching path '{pdep}'")));

    let err = run_substitute(
        &caches,
        &missing,
        &root.join("d2"),
        &mut Vec::new(),
        &mut Vec::new(),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("no cache has '{missing}'")),
        "{err}"
    );
    assert!(!root.join("d2").exists());
}
