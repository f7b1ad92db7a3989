#![doc = include_str!("../README.md")]

mod cgroup;
mod chroot;
mod netns;
mod plan;
mod seccomp;
mod stack;
mod sys;
mod userns;

use std::ffi::{CString, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::Ordering;
use std::time::Duration;

use nix::errno::Errno;
pub use nix::unistd::Pid;

pub use cgroup::{
    set_clone_into_cgroup, settle_cgroups, spare_cgroups, CgroupEntry, CgroupError, CgroupRoot,
    SPARES,
};
pub use chroot::{
    chroot_store_dir, nix_etc_files, nix_etc_files_userns, BindMount, ChrootSpec, Network,
    UserNamespace, SANDBOX_GID, SANDBOX_UID,
};
pub use netns::NetNsPool;
use plan::{Exec, Kernel, Step, SETUP_FAILED_EXIT};
pub use userns::{user_namespaces_available, UserNamespaceUnavailable};

/// Everything needed to start one builder.
pub struct SandboxSpec {
    /// Executed as is (no `PATH` search).
    pub program: PathBuf,
    /// `argv[1..]`; `argv[0]` is the program's base name, as Nix passes it.
    pub args: Vec<OsString>,
    /// The complete environment; nothing is inherited.
    pub env: Vec<(OsString, OsString)>,
    /// The working directory (inside the chroot in chroot mode).
    pub cwd: PathBuf,
    /// Write end of the log pipe; becomes stdout and stderr. Closed in the parent by `spawn`.
    pub log_fd: OwnedFd,
    /// Switch to this user (setgroups, setgid, setuid, each verified) before exec.
    pub user: Option<BuildUserIds>,
    pub personality: Personality,
    pub isolation: Isolation,
    /// A descriptor (typically a pipe's write end) on which the child announces itself before
    /// it does anything else, for a watchdog that must kill the builder should the caller die
    /// at any instant. Borrowed: it must stay open until `spawn`/`start` has returned, and
    /// must not be `log_fd`. The lines written to it:
    ///
    /// ```text
    /// "+<pid>\n"   written by the child, in one write(2), as its very first action after the
    ///              clone (before setsid, namespaces, mounts, exec); <pid> is its pid in the
    ///              caller's PID namespace (the number Builder::pid holds), also for a chroot
    ///              builder, which is PID 1 of its own namespace
    /// "-<pid>\n"   written by the caller of spawn/start: when either returns an error after the
    ///              child was cloned, they have reaped it and retract it themselves; once a
    ///              Builder was returned, saying "-" after reaping it is the caller's job
    /// ```
    ///
    /// The child closes its copy right after the line (it would otherwise keep it until its
    /// exec, and may wait for the parent on the way): so anyone reading the other end of a
    /// pipe sees the line before the end of file that the caller's own death causes, even
    /// when the caller dies between the clone and the return of `spawn`/`start`. A write
    /// that fails (the reader is gone: `EPIPE`) is ignored and the builder runs on.
    pub announce: Option<RawFd>,
    /// An empty cgroup v2 directory for this build (from [`CgroupRoot::create`]): the child
    /// is born in it (`clone3` with `CLONE_INTO_CGROUP`) or, where the kernel has no such
    /// flag, moves itself into it first of all ([`Builder::cgroup_entry`] says which);
    /// [`Builder::kill`] kills everything in it, and once the builder is reaped what is left
    /// is killed, its figures read and the directory removed.
    pub cgroup: Option<PathBuf>,
}

/// Numeric ids of a build user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildUserIds {
    pub uid: u32,
    pub gid: u32,
    pub supplementary: Vec<u32>,
}

/// Execution domain of the builder.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Personality {
    pub arch: Arch,
    /// Report a 2.6 kernel in uname (`UNAME26`), for builds that look at the kernel version.
    pub impersonate_linux_26: bool,
    /// Turn off address space randomisation (`ADDR_NO_RANDOMIZE`), as Nix 2.x does, for
    /// determinism.
    pub disable_aslr: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Arch {
    #[default]
    Native,
    /// `PER_LINUX32`: a 32-bit build (i686 on x86_64, armv7l/armv6l on aarch64) sees a 32-bit
    /// machine in uname.
    Linux32,
}

const PER_LINUX32: libc::c_ulong = 0x0008;
const UNAME26: libc::c_ulong = 0x0020000;
const ADDR_NO_RANDOMIZE: libc::c_ulong = 0x0040000;

impl Personality {
    /// The personality Nix uses for a derivation of `platform` built on `host` (both Nix system
    /// names such as `i686-linux`).
    pub fn for_platform(platform: &str, host: &str, impersonate_linux_26: bool) -> Personality {
        let linux32 = (platform == "i686-linux" && host == "x86_64-linux")
            || ((platform == "armv7l-linux" || platform == "armv6l-linux")
                && host == "aarch64-linux");
        Personality {
            arch: if linux32 { Arch::Linux32 } else { Arch::Native },
            impersonate_linux_26: impersonate_linux_26
                && (platform == "i686-linux" || platform == "x86_64-linux"),
            disable_aslr: true,
        }
    }

    fn steps(&self) -> Vec<Step> {
        let mut steps = Vec::new();
        if self.arch == Arch::Linux32 {
            steps.push(Step::Personality(PER_LINUX32));
        }
        let mut flags = 0;
        if self.impersonate_linux_26 {
            flags |= UNAME26;
        }
        if self.disable_aslr {
            flags |= ADDR_NO_RANDOMIZE;
        }
        if flags != 0 {
            steps.push(Step::AddPersonality(flags));
        }
        steps
    }
}

/// How much the builder is shut in.
pub enum Isolation {
    /// clone(CLONE_VM)/exec in a new session (no copy of the caller's page tables, so the
    /// cost does not grow with its size; `CLONE_VFORK` only when [`spawn`] waits for the
    /// exec); the builder sees the host file system.
    Plain,
    /// New PID, mount, IPC, UTS (and usually network) namespaces, a chroot holding only what
    /// the spec lists, no capabilities and a seccomp filter.
    Chroot(ChrootSpec),
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A step in the child between clone and exec failed.
    #[error("setting up the builder: {step}: {errno}")]
    Setup { step: String, errno: Errno },
    /// Preparing the sandbox in the parent (chroot tree, pipes) failed.
    #[error("preparing the sandbox: {step}: {source}")]
    Prepare {
        step: String,
        source: std::io::Error,
    },
    #[error("{step}: {errno}")]
    Process { step: String, errno: Errno },
    #[error("invalid sandbox spec: {0}")]
    InvalidSpec(String),
}

fn cstring(what: &str, bytes: &[u8]) -> Result<CString, SandboxError> {
    CString::new(bytes)
        .map_err(|_| SandboxError::InvalidSpec(format!("{what} contains a NUL byte")))
}

