//! Bench group `daemon`: `nixb daemon` side by side with real `nix-daemon` 2.8, each
//! serving a private store made the same way, reached by the same client binaries (Nix
//! 2.8's `nix-store`, `nix`) through `NIX_REMOTE=unix://SOCKET`, unsandboxed:
//!
//! - `build`: `nix-store -r --max-jobs 2` of a freshly instantiated graph of N trivial
//!   `/bin/sh` derivations (layers of 25, each node on 3 of the layer below), once each;
//!   both daemons' `nix.conf` say `max-jobs = 2` too (nixb's daemon runs its own
//!   `max-jobs` for all clients together, a client's does not raise it);
//! - `path-info -r` / `-q --requisites`: a registered closure of P paths (each path
//!   references the one before and the one at half its index), median of several runs;
//!   beside them the same client against a socket that answers from memory and does
//!   nothing else ([`MemoryResponder`]): the best any daemon could do with this client;
//! - `handshake`: a connection's greeting and `SetOptions` by nixb's protocol client,
//!   median over many connections, the two daemons alternating in blocks;
//! - `rss idle`: the daemon's memory with 100 greeted idle clients; `rss 8 building`:
//!   its peak while 8 clients each build a graph of their own of B derivations, at two
//!   graph sizes (and, for nixb, its exact peak `VmHWM`). Nix's daemon forks a process
//!   per connection, so its figure is the sum over its process tree; proportional set
//!   sizes (PSS, shared pages divided among their sharers) are summed so that pages
//!   shared with the parent count once.
//!
//! Sizes: `NIXB_BENCH_DAEMON_DRVS` (default 1000), `NIXB_BENCH_DAEMON_PATHS` (10000),
//! `NIXB_BENCH_DAEMON_CONNS` (500), `NIXB_BENCH_DAEMON_BUILD8` (`25,100`). Nothing here
//! asserts a time.

use std::collections::BTreeSet;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nixb_protocol::types::ClientSettings;
use nixb_protocol::{Client, ClientInfo, Version};
use nixb_store::StoreDir;

use super::{env_number, median, run_checked};

/// A graph of `n` trivial derivations whose names start with `tag`.
fn graph(tag: &str, n: usize) -> String {
    super::layered_graph(tag, n.div_ceil(25), false)
}

/// A private store and the daemon serving it.
struct Side {
    name: &'static str,
    root: PathBuf,
    daemon: Option<Child>,
}

