//! Removing files from the store as Nix's `deletePath` does: directories lacking the
//! owner's read, write or search bit get them first (store paths are read-only), and the
//! bytes freed count a file's size when it has one or two links (two: probably a file
//! shared only with `.links`, which goes once that link is pruned).

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::GcError;

/// Deletes whatever is at `path` (nothing there is fine); returns the bytes freed
/// ([`nixb_store::delete::delete_path_counting`]).
pub fn delete_path(path: &Path) -> Result<u64, GcError> {
    nixb_store::delete::delete_path_counting(path).map_err(|e| GcError::Io {
        step: e.step,
        path: e.path,
        source: e.source,
    })
}

/// [`delete_path`] for the entry `name` of the store directory, open as `dir` at
/// `dir_path` ([`nixb_store::delete::delete_entry_counting`]).
pub fn delete_store_entry(
    dir: &std::fs::File,
    dir_path: &Path,
    name: &str,
) -> Result<u64, GcError> {
    nixb_store::delete::delete_entry_counting(dir, dir_path, name).map_err(|e| GcError::Io {
        step: e.step,
        path: e.path,
        source: e.source,
    })
}

/// Removes the entries of `<store>/.links` that nothing else links to any more (link
/// count 1). Returns how many were removed.
pub fn prune_links(links_dir: &Path) -> Result<u64, GcError> {
    let entries = match std::fs::read_dir(links_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(source) => {
            return Err(GcError::Io {
                step: "reading directory",
                path: links_dir.to_path_buf(),
                source,
            })
        }
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry.map_err(|source| GcError::Io {
            step: "reading directory",
            path: links_dir.to_path_buf(),
            source,
        })?;
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.nlink() == 1 {
            match std::fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(GcError::Io {
                        step: "deleting unused link",
                        path,
                        source,
                    })
                }
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn read_only_trees_are_deleted_and_sizes_counted() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("p");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/a"), b"12345").unwrap();
        std::fs::write(root.join("b"), b"123").unwrap();
        std::os::unix::fs::symlink("b", root.join("l")).unwrap();
        // A third link to b: b's bytes are then not freed.
        std::fs::hard_link(root.join("sub/a"), d.path().join("keep")).unwrap();
        std::fs::hard_link(root.join("b"), d.path().join("keep2")).unwrap();
        std::fs::hard_link(root.join("b"), d.path().join("keep3")).unwrap();
        for p in ["sub/a", "b"] {
            std::fs::set_permissions(root.join(p), std::fs::Permissions::from_mode(0o444)).unwrap();
        }
        std::fs::set_permissions(root.join("sub"), std::fs::Permissions::from_mode(0o555)).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o555)).unwrap();
        // sub/a has 2 links (counted), b has 3 (not counted), the symlink is not a file
        // with a size worth counting here but is one link: its length (1) counts.
        assert_eq!(delete_path(&root).unwrap(), 5 + 1);
        assert!(!root.exists());
        assert_eq!(delete_path(&root).unwrap(), 0);
    }

    #[test]
    fn prune_links_removes_only_unshared() {
        let d = tempfile::tempdir().unwrap();
        let links = d.path().join(".links");
        std::fs::create_dir(&links).unwrap();
        std::fs::write(links.join("a"), b"x").unwrap();
        std::fs::write(links.join("b"), b"y").unwrap();
        std::fs::hard_link(links.join("b"), d.path().join("user")).unwrap();
        assert_eq!(prune_links(&links).unwrap(), 1);
        assert!(!links.join("a").exists());
        assert!(links.join("b").exists());
    }
}
