//! Bench group `gc`: `nixb gc` against `nix-store --gc` (Nix 2.8) on one synthetic store.
//!
//! ```text
//! store      100,000 registered paths (one small file each), 10% live: a live set whose
//!            paths refer to earlier live paths (most to a few popular ones), rooted at
//!            the live paths nothing live refers to; a dead set whose paths refer to
//!            earlier dead or live paths alike; 1-5 references a path
//! print-dead nixb gc --print-dead   vs  nix-store --gc --print-dead   (same output checked)
//! collect    nixb gc                vs  nix-store --gc                (store restored
//!            before each run, outside the timing; the same paths left checked)
//! scale      nixb gc --print-dead and nixb gc on 100,000 and on 1,000,000 registered
//!            paths (rows only, no files: the collector's memory is the graph's), peak
//!            RSS and time at both sizes
//! ```
//!
//! The store lives on /dev/shm when it exists, so that the figures are the collectors'
//! work rather than a shared disk's. Rows are written straight into the database (no
//! NAR hashing: neither collector reads hashes). Each job runs under `/usr/bin/time`,
//! which reports its peak RSS and CPU time (user + system, the steadier figure on a
//! shared machine; wall time is shown too). Medians of `ROUNDS` runs.
//!
//! `NIXB_BENCH_GC_PATHS` (default 100000) and `NIXB_BENCH_GC_BIG` (default 1000000, 0
//! to skip the scale rows) change the sizes; `NIXB_BENCH_GC_NIXB` names a nixb binary
//! to measure instead of this tree's release build (an earlier commit's, for an A/B).
//! `NIXB_BENCH_GC_GENERATE=DIR` only writes a rows-only store of `NIXB_BENCH_GC_BIG` paths
//! under DIR (`store/`, `state/`, `etc/nix.conf`) and keeps it, for profiling a
//! collection by hand.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use nixb_store::db::PathRow;
use nixb_store::local_store::{LocalStore, StoreConfig};
use nixb_store::{StoreDir, StorePath};

use super::median;

const PATHS: usize = 100_000;
const BIG: usize = 1_000_000;
const ROUNDS: usize = 3;

fn size_from_env(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name}={v:?} is not a number of paths")),
        Err(_) => Ok(default),
    }
}

struct Store {
    root: PathBuf,
}

impl Store {
    fn config(&self) -> Result<StoreConfig> {
        let store = self.root.join("store");
        let store = store.to_str().context("bench directory is not utf-8")?;
        Ok(StoreConfig {
            store_dir: StoreDir::new(store)?,
            state_dir: self.root.join("state"),
            log_dir: self.root.join("log"),
        })
    }

    fn command(&self, program: &Path, args: &[&str], rss_file: &Path) -> Command {
        let mut c = Command::new("/usr/bin/time");
        c.arg("-f")
            .arg("%M %U %S")
            .arg("-o")
            .arg(rss_file)
            .arg(program)
            .args(args);
        c.env("NIX_STORE_DIR", self.root.join("store"))
            .env("NIX_STATE_DIR", self.root.join("state"))
            .env("NIX_LOG_DIR", self.root.join("log"))
            .env("NIX_CONF_DIR", self.root.join("etc"))
            .env("HOME", self.root.join("home"));
        c.stdin(Stdio::null());
        c
    }
}

/// One run of a collector.
struct Run {
    wall: f64,
    /// User + system seconds.
    cpu: f64,
    /// Peak RSS in MiB.
    rss: f64,
    stdout: String,
}