fn path_cstring(what: &str, p: &Path) -> Result<CString, SandboxError> {
    cstring(&format!("{what} {}", p.display()), p.as_os_str().as_bytes())
}

fn exec_step(spec: &SandboxSpec) -> Result<Step, SandboxError> {
    let program = path_cstring("program", &spec.program)?;
    let arg0 = spec
        .program
        .file_name()
        .unwrap_or_else(|| spec.program.as_os_str());
    let mut args = vec![cstring("argv[0]", arg0.as_bytes())?];
    for (i, a) in spec.args.iter().enumerate() {
        args.push(cstring(&format!("argument {}", i + 1), a.as_bytes())?);
    }
    let mut env = Vec::with_capacity(spec.env.len());
    for (k, v) in &spec.env {
        let name = k.to_string_lossy();
        if k.is_empty() || k.as_bytes().contains(&b'=') {
            return Err(SandboxError::InvalidSpec(format!(
                "environment variable name '{name}' is empty or contains '='"
            )));
        }
        let mut kv = k.as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        env.push(cstring(&format!("environment variable {name}"), &kv)?);
    }
    Ok(Step::Exec(Exec::new(program, args, env)))
}

fn user_steps(user: &BuildUserIds) -> Vec<Step> {
    // Supplementary groups first: once the gid or uid changed, setgroups needs a capability
    // we may no longer hold. setgid before setuid for the same reason.
    vec![
        Step::SetGroups(user.supplementary.clone()),
        Step::SetGid(user.gid),
        Step::SetUid(user.uid),
    ]
}

/// The steps from the standard descriptors to just before the user switch, common to both
/// modes (the new session comes first: see `prepare`).
fn stdio_steps(log_fd: RawFd, null_fd: RawFd, cwd: CString) -> Vec<Step> {
    vec![
        Step::Dup2 {
            from: log_fd,
            to: 1,
            what: "redirecting stdout to the log pipe",
        },
        Step::Dup2 {
            from: log_fd,
            to: 2,
            what: "redirecting stderr to the log pipe",
        },
        Step::Dup2 {
            from: null_fd,
            to: 0,
            what: "redirecting stdin to /dev/null",
        },
        Step::Chdir(cwd),
        Step::CloseOtherFds,
        Step::ResetSignals,
    ]
}

/// Everything the child needs, kept alive in the parent until the child has exec'd or failed.
struct Prepared {
    plan: Vec<Step>,
    /// Namespace flags for the clone (`CLONE_VM` is always added, `CLONE_VFORK` when the
    /// caller waits for the exec and has no detached lower layer to make).
    clone_flags: libc::c_int,
    /// Index in `plan` of the overlay mount, when the chroot uses one.
    overlay_step: Option<usize>,
    /// The overlay's lower layer is made by the parent after the clone (`DetachedLower`).
    detached_lower: bool,
    /// [`SandboxSpec::announce`].
    announce: Option<RawFd>,
    /// [`SandboxSpec::cgroup`]; `plan[0]` is then the write to its `cgroup.procs`, which a
    /// child born in the cgroup skips.
    cgroup: Option<PathBuf>,
    // Held only so that the pointers and descriptors in `plan` stay valid.
    _chroot: Option<chroot::Prepared>,
}

fn prepare(
    spec: &SandboxSpec,
    null_fd: RawFd,
    store_mode: chroot::StoreMode,
) -> Result<Prepared, SandboxError> {
    let cwd = path_cstring("working directory", &spec.cwd)?;
    let log_fd = spec.log_fd.as_raw_fd();
    if spec.announce == Some(log_fd) {
        // The child closes the announcing descriptor before it redirects its output.
        return Err(SandboxError::InvalidSpec(
            "the announcing descriptor is the log pipe".into(),
        ));
    }
    // Into the build's cgroup before anything else: before it could fork.
    let mut enter_cgroup = Vec::new();
    if let Some(dir) = &spec.cgroup {
        enter_cgroup.push(Step::WriteExisting {
            path: path_cstring("cgroup", &dir.join("cgroup.procs"))?,
            contents: b"0".to_vec(),
        });
    }
    match &spec.isolation {
        Isolation::Plain => {
            let mut plan = enter_cgroup;
            plan.push(Step::Setsid);
            plan.extend(stdio_steps(log_fd, null_fd, cwd));
            plan.extend(spec.personality.steps());
            if let Some(u) = &spec.user {
                plan.extend(user_steps(u));
            }
            plan.push(exec_step(spec)?);
            Ok(Prepared {
                plan,
                clone_flags: 0,
                overlay_step: None,
                detached_lower: false,
                announce: spec.announce,
                cgroup: spec.cgroup.clone(),
                _chroot: None,
            })
        }
        Isolation::Chroot(c) => {
            let user = match (&spec.user, &c.user_namespace) {
                (Some(_), Some(_)) => {
                    return Err(SandboxError::InvalidSpec(
                        "a build user and a user namespace of the caller's together".into(),
                    ))
                }
                (Some(u), None) => Some(user_steps(u)),
                // The ids are mapped already (the namespace's first steps): these switch
                // nothing, they check that the maps took (no setgroups: it is denied).
                (None, Some(ns)) if !ns.by_parent() => Some(vec![
                    Step::SetGid(ns.inside_gid),
                    Step::SetUid(ns.inside_uid),
                ]),
                // Mapped by the parent: the switch came right after the maps (see
                // `chroot::prepare`), before any file was made.
                (None, Some(_)) => None,
                (None, None) => None,
            };
            let mut prep = chroot::prepare(c, spec.user.as_ref(), store_mode)?;
            // The new session first, as Nix's child does: besides detaching from any terminal
            // it moves the child into a scheduling group of its own (autogroup) before the
            // setup, instead of sharing the worker's while the worker goes on (`start`).
            let mut plan = enter_cgroup;
            let shift = plan.len() + 1;
            plan.push(Step::Setsid);
            let ns_steps = std::mem::take(&mut prep.ns_steps);
            plan.extend(ns_steps);
            plan.extend(stdio_steps(log_fd, null_fd, cwd));
            plan.extend(spec.personality.steps());
            plan.extend(prep.privilege_steps(user));
            plan.push(exec_step(spec)?);
            Ok(Prepared {
                plan,
                clone_flags: prep.clone_flags,
                // Shifted by the Setsid (and the cgroup step) in front.
                overlay_step: prep.overlay_step.map(|i| i + shift),
                detached_lower: prep.lower.is_some(),
                announce: spec.announce,
                cgroup: spec.cgroup.clone(),
                _chroot: Some(prep),
            })
        }
    }
}

