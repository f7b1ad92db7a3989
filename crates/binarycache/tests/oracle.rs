//! Live oracle tests: caches written by real `nix copy` (Nix 2.8) substituted by nixb, and
//! caches written by nixb substituted by real Nix.

mod common;

use common::Oracle;
use nixb_binarycache::{
    copy_to_file_cache, substitute, substitute_closure, BinaryCache, CacheOptions, Compression,
    SecretKey, SubstituteError, TrustedKeys, WriteOptions,
};

#[test]
fn substitutes_nix_made_caches_in_every_compression() {
    nixb_testsupport::require!(Nix);
    let o = Oracle::build();
    for c in ["xz", "bzip2", "zstd", "none"] {
        o.copy_to(&o.root.join(format!("cache-{c}")), c);
    }
    for c in ["xz", "bzip2", "zstd", "none"] {
        o.wipe_store();
        let store = o.open_store();
        let cache = o.open_cache(
            &format!("file://{}/cache-{c}", o.root.display()),
            o.options(),
        );
        let report = substitute_closure(&store, std::slice::from_ref(&cache), &o.top_set(), 4)
            .unwrap_or_else(|e| panic!("{c}: {e}"));
        assert_eq!(report.substituted.len(), 6, "{c}: all six paths fetched");
        // References were registered before their referrers.
        let pos = |p: &str| {
            report
                .substituted
                .iter()
                .position(|x| x.name() == p)
                .unwrap()
        };
        assert!(
            pos("a") < pos("b") && pos("b") < pos("d") && pos("d") < pos("top"),
            "{c}: order"
        );
        drop(store);
        o.assert_closure_matches();
        // Lock files, kept until the closure was done, are gone.
        let locks: Vec<String> = o
            .store_entries()
            .into_iter()
            .filter(|e| e.ends_with(".lock"))
            .collect();
        assert!(locks.is_empty(), "{c}: {locks:?}");
        // Again: nothing left to do (a valid top path implies a valid closure).
        let store = o.open_store();
        let again =
            substitute_closure(&store, std::slice::from_ref(&cache), &o.top_set(), 4).unwrap();
        assert!(
            again.substituted.is_empty() && again.already_valid == 1,
            "{c}: {again:?}"
        );
    }
}

