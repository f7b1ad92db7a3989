//! Metadata canonicalisation and store optimisation on real files in a temp dir.
//!
//! Expected modes and times are the fixed values Nix documents (0444/0555 by the owner
//! execute bit, mtime 1); ownership tests chown to a fake build user and so need root.

use std::fs;
use std::os::unix::fs::{chown, symlink, MetadataExt, PermissionsExt};
use std::path::Path;

use nixb_store::canon::{
    canonicalise_build_output, canonicalise_path_metadata, check_suspicious, CanonError, InodesSeen,
};
use nixb_store::nar::hash_path;
use nixb_store::optimise::{load_links_inodes, optimise_path, OptimiseStats};
use nixb_store::{Encoding, HashAlgo};

const BUILD_UID: u32 = 30001;

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

fn mtime(p: &Path) -> i64 {
    fs::symlink_metadata(p).unwrap().mtime()
}

fn write_mode(p: &Path, data: &[u8], m: u32) {
    fs::write(p, data).unwrap();
    fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
}

#[test]
fn modes_and_times_become_canonical() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();
    let cases = [
        ("plain", 0o644, 0o444),
        ("exec", 0o755, 0o555),
        ("owner-x-only", 0o700, 0o555),
        ("others-x-only", 0o601, 0o444), // Nix looks at S_IXUSR alone
        ("setuid", 0o4755, 0o555),
        ("setgid", 0o2711, 0o555),
        ("sticky", 0o1644, 0o444),
        ("world-writable", 0o666, 0o444),
        ("already", 0o444, 0o444),
    ];
    for (name, m, _) in cases {
        write_mode(&out.join(name), name.as_bytes(), m);
    }
    fs::create_dir(out.join("sub")).unwrap();
    fs::set_permissions(out.join("sub"), fs::Permissions::from_mode(0o1777)).unwrap();
    symlink("plain", out.join("link")).unwrap();
    let link_mode_before = mode(&out.join("link"));

    let mut seen = InodesSeen::new();
    canonicalise_path_metadata(&out, None, &mut seen).unwrap();

    for (name, _, want) in cases {
        assert_eq!(mode(&out.join(name)), want, "{name}");
        assert_eq!(mtime(&out.join(name)), 1, "{name}");
    }
    assert_eq!(mode(&out), 0o555);
    assert_eq!(mode(&out.join("sub")), 0o555);
    assert_eq!(
        mode(&out.join("link")),
        link_mode_before,
        "symlink modes are left alone"
    );
    assert_eq!(
        mtime(&out.join("link")),
        1,
        "symlinks get mtime 1 too (lutimes)"
    );
    assert_eq!(mtime(&out), 1);
    assert_eq!(mtime(&out.join("sub")), 1);
    // out, sub, link and the nine files
    assert_eq!(seen.len(), 12);
    // The link's target was not touched through the link: it is canonical on its own.
    assert_eq!(fs::read_link(out.join("link")).unwrap(), Path::new("plain"));
}

#[test]
fn unsupported_file_types_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();
    let fifo = std::ffi::CString::new(out.join("fifo").to_str().unwrap()).unwrap();
    // SAFETY: valid C string.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let err = canonicalise_path_metadata(&out, None, &mut InodesSeen::new()).unwrap_err();
    assert!(
        matches!(err, CanonError::UnsupportedType(ref p) if p.ends_with("fifo")),
        "{err}"
    );
}

#[test]
fn ownership_is_checked_and_changed() {
    nixb_testsupport::require!(Root);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();
    write_mode(&out.join("f"), b"f", 0o644);
    for p in [&out, &out.join("f")] {
        chown(p, Some(BUILD_UID), Some(BUILD_UID)).unwrap();
    }
    canonicalise_path_metadata(&out, Some(BUILD_UID), &mut InodesSeen::new()).unwrap();
    assert_eq!(fs::metadata(out.join("f")).unwrap().uid(), 0);
    assert_eq!(fs::metadata(&out).unwrap().uid(), 0);

    // A file the builder hard-linked from outside (owned by someone else) is refused and
    // left as it was.
    let out2 = tmp.path().join("out2");
    fs::create_dir(&out2).unwrap();
    chown(&out2, Some(BUILD_UID), Some(BUILD_UID)).unwrap();
    let secret = tmp.path().join("secret");
    write_mode(&secret, b"s", 0o600);
    fs::hard_link(&secret, out2.join("stolen")).unwrap();
    let err =
        canonicalise_path_metadata(&out2, Some(BUILD_UID), &mut InodesSeen::new()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("wrong ownership of '") && msg.contains("stolen"),
        "{msg}"
    );
    assert_eq!(mode(&secret), 0o600, "the foreign file was modified");
}