/// What the child gets: pointers into memory the parent keeps alive (and unchanged) until
/// the child has exec'd or exited.
struct ChildArgs {
    plan: *const Step,
    plan_len: usize,
    err_fd: RawFd,
    /// Shared memory for [`spawn_traced`]'s time stamps, or null.
    trace: *mut u64,
    /// [`SandboxSpec::announce`], or -1.
    announce: RawFd,
    /// The child's pid in the parent's PID namespace, stored by the kernel
    /// (`CLONE_PARENT_SETTID`) before the child first runs: the child's own `getpid` would say
    /// 1 in a new PID namespace.
    pid: std::sync::atomic::AtomicI32,
    /// How many steps at the start of the plan the clone did already (1: the cgroup step, for
    /// a child born in its cgroup). Failures are still reported by their index in the plan.
    skip: usize,
}

/// Runs each step through `inner` and stores the CLOCK_MONOTONIC time after step `i` in
/// `slots[i + 1]` (shared memory the parent reads back): no allocation, so it is as safe in
/// the child as the steps themselves.
struct Traced<S> {
    inner: S,
    slots: *mut u64,
    next: usize,
}

impl<S: plan::Syscalls> plan::Syscalls for Traced<S> {
    fn run(&mut self, step: &Step) -> Result<(), Errno> {
        let r = self.inner.run(step);
        self.next += 1;
        // SAFETY: the parent sized the mapping for one slot per step plus one.
        unsafe { self.slots.add(self.next).write_volatile(monotonic_ns()) };
        r
    }
}

fn monotonic_ns() -> u64 {
    // SAFETY: clock_gettime fills the zeroed timespec; async-signal-safe.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points at a ChildArgs of the parent's. The child shares the parent's
    // memory (CLONE_VM), and the parent keeps the ChildArgs, the plan and this stack alive and
    // unchanged until this child has exec'd or exited: suspended in clone(2) with
    // CLONE_VFORK, or owning them in the Builder's `Pending` otherwise.
    let args = unsafe { &*(arg as *const ChildArgs) };
    // Before anything that could fork or wait: see `announce`.
    announce(args);
    // SAFETY: the parent's plan, alive and unchanged as said above.
    let plan = unsafe { std::slice::from_raw_parts(args.plan, args.plan_len) };
    let skip = args.skip.min(plan.len());
    let result = if args.trace.is_null() {
        plan::run_plan(&mut Kernel::default(), &plan[skip..])
    } else {
        let now = monotonic_ns();
        // Slot 0: when the child started running; the skipped steps took none of its time.
        for k in 0..=skip {
            // SAFETY: slots 0..=skip of the parent's mapping, which has one per step plus one.
            unsafe { args.trace.add(k).write_volatile(now) };
        }
        let mut traced = Traced {
            inner: Kernel::default(),
            slots: args.trace,
            next: skip,
        };
        plan::run_plan(&mut traced, &plan[skip..])
    };
    let (index, errno) = match result {
        Err((i, e)) => (i + skip, e),
        // The plan ends in an exec, so getting here means the plan was empty.
        Ok(()) => (plan.len(), Errno::EINVAL),
    };
    let mut record = [0u8; 8];
    record[..4].copy_from_slice(&(index as u32).to_le_bytes());
    record[4..].copy_from_slice(&(errno as i32).to_le_bytes());
    // SAFETY: raw write and exit_group (see the `sys` module: no errno), on our own buffer.
    unsafe {
        let _ = sys::sys(
            libc::SYS_write,
            [
                sys::i(args.err_fd),
                sys::p(record.as_ptr()),
                record.len(),
                0,
                0,
                0,
            ],
        );
        sys::raw(
            libc::SYS_exit_group,
            [sys::i(SETUP_FAILED_EXIT), 0, 0, 0, 0, 0],
        );
        // exit_group does not return.
        libc::_exit(SETUP_FAILED_EXIT)
    }
}

/// `"<sign><pid>\n"` into `buf` (no allocation: the child uses it); returns its length.
fn pid_line(sign: u8, pid: i32, buf: &mut [u8; 16]) -> usize {
    let mut digits = [0u8; 10];
    let mut n = 0;
    let mut v = pid.unsigned_abs();
    loop {
        digits[n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    buf[0] = sign;
    for k in 0..n {
        buf[1 + k] = digits[n - 1 - k];
    }
    buf[1 + n] = b'\n';
    n + 2
}

/// The child's first action, when the spec asks for it ([`SandboxSpec::announce`]): its pid
/// line in one write, then its copy of the descriptor closed. The parent may die at any
/// instant after the clone; since the child holds a copy of the descriptor until here, a
/// reader of the other end of a pipe cannot see its end of file before this line, and the
/// child has neither forked nor left its parent's session yet. Raw calls on our own stack
/// only (see `sys`).
fn announce(args: &ChildArgs) {
    if args.announce < 0 {
        return;
    }
    let mut line = [0u8; 16];
    let n = pid_line(b'+', args.pid.load(Ordering::Acquire), &mut line);
    // SAFETY: write(2) from our own buffer, close(2) of our own copy of the descriptor (the
    // descriptor table is the child's own since the clone), rt_sigtimedwait(2) on our stack.
    unsafe {
        let written = sys::sys(
            libc::SYS_write,
            [sys::i(args.announce), sys::p(line.as_ptr()), n, 0, 0, 0],
        );
        if written == Err(Errno::EPIPE) {
            // The kernel also queued SIGPIPE for us, blocked (everything is, from before the
            // clone): once `ResetSignals` restores the default action and empties the mask it
            // would kill the builder. Nobody reads the line (the watchdog is gone); the build
            // goes on without it, as it would have before this line existed.
            let set: KernelSigset = 1 << (libc::SIGPIPE - 1);
            let no_wait = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            let _ = sys::sys(
                libc::SYS_rt_sigtimedwait,
                [
                    sys::p(&set as *const KernelSigset),
                    0,
                    sys::p(&no_wait as *const libc::timespec),
                    std::mem::size_of::<KernelSigset>(),
                    0,
                    0,
                ],
            );
        }
        let _ = sys::sys(libc::SYS_close, [sys::i(args.announce), 0, 0, 0, 0, 0]);
    }
}

/// Takes back the child's `+` line once a failing spawn/start has reaped it (see
/// [`SandboxSpec::announce`]), so that a watchdog does not keep a pid that may be reused.
fn retract(announce: Option<RawFd>, pid: Pid) {
    if let Some(fd) = announce {
        let mut line = [0u8; 16];
        let n = pid_line(b'-', pid.as_raw(), &mut line);
        // A failure means nobody reads the lines any more; nothing to take back then.
        // SAFETY: write(2) from our own buffer to a descriptor the caller keeps open.
        let _ = unsafe { libc::write(fd, line.as_ptr().cast(), n) };
    }
}

fn sys_err(step: &str) -> SandboxError {
    SandboxError::Process {
        step: step.to_string(),
        errno: Errno::last(),
    }
}

fn pipe_cloexec() -> Result<(OwnedFd, OwnedFd), SandboxError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == -1 {
        return Err(sys_err("creating the setup error pipe"));
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Reads the child's (step, errno) record; `None` when the pipe closed empty (the exec worked).
fn read_record(fd: &OwnedFd) -> Result<Option<(usize, Errno)>, SandboxError> {
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: reading into the unfilled tail of `buf`.
        let n = unsafe {
            libc::read(
                fd.as_raw_fd(),
                buf[got..].as_mut_ptr().cast(),
                buf.len() - got,
            )
        };
        match n {
            -1 if Errno::last() == Errno::EINTR => continue,
            // Non-blocking (a started child, read after it exited): nothing was written.
            -1 if Errno::last() == Errno::EAGAIN && got == 0 => break,
            -1 => return Err(sys_err("reading the setup error pipe")),
            0 => break,
            n => got += n as usize,
        }
    }
    match got {
        0 => Ok(None),
        8 => {
            let index = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            let errno = Errno::from_raw(i32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]));
            Ok(Some((index, errno)))
        }
        n => Err(SandboxError::Process {
            step: format!("reading the setup error pipe: truncated record of {n} bytes"),
            errno: Errno::EIO,
        }),
    }
}

