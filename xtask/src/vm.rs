//! `cargo xtask test-vm`: boot a throw-away QEMU VM as root and run the VM suites in it.
//!
//! ```text
//! cargo xtask test-vm [-p PKG]... [--filter STR] [--timeout SECS] [--mem MB] [--cpus N] [--accel kvm|tcg] [--debug] [--mode MODE]...
//! cargo xtask test-vm --bench GROUP [...]
//! ```
//!
//! `--mode MODE` (repeatable) runs the per-mode suites only in those of [`guest::MODES`]
//! (the others still run once, in the default mode).
//!
//! `--bench GROUP` runs `cargo xtask bench GROUP` in the guest instead of the tests (with the
//! host's `NIXB_BENCH_*` variables), for figures only a full root guest gives (e.g.
//! `NIXB_BENCH_SANDBOX=cgroups`: cgroup v2 with every controller).
//!
//! `-p PKG` (repeatable) runs only that package's VM tests: only its tests are built, and
//! neither `nixb` (unless PKG is `nixb-cli`) nor `tests/vm/*.sh`. Without it, everything.
//!
//! 1. Build `nixb` and the test executables ([`artifacts`]; the `vm` feature convention is
//!    described there), and keep those that list a test matching the filter (`vm_`).
//! 2. Boot the Debian kernel from /boot ([`kernel`]: the ELF vmlinux is extracted once into
//!    `target/vm-cache/`, KVM only on real hardware virtualisation, TCG otherwise) with a
//!    two-segment initramfs ([`cpio`]): a cached base (static busybox, `/init`, modules for
//!    virtio and 9p) and a per-run payload of a few small files (config, test list, suite).
//!    The host's `/usr` and the workspace are shared read-only over 9p at their host paths,
//!    so nothing large is packed per run.
//! 3. In the guest ([`guest`]) mount cgroup v2 with every controller enabled for the
//!    cgroups below the root, make an ext4 file system on a RAM disk (`/disk`, for figures
//!    that only a block device shows), create the build users and a store, run each selected
//!    executable with the filter and `--test-threads=1` (VM tests share the build users),
//!    then each `tests/vm/*.sh` with `sh`. The executables in [`PER_MODE_SUITES`] run once
//!    per isolation mode ([`guest::MODES`], passed as `NIXB_VM_MODE`).
//! 4. The guest's exit status becomes ours ([`qemu`]: serial marker, `isa-debug-exit` as a
//!    fallback; a timeout or a kernel panic is an error saying so). The console is streamed
//!    to stderr and kept in `target/vm-cache/console.log`.

mod artifacts;
mod cpio;
mod guest;
mod kernel;
mod qemu;

