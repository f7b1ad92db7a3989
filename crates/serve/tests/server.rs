//! nixb's server: driven by nixb's client, and by real Nix 2.8 clients (`nix copy --to
//! ssh://`, and real Nix's build hook handing it a build) through a fake `ssh` that runs
//! the server locally. Builds on the server use the test-only unsandboxed builder.

mod common;

use std::collections::BTreeSet;

use common::*;
use nixb_serve::proto::basic_derivation;
use nixb_serve::{BuildOptions, BuildStatus};

#[test]
fn client_and_server_copy_build_and_copy_back() {
    let w = World::new();
    let local = w.local("local");
    let (a, b) = add_sources(&w, &local, "s");
    let drv = make_drv(
        &w,
        "served",
        r#"echo served-build-log >&2; read -r x < $in0/data; echo "$x from $in1" > $out"#,
        &[&a, &b],
        &["out"],
    );
    let drv_path = local.add_derivation(&drv).unwrap();
    let (mut c, h, log) = w.connect_nixb("server");
    assert_eq!(c.remote_version(), 0x207);
    let sent = c
        .copy_closure_to(&local, &BTreeSet::from([b.clone()]), false)
        .unwrap();
    assert_eq!(sent, vec![a.clone(), b.clone()]);
    // What the server registered equals what we have, and the bytes really moved.
    let infos = c
        .query_path_infos(&BTreeSet::from([a.clone(), b.clone()]))
        .unwrap();
    assert_eq!(infos[&b], {
        let mut i = local.query_path_info(&b).unwrap().unwrap();
        i.registration_time = 0;
        i
    });
    assert_eq!(
        nar_of(&w.remote_phys("server").join(a.base_name())),
        nar_of(&w.store_dir.to_path(&a))
    );
    assert_eq!(
        c.query_closure(&BTreeSet::from([b.clone()]), false)
            .unwrap(),
        BTreeSet::from([a.clone(), b.clone()])
    );

    let res = c
        .build_derivation(&drv_path, &drv, &BuildOptions::default())
        .unwrap();
    assert_eq!(res.status, BuildStatus::Built, "{res:?} {}", log.text());
    let out = drv.output_paths()["out"].clone();
    let added = c
        .copy_paths_from(&local, &BTreeSet::from([out.clone()]))
        .unwrap();
    assert_eq!(added, vec![out.clone()]);
    assert_eq!(
        std::fs::read_to_string(w.store_dir.to_path(&out)).unwrap(),
        format!("payload s from {}\n", w.store_dir.print(&b))
    );
    assert_eq!(
        local.query_references(&out).unwrap(),
        BTreeSet::from([b.clone()])
    );

    // A failing build is a failure status, and its log comes back on stderr.
    let bad = make_drv(
        &w,
        "served-bad",
        "echo served-doom >&2; exit 7",
        &[],
        &["out"],
    );
    let bad_path = local.add_derivation(&bad).unwrap();
    let res = c
        .build_derivation(&bad_path, &bad, &BuildOptions::default())
        .unwrap();
    assert_eq!(res.status, BuildStatus::PermanentFailure);
    assert!(res.error_msg.contains("exit code 7"), "{}", res.error_msg);
    c.close().unwrap();
    assert!(h.wait().unwrap().success(), "{}", log.text());
    let text = log.text();
    assert!(
        text.contains("served-build-log") && text.contains("served-doom"),
        "{text}"
    );
}

#[test]
fn build_paths_and_export_stream_against_the_server() {
    let w = World::new();
    let local = w.local("local");
    let (a, _b) = add_sources(&w, &local, "e");
    let drv = make_drv(&w, "by-path", "echo $in0 > $out", &[&a], &["out"]);
    let drv_path = local.add_derivation(&drv).unwrap();
    let (mut c, h, log) = w.connect_nixb("server");
    // The .drv and its inputs go over (as an export stream), then the server builds
    // from its own copy of the derivation.
    let closure = local
        .compute_closure(&BTreeSet::from([drv_path.clone()]))
        .unwrap();
    c.import_paths(&local, &closure).unwrap();
    assert_eq!(
        c.query_valid_paths(&closure, false, false).unwrap(),
        closure
    );
    let r = c
        .build_paths(
            &[format!("{}!out", w.store_dir.print(&drv_path))],
            &BuildOptions::default(),
        )
        .unwrap();
    assert_eq!(r, Ok(()), "{}", log.text());
    let out = drv.output_paths()["out"].clone();
    // Back through the server's export stream.
    let got = c
        .export_paths_into(&local, &BTreeSet::from([out.clone()]))
        .unwrap();
    assert_eq!(got, vec![out.clone()]);
    let info = local.query_path_info(&out).unwrap().unwrap();
    assert_eq!(info.references, BTreeSet::from([a.clone()]));
    assert_eq!(info.deriver, Some(drv_path.clone()));
    // The closure with outputs, as the server sees it.
    let with_outs = c
        .query_closure(&BTreeSet::from([drv_path.clone()]), true)
        .unwrap();
    assert!(
        with_outs.contains(&out) && with_outs.contains(&a),
        "{with_outs:?}"
    );
    c.close().unwrap();
    assert!(h.wait().unwrap().success(), "{}", log.text());
}