/// Stack for the cloned child. It only runs the plan, which needs a few kilobytes.
const CHILD_STACK: usize = 256 * 1024;

/// Starts the builder described by `spec`. Returns once it has exec'd, or with the failing step.
pub fn spawn(spec: SandboxSpec) -> Result<Builder, SandboxError> {
    spawn_with(spec, chroot::StoreMode::Auto, None, true)
}

/// Starts the builder described by `spec` and returns as soon as the child is running, while it
/// still sets up its sandbox: the caller goes on with other work instead of waiting about a
/// millisecond or more per chroot build. A step that fails after the return makes the child
/// exit (status 189) and is reported by [`Builder::wait`] / [`Builder::try_wait`] as
/// [`SandboxError::Setup`] naming the step, exactly as `spawn` would have (for a plain
/// builder too: a builder that cannot be executed is reported by `wait`). Failures the parent
/// finds itself (a missing bind source, an invalid spec) still come from `start`. Where the child cannot safely run beside the parent (no raw
/// system calls for this architecture) or the first overlay mount of the process is still to
/// be proven, this waits for the exec like `spawn`.
pub fn start(spec: SandboxSpec) -> Result<Builder, SandboxError> {
    spawn_with(spec, chroot::StoreMode::Auto, None, false)
}

/// Whether the parent may make the overlay's lower layer in a detached tmpfs while the child
/// sets up the rest (the default, where the kernel allows it), or the child makes it itself,
/// as on kernels before 6.15. Process-wide; for `cargo xtask bench sandbox`, which measures
/// both, and for the tests of the fallback.
#[doc(hidden)]
pub fn set_detached_lower(allowed: bool) {
    chroot::disable_detached_lower(!allowed);
}

/// How long each part of one [`spawn_traced`] took, in order.
#[derive(Clone, Debug, Default)]
pub struct SetupTrace {
    /// `("preparing", ..)` (the parent's work before the clone), `("clone", ..)` (until the
    /// child runs), one entry per setup step named as in [`SandboxError::Setup`], and
    /// `("exec", ..)` (until the parent saw the error pipe close).
    pub steps: Vec<(String, Duration)>,
    /// What the parent did after the clone while the child went through `steps` (not part of
    /// their sum): making the overlay's mount points in a detached lower layer.
    pub parallel: Vec<(String, Duration)>,
}

/// [`spawn`], also timing every step between the call and the exec (for `cargo xtask bench
/// sandbox`). The child writes a time stamp after each step into memory shared with the
/// parent; otherwise it runs exactly as under `spawn`.
pub fn spawn_traced(spec: SandboxSpec) -> Result<(Builder, SetupTrace), SandboxError> {
    let mut trace = SetupTrace::default();
    let b = spawn_with(spec, chroot::StoreMode::Auto, Some(&mut trace), true)?;
    Ok((b, trace))
}

fn spawn_with(
    spec: SandboxSpec,
    mode: chroot::StoreMode,
    mut trace: Option<&mut SetupTrace>,
    wait_for_exec: bool,
) -> Result<Builder, SandboxError> {
    let t0 = monotonic_ns();
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|source| SandboxError::Prepare {
            step: "opening /dev/null".into(),
            source,
        })?;
    let prepared = Box::new(prepare(&spec, null.as_raw_fd(), mode)?);
    let overlay_step = prepared.overlay_step;
    let detached_lower = prepared.detached_lower;
    // A plain builder is not waited for either: its exec is quick, but under load the
    // caller's thread would sleep until the child got a CPU (BENCHMARKS.md, "sandbox: `start`
    // without waiting for a plain builder's exec"). An overlay (of each kind) is only trusted once one
    // has worked in this process, because a failed one is retried another way.
    let sync = wait_for_exec
        || trace.is_some()
        || !sys::AVAILABLE
        || (overlay_step.is_some() && !chroot::overlay_proven(detached_lower));
    let slots = match trace {
        Some(_) => Some(TraceSlots::new(prepared.plan.len() + 1)?),
        None => None,
    };
    let t1 = monotonic_ns();
    let mut parent_steps = Vec::new();
    let (result, prepared) = spawn_prepared(prepared, slots.as_ref(), sync, &mut parent_steps);
    if let (Some(t), Some(slots), Some(prepared)) = (trace.as_deref_mut(), &slots, &prepared) {
        t.steps = slots.collect(&prepared.plan, t0, t1, monotonic_ns());
        t.parallel = parent_steps;
    }
    match result {
        Err((index, e)) if index.is_some() && index == overlay_step => {
            // This kernel or file system cannot do the overlay: set the build up again with
            // the lower layer made by the child (when it was a detached one) or with the store
            // directory bound, and do not try that kind of overlay again.
            chroot::overlay_failed(detached_lower);
            drop(prepared);
            if let Isolation::Chroot(c) = &spec.isolation {
                std::fs::remove_dir_all(&c.root).map_err(|source| SandboxError::Prepare {
                    step: format!(
                        "removing {} after a failed overlay mount ({e})",
                        c.root.display()
                    ),
                    source,
                })?;
            }
            let mode = if detached_lower {
                mode
            } else {
                chroot::StoreMode::Bind
            };
            spawn_with(spec, mode, trace, wait_for_exec)
        }
        Err((_, e)) => Err(e),
        // Our copies of the log pipe's write end and /dev/null go when `spec` and `null` are
        // dropped here: the caller must see EOF once the builder is gone (the child has
        // copies of its own).
        Ok(b) => {
            if sync && overlay_step.is_some() {
                chroot::overlay_worked(detached_lower);
            }
            Ok(b)
        }
    }
}

