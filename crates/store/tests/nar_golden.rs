//! Golden fixtures made by real Nix 2.8 (see `fixtures/*/generate.sh`).
//!
//! NAR: each fixture tree is rebuilt here exactly as generate.sh builds it; our dump must
//! equal `nix-store --dump`'s bytes, and restoring Nix's bytes then dumping again must give
//! them back. Hashes: every digest printed by `nix hash to-*` must be what crate::hash
//! prints, and must parse back to the same digest.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use nixb_store::nar::{dump_path, hash_path, restore_path};
use nixb_store::{Encoding, Hash, HashAlgo};

fn fixture_dir(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(kind)
}

fn pattern(n: usize) -> Vec<u8> {
    b"0123456789abcdef"
        .iter()
        .copied()
        .cycle()
        .take(n)
        .collect()
}

fn write_mode(p: &Path, contents: &[u8], mode: u32) {
    fs::write(p, contents).unwrap();
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

/// Builds fixture `name` at `p`, mirroring generate.sh.
fn build(name: &str, p: &Path) {
    match name {
        "empty-file" => write_mode(p, b"", 0o644),
        "empty-dir" => fs::create_dir(p).unwrap(),
        "executable" => write_mode(p, b"#!/bin/sh\necho hello\n", 0o755),
        "dangling-symlink" => symlink("does/not/exist", p).unwrap(),
        "long-symlink" => symlink("abcdefghij".repeat(100), p).unwrap(),
        "sizes" => {
            fs::create_dir(p).unwrap();
            for n in [0, 1, 7, 8, 9, 4095, 4096, 4097] {
                write_mode(&p.join(format!("size-{n}")), &pattern(n), 0o644);
            }
        }
        "nested" => {
            fs::create_dir_all(p.join("a/b/c/d")).unwrap();
            write_mode(&p.join("a/b/c/d/file"), b"deep\n", 0o644);
            write_mode(&p.join("a/x"), b"x\n", 0o644);
            write_mode(&p.join("a/b/run"), b"#!/bin/sh\n", 0o755);
            symlink("../x", p.join("a/b/up")).unwrap();
            fs::create_dir(p.join("a/empty")).unwrap();
            write_mode(&p.join("z"), b"top\n", 0o644);
        }
        "odd-names" => {
            fs::create_dir(p).unwrap();
            let names: [&[u8]; 11] = [
                b"with space",
                "ünïcödé".as_bytes(),
                b"tab\there",
                b"new\nline",
                b"\xff\xfe",
                b"-dash",
                b"UPPER",
                b"a",
                b"B",
                b".hidden",
                b"~tilde",
            ];
            for n in names {
                write_mode(&p.join(std::ffi::OsStr::from_bytes(n)), n, 0o644);
            }
        }
        "symlink-to-dir" => symlink("/tmp", p).unwrap(),
        "exec-bits" => {
            fs::create_dir(p).unwrap();
            for m in ["0700", "0644", "0744", "0611"] {
                let mode = u32::from_str_radix(m, 8).unwrap();
                write_mode(&p.join(format!("mode-{m}")), m.as_bytes(), mode);
            }
        }
        other => panic!("no builder for fixture {other}"),
    }
}

fn check_fixture(name: &str) {
    let golden = fs::read(fixture_dir("nar").join(format!("{name}.nar")))
        .unwrap_or_else(|e| panic!("fixture {name}.nar: {e} (run tests/fixtures/nar/generate.sh)"));
    let tmp = tempfile::tempdir().unwrap();

    let tree = tmp.path().join("tree");
    build(name, &tree);
    let mut ours = Vec::new();
    dump_path(&tree, &mut ours).unwrap();
    assert!(
        ours == golden,
        "{name}: dump differs from nix-store --dump ({} vs {} bytes)",
        ours.len(),
        golden.len()
    );

    // Size and hash from the streaming hasher agree with hashing Nix's bytes.
    let (h, size) = hash_path(&tree, HashAlgo::Sha256).unwrap();
    assert_eq!(size, golden.len() as u64, "{name}");
    assert_eq!(h, Hash::digest(HashAlgo::Sha256, &golden), "{name}");

    let restored = tmp.path().join("restored");
    restore_path(&mut golden.as_slice(), &restored).unwrap();
    let mut again = Vec::new();
    dump_path(&restored, &mut again).unwrap();
    assert!(
        again == golden,
        "{name}: restore + dump differs from the golden nar"
    );
}

macro_rules! golden {
    ($($test:ident => $name:literal),* $(,)?) => {
        $( #[test] fn $test() { check_fixture($name); } )*

        /// Every .nar in the fixture dir has a test above (no fixture silently unchecked).
        #[test]
        fn every_fixture_has_a_test() {
            let known = [$($name),*];
            for e in fs::read_dir(fixture_dir("nar")).unwrap() {
                let p = e.unwrap().path();
                if p.extension().is_some_and(|x| x == "nar") {
                    let stem = p.file_stem().unwrap().to_str().unwrap().to_string();
                    assert!(known.contains(&stem.as_str()), "fixture {stem}.nar has no test");
                }
            }
        }
    };
}

golden! {
    nar_empty_file => "empty-file",
    nar_empty_dir => "empty-dir",
    nar_executable => "executable",
    nar_dangling_symlink => "dangling-symlink",
    nar_long_symlink => "long-symlink",
    nar_sizes => "sizes",
    nar_nested => "nested",
    nar_odd_names => "odd-names",
    nar_symlink_to_dir => "symlink-to-dir",
    nar_exec_bits => "exec-bits",
}

fn hash_input(name: &str) -> Vec<u8> {
    match name {
        "empty" => vec![],
        "abc" => b"abc".to_vec(),
        "hello-nl" => b"hello world\n".to_vec(),
        "pattern-1000" => pattern(1000),
        "bytes-256" => (0..=255u8).collect(),
        other => panic!("unknown hash input {other}"),
    }
}

#[test]
fn hash_encodings_match_nix() {
    let text = fs::read_to_string(fixture_dir("hash").join("hashes.txt")).unwrap();
    let mut rows = 0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!(f.len(), 6, "bad fixture line {line}");
        let algo: HashAlgo = f[1].parse().unwrap();
        let h = Hash::digest(algo, hash_input(f[0]));
        assert_eq!(h.encode(Encoding::Base16), f[2], "{line}");
        assert_eq!(h.encode(Encoding::Base32), f[3], "{line}");
        assert_eq!(h.encode(Encoding::Base64), f[4], "{line}");
        assert_eq!(h.encode(Encoding::Sri), f[5], "{line}");
        for digits in &f[2..5] {
            assert_eq!(
                Hash::parse_typed(&format!("{algo}:{digits}")).unwrap(),
                h,
                "{line}"
            );
            assert_eq!(Hash::parse_with_algo(digits, algo).unwrap(), h, "{line}");
        }
        assert_eq!(Hash::parse_typed(f[5]).unwrap(), h, "{line}");
        rows += 1;
    }
    assert_eq!(rows, 20, "expected 5 inputs x 4 algorithms");
}
