//! A temporary roots file of its own, for an owner that lives shorter than its process:
//! a daemon connection. The type lives in the store ([`nixb_store::temproots`]), whose
//! `LocalStore` keeps the process's own file the same way; the tests here check it
//! against this crate's collector.

pub use nixb_store::temproots::{RootsOwner, TempRootsFile};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::roots::{find_temp_roots, RootDirs};
    use nixb_store::locks::{lock_file, open_lock_file, LockType};
    use nixb_store::StoreDir;

    #[test]
    fn roots_hold_while_the_file_lives_and_go_with_it() {
        let tmp = tempfile::tempdir().unwrap();
        let store_dir = StoreDir::new(tmp.path().join("store").to_str().unwrap()).unwrap();
        let state = tmp.path().join("state");
        let dirs = RootDirs::new(store_dir.clone(), state.clone());
        let p = store_dir
            .parse(&format!(
                "{}/0c6kzph7l0dcbfmjap64f0czdafn3b7x-hello",
                store_dir.as_str()
            ))
            .unwrap();
        let mut f = TempRootsFile::create(&state, store_dir.clone(), "4242-7").unwrap();
        f.add(&p).unwrap();
        f.add(&p).unwrap();
        // The raw file is Nix's format: one NUL-terminated record.
        let raw = std::fs::read(state.join("temproots/4242-7")).unwrap();
        assert_eq!(raw, format!("{}\0", store_dir.print(&p)).into_bytes());
        let roots = find_temp_roots(&dirs, false).unwrap();
        assert_eq!(
            roots.get(&p).map(|l| l.iter().cloned().collect::<Vec<_>>()),
            Some(vec!["{temp:4242}".to_string()])
        );
        drop(f);
        assert!(!state.join("temproots/4242-7").exists());
        assert!(find_temp_roots(&dirs, false).unwrap().is_empty());
    }

    /// While a collector holds `gc.lock`, a root goes to its socket and is acknowledged
    /// before `add` returns.
    #[test]
    fn a_running_collector_hears_of_new_roots() {
        use crate::server::{RootsServer, SharedRoots};
        use std::sync::Arc;
        let tmp = tempfile::tempdir().unwrap();
        let store_dir = StoreDir::new(tmp.path().join("store").to_str().unwrap()).unwrap();
        let state = tmp.path().join("state");
        let p = store_dir
            .parse(&format!(
                "{}/1c6kzph7l0dcbfmjap64f0czdafn3b7x-late",
                store_dir.as_str()
            ))
            .unwrap();
        let mut f = TempRootsFile::create(&state, store_dir.clone(), "4243-1").unwrap();
        let gc_lock = open_lock_file(&state.join("gc.lock"), true)
            .unwrap()
            .unwrap();
        assert!(lock_file(&gc_lock, LockType::Write, false).unwrap());
        let shared = Arc::new(SharedRoots::default());
        let server = RootsServer::start(&state, store_dir.clone(), shared.clone()).unwrap();
        f.add(&p).unwrap();
        assert_eq!(shared.lock().new_roots, vec![p.hash_part().to_string()]);
        drop(server);
        // And it is in the file for the collectors that come later.
        let raw = std::fs::read(f.path()).unwrap();
        assert_eq!(raw, format!("{}\0", store_dir.print(&p)).into_bytes());
    }
}