/// What a child started by [`start`] still uses while it sets up its sandbox: it shares our
/// memory and reads these until it has exec'd. Dropped only after the child has been reaped.
struct Pending {
    err_read: OwnedFd,
    prepared: Box<Prepared>,
    _args: Box<ChildArgs>,
    _stack: stack::ChildStack,
}

// SAFETY: the raw pointers in the plan and the ChildArgs point into memory this struct owns
// (or into the filter it owns) and are only read, by the child; on our side only `failure`
// looks at the plan, reading. So a Builder stays Send and Sync as it was.
unsafe impl Send for Pending {}
// SAFETY: as for `Send` just above.
unsafe impl Sync for Pending {}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("steps", &self.prepared.plan.len())
            .finish()
    }
}

impl Pending {
    /// The failed step's description, once the child has exited; `None` when it exec'd.
    fn failure(&self) -> Result<Option<(String, Errno)>, SandboxError> {
        Ok(read_record(&self.err_read)?.map(|(index, errno)| {
            let step = self
                .prepared
                .plan
                .get(index)
                .map(Step::describe)
                .unwrap_or_else(|| format!("unknown setup step {index}"));
            (step, errno)
        }))
    }
}

/// The result of [`spawn_prepared`], and the plan back when the builder does not keep it.
type Spawned = (
    Result<Builder, (Option<usize>, SandboxError)>,
    Option<Box<Prepared>>,
);

/// Clones the child that runs `prepared.plan`. With `sync`, waits for its exec (a failure in
/// the child comes with the index of its step); otherwise the builder keeps the plan and its
/// outcome comes with the exit status.
fn spawn_prepared(
    mut prepared: Box<Prepared>,
    trace: Option<&TraceSlots>,
    sync: bool,
    parent_steps: &mut Vec<(String, Duration)>,
) -> Spawned {
    let (err_read, err_write) = match pipe_cloexec() {
        Ok(p) => p,
        Err(e) => return (Err((None, e)), Some(prepared)),
    };
    if !sync {
        // Read once the child has exited: whatever it wrote is there, and a write end kept
        // open elsewhere (a descriptor leaked into a fork) must not block us.
        if let Err(e) = set_nonblocking(&err_read) {
            return (Err((None, e)), Some(prepared));
        }
    }
    let mut args = Box::new(ChildArgs {
        plan: prepared.plan.as_ptr(),
        plan_len: prepared.plan.len(),
        err_fd: err_write.as_raw_fd(),
        trace: trace.map_or(std::ptr::null_mut(), |t| t.ptr),
        announce: prepared.announce.unwrap_or(-1),
        pid: std::sync::atomic::AtomicI32::new(0),
        skip: 0,
    });
    let stack = match stack::ChildStack::new(CHILD_STACK) {
        Ok(s) => s,
        Err(e) => {
            let e = SandboxError::Process {
                step: "mapping the setup stack".to_string(),
                errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::ENOMEM)),
            };
            return (Err((None, e)), Some(prepared));
        }
    };
    // The stack grows down on every architecture Linux runs nixb on.
    let top = stack.top();
    // A fork copies the page tables of the whole worker and then takes a copy-on-write fault
    // for every page either side touches until the child has exec'd, a cost that grows with
    // the worker's size. Sharing the address space copies nothing. The child's stack, `args`
    // and the plan must then stay put until it has exec'd or exited: with CLONE_VFORK this
    // thread is suspended until then; without it (`start`), the Builder owns them until the
    // child is reaped. Either way the child must not run any code of ours that could touch
    // shared state: the plan makes raw system calls only (the `sys` module: not even errno,
    // which it would share with this thread), on data prepared above, writing only its own
    // stack, the trace mapping and, with a detached lower layer, two words of ours meant
    // for it (atomic stores: `arrived`, `mounted`); it reads its pid from `args.pid`, stored
    // by the kernel before the child first ran (`announce`); and all signals stay blocked from here until its
    // ResetSignals step has put every disposition back to the default, so no handler of the
    // parent's can run on the child's stack in our memory. Namespaces, mounts, the root,
    // credentials, capabilities, the seccomp filter and the personality are per task (no
    // CLONE_FS, CLONE_FILES, CLONE_SIGHAND or CLONE_THREAD), so none of the chroot steps
    // reaches this process; the child's descriptor table is a copy taken at the clone.
    let blocked = match block_all_signals() {
        Ok(b) => b,
        Err(e) => return (Err((None, e)), Some(prepared)),
    };
    // With a detached lower layer the parent has work to do while the child runs, so it must
    // not be suspended; it then waits for the exec on the error pipe instead.
    let parent_maps = prepared
        ._chroot
        .as_ref()
        .is_some_and(|c| c.id_maps.is_some());
    let vfork = if sync && !prepared.detached_lower && !parent_maps {
        libc::CLONE_VFORK
    } else {
        0
    };
    let flags = prepared.clone_flags | libc::CLONE_VM | vfork | libc::CLONE_PARENT_SETTID;
    let cloned = match &prepared.cgroup {
        Some(dir) => clone_into_cgroup(dir, flags, &mut args, &stack),
        None => Cloned::NotTried(None),
    };
    let (pid, cgroup_entry) = match cloned {
        Cloned::Born(pid) => (Ok(pid), Some(CgroupEntry::Clone3)),
        Cloned::Failed(e) => (Err(e), None),
        Cloned::NotTried(refused) => {
            args.skip = 0;
            // SAFETY: as above; child_main never returns into the parent's code (it execs or
            // exits).
            let pid = unsafe {
                libc::clone(
                    child_main,
                    top as *mut libc::c_void,
                    flags | libc::SIGCHLD,
                    &*args as *const ChildArgs as *mut libc::c_void,
                    // The kernel stores the new pid here (as this namespace numbers it) before
                    // the child is first woken, so the child reads it in `announce` (C probe
                    // on 6.18: 2000 clones each with and without CLONE_NEWPID, the child's
                    // first read always equal to clone's return; its getpid says 1 in the new
                    // namespace).
                    args.pid.as_ptr(),
                )
            };
            let pid = if pid == -1 {
                Err(SandboxError::Process {
                    step: "cloning the builder process".into(),
                    errno: Errno::last(),
                })
            } else {
                Ok(pid)
            };
            let entry = prepared
                .cgroup
                .as_ref()
                .map(|_| CgroupEntry::Procs { refused });
            (pid, entry)
        }
    };
    restore_signal_mask(blocked);
    let pid = match pid {
        Ok(pid) => pid,
        Err(e) => return (Err((None, e)), Some(prepared)),
    };
    let pid = Pid::from_raw(pid);
    // Our copy of the write end must go, or we would never see EOF.
    drop(err_write);
    let own_pid_ns = prepared.clone_flags & libc::CLONE_NEWPID != 0;
    let pidfd = match pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) => {
            // Reaped before anything the child uses is freed (below, on return).
            if reap_after_failure(pid) {
                retract(prepared.announce, pid);
            }
            return (Err((None, e)), Some(prepared));
        }
    };
    let mut builder = Builder {
        pid,
        pidfd,
        own_pid_ns,
        status: None,
        pending: None,
        setup_error: None,
        work_dir: prepared._chroot.as_ref().and_then(|c| c.work_dir.clone()),
        usage: None,
        cgroup: prepared.cgroup.clone(),
        cgroup_entry,
    };
    if let Some(maps) = prepared._chroot.as_mut().and_then(|c| c.id_maps.as_mut()) {
        // The child waits for these first of all.
        if let Err(e) = maps.write(pid.as_raw()) {
            let _ = builder.kill();
            let _ = builder.wait();
            builder.retract_if_reaped(prepared.announce);
            drop(stack);
            drop(args);
            return (Err((None, e)), Some(prepared));
        }
    }
    if let Some(lower) = prepared._chroot.as_mut().and_then(|c| c.lower.as_mut()) {
        // The child meanwhile sets up everything up to the overlay mount, where it waits.
        let t = std::time::Instant::now();
        let populated = lower.populate();
        parent_steps.push((
            "parent: mount points in the detached lower layer".into(),
            t.elapsed(),
        ));
        if let Err(e) = populated {
            // The child was told to stop at its waiting step; it is reaped before the memory
            // it runs on (stack, plan, arguments) goes.
            let _ = builder.kill();
            let _ = builder.wait();
            builder.retract_if_reaped(prepared.announce);
            drop(stack);
            drop(args);
            return (Err((None, e)), Some(prepared));
        }
    }
    if !sync {
        builder.pending = Some(Box::new(Pending {
            err_read,
            prepared,
            _args: args,
            _stack: stack,
        }));
        return (Ok(builder), None);
    }
    // Until the exec (the error pipe's write end closes with it) or a failure record. Under
    // CLONE_VFORK that has happened already; otherwise the read waits for it.
    let result = match read_record(&err_read) {
        Ok(None) => Ok(builder),
        Ok(Some((index, errno))) => {
            let _ = builder.wait();
            builder.retract_if_reaped(prepared.announce);
            let step = prepared
                .plan
                .get(index)
                .map(Step::describe)
                .unwrap_or_else(|| format!("unknown setup step {index}"));
            Err((Some(index), SandboxError::Setup { step, errno }))
        }
        Err(e) => {
            let _ = builder.kill();
            let _ = builder.wait();
            builder.retract_if_reaped(prepared.announce);
            Err((None, e))
        }
    };
    // The child is done with its stack and arguments: it has exec'd, or exited and been
    // reaped (a child killed by someone else closes the pipe only as it exits, after its last
    // instruction).
    drop(stack);
    drop(args);
    (result, Some(prepared))
}

