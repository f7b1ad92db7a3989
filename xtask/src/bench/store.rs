//! Bench group `store`: NAR hashing, dump/restore and reference scanning, nixb against
//! `openssl speed -evp sha256` (the sha256 ceiling on this machine) and Nix 2.8.
//!
//! ```text
//! NAR sha256 of a 1 GiB file          nixb hash path  vs  nix hash path  vs  openssl
//! NAR sha256 of 10,000 small files    nixb hash path  vs  nix hash path
//! reference scan, 1,000 candidates    in memory (binary / base32-heavy text), and
//!                                     scan_path of the 1 GiB file (dump + sha256 + scan)
//! peak RSS                            dump / restore / hash of the 1 GiB file, nixb and Nix
//! ```
//!
//! Every job runs in its own process under `/usr/bin/time -f %M` (peak RSS of that process
//! alone). nixb's side is the release `nixb` binary when it builds, else the store crate's
//! `nar_bench` example (same library code); scanning always uses the example. Files live in
//! a temp dir that is removed afterwards; Nix runs against a private store there.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

const GIB: u64 = 1 << 30;

struct Run {
    secs: f64,
    rss_mib: f64,
    stdout: String,
    stderr: String,
}

struct Env {
    dir: PathBuf,
}

impl Env {
    /// Runs `cmd` under /usr/bin/time, stdin from `stdin` (or null), stdout to `stdout_to`
    /// (or captured), timing it from spawn to exit.
    fn run(
        &self,
        cmd: &[&std::ffi::OsStr],
        stdin: Option<&Path>,
        stdout_to: Option<&Path>,
    ) -> Result<Run> {
        let rss_file = self.dir.join("rss.txt");
        let mut c = Command::new("/usr/bin/time");
        c.arg("-f").arg("%M").arg("-o").arg(&rss_file).args(cmd);
        let t = self.dir.join("nix");
        c.env("NIX_STORE_DIR", t.join("store"))
            .env("NIX_STATE_DIR", t.join("state"))
            .env("NIX_LOG_DIR", t.join("log"))
            .env("NIX_CONF_DIR", t.join("etc"));
        c.stdin(match stdin {
            Some(p) => Stdio::from(std::fs::File::open(p)?),
            None => Stdio::null(),
        });
        c.stdout(match stdout_to {
            Some(p) => Stdio::from(std::fs::File::create(p)?),
            None => Stdio::piped(),
        });
        c.stderr(Stdio::piped());
        let start = Instant::now();
        let out = c.output().with_context(|| format!("running {cmd:?}"))?;
        let secs = start.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let rss_kb: f64 = std::fs::read_to_string(&rss_file)?
            .lines()
            .last()
            .unwrap_or("")
            .trim()
            .parse()
            .with_context(|| format!("reading peak RSS from {}", rss_file.display()))?;
        Ok(Run {
            secs,
            rss_mib: rss_kb / 1024.0,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

fn os(s: &str) -> &std::ffi::OsStr {
    s.as_ref()
}

/// Throughput in GB/s (10^9 bytes) of the largest block size `openssl speed` reports.
fn openssl_sha256_gbps() -> Result<f64> {
    let out = Command::new("openssl")
        .args(["speed", "-seconds", "3", "-evp", "sha256"])
        .stderr(Stdio::null())
        .output()
        .context("running openssl speed (is openssl installed?)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "sha256  71779.61k  225645.57k ... 1279787.01k": 1000s of bytes per second.
    let line = text
        .lines()
        .rfind(|l| l.starts_with("sha256") || l.starts_with("SHA256"))
        .context("no sha256 line in openssl speed output")?;
    let last = line
        .split_whitespace()
        .last()
        .context("empty openssl line")?;
    let k: f64 = last
        .trim_end_matches('k')
        .parse()
        .context("parsing openssl speed output")?;
    Ok(k * 1000.0 / 1e9)
}

/// Seeded, so a failing case reproduces.
struct Rng(fastrand::Rng);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.u64(..)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        self.0.fill(buf)
    }
}

fn make_big_file(p: &Path) -> Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(p)?);
    let mut rng = Rng(fastrand::Rng::with_seed(1));
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..GIB >> 20 {
        rng.fill(&mut buf);
        f.write_all(&buf)?;
    }
    f.flush()?;
    Ok(())
}

/// 100 directories of 100 files, 0..4 KiB each, one in ten executable.
fn make_small_tree(p: &Path) -> Result<u64> {
    use std::os::unix::fs::PermissionsExt;
    let mut rng = Rng(fastrand::Rng::with_seed(2));
    let mut bytes = 0;
    for d in 0..100 {
        let dir = p.join(format!("dir-{d:03}"));
        std::fs::create_dir_all(&dir)?;
        for i in 0..100 {
            let n = (rng.next() % 4096) as usize;
            let mut buf = vec![0u8; n];
            rng.fill(&mut buf);
            let f = dir.join(format!("file-{i:03}"));
            std::fs::write(&f, &buf)?;
            if i % 10 == 0 {
                std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755))?;
            }
            bytes += n as u64;
        }
    }
    Ok(bytes)
}

