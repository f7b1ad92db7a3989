//! Bench group `tuning`: this tree's nixb against another build of it
//! (`NIXB_BENCH_VS=<path>`), with the store, state, log and build directories on a file
//! system of each kind. Needs root (loop mounts) and `mkfs.ext4`, `mkfs.xfs`, `mkfs.btrfs`.
//!
//! For each file system a fresh 2 GiB image (`mkfs.ext4` with its default journal,
//! `mkfs.xfs`, `mkfs.btrfs`; loop-mounted) or a tmpfs is mounted, and each graph (a chain of
//! `NIXB_BENCH_DRVS` (default 1000) trivial builds, a layered graph of as many, and sandboxed
//! layered builds of half as many, 25 a layer, 3 inputs each, `--max-jobs 2`) is realised
//! from a fresh copy of one instantiated store by this tree's nixb (A) and the other (B) in
//! turn, A B A B ..., the ratio B/A taken pair by pair (above 1: this tree is faster). Only
//! `nixb realise` is timed; the copy, the deletion of the previous run's store and a `sync`
//! come before.
//!
//! `NIXB_BENCH_FS=ext4,xfs,btrfs,tmpfs` picks file systems, `NIXB_BENCH_ROUNDS` (default 7)
//! the pairs, `NIXB_BENCH_NIXB=<path>` a build to take as A instead of this tree's (to
//! compare two older builds, as when bisecting). Images go to `/var/tmp` (not a tmpfs here) and are deleted at the end.
//!
//! The disk-specific mechanisms this bench once switched off one by one (a lock-file pool,
//! recycled build directories, log files made on a helper thread, a spin and a cache
//! warm-up in the sandbox's lower layer) were measured here and removed: BENCHMARKS.md,
//! "tuning on real file systems".

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::resource::{getrusage, UsageWho};

use super::{env_number, median};

const FILE_SYSTEMS: &[&str] = &["ext4", "xfs", "btrfs", "tmpfs"];

fn list(var: &str, known: &[&str]) -> Result<Vec<String>> {
    match std::env::var(var) {
        Err(_) => Ok(known.iter().map(|s| s.to_string()).collect()),
        Ok(v) => v
            .split(',')
            .map(|s| s.trim().to_string())
            .map(|s| {
                if known.contains(&s.as_str()) {
                    Ok(s)
                } else {
                    bail!("{var}: unknown '{s}' (known: {})", known.join(", "))
                }
            })
            .collect(),
    }
}

fn run_cmd(c: &mut Command) -> Result<()> {
    super::run_checked(c.stdout(Stdio::null()))
}

/// A mounted file system, unmounted (and its image deleted) on drop.
struct Mount {
    dir: PathBuf,
    image: Option<PathBuf>,
}