/// What [`clone_into_cgroup`] did.
enum Cloned {
    /// The child was born in its cgroup; its pid.
    Born(libc::pid_t),
    /// Not tried, or the kernel has no such clone (the errno it answered, when it was asked):
    /// the caller clones the old way and the child writes `cgroup.procs` itself.
    NotTried(Option<Errno>),
    /// The kernel refused the clone for another reason; no child.
    Failed(SandboxError),
}

/// Clones the child straight into its cgroup `dir` with `clone3(CLONE_INTO_CGROUP)` (Linux
/// 5.7), so that it skips the plan's first step, the write to `cgroup.procs`: the kernel then
/// charges the child to the cgroup from its birth, and no write has to move it (a move takes
/// a lock every fork and exit in the system waits for). Where the kernel answers that it has
/// no `clone3` (`ENOSYS`: before 5.3, or a seccomp filter that hides it) or no such flag
/// (`E2BIG` or `EINVAL`: before 5.7), this process stops asking and its builders enter their
/// cgroups the old way; [`Builder::cgroup_entry`] says which way a builder took, and why.
fn clone_into_cgroup(
    dir: &Path,
    flags: libc::c_int,
    args: &mut ChildArgs,
    stack: &stack::ChildStack,
) -> Cloned {
    if let Err(refused) = cgroup::clone_into_allowed() {
        return Cloned::NotTried(refused);
    }
    let cgroup = match std::fs::File::open(dir) {
        Ok(f) => f,
        Err(e) => {
            return Cloned::Failed(SandboxError::Process {
                step: format!("opening the build's cgroup {}", dir.display()),
                errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            })
        }
    };
    args.skip = 1;
    let lowest = stack.lowest() as u64;
    let ca = sys::CloneArgs {
        flags: flags as u32 as u64 | sys::CLONE_INTO_CGROUP,
        // Stored by the kernel before the child first runs, as with clone's CLONE_PARENT_SETTID.
        parent_tid: args.pid.as_ptr() as u64,
        exit_signal: libc::SIGCHLD as u64,
        stack: lowest,
        stack_size: stack.top() as u64 - lowest,
        cgroup: cgroup.as_raw_fd() as u64,
        ..sys::CloneArgs::default()
    };
    // SAFETY: the stack is a mapping of ours whose top is 16-aligned; `args`, the plan and the
    // stack stay alive and unchanged until the child has exec'd or exited (see
    // `spawn_prepared`, which holds them); child_main never returns into our code.
    let r = unsafe { sys::clone3(&ca, child_main, args as *mut ChildArgs as *mut libc::c_void) };
    match r {
        Ok(pid) => Cloned::Born(pid),
        Err(e @ (Errno::ENOSYS | Errno::E2BIG | Errno::EINVAL)) => {
            cgroup::clone_into_refused(e);
            Cloned::NotTried(Some(e))
        }
        Err(errno) => Cloned::Failed(SandboxError::Process {
            step: format!("cloning the builder process into cgroup {}", dir.display()),
            errno,
        }),
    }
}

fn set_nonblocking(fd: &OwnedFd) -> Result<(), SandboxError> {
    // SAFETY: fcntl on a descriptor we own.
    let r = unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags == -1 {
            -1
        } else {
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK)
        }
    };
    if r == -1 {
        return Err(sys_err("making the setup error pipe non-blocking"));
    }
    Ok(())
}

/// Shared anonymous memory, one u64 time stamp per slot, written by the child of
/// [`spawn_traced`] (slot 0 when it starts, slot i + 1 after step i).
struct TraceSlots {
    ptr: *mut u64,
    len: usize,
}

