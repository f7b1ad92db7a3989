//! Bench group `engine`: realising graphs of trivial derivations, nixb vs `nix-store -r`
//! (Nix 2.8), unsandboxed, `--max-jobs 2`, each on its own fresh private store made by
//! `nix-instantiate` from the same expression. Also the no-op realise of the built graph,
//! peak RSS, and the bare cost of fork+exec of the same builders for reference: two at a
//! time (`bare`) and one at a time (`bare1`, the floor for a chain, whose builds cannot
//! overlap).
//!
//! Stores are kept until the end of the run instead of being deleted after each row: on
//! this ext4 without a journal, deleting thousands of files makes every file creation in
//! the next minutes scan past the freed inodes, which would slow the rows that follow (Nix
//! and nixb alike) by an amount that depends on the row order.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Trivial builders: one fork+exec of /bin/sh each, writing a small file.
fn expr(shape: &str, n: usize) -> String {
    let mk = r#"mk = name: deps: derivation {
    inherit name deps; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" "echo $name > $out" ]; };
  # The same, with its deps handed over in a file: thousands of store paths in one
  # variable exceed exec's limit (E2BIG).
  mkf = name: deps: derivation {
    inherit name deps; system = builtins.currentSystem; builder = "/bin/sh";
    passAsFile = [ "deps" ]; args = [ "-c" "echo $name > $out" ]; };"#;
    let body = match shape {
        // d0 <- d1 <- ... <- d(n-1)
        "chain" => format!(
            "builtins.foldl' (prev: i: mk \"d${{toString i}}\" [ prev ]) (mk \"d0\" [ ]) (builtins.genList (i: i + 1) {})",
            n - 1
        ),
        // n-1 leaves under one top
        "leaves" => format!(
            "mkf \"top\" (builtins.genList (i: mk \"leaf${{toString i}}\" [ ]) {})",
            n - 1
        ),
        // layers of 25, each node depending on 3 nodes of the layer below
        "layered" => return super::layered_graph("", n / 25, true),
        _ => unreachable!("unknown shape"),
    };
    format!("let {mk} in {body}\n")
}

struct Store {
    root: PathBuf,
}

