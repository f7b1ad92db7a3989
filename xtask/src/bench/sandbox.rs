//! Bench group `sandbox`: start-to-exit latency of a `/bin/true` builder with a 100-path input
//! closure (100 directories standing in for store paths) plus /bin, /lib, /lib64, /usr bound
//! read-only, nixb's chroot sandbox against `bwrap` doing the equivalent binds and namespaces,
//! and a bare `unshare -p -m -n -i -u -f true`. Also nixb's own spawn-to-exec time (spawn()
//! returns when the exec has happened), how soon `start()` (the engine's call) returns, the cost
//! of removing the chroot tree afterwards, and plain fork/exec as the floor. Needs root. Prints
//! medians and means in ms, and ratios.
//!
//! `NIXB_BENCH_SANDBOX=steps`: where a pooled-netns spawn's start-to-exec time goes, step by
//! step (`spawn_traced`), and what the parent does beside the child (the overlay's lower
//! layer). `NIXB_BENCH_LOWER=child` makes the child make that layer itself, as on kernels
//! before 6.15 (the spawn table has a row for it).
//!
//! `NIXB_BENCH_SANDBOX=rootless` (run as an ordinary uid, e.g. under `setpriv`): a chroot
//! builder in a user namespace of its own mapping the caller, start-to-exec and start-to-exit,
//! with no inputs and with the 100, against `unshare -U -r -p -m -n -i -u -f true` (the same
//! namespaces, no mounts).
//!
//! `NIXB_BENCH_SANDBOX=cgroups` (root, cgroup v2; `cargo xtask test-vm --bench sandbox` runs
//! it in the VM, whose cgroup v2 has every controller): what a cgroup per build costs, the same
//! plain `/bin/true` builder started and reaped without one, born in one
//! (`clone3(CLONE_INTO_CGROUP)`) and moving itself into one (`cgroup.procs`), interleaved.
//!
//! Then (`NIXB_BENCH_SANDBOX=builds` for this half only) the cost of creating a network
//! namespace, and 1,000 trivial sandboxed derivations with `--max-jobs 2`, nixb against
//! Nix 2.8 (`NIXB_BENCH_DRVS` to change the count).

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nixb_sandbox::{
    spawn, spawn_traced, start, BindMount, BuildUserIds, CgroupRoot, ChrootSpec, Isolation,
    NetNsPool, Network, Personality, SandboxSpec,
};

const INPUTS: usize = 100;
const STORE: &str = "/nix/store";

struct Stats {
    median: f64,
    mean: f64,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Stats {
        median: ms(v[v.len() / 2]),
        mean: v.iter().map(|d| ms(*d)).sum::<f64>() / v.len() as f64,
    }
}

struct Fixture {
    dir: PathBuf,
    inputs: Vec<(PathBuf, PathBuf)>, // (host dir, path inside)
    build: PathBuf,
}