impl TraceSlots {
    fn new(len: usize) -> Result<TraceSlots, SandboxError> {
        // SAFETY: a fresh anonymous shared mapping, zero-filled by the kernel.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len * 8,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(sys_err("mapping memory for the setup trace"));
        }
        Ok(TraceSlots { ptr: p.cast(), len })
    }

    /// Durations between consecutive stamps; steps the child never finished are left out.
    fn collect(&self, plan: &[Step], start: u64, cloned: u64, end: u64) -> Vec<(String, Duration)> {
        let ns = |a: u64, b: u64| Duration::from_nanos(b.saturating_sub(a));
        // SAFETY: reads within the mapping; the child is done writing (it exec'd or exited).
        let at = |i: usize| unsafe { self.ptr.add(i).read_volatile() };
        let mut out = vec![("preparing".to_string(), ns(start, cloned))];
        let child_start = at(0);
        if child_start == 0 {
            return out;
        }
        out.push(("clone".into(), ns(cloned, child_start)));
        let mut last = child_start;
        for (i, step) in plan.iter().enumerate().take(self.len - 1) {
            let t = at(i + 1);
            if t == 0 {
                // The exec (or a failed step's exit) writes no stamp: the rest is its time.
                out.push(("exec".into(), ns(last, end)));
                break;
            }
            out.push((step.describe(), ns(last, t)));
            last = t;
        }
        out
    }
}

impl Drop for TraceSlots {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len * 8) };
    }
}

/// The kernel's signal set as `rt_sigprocmask(2)` takes it: one bit per signal, 64 signals.
type KernelSigset = u64;

/// Blocks every signal in the calling thread and returns the previous mask. This is the raw
/// syscall, not `pthread_sigmask`, because glibc's wrapper refuses to block the two signals
/// it keeps for itself, and nothing at all may run a handler in a child sharing our memory.
fn block_all_signals() -> Result<KernelSigset, SandboxError> {
    let all: KernelSigset = !0;
    let mut old: KernelSigset = 0;
    // SAFETY: both sets are 8 bytes, the size passed; SIGKILL and SIGSTOP are silently
    // left unblocked by the kernel.
    let r = unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &all as *const KernelSigset,
            &mut old as *mut KernelSigset,
            std::mem::size_of::<KernelSigset>(),
        )
    };
    if r == -1 {
        return Err(sys_err("blocking signals around clone"));
    }
    Ok(old)
}

fn restore_signal_mask(old: KernelSigset) {
    // SAFETY: as in block_all_signals. Setting a mask we read back before cannot fail.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &old as *const KernelSigset,
            std::ptr::null_mut::<KernelSigset>(),
            std::mem::size_of::<KernelSigset>(),
        );
    }
}

/// Kills and reaps our child; whether it was reaped.
fn reap_after_failure(pid: Pid) -> bool {
    // SAFETY: plain kill/waitpid on our own unreaped child.
    unsafe {
        libc::kill(pid.as_raw(), libc::SIGKILL);
        loop {
            if libc::waitpid(pid.as_raw(), std::ptr::null_mut(), 0) == pid.as_raw() {
                return true;
            }
            if Errno::last() != Errno::EINTR {
                return false;
            }
        }
    }
}

fn pidfd_open(pid: Pid) -> Result<OwnedFd, SandboxError> {
    // SAFETY: pidfd_open returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if fd == -1 {
        return Err(sys_err(&format!("opening a pidfd for process {pid}")));
    }
    // SAFETY: a fresh descriptor nobody else owns (pidfds are close-on-exec).
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// What a builder used, from the kernel's accounting when it was reaped (`wait4`'s rusage):
/// the builder and every descendant it waited for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResourceUsage {
    /// CPU time in user mode.
    pub user: Duration,
    /// CPU time in the kernel.
    pub system: Duration,
    /// The largest resident set of any one of the processes (`ru_maxrss`), in bytes.
    pub peak_memory: u64,
    /// Bytes read from storage (`ru_inblock` blocks of 512 bytes; reads served from the
    /// page cache are not counted).
    pub read_bytes: u64,
    /// Bytes written to storage (`ru_oublock` blocks of 512 bytes, counted when the pages
    /// are dirtied).
    pub written_bytes: u64,
}

impl ResourceUsage {
    fn from_rusage(ru: &libc::rusage) -> ResourceUsage {
        let tv = |t: libc::timeval| {
            Duration::from_secs(t.tv_sec.max(0) as u64)
                + Duration::from_micros(t.tv_usec.max(0) as u64)
        };
        ResourceUsage {
            user: tv(ru.ru_utime),
            system: tv(ru.ru_stime),
            peak_memory: (ru.ru_maxrss.max(0) as u64) * 1024,
            read_bytes: (ru.ru_inblock.max(0) as u64) * 512,
            written_bytes: (ru.ru_oublock.max(0) as u64) * 512,
        }
    }
}

/// How long a reaped builder's cgroup may take to empty after `cgroup.kill` (the kernel kills
/// at once; exiting processes with much memory take a moment to be torn down).
const CGROUP_DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// A running builder. Dropping it kills and reaps it, so that it cannot outlive its build.
#[derive(Debug)]
pub struct Builder {
    pub pid: Pid,
    pidfd: OwnedFd,
    /// The builder is PID 1 of its own PID namespace: killing it kills everything inside.
    own_pid_ns: bool,
    status: Option<ExitStatus>,
    /// A child from [`start`] that may still be setting up: what it uses, kept until reaped.
    pending: Option<Box<Pending>>,
    /// The step that failed in a child from [`start`], found when it was reaped.
    setup_error: Option<(String, Errno)>,
    /// The overlay work directory beside the chroot (overlay mode), removed once reaped.
    work_dir: Option<PathBuf>,
    /// What it used, once reaped.
    usage: Option<ResourceUsage>,
    /// Its cgroup, until it has been emptied and removed after the reaping.
    cgroup: Option<PathBuf>,
    /// How it got into its cgroup, when it has one.
    cgroup_entry: Option<CgroupEntry>,
}

impl AsFd for Builder {
    /// The pidfd: readable (POLLIN) once the builder has exited.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }
}

impl Builder {
    /// Takes charge of a child this process started some other way (`std::process` with
    /// `setsid` before exec, e.g. a substituter or build hook whose pipes the caller wires
    /// itself): it is then polled, killed (with its process group) and reaped like a plain
    /// builder. The caller must not wait for it elsewhere.
    pub fn adopt(pid: Pid) -> Result<Builder, SandboxError> {
        let pidfd = pidfd_open(pid)?;
        Ok(Builder {
            pid,
            pidfd,
            own_pid_ns: false,
            status: None,
            pending: None,
            setup_error: None,
            work_dir: None,
            usage: None,
            cgroup: None,
            cgroup_entry: None,
        })
    }