impl Store {
    fn new(tag: &str) -> Result<Store> {
        let root = std::env::temp_dir().join(format!("nixb-bench-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("etc"))?;
        std::fs::write(
            root.join("etc/nix.conf"),
            "sandbox = false\nbuild-users-group =\nsubstituters =\n",
        )?;
        Ok(Store { root })
    }

    fn cmd(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        super::store_env(&mut c, &self.root);
        c.stdout(Stdio::null()).stderr(Stdio::null());
        c
    }

    fn instantiate(&self, expr: &str) -> Result<String> {
        let f = self.root.join("graph.nix");
        std::fs::write(&f, expr)?;
        let out = super::instantiate(self.cmd(Path::new("nix-instantiate")).arg(&f))?;
        Ok(out.trim().to_string())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Runs a command, returning wall time and the child's peak RSS in KiB.
fn measure(mut cmd: Command) -> Result<(Duration, i64)> {
    let t = Instant::now();
    let child = cmd.spawn().context("spawning benchmark command")?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain old data; wait4 fills it for our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our unreaped child; `status` and `ru` are writable.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let wall = t.elapsed();
    if r != pid {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        bail!("benchmark command {:?} failed (wait status {status})", cmd);
    }
    Ok((wall, ru.ru_maxrss))
}

/// N fork+execs of the same trivial builder, `parallel` at a time, each creating its output
/// file in a directory of the row's own (`tag`): the builders nixb runs create a new store
/// path each, and a file that exists already (left by an earlier row) would be truncated
/// instead, which on this ext4 skips the inode allocation that costs the real builders up
/// to a millisecond after many deletions.
fn bare_fork_exec(n: usize, parallel: usize, root: &Path, tag: &str) -> Result<Duration> {
    let dir = root.join(format!("{tag}-{parallel}-{n}"));
    std::fs::create_dir_all(&dir)?;
    let t = Instant::now();
    let mut running = Vec::new();
    for i in 0..n {
        if running.len() == parallel {
            let mut c: std::process::Child = running.remove(0);
            c.wait()?;
        }
        running.push(
            Command::new("/bin/sh")
                .args(["-c", "echo $name > $out"])
                .env("name", format!("d{i}"))
                .env("out", dir.join(format!("o{i}")))
                .spawn()?,
        );
    }
    for mut c in running {
        c.wait()?;
    }
    let wall = t.elapsed();
    // Deleted with the stores at the end (see the module doc).
    Ok(wall)
}

fn tempfile_dir(tag: &str) -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("nixb-bench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

pub fn run() -> Result<()> {
    let root = crate::workspace_root();
    let nixb = crate::build_nixb_release(&root)?;
    let sizes: Vec<usize> = std::env::var("NIXB_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![100, 1000]);
    println!(
        "{:<8} {:>6} {:>10} {:>10} {:>7} {:>9} {:>9} {:>10} {:>10} {:>10} {:>9} {:>9}",
        "shape",
        "N",
        "nix ms",
        "nixb ms",
        "ratio",
        "nix/drv",
        "nixb/drv",
        "bare ms",
        "bare1 ms",
        "noop nix",
        "noop nixb",
        "RSS n/b MiB"
    );
    // Every store made, deleted when the run is over (see the module doc).
    let mut stores: Vec<Store> = Vec::new();
    let bare_root = tempfile_dir("bare")?;
    // NIXB_BENCH_SHAPES=chain,leaves picks shapes (Nix takes many minutes for 10,000 leaves).
    let shapes: Vec<String> = std::env::var("NIXB_BENCH_SHAPES")
        .ok()
        .map(|s| {
            s.split(',')
                .map(|x| x.trim().to_string())
                .filter(|x| ["chain", "leaves", "layered", "chatty"].contains(&x.as_str()))
                .collect()
        })
        .unwrap_or_else(|| {
            vec![
                "chain".into(),
                "leaves".into(),
                "layered".into(),
                "chatty".into(),
            ]
        });
    for shape in shapes.iter().map(String::as_str).filter(|s| *s != "chatty") {
        for &n in &sizes {
            let e = expr(shape, n);
            let nix_store = Store::new("nix")?;
            let nixb_store = Store::new("nixb")?;
            let drv_a = nix_store.instantiate(&e)?;
            let drv_b = nixb_store.instantiate(&e)?;
            // nixb first: Nix deletes its lock files and build directories as it goes,
            // and thousands of inodes freed just before a run slow every file creation
            // in it (see the module doc); nixb frees almost none, so in this order each
            // engine pays only for its own deletions.
            let mut c = nixb_store.cmd(&nixb);
            c.args(["realise", &drv_b, "--max-jobs", "2"]);
            let (nixb_t, nixb_rss) = measure(c)?;
            let mut c = nix_store.cmd(Path::new("nix-store"));
            c.args(["-r", &drv_a, "--max-jobs", "2"]);
            let (nix_t, nix_rss) = measure(c)?;
            let mut c = nix_store.cmd(Path::new("nix-store"));
            c.args(["-r", &drv_a, "--max-jobs", "2"]);
            let (nix_noop, _) = measure(c)?;
            let mut c = nixb_store.cmd(&nixb);
            c.args(["realise", &drv_b, "--max-jobs", "2"]);
            let (nixb_noop, _) = measure(c)?;
            let bare = bare_fork_exec(n, 2, &bare_root, shape)?;
            let bare1 = bare_fork_exec(n, 1, &bare_root, shape)?;
            stores.push(nix_store);
            stores.push(nixb_store);
            let ms = |d: Duration| d.as_secs_f64() * 1000.0;
            println!(
                "{:<8} {:>6} {:>10.0} {:>10.0} {:>6.1}x {:>8.2}ms {:>8.2}ms {:>10.0} {:>10.0} {:>10.1} {:>9.1} {:>5.0}/{:<5.0}",
                shape,
                n,
                ms(nix_t),
                ms(nixb_t),
                ms(nix_t) / ms(nixb_t),
                ms(nix_t) / n as f64,
                ms(nixb_t) / n as f64,
                ms(bare),
                ms(bare1),
                ms(nix_noop),
                ms(nixb_noop),
                nix_rss as f64 / 1024.0,
                nixb_rss as f64 / 1024.0,
            );
        }
    }
    if shapes.iter().any(|s| s == "chatty") {
        chatty(&nixb)?;
    }
    drop(stores);
    let _ = std::fs::remove_dir_all(&bare_root);
    Ok(())
}

/// A chatty builder (about 86 MiB of base64 on stdout, which bzip2 compresses at only a few
/// MB/s here) next to a chain of 100 trivial builds, `--max-jobs 2`. The chain's finish time
/// is taken from the `@ build-succeeded` trace lines as they arrive (`-q` keeps the log itself
/// off stderr, so the measurement is not about rendering 86 MiB). If compression ran on the worker's
/// loop, the chain would wait for it; with compression on its own thread the chain finishes
/// as fast as with `compress-build-log = false`.
pub fn chatty(nixb: &Path) -> Result<()> {
    let e = r#"let
  mk = name: deps: derivation {
    inherit name deps; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" "echo $name > $out" ]; };
  chatty = derivation {
    name = "chatty"; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" "/usr/bin/head -c 67108864 /dev/urandom | /usr/bin/base64; echo > $out" ]; };
  chain = builtins.foldl' (prev: i: mk "c${toString i}" [ prev ]) (mk "c0" [ ]) (builtins.genList (i: i + 1) 99);
in [ chatty chain ]
"#;
    println!();
    println!("chatty builder (86 MiB of log) beside a chain of 100 trivial builds, --max-jobs 2:");
    println!(
        "{:<22} {:>14} {:>14} {:>12}",
        "compress-build-log", "chain done ms", "chatty done ms", "total ms"
    );
    for compress in ["false", "true"] {
        let store = Store::new(&format!("chatty-{compress}"))?;
        let drvs = store.instantiate(e)?;
        let drvs: Vec<&str> = drvs.lines().collect();
        let mut c = store.cmd(nixb);
        c.args([
            "realise",
            "--print-build-trace",
            "-q",
            "--max-jobs",
            "2",
            "--option",
            "compress-build-log",
            compress,
        ])
        .args(&drvs)
        .stderr(Stdio::piped());
        let t = Instant::now();
        let mut child = c.spawn().context("spawning nixb realise")?;
        let stderr = child.stderr.take().context("stderr")?;
        let (mut chain_done, mut chatty_done) = (None, None);
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
            let line = line?;
            if !line.starts_with("@ build-succeeded ") {
                continue;
            }
            if line.contains("-c99.drv") {
                chain_done = Some(t.elapsed());
            } else if line.contains("-chatty.drv") {
                chatty_done = Some(t.elapsed());
            }
        }
        let status = child.wait()?;
        let total = t.elapsed();
        if !status.success() {
            bail!("nixb realise of the chatty graph failed ({status})");
        }
        let ms = |d: Option<Duration>| {
            d.map(|d| format!("{:.0}", d.as_secs_f64() * 1000.0))
                .unwrap_or("-".into())
        };
        println!(
            "{:<22} {:>14} {:>14} {:>12.0}",
            compress,
            ms(chain_done),
            ms(chatty_done),
            total.as_secs_f64() * 1000.0
        );
    }
    Ok(())
}
