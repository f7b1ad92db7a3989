//! The cloned child's stack: an anonymous mapping with an inaccessible guard page below it.
//!
//! The child shares the worker's memory (`CLONE_VM`) and runs on this stack until it has
//! exec'd. A heap buffer would let an overflow run on, silently, into whatever the
//! allocator placed below it, which is the worker's own data. With a guard page the first
//! byte past the end faults instead: the child dies of `SIGSEGV` (a synchronous fault kills
//! even with every signal blocked, as the child's are), and the worker sees a builder that
//! died during setup.

use std::ptr::NonNull;

/// An owned stack mapping; unmapped on drop.
pub(crate) struct ChildStack {
    base: NonNull<u8>,
    len: usize,
}

impl ChildStack {
    /// `size` usable bytes (rounded up to whole pages) above one guard page.
    pub(crate) fn new(size: usize) -> std::io::Result<ChildStack> {
        let page = rustix::param::page_size();
        let usable = size.div_ceil(page) * page;
        let len = usable + page;
        // SAFETY: a fresh anonymous private mapping at an address of the kernel's choosing
        // aliases nothing of ours.
        let base = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::NORESERVE,
            )
        }?;
        let stack = ChildStack {
            base: NonNull::new(base.cast()).ok_or(std::io::ErrorKind::OutOfMemory)?,
            len,
        };
        // The stack grows down: the guard is the lowest page.
        // SAFETY: the first page of the mapping made above, which nothing uses yet.
        unsafe {
            rustix::mm::mprotect(base, page, rustix::mm::MprotectFlags::empty())?;
        }
        Ok(stack)
    }

    /// One past the highest usable byte, 16-aligned: where the child's stack pointer starts.
    pub(crate) fn top(&self) -> usize {
        (self.base.as_ptr() as usize + self.len) & !15
    }

    /// The lowest usable byte (just above the guard page).
    pub(crate) fn lowest(&self) -> *mut u8 {
        self.base.as_ptr().wrapping_add(rustix::param::page_size())
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, which its owner drops only once no child runs
        // on it (see `Pending`).
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

// SAFETY: the mapping is owned memory like a Vec's; the raw pointer is only an address.
unsafe impl Send for ChildStack {}
// SAFETY: as for `Send`; `&ChildStack` gives out nothing but addresses.
unsafe impl Sync for ChildStack {}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a forked child: write one byte at `at`, then exit 0. Returns how the child ended.
    fn write_in_child(at: *mut u8) -> nix::sys::wait::WaitStatus {
        // SAFETY: the child makes one volatile write and exits without unwinding.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                // SAFETY: the point of the test: this address may be the guard page.
                unsafe { at.write_volatile(1) };
                // SAFETY: leaves the forked child without running the parent's destructors.
                unsafe { libc::_exit(0) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                nix::sys::wait::waitpid(child, None).unwrap()
            }
        }
    }

    #[test]
    fn the_page_below_the_stack_faults_and_the_stack_does_not() {
        let stack = ChildStack::new(64 * 1024).unwrap();
        assert_eq!(stack.top() % 16, 0);
        let top = stack.top() as *mut u8;
        for usable in [stack.lowest(), top.wrapping_sub(1)] {
            assert!(
                matches!(
                    write_in_child(usable),
                    nix::sys::wait::WaitStatus::Exited(_, 0)
                ),
                "a write to the stack itself failed"
            );
        }
        let guard = stack.lowest().wrapping_sub(1);
        assert!(
            matches!(
                write_in_child(guard),
                nix::sys::wait::WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGSEGV, _)
            ),
            "a write just below the stack did not fault"
        );
    }
}
