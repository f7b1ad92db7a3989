//! The child's setup sequence as data.
//!
//! Everything the child will do between `clone` and `execve` is written down by the parent as a
//! list of [`Step`]s, with every path, C string and argument array already allocated. The child
//! then walks the list making one or two syscalls per step, and nothing else: no allocation, no
//! locks, no formatting (the parent may be multi-threaded, so after `clone` only
//! async-signal-safe work is sound; and every builder is cloned with `CLONE_VM`, sharing the
//! parent's memory until it execs, where any write outside its own stack would be the
//! parent's). When a step fails the child sends its *index* and the
//! errno to the parent, which turns the index back into a sentence with [`Step::describe`].
//!
//! Keeping the plan as data also lets the tests check the order (private propagation before the
//! first mount, `/proc` after the PID namespace exists, `pivot_root` after all mounts, setgroups
//! before setgid before setuid, seccomp last) without root and without forking.

use std::ffi::{c_char, CString};
use std::os::fd::RawFd;

use nix::errno::Errno;

/// Exit status of a child whose setup failed (the same number Nix uses for `childSetupFailed`).
pub(crate) const SETUP_FAILED_EXIT: i32 = 189;

/// An `execve` call with its argument and environment arrays built ahead of time.
pub(crate) struct Exec {
    pub program: CString,
    // The CStrings own the bytes; the pointer arrays point into their heap buffers, which do not
    // move when the Vecs holding them do.
    _args: Vec<CString>,
    _env: Vec<CString>,
    argv: Vec<*const c_char>,
    envp: Vec<*const c_char>,
}