impl Fixture {
    fn new() -> Result<Fixture> {
        let dir = std::env::temp_dir().join(format!("nixb-bench-sandbox-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut inputs = Vec::new();
        for i in 0..INPUTS {
            let name = format!("{:032}-input-{i}", i);
            let host = dir.join("store").join(&name);
            std::fs::create_dir_all(&host)?;
            std::fs::write(host.join("file"), "x")?;
            inputs.push((host, Path::new(STORE).join(name)));
        }
        let build = dir.join("nix-build-bench-0");
        std::fs::create_dir_all(&build)?;
        Ok(Fixture { dir, inputs, build })
    }

    fn chroot_spec(&self, root: PathBuf, network: Network) -> ChrootSpec {
        let mut spec = ChrootSpec::new(root, STORE.into(), self.build.clone(), 65534, 65534);
        for d in ["/bin", "/usr"] {
            spec.binds.push(BindMount::same(d).read_only());
        }
        for d in ["/lib", "/lib64"] {
            spec.binds.push(BindMount::same(d).read_only().optional());
        }
        // Read-only, as the engine binds input paths.
        for (host, inside) in &self.inputs {
            spec.binds.push(BindMount {
                target: inside.clone(),
                source: host.clone(),
                optional: false,
                read_only: true,
            });
        }
        spec.network = network;
        spec
    }

    fn bwrap(&self) -> Command {
        let mut c = Command::new("bwrap");
        c.args([
            "--unshare-pid",
            "--unshare-net",
            "--unshare-ipc",
            "--unshare-uts",
        ]);
        c.args(["--hostname", "localhost"]);
        // Before the build directory's bind, which lives under /tmp and would be hidden.
        c.args(["--tmpfs", "/tmp"]);
        for d in ["/bin", "/usr", "/lib", "/lib64"] {
            if Path::new(d).exists() {
                c.args(["--ro-bind", d, d]);
            }
        }
        for (host, inside) in &self.inputs {
            c.arg("--ro-bind").arg(host).arg(inside);
        }
        c.arg("--bind").arg(&self.build).arg(&self.build);
        c.args(["--dev", "/dev", "--proc", "/proc"]);
        // bwrap can only change uid inside a user namespace; as root it keeps uid 0 but drops
        // every capability, the nearest equivalent of our switch to nobody.
        c.args(["--cap-drop", "ALL"]);
        c.arg("--chdir").arg(&self.build);
        c.args(["--", "/bin/true"]);
        c
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn log_pipe() -> Result<OwnedFd> {
    let (r, w) = nix::unistd::pipe()?;
    drop(r); // /bin/true writes nothing; a closed read end is fine
    Ok(w)
}

fn spec(fx: &Fixture, isolation: Isolation) -> Result<SandboxSpec> {
    Ok(SandboxSpec {
        program: "/bin/true".into(),
        args: Vec::<OsString>::new(),
        env: vec![("PATH".into(), "/path-not-set".into())],
        cwd: fx.build.clone(),
        log_fd: log_pipe()?,
        user: Some(BuildUserIds {
            uid: 65534,
            gid: 65534,
            supplementary: vec![],
        }),
        personality: Personality::default(),
        isolation,
        announce: None,
        cgroup: None,
    })
}

/// (start-to-exec, start-to-exit, teardown) for one nixb chroot run.
fn nixb_once(fx: &Fixture, i: usize, network: Network) -> Result<(Duration, Duration, Duration)> {
    nixb_once_in(fx, &fx.dir, i, network)
}

/// As `nixb_once`, with the chroot root made under `base`.
fn nixb_once_in(
    fx: &Fixture,
    base: &Path,
    i: usize,
    network: Network,
) -> Result<(Duration, Duration, Duration)> {
    let root = base.join(format!("root-{i}"));
    let s = spec(fx, Isolation::Chroot(fx.chroot_spec(root.clone(), network)))?;
    let t0 = Instant::now();
    let mut b = spawn(s)?;
    let exec = t0.elapsed();
    let st = b.wait()?;
    let exit = t0.elapsed();
    if !st.success() {
        bail!("sandboxed /bin/true failed: {st:?}");
    }
    let t1 = Instant::now();
    std::fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    Ok((exec, exit, t1.elapsed()))
}

/// (call-to-return, call-to-exit) for one nixb chroot run started with `start`, as the engine
/// does: it returns while the child still sets up its sandbox.
fn nixb_started(fx: &Fixture, i: usize, network: Network) -> Result<(Duration, Duration)> {
    let root = fx.dir.join(format!("started-{i}"));
    let s = spec(fx, Isolation::Chroot(fx.chroot_spec(root.clone(), network)))?;
    let t0 = Instant::now();
    let mut b = start(s)?;
    let returned = t0.elapsed();
    let st = b.wait()?;
    let exit = t0.elapsed();
    if !st.success() {
        bail!("sandboxed /bin/true failed: {st:?}");
    }
    std::fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    Ok((returned, exit))
}

fn command_once(mut c: Command) -> Result<Duration> {
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let name = c.get_program().to_string_lossy().into_owned();
    let t0 = Instant::now();
    let out = c.output().with_context(|| format!("running {name}"))?;
    let d = t0.elapsed();
    if !out.status.success() {
        bail!(
            "{name} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(d)
}

pub fn run() -> Result<()> {
    // NIXB_BENCH_SANDBOX=rootless: run as the uid to measure (e.g. under setpriv), no root.
    if std::env::var("NIXB_BENCH_SANDBOX").is_ok_and(|v| v == "rootless") {
        return rootless_latency();
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("bench sandbox needs root (namespaces, mounts, setuid to nobody)");
    }
    // NIXB_BENCH_SANDBOX=spawn|builds picks one half; both by default.
    let part = std::env::var("NIXB_BENCH_SANDBOX").unwrap_or_default();
    if part == "steps" {
        return step_times();
    }
    if part == "cgroups" {
        return cgroup_cost();
    }
    if part != "builds" {
        spawn_latency()?;
    }
    if part != "spawn" {
        netns_cost()?;
        sandboxed_builds()?;
    }
    Ok(())
}

/// What creating (and, in the background, tearing down) a network namespace costs: the step
/// Nix 2.8 pays inside every sandboxed build, and that nixb's prepared pool moves off the
/// build's path. Measured in a throw-away thread that `unshare`s a fresh one each time.
fn netns_cost() -> Result<()> {
    let n = 200;
    let t = std::thread::spawn(move || -> std::io::Result<Vec<Duration>> {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            // SAFETY: unshare affects only this thread, which exits afterwards.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            v.push(t.elapsed());
        }
        Ok(v)
    });
    let v = t
        .join()
        .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
        .context("unshare(CLONE_NEWNET)")?;
    let s = stats(v);
    println!(
        "network namespace creation (unshare CLONE_NEWNET, {n}x): median {:.3} ms, mean {:.3} ms",
        s.median, s.mean
    );
    Ok(())
}

/// 1,000 trivial derivations (leaves under one top), `--max-jobs 2`, `sandbox = true` as root
/// without build users: nixb against `nix-store -r` (Nix 2.8), each on a fresh private store.
/// The builder is the host's static busybox, bound in as /bin/sh.
fn sandboxed_builds() -> Result<()> {
    let n: usize = std::env::var("NIXB_BENCH_DRVS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let busybox = ["/usr/bin/busybox", "/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("a static busybox is needed as the sandboxed /bin/sh")?;
    let root = crate::workspace_root();
    let nixb = crate::build_nixb_release(&root)?;
    let expr = format!(
        "let mk = name: deps: derivation {{ inherit name deps; system = builtins.currentSystem;          builder = \"/bin/sh\"; args = [ \"-c\" \"echo $name > $out\" ]; }}; \
         in mk \"top\" (builtins.genList (i: mk \"leaf${{toString i}}\" [ ]) {})\n",
        n - 1
    );
    let conf = format!(
        "sandbox = true\nbuild-users-group =\nsubstituters =\nsandbox-paths = /bin/sh={busybox}\n"
    );
    let mut times = Vec::new();
    for (tag, program) in [("nix", PathBuf::from("nix-store")), ("nixb", nixb.clone())] {
        let dir = std::env::temp_dir().join(format!("nixb-bench-sbx-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("etc"))?;
        std::fs::write(dir.join("etc/nix.conf"), &conf)?;
        std::fs::write(dir.join("graph.nix"), &expr)?;
        let env = |c: &mut Command| super::store_env(c, &dir);
        let mut c = Command::new("nix-instantiate");
        env(&mut c);
        let out = c
            .arg(dir.join("graph.nix"))
            .stderr(Stdio::inherit())
            .output()
            .context("nix-instantiate")?;
        if !out.status.success() {
            bail!("nix-instantiate failed");
        }
        let drv = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let mut c = Command::new(&program);
        env(&mut c);
        if tag == "nix" {
            c.args(["-r", &drv, "--max-jobs", "2"]);
        } else {
            c.args(["realise", &drv, "--max-jobs", "2"]);
        }
        c.stdout(Stdio::null()).stderr(Stdio::null());
        let t = Instant::now();
        let st = c
            .status()
            .with_context(|| format!("running {}", program.display()))?;
        let wall = t.elapsed();
        if !st.success() {
            bail!("{tag}: sandboxed build of {n} derivations failed ({st})");
        }
        times.push(wall);
        let _ = std::fs::remove_dir_all(&dir);
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "sandboxed builds, {n} drvs, --max-jobs 2: nix {:.0} ms ({:.2} ms/drv), nixb {:.0} ms ({:.2} ms/drv), nix/nixb {:.1}x",
        ms(times[0]),
        ms(times[0]) / n as f64,
        ms(times[1]),
        ms(times[1]) / n as f64,
        ms(times[0]) / ms(times[1])
    );
    Ok(())
}

fn spawn_latency() -> Result<()> {
    let iters: usize = std::env::var("NIXB_BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let fx = Fixture::new()?;
    let pool = NetNsPool::new(8)?;

    let mut plain = Vec::new();
    let mut fork_exec = Vec::new();
    let (mut priv_exec, mut priv_exit, mut teardown) = (Vec::new(), Vec::new(), Vec::new());
    let (mut pool_exec, mut pool_exit) = (Vec::new(), Vec::new());
    let mut child_lower_exec = Vec::new();
    let (mut started_ret, mut started_exit) = (Vec::new(), Vec::new());
    let (mut host_exec, mut host_exit) = (Vec::new(), Vec::new());
    let mut bwrap = Vec::new();
    let mut unshare = Vec::new();
    let (mut shm_exec, mut shm_exit, mut shm_teardown) = (Vec::new(), Vec::new(), Vec::new());
    // The chroot tree is a hundred-odd mkdirs and mknods' worth of files: on a tmpfs that is
    // microseconds, on a busy journaling file system it can dominate everything else.
    let shm = Path::new("/dev/shm").join(format!("nixb-bench-sandbox-{}", std::process::id()));
    std::fs::create_dir_all(&shm)?;
    let have_bwrap = Command::new("bwrap").arg("--version").output().is_ok();

    // Interleaved, so that load from other processes on the machine hits every variant alike.
    for i in 0..iters + 5 {
        let warm = i >= 5;
        let (e, x, t) = nixb_once(&fx, i, Network::Private)?;
        if warm {
            priv_exec.push(e);
            priv_exit.push(x);
            teardown.push(t);
        }
        // A pool that has fallen behind is measured as what it is: a fresh namespace.
        pool.wait_ready(1);
        let net = pool.take().map_or(Network::Private, Network::Prepared);
        let (e, x, _) = nixb_once(&fx, iters + 10 + i, net)?;
        if warm {
            pool_exec.push(e);
            pool_exit.push(x);
        }
        // The same with the overlay's lower layer made by the child, as on kernels before
        // 6.15 (the parent makes it otherwise, in parallel with the child's other steps).
        pool.wait_ready(1);
        let net = pool.take().map_or(Network::Private, Network::Prepared);
        nixb_sandbox::set_detached_lower(false);
        let run = nixb_once(&fx, 3 * iters + 30 + i, net);
        nixb_sandbox::set_detached_lower(true);
        let (e, _, _) = run?;
        if warm {
            child_lower_exec.push(e);
        }
        pool.wait_ready(1);
        let net = pool.take().map_or(Network::Private, Network::Prepared);
        let (r, x) = nixb_started(&fx, i, net)?;
        if warm {
            started_ret.push(r);
            started_exit.push(x);
        }
        let (e, x, t) = nixb_once_in(&fx, &shm, i, Network::Private)?;
        if warm {
            shm_exec.push(e);
            shm_exit.push(x);
            shm_teardown.push(t);
        }
        let (e, x, _) = nixb_once(&fx, 2 * iters + 20 + i, Network::Host)?;
        if warm {
            host_exec.push(e);
            host_exit.push(x);
        }
        if have_bwrap {
            let d = command_once(fx.bwrap())?;
            if warm {
                bwrap.push(d);
            }
        }
        let mut u = Command::new("unshare");
        u.args(["-p", "-m", "-n", "-i", "-u", "-f", "true"]);
        let d = command_once(u)?;
        if warm {
            unshare.push(d);
        }
        let t0 = Instant::now();
        let mut b = spawn(spec(&fx, Isolation::Plain)?)?;
        b.wait()?;
        if warm {
            plain.push(t0.elapsed());
        }
        let d = command_once(Command::new("/bin/true"))?;
        if warm {
            fork_exec.push(d);
        }
    }
    let _ = std::fs::remove_dir_all(&shm);
    if let Some(e) = pool.error() {
        eprintln!("note: network namespace pool failed: {e}");
    }

    let un = stats(unshare);
    let bw = (!bwrap.is_empty()).then(|| stats(bwrap));
    println!(
        "sandbox: {INPUTS} input paths + /bin /lib /lib64 /usr read-only, /bin/true as uid 65534, {iters} runs (median / mean ms)"
    );
    let row = |name: &str, s: &Stats| {
        let vs_bw = bw
            .as_ref()
            .map_or("-".to_string(), |b| format!("{:.2}", s.median / b.median));
        println!(
            "  {name:<44} {:>7.3} / {:>7.3}   x unshare {:>5.2}   x bwrap {vs_bw:>5}",
            s.median,
            s.mean,
            s.median / un.median
        );
    };
    row(
        "nixb chroot, private netns: start-to-exec",
        &stats(priv_exec),
    );
    row(
        "nixb chroot, private netns: start-to-exit",
        &stats(priv_exit),
    );
    row(
        "nixb chroot, pooled netns:  start-to-exec",
        &stats(pool_exec),
    );
    row(
        "nixb chroot, pooled netns:  start-to-exit",
        &stats(pool_exit),
    );
    row(
        "  same, lower layer made by the child: to exec",
        &stats(child_lower_exec),
    );
    row(
        "nixb start(), pooled netns: call returns",
        &stats(started_ret),
    );
    row(
        "nixb start(), pooled netns: start-to-exit",
        &stats(started_exit),
    );
    row(
        "nixb chroot, host net (FOD): start-to-exec",
        &stats(host_exec),
    );
    row(
        "nixb chroot, host net (FOD): start-to-exit",
        &stats(host_exit),
    );
    row("nixb chroot tree removal (after exit)", &stats(teardown));
    row(
        "nixb chroot on tmpfs, private: start-to-exec",
        &stats(shm_exec),
    );
    row(
        "nixb chroot on tmpfs, private: start-to-exit",
        &stats(shm_exit),
    );
    row("nixb chroot on tmpfs: tree removal", &stats(shm_teardown));
    if let Some(b) = &bw {
        row("bwrap, same binds + namespaces: start-to-exit", b);
    } else {
        println!("  bwrap not installed (apt-get install bubblewrap)");
    }
    row("unshare -p -m -n -i -u -f true", &un);
    row("nixb plain spawn, start-to-exit", &stats(plain));
    row("fork+exec /bin/true (std::process)", &stats(fork_exec));
    Ok(())
}

/// `NIXB_BENCH_SANDBOX=steps`: where the start-to-exec time of a pooled-netns chroot spawn
/// goes, from [`spawn_traced`]. Steps of one kind (the 100-odd binds, the skeleton's mkdirs)
/// are summed per run; the table shows the median of those sums.
fn step_times() -> Result<()> {
    let iters: usize = std::env::var("NIXB_BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let fx = Fixture::new()?;
    let pool = NetNsPool::new(8)?;
    if std::env::var("NIXB_BENCH_LOWER").is_ok_and(|v| v == "child") {
        nixb_sandbox::set_detached_lower(false);
    }
    // Kind of a step: its description up to the first path.
    let kind = |d: &str| -> String {
        let cut = d.find('/').unwrap_or(d.len());
        d[..cut].trim_end().to_string()
    };
    let mut kinds: Vec<String> = Vec::new();
    let mut per_kind: Vec<Vec<Duration>> = Vec::new();
    let mut counts: Vec<usize> = Vec::new();
    let mut totals = Vec::new();
    let mut parallel: Vec<(String, Vec<Duration>)> = Vec::new();
    for i in 0..iters + 5 {
        pool.wait_ready(1);
        let net = pool.take().map_or(Network::Private, Network::Prepared);
        let root = fx.dir.join(format!("traced-{i}"));
        let s = spec(&fx, Isolation::Chroot(fx.chroot_spec(root.clone(), net)))?;
        let (mut b, trace) = spawn_traced(s)?;
        let st = b.wait()?;
        if !st.success() {
            bail!("sandboxed /bin/true failed: {st:?}");
        }
        std::fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
        if i < 5 {
            continue;
        }
        let mut sums: Vec<(Duration, usize)> = vec![(Duration::ZERO, 0); kinds.len()];
        for (what, d) in &trace.steps {
            let k = kind(what);
            let idx = match kinds.iter().position(|x| *x == k) {
                Some(i) => i,
                None => {
                    kinds.push(k);
                    per_kind.push(Vec::new());
                    counts.push(0);
                    sums.push((Duration::ZERO, 0));
                    kinds.len() - 1
                }
            };
            sums[idx].0 += *d;
            sums[idx].1 += 1;
        }
        for (idx, (d, n)) in sums.into_iter().enumerate() {
            per_kind[idx].push(d);
            counts[idx] = n;
        }
        totals.push(trace.steps.iter().map(|(_, d)| *d).sum::<Duration>());
        for (what, d) in &trace.parallel {
            match parallel.iter_mut().find(|(k, _)| k == what) {
                Some((_, v)) => v.push(*d),
                None => parallel.push((what.clone(), vec![*d])),
            }
        }
    }
    println!(
        "sandbox setup steps, pooled netns, {INPUTS} inputs, {iters} runs: median / 10th percentile ms per run (count per run)"
    );
    let p10 = |v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort();
        v[v.len() / 10].as_secs_f64() * 1000.0
    };
    for ((k, v), n) in kinds.iter().zip(per_kind).zip(counts) {
        let low = p10(&v);
        let s = stats(v);
        println!("  {:<58} {:>7.3} / {:>7.3}  ({n})", k, s.median, low);
    }
    let low = p10(&totals);
    println!(
        "  {:<58} {:>7.3} / {:>7.3}",
        "total (start-to-exec)",
        stats(totals).median,
        low
    );
    for (what, v) in parallel {
        let low = p10(&v);
        println!(
            "  {:<58} {:>7.3} / {:>7.3}  (in {} runs, beside the child's steps)",
            what,
            stats(v.clone()).median,
            low,
            v.len()
        );
    }
    Ok(())
}

/// `NIXB_BENCH_SANDBOX=rootless`: see the module doc.
fn rootless_latency() -> Result<()> {
    if nix::unistd::geteuid().is_root() {
        bail!("NIXB_BENCH_SANDBOX=rootless measures a caller without root: run it as another uid");
    }
    let iters: usize = std::env::var("NIXB_BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let fx = Fixture::new()?;
    let once = |i: usize, inputs: bool| -> Result<(Duration, Duration)> {
        let root = fx.dir.join(format!("rootless-{i}"));
        let mut c = fx.chroot_spec(root.clone(), Network::Private);
        if !inputs {
            c.binds.retain(|b| !b.target.starts_with(STORE));
        }
        c.user_namespace = Some(nixb_sandbox::UserNamespace::for_caller());
        let mut s = spec(&fx, Isolation::Chroot(c))?;
        s.user = None;
        let t0 = Instant::now();
        let mut b = spawn(s)?;
        let exec = t0.elapsed();
        let st = b.wait()?;
        let exit = t0.elapsed();
        if !st.success() {
            bail!("sandboxed /bin/true failed: {st:?}");
        }
        std::fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
        Ok((exec, exit))
    };
    let (mut bare_exec, mut bare_exit) = (Vec::new(), Vec::new());
    let (mut full_exec, mut full_exit) = (Vec::new(), Vec::new());
    let mut unshare = Vec::new();
    // Interleaved, so that load from other processes on the machine hits every variant alike.
    for i in 0..iters + 5 {
        let warm = i >= 5;
        let (e, x) = once(2 * i, false)?;
        let (fe, fx_) = once(2 * i + 1, true)?;
        let mut u = Command::new("unshare");
        u.args(["-U", "-r", "-p", "-m", "-n", "-i", "-u", "-f", "true"]);
        let d = command_once(u)?;
        if warm {
            bare_exec.push(e);
            bare_exit.push(x);
            full_exec.push(fe);
            full_exit.push(fx_);
            unshare.push(d);
        }
    }
    let u = stats(unshare);
    println!(
        "rootless sandbox, {iters} runs each, uid {} (ms: median / mean):",
        nix::unistd::geteuid()
    );
    for (name, v) in [
        ("nixb, no inputs: start to exec", bare_exec),
        ("nixb, no inputs: start to exit", bare_exit),
        ("nixb, 100 inputs: start to exec", full_exec),
        ("nixb, 100 inputs: start to exit", full_exit),
    ] {
        let st = stats(v);
        println!(
            "  {name:<34} {:>7.3} / {:>7.3}   {:.2}x unshare's exit",
            st.median,
            st.mean,
            st.median / u.median
        );
    }
    println!(
        "  {:<34} {:>7.3} / {:>7.3}",
        "unshare -U -r -p -m -n -i -u -f true", u.median, u.mean
    );
    Ok(())
}

/// What the parts of a cgroup's life cost alone, medians in ms over `iters` rounds, helper
/// idle: its making and removal (`mkdir` + `rmdir` of an empty one, the helper's work), and
/// the reading of the files a reaped build's figures come from (on a cgroup that has held a
/// process). The rest of a cgroup's cost is the kernel's at the clone into it and the exit.
fn cgroup_parts(root: &CgroupRoot, iters: usize) -> Result<[(&'static str, f64); 2]> {
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2] * 1000.0
    };
    nixb_sandbox::settle_cgroups();
    let mut make_remove = Vec::new();
    for i in 0..iters {
        let dir = root
            .dir()
            .join(format!("nixb-bench-{}-{i}", std::process::id()));
        let t = Instant::now();
        std::fs::create_dir(&dir).with_context(|| format!("making {}", dir.display()))?;
        std::fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))?;
        make_remove.push(t.elapsed().as_secs_f64());
    }
    // A cgroup something ran in (this process, for a moment), so that its files have
    // figures to print.
    let used = root
        .dir()
        .join(format!("nixb-bench-{}-used", std::process::id()));
    std::fs::create_dir(&used).with_context(|| format!("making {}", used.display()))?;
    std::fs::write(used.join("cgroup.procs"), std::process::id().to_string())?;
    let _ = std::hint::black_box(std::fs::read("/bin/true")?);
    std::fs::write(
        root.dir().join("cgroup.procs"),
        std::process::id().to_string(),
    )?;
    let files = [
        "cgroup.events",
        "cpu.stat",
        "io.stat",
        "memory.stat",
        "memory.peak",
    ];
    let mut reads = Vec::new();
    for _ in 0..iters {
        let t = Instant::now();
        for f in files {
            let _ = std::hint::black_box(std::fs::read_to_string(used.join(f)));
        }
        reads.push(t.elapsed().as_secs_f64());
    }
    std::fs::remove_dir(&used).with_context(|| format!("removing {}", used.display()))?;
    Ok([
        ("mkdir + rmdir of an empty cgroup", median(make_remove)),
        ("reading the 5 figure files", median(reads)),
    ])
}

/// Per-build cost of `use-cgroups`: a plain `/bin/true` builder (as nobody), started with
/// `start` and reaped, without a cgroup, with one it is born in (`clone3(CLONE_INTO_CGROUP)`)
/// and with one it moves itself into (its write to `cgroup.procs`, the way of kernels without
/// the flag), the three in turn, in a rotating order. The time runs from before the cgroup is
/// taken (as the engine takes one per build) to after the reaping (which, with a cgroup, looks
/// whether it is empty and reads its figures; its removal is the helper thread's), split at
/// the return of `start` (the clone, into the cgroup for clone3; the child's setup, with its
/// write to `cgroup.procs`, runs after). With `NIXB_BENCH_SETTLE=1` each run first waits for
/// the cgroup helper thread to be idle, outside the timed span: what is left is the cost on
/// the build's own path (on one CPU, as in the VM, the helper's making and removing of
/// cgroups otherwise falls into whichever run is timed then). In the VM only,
/// `NIXB_BENCH_CONTROLLERS="cpu memory ..."` first leaves only those controllers enabled for
/// the cgroups below the root, to see what each one costs.
fn cgroup_cost() -> Result<()> {
    let settle = std::env::var("NIXB_BENCH_SETTLE").is_ok_and(|v| v == "1");
    if let Ok(keep) = std::env::var("NIXB_BENCH_CONTROLLERS") {
        if std::env::var("NIXB_IN_VM").as_deref() != Ok("1") {
            bail!("NIXB_BENCH_CONTROLLERS changes the root cgroup: only in the VM (cargo xtask test-vm --bench sandbox)");
        }
        let control = Path::new("/sys/fs/cgroup/cgroup.subtree_control");
        let on = std::fs::read_to_string(control)
            .with_context(|| format!("reading {}", control.display()))?;
        for c in on.split_whitespace() {
            if !keep.split_whitespace().any(|k| k == c) {
                std::fs::write(control, format!("-{c}"))
                    .with_context(|| format!("turning {c} off in {}", control.display()))?;
            }
        }
        println!(
            "controllers below the root: {}",
            std::fs::read_to_string(control)?.trim()
        );
    }
    let iters: usize = std::env::var("NIXB_BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let root = CgroupRoot::open().context("a cgroup per build cannot be made here")?;
    let fx = Fixture::new()?;
    #[derive(Clone, Copy, PartialEq)]
    enum Way {
        None,
        Clone3,
        Procs,
    }
    // (start to reaped, start to the return of `start`)
    let once = |way: Way| -> Result<(Duration, Duration)> {
        nixb_sandbox::set_clone_into_cgroup(way != Way::Procs);
        let mut s = spec(&fx, Isolation::Plain)?;
        if settle {
            nixb_sandbox::settle_cgroups();
        }
        let t0 = Instant::now();
        if way != Way::None {
            s.cgroup = Some(root.create()?);
        }
        let mut b = start(s)?;
        let t1 = Instant::now();
        let st = b.wait()?;
        let t2 = Instant::now();
        if !st.success() {
            bail!("/bin/true failed: {st:?}");
        }
        let entry = b.cgroup_entry();
        let want = match way {
            Way::None => None,
            Way::Clone3 => Some(nixb_sandbox::CgroupEntry::Clone3),
            Way::Procs => Some(nixb_sandbox::CgroupEntry::Procs { refused: None }),
        };
        if entry != want {
            bail!("the builder entered its cgroup another way than measured: {entry:?}");
        }
        Ok((t2 - t0, t1 - t0))
    };
    let ways = [Way::None, Way::Clone3, Way::Procs];
    let mut total: [Vec<Duration>; 3] = Default::default();
    let mut reap: [Vec<Duration>; 3] = Default::default();
    let mut diff: [Vec<f64>; 2] = Default::default();
    for i in 0..iters + 5 {
        let mut got = [(Duration::ZERO, Duration::ZERO); 3];
        // Each of the three first, second and third in turn.
        for k in 0..3 {
            let w = (i + k) % 3;
            got[w] = once(ways[w])?;
        }
        if i >= 5 {
            for w in 0..3 {
                total[w].push(got[w].0);
                reap[w].push(got[w].1);
            }
            for w in 1..3 {
                diff[w - 1].push(got[w].0.as_secs_f64() - got[0].0.as_secs_f64());
            }
        }
    }
    nixb_sandbox::set_clone_into_cgroup(true);
    let parts = cgroup_parts(&root, iters)?;
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2] * 1000.0
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64 * 1000.0;
    println!(
        "cgroup per build ({iters} triples, plain /bin/true{}), ms median / mean:\n  \
         {:<28} {:>15} {:>17} {:>21}",
        if settle { ", helper idle" } else { "" },
        "",
        "start to reaped",
        "of which start()",
        "minus none, paired"
    );
    let names = [
        "no cgroup",
        "born in it (clone3)",
        "moves in (cgroup.procs)",
    ];
    for w in 0..3 {
        let t = stats(total[w].clone());
        let r = stats(reap[w].clone());
        let d = if w == 0 {
            String::new()
        } else {
            let v = &mut diff[w - 1];
            let m = mean(v);
            format!("{:.3} / {:.3}", median(v), m)
        };
        println!(
            "  {:<28} {:>15} {:>17} {:>21}",
            names[w],
            format!("{:.3} / {:.3}", t.median, t.mean),
            format!("{:.3} / {:.3}", r.median, r.mean),
            d
        );
    }
    for (what, ms) in parts {
        println!("  {what:<40} {ms:>8.3} (median, alone)");
    }
    Ok(())
}
