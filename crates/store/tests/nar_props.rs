//! Property and attack tests for NAR dump/restore and the reference scanner.
//!
//! The expected NAR of a generated tree comes from a small serialiser written here from
//! the grammar alone (independent of crate::nar), so round trips are checked against an
//! outside model, not only against themselves.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use nixb_store::nar::{dump_path, restore_path, NarError, MAX_DEPTH};
use nixb_store::refscan::RefScanner;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Node {
    File { exec: bool, contents: Vec<u8> },
    Link(Vec<u8>),
    Dir(BTreeMap<Vec<u8>, Node>),
}

fn model_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
    while out.len() & 7 != 0 {
        out.push(0);
    }
}

fn model_node(out: &mut Vec<u8>, n: &Node) {
    model_str(out, b"(");
    model_str(out, b"type");
    match n {
        Node::File { exec, contents } => {
            model_str(out, b"regular");
            if *exec {
                model_str(out, b"executable");
                model_str(out, b"");
            }
            model_str(out, b"contents");
            model_str(out, contents);
        }
        Node::Link(t) => {
            model_str(out, b"symlink");
            model_str(out, b"target");
            model_str(out, t);
        }
        Node::Dir(entries) => {
            model_str(out, b"directory");
            // BTreeMap<Vec<u8>> iterates in byte order, NAR's order.
            for (name, child) in entries {
                for t in [&b"entry"[..], b"(", b"name"] {
                    model_str(out, t);
                }
                model_str(out, name);
                model_str(out, b"node");
                model_node(out, child);
                model_str(out, b")");
            }
        }
    }
    model_str(out, b")");
}

fn model_nar(n: &Node) -> Vec<u8> {
    let mut out = Vec::new();
    model_str(&mut out, b"nix-archive-1");
    model_node(&mut out, n);
    out
}

fn materialise(n: &Node, p: &Path) {
    match n {
        Node::File { exec, contents } => {
            fs::write(p, contents).unwrap();
            fs::set_permissions(
                p,
                fs::Permissions::from_mode(if *exec { 0o755 } else { 0o644 }),
            )
            .unwrap();
        }
        Node::Link(t) => symlink(std::ffi::OsStr::from_bytes(t), p).unwrap(),
        Node::Dir(entries) => {
            fs::create_dir(p).unwrap();
            for (name, child) in entries {
                materialise(child, &p.join(std::ffi::OsStr::from_bytes(name)));
            }
        }
    }
}

fn name_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[a-zA-Z0-9._ -]{1,10}".prop_map(|s| s.into_bytes()),
        // arbitrary bytes except '/' and NUL
        proptest::collection::vec(1u8..=255, 1..8)
            .prop_map(|v| v.into_iter().filter(|&b| b != b'/').collect()),
    ]
    .prop_filter("valid entry name", |n: &Vec<u8>| {
        !n.is_empty() && n != b"." && n != b".."
    })
}

fn tree_strategy() -> impl Strategy<Value = Node> {
    let leaf = prop_oneof![
        (
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..600)
        )
            .prop_map(|(exec, contents)| Node::File { exec, contents }),
        proptest::collection::vec(1u8..=255, 1..60).prop_map(Node::Link),
    ];
    leaf.prop_recursive(4, 40, 6, |inner| {
        proptest::collection::btree_map(name_strategy(), inner, 0..6).prop_map(Node::Dir)
    })
}