impl Exec {
    pub fn new(program: CString, args: Vec<CString>, env: Vec<CString>) -> Exec {
        let argv = args
            .iter()
            .map(|a| a.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let envp = env
            .iter()
            .map(|a| a.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        Exec {
            program,
            _args: args,
            _env: env,
            argv,
            envp,
        }
    }
}

/// A mount(2) call.
pub(crate) struct Mount {
    pub source: Option<CString>,
    pub target: CString,
    pub fstype: Option<CString>,
    pub flags: libc::c_ulong,
    pub data: Option<CString>,
}

/// One thing the child does. Variants hold only prepared data.
pub(crate) enum Step {
    /// `mount(NULL, "/", NULL, MS_REC|MS_PRIVATE)`: without this, mounts below a shared subtree
    /// (systemd makes `/` shared) would propagate back into the host's namespace.
    MakeMountsPrivate,
    /// `setns` into a prepared network namespace (see `netns`).
    JoinNetNs(RawFd),
    /// Set IFF_UP on `lo` in a fresh network namespace, where it starts down.
    LoopbackUp,
    SetHostname(CString),
    SetDomainname(CString),
    /// A bind mount; `what` says what it is for in error messages.
    Mount {
        mount: Mount,
        what: &'static str,
    },
    /// `umask(0)`, remembering the old mask for [`Step::RestoreUmask`]: the inherited umask
    /// must not decide the modes of the sandbox's `/tmp` or `/etc`, and with a zero mask
    /// `mkdir` and `open` create them with the exact mode in one call (no `chmod` after).
    ClearUmask,
    /// Back to the umask [`Step::ClearUmask`] found: the builder inherits the caller's.
    RestoreUmask,
    /// `mkdir` with exactly `mode` (sticky bit included); only after [`Step::ClearUmask`].
    MkDir {
        path: CString,
        mode: libc::mode_t,
    },
    /// An empty file to bind a non-directory onto.
    MkFile(CString),
    Symlink {
        target: CString,
        link: CString,
    },
    /// A new file (mode 0644) with these contents, e.g. `/etc/passwd`.
    WriteFile {
        path: CString,
        contents: Vec<u8>,
    },
    /// `mount_setattr`: set (or clear) the read-only flag of the mount at `path`, and with
    /// `recursive` of every mount below it. Other mount flags (nosuid, nodev, noexec) stay as
    /// they are, which a `MS_REMOUNT` would have to be told about.
    SetReadOnly {
        path: CString,
        read_only: bool,
        recursive: bool,
    },
    /// `chdir(root); pivot_root(".", "."); umount2(".", MNT_DETACH); chdir("/")`.
    PivotRoot(CString),
    /// Own session and process group: no controlling terminal, no terminal signals, and the
    /// parent can kill the whole group.
    Setsid,
    Dup2 {
        from: RawFd,
        to: RawFd,
        what: &'static str,
    },
    Chdir(CString),
    /// Set close-on-exec on every descriptor from 3 up, so that nothing the parent leaked (other
    /// builders' pipes, database handles) reaches the builder. The error pipe is already
    /// close-on-exec and keeps working until the exec.
    CloseOtherFds,
    /// Back to default dispositions for ignored signals (Rust's runtime ignores SIGPIPE, and
    /// ignored signals survive exec) and caught ones (a child sharing the parent's memory must
    /// not run its handlers), then an empty signal mask.
    ResetSignals,
    Personality(libc::c_ulong),
    /// Keep the current personality and add these flags to it.
    AddPersonality(libc::c_ulong),
    SetGroups(Vec<libc::gid_t>),
    /// setgid, then check that the real and effective gid are the requested one.
    SetGid(libc::gid_t),
    /// setuid, then check that the real and effective uid are the requested one.
    SetUid(libc::uid_t),
    /// Drop capabilities 0..=last from the bounding set, so that no later exec of a setuid-root
    /// or file-capability binary can regain them. Needs CAP_SETPCAP, so it runs before setuid.
    DropBoundingSet(u32),
    /// Empty ambient, inheritable, permitted and effective sets.
    ClearCapabilities,
    NoNewPrivs,
    /// Install the filter whose instructions are borrowed here.
    Seccomp(*const libc::sock_fprog),
    Exec(Exec),
}

impl Step {
    /// What the step was doing, for `SandboxError::Setup`.
    pub fn describe(&self) -> String {
        let s = |c: &CString| c.to_string_lossy().into_owned();
        match self {
            Step::MakeMountsPrivate => "making all mounts private".into(),
            Step::JoinNetNs(_) => "joining the prepared network namespace".into(),
            Step::LoopbackUp => "bringing up the loopback interface".into(),
            Step::SetHostname(h) => format!("setting the host name to {}", s(h)),
            Step::SetDomainname(d) => format!("setting the domain name to {}", s(d)),
            Step::Mount { mount, what } => {
                let target = s(&mount.target);
                match &mount.source {
                    Some(src) if mount.flags & libc::MS_BIND != 0 => {
                        format!("{what} {} on {target}", s(src))
                    }
                    _ => format!("{what} {target}"),
                }
            }
            Step::ClearUmask => "clearing the umask".into(),
            Step::RestoreUmask => "restoring the umask".into(),
            Step::MkDir { path, .. } => format!("creating directory {}", s(path)),
            Step::MkFile(p) => format!("creating mount point {}", s(p)),
            Step::Symlink { link, .. } => format!("creating symlink {}", s(link)),
            Step::WriteFile { path, .. } => format!("writing {}", s(path)),
            Step::SetReadOnly {
                path,
                read_only,
                recursive,
            } => format!(
                "making {}{} {}",
                s(path),
                if *recursive {
                    " and the mounts below it"
                } else {
                    ""
                },
                if *read_only { "read-only" } else { "writable" }
            ),
            Step::PivotRoot(r) => format!("pivoting the root to {}", s(r)),
            Step::Setsid => "creating a new session".into(),
            Step::Dup2 { what, .. } => (*what).into(),
            Step::Chdir(d) => format!("chdir to {}", s(d)),
            Step::CloseOtherFds => "closing inherited file descriptors".into(),
            Step::ResetSignals => "resetting signal dispositions".into(),
            Step::Personality(p) => format!("setting personality {p:#x}"),
            Step::AddPersonality(p) => format!("adding personality flags {p:#x}"),
            Step::SetGroups(g) => format!("setting supplementary groups to {g:?}"),
            Step::SetGid(g) => format!("setgid to {g}"),
            Step::SetUid(u) => format!("setuid to {u}"),
            Step::DropBoundingSet(_) => "dropping the capability bounding set".into(),
            Step::ClearCapabilities => "clearing capabilities".into(),
            Step::NoNewPrivs => "setting no_new_privs".into(),
            Step::Seccomp(_) => "installing the seccomp filter".into(),
            Step::Exec(e) => format!("executing {}", s(&e.program)),
        }
    }
}

/// Carries out steps. The real implementation makes syscalls; tests use a recorder.
pub(crate) trait Syscalls {
    fn run(&mut self, step: &Step) -> Result<(), Errno>;
}

/// Runs `plan` in order and stops at the first failure, returning its index and errno. With the
/// real [`Kernel`] a successful plan never returns (its last step is the exec).
pub(crate) fn run_plan(sys: &mut impl Syscalls, plan: &[Step]) -> Result<(), (usize, Errno)> {
    for (i, step) in plan.iter().enumerate() {
        sys.run(step).map_err(|e| (i, e))?;
    }
    Ok(())
}

/// The real thing. Only called in the cloned child.
#[derive(Default)]
pub(crate) struct Kernel {
    /// The umask [`Step::ClearUmask`] replaced.
    saved_umask: Option<libc::mode_t>,
}

fn check(r: libc::c_int) -> Result<(), Errno> {
    if r == -1 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

fn opt_ptr(c: &Option<CString>) -> *const c_char {
    c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())
}

impl Syscalls for Kernel {
    fn run(&mut self, step: &Step) -> Result<(), Errno> {
        // SAFETY (whole block): every pointer passed below comes from a CString or Vec owned by
        // the plan, which outlives the call; the calls themselves are async-signal-safe.
        unsafe {
            match step {
                Step::MakeMountsPrivate => check(libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                )),
                Step::JoinNetNs(fd) => check(libc::setns(*fd, libc::CLONE_NEWNET)),
                Step::LoopbackUp => loopback_up(),
                Step::SetHostname(h) => check(libc::sethostname(h.as_ptr(), h.as_bytes().len())),
                Step::SetDomainname(d) => {
                    check(libc::setdomainname(d.as_ptr(), d.as_bytes().len()))
                }
                Step::Mount { mount: m, .. } => check(libc::mount(
                    opt_ptr(&m.source),
                    m.target.as_ptr(),
                    opt_ptr(&m.fstype),
                    m.flags,
                    opt_ptr(&m.data) as *const libc::c_void,
                )),
                Step::ClearUmask => {
                    self.saved_umask = Some(libc::umask(0));
                    Ok(())
                }
                Step::RestoreUmask => {
                    if let Some(m) = self.saved_umask.take() {
                        libc::umask(m);
                    }
                    Ok(())
                }
                Step::MkDir { path, mode } => check(libc::mkdir(path.as_ptr(), *mode)),
                Step::MkFile(path) => {
                    let fd = libc::open(
                        path.as_ptr(),
                        libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o444 as libc::c_uint,
                    );
                    check(fd)?;
                    libc::close(fd);
                    Ok(())
                }
                Step::Symlink { target, link } => {
                    check(libc::symlink(target.as_ptr(), link.as_ptr()))
                }
                Step::WriteFile { path, contents } => write_file(path, contents),
                Step::SetReadOnly {
                    path,
                    read_only,
                    recursive,
                } => {
                    let mut attr = MountAttr {
                        attr_set: 0,
                        attr_clr: 0,
                        propagation: 0,
                        userns_fd: 0,
                    };
                    if *read_only {
                        attr.attr_set = MOUNT_ATTR_RDONLY;
                    } else {
                        attr.attr_clr = MOUNT_ATTR_RDONLY;
                    }
                    let flags = if *recursive { AT_RECURSIVE } else { 0 };
                    check(libc::syscall(
                        libc::SYS_mount_setattr,
                        libc::AT_FDCWD,
                        path.as_ptr(),
                        flags,
                        &attr as *const MountAttr,
                        std::mem::size_of::<MountAttr>(),
                    ) as libc::c_int)
                }
                Step::PivotRoot(root) => {
                    // pivot_root(".", ".") stacks the old root on top of the new one; detaching
                    // it then leaves only the new root, with no path back to the host tree
                    // (which a plain chroot would keep reachable to anyone regaining
                    // CAP_SYS_CHROOT).
                    check(libc::chdir(root.as_ptr()))?;
                    let dot = c".".as_ptr();
                    check(libc::syscall(libc::SYS_pivot_root, dot, dot) as libc::c_int)?;
                    check(libc::umount2(dot, libc::MNT_DETACH))?;
                    check(libc::chdir(c"/".as_ptr()))
                }
                Step::Setsid => check(libc::setsid() as libc::c_int),
                Step::Dup2 { from, to, .. } => check(libc::dup2(*from, *to)),
                Step::Chdir(d) => check(libc::chdir(d.as_ptr())),
                Step::CloseOtherFds => {
                    let r = libc::syscall(
                        libc::SYS_close_range,
                        3u32,
                        u32::MAX,
                        libc::CLOSE_RANGE_CLOEXEC,
                    );
                    if r == -1 {
                        // Kernels before 5.11: do it one descriptor at a time.
                        let mut rl: libc::rlimit = std::mem::zeroed();
                        let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 {
                            rl.rlim_cur.min(65536) as libc::c_int
                        } else {
                            1024
                        };
                        for fd in 3..max {
                            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                        }
                    }
                    Ok(())
                }
                Step::ResetSignals => {
                    // Every signal, real-time ones included: a plain builder shares the
                    // parent's memory until it execs, so no handler of the parent's may stay
                    // installed once the mask is emptied below. The raw syscall, because
                    // glibc's wrappers refuse its two internal signals, which may well arrive
                    // ignored from whoever started us. Errors (SIGKILL, SIGSTOP) are expected.
                    let dfl = KernelSigaction {
                        handler: libc::SIG_DFL,
                        flags: 0,
                        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
                        restorer: 0,
                        mask: 0,
                    };
                    for sig in 1..=64 {
                        libc::syscall(
                            libc::SYS_rt_sigaction,
                            sig,
                            &dfl as *const KernelSigaction,
                            std::ptr::null_mut::<KernelSigaction>(),
                            8usize,
                        );
                    }
                    let empty: u64 = 0;
                    check(libc::syscall(
                        libc::SYS_rt_sigprocmask,
                        libc::SIG_SETMASK,
                        &empty as *const u64,
                        std::ptr::null_mut::<u64>(),
                        8usize,
                    ) as libc::c_int)
                }
                Step::Personality(p) => check(libc::personality(*p)),
                Step::AddPersonality(flags) => {
                    let cur = libc::personality(0xffff_ffff);
                    if cur == -1 {
                        return Err(Errno::last());
                    }
                    check(libc::personality(cur as libc::c_ulong | flags))
                }
                // Raw syscalls, not glibc's wrappers: those broadcast the change to every
                // thread glibc believes the process has (its list was copied from the
                // multi-threaded parent) and wait on a futex for answers that never come.
                Step::SetGroups(g) => {
                    check(libc::syscall(libc::SYS_setgroups, g.len(), g.as_ptr()) as libc::c_int)
                }
                Step::SetGid(gid) => {
                    check(libc::syscall(libc::SYS_setgid, *gid) as libc::c_int)?;
                    if libc::getgid() != *gid || libc::getegid() != *gid {
                        return Err(Errno::EPERM);
                    }
                    Ok(())
                }
                Step::SetUid(uid) => {
                    check(libc::syscall(libc::SYS_setuid, *uid) as libc::c_int)?;
                    if libc::getuid() != *uid || libc::geteuid() != *uid {
                        return Err(Errno::EPERM);
                    }
                    Ok(())
                }
                Step::DropBoundingSet(last) => {
                    for cap in 0..=*last {
                        // EINVAL: a capability this kernel does not know; nothing to drop.
                        if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) == -1
                            && Errno::last() != Errno::EINVAL
                        {
                            return Err(Errno::last());
                        }
                    }
                    Ok(())
                }
                Step::ClearCapabilities => {
                    // The caps crate would allocate (it builds HashSets), so this is capset(2)
                    // by hand: version 3 header, two zeroed 32-bit data words.
                    check(libc::prctl(
                        libc::PR_CAP_AMBIENT,
                        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                        0,
                        0,
                        0,
                    ))?;
                    #[repr(C)]
                    struct Header {
                        version: u32,
                        pid: libc::c_int,
                    }
                    #[repr(C)]
                    struct Data {
                        effective: u32,
                        permitted: u32,
                        inheritable: u32,
                    }
                    let mut hdr = Header {
                        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
                        pid: 0,
                    };
                    let data = [
                        Data {
                            effective: 0,
                            permitted: 0,
                            inheritable: 0,
                        },
                        Data {
                            effective: 0,
                            permitted: 0,
                            inheritable: 0,
                        },
                    ];
                    check(
                        libc::syscall(libc::SYS_capset, &mut hdr as *mut Header, data.as_ptr())
                            as libc::c_int,
                    )
                }
                Step::NoNewPrivs => check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)),
                Step::Seccomp(prog) => {
                    check(
                        libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, *prog)
                            as libc::c_int,
                    )
                }
                Step::Exec(e) => {
                    libc::execve(e.program.as_ptr(), e.argv.as_ptr(), e.envp.as_ptr());
                    Err(Errno::last())
                }
            }
        }
    }
}

