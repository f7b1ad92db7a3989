//! Bench group `substitute`: a 200-path closure (199 leaves of 32 KiB random data, one of
//! them 16 MiB, under one top) built by real Nix 2.8 and published with
//! `nix copy --to file://` (xz, signed); then, each on a fresh empty store at the same
//! store directory, real `nix-store -r` substituting from that cache vs nixb's
//! `substitute_closure` (the library, run as the `substitute_closure` example binary of
//! nixb-binarycache, release build) and `nixb realise` (the engine: substitution goals and
//! the built-in substituter's threads) at -j0 and -j4. Prints wall times, their ratio,
//! CPU time (user + system) and peak RSS.
//!
//! Three rounds, interleaved (nix, then each nixb variant, then again), so that load from
//! other processes drifting during the run hits all of them alike; ratios use the best
//! wall time of each. Between runs the store is moved aside, not deleted, and the bench
//! directory carries ext4's top-directory flag (`chattr +T`), which makes each fresh
//! store directory land in a block group of its own. Both avoid one artifact: ext4
//! without a journal (as this machine's root file system) makes every inode allocation
//! step over inodes of its group freed in the last 60-360 seconds (`recently_deleted()`
//! in `fs/ext4/ialloc.c`), each step a buffer-cache lookup. Deleting the previous run's
//! ~600 inodes just before a run, or other processes deleting files in /tmp's group,
//! added 50-150 ms to *each* engine's run (perf: `find_get_block_common` under
//! `ext4_create`/`ext4_mkdir` at 40% of nixb's samples), a cost of the harness and the
//! neighbours rather than of substitution, and the main reason earlier runs of this
//! bench gave ratios anywhere from 2x to 3x.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const LEAVES: usize = 199;

fn expr() -> String {
    format!(
        r#"let
  mk = name: size: derivation {{
    inherit name; system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/bin:/usr/bin";
    args = [ "-c" "mkdir $out; head -c ${{toString size}} /dev/urandom > $out/data; echo ${{name}} > $out/name" ];
  }};
  leaves = builtins.genList (i: mk "leaf${{toString i}}" (if i == 0 then 16777216 else 32768)) {LEAVES};
in derivation {{
  name = "top"; system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/bin:/usr/bin";
  inherit leaves;
  args = [ "-c" "echo $leaves > $out" ];
}}
"#
    )
}

struct Env {
    root: PathBuf,
    /// Stores of earlier runs, moved aside (see the module doc); deleted with `root`.
    trash: std::cell::Cell<u32>,
}

impl Env {
    fn cmd(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        super::store_env(&mut c, &self.root);
        c.env_remove("NIX_REMOTE");
        c
    }