use anyhow::{bail, Context, Result};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Test targets run once per isolation mode of [`guest::MODES`] (the suite reads
/// `NIXB_VM_MODE` and configures its builds accordingly); every other one runs once.
const PER_MODE_SUITES: &[&str] = &["vm_security"];

/// Modules the guest loads at boot, with their dependencies (from `modules.dep`): virtio and
/// 9p for the shares, a RAM disk and ext4 for `/disk`.
const MODULES: &[&str] = &[
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "brd",
    "crc32c_generic",
    "ext4",
];

/// Module parameters: one 512 MiB RAM disk (`rd_size` is in KiB; pages are taken as written).
const MODULE_PARAMS: &[(&str, &str)] = &[("brd", "rd_nr=1 rd_size=524288")];

struct Options {
    packages: Vec<String>,
    filter: String,
    timeout: Duration,
    mem_mb: u32,
    cpus: u32,
    accel: Option<bool>,
    debug: bool,
    bench: Option<String>,
    modes: Vec<String>,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        packages: Vec::new(),
        filter: "vm_".into(),
        // The per-mode suites run three times.
        timeout: Duration::from_secs(1800),
        mem_mb: 1024,
        cpus: 1,
        accel: None,
        debug: false,
        bench: None,
        modes: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "-p" | "--package" => o.packages.push(value("--package")?.clone()),
            "--filter" => o.filter = value("--filter")?.clone(),
            "--timeout" => {
                let v = value("--timeout")?;
                o.timeout = Duration::from_secs(v.parse().with_context(|| format!("--timeout {v}: not a number of seconds"))?);
            }
            "--mem" => {
                let v = value("--mem")?;
                o.mem_mb = v.parse().with_context(|| format!("--mem {v}: not a number of MiB"))?;
            }
            "--cpus" => {
                let v = value("--cpus")?;
                o.cpus = v.parse().with_context(|| format!("--cpus {v}: not a number of CPUs"))?;
                if o.cpus == 0 {
                    bail!("--cpus 0: the guest needs at least one CPU");
                }
            }
            "--accel" => match value("--accel")?.as_str() {
                "kvm" => o.accel = Some(true),
                "tcg" => o.accel = Some(false),
                v => bail!("--accel {v}: expected kvm or tcg"),
            },
            "--debug" => o.debug = true,
            "--bench" => o.bench = Some(value("--bench")?.clone()),
            "--mode" => {
                let m = value("--mode")?;
                if !guest::MODES.contains(&m.as_str()) {
                    bail!("--mode {m}: expected one of {}", guest::MODES.join(", "));
                }
                o.modes.push(m.clone());
            }
            other => bail!(
                "test-vm: unknown argument '{other}' (usage: cargo xtask test-vm [-p PKG]... [--filter STR] [--timeout SECS] [--mem MB] [--cpus N] [--accel kvm|tcg] [--debug] [--bench GROUP] [--mode MODE]...)"
            ),
        }
    }
    Ok(o)
}

pub fn run(args: &[String]) -> Result<()> {
    let opts = parse(args)?;
    let t0 = Instant::now();
    let ws = artifacts::workspace()?;
    let cache = ws.target_dir.join("vm-cache");
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;

    let whole = opts.packages.is_empty() && opts.bench.is_none();
    let nixb = if whole || opts.packages.iter().any(|p| p == "nixb-cli") {
        Some(artifacts::build_nixb(&ws)?)
    } else {
        None
    };
    let mut tests = Vec::new();
    if opts.bench.is_none() {
        for exe in artifacts::build_tests(&ws, &opts.packages)? {
            if artifacts::has_tests_matching(&exe.path, &opts.filter)? {
                tests.push(exe);
            }
        }
    }
    let scripts = if whole {
        vm_scripts(&ws.root)?
    } else {
        Vec::new()
    };
    if tests.is_empty() && scripts.is_empty() && opts.bench.is_none() {
        bail!(
            "no VM tests found: no test matching '{}' and no tests/vm/*.sh",
            opts.filter
        );
    }
    let t_built = Instant::now();

    let kernel = kernel::find()?;
    let kvm = opts.accel.unwrap_or_else(kernel::use_kvm);
    let boot_image = match kernel::vmlinux(&kernel, &cache) {
        Ok(v) => v,
        // Only TCG really needs the uncompressed kernel; KVM decompresses fast enough.
        Err(e) if kvm => {
            eprintln!("xtask test-vm: {e:#}; booting the bzImage");
            kernel.image.clone()
        }
        Err(e) => return Err(e),
    };
    let modules = kernel::resolve_modules(&kernel, MODULES)?;
    let base = base_initramfs(&kernel, &modules, &cache)?;

    let mut shares = vec![ws.root.clone()];
    if !ws.target_dir.starts_with(&ws.root) {
        shares.push(ws.target_dir.clone());
    }
    let payload = payload(&opts, nixb.as_deref(), &tests, &scripts, &shares)?;
    let mut initrd_bytes =
        std::fs::read(&base).with_context(|| format!("reading {}", base.display()))?;
    initrd_bytes.extend_from_slice(&payload);
    // Per run, so that two engineers' runs on one target directory do not collide.
    let initrd = cache.join(format!("initrd-{}", std::process::id()));
    std::fs::write(&initrd, &initrd_bytes)
        .with_context(|| format!("writing {}", initrd.display()))?;

    eprintln!(
        "xtask test-vm: {} test executable(s), {} script(s); kernel {} ({}), booting",
        tests.len(),
        scripts.len(),
        kernel.version,
        if kvm { "kvm" } else { "tcg" }
    );
    let t_boot = Instant::now();
    let result = qemu::run(&qemu::Machine {
        kernel: boot_image,
        initrd: initrd.clone(),
        kvm,
        mem_mb: opts.mem_mb,
        cpus: opts.cpus,
        shares,
        debug: opts.debug,
        timeout: opts.timeout,
        console_log: cache.join("console.log"),
    });
    let _ = std::fs::remove_file(&initrd);
    let rc = result?;
    eprintln!(
        "xtask test-vm: guest exit status {rc}; build {:.1} s, image {:.2} s, boot-to-result {:.1} s",
        (t_built - t0).as_secs_f64(),
        (t_boot - t_built).as_secs_f64(),
        t_boot.elapsed().as_secs_f64()
    );
    if rc != 0 {
        eprintln!(
            "xtask test-vm: VM suites failed (console: {})",
            cache.join("console.log").display()
        );
        std::process::exit(rc);
    }
    Ok(())
}

