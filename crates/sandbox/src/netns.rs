//! A pool of fresh network namespaces, created off the critical path.
//!
//! Creating a network namespace is the dearest part of starting a sandbox (the kernel sets up
//! per-namespace state for every protocol), and it sits between `clone` and `exec`. A pool
//! thread creates namespaces ahead of time, brings their loopback up, and keeps one descriptor
//! (`/proc/thread-self/ns/net`) per namespace. A sandbox then only `setns`es into one.
//!
//! Isolation is not weakened: every namespace is handed out once, never returned, and never
//! had a process in it other than the pool thread (which only opened a socket to set IFF_UP).
//! When the last builder in it dies and its descriptor is closed, the kernel tears it down
//! asynchronously, as it does for a namespace made by `clone`.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use nix::errno::Errno;

struct State {
    ready: Vec<OwnedFd>,
    shutdown: bool,
    /// The first error the pool thread hit; after it the pool stays empty.
    failed: Option<String>,
}

struct Inner {
    state: Mutex<State>,
    wake: Condvar,
    target: usize,
}

/// Keeps up to `target` never-used network namespaces ready. Dropping it stops the thread and
/// closes the unused namespaces.
pub struct NetNsPool {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

impl NetNsPool {
    /// Starts the pool thread. Needs CAP_SYS_ADMIN; without it the pool just stays empty and
    /// [`NetNsPool::error`] says why.
    pub fn new(target: usize) -> std::io::Result<NetNsPool> {
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                ready: Vec::with_capacity(target),
                shutdown: false,
                failed: None,
            }),
            wake: Condvar::new(),
            target,
        });
        let worker = Arc::clone(&inner);
        let thread = std::thread::Builder::new()
            .name("nixb-netns-pool".into())
            .spawn(move || refill(&worker))?;
        Ok(NetNsPool {
            inner,
            thread: Some(thread),
        })
    }

    /// A fresh namespace with `lo` up, for `Network::Prepared`; `None` when the pool is empty
    /// (the caller then uses `Network::Private`, which creates one during the clone).
    pub fn take(&self) -> Option<OwnedFd> {
        let mut st = self.inner.state.lock().ok()?;
        let fd = st.ready.pop();
        self.inner.wake.notify_all();
        fd
    }

    /// Blocks until at least `n` namespaces are ready (or the pool failed). For benchmarks
    /// and tests that want a warm pool.
    pub fn wait_ready(&self, n: usize) {
        let Ok(mut st) = self.inner.state.lock() else {
            return;
        };
        while st.ready.len() < n.min(self.inner.target) && st.failed.is_none() {
            st = match self.inner.wake.wait(st) {
                Ok(s) => s,
                Err(_) => return,
            };
        }
    }

    /// Why the pool thread stopped making namespaces, if it did.
    pub fn error(&self) -> Option<String> {
        self.inner.state.lock().ok()?.failed.clone()
    }
}

impl Drop for NetNsPool {
    fn drop(&mut self) {
        if let Ok(mut st) = self.inner.state.lock() {
            st.shutdown = true;
        }
        self.inner.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn refill(inner: &Inner) {
    loop {
        {
            let Ok(mut st) = inner.state.lock() else {
                return;
            };
            while !st.shutdown && st.ready.len() >= inner.target {
                st = match inner.wake.wait(st) {
                    Ok(s) => s,
                    Err(_) => return,
                };
            }
            if st.shutdown {
                return;
            }
        }
        // Made without holding the lock, so `take` never waits for the kernel.
        let made = new_namespace();
        let Ok(mut st) = inner.state.lock() else {
            return;
        };
        match made {
            Ok(fd) => st.ready.push(fd),
            Err(e) => {
                st.failed = Some(e);
                inner.wake.notify_all();
                return;
            }
        }
        inner.wake.notify_all();
    }
}

/// Moves this (pool) thread into a new network namespace, brings `lo` up there and returns a
/// descriptor for it. The thread stays in the namespace until the next call replaces it; it
/// never does anything else there.
fn new_namespace() -> Result<OwnedFd, String> {
    // SAFETY: unshare of the network namespace affects only the calling thread.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } == -1 {
        return Err(format!("creating a network namespace: {}", Errno::last()));
    }
    let fd = File::open("/proc/thread-self/ns/net")
        .map_err(|e| format!("opening /proc/thread-self/ns/net: {e}"))?;
    // SAFETY: SIOCSIFFLAGS through a socket in the new namespace.
    unsafe { crate::plan::loopback_up() }
        .map_err(|e| format!("bringing up lo in a pooled network namespace: {e}"))?;
    Ok(fd.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn ns_id(path: &str) -> String {
        std::fs::read_link(path)
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }

    #[test]
    fn namespaces_are_distinct_and_not_ours() {
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var_os("CI").is_none(),
                "this test needs root (CAP_SYS_ADMIN) and CI is set"
            );
            return;
        }
        let pool = NetNsPool::new(3).unwrap();
        pool.wait_ready(3);
        assert_eq!(pool.error(), None);
        let own = ns_id("/proc/self/ns/net");
        let mut seen = std::collections::HashSet::new();
        // Kept open so that no inode number is reused by a later namespace.
        let mut held = Vec::new();
        for _ in 0..5 {
            // Two more than the target: the thread refills behind us.
            pool.wait_ready(1);
            let fd = pool.take().expect("a namespace");
            let id = ns_id(&format!("/proc/self/fd/{}", fd.as_raw_fd()));
            assert!(id.starts_with("net:["), "{id}");
            assert_ne!(id, own);
            assert!(seen.insert(id.clone()), "namespace {id} handed out twice");
            held.push(fd);
        }
    }
}
