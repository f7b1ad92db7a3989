//! Helpers shared by the sandbox test files.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// A thread that allocates and frees without pause until dropped: builders started with
/// `CLONE_VM` share the address space with it until exec, so a child that touched the
/// allocator (or a lock) would corrupt memory or hang while it runs.
pub struct AllocationChurn {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl AllocationChurn {
    pub fn start() -> AllocationChurn {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut n = 0u64;
            while !flag.load(Ordering::Relaxed) {
                let v: Vec<u64> = (0..1000).map(|i| i * n).collect();
                n = n.wrapping_add(v[999] % 7 + 1);
            }
            n
        });
        AllocationChurn {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for AllocationChurn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            // Surface a panic of the churn thread, unless we are already unwinding.
            if t.join().is_err() && !std::thread::panicking() {
                panic!("the allocation churn thread panicked");
            }
        }
    }
}
