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
//! scale      nixb gc --print-dead on 1,000,000 registered paths (rows only, no files:
//!            the collector's memory is the graph's), peak RSS and time vs 100,000
//! ```
//!
//! The store lives on /dev/shm when it exists, so that the figures are the collectors'
//! work rather than a shared disk's. Rows are written straight into the database (no
//! NAR hashing: neither collector reads hashes). Each job runs under `/usr/bin/time -f %M`.

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
            .arg("%M")
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

/// Seconds, peak RSS in MiB, stdout.
fn timed(store: &Store, program: &Path, args: &[&str]) -> Result<(f64, f64, String)> {
    let rss = store.root.join("rss.txt");
    let start = Instant::now();
    let out = store
        .command(program, args, &rss)
        .output()
        .with_context(|| format!("running {} {args:?}", program.display()))?;
    let secs = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "{} {args:?} failed: {}",
            program.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let kb: f64 = std::fs::read_to_string(&rss)?
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .parse()
        .context("reading peak RSS")?;
    Ok((
        secs,
        kb / 1024.0,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
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
    let _ = Command::new("chmod").arg("-R").arg("u+w").arg(to).status();
    let _ = std::fs::remove_dir_all(to);
    let st = Command::new("cp").arg("-a").arg(from).arg(to).status()?;
    if !st.success() {
        bail!("cp -a {} {} failed", from.display(), to.display());
    }
    Ok(())
}

pub fn run() -> Result<()> {
    let root = crate::workspace_root();
    if !Path::new("/usr/bin/time").exists() {
        bail!("/usr/bin/time is needed to read peak RSS (Debian package 'time')");
    }
    let nixb = crate::build_nixb_release(&root)?;
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
    // Store paths embed the store directory: generate where the collectors run, and keep
    // a copy to restore from.
    let work = Store {
        root: dir.join("work"),
    };
    let template = dir.join("template");
    let t = Instant::now();
    generate(&work.root, PATHS, true)?;
    eprintln!(
        "generated {PATHS} paths in {:.1} s under {}",
        t.elapsed().as_secs_f64(),
        dir.display()
    );
    copy_tree(&work.root, &template)?;

    println!("| measurement | nixb (s) | nix-store (s) | nix/nixb | nixb peak RSS (MiB) | nix peak RSS (MiB) |");
    println!("|---|---|---|---|---|---|");
    let (mut a, mut b, mut ra, mut rb) = (vec![], vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        let (s1, r1, o1) = timed(&work, nixb, &["gc", "--print-dead"])?;
        let (s2, r2, o2) = timed(&work, nix_store, &["--gc", "--print-dead"])?;
        if o1 != o2 {
            bail!("nixb gc --print-dead and nix-store --gc --print-dead disagree");
        }
        a.push(s1);
        b.push(s2);
        ra.push(r1);
        rb.push(r2);
    }
    let (ma, mb) = (median(a), median(b));
    println!(
        "| print-dead, {PATHS} paths | {ma:.2} | {mb:.2} | {:.1}x | {:.0} | {:.0} |",
        mb / ma,
        median(ra),
        median(rb)
    );

    let (mut a, mut b, mut ra, mut rb) = (vec![], vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        copy_tree(&template, &work.root)?;
        let (s1, r1, _) = timed(&work, nixb, &["gc"])?;
        let left_nixb = entries(&work.root.join("store"))?;
        copy_tree(&template, &work.root)?;
        let (s2, r2, _) = timed(&work, nix_store, &["--gc"])?;
        let left_nix = entries(&work.root.join("store"))?;
        if left_nixb != left_nix {
            bail!("nixb gc and nix-store --gc left different stores");
        }
        a.push(s1);
        b.push(s2);
        ra.push(r1);
        rb.push(r2);
    }
    let (ma, mb) = (median(a), median(b));
    println!(
        "| full collection, {PATHS} paths | {ma:.2} | {mb:.2} | {:.1}x | {:.0} | {:.0} |",
        mb / ma,
        median(ra),
        median(rb)
    );
    let _ = std::fs::remove_dir_all(&work.root);
    let _ = Command::new("chmod")
        .arg("-R")
        .arg("u+w")
        .arg(&template)
        .status();
    let _ = std::fs::remove_dir_all(&template);

    let big = Store {
        root: dir.join("big"),
    };
    let t = Instant::now();
    generate(&big.root, BIG, false)?;
    eprintln!("generated {BIG} rows in {:.1} s", t.elapsed().as_secs_f64());
    let (mut a, mut ra) = (vec![], vec![]);
    for _ in 0..ROUNDS {
        let (s, r, _) = timed(&big, nixb, &["gc", "--print-dead"])?;
        a.push(s);
        ra.push(r);
    }
    println!(
        "| print-dead, {BIG} paths (rows only) | {:.2} | - | - | {:.0} | - |",
        median(a),
        median(ra)
    );
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