#[test]
fn server_outputs_are_identical_to_real_nix_outputs() {
    nixb_testsupport::require!(Nix);
    let w = World::new();
    let local = w.local("local");
    let (a, b) = add_sources(&w, &local, "same");
    let drv = make_drv(
        &w,
        "twins",
        r#"/bin/mkdir $out; /bin/cp -r $in0 $out/copy; echo $in1 > $out/ref; /bin/ln -s $in0/data $out/link"#,
        &[&a, &b],
        &["out"],
    );
    let drv_path = local.add_derivation(&drv).unwrap();
    let basic = basic_derivation(&w.store_dir, &drv, |_| unreachable!()).unwrap();
    let out = drv.output_paths()["out"].clone();
    let mut infos = Vec::new();
    for nixb in [false, true] {
        let (mut c, h, log) = if nixb {
            w.connect_nixb("n")
        } else {
            w.connect_nix("r")
        };
        c.copy_closure_to(&local, &basic.input_srcs, false).unwrap();
        let res = c
            .build_derivation(&drv_path, &basic, &BuildOptions::default())
            .unwrap();
        assert_eq!(res.status, BuildStatus::Built, "{res:?} {}", log.text());
        infos.push(c.query_path_infos(&BTreeSet::from([out.clone()])).unwrap()[&out].clone());
        c.close().unwrap();
        h.wait().unwrap();
    }
    assert_eq!(infos[0].nar_hash, infos[1].nar_hash);
    assert_eq!(infos[0].nar_size, infos[1].nar_size);
    assert_eq!(infos[0].references, infos[1].references);
    assert_eq!(infos[0].references, BTreeSet::from([a, b]));
}

