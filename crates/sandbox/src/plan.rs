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
use std::sync::atomic::{AtomicU32, Ordering};

use nix::errno::Errno;

use crate::sys::{i, p, sys};

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
    /// The child passes `target` from this byte on: a path relative to its working directory
    /// when that is the target's parent (the store directory), which saves the walk down to it
    /// for each of a hundred store inputs. Error messages show the whole path. At most
    /// `target`'s length (0 for the whole path).
    pub target_from: usize,
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
    /// Writes `contents` to an existing file in one `write` (the kernel takes an id map in
    /// one piece only), e.g. `/proc/self/uid_map`.
    WriteExisting {
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
    /// Wait until the parent has made the mount points in the overlay's detached lower layer
    /// (`chroot::DetachedLower`): a futex on this word of the parent's, 1 when done, 2 when
    /// the parent failed (then ECANCELED; the parent reports its own error).
    WaitForLower {
        ready: *const AtomicU32,
        /// What the parent is doing meanwhile, for error messages.
        what: &'static str,
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
                    // "." is the working directory, which `what` names.
                    Some(src) if mount.flags & libc::MS_BIND != 0 && src.as_bytes() != b"." => {
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
            Step::WriteFile { path, .. } | Step::WriteExisting { path, .. } => {
                format!("writing {}", s(path))
            }
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
            Step::WaitForLower { what, .. } => format!("waiting for the parent to {what}"),
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

fn opt_ptr(c: &Option<CString>) -> usize {
    c.as_ref().map_or(0, |c| p(c.as_ptr()))
}

/// `sys` with the result dropped.
unsafe fn call(nr: libc::c_long, a: [usize; 6]) -> Result<(), Errno> {
    // SAFETY: as the caller promised.
    unsafe { sys(nr, a) }.map(|_| ())
}

/// Arguments: the first few given, the rest zero.
fn a1(x: usize) -> [usize; 6] {
    [x, 0, 0, 0, 0, 0]
}
fn a2(x: usize, y: usize) -> [usize; 6] {
    [x, y, 0, 0, 0, 0]
}
fn a3(x: usize, y: usize, z: usize) -> [usize; 6] {
    [x, y, z, 0, 0, 0]
}
fn a5(x: usize, y: usize, z: usize, u: usize, v: usize) -> [usize; 6] {
    [x, y, z, u, v, 0]
}

const AT_FDCWD: usize = libc::AT_FDCWD as libc::c_long as usize;

impl Syscalls for Kernel {
    fn run(&mut self, step: &Step) -> Result<(), Errno> {
        // Every call goes through `sys` (see the `sys` module): the child shares the parent's
        // memory, its errno included, while the parent goes on running.
        // SAFETY (whole block): every pointer passed below comes from a CString or Vec owned by
        // the plan, which the parent keeps alive until this child has exec'd or exited, or
        // from this function's own frame.
        // SAFETY: see the whole-block note above.
        unsafe {
            match step {
                Step::MakeMountsPrivate => call(
                    libc::SYS_mount,
                    a5(
                        0,
                        p(c"/".as_ptr()),
                        0,
                        (libc::MS_REC | libc::MS_PRIVATE) as usize,
                        0,
                    ),
                ),
                Step::JoinNetNs(fd) => {
                    call(libc::SYS_setns, a2(i(*fd), libc::CLONE_NEWNET as usize))
                }
                Step::LoopbackUp => loopback_up(),
                Step::SetHostname(h) => {
                    call(libc::SYS_sethostname, a2(p(h.as_ptr()), h.as_bytes().len()))
                }
                Step::SetDomainname(d) => call(
                    libc::SYS_setdomainname,
                    a2(p(d.as_ptr()), d.as_bytes().len()),
                ),
                Step::Mount { mount: m, .. } => call(
                    libc::SYS_mount,
                    a5(
                        opt_ptr(&m.source),
                        // In bounds: `target_from` is at most the length (see `Mount`),
                        // and the NUL after it ends the suffix too.
                        p(m.target.as_ptr().add(m.target_from)),
                        opt_ptr(&m.fstype),
                        m.flags as usize,
                        opt_ptr(&m.data),
                    ),
                ),
                Step::ClearUmask => {
                    // umask cannot fail; it returns the old mask.
                    let old = sys(libc::SYS_umask, a1(0))?;
                    self.saved_umask = Some(old as libc::mode_t);
                    Ok(())
                }
                Step::RestoreUmask => {
                    if let Some(m) = self.saved_umask.take() {
                        call(libc::SYS_umask, a1(m as usize))?;
                    }
                    Ok(())
                }
                Step::MkDir { path, mode } => call(
                    libc::SYS_mkdirat,
                    a3(AT_FDCWD, p(path.as_ptr()), *mode as usize),
                ),
                Step::MkFile(path) => {
                    let fd = sys(
                        libc::SYS_openat,
                        [
                            AT_FDCWD,
                            p(path.as_ptr()),
                            i(libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC),
                            0o444,
                            0,
                            0,
                        ],
                    )?;
                    let _ = sys(libc::SYS_close, a1(fd));
                    Ok(())
                }
                Step::Symlink { target, link } => call(
                    libc::SYS_symlinkat,
                    a3(p(target.as_ptr()), AT_FDCWD, p(link.as_ptr())),
                ),
                Step::WriteFile { path, contents } => write_file(path, contents),
                Step::WriteExisting { path, contents } => {
                    let fd = sys(
                        libc::SYS_openat,
                        [
                            AT_FDCWD,
                            p(path.as_ptr()),
                            i(libc::O_WRONLY | libc::O_CLOEXEC),
                            0,
                            0,
                            0,
                        ],
                    )?;
                    let r = sys(
                        libc::SYS_write,
                        a3(fd, p(contents.as_ptr()), contents.len()),
                    );
                    let _ = sys(libc::SYS_close, a1(fd));
                    match r {
                        Ok(n) if n == contents.len() => Ok(()),
                        Ok(_) => Err(Errno::EIO),
                        Err(e) => Err(e),
                    }
                }
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
                    call(
                        libc::SYS_mount_setattr,
                        a5(
                            AT_FDCWD,
                            p(path.as_ptr()),
                            i(flags),
                            p(&attr as *const MountAttr),
                            std::mem::size_of::<MountAttr>(),
                        ),
                    )
                }
                Step::WaitForLower { ready: word, .. } => loop {
                    // An atomic load is a plain load here: no call, no write.
                    match (**word).load(Ordering::Acquire) {
                        1 => break Ok(()),
                        2 => break Err(Errno::ECANCELED),
                        _ => {}
                    }
                    // Sleeps only while the word is still 0; EAGAIN (it changed) and EINTR
                    // just mean looking again.
                    match sys(
                        libc::SYS_futex,
                        a3(p(*word), i(libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG), 0),
                    ) {
                        Ok(_) | Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
                        Err(e) => break Err(e),
                    }
                },
                Step::PivotRoot(root) => {
                    // pivot_root(".", ".") stacks the old root on top of the new one; detaching
                    // it then leaves only the new root, with no path back to the host tree
                    // (which a plain chroot would keep reachable to anyone regaining
                    // CAP_SYS_CHROOT).
                    call(libc::SYS_chdir, a1(p(root.as_ptr())))?;
                    let dot = p(c".".as_ptr());
                    call(libc::SYS_pivot_root, a2(dot, dot))?;
                    call(libc::SYS_umount2, a2(dot, i(libc::MNT_DETACH)))?;
                    call(libc::SYS_chdir, a1(p(c"/".as_ptr())))
                }
                Step::Setsid => call(libc::SYS_setsid, [0; 6]),
                Step::Dup2 { from, to, .. } => {
                    if from == to {
                        // dup2 would leave the descriptor as it is, close-on-exec flag
                        // included; it must survive the exec.
                        call(libc::SYS_fcntl, a3(i(*from), i(libc::F_SETFD), 0))
                    } else {
                        // dup3 exists everywhere (aarch64 has no dup2) and clears
                        // close-on-exec on the copy.
                        call(libc::SYS_dup3, a3(i(*from), i(*to), 0))
                    }
                }
                Step::Chdir(d) => call(libc::SYS_chdir, a1(p(d.as_ptr()))),
                Step::CloseOtherFds => {
                    let r = sys(
                        libc::SYS_close_range,
                        a3(3, u32::MAX as usize, libc::CLOSE_RANGE_CLOEXEC as usize),
                    );
                    if r.is_err() {
                        // Kernels before 5.11: do it one descriptor at a time.
                        let mut rl: libc::rlimit = std::mem::zeroed();
                        let max = if sys(
                            libc::SYS_prlimit64,
                            [
                                0,
                                i(libc::RLIMIT_NOFILE as libc::c_int),
                                0,
                                p(&mut rl as *mut libc::rlimit),
                                0,
                                0,
                            ],
                        )
                        .is_ok()
                        {
                            rl.rlim_cur.min(65536) as libc::c_int
                        } else {
                            1024
                        };
                        for fd in 3..max {
                            let _ = sys(
                                libc::SYS_fcntl,
                                a3(i(fd), i(libc::F_SETFD), i(libc::FD_CLOEXEC)),
                            );
                        }
                    }
                    Ok(())
                }
                Step::ResetSignals => {
                    // Every signal, real-time ones included: the builder shares the parent's
                    // memory until it execs, so no handler of the parent's may stay
                    // installed once the mask is emptied below. The raw syscall also covers
                    // glibc's two internal signals, which may well arrive ignored from
                    // whoever started us. Errors (SIGKILL, SIGSTOP) are expected.
                    let dfl = KernelSigaction {
                        handler: libc::SIG_DFL,
                        flags: 0,
                        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
                        restorer: 0,
                        mask: 0,
                    };
                    for sig in 1..=64usize {
                        let _ = sys(
                            libc::SYS_rt_sigaction,
                            [sig, p(&dfl as *const KernelSigaction), 0, 8, 0, 0],
                        );
                    }
                    let empty: u64 = 0;
                    call(
                        libc::SYS_rt_sigprocmask,
                        [i(libc::SIG_SETMASK), p(&empty as *const u64), 0, 8, 0, 0],
                    )
                }
                Step::Personality(per) => call(libc::SYS_personality, a1(*per as usize)),
                Step::AddPersonality(flags) => {
                    // personality(0xffffffff) only reads the current one.
                    let cur = sys(libc::SYS_personality, a1(0xffff_ffff))?;
                    call(libc::SYS_personality, a1(cur | *flags as usize))
                }
                // Raw syscalls, not glibc's wrappers: those broadcast the change to every
                // thread glibc believes the process has (its list is the multi-threaded
                // parent's) and wait on a futex for answers that never come.
                Step::SetGroups(g) => call(libc::SYS_setgroups, a2(g.len(), p(g.as_ptr()))),
                Step::SetGid(gid) => {
                    call(libc::SYS_setgid, a1(*gid as usize))?;
                    let real = sys(libc::SYS_getgid, [0; 6])?;
                    let effective = sys(libc::SYS_getegid, [0; 6])?;
                    if real != *gid as usize || effective != *gid as usize {
                        return Err(Errno::EPERM);
                    }
                    Ok(())
                }
                Step::SetUid(uid) => {
                    call(libc::SYS_setuid, a1(*uid as usize))?;
                    let real = sys(libc::SYS_getuid, [0; 6])?;
                    let effective = sys(libc::SYS_geteuid, [0; 6])?;
                    if real != *uid as usize || effective != *uid as usize {
                        return Err(Errno::EPERM);
                    }
                    Ok(())
                }
                Step::DropBoundingSet(last) => {
                    for cap in 0..=*last as usize {
                        // EINVAL: a capability this kernel does not know; nothing to drop.
                        match sys(libc::SYS_prctl, a2(i(libc::PR_CAPBSET_DROP), cap)) {
                            Ok(_) | Err(Errno::EINVAL) => {}
                            Err(e) => return Err(e),
                        }
                    }
                    Ok(())
                }
                Step::ClearCapabilities => {
                    // The caps crate would allocate (it builds HashSets), so this is capset(2)
                    // by hand: version 3 header, two zeroed 32-bit data words.
                    call(
                        libc::SYS_prctl,
                        a2(
                            i(libc::PR_CAP_AMBIENT),
                            libc::PR_CAP_AMBIENT_CLEAR_ALL as usize,
                        ),
                    )?;
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
                    call(
                        libc::SYS_capset,
                        a2(p(&mut hdr as *mut Header), p(data.as_ptr())),
                    )
                }
                Step::NoNewPrivs => call(libc::SYS_prctl, a2(i(libc::PR_SET_NO_NEW_PRIVS), 1)),
                Step::Seccomp(prog) => call(
                    libc::SYS_seccomp,
                    a3(libc::SECCOMP_SET_MODE_FILTER as usize, 0, p(*prog)),
                ),
                Step::Exec(e) => {
                    // Returns only on failure.
                    call(
                        libc::SYS_execve,
                        a3(
                            p(e.program.as_ptr()),
                            p(e.argv.as_ptr()),
                            p(e.envp.as_ptr()),
                        ),
                    )?;
                    Err(Errno::ENOEXEC)
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
    // SAFETY: `path` and `contents` outlive the calls; the descriptor is ours.
    unsafe {
        let fd = sys(
            libc::SYS_openat,
            [
                AT_FDCWD,
                p(path.as_ptr()),
                i(libc::O_CREAT
                    | libc::O_EXCL
                    | libc::O_WRONLY
                    | libc::O_CLOEXEC
                    | libc::O_NOFOLLOW),
                0o644,
                0,
                0,
            ],
        )?;
        let mut result = Ok(());
        let mut done = 0;
        while done < contents.len() {
            match sys(
                libc::SYS_write,
                a3(fd, p(contents[done..].as_ptr()), contents.len() - done),
            ) {
                Ok(n) => done += n,
                Err(Errno::EINTR) => {}
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        let _ = sys(libc::SYS_close, a1(fd));
        result
    }
}

/// SIOCSIFFLAGS on `lo` through a throw-away datagram socket.
pub(crate) unsafe fn loopback_up() -> Result<(), Errno> {
    // SAFETY: `ifr` lives on this frame; the socket is ours.
    unsafe {
        let fd = sys(
            libc::SYS_socket,
            a3(
                i(libc::AF_INET),
                i(libc::SOCK_DGRAM | libc::SOCK_CLOEXEC),
                0,
            ),
        )?;
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_LOOPBACK | libc::IFF_RUNNING) as i16;
        let r = call(
            libc::SYS_ioctl,
            a3(
                fd,
                libc::SIOCSIFFLAGS as usize,
                p(&ifr as *const libc::ifreq),
            ),
        );
        let _ = sys(libc::SYS_close, a1(fd));
        r
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