    /// For a failing spawn/start: the `-` line, once (and only if) the child is reaped; a
    /// live one must stay listed.
    fn retract_if_reaped(&self, announce: Option<RawFd>) {
        if self.status.is_some() {
            retract(announce, self.pid);
        }
    }

    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// SIGKILLs everything in the sandbox: the PID namespace (through its init, the builder) in
    /// chroot mode, the builder's process group in plain mode. A no-op once reaped.
    pub fn kill(&mut self) -> Result<(), SandboxError> {
        if self.status.is_some() {
            return Ok(());
        }
        if !self.own_pid_ns {
            self.kill_group();
        }
        if let Some(dir) = &self.cgroup {
            // Everything the builder started, also what left its group and session.
            cgroup::kill(dir);
        }
        // Through the pidfd, so that a recycled pid can never be hit.
        // SAFETY: pidfd_send_signal on a descriptor we own.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r == -1 && Errno::last() != Errno::ESRCH {
            return Err(sys_err(&format!("killing builder {}", self.pid)));
        }
        Ok(())
    }

    fn kill_group(&self) {
        // The group id is the builder's pid (it called setsid). While the builder is unreaped
        // that number cannot be reused, so this cannot hit a stranger. ESRCH is fine.
        // SAFETY: kill(2) with a negative pid.
        unsafe { libc::kill(-self.pid.as_raw(), libc::SIGKILL) };
    }

    /// Blocks until the builder exits and returns its status. In plain mode, what is left of
    /// its process group is killed before it is reaped. For a builder from [`start`] whose
    /// setup failed, [`SandboxError::Setup`] naming the step (on every call).
    pub fn wait(&mut self) -> Result<ExitStatus, SandboxError> {
        match self.wait_inner(0)? {
            Some(s) => Ok(s),
            None => Err(SandboxError::Process {
                step: format!("waiting for builder {}", self.pid),
                errno: Errno::ECHILD,
            }),
        }
    }

    /// The exit status if the builder has exited, without blocking (or the setup failure, as
    /// for [`Builder::wait`]).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, SandboxError> {
        self.wait_inner(libc::WNOHANG)
    }

    fn wait_inner(&mut self, flags: libc::c_int) -> Result<Option<ExitStatus>, SandboxError> {
        if let Some(s) = self.status {
            return self.outcome(s);
        }
        // Look first without reaping (WNOWAIT), so the group can be killed while its id is
        // still pinned by the zombie leader.
        loop {
            // SAFETY: waitid fills a zeroed siginfo_t.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: `info` is a valid, writable siginfo_t; the pid is our unreaped child.
            let r = unsafe {
                libc::waitid(
                    libc::P_PID,
                    self.pid.as_raw() as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOWAIT | flags,
                )
            };
            if r == -1 {
                if Errno::last() == Errno::EINTR {
                    continue;
                }
                return Err(sys_err(&format!("waiting for builder {}", self.pid)));
            }
            // SAFETY: si_pid is valid for SIGCHLD-style siginfo from waitid.
            if unsafe { info.si_pid() } == 0 {
                return Ok(None); // WNOHANG and still running
            }
            break;
        }
        if !self.own_pid_ns {
            self.kill_group();
        }
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value; wait4 overwrites it.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: reaping our own child, known to have exited; wait4 fills `ru`.
            let r = unsafe { libc::wait4(self.pid.as_raw(), &mut status, 0, &mut ru) };
            if r == -1 {
                if Errno::last() == Errno::EINTR {
                    continue;
                }
                return Err(sys_err(&format!("reaping builder {}", self.pid)));
            }
            break;
        }
        let s = ExitStatus::from_raw(status);
        self.status = Some(s);
        let mut usage = ResourceUsage::from_rusage(&ru);
        if let Some(dir) = self.cgroup.take() {
            // What is left (a daemon that left the group and session) dies now; then the
            // figures of everything that ran in the cgroup replace the rusage's.
            let (cg, empty) = cgroup::finish(&dir, CGROUP_DRAIN_LIMIT);
            if empty {
                // Removed off this thread. One that would not empty is left in place: rmdir
                // cannot remove it, and its name says whose it was.
                cgroup::retire(dir);
            }
            usage.user = cg.user.unwrap_or(usage.user);
            usage.system = cg.system.unwrap_or(usage.system);
            usage.peak_memory = cg.peak_memory.unwrap_or(usage.peak_memory);
            usage.read_bytes = cg.read_bytes.unwrap_or(usage.read_bytes);
            usage.written_bytes = cg.written_bytes.unwrap_or(usage.written_bytes);
        }
        self.usage = Some(usage);
        // The child is gone, so nothing uses the plan or its stack any more, and the record
        // of a failed step, if any, is in the pipe.
        if let Some(p) = self.pending.take() {
            self.setup_error = p.failure()?;
        }
        if let Some(w) = self.work_dir.take() {
            // Only the kernel's empty work/work is left in it; the mount went with the
            // namespace. A failure leaves a directory behind and costs nothing else (the next
            // prepare of this root removes it), so it is not worth failing the build for.
            let _ = chroot::remove_overlay_work_dir(&w);
        }
        self.outcome(s)
    }

    /// How the builder got into its cgroup ([`SandboxSpec::cgroup`]); `None` without one.
    pub fn cgroup_entry(&self) -> Option<CgroupEntry> {
        self.cgroup_entry
    }

    /// What the builder and the descendants it waited for used, once it has been reaped
    /// (by [`Builder::wait`] or [`Builder::try_wait`]).
    pub fn resource_usage(&self) -> Option<ResourceUsage> {
        self.usage
    }

    fn outcome(&self, s: ExitStatus) -> Result<Option<ExitStatus>, SandboxError> {
        match &self.setup_error {
            Some((step, errno)) => Err(SandboxError::Setup {
                step: step.clone(),
                errno: *errno,
            }),
            None => Ok(Some(s)),
        }
    }
}

impl Drop for Builder {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.kill();
            let _ = self.wait();
        }
        if self.status.is_none() {
            // Not reaped (waiting failed): a started child might still be running on the stack
            // and plan in `pending`. Leaking them is the only safe thing left; freeing them
            // could let the child write into memory handed out again.
            if let Some(p) = self.pending.take() {
                std::mem::forget(p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_lines_are_sign_decimal_newline() {
        let mut buf = [0u8; 16];
        for (sign, pid, want) in [
            (b'+', 0, "+0\n"),
            (b'+', 7, "+7\n"),
            (b'-', 4194304, "-4194304\n"),
            (b'+', i32::MAX, "+2147483647\n"),
        ] {
            let n = pid_line(sign, pid, &mut buf);
            assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), want);
        }
    }
}