/// `tests/vm/*.sh`, sorted.
fn vm_scripts(root: &Path) -> Result<Vec<PathBuf>> {
    let dir = root.join("tests/vm");
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Ok(Vec::new());
    };
    let mut out: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "sh"))
        .collect();
    out.sort();
    Ok(out)
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Bump when the base's layout changes in a way the cache key does not see.
const BASE_LAYOUT: u32 = 2;

/// The cached first initramfs segment: busybox, `/init`, `/etc`, the modules.
fn base_initramfs(kernel: &kernel::Kernel, modules: &[String], cache: &Path) -> Result<PathBuf> {
    let busybox =
        find_in_path("busybox").context("busybox not found (apt install busybox-static)")?;
    let bb_meta =
        std::fs::metadata(&busybox).with_context(|| format!("stat {}", busybox.display()))?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (
        BASE_LAYOUT,
        &kernel.version,
        guest::INIT,
        modules,
        bb_meta.len(),
    )
        .hash(&mut h);
    std::os::unix::fs::MetadataExt::mtime(&bb_meta).hash(&mut h);
    let path = cache.join(format!("base-{:016x}.cpio", h.finish()));
    if path.is_file() {
        return Ok(path);
    }

    let ldd = Command::new("ldd").arg(&busybox).output();
    if ldd.is_ok_and(|o| o.status.success()) {
        bail!(
            "{} is dynamically linked; the guest needs busybox-static",
            busybox.display()
        );
    }
    let mut c = cpio::Cpio::new();
    for d in [
        "bin",
        "sbin",
        "etc",
        "proc",
        "sys",
        "dev",
        "run",
        "root",
        "var/empty",
        "xtask-vm/modules.d",
    ] {
        c.dir(d, 0o755);
    }
    c.dir("tmp", 0o1777);
    let bb = std::fs::read(&busybox).with_context(|| format!("reading {}", busybox.display()))?;
    c.file("bin/busybox", 0o755, &bb);
    let list = Command::new(&busybox)
        .arg("--list")
        .output()
        .context("busybox --list")?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if !applet.is_empty() && applet != "busybox" && !applet.contains('/') {
            c.symlink(&format!("bin/{applet}"), "busybox");
        }
    }
    c.file("init", 0o755, guest::INIT.as_bytes());
    c.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    );
    c.file(
        "etc/group",
        0o644,
        b"root:x:0:\ntty:x:5:\nnogroup:x:65534:\n",
    );
    c.file("etc/shadow", 0o600, b"root::19000:0:99999:7:::\n");
    c.file(
        "etc/nsswitch.conf",
        0o644,
        b"passwd: files\ngroup: files\nshadow: files\nhosts: files\n",
    );
    c.file(
        "etc/hosts",
        0o644,
        b"127.0.0.1 localhost nixb-vm\n::1 localhost\n",
    );
    let mut list = String::new();
    for m in modules {
        let src = kernel.modules_dir.join(m);
        let ko = std::fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
        if !m.ends_with(".ko") {
            bail!(
                "module {}: compressed modules are not supported yet",
                src.display()
            );
        }
        let name = m.rsplit('/').next().unwrap_or(m);
        c.file(
            &format!("xtask-vm/modules.d/{name}"),
            0o644,
            kernel::strip_signature(&ko),
        );
        list.push_str(name);
        let stem = name.split(".ko").next().unwrap_or(name);
        if let Some((_, params)) = MODULE_PARAMS.iter().find(|(m, _)| *m == stem) {
            list.push(' ');
            list.push_str(params);
        }
        list.push('\n');
    }
    c.file("xtask-vm/modules", 0o644, list.as_bytes());
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, c.finish()).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(path)
}

