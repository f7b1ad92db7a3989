//! What the VM suites share: the guest they run in, the isolation mode they were started in
//! (`NIXB_VM_MODE`), a nix.conf per test, and running `nixb` and real Nix 2.8 against the
//! guest's store. Each suite uses part of it.
#![allow(dead_code)]

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

/// The guest's build users nixbld1..8.
pub const GROUP_UIDS: RangeInclusive<u32> = 30001..=30008;
/// The gid of the guest's `nixbld`.
pub const GROUP_GID: u32 = 30000;
/// Nix's default `start-id` and `id-count` (128 blocks of 65536).
pub const AUTO_START_ID: u32 = 872_415_232;
pub const AUTO_ID_COUNT: u32 = 128 * 65536;
/// Where the guest keeps its per-build cgroups (the suite runs in the root cgroup).
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// How builds are isolated in this run of a suite (`NIXB_VM_MODE`, set by the guest).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Members of `nixbld` (`build-users-group`).
    BuildUsers,
    /// `auto-allocate-uids = true`: blocks of uids from Nix's range, no users.
    AutoAllocateUids,
    /// Build users, and `use-cgroups = true`: a cgroup v2 per build.
    UseCgroups,
}

impl Mode {
    pub fn current() -> Mode {
        match std::env::var("NIXB_VM_MODE").as_deref() {
            Ok("build-users") | Err(_) => Mode::BuildUsers,
            Ok("auto-allocate-uids") => Mode::AutoAllocateUids,
            Ok("use-cgroups") => Mode::UseCgroups,
            Ok(other) => panic!("NIXB_VM_MODE={other}: not a mode this suite knows"),
        }
    }

    /// The nix.conf lines of the mode.
    pub fn conf(self) -> &'static str {
        match self {
            Mode::BuildUsers => "",
            Mode::AutoAllocateUids => "auto-allocate-uids = true\n",
            Mode::UseCgroups => "use-cgroups = true\n",
        }
    }

    /// The uids builders run as, seen from outside any namespace.
    pub fn build_uids(self) -> RangeInclusive<u32> {
        match self {
            Mode::BuildUsers | Mode::UseCgroups => GROUP_UIDS,
            Mode::AutoAllocateUids => AUTO_START_ID..=AUTO_START_ID + AUTO_ID_COUNT - 1,
        }
    }
}

pub fn in_vm() {
    assert_eq!(
        std::env::var("NIXB_IN_VM").as_deref(),
        Ok("1"),
        "VM tests need the guest that `cargo xtask test-vm` sets up (root, build users)"
    );
    assert!(nix::unistd::geteuid().is_root(), "VM tests run as root");
}

pub fn nixb_bin() -> PathBuf {
    PathBuf::from(std::env::var_os("NIXB_BIN").expect("NIXB_BIN is set by the VM suite"))
}

pub fn nonce() -> String {
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    format!("{}-{}", t.as_nanos(), std::process::id())
}

/// A nix.conf directory (and a place for files) for one test.
pub struct Env {
    pub dir: tempfile::TempDir,
    /// Extra environment (a private store, for instance).
    pub vars: Vec<(String, String)>,
    pub mode: Mode,
}

impl Env {
    /// Sandboxed builds as the current [`Mode`] has them, with busybox as `/bin/sh`.
    pub fn new(extra_paths: &str, extra_conf: &str) -> Env {
        Env::with_mode(Mode::current(), extra_paths, extra_conf)
    }