fn timed(store: &Store, program: &Path, args: &[&str]) -> Result<Run> {
    let rss = store.root.join("rss.txt");
    let start = Instant::now();
    let out = store
        .command(program, args, &rss)
        .output()
        .with_context(|| format!("running {} {args:?}", program.display()))?;
    let wall = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "{} {args:?} failed: {}",
            program.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let report = std::fs::read_to_string(&rss)?;
    let fields: Vec<f64> = report
        .lines()
        .last()
        .unwrap_or("")
        .split_whitespace()
        .map(|f| f.parse::<f64>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading /usr/bin/time's report {report:?}"))?;
    let [kb, user, sys] = fields[..] else {
        bail!("/usr/bin/time reported {report:?}, not 'KiB user sys'");
    };
    Ok(Run {
        wall,
        cpu: user + sys,
        rss: kb / 1024.0,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    })
}

/// Medians of both collectors' runs, as one table row.
fn row(what: &str, nixb: &[Run], nix: &[Run]) -> String {
    let m = |runs: &[Run], f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
    let (cpu_a, wall_a, rss_a) = (m(nixb, |r| r.cpu), m(nixb, |r| r.wall), m(nixb, |r| r.rss));
    if nix.is_empty() {
        return format!("| {what} | {cpu_a:.2} | - | - | {wall_a:.2} | - | - | {rss_a:.0} / - |");
    }
    let (cpu_b, wall_b, rss_b) = (m(nix, |r| r.cpu), m(nix, |r| r.wall), m(nix, |r| r.rss));
    format!(
        "| {what} | {cpu_a:.2} | {cpu_b:.2} | {:.1}x | {wall_a:.2} | {wall_b:.2} | {:.1}x | {rss_a:.0} / {rss_b:.0} |",
        cpu_b / cpu_a,
        wall_b / wall_a
    )
}

/// Writes `n` paths (files too when `files`) and the gcroots of the live ones.
fn generate(root: &Path, n: usize, files: bool) -> Result<()> {
    std::fs::create_dir_all(root.join("etc"))?;
    std::fs::write(
        root.join("etc/nix.conf"),
        "sandbox = false\nbuild-users-group =\n",
    )?;
    let s = Store {
        root: root.to_path_buf(),
    };
    let store = LocalStore::open(s.config()?)?;
    let dir = store.store_dir().clone();
    let mut rng = fastrand::Rng::with_seed(1);
    let live_n = n / 10;
    let mut paths: Vec<String> = Vec::with_capacity(n);
    let mut live_referred = vec![false; live_n];
    let mut refs: Vec<Vec<usize>> = Vec::with_capacity(n);
    for i in 0..n {
        let mut h = [0u8; 20];
        rng.fill(&mut h);
        let p = StorePath::from_hash_and_name(&h, &format!("pkg-{i}"))?;
        paths.push(dir.print(&p));
        let mut r = Vec::new();
        if i > 0 {
            for _ in 0..rng.usize(1..=5) {
                // Most references go to a few popular paths (libc, a compiler...).
                let pick = |rng: &mut fastrand::Rng, upto: usize| {
                    if rng.u8(..) < 128 {
                        rng.usize(0..upto.min(50))
                    } else {
                        rng.usize(0..upto)
                    }
                };
                let j = if i < live_n {
                    pick(&mut rng, i)
                } else if i == live_n || rng.bool() {
                    pick(&mut rng, live_n)
                } else {
                    live_n + pick(&mut rng, i - live_n)
                };
                if j < i {
                    if j < live_n && i < live_n {
                        live_referred[j] = true;
                    }
                    r.push(j);
                }
            }
        }
        r.sort_unstable();
        r.dedup();
        refs.push(r);
    }
    store.with_db(|db| {
        db.transaction("writing the synthetic store", |db| {
            let mut ids = Vec::with_capacity(n);
            for p in &paths {
                ids.push(db.insert_path(&PathRow {
                    id: 0,
                    path: p.clone(),
                    hash: format!("sha256:{}", "0".repeat(64)),
                    registration_time: 1,
                    deriver: None,
                    nar_size: Some(120),
                    ultimate: false,
                    sigs: None,
                    ca: None,
                })?);
            }
            for (i, r) in refs.iter().enumerate() {
                for j in r {
                    db.add_reference(ids[i], ids[*j])?;
                }
            }
            Ok::<(), nixb_store::db::DbError>(())
        })
    })?;
    if files {
        for p in &paths {
            std::fs::write(p, b"x")?;
        }
    }
    let gcroots = root.join("state/gcroots");
    for (i, referred) in live_referred.iter().enumerate() {
        if !referred {
            std::os::unix::fs::symlink(&paths[i], gcroots.join(format!("r{i}")))?;
        }
    }
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    if to.exists() {
        let _ = Command::new("chmod").arg("-R").arg("u+w").arg(to).status();
        let _ = std::fs::remove_dir_all(to);
    }
    let st = Command::new("cp").arg("-a").arg(from).arg(to).status()?;
    if !st.success() {
        bail!("cp -a {} {} failed", from.display(), to.display());
    }
    Ok(())
}

pub fn run() -> Result<()> {
    if let Some(dir) = std::env::var_os("NIXB_BENCH_GC_GENERATE") {
        let size = size_from_env("NIXB_BENCH_GC_BIG", BIG)?;
        let dir = PathBuf::from(dir);
        if dir.exists() {
            bail!("{} exists already: name a new directory", dir.display());
        }
        generate(&dir, size, false)?;
        eprintln!("generated {size} rows under {}", dir.display());
        return Ok(());
    }
    let root = crate::workspace_root();
    if !Path::new("/usr/bin/time").exists() {
        bail!("/usr/bin/time is needed to read peak RSS (Debian package 'time')");
    }
    // Another build of nixb (an earlier commit's, for an A/B) instead of this tree's.
    let nixb = match std::env::var_os("NIXB_BENCH_GC_NIXB") {
        Some(p) => PathBuf::from(p),
        None => crate::build_nixb_release(&root)?,
    };
    let nix_store = PathBuf::from("nix-store");
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("nixb-bench-gc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let res = measure(&dir, &nixb, &nix_store);
    let _ = Command::new("chmod")
        .arg("-R")
        .arg("u+w")
        .arg(&dir)
        .status();
    let _ = std::fs::remove_dir_all(&dir);
    res
}

fn measure(dir: &Path, nixb: &Path, nix_store: &Path) -> Result<()> {
    let paths = size_from_env("NIXB_BENCH_GC_PATHS", PATHS)?;
    let big = size_from_env("NIXB_BENCH_GC_BIG", BIG)?;
    // Store paths embed the store directory: generate where the collectors run, and keep
    // a copy to restore from.
    let work = Store {
        root: dir.join("work"),
    };
    let template = dir.join("template");
    let t = Instant::now();
    generate(&work.root, paths, true)?;
    eprintln!(
        "generated {paths} paths in {:.1} s under {}",
        t.elapsed().as_secs_f64(),
        dir.display()
    );
    copy_tree(&work.root, &template)?;

    println!("| measurement | nixb CPU (s) | nix-store CPU (s) | CPU ratio | nixb wall (s) | nix-store wall (s) | wall ratio | peak RSS nixb / nix (MiB) |");
    println!("|---|---|---|---|---|---|---|---|");
    let (mut a, mut b) = (vec![], vec![]);
    for _ in 0..ROUNDS {
        let r1 = timed(&work, nixb, &["gc", "--print-dead"])?;
        let r2 = timed(&work, nix_store, &["--gc", "--print-dead"])?;
        if r1.stdout != r2.stdout {
            bail!("nixb gc --print-dead and nix-store --gc --print-dead disagree");
        }
        a.push(r1);
        b.push(r2);
    }
    println!("{}", row(&format!("print-dead, {paths} paths"), &a, &b));

    let (mut a, mut b) = (vec![], vec![]);
    for _ in 0..ROUNDS {
        copy_tree(&template, &work.root)?;
        let r1 = timed(&work, nixb, &["gc"])?;
        let left_nixb = entries(&work.root.join("store"))?;
        copy_tree(&template, &work.root)?;
        let r2 = timed(&work, nix_store, &["--gc"])?;
        let left_nix = entries(&work.root.join("store"))?;
        if left_nixb != left_nix {
            bail!("nixb gc and nix-store --gc left different stores");
        }
        a.push(r1);
        b.push(r2);
    }
    println!(
        "{}",
        row(&format!("full collection, {paths} paths"), &a, &b)
    );
    let _ = std::fs::remove_dir_all(&work.root);
    let _ = Command::new("chmod")
        .arg("-R")
        .arg("u+w")
        .arg(&template)
        .status();
    let _ = std::fs::remove_dir_all(&template);
    if big == 0 {
        return Ok(());
    }

    // Rows only at both sizes, so that the two scale rows compare like with like.
    for size in [paths, big] {
        scale_rows(dir, nixb, size)?;
    }
    Ok(())
}

/// print-dead and a full collection on a store of `size` rows without files.
fn scale_rows(dir: &Path, nixb: &Path, size: usize) -> Result<()> {
    let store = Store {
        root: dir.join("rows"),
    };
    let template = dir.join("rows-template");
    let t = Instant::now();
    generate(&store.root, size, false)?;
    eprintln!(
        "generated {size} rows in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    copy_tree(&store.root, &template)?;
    let mut a = vec![];
    for _ in 0..ROUNDS {
        a.push(timed(&store, nixb, &["gc", "--print-dead"])?);
    }
    println!(
        "{}",
        row(&format!("print-dead, {size} paths (rows only)"), &a, &[])
    );
    let mut a = vec![];
    for _ in 0..ROUNDS {
        copy_tree(&template, &store.root)?;
        a.push(timed(&store, nixb, &["gc"])?);
    }
    println!(
        "{}",
        row(
            &format!("full collection, {size} paths (rows only)"),
            &a,
            &[]
        )
    );
    for d in [&store.root, &template] {
        let _ = Command::new("chmod").arg("-R").arg("u+w").arg(d).status();
        let _ = std::fs::remove_dir_all(d);
    }
    Ok(())
}

fn entries(dir: &Path) -> Result<std::collections::BTreeSet<String>> {
    let mut s = std::collections::BTreeSet::new();
    for e in std::fs::read_dir(dir)? {
        s.insert(e?.file_name().to_string_lossy().into_owned());
    }
    s.remove(".links");
    Ok(s)
}
