//! Sandboxed builds without root, through the `nixb` binary: as a uid and gid that no host
//! account has (`setpriv`), with a store in a directory that uid owns, against real Nix 2.8
//! run as the same uid on an identical store, and against a root build of the same
//! derivations; and `sandbox-fallback` where user namespaces are refused (a namespace whose
//! `user.max_user_namespaces` leaves none to spare).
//!
//! The tests start as root (to switch to the unnamed uid); without root they fail under
//! CI=true and are skipped with a note otherwise.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nixb_tests::nixb_binary;
use nixb_testsupport::{required, Need};

/// A uid and gid with no passwd or group entry on the host.
const ID: u32 = 54321;

const BUSYBOX: &str = "/usr/bin/busybox";

/// The rootless tests start as root, to become uid [`ID`].
fn have_root() -> bool {
    required(&[Need::Root])
}

fn have_nix() -> bool {
    required(&[Need::Nix])
}

/// A directory for one store (`store`, `state`, `log`, `etc/nix.conf`, `home`, `e.nix`),
/// owned by `owner`. Its path is the same from run to run of [`Place::reset`], so store
/// paths are too.
struct Place {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    owner: u32,
}

impl Place {
    fn new(owner: u32) -> Place {
        let tmp = tempfile::Builder::new()
            .prefix("nixb-rootless-")
            .tempdir()
            .unwrap();
        let root = tmp.path().join("r");
        let p = Place {
            _tmp: tmp,
            root,
            owner,
        };
        p.reset(owner);
        p
    }

    /// Empties the directory and gives it to `owner`.
    fn reset(&self, owner: u32) -> &Place {
        let _ = Command::new("chmod")
            .arg("-R")
            .arg("u+w")
            .arg(&self.root)
            .status();
        let _ = std::fs::remove_dir_all(&self.root);
        std::fs::create_dir_all(self.root.join("etc")).unwrap();
        std::fs::create_dir_all(self.root.join("home")).unwrap();
        std::fs::write(
            self.root.join("etc/nix.conf"),
            format!(
                "sandbox = true\nsandbox-paths = /bin/sh={BUSYBOX}\nbuild-users-group =\n\
                 substituters =\n"
            ),
        )
        .unwrap();
        std::fs::write(self.root.join("e.nix"), EXPR).unwrap();
        for dir in [self.root.parent().unwrap(), &self.root] {
            std::os::unix::fs::chown(dir, Some(owner), Some(owner)).unwrap();
        }
        let _ = Command::new("chown")
            .arg("-R")
            .arg(format!("{owner}:{owner}"))
            .arg(&self.root)
            .status();
        self
    }

    fn store(&self) -> PathBuf {
        self.root.join("store")
    }

    /// `program args` as the place's owner (through setpriv unless root), with the store's
    /// environment and nothing else of ours.
    fn cmd(&self, program: &Path, args: &[&str]) -> Command {
        let mut c = if self.owner == 0 {
            Command::new(program)
        } else {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={}", self.owner))
                .arg(format!("--regid={}", self.owner))
                .arg("--clear-groups")
                .arg(program);
            c
        };
        c.args(args)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            // Nix 2.8 wants a user name, which an unnamed uid has only from here.
            .env("USER", "nixb-test")
            .env("HOME", self.root.join("home"))
            .env("NIX_STORE_DIR", self.store())
            .env("NIX_STATE_DIR", self.root.join("state"))
            .env("NIX_LOG_DIR", self.root.join("log"))
            .env("NIX_CONF_DIR", self.root.join("etc"))
            .current_dir(&self.root);
        c
    }

    fn run(&self, program: &Path, args: &[&str]) -> Output {
        self.cmd(program, args).output().unwrap()
    }