/// The kernel's `struct sigaction` for `rt_sigaction(2)` (not libc's, whose mask is 128
/// bytes): the restorer field exists where the architecture has `SA_RESTORER`.
#[repr(C)]
struct KernelSigaction {
    handler: libc::sighandler_t,
    flags: libc::c_ulong,
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    restorer: usize,
    mask: u64,
}

/// `struct mount_attr` of `mount_setattr(2)`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const AT_RECURSIVE: libc::c_int = 0x8000;

/// Whether this kernel has `mount_setattr` (Linux 5.12). Probed with a call that can only fail:
/// ENOSYS means no, any other error (EBADF here) means yes.
pub(crate) fn have_mount_setattr() -> bool {
    static HAVE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAVE.get_or_init(|| {
        // SAFETY: an invalid descriptor and a null attribute pointer; the kernel rejects the
        // call before touching either.
        let r = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                -1,
                c"".as_ptr(),
                0,
                std::ptr::null::<MountAttr>(),
                0usize,
            )
        };
        !(r == -1 && Errno::last() == Errno::ENOSYS)
    })
}

/// Creates `path` (which must not exist) holding `contents`, mode 0644 (the umask is 0 here,
/// see [`Step::ClearUmask`]).
unsafe fn write_file(path: &CString, contents: &[u8]) -> Result<(), Errno> {
    let fd = libc::open(
        path.as_ptr(),
        libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
        0o644 as libc::c_uint,
    );
    check(fd)?;
    let mut result = Ok(());
    let mut done = 0;
    while result.is_ok() && done < contents.len() {
        let n = libc::write(fd, contents[done..].as_ptr().cast(), contents.len() - done);
        if n == -1 {
            if Errno::last() != Errno::EINTR {
                result = Err(Errno::last());
            }
        } else {
            done += n as usize;
        }
    }
    libc::close(fd);
    result
}

