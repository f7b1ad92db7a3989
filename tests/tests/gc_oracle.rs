//! `nixb gc` against real Nix 2.8's `nix-store --gc` on one store with roots of every kind:
//! a gcroots symlink, an indirect root (and a stale `gcroots/auto` link), a profile (with
//! a link to a link), a regular file named after a store path, a temporary root of a live
//! process (and a stale temporary roots file), and live processes holding a path as their
//! cwd, as an open file, as a memory mapping and in their environment; with
//! `keep-outputs`/`keep-derivations` in all four combinations.
//!
//! Store paths embed the store directory, so the store cannot be copied elsewhere; it is
//! snapshotted once and restored in place between the two collectors (only the deleted
//! entries come back, so the live processes keep their files).

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nixb_store::locks::{lock_file, LockType};
use nixb_tests::{run, run_ok, run_str, TestStore};

const EXPR: &str = r#"
let
  mk = name: deps: derivation {
    inherit name deps;
    PATH = "/bin:/usr/bin";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" ''
      mkdir $out; echo ${name} > $out/file
      i=0; for d in $deps; do ln -s $d $out/dep$i; i=$((i+1)); done
    '' ];
  };
  base = mk "base" [];
  shared = mk "shared" [ base ];
in {
  a-gcroot = mk "gcroot" [ shared ];
  b-indirect = mk "indirect" [ base ];
  c-profile = mk "profile" [];
  d-regular = mk "regular" [];
  e-temp = mk "temp" [];
  f-cwd = mk "cwd" [];
  g-fd = mk "fd" [];
  h-mmap = mk "mmap" [];
  i-env = mk "env" [];
  j-drvroot = mk "drvroot" [ base ];
  k-dead1 = mk "dead1" [ shared ];
  l-dead2 = mk "dead2" [ (mk "dead2dep" []) ];
  m-stale = mk "stale" [];
}
"#;

/// Children killed when the test ends, however it ends.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn store_entries(t: &TestStore) -> BTreeSet<String> {
    std::fs::read_dir(t.store_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".links")
        .collect()
}

fn cp(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success(), "cp -a {} {}", from.display(), to.display());
}

/// What is restored between collections.
struct Snapshot {
    dir: tempfile::TempDir,
}

impl Snapshot {
    fn take(t: &TestStore) -> Snapshot {
        let dir = tempfile::tempdir().unwrap();
        cp(&t.store_dir(), &dir.path().join("store"));
        cp(&t.state_dir().join("db"), &dir.path().join("db"));
        cp(&t.state_dir().join("gcroots"), &dir.path().join("gcroots"));
        cp(
            &t.state_dir().join("temproots"),
            &dir.path().join("temproots"),
        );
        Snapshot { dir }
    }

    fn restore(&self, t: &TestStore) {
        let snap_store = self.dir.path().join("store");
        for e in std::fs::read_dir(&snap_store).unwrap() {
            let e = e.unwrap();
            let dest = t.store_dir().join(e.file_name());
            if std::fs::symlink_metadata(&dest).is_err() {
                cp(&e.path(), &dest);
            }
        }
        let db = t.state_dir().join("db");
        std::fs::remove_dir_all(&db).unwrap();
        cp(&self.dir.path().join("db"), &db);
        let roots = t.state_dir().join("gcroots");
        std::fs::remove_dir_all(&roots).unwrap();
        cp(&self.dir.path().join("gcroots"), &roots);
        // Only the stale file: the live one must keep its inode (and its lock).
        let stale = self.dir.path().join("temproots/999999");
        let _ = std::fs::copy(&stale, t.state_dir().join("temproots/999999"));
    }
}

fn sorted_lines(b: &[u8]) -> Vec<String> {
    let mut v: Vec<String> = String::from_utf8_lossy(b)
        .lines()
        .map(String::from)
        .collect();
    v.sort();
    v
}

fn verify_clean(t: &TestStore, who: &str) {
    let out = run(
        t.nix("nix-store").args(["--verify", "--check-contents"]),
        None,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !err.contains("error") && !err.contains("warning: path"),
        "nix-store --verify --check-contents after {who}: {err}"
    );
}

