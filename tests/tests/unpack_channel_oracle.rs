//! `builtin:unpack-channel` (what `nix-channel --update` builds) against real Nix 2.8 on one
//! private store: the tarballs are made by GNU tar, nixb builds first, real Nix checks the
//! store, then the outputs are deleted and `nix-store -r` builds them again, which must give
//! byte-identical NARs at the same paths. Hostile tarballs fail under both.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nixb_tests::{run, run_ok, run_str, TestStore};
use serde_json::json;

/// No substituters: the oracle would otherwise spend its time on cache.nixos.org.
const CONF: &str = "sandbox = false\nbuild-users-group =\nsubstituters =\n";

/// A channel's tree under `<dir>/nixexprs-21.11`: nested directories, a name too long for a
/// ustar header, an executable and a file only group and others may execute, relative and absolute symlinks, a hard link, an empty
/// directory, and a directory its owner cannot write.
fn channel_tree(dir: &Path) {
    let top = dir.join("nixexprs-21.11");
    let long = top.join(
        "pkgs/development/a-directory-name-long-enough/that-the-whole-path-is-past-one-hundred-bytes",
    );
    std::fs::create_dir_all(&long).unwrap();
    std::fs::create_dir_all(top.join("lib/empty")).unwrap();
    std::fs::create_dir_all(top.join("ro")).unwrap();
    std::fs::write(long.join("default.nix"), "{ }: { }\n").unwrap();
    std::fs::write(top.join("default.nix"), "import ./pkgs\n").unwrap();
    std::fs::write(top.join(".version"), "21.11").unwrap();
    std::fs::write(top.join("lib/tool.sh"), "#!/bin/sh\necho tool\n").unwrap();
    std::fs::write(top.join("ro/file"), "read only\n").unwrap();
    std::fs::write(top.join("lib/not-mine-to-run"), "#!/bin/sh\n").unwrap();
    let mode = |p: &Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    };
    // The owner execute bit alone makes a file executable in a NAR.
    mode(&top.join("lib/tool.sh"), 0o711);
    mode(&top.join("default.nix"), 0o604);
    mode(&top.join("lib/not-mine-to-run"), 0o655);
    std::os::unix::fs::symlink("../default.nix", top.join("lib/default.nix")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/channel", top.join("dangling")).unwrap();
    std::fs::hard_link(top.join(".version"), top.join("lib/.version")).unwrap();
    mode(&top.join("ro"), 0o555);
}

/// Runs GNU tar in `dir` with `args`.
fn tar(dir: &Path, args: &[&str]) {
    let o = run(Command::new("tar").current_dir(dir).args(args), None);
    assert!(
        o.status.success(),
        "tar {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Adds `tarball` with nixb and writes, with `nixb derivation add`, the derivation
/// `<nix/unpack-channel.nix>` makes of it; checks that `nix-instantiate` makes the same one
/// of the same expression. Returns the .drv path and the tarball's store path.
fn unpack_channel_drv(t: &TestStore, tarball: &Path, name: &str) -> (String, String) {
    let src = run_str(t.nixb().arg("add").arg(tarball), None);
    let env = json!({
        "builder": "builtin:unpack-channel",
        "channelName": "nixos",
        "name": name,
        "out": "",
        "preferLocalBuild": "1",
        "src": src,
        "system": "builtin",
    });
    let drv = json!({
        "outputs": { "out": { "path": "" } },
        "inputSrcs": [src],
        "inputDrvs": {},
        "system": "builtin",
        "builder": "builtin:unpack-channel",
        "args": [],
        "env": env,
    });
    let ours = run_str(
        t.nixb().args(["derivation", "add"]),
        Some(drv.to_string().as_bytes()),
    );
    // The expression nix-channel hands to nix-build/nix-env for a channel tarball.
    let expr = format!(
        r#"derivation {{
             name = "{name}"; channelName = "nixos"; src = builtins.storePath "{src}";
             builder = "builtin:unpack-channel"; system = "builtin"; preferLocalBuild = true;
           }}"#
    );
    let theirs = run_str(t.nix("nix-instantiate").args(["--expr", &expr]), None);
    assert_eq!(ours, theirs, "nixb derivation add vs nix-instantiate");
    (ours, src)
}

