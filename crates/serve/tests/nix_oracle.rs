//! The client against real Nix 2.8 `nix-store --serve --write` (see `common` for how the
//! two stores are kept apart).

mod common;

use std::collections::BTreeSet;

use common::*;
use nixb_serve::proto::basic_derivation;
use nixb_serve::{BuildOptions, BuildStatus};

#[test]
fn handshake_reports_protocol_2_7() {
    nixb_testsupport::require!(Nix);
    let w = World::new();
    let (c, h, _log) = w.connect_nix("remote");
    assert_eq!(c.remote_version(), 0x207);
    c.close().unwrap();
    assert!(h.wait().unwrap().success());
}

#[test]
fn closure_goes_over_and_real_nix_agrees_on_hashes() {
    nixb_testsupport::require!(Nix);
    let w = World::new();
    let local = w.local("local");
    let (a, b) = add_sources(&w, &local, "x");
    let (mut c, h, log) = w.connect_nix("remote");

    let both = BTreeSet::from([a.clone(), b.clone()]);
    assert!(c.query_valid_paths(&both, false, false).unwrap().is_empty());
    // Asking for the script alone must send its reference first.
    let sent = c
        .copy_closure_to(&local, &BTreeSet::from([b.clone()]), false)
        .unwrap();
    assert_eq!(sent, vec![a.clone(), b.clone()]);
    assert_eq!(c.query_valid_paths(&both, false, false).unwrap(), both);
    // A second copy sends nothing.
    assert!(c.copy_closure_to(&local, &both, false).unwrap().is_empty());

    let infos = c.query_path_infos(&both).unwrap();
    for p in [&a, &b] {
        let mine = local.query_path_info(p).unwrap().unwrap();
        let theirs = &infos[p];
        assert_eq!(theirs.nar_hash, mine.nar_hash, "{p}");
        assert_eq!(theirs.nar_size, mine.nar_size, "{p}");
        assert_eq!(theirs.references, mine.references, "{p}");
    }
    assert_eq!(
        c.query_closure(&BTreeSet::from([b.clone()]), false)
            .unwrap(),
        both
    );
    c.close().unwrap();
    assert!(h.wait().unwrap().success(), "{}", log.text());

    // Independent check with real nix-store on the remote: the files are there, and
    // its own verification of contents passes.
    let refs = w.nix_store("remote", &["-q", "--references", &w.store_dir.print(&b)]);
    assert_eq!(refs.trim(), w.store_dir.print(&a));
    w.nix_store("remote", &["--verify", "--check-contents"]);
    assert_eq!(
        nar_of(&w.remote_phys("remote").join(a.base_name())),
        nar_of(&w.store_dir.to_path(&a))
    );
}

#[test]
fn remote_build_and_outputs_copied_back() {
    nixb_testsupport::require!(Nix);
    let w = World::new();
    let local = w.local("local");
    let (a, b) = add_sources(&w, &local, "y");
    let drv = make_drv(
        &w,
        "hello",
        r#"echo building-hello >&2; read -r x < $in0/data; echo "$x from $in1" > $out; /bin/mkdir $dev; /bin/ln -s $in0 $dev/input"#,
        &[&a, &b],
        &["out", "dev"],
    );
    let drv_path = local.add_derivation(&drv).unwrap();
    let basic = basic_derivation(&w.store_dir, &drv, |_| unreachable!()).unwrap();

    let (mut c, h, log) = w.connect_nix("remote");
    c.copy_closure_to(&local, &basic.input_srcs, false).unwrap();
    let res = c
        .build_derivation(&drv_path, &basic, &BuildOptions::default())
        .unwrap();
    assert_eq!(
        res.status,
        BuildStatus::Built,
        "{res:?}\nlog: {}",
        log.text()
    );
    assert!(
        res.stop_time >= res.start_time && res.start_time > 0,
        "{res:?}"
    );

    let outs: BTreeSet<_> = drv.output_paths().into_values().collect();
    let remote_infos = c.query_path_infos(&outs).unwrap();
    assert_eq!(remote_infos.len(), 2);
    // One output with QueryPathInfos + DumpStorePath, the other through real Nix's
    // export stream.
    let out = &drv.output_paths()["out"];
    let dev = &drv.output_paths()["dev"];
    let added = c
        .copy_paths_from(&local, &BTreeSet::from([out.clone()]))
        .unwrap();
    assert_eq!(added, vec![out.clone()]);
    let added = c
        .export_paths_into(&local, &BTreeSet::from([dev.clone()]))
        .unwrap();
    assert_eq!(added, vec![dev.clone()]);
    for p in &outs {
        let mine = local.query_path_info(p).unwrap().unwrap();
        assert_eq!(mine.nar_hash, remote_infos[p].nar_hash, "{p}");
        assert_eq!(mine.references, remote_infos[p].references, "{p}");
        assert_eq!(mine.deriver.as_ref(), Some(&drv_path), "{p}");
    }
    assert_eq!(
        std::fs::read_to_string(w.store_dir.to_path(out)).unwrap(),
        format!("payload y from {}\n", w.store_dir.print(&b))
    );
    // The dev output refers to input a, which real Nix found by scanning.
    assert_eq!(
        local.query_references(dev).unwrap(),
        BTreeSet::from([a.clone()])
    );

    // Real nix-store's own view of the remote build result.
    let hash = w.nix_store("remote", &["-q", "--hash", &w.store_dir.print(out)]);
    assert_eq!(
        hash.trim(),
        local
            .query_path_info(out)
            .unwrap()
            .unwrap()
            .nar_hash
            .to_base32_typed()
    );
    c.close().unwrap();
    assert!(h.wait().unwrap().success());
}