    pub fn with_mode(mode: Mode, extra_paths: &str, extra_conf: &str) -> Env {
        in_vm();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("nix.conf"),
            format!(
                "sandbox = true\nbuild-users-group = nixbld\n\
                 sandbox-paths = /bin/sh=/bin/busybox /bin/busybox {extra_paths}\n{}{extra_conf}",
                mode.conf()
            ),
        )
        .unwrap();
        Env {
            dir,
            vars: Vec::new(),
            mode,
        }
    }

    /// With `/usr` in the sandbox, for python3 builders.
    pub fn python() -> Env {
        Env::new("/usr /lib? /lib64?", "")
    }

    /// Builds in a store of their own below `root` (`<root>/store`, mode 1775 root:nixbld
    /// as a multi-user store has it; state and logs beside it).
    pub fn private_store(&mut self, root: &Path) {
        let store = root.join("store");
        std::fs::create_dir_all(&store).unwrap();
        std::os::unix::fs::chown(&store, Some(0), Some(GROUP_GID)).unwrap();
        std::fs::set_permissions(&store, std::os::unix::fs::PermissionsExt::from_mode(0o1775))
            .unwrap();
        self.vars = vec![
            ("NIX_STORE_DIR".into(), store.display().to_string()),
            (
                "NIX_STATE_DIR".into(),
                root.join("state").display().to_string(),
            ),
            ("NIX_LOG_DIR".into(), root.join("log").display().to_string()),
        ];
    }

    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        c.env("NIX_CONF_DIR", self.dir.path())
            .env("HOME", self.dir.path())
            .env("XDG_CACHE_HOME", self.dir.path().join("cache"));
        for (k, v) in &self.vars {
            c.env(k, v);
        }
        c
    }

    pub fn nixb(&self) -> Command {
        self.cmd(nixb_bin())
    }

    /// A derivation made by real `nix-instantiate` from `attrs` (Nix attribute text).
    pub fn drv(&self, attrs: &str) -> String {
        let f = self.dir.path().join(format!("d-{}.nix", nonce()));
        std::fs::write(
            &f,
            format!(
                "derivation ({{ system = builtins.currentSystem; nonce = \"{}\"; }} // {{ {attrs} }})",
                nonce()
            ),
        )
        .unwrap();
        ok(self.cmd("nix-instantiate").arg(&f)).trim().to_string()
    }

    /// A busybox-shell derivation running `script` (Nix '' string contents).
    pub fn sh(&self, name: &str, script: &str, more: &str) -> String {
        self.drv(&format!(
            "name = \"{name}\"; builder = \"/bin/sh\"; args = [ \"-c\" ''\n{script}\n'' ]; {more}"
        ))
    }

    /// `nixb realise DRV`, checked as [`Env::check_after_build`] says.
    pub fn realise(&self, drv: &str) -> Output {
        let child = self
            .nixb()
            .args(["realise", drv])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("running nixb realise {drv}: {e}"));
        let pid = child.id();
        let out = child.wait_with_output().unwrap();
        self.check_after_build(pid, &out);
        out
    }

    /// Under `use-cgroups`: the `nixb` process `pid` had a cgroup for its build (no warning
    /// that it could not) and left none of its own behind (spares included).
    pub fn check_after_build(&self, pid: u32, out: &Output) {
        if self.mode == Mode::UseCgroups {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!stderr.contains("use-cgroups:"), "{stderr}");
            let ours = format!("nixb-{pid}-");
            let left: Vec<String> = build_cgroups()
                .into_iter()
                .filter(|n| n.starts_with(&ours))
                .collect();
            assert_eq!(left, Vec::<String>::new(), "a build's cgroup is left");
        }
    }

    pub fn log(&self, drv: &str) -> String {
        String::from_utf8_lossy(&run(self.nixb().args(["log", drv])).stdout).into_owned()
    }

    pub fn output(&self, drv: &str) -> String {
        ok(self.cmd("nix-store").args(["-q", "--outputs", drv]))
            .trim()
            .to_string()
    }

    /// Builds `drv`, asserting that the build failed permanently; returns log + stderr.
    pub fn must_fail(&self, drv: &str) -> String {
        let out = self.realise(drv);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(100),
            "the build of {drv} was expected to fail\nstderr: {stderr}"
        );
        format!("{}\n{stderr}", self.log(drv))
    }

    pub fn must_build(&self, drv: &str) -> String {
        let out = self.realise(drv);
        assert!(
            out.status.success(),
            "building {drv}: {}\nstderr: {}\nlog: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log(drv)
        );
        self.output(drv)
    }
}

pub fn run(c: &mut Command) -> Output {
    c.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {c:?}: {e}"))
}

pub fn ok(c: &mut Command) -> String {
    let out = run(c);
    assert!(
        out.status.success(),
        "{c:?}: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn assert_has(text: &str, what: &str) {
    assert!(text.contains(what), "expected '{what}' in:\n{text}");
}

/// Some line of `text` contains every one of `parts` (busybox words its errors
/// `cat: can't open '<path>': <errno text>`).
pub fn assert_line(text: &str, parts: &[&str]) {
    assert!(
        text.lines().any(|l| parts.iter().all(|p| l.contains(p))),
        "expected a line with {parts:?} in:\n{text}"
    );
}

/// (pid, uid) of every process whose real uid is in `uids`.
pub fn processes_of(uids: &RangeInclusive<u32>) -> Vec<(u32, u32)> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|u| u.parse::<u32>().ok());
        if let Some(uid) = uid.filter(|u| uids.contains(u)) {
            found.push((pid, uid));
        }
    }
    found
}

/// The builds' cgroups (`nixb-*`) below the guest's root cgroup.
pub fn build_cgroups() -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(CGROUP_ROOT) else {
        return Vec::new();
    };
    rd.flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("nixb-"))
        .collect()
}

/// The shell lines that print who the builder is: its uid, then its `/proc/self/uid_map`.
pub const WHO: &str = "id -u; cat /proc/self/uid_map";

/// The uid outside any namespace from the output of [`WHO`].
pub fn outside_uid(who: &str) -> u32 {
    let mut lines = who.lines();
    let inside: u32 = lines.next().unwrap().trim().parse().unwrap();
    for l in lines {
        let f: Vec<u64> = l.split_whitespace().map(|w| w.parse().unwrap()).collect();
        let (first, outside, count) = (f[0], f[1], f[2]);
        if (first..first + count).contains(&u64::from(inside)) {
            return (outside + u64::from(inside) - first) as u32;
        }
    }
    panic!("uid {inside} is not in the uid map:\n{who}")
}
