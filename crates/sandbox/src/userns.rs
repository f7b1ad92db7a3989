//! Whether this process can give a builder a user namespace, and if not, why.
//!
//! A caller without root gets the sandbox only through a user namespace
//! ([`crate::UserNamespace`]). Kernels and distributions can refuse those to unprivileged
//! users (a sysctl, an AppArmor or seccomp policy, a limit of zero): the caller then decides
//! between building without the sandbox and failing (Nix's `sandbox-fallback`), and either
//! way says why. The answer comes from the kernel itself: one clone with `CLONE_NEWUSER` of
//! a child that exits at once, made once per process.

use std::sync::OnceLock;

use nix::errno::Errno;

use crate::sys;

/// Creating a user namespace failed: `errno`, and what that usually means here.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("user namespaces are unavailable: creating one failed with {errno}: {why}")]
pub struct UserNamespaceUnavailable {
    pub errno: Errno,
    pub why: String,
}

/// `Ok` when this process can create a user namespace (asked of the kernel once).
pub fn user_namespaces_available() -> Result<(), UserNamespaceUnavailable> {
    static ANSWER: OnceLock<Result<(), UserNamespaceUnavailable>> = OnceLock::new();
    ANSWER
        .get_or_init(|| probe().map_err(|errno| explain(errno, &read_sysctls())))
        .clone()
}

/// The settings that commonly forbid user namespaces, as (name, value) where readable.
fn read_sysctls() -> Vec<(&'static str, String)> {
    [
        (
            "user.max_user_namespaces",
            "/proc/sys/user/max_user_namespaces",
        ),
        (
            "kernel.unprivileged_userns_clone",
            "/proc/sys/kernel/unprivileged_userns_clone",
        ),
        (
            "kernel.apparmor_restrict_unprivileged_userns",
            "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
        ),
    ]
    .into_iter()
    .filter_map(|(name, file)| {
        let v = std::fs::read_to_string(file).ok()?;
        Some((name, v.trim().to_string()))
    })
    .collect()
}

/// What a failed `clone(CLONE_NEWUSER)` most likely means, given the sysctls.
pub(crate) fn explain(errno: Errno, sysctls: &[(&str, String)]) -> UserNamespaceUnavailable {
    let value = |name: &str| {
        sysctls
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    };
    let why = match errno {
        Errno::ENOSPC => match value("user.max_user_namespaces") {
            Some("0") => "user.max_user_namespaces is 0".to_string(),
            _ => "the limit on user namespaces (user.max_user_namespaces) is reached, in this \
                  namespace or one above it"
                .to_string(),
        },
        Errno::EPERM | Errno::EACCES => {
            if value("kernel.unprivileged_userns_clone") == Some("0") {
                "kernel.unprivileged_userns_clone is 0".to_string()
            } else if value("kernel.apparmor_restrict_unprivileged_userns") == Some("1") {
                "AppArmor restricts them (kernel.apparmor_restrict_unprivileged_userns is 1)"
                    .to_string()
            } else {
                "the kernel or a security policy (seccomp, AppArmor, SELinux, a container \
                 runtime) refuses them to this process"
                    .to_string()
            }
        }
        Errno::EUSERS => "user namespaces are nested too deeply (32 levels)".to_string(),
        Errno::EINVAL => "this kernel was built without user namespaces".to_string(),
        _ => "unexpected error".to_string(),
    };
    UserNamespaceUnavailable { errno, why }
}

extern "C" fn exit_at_once(_: *mut libc::c_void) -> libc::c_int {
    // SAFETY: exit_group takes no pointer; the raw call touches no shared state (errno).
    unsafe { sys::raw(libc::SYS_exit_group, [0; 6]) };
    0
}

/// One clone of a child in a new user namespace, which exits at once; its errno otherwise.
fn probe() -> Result<(), Errno> {
    const STACK: usize = 16 * 1024;
    let mut stack = vec![0u8; STACK];
    let top = (stack.as_mut_ptr() as usize + STACK) & !15;
    // As for a builder (see `spawn_prepared`): the child shares our memory, so no handler of
    // ours may run on its stack; it runs nothing but exit_group, then we are resumed.
    let blocked = crate::block_all_signals().map_err(|_| Errno::last())?;
    // SAFETY: the child runs `exit_at_once` on its own stack only; CLONE_VFORK suspends us
    // until it has exited, so the stack outlives it.
    let pid = unsafe {
        libc::clone(
            exit_at_once,
            top as *mut libc::c_void,
            libc::CLONE_NEWUSER | libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            std::ptr::null_mut(),
        )
    };
    let errno = Errno::last();
    crate::restore_signal_mask(blocked);
    if pid == -1 {
        return Err(errno);
    }
    loop {
        // SAFETY: reaping our own child.
        let r = unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::__WALL) };
        if r == pid || Errno::last() != Errno::EINTR {
            break;
        }
    }
    drop(stack);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_name_the_setting_at_fault() {
        let e = explain(
            Errno::ENOSPC,
            &[("user.max_user_namespaces", "0".to_string())],
        );
        assert_eq!(
            e.to_string(),
            "user namespaces are unavailable: creating one failed with ENOSPC: No space left \
             on device: user.max_user_namespaces is 0"
        );
        let e = explain(
            Errno::EPERM,
            &[("kernel.unprivileged_userns_clone", "0".to_string())],
        );
        assert_eq!(e.why, "kernel.unprivileged_userns_clone is 0");
        let e = explain(
            Errno::EPERM,
            &[
                ("kernel.unprivileged_userns_clone", "1".to_string()),
                (
                    "kernel.apparmor_restrict_unprivileged_userns",
                    "1".to_string(),
                ),
            ],
        );
        assert!(e.why.starts_with("AppArmor restricts them"), "{}", e.why);
    }
}