fn refs(v: &[std::ffi::OsString]) -> Vec<&std::ffi::OsStr> {
    v.iter().map(|s| s.as_os_str()).collect()
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

pub fn run() -> Result<()> {
    let root = crate::workspace_root();
    if !Path::new("/usr/bin/time").exists() {
        bail!("/usr/bin/time is needed to read peak RSS (Debian package 'time')");
    }
    let status = Command::new(env!("CARGO"))
        .current_dir(&root)
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "nixb-store",
            "--example",
            "nar_bench",
        ])
        .status()?;
    if !status.success() {
        bail!("building the nar_bench example (release) failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let example = target.join("release/examples/nar_bench");
    let nixb = match crate::build_nixb_release(&root) {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!(
                "note: nixb (release) did not build ({e}); using the nar_bench example instead"
            );
            None
        }
    };

    let dir = std::env::temp_dir().join(format!("nixb-bench-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("nix/etc"))?;
    std::fs::write(
        dir.join("nix/etc/nix.conf"),
        "sandbox = false\nbuild-users-group =\n",
    )?;
    let env = Env { dir: dir.clone() };
    let res = measure(&env, &example, nixb.as_deref());
    let _ = std::fs::remove_dir_all(&dir);
    res
}

fn measure(env: &Env, example: &Path, nixb: Option<&Path>) -> Result<()> {
    let dir = &env.dir;
    let big = dir.join("big");
    let tree = dir.join("tree");
    eprintln!(
        "preparing a 1 GiB file and a tree of 10,000 small files in {}",
        dir.display()
    );
    make_big_file(&big)?;
    let tree_bytes = make_small_tree(&tree)?;

    let ex = example.as_os_str();
    // nixb's own commands, or the example's equivalents.
    let hash_cmd = |p: &Path| -> Vec<std::ffi::OsString> {
        match nixb {
            Some(n) => vec![
                n.into(),
                "hash".into(),
                "path".into(),
                "--base32".into(),
                p.into(),
            ],
            None => vec![ex.into(), "hash-path".into(), p.into()],
        }
    };
    let dump_cmd = |p: &Path| -> Vec<std::ffi::OsString> {
        match nixb {
            Some(n) => vec![n.into(), "dump".into(), p.into()],
            None => vec![ex.into(), "dump".into(), p.into()],
        }
    };
    let restore_cmd = |p: &Path| -> Vec<std::ffi::OsString> {
        match nixb {
            Some(n) => vec![n.into(), "restore".into(), p.into()],
            None => vec![ex.into(), "restore".into(), p.into()],
        }
    };
    let nix_hash = |p: &Path| -> Vec<std::ffi::OsString> {
        [
            "nix",
            "--extra-experimental-features",
            "nix-command",
            "hash",
            "path",
            "--base32",
            "--type",
            "sha256",
        ]
        .iter()
        .map(|s| s.into())
        .chain([p.as_os_str().to_owned()])
        .collect()
    };

    let openssl = openssl_sha256_gbps()?;

    // Warm the page cache so both sides read from memory.
    env.run(&refs(&hash_cmd(&big)), None, None)?;
    let ours_big = env.run(&refs(&hash_cmd(&big)), None, None)?;
    let nix_big = env.run(&refs(&nix_hash(&big)), None, None)?;
    if ours_big
        .stdout
        .split_whitespace()
        .next()
        .map(|h| h.trim_start_matches("sha256:"))
        != nix_big.stdout.split_whitespace().next()
    {
        bail!(
            "hash mismatch: nixb {} vs nix {}",
            ours_big.stdout.trim(),
            nix_big.stdout.trim()
        );
    }
    env.run(&refs(&hash_cmd(&tree)), None, None)?;
    let ours_tree = env.run(&refs(&hash_cmd(&tree)), None, None)?;
    let nix_tree = env.run(&refs(&nix_hash(&tree)), None, None)?;

    let scan_bin = env.run(
        &[ex, os("scan-mem"), os("64"), os("1024"), os("binary")],
        None,
        None,
    )?;
    let scan_txt = env.run(
        &[ex, os("scan-mem"), os("64"), os("1024"), os("base32text")],
        None,
        None,
    )?;
    let scan_path = env.run(&[ex, os("scan-path"), big.as_os_str()], None, None)?;

    let nar = dir.join("big.nar");
    let dump = env.run(&refs(&dump_cmd(&big)), None, Some(&nar))?;
    let nar_size = std::fs::metadata(&nar)?.len();
    let restore = env.run(&refs(&restore_cmd(&dir.join("restored"))), Some(&nar), None)?;
    let nix_dump = env.run(
        &[os("nix-store"), os("--dump"), big.as_os_str()],
        None,
        Some(&dir.join("nix.nar")),
    )?;
    let nix_restore = env.run(
        &[
            os("nix-store"),
            os("--restore"),
            dir.join("nix-restored").as_os_str(),
        ],
        Some(&nar),
        None,
    )?;

    let side = if nixb.is_some() { "nixb" } else { "nar_bench" };
    println!("openssl speed -evp sha256 (16 KiB blocks): {openssl:.2} GB/s");
    println!();
    println!(
        "{:<44} {:>8} {:>9} {:>10} {:>9}",
        "job", "seconds", "GB/s", "vs openssl", "peak MiB"
    );
    let row = |name: &str, r: &Run, bytes: u64| {
        let g = gbps(bytes, r.secs);
        println!(
            "{:<44} {:>8.3} {:>9.2} {:>10.2} {:>9.1}",
            name,
            r.secs,
            g,
            g / openssl,
            r.rss_mib
        );
    };
    row(
        &format!("{side} hash path, 1 GiB file"),
        &ours_big,
        nar_size,
    );
    row("nix hash path, 1 GiB file", &nix_big, nar_size);
    row(
        &format!("{side} hash path, 10,000 files (payload)"),
        &ours_tree,
        tree_bytes,
    );
    row(
        "nix hash path, 10,000 files (payload)",
        &nix_tree,
        tree_bytes,
    );
    row(&format!("{side} dump, 1 GiB file"), &dump, nar_size);
    row("nix-store --dump, 1 GiB file", &nix_dump, nar_size);
    row(&format!("{side} restore, 1 GiB file"), &restore, nar_size);
    row("nix-store --restore, 1 GiB file", &nix_restore, nar_size);
    row(
        "scan_path (dump+sha256+scan), 1 GiB, 1000 cands",
        &scan_path,
        nar_size,
    );
    println!();
    for (name, r) in [("binary", &scan_bin), ("base32-heavy text", &scan_txt)] {
        // The job reports its scanning time alone (without building the buffer).
        let secs: f64 = r
            .stderr
            .lines()
            .find_map(|l| l.strip_prefix("elapsed_s=").and_then(|v| v.parse().ok()))
            .unwrap_or(r.secs);
        println!(
            "RefScanner, 1 GiB of {name} in memory, 1000 candidates: {:.2} GB/s",
            gbps(GIB, secs)
        );
    }
    println!();
    println!(
        "ratios: hash 1 GiB nixb/nix = {:.2}x, hash 10k files nixb/nix = {:.2}x (time ratio nix/nixb)",
        nix_big.secs / ours_big.secs,
        nix_tree.secs / ours_tree.secs
    );
    Ok(())
}