/// SIOCSIFFLAGS on `lo` through a throw-away datagram socket.
pub(crate) unsafe fn loopback_up() -> Result<(), Errno> {
    let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
    if fd == -1 {
        return Err(Errno::last());
    }
    let mut ifr: libc::ifreq = std::mem::zeroed();
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_LOOPBACK | libc::IFF_RUNNING) as i16;
    let r = libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr);
    let err = Errno::last();
    libc::close(fd);
    if r == -1 {
        Err(err)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FailAt(usize, Vec<String>);
    impl Syscalls for FailAt {
        fn run(&mut self, step: &Step) -> Result<(), Errno> {
            if self.1.len() == self.0 {
                return Err(Errno::ENOENT);
            }
            self.1.push(step.describe());
            Ok(())
        }
    }

    #[test]
    fn run_plan_stops_at_the_first_failure_and_names_its_index() {
        let plan = vec![
            Step::Setsid,
            Step::Chdir(CString::new("/nowhere").unwrap()),
            Step::SetUid(65534),
        ];
        let mut sys = FailAt(1, vec![]);
        assert_eq!(run_plan(&mut sys, &plan), Err((1, Errno::ENOENT)));
        assert_eq!(sys.1, vec!["creating a new session".to_string()]);
        assert_eq!(plan[1].describe(), "chdir to /nowhere");
    }

    #[test]
    fn exec_arrays_are_null_terminated() {
        let e = Exec::new(
            CString::new("/bin/sh").unwrap(),
            vec![CString::new("sh").unwrap(), CString::new("-c").unwrap()],
            vec![CString::new("A=b").unwrap()],
        );
        assert_eq!(e.argv.len(), 3);
        assert!(e.argv[2].is_null());
        assert_eq!(e.envp.len(), 2);
        assert!(e.envp[1].is_null());
        // SAFETY: the pointer comes from a live CString owned by `e`.
        let first = unsafe { std::ffi::CStr::from_ptr(e.argv[1]) };
        assert_eq!(first.to_bytes(), b"-c");
    }
}
