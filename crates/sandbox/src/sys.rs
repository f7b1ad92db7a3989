//! Raw system calls for the cloned child, which never touch `errno`.
//!
//! Every builder is cloned with `CLONE_VM`, and the parent thread goes on running while the
//! child sets up (after `start`, and while the parent fills a detached lower layer; see
//! `spawn_prepared`). Without `CLONE_SETTLS` the child also
//! shares the parent thread's thread-local storage, and so its `errno`: every libc wrapper
//! that fails would write the parent's `errno` while the parent may be between a failing call
//! of its own and the read of its `errno`. These wrappers return the kernel's `-errno` as an
//! [`Errno`] instead and write nothing but registers.
//!
//! ```text
//! raw(nr, [a0..a5]) -> isize     the kernel's return value, -4095..-1 meaning -errno
//! sys(nr, [a0..a5]) -> Result<usize, Errno>
//! ```
//!
//! Only x86_64 and aarch64 have them; elsewhere [`AVAILABLE`] is false and `start` waits for
//! the exec like `spawn`: the child is cloned with `CLONE_VFORK` as well, so that the parent
//! is suspended while it runs, unless the parent has a detached lower layer to fill.

use nix::errno::Errno;

/// Whether this architecture has the raw calls below.
pub(crate) const AVAILABLE: bool = cfg!(any(target_arch = "x86_64", target_arch = "aarch64"));

/// One system call with six arguments (unused ones are ignored by the kernel).
///
/// # Safety
/// As for the system call `nr` with these arguments: pointers must be valid for it.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn raw(nr: libc::c_long, a: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: the x86_64 syscall convention: number in rax, arguments in rdi, rsi, rdx, r10,
    // r8, r9; the kernel clobbers rcx and r11 and returns in rax.
    unsafe {
        core::arch::asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a[0],
            in("rsi") a[1],
            in("rdx") a[2],
            in("r10") a[3],
            in("r8") a[4],
            in("r9") a[5],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// See the x86_64 version.
///
/// # Safety
/// As for the system call `nr` with these arguments: pointers must be valid for it.
#[cfg(target_arch = "aarch64")]
#[inline(always)]
pub(crate) unsafe fn raw(nr: libc::c_long, a: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: the aarch64 convention: number in x8, arguments in x0..x5, result in x0.
    unsafe {
        core::arch::asm!(
            "svc 0",
            in("x8") nr as usize,
            inlateout("x0") a[0] as isize => ret,
            in("x1") a[1],
            in("x2") a[2],
            in("x3") a[3],
            in("x4") a[4],
            in("x5") a[5],
            options(nostack),
        );
    }
    ret
}

/// Elsewhere: libc's `syscall`, which does set `errno` (the caller then waits for the exec,
/// see [`AVAILABLE`]).
///
/// # Safety
/// As for the system call `nr` with these arguments: pointers must be valid for it.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub(crate) unsafe fn raw(nr: libc::c_long, a: [usize; 6]) -> isize {
    // SAFETY: as the caller promised.
    let r = unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]) };
    if r == -1 {
        -(Errno::last() as isize)
    } else {
        r as isize
    }
}

/// [`raw`] with the error turned into an [`Errno`].
///
/// # Safety
/// As for [`raw`].
#[inline(always)]
pub(crate) unsafe fn sys(nr: libc::c_long, a: [usize; 6]) -> Result<usize, Errno> {
    // SAFETY: as the caller promised.
    let r = unsafe { raw(nr, a) };
    if (-4095..0).contains(&r) {
        Err(Errno::from_raw(-r as i32))
    } else {
        Ok(r as usize)
    }
}

/// `struct clone_args` as Linux 5.7 defines it (`CLONE_ARGS_SIZE_VER2`, 88 bytes): what
/// `clone3(2)` takes. Pointers and descriptors go in as `u64`.
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct CloneArgs {
    pub flags: u64,
    pub pidfd: u64,
    pub child_tid: u64,
    pub parent_tid: u64,
    pub exit_signal: u64,
    /// The lowest byte of the child's stack; the kernel starts it at `stack + stack_size`.
    pub stack: u64,
    pub stack_size: u64,
    pub tls: u64,
    pub set_tid: u64,
    pub set_tid_size: u64,
    /// A descriptor of the cgroup v2 directory the child is born in (`CLONE_INTO_CGROUP`).
    pub cgroup: u64,
}

