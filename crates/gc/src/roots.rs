//! Finding roots as Nix 2.8 finds them (`gc.cc`).
//!
//! ```text
//! $NIX_STATE_DIR/gcroots/**, profiles/**   walked recursively, symlinks not followed:
//!     symlink into the store            -> root (the link is named)
//!     symlink elsewhere (indirect root) -> if the target is itself a symlink into the
//!                                          store, a root named by that target; a dangling
//!                                          link under gcroots/auto/ is removed
//!     regular file named <hash>-<name>  -> root
//! /proc/<pid>/{exe,cwd,fd/*}               symlink targets
//! /proc/<pid>/maps                         the file column of each mapping
//! /proc/<pid>/environ                      every <store dir>/<hash>... substring
//! $NIX_STATE_DIR/temproots/<pid>           absolute store paths, each followed by NUL; the
//!                                          owner holds an exclusive flock while it lives,
//!                                          so a file we can lock is stale: it is removed
//!                                          (after writing "d" into it, as Nix does)
//! ```
//!
//! Roots other than temporary roots count only when the path is valid. Censored roots
//! (`{censored}`) are what a collector records; `--print-roots` shows the real links.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use nixb_store::locks::{lock_file, LockType};
use nixb_store::{StoreDir, StorePath};

use crate::GcError;

/// Each root and the places (links, `/proc` files, `{temp:<pid>}`) that make it one.
pub type Roots = BTreeMap<StorePath, BTreeSet<String>>;

/// What a collector records instead of the link for a runtime or temporary root.
pub const CENSORED: &str = "{censored}";

/// Where roots are looked for.
#[derive(Clone, Debug)]
pub struct RootDirs {
    pub store_dir: StoreDir,
    pub state_dir: PathBuf,
    /// Usually `/proc`; a test may point elsewhere.
    pub proc_dir: PathBuf,
}

impl RootDirs {
    pub fn new(store_dir: StoreDir, state_dir: PathBuf) -> RootDirs {
        RootDirs {
            store_dir,
            state_dir,
            proc_dir: PathBuf::from("/proc"),
        }
    }

    fn in_store(&self, p: &str) -> bool {
        is_in_dir(p, self.store_dir.as_str())
    }
}

/// Nix's `isInDir`: `path` is strictly below `dir`.
fn is_in_dir(path: &str, dir: &str) -> bool {
    path.starts_with('/')
        && path.len() >= dir.len() + 2
        && path.starts_with(dir)
        && path.as_bytes()[dir.len()] == b'/'
}