/// Runs one refused substitution of the top path (its references made valid first) and
/// checks that the error says `expect`, that nothing was registered and that nothing of
/// the path is left in the store directory.
fn assert_refused(o: &Oracle, cache_dir: &std::path::Path, opts: CacheOptions, expect: &str) {
    o.wipe_store();
    let store = o.open_store();
    let good = o.open_cache(
        &format!("file://{}/cache-none", o.root.display()),
        o.options(),
    );
    let top = o.top_path();
    let refs: std::collections::BTreeSet<_> = good.query_info(&top).unwrap().unwrap().references;
    substitute_closure(&store, std::slice::from_ref(&good), &refs, 2).unwrap();
    let before = o.store_entries();
    let bad = o.open_cache(&format!("file://{}", cache_dir.display()), opts);
    let err = substitute(&store, std::slice::from_ref(&bad), &top)
        .unwrap_err()
        .to_string();
    assert!(err.contains(expect), "expected '{expect}' in: {err}");
    assert!(err.contains(&o.top), "error names the path: {err}");
    assert!(!store.is_valid_path(&top).unwrap(), "nothing registered");
    assert_eq!(
        o.store_entries(),
        before,
        "nothing left in the store directory"
    );
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    let st = std::process::Command::new("cp")
        .arg("-r")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn tampered_or_unsigned_paths_are_refused() {
    nixb_testsupport::require!(Nix);
    let o = Oracle::build();
    let base = o.root.join("cache-none");
    o.copy_to(&base, "none");
    let top_hash = &o.top[o.store_dir().len() + 1..][..32];
    let narinfo_text = std::fs::read_to_string(base.join(format!("{top_hash}.narinfo"))).unwrap();
    let nar_rel = narinfo_text
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_string();

    // A tampered NAR: same length, one byte of file content changed.
    let tampered = o.root.join("tampered");
    copy_dir(&base, &tampered);
    let nar_path = tampered.join(&nar_rel);
    let mut nar = std::fs::read(&nar_path).unwrap();
    let at = nar
        .windows(4)
        .position(|w| w == b"top\n")
        .expect("file content in nar");
    nar[at] = b'T';
    std::fs::write(&nar_path, nar).unwrap();
    assert_refused(&o, &tampered, o.options(), "NarHash mismatch");

    // A wrong NarHash in the narinfo: the signature no longer matches ...
    let wrong = o.root.join("wrong-narhash");
    copy_dir(&base, &wrong);
    let ni = wrong.join(format!("{top_hash}.narinfo"));
    let bogus = "sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s";
    let text: String = narinfo_text
        .lines()
        .map(|l| {
            if l.starts_with("NarHash: ") {
                format!("NarHash: {bogus}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&ni, &text).unwrap();
    assert_refused(
        &o,
        &wrong,
        o.options(),
        "no valid signature by a trusted key",
    );
    // ... and without signature checks, the content check catches it.
    let lax = CacheOptions {
        require_sigs: false,
        ..o.options()
    };
    assert_refused(&o, &wrong, lax, "NarHash mismatch");

    // No signature at all.
    let unsigned = o.root.join("unsigned");
    copy_dir(&base, &unsigned);
    let text: String = narinfo_text
        .lines()
        .filter(|l| !l.starts_with("Sig: "))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(unsigned.join(format!("{top_hash}.narinfo")), text).unwrap();
    assert_refused(&o, &unsigned, o.options(), "it is not signed");

    // A signature that does not verify.
    let badsig = o.root.join("badsig");
    copy_dir(&base, &badsig);
    let text: String = narinfo_text
        .lines()
        .map(|l| match l.strip_prefix("Sig: oracle-1:") {
            Some(s) => {
                let mut b = s.as_bytes().to_vec();
                b[5] = if b[5] == b'A' { b'B' } else { b'A' };
                format!("Sig: oracle-1:{}\n", String::from_utf8(b).unwrap())
            }
            None => format!("{l}\n"),
        })
        .collect();
    std::fs::write(badsig.join(format!("{top_hash}.narinfo")), text).unwrap();
    assert_refused(
        &o,
        &badsig,
        o.options(),
        "no valid signature by a trusted key",
    );

    // Correctly signed, by a key we do not trust.
    let other = SecretKey::from_seed("oracle-1", &[7; 32]).to_public();
    let mut t = TrustedKeys::new();
    t.add(other);
    let untrusted = CacheOptions {
        trusted_keys: t,
        ..o.options()
    };
    assert_refused(&o, &base, untrusted, "no valid signature by a trusted key");
}

#[test]
fn refuses_a_cache_for_another_store_dir() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
    let err = BinaryCache::open(
        &format!("file://{}", dir.path().display()),
        &nixb_store::StoreDir::new("/other/store").unwrap(),
        CacheOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("is for store '/nix/store', but this store is '/other/store'"),
        "{err}"
    );
}

#[test]
fn incomplete_closure_is_refused() {
    nixb_testsupport::require!(Nix);
    let o = Oracle::build();
    o.copy_to(&o.root.join("cache"), "xz");
    o.wipe_store();
    let store = o.open_store();
    let cache = o.open_cache(&format!("file://{}/cache", o.root.display()), o.options());
    match substitute(&store, std::slice::from_ref(&cache), &o.top_path()) {
        Err(SubstituteError::IncompleteClosure { path, .. }) => assert_eq!(path, o.top),
        other => panic!("expected an incomplete closure error, got {other:?}"),
    }
    assert!(o.store_entries().is_empty(), "{:?}", o.store_entries());
}

#[test]
fn real_nix_substitutes_from_nixb_written_caches() {
    nixb_testsupport::require!(Nix);
    let o = Oracle::build();
    o.copy_to(&o.root.join("nix-none"), "none");
    // Make the closure valid in nixb's store by substituting it, then publish it again.
    o.wipe_store();
    let store = o.open_store();
    let cache = o.open_cache(
        &format!("file://{}/nix-none", o.root.display()),
        o.options(),
    );
    substitute_closure(&store, std::slice::from_ref(&cache), &o.top_set(), 4).unwrap();
    let sk = SecretKey::parse(&o.secret_key).unwrap();
    let own = SecretKey::from_seed("nixb-test-1", &[42; 32]);
    for c in [
        Compression::None,
        Compression::Xz,
        Compression::Bzip2,
        Compression::Zstd,
    ] {
        let dir = o.root.join(format!("nixb-{c}"));
        let opts = WriteOptions {
            compression: c,
            secret_keys: vec![sk.clone(), own.clone()],
            jobs: 3,
        };
        let written = copy_to_file_cache(&store, &dir, &o.top_set(), &opts).unwrap();
        assert_eq!(written.len(), 6);
        assert!(
            copy_to_file_cache(&store, &dir, &o.top_set(), &opts)
                .unwrap()
                .is_empty(),
            "second copy skips"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("nix-cache-info")).unwrap(),
            format!("StoreDir: {}\n", o.store_dir())
        );
        for sub in ["nar", "log", "realisations"] {
            assert!(dir.join(sub).is_dir());
        }
    }
    // Uncompressed and signed with the same key, our narinfos are byte-identical to Nix's
    // once our extra signature is left out.
    for p in &o.closure {
        let h = &p[o.store_dir().len() + 1..][..32];
        let theirs = std::fs::read_to_string(o.root.join(format!("nix-none/{h}.narinfo"))).unwrap();
        let ours = std::fs::read_to_string(o.root.join(format!("nixb-none/{h}.narinfo"))).unwrap();
        let ours: String = ours
            .lines()
            .filter(|l| !l.starts_with("Sig: nixb-test-1:"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(ours, theirs, "narinfo of {p}");
    }
    drop(store);
    // Real Nix, requiring signatures and trusting only our own key, substitutes from each.
    for c in ["none", "xz", "bzip2", "zstd"] {
        o.wipe_store();
        let url = format!("file://{}/nixb-{c}", o.root.display());
        let out = o
            .nix("nix-store")
            .args([
                "-r",
                &o.top,
                "--option",
                "substituters",
                &url,
                "--option",
                "trusted-public-keys",
            ])
            .arg(own.to_public().to_text())
            .args(["--option", "require-sigs", "true", "-j0"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{c}: real nix-store -r failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        o.assert_closure_matches();
    }
}