/// `clone3`'s flag (Linux 5.7): the child starts in the cgroup [`CloneArgs::cgroup`] names.
pub(crate) const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Whether [`clone3`] exists here: x86_64 only (elsewhere the builder enters its cgroup by
/// writing `cgroup.procs`, as on kernels without the flag).
pub(crate) const CLONE3_AVAILABLE: bool = cfg!(target_arch = "x86_64");

/// `clone3(2)`: the child runs `f(arg)` on the stack `args` gives it and exits with what `f`
/// returns (`f` is expected to exec or exit itself); the parent gets the child's pid. libc has
/// no wrapper: after the system call the child is on a stack of its own and must not return
/// into this function's caller, so the call, the branch and the child's call of `f` are one
/// block of assembly, as in libc's `clone`.
///
/// # Safety
/// As for `clone(2)` with these flags: `args.stack`/`args.stack_size` must describe a
/// mapping `f` may use as its whole stack (its top 16-aligned), every pointer in `args` must
/// be valid, and with `CLONE_VM` everything `f` reads must stay alive and unchanged until the
/// child has exec'd or exited.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn clone3(
    args: &CloneArgs,
    f: extern "C" fn(*mut libc::c_void) -> libc::c_int,
    arg: *mut libc::c_void,
) -> Result<libc::pid_t, Errno> {
    let ret: isize;
    // SAFETY: the system call as the caller promised. In the parent only rax (the result),
    // rcx and r11 (clobbered by `syscall`) change. The child starts with the parent's
    // registers but rax = 0 and rsp = the top of its own stack (16-aligned, so the `call`
    // leaves f's frame aligned as the ABI wants); it never comes back to the label: f execs
    // or exits, and should it return, exit(2) ends the child with its value.
    unsafe {
        core::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r12",
            "call r13",
            "mov edi, eax",
            "mov eax, {exit}",
            "syscall",
            "ud2",
            "2:",
            exit = const libc::SYS_exit,
            inlateout("rax") libc::SYS_clone3 as isize => ret,
            in("rdi") args as *const CloneArgs,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") arg,
            in("r13") f,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    if (-4095..0).contains(&ret) {
        Err(Errno::from_raw(-ret as i32))
    } else {
        Ok(ret as libc::pid_t)
    }
}

/// See the x86_64 version; never called where [`CLONE3_AVAILABLE`] is false.
///
/// # Safety
/// None needed: it makes no call.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn clone3(
    _args: &CloneArgs,
    _f: extern "C" fn(*mut libc::c_void) -> libc::c_int,
    _arg: *mut libc::c_void,
) -> Result<libc::pid_t, Errno> {
    Err(Errno::ENOSYS)
}

/// Argument helpers: everything goes into a register as a `usize`.
pub(crate) fn p<T>(ptr: *const T) -> usize {
    ptr as usize
}

pub(crate) fn i(v: libc::c_int) -> usize {
    v as libc::c_long as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_and_errors_come_back_without_errno() {
        // SAFETY: getpid takes nothing; close of a descriptor that cannot be open.
        let pid = unsafe { sys(libc::SYS_getpid, [0; 6]) }.unwrap();
        assert_eq!(pid as u32, std::process::id());
        Errno::clear();
        // SAFETY: closing descriptor -1 touches nothing.
        let r = unsafe { sys(libc::SYS_close, [i(-1), 0, 0, 0, 0, 0]) };
        assert_eq!(r, Err(Errno::EBADF));
        if AVAILABLE {
            assert_eq!(Errno::last_raw(), 0, "errno written by a raw call");
        }
        // A pointer argument: write two bytes to a pipe and read them back.
        let (r, w) = nix::unistd::pipe().unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: the literal is readable for 2 bytes; `w` is open.
        let n = unsafe {
            sys(
                libc::SYS_write,
                [i(w.as_raw_fd()), p(b"ok".as_ptr()), 2, 0, 0, 0],
            )
        };
        assert_eq!(n, Ok(2));
        let mut buf = [0u8; 2];
        // SAFETY: `buf` is writable for the 2 bytes asked for; `r` is open.
        let n = unsafe {
            sys(
                libc::SYS_read,
                [i(r.as_raw_fd()), p(buf.as_mut_ptr()), 2, 0, 0, 0],
            )
        };
        assert_eq!(n, Ok(2));
        assert_eq!(&buf, b"ok");
    }
}