impl Mount {
    fn new(fs: &str, base: &Path) -> Result<Mount> {
        let dir = base.join(fs);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        if fs == "tmpfs" {
            run_cmd(
                Command::new("mount")
                    .args(["-t", "tmpfs", "-o", "size=2g", "tmpfs"])
                    .arg(&dir),
            )?;
            return Ok(Mount { dir, image: None });
        }
        let image = PathBuf::from(format!(
            "/var/tmp/nixb-bench-tuning-{}-{fs}.img",
            std::process::id()
        ));
        let f = std::fs::File::create(&image)
            .with_context(|| format!("creating {}", image.display()))?;
        f.set_len(2 << 30)
            .with_context(|| format!("sizing {}", image.display()))?;
        drop(f);
        // Unmounted and deleted by drop from here on, whatever fails next.
        let mount = Mount {
            dir,
            image: Some(image.clone()),
        };
        let mkfs = format!("mkfs.{fs}");
        let force = if fs == "ext4" { "-F" } else { "-f" };
        run_cmd(Command::new(&mkfs).args([force, "-q"]).arg(&image))
            .with_context(|| format!("{mkfs} (package e2fsprogs, xfsprogs or btrfs-progs)"))?;
        run_cmd(
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&image)
                .arg(&mount.dir),
        )?;
        Ok(mount)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let mounted = Command::new("mountpoint")
            .arg("-q")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if mounted {
            if let Err(e) = run_cmd(Command::new("umount").arg(&self.dir)) {
                eprintln!("warning: {e:#}; {} is still mounted", self.dir.display());
                return;
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
        if let Some(img) = &self.image {
            let _ = std::fs::remove_file(img);
        }
    }
}

/// One store on the mounted file system, instantiated once and copied afresh for each run.
struct Graph {
    template: PathBuf,
    run: PathBuf,
    drv: String,
}

fn store_env(c: &mut Command, root: &Path) {
    super::store_env(c, root);
    c.env("TMPDIR", root.join("tmp"));
    c.env_remove("NIXB_BENCH_PLAIN");
}

impl Graph {
    fn new(mnt: &Path, tag: &str, expr: &str, conf: &str) -> Result<Graph> {
        let run = mnt.join("run");
        let template = mnt.join(format!("template-{tag}"));
        let _ = std::fs::remove_dir_all(&run);
        for d in ["etc", "tmp"] {
            std::fs::create_dir_all(run.join(d))?;
        }
        std::fs::write(run.join("etc/nix.conf"), conf)?;
        std::fs::write(run.join("graph.nix"), expr)?;
        let mut c = Command::new("nix-instantiate");
        store_env(&mut c, &run);
        let out = c
            .arg(run.join("graph.nix"))
            .stderr(Stdio::inherit())
            .output()
            .context("running nix-instantiate")?;
        if !out.status.success() {
            bail!("nix-instantiate of the {tag} graph failed");
        }
        let drv = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let _ = std::fs::remove_dir_all(&template);
        run_cmd(Command::new("cp").arg("-a").arg(&run).arg(&template))?;
        Ok(Graph { template, run, drv })
    }