/// Nix's `canonPath` without following symlinks: absolute, no `.`, `..` or double slashes.
fn canon_path(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

/// Roots from `gcroots/` and `profiles/` and the runtime roots of live processes:
/// Nix's `findRootsNoTemp`. `is_valid` says whether a store path is valid.
pub fn find_roots_no_temp(
    dirs: &RootDirs,
    censor: bool,
    is_valid: &mut dyn FnMut(&StorePath) -> Result<bool, GcError>,
) -> Result<Roots, GcError> {
    let mut roots = Roots::new();
    for d in ["gcroots", "profiles"] {
        find_roots_in(dirs, &dirs.state_dir.join(d), None, &mut roots, is_valid)?;
    }
    find_runtime_roots(dirs, censor, &mut roots, is_valid)?;
    Ok(roots)
}

fn found_root(
    dirs: &RootDirs,
    link: &Path,
    target: &str,
    roots: &mut Roots,
    is_valid: &mut dyn FnMut(&StorePath) -> Result<bool, GcError>,
) -> Result<(), GcError> {
    let Ok(p) = dirs.store_dir.parse_prefix(target) else {
        return Ok(());
    };
    if is_valid(&p)? {
        roots
            .entry(p)
            .or_default()
            .insert(link.to_string_lossy().into_owned());
    } else {
        tracing::info!(
            "skipping invalid root from '{}' to '{target}'",
            link.display()
        );
    }
    Ok(())
}

fn find_roots_in(
    dirs: &RootDirs,
    path: &Path,
    file_type: Option<std::fs::FileType>,
    roots: &mut Roots,
    is_valid: &mut dyn FnMut(&StorePath) -> Result<bool, GcError>,
) -> Result<(), GcError> {
    match find_roots_in_inner(dirs, path, file_type, roots, is_valid) {
        // Only permanent failures are ignored, as Nix does.
        Err(GcError::Io { source, .. })
            if matches!(
                source.raw_os_error(),
                Some(libc_errno::EACCES | libc_errno::ENOENT | libc_errno::ENOTDIR)
            ) =>
        {
            tracing::info!("cannot read potential root '{}'", path.display());
            Ok(())
        }
        r => r,
    }
}

/// The errno values Nix ignores while walking roots (stable Linux numbers; the crate
/// does not depend on libc for three constants).
mod libc_errno {
    pub const ENOENT: i32 = 2;
    pub const ESRCH: i32 = 3;
    pub const EACCES: i32 = 13;
    pub const ENOTDIR: i32 = 20;
}

fn io_err(step: &'static str, path: &Path) -> impl FnOnce(io::Error) -> GcError {
    let path = path.to_path_buf();
    move |source| GcError::Io { step, path, source }
}

fn find_roots_in_inner(
    dirs: &RootDirs,
    path: &Path,
    file_type: Option<std::fs::FileType>,
    roots: &mut Roots,
    is_valid: &mut dyn FnMut(&StorePath) -> Result<bool, GcError>,
) -> Result<(), GcError> {
    let ft = match file_type {
        Some(t) => t,
        None => std::fs::symlink_metadata(path)
            .map_err(io_err("examining", path))?
            .file_type(),
    };
    if ft.is_dir() {
        let mut entries = Vec::new();
        for e in std::fs::read_dir(path).map_err(io_err("reading directory", path))? {
            let e = e.map_err(io_err("reading directory", path))?;
            entries.push((e.path(), e.file_type().ok()));
        }
        for (p, t) in entries {
            find_roots_in(dirs, &p, t, roots, is_valid)?;
        }
    } else if ft.is_symlink() {
        let target = std::fs::read_link(path).map_err(io_err("reading symlink", path))?;
        let target_s = target.to_string_lossy();
        if dirs.in_store(&target_s) {
            found_root(dirs, path, &target_s, roots, is_valid)?;
        } else {
            // An indirect root: a link to a link elsewhere (such as `./result`).
            let parent = path.parent().unwrap_or(Path::new("/"));
            let target = canon_path(&parent.join(&target));
            match std::fs::symlink_metadata(&target) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let auto = dirs.state_dir.join("gcroots").join("auto");
                    if is_in_dir(&path.to_string_lossy(), &auto.to_string_lossy()) {
                        tracing::info!(
                            "removing stale link from '{}' to '{}'",
                            path.display(),
                            target.display()
                        );
                        let _ = std::fs::remove_file(path);
                    }
                }
                Err(e) => return Err(io_err("examining", &target)(e)),
                Ok(m) if m.file_type().is_symlink() => {
                    let target2 =
                        std::fs::read_link(&target).map_err(io_err("reading symlink", &target))?;
                    let target2 = target2.to_string_lossy();
                    if dirs.in_store(&target2) {
                        found_root(dirs, &target, &target2, roots, is_valid)?;
                    }
                }
                Ok(_) => {}
            }
        }
    } else if ft.is_file() {
        let base = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if let Some(p) = base.and_then(|b| StorePath::from_base_name(&b).ok()) {
            if is_valid(&p)? {
                roots
                    .entry(p)
                    .or_default()
                    .insert(path.to_string_lossy().into_owned());
            }
        }
    }
    Ok(())
}

/// Targets found in `/proc`, and where each was seen.
type Unchecked = HashMap<String, HashSet<String>>;

fn read_proc_link(file: &Path, unchecked: &mut Unchecked) {
    // A process that went away or is not ours to look at is no root.
    if let Ok(t) = std::fs::read_link(file) {
        let t = t.to_string_lossy();
        if t.starts_with('/') {
            unchecked
                .entry(t.into_owned())
                .or_default()
                .insert(file.to_string_lossy().into_owned());
        }
    }
}

fn read_proc_file(file: &Path) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    std::fs::File::open(file).ok()?.read_to_end(&mut buf).ok()?;
    Some(buf)
}