/// Shell-quotes a value for the guest's config file.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The per-run initramfs segment.
fn payload(
    opts: &Options,
    nixb: Option<&Path>,
    tests: &[artifacts::TestExe],
    scripts: &[PathBuf],
    shares: &[PathBuf],
) -> Result<Vec<u8>> {
    let utf8 = |p: &Path| -> Result<String> {
        match p.to_str() {
            Some(s) if !s.contains(['\n', '\t', ' ']) => Ok(s.to_string()),
            _ => bail!(
                "path {} cannot be passed to the guest (not UTF-8, or has whitespace)",
                p.display()
            ),
        }
    };
    let share_list: Vec<String> = shares.iter().map(|p| utf8(p)).collect::<Result<_>>()?;
    let mut config = format!(
        "SHARES={}\nFILTER={}\nNIXB_BIN={}\n",
        sh_quote(&share_list.join(" ")),
        sh_quote(&opts.filter),
        sh_quote(&nixb.map(utf8).transpose()?.unwrap_or_default())
    );
    if let Some(group) = &opts.bench {
        // This very program, which the guest sees at the same path over 9p.
        let xtask = std::env::current_exe().context("finding the xtask executable")?;
        config.push_str(&format!(
            "BENCH={}\nXTASK_BIN={}\n",
            sh_quote(group),
            sh_quote(&utf8(&xtask)?)
        ));
        for (k, v) in std::env::vars() {
            if k.starts_with("NIXB_BENCH_") {
                config.push_str(&format!("export {k}={}\n", sh_quote(&v)));
            }
        }
    }
    let mut test_list = String::new();
    for t in tests {
        let modes = if PER_MODE_SUITES.contains(&t.name.as_str()) {
            if opts.modes.is_empty() {
                guest::MODES.join(",")
            } else {
                opts.modes.join(",")
            }
        } else {
            guest::MODES[0].to_string()
        };
        test_list.push_str(&format!(
            "{}\t{}\t{modes}\n",
            utf8(&t.path)?,
            utf8(&t.package_dir)?
        ));
    }
    let mut script_list = String::new();
    for s in scripts {
        script_list.push_str(&utf8(s)?);
        script_list.push('\n');
    }
    let mut c = cpio::Cpio::new();
    c.file("xtask-vm/config", 0o644, config.as_bytes());
    c.file("xtask-vm/tests", 0o644, test_list.as_bytes());
    c.file("xtask-vm/scripts", 0o644, script_list.as_bytes());
    c.file("xtask-vm/suite.sh", 0o755, guest::SUITE.as_bytes());
    Ok(c.finish())
}