    /// Realises the graph in a fresh copy; returns wall and CPU (user + system) time.
    fn realise(&self, nixb: &Path) -> Result<(Duration, Duration)> {
        run_cmd(Command::new("rm").arg("-rf").arg(&self.run))?;
        run_cmd(
            Command::new("cp")
                .arg("-a")
                .arg(&self.template)
                .arg(&self.run),
        )?;
        run_cmd(&mut Command::new("sync"))?;
        let mut c = Command::new(nixb);
        store_env(&mut c, &self.run);
        c.args(["realise", &self.drv, "--max-jobs", "2"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let cpu = || -> Result<Duration> {
            let u = getrusage(UsageWho::RUSAGE_CHILDREN)?;
            let us = |t: nix::sys::time::TimeVal| {
                Duration::from_micros(t.tv_sec() as u64 * 1_000_000 + t.tv_usec() as u64)
            };
            Ok(us(u.user_time()) + us(u.system_time()))
        };
        let cpu0 = cpu()?;
        let t = Instant::now();
        let out = c.output().context("running nixb realise")?;
        let wall = t.elapsed();
        let cpu = cpu()? - cpu0;
        if !out.status.success() {
            bail!(
                "nixb realise ({}) failed: {}",
                nixb.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok((wall, cpu))
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.run);
        let _ = std::fs::remove_dir_all(&self.template);
    }
}

fn chain(n: usize) -> String {
    format!(
        "let mk = name: deps: derivation {{ inherit name deps; system = builtins.currentSystem; \
         builder = \"/bin/sh\"; args = [ \"-c\" \"echo $name > $out\" ]; }}; \
         in builtins.foldl' (prev: i: mk \"d${{toString i}}\" [ prev ]) (mk \"d0\" [ ]) \
         (builtins.genList (i: i + 1) {})\n",
        n - 1
    )
}

fn layered(n: usize) -> String {
    super::layered_graph("", n.max(50) / 25, true)
}

/// Realises `graph` with A and B in turn, `rounds` pairs after one warm-up run each, and
/// prints the row.
fn pairs(
    fs: &str,
    what: &str,
    graph: &Graph,
    label: &str,
    a: &Path,
    b: &Path,
    rounds: usize,
) -> Result<()> {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (mut aw, mut bw, mut ac, mut bc, mut ratios, mut cratios) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    graph.realise(a)?;
    graph.realise(b)?;
    for _ in 0..rounds {
        let (a_wall, a_cpu) = graph.realise(a)?;
        let (b_wall, b_cpu) = graph.realise(b)?;
        ratios.push(ms(b_wall) / ms(a_wall));
        cratios.push(ms(b_cpu) / ms(a_cpu));
        aw.push(ms(a_wall));
        bw.push(ms(b_wall));
        ac.push(ms(a_cpu));
        bc.push(ms(b_cpu));
    }
    let (lo, hi) = ratios
        .iter()
        .fold((f64::MAX, f64::MIN), |(l, h), r| (l.min(*r), h.max(*r)));
    println!(
        "{:<6} {:<14} {:<16} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>8.3} {:>13} {:>8.3}",
        fs,
        what,
        label,
        median(aw),
        median(bw),
        median(ac),
        median(bc),
        median(ratios),
        format!("({lo:.2}-{hi:.2})"),
        median(cratios),
    );
    Ok(())
}

pub fn run() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("bench tuning mounts file systems: run it as root");
    }
    let systems = list("NIXB_BENCH_FS", FILE_SYSTEMS)?;
    let rounds = env_number("NIXB_BENCH_ROUNDS", 7)?;
    let n = env_number("NIXB_BENCH_DRVS", 1000)?;
    let Some(other) = std::env::var_os("NIXB_BENCH_VS").map(PathBuf::from) else {
        bail!("bench tuning needs NIXB_BENCH_VS=<path of another nixb> to compare with");
    };
    if !other.is_file() {
        bail!("NIXB_BENCH_VS={}: no such file", other.display());
    }
    let busybox = ["/usr/bin/busybox", "/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    if busybox.is_none() {
        bail!("sandboxed builds need a static busybox as the sandboxed /bin/sh");
    }
    let nixb = match std::env::var_os("NIXB_BENCH_NIXB").map(PathBuf::from) {
        Some(p) if p.is_file() => p,
        Some(p) => bail!("NIXB_BENCH_NIXB={}: no such file", p.display()),
        None => crate::build_nixb_release(&crate::workspace_root())?,
    };
    let base = std::env::temp_dir().join(format!("nixb-bench-tuning-{}", std::process::id()));
    println!(
        "{rounds} pairs each, {} (A) and {} (B) in turn; ms are medians",
        nixb.display(),
        other.display()
    );
    println!(
        "{:<6} {:<14} {:<16} {:>9} {:>9} {:>9} {:>9} {:>8} {:>13} {:>8}",
        "fs",
        "compare",
        "graph",
        "A wall",
        "B wall",
        "A cpu",
        "B cpu",
        "B/A wall",
        "(min-max)",
        "B/A cpu"
    );
    let plain_conf = "sandbox = false\nbuild-users-group =\nsubstituters =\n";
    let sbx_conf = format!(
        "sandbox = true\nbuild-users-group =\nsubstituters =\nsandbox-paths = /bin/sh={}\n",
        busybox.unwrap_or("/bin/busybox")
    );
    let layered_n = (n / 2).max(50) / 25 * 25 + 1;
    for fs in &systems {
        let mount = Mount::new(fs, &base)?;
        for (shape, expr, conf) in [
            ("chain", chain(n), plain_conf),
            ("layered", layered(n), plain_conf),
            ("layered sbx", layered(n / 2), sbx_conf.as_str()),
        ] {
            let graph = Graph::new(&mount.dir, "vs", &expr, conf)?;
            let count = if shape == "chain" {
                n
            } else if shape == "layered" {
                n.max(50) / 25 * 25 + 1
            } else {
                layered_n
            };
            pairs(
                fs,
                "vs",
                &graph,
                &format!("{shape} {count}"),
                &nixb,
                &other,
                rounds,
            )?;
        }
        drop(mount);
    }
    let _ = std::fs::remove_dir(&base);
    Ok(())
}