/// The file column of a `/proc/<pid>/maps` line: the sixth field, when it is the last and
/// absolute (so `/x (deleted)` and anonymous mappings do not count, as in Nix's regex).
fn maps_file(line: &str) -> Option<&str> {
    let mut fields = line.split_ascii_whitespace();
    for _ in 0..5 {
        fields.next()?;
    }
    let f = fields.next()?;
    (f.starts_with('/') && fields.next().is_none()).then_some(f)
}

/// Every `<store dir>/<[0-9a-z]><[0-9a-zA-Z+-._?=]*>` in `env`, as Nix's regex finds them.
fn env_store_paths(env: &[u8], store_dir: &str) -> Vec<String> {
    let prefix = format!("{store_dir}/");
    let p = prefix.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while i + p.len() < env.len() {
        if &env[i..i + p.len()] == p && matches!(env[i + p.len()], b'0'..=b'9' | b'a'..=b'z') {
            let start = i;
            let mut j = i + p.len() + 1;
            while j < env.len() && (env[j].is_ascii_alphanumeric() || b"+-._?=".contains(&env[j])) {
                j += 1;
            }
            found.push(String::from_utf8_lossy(&env[start..j]).into_owned());
            i = j;
        } else {
            i += 1;
        }
    }
    found
}

/// Nix's `findRuntimeRoots` on Linux.
pub fn find_runtime_roots(
    dirs: &RootDirs,
    censor: bool,
    roots: &mut Roots,
    is_valid: &mut dyn FnMut(&StorePath) -> Result<bool, GcError>,
) -> Result<(), GcError> {
    let mut unchecked = Unchecked::new();
    if let Ok(procs) = std::fs::read_dir(&dirs.proc_dir) {
        for ent in procs.flatten() {
            let name = ent.file_name();
            let name = name.to_string_lossy();
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let pid_dir = dirs.proc_dir.join(&*name);
            read_proc_link(&pid_dir.join("exe"), &mut unchecked);
            read_proc_link(&pid_dir.join("cwd"), &mut unchecked);
            let fd_dir = pid_dir.join("fd");
            let fds = match std::fs::read_dir(&fd_dir) {
                Ok(f) => f,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc_errno::ENOENT | libc_errno::EACCES | libc_errno::ESRCH)
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(io_err("opening", &fd_dir)(e)),
            };
            for fd in fds.flatten() {
                if !fd.file_name().to_string_lossy().starts_with('.') {
                    read_proc_link(&fd.path(), &mut unchecked);
                }
            }
            let maps = pid_dir.join("maps");
            let Some(contents) = read_proc_file(&maps) else {
                continue;
            };
            for line in String::from_utf8_lossy(&contents).lines() {
                if let Some(f) = maps_file(line) {
                    unchecked
                        .entry(f.to_string())
                        .or_default()
                        .insert(maps.to_string_lossy().into_owned());
                }
            }
            let environ = pid_dir.join("environ");
            let Some(env) = read_proc_file(&environ) else {
                continue;
            };
            for p in env_store_paths(&env, dirs.store_dir.as_str()) {
                unchecked
                    .entry(p)
                    .or_default()
                    .insert(environ.to_string_lossy().into_owned());
            }
        }
    }
    for f in ["modprobe", "fbsplash", "poweroff_cmd"] {
        let file = dirs.proc_dir.join("sys/kernel").join(f);
        if let Some(c) = read_proc_file(&file) {
            // Kept whole, trailing newline included, as Nix reads it.
            unchecked
                .entry(String::from_utf8_lossy(&c).into_owned())
                .or_default()
                .insert(file.to_string_lossy().into_owned());
        }
    }
    for (target, links) in unchecked {
        if !dirs.in_store(&target) {
            continue;
        }
        let Ok(p) = dirs.store_dir.parse_prefix(&target) else {
            continue;
        };
        if !is_valid(&p)? {
            continue;
        }
        let set = roots.entry(p).or_default();
        if censor {
            set.insert(CENSORED.to_string());
        } else {
            set.extend(links);
        }
    }
    Ok(())
}