/// Restores `nar` into `<work>/dest` with a sentinel beside it and checks that nothing
/// appeared outside `dest`; on success the archive must re-dump to the same bytes
/// (restore accepts only canonical NARs).
fn restore_contained(nar: &[u8]) -> Result<(), NarError> {
    let work = tempfile::tempdir().unwrap();
    fs::write(work.path().join("sentinel"), b"s").unwrap();
    let dest = work.path().join("dest");
    let res = restore_path(&mut &nar[..], &dest);
    let mut names: Vec<Vec<u8>> = fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().as_bytes().to_vec())
        .collect();
    names.sort();
    match &res {
        Ok(()) => {
            assert_eq!(names, [b"dest".to_vec(), b"sentinel".to_vec()]);
            let mut again = Vec::new();
            dump_path(&dest, &mut again).unwrap();
            assert!(
                again == nar,
                "accepted a nar that does not re-dump to itself"
            );
        }
        // A failed restore removes what it made.
        Err(_) => assert_eq!(names, [b"sentinel".to_vec()]),
    }
    assert_eq!(fs::read(work.path().join("sentinel")).unwrap(), b"s");
    res
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn dump_matches_model_and_round_trips(tree in tree_strategy()) {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        materialise(&tree, &src);
        let want = model_nar(&tree);
        let mut got = Vec::new();
        dump_path(&src, &mut got).unwrap();
        prop_assert!(got == want, "dump differs from the model");
        restore_contained(&got).unwrap();
    }

    #[test]
    fn mutated_nars_stay_inside_dest(
        tree in tree_strategy(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..4),
    ) {
        let mut nar = model_nar(&tree);
        for (at, byte, kind) in edits {
            let i = at.index(nar.len() + 1);
            match kind {
                0 if i < nar.len() => nar[i] = byte,
                1 => nar.truncate(i),
                2 => nar.insert(i, byte),
                _ => if i < nar.len() { nar.remove(i); },
            }
        }
        let _ = restore_contained(&nar);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn refscanner_equals_naive_search(
        candidates in proptest::collection::vec("[0-9a-df-np-sv-z]{32}", 1..8),
        pieces in proptest::collection::vec(
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..40),
                // alphabet-only filler makes long runs of possible windows
                "[0-9a-df-np-sv-z]{0,40}".prop_map(|s| s.into_bytes()),
                (0usize..8).prop_map(|i| vec![i as u8 + 0x80]),
            ],
            0..30,
        ),
    ) {
        // Splice whole candidates (marker bytes 0x80+i) and truncated ones into the data.
        let mut data = Vec::new();
        for p in &pieces {
            if p.len() == 1 && p[0] >= 0x80 {
                let c = candidates[(p[0] - 0x80) as usize % candidates.len()].as_bytes();
                let cut = if p[0] % 2 == 0 { c.len() } else { c.len() - 1 };
                data.extend_from_slice(&c[..cut]);
            } else {
                data.extend_from_slice(p);
            }
        }
        let naive: BTreeSet<String> = candidates
            .iter()
            .filter(|c| data.windows(32).any(|w| w == c.as_bytes()))
            .cloned()
            .collect();
        for chunk in [1usize, 7, 4096] {
            let mut s = RefScanner::new(candidates.iter().map(|c| c.as_str()));
            for piece in data.chunks(chunk) {
                s.feed(piece);
            }
            prop_assert_eq!(&s.found(), &naive, "chunk size {}", chunk);
        }
    }
}

// ---- crafted hostile archives --------------------------------------------------------

struct Nar(Vec<u8>);

impl Nar {
    fn new() -> Nar {
        let mut n = Nar(Vec::new());
        n.s(b"nix-archive-1");
        n
    }
    fn s(&mut self, x: &[u8]) -> &mut Nar {
        model_str(&mut self.0, x);
        self
    }
    fn tags(&mut self, ts: &[&str]) -> &mut Nar {
        for t in ts {
            self.s(t.as_bytes());
        }
        self
    }
    fn entry_file(&mut self, name: &[u8], contents: &[u8]) -> &mut Nar {
        self.tags(&["entry", "(", "name"])
            .s(name)
            .tags(&["node", "(", "type", "regular", "contents"]);
        self.s(contents).tags(&[")", ")"])
    }
    fn entry_link(&mut self, name: &[u8], target: &[u8]) -> &mut Nar {
        self.tags(&["entry", "(", "name"])
            .s(name)
            .tags(&["node", "(", "type", "symlink", "target"]);
        self.s(target).tags(&[")", ")"])
    }
    fn dir(&mut self) -> &mut Nar {
        self.tags(&["(", "type", "directory"])
    }
}

fn refused(nar: &[u8], needle: &str) {
    let err = restore_contained(nar).expect_err("hostile archive was accepted");
    let msg = err.to_string();
    assert!(
        msg.contains(needle),
        "error '{msg}' does not mention '{needle}'"
    );
}

#[test]
fn refuses_bad_entry_names() {
    for (name, why) in [
        (&b".."[..], "not allowed"),
        (b".", "not allowed"),
        (b"", "empty entry name"),
        (b"a/b", "contains '/'"),
        (b"../../escape", "contains '/'"),
        (b"nul\0byte", "NUL"),
    ] {
        let mut n = Nar::new();
        n.dir().entry_file(name, b"x").tags(&[")"]);
        refused(&n.0, why);
    }
}

#[test]
fn refuses_duplicate_and_unsorted_entries() {
    // A symlink named "l" pointing outside, then a directory "l": must never write through it.
    let outside = tempfile::tempdir().unwrap();
    let mut n = Nar::new();
    n.dir()
        .entry_link(b"l", outside.path().as_os_str().as_bytes());
    n.tags(&["entry", "(", "name", "l", "node"])
        .dir()
        .entry_file(b"pwned", b"x")
        .tags(&[")", ")", ")"]);
    refused(&n.0, "duplicate entry name 'l'");
    assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);

    let mut n = Nar::new();
    n.dir()
        .entry_file(b"b", b"1")
        .entry_file(b"a", b"2")
        .tags(&[")"]);
    refused(&n.0, "unsorted entry name 'a'");
}