#[test]
fn nixb_gc_deletes_exactly_what_nix_store_gc_deletes() {
    // python3 (with its standard ctypes) holds a path by a memory map alone.
    nixb_testsupport::require!(Nix, Program("python3"));
    let t = TestStore::with_conf("sandbox = false\nbuild-users-group =\nsubstituters =\n");
    let expr = t.file("roots.nix", EXPR);
    let drvs = run_str(t.nix("nix-instantiate").arg(&expr), None);
    let drvs: Vec<&str> = drvs.lines().collect();
    assert_eq!(drvs.len(), 13, "{drvs:?}");
    let outs = run_str(t.nix("nix-store").arg("-r").args(&drvs), None);
    let outs: Vec<String> = outs.lines().map(String::from).collect();
    assert_eq!(outs.len(), 13, "{outs:?}");
    let src = t.file("source.txt", "a dead source\n");
    run_ok(t.nix("nix-store").arg("--add").arg(&src), None);
    let out = |i: usize| PathBuf::from(&outs[i]);
    let (gcroot, indirect, profile, regular, temp, cwd, fd, mmap, env, drvroot, stale) = (
        out(0),
        out(1),
        out(2),
        out(3),
        out(4),
        out(5),
        out(6),
        out(7),
        out(8),
        drvs[9],
        out(12),
    );
    // A parseable store entry without a row (a leftover of a failed build).
    let stray = t
        .store_dir()
        .join("0000000000000000000000000000000a-leftover");
    std::fs::create_dir(&stray).unwrap();
    std::fs::write(stray.join("x"), "x").unwrap();

    let state = t.state_dir();
    let gcroots = state.join("gcroots");
    std::os::unix::fs::symlink(&gcroot, gcroots.join("direct")).unwrap();
    std::fs::create_dir_all(gcroots.join("auto")).unwrap();
    let result = t.root.path().join("files/result");
    std::os::unix::fs::symlink(&indirect, &result).unwrap();
    std::os::unix::fs::symlink(&result, gcroots.join("auto/indirect")).unwrap();
    std::os::unix::fs::symlink(t.root.path().join("files/gone"), gcroots.join("auto/stale"))
        .unwrap();
    std::fs::create_dir_all(gcroots.join("sub")).unwrap();
    std::fs::write(gcroots.join("sub").join(regular.file_name().unwrap()), "").unwrap();
    std::os::unix::fs::symlink(drvroot, gcroots.join("drv")).unwrap();
    let profiles = state.join("profiles/per-user/root");
    std::fs::create_dir_all(&profiles).unwrap();
    std::os::unix::fs::symlink(&profile, profiles.join("profile-1-link")).unwrap();
    std::os::unix::fs::symlink("profile-1-link", profiles.join("profile")).unwrap();

    // A temporary root of a live process (this one), and a stale file of a dead one.
    let temproots = state.join("temproots");
    std::fs::create_dir_all(&temproots).unwrap();
    let mut live = File::create(temproots.join(std::process::id().to_string())).unwrap();
    assert!(lock_file(&live, LockType::Write, false).unwrap());
    live.write_all(format!("{}\0", temp.display()).as_bytes())
        .unwrap();
    std::fs::write(temproots.join("999999"), format!("{}\0", stale.display())).unwrap();

    let mut procs = Procs(Vec::new());
    procs.0.push(
        Command::new("sleep")
            .arg("600")
            .current_dir(&cwd)
            .spawn()
            .unwrap(),
    );
    procs.0.push(
        Command::new("sleep")
            .arg("600")
            .stdin(File::open(fd.join("file")).unwrap())
            .spawn()
            .unwrap(),
    );
    procs.0.push(
        Command::new("sleep")
            .arg("600")
            .env("NIXB_GC_TEST_ROOT", format!("x:{}/file:y", env.display()))
            .spawn()
            .unwrap(),
    );
    let mut py = Command::new("python3")
        .arg("-c")
        .arg(
            "import ctypes,os,sys\n\
             libc=ctypes.CDLL(None,use_errno=True)\n\
             libc.mmap.restype=ctypes.c_void_p\n\
             libc.mmap.argtypes=[ctypes.c_void_p,ctypes.c_size_t,ctypes.c_int,ctypes.c_int,ctypes.c_int,ctypes.c_long]\n\
             fd=os.open(sys.stdin.readline().strip(),os.O_RDONLY)\n\
             assert libc.mmap(None,4096,1,2,fd,0) not in (None,ctypes.c_void_p(-1).value)\n\
             os.close(fd)\n\
             print('mapped',flush=True)\n\
             sys.stdin.read()\n",
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut py_in = py.stdin.take().unwrap();
    writeln!(py_in, "{}", mmap.join("file").display()).unwrap();
    let mut line = String::new();
    BufReader::new(py.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "mapped");
    procs.0.push(py);

    // --print-roots agree (sorted: Nix sorts by link, then target).
    let theirs = run_ok(t.nix("nix-store").args(["--gc", "--print-roots"]), None);
    let ours = run_ok(t.nixb().args(["gc", "--print-roots"]), None);
    assert_eq!(sorted_lines(&ours), sorted_lines(&theirs));
    let theirs_text = String::from_utf8_lossy(&theirs).into_owned();
    for (what, p) in [
        ("cwd", &cwd),
        ("fd", &fd),
        ("maps", &mmap),
        ("environ", &env),
    ] {
        assert!(
            theirs_text.contains(&format!("{what} -> {}", p.display()))
                || theirs_text.contains(&format!("/fd/0 -> {}", p.display())),
            "nix does not list the {what} root: {theirs_text}"
        );
    }
    assert!(
        !theirs_text.contains(&format!("/fd/4 -> {}", mmap.display())),
        "the mapped file is still open: {theirs_text}"
    );
    assert!(theirs_text.contains(&format!(
        "{{temp:{}}} -> {}",
        std::process::id(),
        temp.display()
    )));

    // query --roots agree.
    let q = format!("{}", gcroot.display());
    let theirs = run_ok(t.nix("nix-store").args(["-q", "--roots", &q]), None);
    let ours = run_ok(t.nixb().args(["query", "--roots", &q]), None);
    assert_eq!(sorted_lines(&ours), sorted_lines(&theirs));

    let snapshot = Snapshot::take(&t);
    let before = store_entries(&t);
    for (keep_outputs, keep_derivations) in
        [(false, true), (false, false), (true, true), (true, false)]
    {
        let opts = [
            "--option".to_string(),
            "keep-outputs".into(),
            keep_outputs.to_string(),
            "--option".into(),
            "keep-derivations".into(),
            keep_derivations.to_string(),
        ];
        let case = format!("keep-outputs={keep_outputs} keep-derivations={keep_derivations}");

        let theirs = run_ok(
            t.nix("nix-store")
                .args(["--gc", "--print-dead"])
                .args(&opts),
            None,
        );
        snapshot.restore(&t);
        let ours = run_ok(t.nixb().args(["gc", "--print-dead"]).args(&opts), None);
        assert_eq!(
            sorted_lines(&ours),
            sorted_lines(&theirs),
            "--print-dead, {case}"
        );
        snapshot.restore(&t);
        let theirs = run_ok(
            t.nix("nix-store")
                .args(["--gc", "--print-live"])
                .args(&opts),
            None,
        );
        let ours = run_ok(t.nixb().args(["gc", "--print-live"]).args(&opts), None);
        assert_eq!(
            sorted_lines(&ours),
            sorted_lines(&theirs),
            "--print-live, {case}"
        );

        snapshot.restore(&t);
        run_ok(t.nixb().arg("gc").args(&opts), None);
        let after_ours = store_entries(&t);
        verify_clean(&t, &format!("nixb gc, {case}"));
        assert!(
            std::fs::read_link(gcroots.join("auto/stale")).is_err(),
            "stale auto root kept, {case}"
        );

        snapshot.restore(&t);
        assert_eq!(store_entries(&t), before);
        run_ok(t.nix("nix-store").arg("--gc").args(&opts), None);
        let after_theirs = store_entries(&t);
        verify_clean(&t, &format!("nix-store --gc, {case}"));

        let deleted_ours: BTreeSet<_> = before.difference(&after_ours).collect();
        let deleted_theirs: BTreeSet<_> = before.difference(&after_theirs).collect();
        assert_eq!(deleted_ours, deleted_theirs, "deleted sets differ, {case}");
        for kept in [
            &gcroot, &indirect, &profile, &regular, &temp, &cwd, &fd, &mmap, &env,
        ] {
            let name = kept.file_name().unwrap().to_string_lossy().into_owned();
            assert!(after_ours.contains(&name), "root {name} deleted, {case}");
        }
        assert!(!after_ours.contains(stale.file_name().unwrap().to_str().unwrap()));
        assert!(!after_ours.contains("0000000000000000000000000000000a-leftover"));
        snapshot.restore(&t);
    }
    drop(live);
}

/// `min-free`/`max-free`: a build that finds less free space than `min-free` (here as
/// Nix's tests fake it, through `_NIX_TEST_FREE_SPACE_FILE`) collects garbage first; what
/// it builds survives (it is a temporary root by then).
#[test]
fn min_free_makes_a_build_collect_garbage_first() {
    let t = TestStore::new();
    let dead = t.file("dead.txt", "dead\n");
    let target = t.file("target.txt", "target\n");
    let dead = PathBuf::from(run_str(t.nixb().arg("add").arg(&dead), None));
    let target = run_str(t.nixb().arg("add").arg(&target), None);
    let free = t.file("free", "10\n");
    let realise = |min_free: &str| {
        run_ok(
            t.nixb()
                .env("_NIX_TEST_FREE_SPACE_FILE", &free)
                .args(["realise", "--option", "min-free", min_free])
                .args(["--option", "max-free", "100000000", &target]),
            None,
        )
    };
    // Enough space (min-free below what is free): nothing is collected.
    realise("5");
    assert!(dead.exists());
    realise("1000");
    assert!(!dead.exists(), "auto-GC did not delete the dead path");
    assert!(
        Path::new(&target).exists(),
        "auto-GC deleted the build's target"
    );
}