#[test]
fn a_block_of_uids_may_own_the_files_of_a_uid_range_build() {
    nixb_testsupport::require!(Root);
    let first = 872_415_232;
    let block = first..=first + 65535;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();
    chown(&out, Some(first), Some(first)).unwrap();
    for (name, id) in [("a", first + 1), ("b", first + 65535)] {
        write_mode(&out.join(name), b"x", 0o644);
        chown(out.join(name), Some(id), Some(id)).unwrap();
    }
    canonicalise_build_output(&out, Some(block.clone()), &mut InodesSeen::new()).unwrap();
    for p in [out.clone(), out.join("a"), out.join("b")] {
        let st = fs::symlink_metadata(&p).unwrap();
        assert_eq!((st.uid(), st.gid()), (0, 0), "{}", p.display());
    }
    // One id past the block is someone else's.
    let out2 = tmp.path().join("out2");
    fs::create_dir(&out2).unwrap();
    chown(&out2, Some(first), Some(first)).unwrap();
    write_mode(&out2.join("c"), b"x", 0o644);
    chown(out2.join("c"), Some(first + 65536), None).unwrap();
    let err = canonicalise_build_output(&out2, Some(block), &mut InodesSeen::new()).unwrap_err();
    assert!(
        matches!(err, CanonError::WrongOwnershipRange { found, .. } if found == first + 65536),
        "{err}"
    );
    assert_eq!(
        mode(&out2.join("c")),
        0o644,
        "the foreign file was modified"
    );
}

#[test]
fn hard_links_across_outputs_are_canonicalised_once() {
    nixb_testsupport::require!(Root);
    let tmp = tempfile::tempdir().unwrap();
    let (out, dev) = (tmp.path().join("out"), tmp.path().join("dev"));
    for d in [&out, &dev] {
        fs::create_dir(d).unwrap();
        chown(d, Some(BUILD_UID), Some(BUILD_UID)).unwrap();
    }
    write_mode(&out.join("lib"), b"shared", 0o755);
    chown(out.join("lib"), Some(BUILD_UID), Some(BUILD_UID)).unwrap();
    fs::hard_link(out.join("lib"), out.join("lib2")).unwrap();
    fs::hard_link(out.join("lib"), dev.join("lib")).unwrap();

    // One set shared by both outputs, as the engine does for one build.
    let mut seen = InodesSeen::new();
    canonicalise_path_metadata(&out, Some(BUILD_UID), &mut seen).unwrap();
    // After the first output the shared inode belongs to root; the second output's link
    // must still pass the build-user ownership check.
    canonicalise_path_metadata(&dev, Some(BUILD_UID), &mut seen).unwrap();
    assert_eq!(seen.len(), 3, "out, dev and the one shared inode");
    assert_eq!(mode(&dev.join("lib")), 0o555);
    assert_eq!(fs::metadata(dev.join("lib")).unwrap().nlink(), 3);

    // Without the shared set, the second output's link looks foreign.
    let dev2 = tmp.path().join("dev2");
    fs::create_dir(&dev2).unwrap();
    chown(&dev2, Some(BUILD_UID), Some(BUILD_UID)).unwrap();
    fs::hard_link(out.join("lib"), dev2.join("lib")).unwrap();
    assert!(matches!(
        canonicalise_path_metadata(&dev2, Some(BUILD_UID), &mut InodesSeen::new()),
        Err(CanonError::WrongOwnership { .. })
    ));
}