#[test]
fn a_failing_remote_build_is_a_build_failure_with_its_log() {
    nixb_testsupport::require!(Nix);
    let w = World::new();
    let local = w.local("local");
    let drv = make_drv(
        &w,
        "broken",
        "echo this-build-is-doomed >&2; exit 3",
        &[],
        &["out"],
    );
    let drv_path = local.add_derivation(&drv).unwrap();
    let (mut c, h, log) = w.connect_nix("remote");
    let res = c
        .build_derivation(&drv_path, &drv, &BuildOptions::default())
        .unwrap();
    assert_eq!(res.status, BuildStatus::PermanentFailure, "{res:?}");
    assert!(!res.status.is_success());
    assert!(res.error_msg.contains("exit code 3"), "{}", res.error_msg);
    // The session is still usable after a failed build.
    assert!(c
        .query_valid_paths(&drv.output_paths().into_values().collect(), false, false)
        .unwrap()
        .is_empty());
    c.close().unwrap();
    h.wait().unwrap();
    assert!(
        log.text().contains("this-build-is-doomed"),
        "log: {}",
        log.text()
    );
}

#[test]
fn build_timeout_is_honoured_remotely() {
    nixb_testsupport::require!(Nix);
    let w = World::new();
    let local = w.local("local");
    let drv = make_drv(&w, "slow", "/bin/sleep 30; echo > $out", &[], &["out"]);
    let drv_path = local.add_derivation(&drv).unwrap();
    let (mut c, h, _log) = w.connect_nix("remote");
    let t = std::time::Instant::now();
    let opts = BuildOptions {
        build_timeout: 1,
        ..BuildOptions::default()
    };
    let res = c.build_derivation(&drv_path, &drv, &opts).unwrap();
    assert_eq!(res.status, BuildStatus::TimedOut, "{res:?}");
    assert!(t.elapsed().as_secs() < 20);
    c.close().unwrap();
    h.wait().unwrap();
}

#[test]
fn import_stream_and_dump_interoperate_with_real_nix() {
    nixb_testsupport::require!(Nix);
    let w = World::new();
    let local = w.local("local");
    let (a, b) = add_sources(&w, &local, "z");
    let (mut c, h, log) = w.connect_nix("remote");
    // ImportPaths: our export stream, read by real Nix.
    c.import_paths(&local, &BTreeSet::from([a.clone(), b.clone()]))
        .unwrap();
    let infos = c
        .query_path_infos(&BTreeSet::from([a.clone(), b.clone()]))
        .unwrap();
    assert_eq!(
        infos[&b].nar_hash,
        local.query_path_info(&b).unwrap().unwrap().nar_hash
    );

    let mut dumped = Vec::new();
    c.dump_store_path(&b, &mut dumped).unwrap();
    assert_eq!(dumped, nar_of(&w.store_dir.to_path(&b)));
    c.close().unwrap();
    assert!(h.wait().unwrap().success(), "{}", log.text());
}