    fn run_ok(&self, program: &Path, args: &[&str]) -> String {
        let o = self.run(program, args);
        assert!(
            o.status.success(),
            "{} {args:?} as uid {}: {}\n{}",
            program.display(),
            self.owner,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap().trim().to_string()
    }

    fn instantiate(&self, attr: &str) -> String {
        self.run_ok(Path::new("nix-instantiate"), &["e.nix", "-A", attr])
    }
}

/// `dep`: a directory with a file, an executable and a symlink; `top`: refers to `dep`;
/// `ids`: what the builder is and sees (compared with Nix only: a root build without build
/// users runs as root); `plain`: needs no shell built-ins (also built unsandboxed).
const EXPR: &str = r#"
let
  sh = script: derivation {
    name = "x"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" script ];
  };
  mk = name: script: derivation {
    inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" script ];
  };
in rec {
  dep = mk "dep" "mkdir -p $out/bin $out/share; echo hello > $out/share/greeting; printf '#!/bin/sh\necho hi\n' > $out/bin/hi; chmod +x $out/bin/hi; ln -s share/greeting $out/link";
  top = (mk "top" "echo ${dep}/share/greeting > $out; cat ${dep}/share/greeting >> $out");
  ids = mk "ids" "exec > $out; id -u; id -g; cat /etc/group; echo $$; hostname";
  plain = mk "plain" "echo built > $out";
}
"#;

/// `nix-store --dump-db` lines of the whole store (path, NAR hash, size, deriver,
/// references), as real Nix reads the database.
fn dump_db(p: &Place) -> String {
    p.run_ok(Path::new("nix-store"), &["--dump-db"])
}

/// (path, NAR hash) of every output.
fn outputs(p: &Place, drv: &str) -> Vec<(String, String)> {
    let outs = p.run_ok(Path::new("nix-store"), &["-q", "--outputs", drv]);
    outs.lines()
        .map(|o| {
            let h = p.run_ok(Path::new("nix-store"), &["-q", "--hash", o]);
            (o.to_string(), h)
        })
        .collect()
}

/// Owner, mode and mtime of every file under `path`, relative names.
fn metadata(path: &Path) -> Vec<(String, u32, u32, i64)> {
    let mut out = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = std::fs::symlink_metadata(&p).unwrap();
        let rel = p.strip_prefix(path).unwrap().display().to_string();
        out.push((rel, md.uid(), md.mode() & 0o7777, md.mtime()));
        if md.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_sandboxed_build_without_root_matches_root_and_nix_2_8() {
    if !have_root() || !have_nix() {
        return;
    }
    let nixb = nixb_binary();
    let mut place = Place::new(ID);
    let drvs: Vec<String> = ["top", "ids"]
        .iter()
        .map(|a| place.instantiate(a))
        .collect();

    // nixb as the unnamed uid: the builder runs sandboxed (it is PID 1, sees only the
    // chroot) as 1000:100 in its own user namespace.
    let mut args = vec!["realise"];
    args.extend(drvs.iter().map(String::as_str));
    let o = place.run(&nixb, &args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "nixb realise as uid {ID}: {stderr}");
    assert!(!stderr.contains("without the sandbox"), "{stderr}");
    let nixb_top = outputs(&place, &drvs[0]);
    let dep_drv = place.instantiate("dep");
    let nixb_dep = outputs(&place, &dep_drv);
    let ids_out = outputs(&place, &drvs[1]);
    let ids = std::fs::read_to_string(&ids_out[0].0).unwrap();
    let mut lines = ids.lines();
    assert_eq!(lines.next(), Some("1000"), "{ids}");
    assert_eq!(lines.next(), Some("100"), "{ids}");
    assert!(
        ids.contains("\n1\nlocalhost\n"),
        "not PID 1 or not localhost: {ids}"
    );
    // Outputs belong to the caller, canonical: 0444/0555, mtime 1.
    for (path, _) in nixb_dep.iter().chain(&nixb_top) {
        for (rel, uid, mode, mtime) in metadata(Path::new(path)) {
            assert_eq!(uid, ID, "{path}/{rel}");
            assert_eq!(mtime, 1, "{path}/{rel}");
            assert!(
                [0o444, 0o555, 0o777].contains(&mode),
                "{path}/{rel}: mode {mode:o}"
            );
        }
    }
    let nixb_db = dump_db(&place);

    // Real Nix 2.8 as the same uid on an identical store: same paths, NAR hashes, database.
    place.reset(ID);
    let drvs2: Vec<String> = ["top", "ids"]
        .iter()
        .map(|a| place.instantiate(a))
        .collect();
    assert_eq!(drvs, drvs2);
    let mut args = vec!["-r"];
    args.extend(drvs.iter().map(String::as_str));
    place.run_ok(Path::new("nix-store"), &args);
    assert_eq!(outputs(&place, &drvs[0]), nixb_top);
    assert_eq!(outputs(&place, &dep_drv), nixb_dep);
    let nix_ids = std::fs::read_to_string(&ids_out[0].0).unwrap();
    // Nix's root holds /build too (its build directory); nixb binds it at its host path.
    let strip_ls = |s: &str| s.lines().take(5).collect::<Vec<_>>().join("\n");
    assert_eq!(
        strip_ls(&nix_ids),
        strip_ls(&ids),
        "nixb:\n{ids}\nnix:\n{nix_ids}"
    );
    assert_eq!(dump_db(&place), nixb_db);

    // nixb as root (no build users) on an identical store: the same outputs and database.
    place.reset(0);
    place.owner = 0;
    let place_root = &place;
    place_root.instantiate("top");
    place_root.run_ok(&nixb, &["realise", &drvs[0]]);
    assert_eq!(outputs(place_root, &drvs[0]), nixb_top);
    assert_eq!(outputs(place_root, &dep_drv), nixb_dep);
    let root_db = records(&dump_db(place_root));
    let without_ids: Vec<Vec<String>> = records(&nixb_db)
        .into_iter()
        .filter(|r| !r[0].ends_with("-ids") && !r[0].ends_with("-ids.drv"))
        .collect();
    assert_eq!(root_db, without_ids);
}

/// The records of `nix-store --dump-db`: path, NAR hash, size, deriver, count, references.
fn records(dump: &str) -> Vec<Vec<String>> {
    let mut lines = dump.lines().map(str::to_string);
    let mut out = Vec::new();
    while let Some(path) = lines.next() {
        let mut r = vec![path];
        r.extend(lines.by_ref().take(4));
        let n: usize = r[4].parse().unwrap();
        r.extend(lines.by_ref().take(n));
        out.push(r);
    }
    out
}

/// `sandbox-fallback` where user namespaces are refused: nixb runs as the unnamed uid in a
/// user namespace whose parent allows only one (that one), so the builder's clone gets
/// ENOSPC from the kernel.
#[test]
fn without_user_namespaces_sandbox_fallback_warns_or_fails_saying_why() {
    if !have_root() {
        return;
    }
    let nixb = nixb_binary();
    let place = Place::new(ID);
    if !have_nix() {
        return;
    }
    let drv = place.instantiate("plain");
    let limited = |fallback: &str| -> Output {
        // unshare -r: root of namespace A (still uid 54321 outside), where the limit is set
        // to 1; then namespace B (the one allowed) maps 54321 back, and nixb runs there.
        let script = format!(
            "echo 1 > /proc/sys/user/max_user_namespaces && \
             exec unshare -U --map-user={ID} --map-group={ID} {nixb} realise --option sandbox-fallback {fallback} {drv}",
            nixb = nixb.display()
        );
        place
            .cmd(Path::new("unshare"), &["-U", "-r", "sh", "-c", &script])
            .output()
            .unwrap()
    };
    let o = limited("false");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("in the sandbox: without root it needs a user namespace, and user namespaces are unavailable: creating one failed with ENOSPC"),
        "{stderr}"
    );
    assert!(stderr.contains("sandbox-fallback"), "{stderr}");
    let o = limited("true");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("without the sandbox: without root it needs a user namespace, and user namespaces are unavailable: creating one failed with ENOSPC"),
        "{stderr}"
    );
    let out = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "built\n");
}