#[test]
fn suspicious_outputs_are_refused_before_canonicalisation() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();
    fs::set_permissions(&out, fs::Permissions::from_mode(0o775)).unwrap();
    let err = check_suspicious(&out, None).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("suspicious ownership or permission on '"),
        "{err}"
    );
    fs::set_permissions(&out, fs::Permissions::from_mode(0o757)).unwrap();
    assert!(check_suspicious(&out, None).is_err());
    fs::set_permissions(&out, fs::Permissions::from_mode(0o755)).unwrap();
    check_suspicious(&out, None).unwrap();
    // Wrong owner: the test process's uid is never this fake build user.
    assert!(check_suspicious(&out, Some(BUILD_UID)).is_err());
    // A symlink's mode bits mean nothing.
    symlink("x", tmp.path().join("l")).unwrap();
    check_suspicious(&tmp.path().join("l"), None).unwrap();
}

#[test]
fn optimise_links_identical_files() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    fs::create_dir(&store).unwrap();
    let a = store.join("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a");
    let b = store.join("bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-b");
    for p in [&a, &b] {
        fs::create_dir(p).unwrap();
        write_mode(&p.join("same"), &[7u8; 10000], 0o444);
        write_mode(&p.join("same-but-exec"), &[7u8; 10000], 0o555);
        write_mode(&p.join("writable"), &[7u8; 10000], 0o644);
    }
    write_mode(&a.join("unique"), b"only in a", 0o444);
    for p in [&a, &b] {
        fs::set_permissions(p, fs::Permissions::from_mode(0o555)).unwrap();
    }

    let mut seen = load_links_inodes(&store).unwrap();
    assert!(seen.is_empty());
    let first = optimise_path(&store, &a, &mut seen).unwrap();
    assert_eq!(first, OptimiseStats::default(), "nothing to share yet");
    let second = optimise_path(&store, &b, &mut seen).unwrap();
    assert_eq!(second.files_linked, 2, "same and same-but-exec");
    assert_eq!(second.bytes_freed, 20000);

    let ino = |p: &Path| fs::metadata(p).unwrap().ino();
    assert_eq!(ino(&a.join("same")), ino(&b.join("same")));
    assert_eq!(ino(&a.join("same-but-exec")), ino(&b.join("same-but-exec")));
    assert_ne!(
        ino(&a.join("same")),
        ino(&a.join("same-but-exec")),
        "the executable bit keeps them apart"
    );
    assert_ne!(
        ino(&a.join("writable")),
        ino(&b.join("writable")),
        "writable files are left alone"
    );
    // The directories got their read-only mode back.
    assert_eq!(mode(&b), 0o555);

    // .links entries are named by the base32 NAR sha256 of the file, as in Nix.
    let (h, _) = hash_path(&a.join("unique"), HashAlgo::Sha256).unwrap();
    let link = store.join(".links").join(h.encode(Encoding::Base32));
    assert_eq!(ino(&link), ino(&a.join("unique")));
    assert_eq!(fs::read_dir(store.join(".links")).unwrap().count(), 3);
    assert!(fs::read_dir(&store).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with(".tmp-link")));

    // A second run finds nothing more to do, also starting from a fresh inode set.
    let mut seen = load_links_inodes(&store).unwrap();
    assert_eq!(
        optimise_path(&store, &b, &mut seen).unwrap(),
        OptimiseStats::default()
    );
}

#[test]
fn optimise_replaces_a_corrupt_link() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    fs::create_dir_all(store.join(".links")).unwrap();
    let p = store.join("cccccccccccccccccccccccccccccccc-c");
    write_mode(&p, b"the real contents", 0o444);
    let (h, _) = hash_path(&p, HashAlgo::Sha256).unwrap();
    let link = store.join(".links").join(h.encode(Encoding::Base32));
    fs::write(&link, b"short").unwrap();
    optimise_path(&store, &p, &mut InodesSeen::new()).unwrap();
    assert_eq!(fs::read(&link).unwrap(), b"the real contents");
    assert_eq!(
        fs::metadata(&link).unwrap().ino(),
        fs::metadata(&p).unwrap().ino()
    );
}