#[test]
fn unpack_channel_outputs_are_byte_identical_to_nix_store_r() {
    nixb_testsupport::require!(Nix);
    let t = TestStore::with_conf(CONF);
    let files = t.root.path().join("files");
    let src = files.join("src");
    std::fs::create_dir_all(&src).unwrap();
    channel_tree(&src);
    // Names without an extension: both engines must tell the compression by content.
    let mut drvs = Vec::new();
    for (flag, what) in [("", "plain"), ("z", "gzip"), ("j", "bzip2"), ("J", "xz")] {
        let tarball = files.join(format!("channel-{what}"));
        tar(
            &src,
            &[
                &format!("-c{flag}f"),
                tarball.to_str().unwrap(),
                "nixexprs-21.11",
            ],
        );
        drvs.push(unpack_channel_drv(&t, &tarball, &format!("nixos-21.11-{what}")).0);
    }

    let o = run(t.nixb().arg("realise").args(&drvs), None);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{stderr}");
    let outs: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(outs.len(), drvs.len(), "{stderr}");
    let out = Path::new(&outs[0]);
    assert_eq!(
        std::fs::read_to_string(out.join("nixos/lib/default.nix")).unwrap(),
        "import ./pkgs\n"
    );
    let nars: Vec<Vec<u8>> = outs
        .iter()
        .map(|p| run_ok(t.nix("nix-store").arg("--dump").arg(p), None))
        .collect();
    for (nar, p) in nars.iter().zip(&outs) {
        assert!(nar == &nars[0], "{p}: another tree than {}", outs[0]);
    }
    let hashes: Vec<String> = outs
        .iter()
        .map(|p| run_str(t.nix("nix-store").args(["-q", "--hash"]).arg(p), None))
        .collect();

    // Real Nix accepts what nixb registered.
    let verify = run(
        t.nix("nix-store").args(["--verify", "--check-contents"]),
        None,
    );
    let verify_err = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success(), "nix-store --verify: {verify_err}");
    assert!(!verify_err.contains("error"), "{verify_err}");

    // Real Nix builds the same derivations in the same store.
    run_ok(t.nix("nix-store").arg("--delete").args(&outs), None);
    for p in &outs {
        assert!(!Path::new(p).exists(), "{p} survived nix-store --delete");
    }
    let theirs = run_str(t.nix("nix-store").arg("-r").args(&drvs), None);
    let theirs: Vec<&str> = theirs.lines().collect();
    assert_eq!(theirs, outs);
    for (i, p) in outs.iter().enumerate() {
        let nar = run_ok(t.nix("nix-store").arg("--dump").arg(p), None);
        assert!(
            nar == nars[i],
            "{p}: nixb's NAR ({} bytes) differs from Nix's ({} bytes)",
            nars[i].len(),
            nar.len()
        );
        let hash = run_str(t.nix("nix-store").args(["-q", "--hash"]).arg(p), None);
        assert_eq!(hash, hashes[i], "{p}");
    }
}

/// A directory beside the store that hostile tarballs aim at; asserts it is as made.
struct Target(PathBuf);

impl Target {
    fn new(t: &TestStore) -> Target {
        let dir = t.root.path().join("target");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("victim"), "victim\n").unwrap();
        Target(dir)
    }

    fn assert_untouched(&self, what: &str) {
        let names: Vec<_> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["victim"], "{what}");
        assert_eq!(
            std::fs::read_to_string(self.0.join("victim")).unwrap(),
            "victim\n",
            "{what}"
        );
    }
}

#[test]
fn hostile_tarballs_fail_under_both_engines_and_absolute_names_agree() {
    nixb_testsupport::require!(Nix);
    let t = TestStore::with_conf(CONF);
    let target = Target::new(&t);
    let files = t.root.path().join("files");
    let work = files.join("work");
    std::fs::create_dir_all(work.join("c")).unwrap();
    std::fs::write(work.join("c/a"), "a\n").unwrap();
    std::fs::write(work.join("b"), "b\n").unwrap();
    // `c/l` leads to the target; GNU tar archives `c/l/evil` (resolved on disk through it)
    // as a member of that name.
    std::os::unix::fs::symlink(&target.0, work.join("c/l")).unwrap();
    std::fs::write(target.0.join("evil"), "pwned\n").unwrap();
    let tarball = |name: &str, args: &[&str]| {
        let path = files.join(name);
        let mut all = vec!["-cPf", path.to_str().unwrap()];
        all.extend(args);
        tar(&work, &all);
        path
    };
    let hostile = [
        ("two-tops", tarball("two-tops", &["c/a", "b"]), "holds 2"),
        (
            "dot-dot",
            tarball("dot-dot", &["c/a", "c/../../../target/evil"]),
            "member 'c/../../../target/evil': 'c/../../../target/evil' has a '..' component",
        ),
        (
            "through-symlink",
            tarball("through-symlink", &["c/a", "c/l", "c/l/evil"]),
            "member 'c/l/evil' would be unpacked through the symlink 'c/l'",
        ),
    ];
    std::fs::remove_file(target.0.join("evil")).unwrap();
    target.assert_untouched("before");
    for (what, path, message) in &hostile {
        let (drv, src) = unpack_channel_drv(&t, path, what);
        let o = run(t.nixb().args(["realise", &drv]), None);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(100), "{what}: {stderr}");
        assert!(stderr.contains(message), "{what}: {stderr}");
        assert!(
            stderr.contains(&format!("channel tarball '{src}'")),
            "{what}: {stderr}"
        );
        target.assert_untouched(what);
        let o = run(t.nix("nix-store").args(["-r", &drv]), None);
        assert!(
            !o.status.success(),
            "{what}: Nix built it: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        target.assert_untouched(what);
    }

    // A member named by an absolute path lands inside the output, under both engines.
    let abs = target.0.join("abs");
    std::fs::write(&abs, "absolute\n").unwrap();
    let tarball = files.join("absolute");
    tar(
        &work,
        &["-cPf", tarball.to_str().unwrap(), abs.to_str().unwrap()],
    );
    std::fs::remove_file(&abs).unwrap();
    let (drv, _) = unpack_channel_drv(&t, &tarball, "absolute");
    let out = run_str(t.nixb().args(["realise", &drv]), None);
    // The one top-level entry is the path's first component, renamed.
    let rest: PathBuf = abs.components().skip(2).collect();
    assert_eq!(
        std::fs::read_to_string(Path::new(&out).join("nixos").join(rest)).unwrap(),
        "absolute\n"
    );
    target.assert_untouched("absolute");
    let ours = run_ok(t.nix("nix-store").arg("--dump").arg(&out), None);
    run_ok(t.nix("nix-store").arg("--delete").arg(&out), None);
    assert_eq!(run_str(t.nix("nix-store").args(["-r", &drv]), None), out);
    let theirs = run_ok(t.nix("nix-store").arg("--dump").arg(&out), None);
    assert!(ours == theirs, "absolute: nixb's NAR differs from Nix's");
    target.assert_untouched("absolute");
}
