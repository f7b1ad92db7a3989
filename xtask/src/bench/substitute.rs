//! Bench group `substitute`: a 200-path closure (199 leaves of 32 KiB random data, one of
//! them 16 MiB, under one top) built by real Nix 2.8 and published with
//! `nix copy --to file://` (xz, signed); then, each on a fresh empty store at the same
//! store directory, real `nix-store -r` substituting from that cache vs nixb's
//! `substitute_closure` (the library, run as the `substitute_closure` example binary of
//! nixb-binarycache, release build) and `nixb realise` (the engine: substitution goals and
//! the built-in substituter's threads) at -j0 and -j4. Prints wall times, their ratio and
//! peak RSS.

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
}

impl Env {
    fn cmd(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        for (k, d) in [
            ("NIX_STORE_DIR", "store"),
            ("NIX_STATE_DIR", "state"),
            ("NIX_LOG_DIR", "log"),
            ("NIX_CONF_DIR", "etc"),
            ("HOME", "home"),
        ] {
            c.env(k, self.root.join(d));
        }
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

    fn wipe_store(&self) -> Result<()> {
        for d in ["store", "state"] {
            let p = self.root.join(d);
            if p.exists() {
                Command::new("chmod").args(["-R", "u+w"]).arg(&p).status()?;
                std::fs::remove_dir_all(&p)?;
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

/// Wall time and peak RSS (KiB) of a command run to success.
fn measure(mut cmd: Command) -> Result<(Duration, i64)> {
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let t = Instant::now();
    let child = cmd.spawn().context("spawning benchmark command")?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain old data; wait4 fills it for our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let wall = t.elapsed();
    if r != pid {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        bail!("benchmark command {cmd:?} failed (wait status {status})");
    }
    Ok((wall, ru.ru_maxrss))
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
    };
    let _ = std::fs::remove_dir_all(&env.root);
    std::fs::create_dir_all(env.root.join("etc"))?;
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
        "{:<26} {:>6} {:>10} {:>10}",
        "substituter", "paths", "wall ms", "RSS MiB"
    );
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut nix_t = Duration::ZERO;
    for round in 0..2 {
        env.wipe_store()?;
        let mut c = env.cmd(Path::new("nix-store"));
        c.args([
            "-r",
            &top,
            "-j0",
            "--option",
            "substituters",
            &cache,
            "--option",
            "trusted-public-keys",
            &pk,
        ]);
        let (t, rss) = measure(c)?;
        nix_t = if round == 0 { t } else { nix_t.min(t) };
        println!(
            "{:<26} {:>6} {:>10.0} {:>10.1}",
            "nix-store -r (Nix 2.8)",
            n,
            ms(t),
            rss as f64 / 1024.0
        );
    }
    for jobs in [1usize, 4] {
        let mut best = Duration::MAX;
        for _ in 0..2 {
            env.wipe_store()?;
            let mut c = env.cmd(&bin);
            c.args([&cache, &pk, &jobs.to_string(), &top]);
            let (t, rss) = measure(c)?;
            best = best.min(t);
            println!(
                "{:<26} {:>6} {:>10.0} {:>10.1}",
                format!("nixb substitute_closure -j{jobs}"),
                n,
                ms(t),
                rss as f64 / 1024.0
            );
        }
        println!(
            "  ratio nix/nixb (best of 2, -j{jobs}): {:.2}x",
            ms(nix_t) / ms(best)
        );
    }
    // The engine: SubstitutionGoals handing the cache to the built-in substituter's
    // threads (substitution_jobs, not build slots, so -j0 runs them in parallel too).
    // -j0 is what nix-store -r ran with above.
    for jobs in [0usize, 4] {
        let mut best = Duration::MAX;
        for _ in 0..2 {
            env.wipe_store()?;
            let mut c = env.cmd(&nixb);
            c.args([
                "realise",
                "--max-jobs",
                &jobs.to_string(),
                "--option",
                "substituters",
                &cache,
            ])
            .args(["--option", "trusted-public-keys", &pk, &top]);
            let (t, rss) = measure(c)?;
            best = best.min(t);
            println!(
                "{:<26} {:>6} {:>10.0} {:>10.1}",
                format!("nixb realise -j{jobs}"),
                n,
                ms(t),
                rss as f64 / 1024.0
            );
        }
        println!(
            "  ratio nix/nixb realise (best of 2, -j{jobs}): {:.2}x",
            ms(nix_t) / ms(best)
        );
    }
    Ok(())
}