#[test]
fn refuses_truncation_at_every_byte() {
    let mut n = Nar::new();
    n.dir()
        .entry_file(b"f", b"hello world")
        .entry_link(b"l", b"f")
        .tags(&[")"]);
    restore_contained(&n.0).unwrap();
    for cut in 0..n.0.len() {
        let err = restore_contained(&n.0[..cut]).expect_err("truncated nar accepted");
        assert!(
            matches!(err, NarError::Truncated { .. }),
            "cut {cut}: {err}"
        );
    }
}

#[test]
fn refuses_absurd_lengths_without_allocating() {
    // File contents claiming 2^63 bytes: streamed, so this fails on EOF, not on allocation.
    let mut n = Nar::new();
    n.tags(&["(", "type", "regular", "contents"]);
    n.0.extend_from_slice(&(1u64 << 63).to_le_bytes());
    n.0.extend_from_slice(b"tiny");
    refused(&n.0, "ends early");
    // An entry name of 2^60 bytes is refused before it is read.
    let mut n = Nar::new();
    n.dir().tags(&["entry", "(", "name"]);
    n.0.extend_from_slice(&(1u64 << 60).to_le_bytes());
    refused(&n.0, "more than the 255 allowed");
    // A symlink target longer than PATH_MAX.
    let mut n = Nar::new();
    n.tags(&["(", "type", "symlink", "target"])
        .s(&[b'a'; 5000])
        .tags(&[")"]);
    refused(&n.0, "symlink target is 5000 bytes long");
}

#[test]
fn refuses_unknown_tags_bad_padding_and_trailing_data() {
    let mut n = Nar::new();
    n.tags(&["(", "type", "fifo", ")"]);
    refused(&n.0, "unknown file type 'fifo'");

    let mut n = Nar::new();
    n.dir().tags(&["entri"]);
    refused(&n.0, "expected 'entry' or ')'");

    let mut bad_magic = Nar(Vec::new());
    bad_magic.tags(&["nix-archive-2", "(", "type", "regular", "contents", "", ")"]);
    refused(&bad_magic.0, "not a nar");

    let mut n = Nar::new();
    n.tags(&["(", "type", "regular", "contents"])
        .s(b"abc")
        .tags(&[")"]);
    restore_contained(&n.0).unwrap();
    let pad_at = n.0.len() - 16 - 5 + 3; // first padding byte after "abc"
    let mut bad = n.0.clone();
    bad[pad_at] = 1;
    refused(&bad, "non-zero padding");
    let mut trailing = n.0.clone();
    trailing.push(0);
    refused(&trailing, "trailing data");

    let mut n = Nar::new();
    n.tags(&[
        "(",
        "type",
        "regular",
        "executable",
        "x",
        "contents",
        "",
        ")",
    ]);
    refused(&n.0, "executable marker");
}

#[test]
fn refuses_excessive_depth() {
    let mut n = Nar::new();
    n.dir();
    for _ in 0..=MAX_DEPTH {
        n.tags(&["entry", "(", "name", "d", "node"]).dir();
    }
    refused(&n.0, "nested more than");
}

#[test]
fn dest_that_is_a_symlink_is_not_followed() {
    let work = tempfile::tempdir().unwrap();
    let outside = work.path().join("outside");
    let dest = work.path().join("dest");
    symlink(&outside, &dest).unwrap();
    let mut n = Nar::new();
    n.tags(&["(", "type", "regular", "contents"])
        .s(b"x")
        .tags(&[")"]);
    let err = restore_path(&mut n.0.as_slice(), &dest).unwrap_err();
    assert!(matches!(err, NarError::DestExists(_)), "{err}");
    assert!(!outside.exists());
    assert!(
        fs::symlink_metadata(&dest)
            .unwrap()
            .file_type()
            .is_symlink(),
        "dest symlink was removed"
    );
}

#[test]
fn restored_modes_follow_nix() {
    let work = tempfile::tempdir().unwrap();
    let mut n = Nar::new();
    n.dir();
    n.tags(&[
        "entry",
        "(",
        "name",
        "x",
        "node",
        "(",
        "type",
        "regular",
        "executable",
        "",
        "contents",
    ]);
    n.s(b"#!").tags(&[")", ")"]);
    n.entry_file(b"y", b"data").tags(&[")"]);
    let dest = work.path().join("d");
    restore_path(&mut n.0.as_slice(), &dest).unwrap();
    // SAFETY: umask only reads and sets the process mask; restored right away.
    let umask = unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        m
    };
    let mode = |p: &str| fs::metadata(dest.join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("x"), (0o666 & !umask) | 0o111);
    assert_eq!(mode("y"), 0o666 & !umask);
    assert_eq!(
        fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
        0o777 & !umask
    );
}