/// Temporary roots of live processes: Nix's `findTempRoots`. Stale files (their owner
/// is dead, so we can lock them) are removed. Temporary roots are not checked for
/// validity: a process protects a path before it exists.
pub fn find_temp_roots(dirs: &RootDirs, censor: bool) -> Result<Roots, GcError> {
    let dir = dirs.state_dir.join("temproots");
    let mut roots = Roots::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(roots),
        Err(e) => return Err(io_err("reading directory", &dir)(e)),
    };
    for ent in entries {
        let ent = ent.map_err(io_err("reading directory", &dir))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        // Hidden files are left alone (some package managers keep the directory alive
        // with one).
        if name.starts_with('.') {
            continue;
        }
        let path = ent.path();
        let mut f = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("opening temporary roots file", &path)(e)),
        };
        if lock_file(&f, LockType::Write, false)? {
            tracing::info!("removing stale temporary roots file '{}'", path.display());
            let _ = std::fs::remove_file(&path);
            // A process about to reuse the name sees a non-empty file and starts over.
            let _ = f.write_all(b"d");
            continue;
        }
        let mut contents = Vec::new();
        f.read_to_end(&mut contents)
            .map_err(io_err("reading temporary roots file", &path))?;
        let label = if censor {
            CENSORED.to_string()
        } else {
            // The owner's pid, as Nix reads it: the leading number of the name (a daemon
            // connection's file is `<pid>-<connection>`).
            let digits = name.len() - name.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            let pid = if digits == 0 {
                &name[..]
            } else {
                &name[..digits]
            };
            format!("{{temp:{pid}}}")
        };
        // Only complete records (each ends with NUL) count, as in Nix.
        let mut records: Vec<&[u8]> = contents.split(|b| *b == 0).collect();
        records.pop();
        for r in records {
            let s = String::from_utf8_lossy(r);
            match dirs.store_dir.parse(&s) {
                Ok(p) => {
                    roots.entry(p).or_default().insert(label.clone());
                }
                Err(e) => {
                    return Err(GcError::TempRoots {
                        file: path.clone(),
                        reason: e.to_string(),
                    })
                }
            }
        }
    }
    Ok(roots)
}

/// Every root, temporary roots included: Nix's `findRoots`.
pub fn find_roots(
    dirs: &RootDirs,
    censor: bool,
    is_valid: &mut dyn FnMut(&StorePath) -> Result<bool, GcError>,
) -> Result<Roots, GcError> {
    let mut roots = find_roots_no_temp(dirs, censor, is_valid)?;
    for (p, links) in find_temp_roots(dirs, censor)? {
        roots.entry(p).or_default().extend(links);
    }
    Ok(roots)
}

/// `link -> target` lines sorted by link then target, as `nix-store --gc --print-roots`.
pub fn print_roots(store_dir: &StoreDir, roots: &Roots) -> Vec<String> {
    let mut pairs: BTreeSet<(&str, &StorePath)> = BTreeSet::new();
    for (p, links) in roots {
        for l in links {
            pairs.insert((l, p));
        }
    }
    pairs
        .into_iter()
        .map(|(l, p)| format!("{l} -> {}", store_dir.print(p)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_as_nix_matches_them() {
        assert_eq!(
            maps_file("7f00-7f01 r-xp 00000000 08:01 1234   /s/abc-x/lib/libx.so"),
            Some("/s/abc-x/lib/libx.so")
        );
        assert_eq!(maps_file("7f00-7f01 rw-p 00000000 00:00 0 "), None);
        assert_eq!(
            maps_file("7f00-7f01 r-xp 00000000 08:01 1234 /s/abc-x (deleted)"),
            None
        );
        assert_eq!(maps_file("7f00-7f01 r-xp 00000000 08:01 1234 [heap]"), None);
    }

    #[test]
    fn environment_store_paths_as_nix_regex_finds_them() {
        let env = b"A=/s/0abc-foo/bin:/s/Xbad\0B=x/s/9zz_z.y=?+q/more\0C=/s/\0D=/s";
        assert_eq!(
            env_store_paths(env, "/s"),
            vec!["/s/0abc-foo".to_string(), "/s/9zz_z.y=?+q".to_string()]
        );
    }

    #[test]
    fn canon_and_in_dir() {
        assert_eq!(
            canon_path(Path::new("/a/b/../c/./d")),
            PathBuf::from("/a/c/d")
        );
        assert!(is_in_dir("/nix/store/x", "/nix/store"));
        assert!(!is_in_dir("/nix/store", "/nix/store"));
        assert!(!is_in_dir("/nix/storex/y", "/nix/store"));
        assert!(!is_in_dir("/nix/store/", "/nix/store"));
    }
}