    fn output(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = self
            .cmd(Path::new(program))
            .args(args)
            .output()
            .with_context(|| format!("running {program}"))?;
        if !out.status.success() {
            bail!(
                "{program} {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Makes the next run start from an empty store: the last run's store and state are
    /// renamed into `trash/N`, since deleting them would slow the next run's inode
    /// allocations (see the module doc).
    fn wipe_store(&self) -> Result<()> {
        let n = self.trash.get();
        self.trash.set(n + 1);
        let dir = self.root.join("trash").join(n.to_string());
        std::fs::create_dir_all(&dir)?;
        for d in ["store", "state"] {
            let p = self.root.join(d);
            if p.exists() {
                std::fs::rename(&p, dir.join(d))?;
            }
        }
        Ok(())
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = Command::new("chmod")
            .args(["-R", "u+w"])
            .arg(&self.root)
            .status();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Sets ext4's top-directory flag (`chattr +T`) on `dir`, so that the block allocator
/// spreads its subdirectories over block groups as it does for top-level directories.
/// False where the file system has no such flag.
fn set_topdir_flag(dir: &Path) -> bool {
    use std::os::fd::AsRawFd;
    // <linux/fs.h>: FS_IOC_SETFLAGS = _IOW('f', 2, long); FS_TOPDIR_FL = 0x00020000.
    const FS_IOC_SETFLAGS: libc::c_ulong = 0x4008_6602;
    const FS_TOPDIR_FL: libc::c_int = 0x0002_0000;
    let Ok(f) = std::fs::File::open(dir) else {
        return false;
    };
    let mut flags: libc::c_int = 0;
    // SAFETY: both ioctls read or write one int through a valid pointer on an open fd.
    unsafe {
        if libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETFLAGS as _, &mut flags) != 0 {
            return false;
        }
        flags |= FS_TOPDIR_FL;
        libc::ioctl(f.as_raw_fd(), FS_IOC_SETFLAGS as _, &flags) == 0
    }
}

/// What one measured run took.
struct Run {
    wall: Duration,
    /// User plus system CPU time of the process and its threads.
    cpu: Duration,
    /// Peak RSS, KiB.
    rss: i64,
}

/// Wall time, CPU time and peak RSS of a command run to success.
fn measure(mut cmd: Command) -> Result<Run> {
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
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
        bail!("benchmark command {cmd:?} failed (wait status {status})");
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Ok(Run {
        wall,
        cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
        rss: ru.ru_maxrss,
    })
}

fn build_example(root: &Path) -> Result<PathBuf> {
    let status = Command::new(env!("CARGO"))
        .current_dir(root)
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "nixb-binarycache",
            "--example",
            "substitute_closure",
        ])
        .status()?;
    if !status.success() {
        bail!("building the substitute_closure example failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target.join("release/examples/substitute_closure"))
}

pub fn run() -> Result<()> {
    let bin = build_example(&crate::workspace_root())?;
    let nixb = crate::build_nixb_release(&crate::workspace_root())?;
    let env = Env {
        root: std::env::temp_dir().join(format!("nixb-bench-substitute-{}", std::process::id())),
        trash: std::cell::Cell::new(0),
    };
    let _ = std::fs::remove_dir_all(&env.root);
    std::fs::create_dir_all(env.root.join("etc"))?;
    if !set_topdir_flag(&env.root) {
        eprintln!(
            "note: could not set the top-directory flag on {}",
            env.root.display()
        );
    }
    let sk = env.output(
        "nix",
        &[
            "--extra-experimental-features",
            "nix-command",
            "key",
            "generate-secret",
            "--key-name",
            "bench-1",
        ],
    )?;
    std::fs::write(env.root.join("sk"), &sk)?;
    let mut c = env.cmd(Path::new("nix"));
    c.args([
        "--extra-experimental-features",
        "nix-command",
        "key",
        "convert-secret-to-public",
    ])
    .stdin(std::fs::File::open(env.root.join("sk"))?);
    let pk = String::from_utf8(c.output()?.stdout)?.trim().to_string();
    std::fs::write(
        env.root.join("etc/nix.conf"),
        format!(
            "sandbox = false\nbuild-users-group =\nsubstituters =\nsecret-key-files = {}\nmax-jobs = 2\n",
            env.root.join("sk").display()
        ),
    )?;
    std::fs::write(env.root.join("graph.nix"), expr())?;
    eprintln!("building the {}-path closure with real Nix ...", LEAVES + 1);
    let drv = env.output(
        "nix-instantiate",
        &[env.root.join("graph.nix").to_str().unwrap_or("")],
    )?;
    let top = env.output("nix-store", &["-r", &drv])?;
    let cache = format!("file://{}", env.root.join("cache").display());
    env.output(
        "nix",
        &[
            "--extra-experimental-features",
            "nix-command",
            "copy",
            "--to",
            &cache,
            &top,
        ],
    )?;
    let n = env
        .output("nix-store", &["-q", "--requisites", &top])?
        .lines()
        .count();

    println!(
        "{:<30} {:>6} {:>9} {:>9} {:>9}",
        "substituter", "paths", "wall ms", "cpu ms", "RSS MiB"
    );
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    // nix-store -r at -j0 (what nixb realise -j0 is compared with), the library through
    // the example binary, and the engine: SubstitutionGoals handing the cache to the
    // built-in substituter's threads (substitution_jobs, not build slots, so -j0 runs
    // them in parallel too).
    let nix_cmd = || {
        let mut c = env.cmd(Path::new("nix-store"));
        c.args(["-r", &top, "-j0", "--option", "substituters", &cache])
            .args(["--option", "trusted-public-keys", &pk]);
        c
    };
    let closure_cmd = |jobs: usize| {
        let mut c = env.cmd(&bin);
        c.args([&cache, &pk, &jobs.to_string(), &top]);
        c
    };
    let realise_cmd = |jobs: usize| {
        let mut c = env.cmd(&nixb);
        c.args(["realise", "--max-jobs", &jobs.to_string()])
            .args(["--option", "substituters", &cache])
            .args(["--option", "trusted-public-keys", &pk, &top]);
        c
    };
    const ROUNDS: usize = 3;
    let names = [
        "nix-store -r -j0 (Nix 2.8)",
        "nixb substitute_closure -j1",
        "nixb substitute_closure -j4",
        "nixb realise -j0",
        "nixb realise -j4",
    ];
    // Per variant: the best wall time and the least CPU time over the rounds.
    let mut best = vec![(Duration::MAX, Duration::MAX); names.len()];
    for _ in 0..ROUNDS {
        for (i, name) in names.iter().enumerate() {
            let cmd = match i {
                0 => nix_cmd(),
                1 => closure_cmd(1),
                2 => closure_cmd(4),
                3 => realise_cmd(0),
                _ => realise_cmd(4),
            };
            env.wipe_store()?;
            let run = measure(cmd)?;
            println!(
                "{:<30} {:>6} {:>9.0} {:>9.0} {:>9.1}",
                name,
                n,
                ms(run.wall),
                ms(run.cpu),
                run.rss as f64 / 1024.0
            );
            best[i] = (best[i].0.min(run.wall), best[i].1.min(run.cpu));
        }
    }
    let (nix_wall, nix_cpu) = best[0];
    println!("ratio nix-store -r -j0 / nixb, best of {ROUNDS} each:");
    for (name, (wall, cpu)) in names.iter().zip(&best).skip(1) {
        println!(
            "  {:<28} wall {:.2}x, cpu {:.2}x",
            name,
            ms(nix_wall) / ms(*wall),
            ms(nix_cpu) / ms(*cpu)
        );
    }
    Ok(())
}
