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