#[test]
fn real_nix_copies_to_the_nixb_server_over_its_ssh_store() {
    nixb_testsupport::require!(Nix);
    let w = World::new();
    let bin = w.fake_ssh_to_nixb("server");
    // A path in real Nix's own store (the client), with a reference.
    let dep = w.path("dep.txt");
    std::fs::write(&dep, "dependency\n").unwrap();
    let o = w.nix_client(
        "client",
        &bin,
        "nix-store",
        &["--add", dep.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dep_path = String::from_utf8(o.stdout).unwrap().trim().to_string();
    let expr = format!(
        // A path literal, so the string carries the dependency as context.
        "derivation {{ name = \"top\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; args = [\"-c\" \"echo ${{{dep}}} > $out\"]; }}",
        dep = dep.display()
    );
    let o = w.nix_client("client", &bin, "nix-build", &["--no-out-link", "-E", &expr]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let top = String::from_utf8(o.stdout).unwrap().trim().to_string();

    let o = w.nix_client(
        "client",
        &bin,
        "nix",
        &[
            "--extra-experimental-features",
            "nix-command",
            "copy",
            "--to",
            "ssh://fakehost",
            &top,
        ],
    );
    assert!(
        o.status.success(),
        "nix copy: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(std::fs::read_to_string(w.path("ssh.log"))
        .unwrap()
        .contains("nix-store --serve --write"));

    // Ask the server (through our client) what it has now, and compare with real Nix's
    // own records on the client side.
    let (mut c, h, _log) = w.connect_nixb("server");
    let top_p = w.store_dir.parse(&top).unwrap();
    let dep_p = w.store_dir.parse(&dep_path).unwrap();
    let infos = c
        .query_path_infos(&BTreeSet::from([top_p.clone(), dep_p.clone()]))
        .unwrap();
    assert_eq!(infos.len(), 2, "{infos:?}");
    assert_eq!(infos[&top_p].references, BTreeSet::from([dep_p.clone()]));
    for (p, printed) in [(&top_p, &top), (&dep_p, &dep_path)] {
        let o = w.nix_client("client", &bin, "nix-store", &["-q", "--hash", printed]);
        assert_eq!(
            String::from_utf8(o.stdout).unwrap().trim(),
            infos[p].nar_hash.to_base32_typed()
        );
    }
    c.close().unwrap();
    h.wait().unwrap();
}

#[test]
fn real_nix_build_hook_builds_on_the_nixb_server() {
    nixb_testsupport::require!(Nix);
    let w = World::new();
    let bin = w.fake_ssh_to_nixb("server");
    let expr = "derivation { name = \"offloaded\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; args = [\"-c\" \"echo built-remotely-by-nixb >&2; echo remote > $out\"]; }";
    let o = w.nix_client(
        "client",
        &bin,
        "nix-build",
        &[
            "--no-out-link",
            "--max-jobs",
            "0",
            "--builders",
            "ssh://fakehost x86_64-linux",
            "-E",
            expr,
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "nix-build via hook: {err}");
    let out = String::from_utf8(o.stdout).unwrap().trim().to_string();
    assert!(std::fs::read_to_string(w.path("ssh.log"))
        .unwrap()
        .contains("nix-store --serve --write"));
    // Built on the server: the output is in the server's physical store, and real Nix
    // copied it back (and verified it) into its own.
    let name = std::path::Path::new(&out).file_name().unwrap();
    assert_eq!(
        std::fs::read_to_string(w.remote_phys("server").join(name)).unwrap(),
        "remote\n"
    );
    assert_eq!(
        std::fs::read_to_string(w.remote_phys("client").join(name)).unwrap(),
        "remote\n"
    );
}

/// Records what the server asks it to substitute; builds nothing.
struct SubstituteRecorder(Vec<BTreeSet<nixb_store::StorePath>>);

impl nixb_serve::server::RemoteBuilder for SubstituteRecorder {
    fn build_derivation(
        &mut self,
        _: &nixb_store::local_store::LocalStore,
        _: &nixb_store::StorePath,
        _: &nixb_store::derivation::Derivation,
        _: &BuildOptions,
    ) -> nixb_serve::BuildResult {
        nixb_serve::BuildResult::new(BuildStatus::MiscFailure, "this builder builds nothing")
    }

    fn build_paths(
        &mut self,
        _: &nixb_store::local_store::LocalStore,
        _: &[nixb_store::DerivedPath],
        _: &BuildOptions,
    ) -> Result<(), (BuildStatus, String)> {
        Err((
            BuildStatus::MiscFailure,
            "this builder builds nothing".into(),
        ))
    }

    fn substitute_paths(
        &mut self,
        _: &nixb_store::local_store::LocalStore,
        paths: &BTreeSet<nixb_store::StorePath>,
    ) {
        self.0.push(paths.clone());
    }
}

/// One in-process session: `queries` are (paths, substitute flag); returns the valid
/// sets answered and what the builder was asked to substitute.
fn substitute_session(
    w: &World,
    write: bool,
    queries: &[(BTreeSet<nixb_store::StorePath>, bool)],
) -> (
    Vec<BTreeSet<nixb_store::StorePath>>,
    Vec<BTreeSet<nixb_store::StorePath>>,
) {
    let server_store = w.local("server");
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut rec = SubstituteRecorder(Vec::new());
    let answers = std::thread::scope(|s| {
        let server = s.spawn(|| {
            let r = theirs.try_clone().unwrap();
            nixb_serve::server::serve(r, theirs, &server_store, &mut rec, write)
        });
        let mut c =
            nixb_serve::ServeClient::new(ours.try_clone().unwrap(), ours, w.store_dir.clone(), "t")
                .unwrap();
        let answers: Vec<_> = queries
            .iter()
            .map(|(p, sub)| c.query_valid_paths(p, false, *sub).unwrap())
            .collect();
        c.close().unwrap();
        server.join().unwrap().unwrap();
        answers
    });
    (answers, rec.0)
}

#[test]
fn the_substitute_flag_asks_for_missing_plain_paths_only_and_only_with_write() {
    let w = World::new();
    let local = w.local("local");
    let (a, b) = add_sources(&w, &local, "sub");
    let drv = make_drv(&w, "not-substituted", "exit 0", &[&a], &["out"]);
    let drv_path = local.add_derivation(&drv).unwrap();
    // The server already has a (b refers to it); b and the derivation it lacks.
    let server = w.local("server");
    server
        .register_valid_paths(&[local.query_path_info(&a).unwrap().unwrap()])
        .unwrap();
    drop(server);
    let all = BTreeSet::from([a.clone(), b.clone(), drv_path.clone()]);
    let (answers, asked) =
        substitute_session(&w, true, &[(all.clone(), false), (all.clone(), true)]);
    // Without the flag nothing is asked; with it, only the missing non-derivation path.
    // The recorder substitutes nothing, so the answer stays what the store has.
    assert_eq!(asked, vec![BTreeSet::from([b.clone()])]);
    assert_eq!(answers, vec![BTreeSet::from([a.clone()]); 2]);
    // A read-only server never substitutes.
    let (_, asked) = substitute_session(&w, false, &[(all, true)]);
    assert!(asked.is_empty(), "{asked:?}");
}