impl Side {
    fn new(name: &'static str) -> Result<Side> {
        let root =
            std::env::temp_dir().join(format!("nixb-bench-daemon-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("etc"))?;
        std::fs::write(
            root.join("etc/nix.conf"),
            // max-jobs as the clients ask: nixb's daemon holds its own for all clients
            // (a client's does not raise it), Nix's takes each trusted client's.
            "max-jobs = 2\nsandbox = false\nbuild-users-group =\nsubstituters =\n",
        )?;
        Ok(Side {
            name,
            root,
            daemon: None,
        })
    }

    fn socket(&self) -> PathBuf {
        self.root.join("socket")
    }

    fn store_dir(&self) -> Result<StoreDir> {
        Ok(StoreDir::new(
            self.root.join("store").to_str().context("store path")?,
        )?)
    }

    /// A command with this store's environment, talking to the store directly.
    fn local(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        super::store_env(&mut c, &self.root);
        c.env("XDG_CACHE_HOME", self.root.join("home/.cache"));
        c.env_remove("NIX_REMOTE");
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    }

    /// A client command reaching the store through the daemon.
    fn client(&self, program: &str) -> Command {
        let mut c = self.local(Path::new(program));
        c.env("NIX_REMOTE", format!("unix://{}", self.socket().display()));
        if program == "nix" {
            c.args(["--extra-experimental-features", "nix-command"]);
        }
        c
    }

    fn start(&mut self, nixb: &Path) -> Result<()> {
        let child = if self.name == "nix" {
            // With no writable state yet, nix-daemon takes itself for a client.
            run_checked(self.local(Path::new("nix-store")).arg("--init"))?;
            self.local(Path::new("nix-daemon"))
                .env("NIX_DAEMON_SOCKET_PATH", self.socket())
                .spawn()
                .context("starting nix-daemon")?
        } else {
            self.local(nixb)
                .args(["daemon", "--socket"])
                .arg(self.socket())
                .spawn()
                .context("starting nixb daemon")?
        };
        self.daemon = Some(child);
        let t = Instant::now();
        while UnixStream::connect(self.socket()).is_err() {
            if t.elapsed() > Duration::from_secs(60) {
                bail!(
                    "the {} daemon did not listen on {}",
                    self.name,
                    self.socket().display()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn pid(&self) -> u32 {
        self.daemon.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    fn instantiate(&self, expr: &str, file: &str) -> Result<Vec<String>> {
        let f = self.root.join(file);
        std::fs::write(&f, expr)?;
        let out = super::instantiate(self.local(Path::new("nix-instantiate")).arg(&f))?;
        Ok(out.lines().map(str::to_string).collect())
    }

    /// Registers a closure of `n` small paths (directly, before the daemon starts);
    /// returns the top path.
    fn register_closure(&self, n: usize) -> Result<String> {
        let store = self.root.join("store");
        std::fs::create_dir_all(&store)?;
        let path = |i: usize| store.join(format!("{:0>32}-p{i}", i));
        let mut input = String::new();
        for i in 0..n {
            let mut refs = Vec::new();
            if i > 0 {
                refs.push(path(i - 1));
                if i / 2 != i - 1 {
                    refs.push(path(i / 2));
                }
            }
            let text: String = refs.iter().map(|r| format!("{}\n", r.display())).collect();
            std::fs::write(path(i), &text)?;
            input += &format!("{}\n\n{}\n{text}", path(i).display(), refs.len());
        }
        let mut c = self.local(Path::new("nix-store"));
        c.arg("--register-validity").stdin(Stdio::piped());
        let mut child = c.spawn().context("running nix-store --register-validity")?;
        {
            use std::io::Write;
            let mut w = child.stdin.take().context("stdin")?;
            w.write_all(input.as_bytes())?;
        }
        let status = child.wait()?;
        if !status.success() {
            bail!("nix-store --register-validity failed ({status})");
        }
        Ok(path(n - 1).display().to_string())
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
        let _ = Command::new("chmod")
            .args(["-R", "u+w"])
            .arg(&self.root)
            .status();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A socket answering the greeting, `SetOptions`, `QueryPathInfo`, `IsValidPath`,
/// `QueryValidPaths`, and with "nothing to do" `QueryMissing`, `BuildPaths`, `EnsurePath`
/// and `AddTempRoot` (what the query clients send), from a table in memory and doing
/// nothing else: the
/// least a daemon could cost, so that a query row's ratio can be set against the best any
/// daemon could reach with the same client.
struct MemoryResponder {
    socket: PathBuf,
}

impl MemoryResponder {
    /// Reads the closure of `top` from `side`'s daemon and serves it.
    fn start(side: &Side, top: &str) -> Result<MemoryResponder> {
        use nixb_protocol::{Request, Response, ServerConnection, ServerInfo};
        use std::collections::HashMap;

        let store = side.store_dir()?;
        let mut c = greet(&side.socket(), &store)?;
        let mut infos = HashMap::new();
        let mut todo = vec![store.parse(top)?];
        while let Some(p) = todo.pop() {
            if infos.contains_key(&p) {
                continue;
            }
            let info = c
                .query_path_info(&p)?
                .with_context(|| format!("{} is not valid", store.print(&p)))?;
            todo.extend(info.references.iter().cloned());
            infos.insert(p, info);
        }
        drop(c);
        let socket = side.root.join("memory-socket");
        let _ = std::fs::remove_file(&socket);
        let listener = std::os::unix::net::UnixListener::bind(&socket)?;
        let info = ServerInfo {
            version: Version::MAX,
            nix_version: "memory".into(),
            trusted: None,
            features: BTreeSet::new(),
        };
        let infos = std::sync::Arc::new(infos);
        std::thread::spawn(move || {
            for s in listener.incoming().flatten() {
                let (infos, info, store) = (infos.clone(), info.clone(), store.clone());
                std::thread::spawn(move || -> Result<()> {
                    let mut conn = ServerConnection::accept(s.try_clone()?, s, store, &info)?;
                    while let Some(req) = conn.read_request()? {
                        let resp = match &req {
                            Request::SetOptions(_) => Response::Nothing,
                            // Every path asked for is in the closure read above.
                            Request::AddTempRoot(_)
                            | Request::EnsurePath(_)
                            | Request::BuildPaths { .. } => Response::One,
                            Request::QueryMissing(_) => {
                                Response::Missing(nixb_protocol::types::Missing::default())
                            }
                            Request::QueryPathInfo(p) => Response::PathInfo(infos.get(p).cloned()),
                            Request::IsValidPath(p) => Response::Bool(infos.contains_key(p)),
                            Request::QueryValidPaths { paths, .. } => Response::Paths(
                                paths
                                    .iter()
                                    .filter(|p| infos.contains_key(p))
                                    .cloned()
                                    .collect(),
                            ),
                            other => {
                                let e = format!("not served here: {:?}", other.op());
                                conn.fail(&nixb_protocol::RemoteError::new(e))?;
                                return Ok(());
                            }
                        };
                        conn.finish(&req, &resp)?;
                    }
                    Ok(())
                });
            }
        });
        Ok(MemoryResponder { socket })
    }
}

impl Drop for MemoryResponder {
    fn drop(&mut self) {
        // The accepting thread stays blocked in accept until the process exits.
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn timed(cmd: &mut Command) -> Result<Duration> {
    let t = Instant::now();
    run_checked(cmd)?;
    Ok(t.elapsed())
}

/// The median of `v`, in milliseconds.
fn median_ms(v: Vec<Duration>) -> f64 {
    median(v.iter().map(|d| d.as_secs_f64() * 1e3).collect())
}

/// Whether processes `a` and `b` share one address space (`kcmp(KCMP_VM)`).
fn same_memory(a: u32, b: u32) -> bool {
    const KCMP_VM: libc::c_long = 1;
    // SAFETY: kcmp reads nothing of ours; it compares two processes' kernel objects.
    unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            a as libc::c_long,
            b as libc::c_long,
            KCMP_VM,
            0,
            0,
        ) == 0
    }
}

/// Sum of the proportional set sizes (KiB) of `pid` and its descendants. A child still
/// sharing its parent's memory (cloned with `CLONE_VM`, as nixb starts builders, until it
/// execs) reports the parent's pages as its own: it is not counted again.
fn tree_pss_kib(pid: u32) -> u64 {
    let mut total = 0;
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        if p != pid && same_memory(pid, p) {
            continue;
        }
        total += proc_kib(&format!("/proc/{p}/smaps_rollup"), "Pss:");
        let tasks = std::fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten();
        for t in tasks.flatten() {
            if let Ok(c) = std::fs::read_to_string(t.path().join("children")) {
                todo.extend(c.split_whitespace().filter_map(|x| x.parse::<u32>().ok()));
            }
        }
    }
    total
}

/// The value (KiB) of the `key` line (`Pss:`, `VmHWM:`) of the `/proc` file `file`; 0
/// when the process or the line is gone.
fn proc_kib(file: &str, key: &str) -> u64 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The peak resident set (`VmHWM`, KiB) of process `pid` alone.
fn vm_hwm_kib(pid: u32) -> u64 {
    proc_kib(&format!("/proc/{pid}/status"), "VmHWM:")
}

fn greet(sock: &Path, store: &StoreDir) -> Result<Client<UnixStream, UnixStream>> {
    let s = UnixStream::connect(sock)?;
    let info = ClientInfo {
        version: Version::MAX,
        features: BTreeSet::new(),
    };
    let mut c = Client::connect(s.try_clone()?, s, store.clone(), &info)?;
    c.set_options(&ClientSettings::default())?;
    Ok(c)
}

pub fn run() -> Result<()> {
    let root = crate::workspace_root();
    let nixb = crate::build_nixb_release(&root)?;
    let drvs = env_number("NIXB_BENCH_DAEMON_DRVS", 1000)?;
    let paths = env_number("NIXB_BENCH_DAEMON_PATHS", 10_000)?;
    let conns = env_number("NIXB_BENCH_DAEMON_CONNS", 500)?;
    let build8: Vec<usize> = std::env::var("NIXB_BENCH_DAEMON_BUILD8")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![25, 100]);

    let mut sides = [Side::new("nixb")?, Side::new("nix")?];
    let mut drv = Vec::new();
    let mut top = Vec::new();
    for s in &mut sides {
        drv.push(s.instantiate(&graph("g", drvs), "graph.nix")?);
        top.push(s.register_closure(paths)?);
        s.start(&nixb)?;
    }

    println!(
        "{:<40} {:>12} {:>12} {:>9}",
        "", "nix-daemon", "nixb daemon", "nix/nixb"
    );
    let row = |what: &str, nix: f64, nixb: f64, unit: &str| {
        println!(
            "{:<40} {:>9.2} {unit:<2} {:>9.2} {unit:<2} {:>8.2}x",
            what,
            nix,
            nixb,
            nix / nixb
        );
    };

    // Build: once each, nixb first (Nix frees inodes as it goes, see bench engine).
    let mut build = Vec::new();
    for (s, d) in sides.iter().zip(&drv) {
        let mut c = s.client("nix-store");
        c.args(["-r", "--max-jobs", "2"]).args(d);
        build.push(timed(&mut c)?.as_secs_f64() * 1e3);
    }
    row(
        &format!("nix-store -r, {drvs} drvs"),
        build[1],
        build[0],
        "ms",
    );

    // What the query rows could be at best with these clients: a responder that answers
    // from memory (the path infos read from nixb's daemon first) and does nothing else.
    let floor = MemoryResponder::start(&sides[0], &top[0])?;

    // Queries: alternating, median of 5.
    for (what, args) in [
        ("nix path-info -r", &["path-info", "-r"][..]),
        ("nix-store -q --requisites", &["-q", "--requisites"][..]),
    ] {
        let program = if args[0] == "path-info" {
            "nix"
        } else {
            "nix-store"
        };
        let mut t = [Vec::new(), Vec::new()];
        let mut at_best = Vec::new();
        for _ in 0..5 {
            for (i, s) in sides.iter().enumerate() {
                let mut c = s.client(program);
                c.args(args).arg(&top[i]);
                t[i].push(timed(&mut c)?);
            }
            let mut c = sides[0].local(Path::new(program));
            c.env("NIX_REMOTE", format!("unix://{}", floor.socket.display()));
            if program == "nix" {
                c.args(["--extra-experimental-features", "nix-command"]);
            }
            c.args(args).arg(&top[0]);
            at_best.push(timed(&mut c)?);
        }
        let [a, b] = t;
        let nix = median_ms(b);
        row(&format!("{what}, {paths} paths"), nix, median_ms(a), "ms");
        let best = median_ms(at_best);
        println!(
            "{:<40} {:>12} {:>9.2} ms {:>8.2}x   (answers from memory: the client's floor)",
            "  the same, at best",
            "",
            best,
            nix / best
        );
    }
    drop(floor);

    // Handshake + SetOptions, the daemons alternating in blocks of 50 connections; after
    // each switch a pause lets the other daemon finish closing its last connection (Nix's
    // reaps a process per connection), which would otherwise run beside the timed greeting.
    let dirs = [sides[0].store_dir()?, sides[1].store_dir()?];
    let mut t = [Vec::new(), Vec::new()];
    for _ in 0..conns.div_ceil(50) {
        for (i, s) in sides.iter().enumerate() {
            std::thread::sleep(Duration::from_millis(50));
            for _ in 0..50 {
                let start = Instant::now();
                let c = greet(&s.socket(), &dirs[i])?;
                t[i].push(start.elapsed());
                drop(c);
            }
        }
    }
    let [a, b] = t;
    row("handshake + SetOptions", median_ms(b), median_ms(a), "ms");

    // Memory with 100 greeted idle clients.
    let mut pss = Vec::new();
    for (i, s) in sides.iter().enumerate() {
        let idle: Vec<_> = (0..100)
            .map(|_| greet(&s.socket(), &dirs[i]))
            .collect::<Result<_>>()?;
        // Every connection is served (greeted) by now: Nix's has forked its process.
        pss.push(tree_pss_kib(s.pid()) as f64 / 1024.0);
        drop(idle);
    }
    row("PSS, 100 idle clients", pss[1], pss[0], "MiB");

    // Peak memory while 8 clients each build a graph of their own.
    for &n in &build8 {
        let mut peak = Vec::new();
        let mut wall = Vec::new();
        let mut hwm = 0.0;
        for s in &sides {
            // Every graph instantiated first, so that the 8 clients start together.
            let graphs = (0..8)
                .map(|k| s.instantiate(&graph(&format!("c{k}n{n}"), n), &format!("c{k}n{n}.nix")))
                .collect::<Result<Vec<_>>>()?;
            // nixb's daemon is one process: its exact peak, counted from here (writing 5
            // to clear_refs resets VmHWM), beside the sampled PSS of the table.
            let _ = std::fs::write(format!("/proc/{}/clear_refs", s.pid()), "5");
            let start = Instant::now();
            let mut clients = Vec::new();
            for d in &graphs {
                let mut c = s.client("nix-store");
                c.args(["-r", "--max-jobs", "2"]).args(d);
                clients.push(c.spawn().context("starting a building client")?);
            }
            let mut max = 0;
            loop {
                max = max.max(tree_pss_kib(s.pid()));
                let mut done = true;
                for c in &mut clients {
                    if c.try_wait()?.is_none() {
                        done = false;
                    }
                }
                if done {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            for mut c in clients {
                let st = c.wait()?;
                if !st.success() {
                    bail!("a building client of the {} daemon failed ({st})", s.name);
                }
            }
            wall.push(start.elapsed().as_secs_f64() * 1e3);
            peak.push(max as f64 / 1024.0);
            if s.name == "nixb" {
                hwm = vm_hwm_kib(s.pid()) as f64 / 1024.0;
            }
        }
        row(
            &format!("peak PSS, 8 clients x {n} drvs"),
            peak[1],
            peak[0],
            "MiB",
        );
        row(
            &format!("wall, 8 clients x {n} drvs"),
            wall[1],
            wall[0],
            "ms",
        );
        println!(
            "{:<40} {:>12} {:>9.2} MiB",
            format!("  nixb daemon VmHWM, 8 x {n} drvs"),
            "",
            hwm
        );
    }
    drop(sides);
    Ok(())
}
