//! `builtin:buildenv`: the user environment that `nix-env` installs into a profile, a tree
//! of symlinks into the installed packages, merged directory by directory.
//!
//! The environment gives `out`, `manifest` (linked as `manifest.nix`) and `derivations`:
//! groups of `<active> <priority> <count> <path>…`, one group per package, `count` paths
//! (its outputs) each. Packages are linked in the order of their priority (lower wins), then
//! of their path; a file both of two packages of the same priority provide is a conflict.
//! A package's `nix-support/propagated-user-env-packages` brings more packages in after all
//! the explicit ones, at priorities from 1000 up. Where two packages provide a directory,
//! the symlink to the first is replaced by a directory holding links to both.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io;
use std::os::unix::fs::{symlink, DirBuilderExt};
use std::path::{Path, PathBuf};

/// One path to link into the profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Package {
    pub path: String,
    pub active: bool,
    pub priority: i32,
}

/// Parses the `derivations` attribute (see the module doc).
pub fn parse_derivations(s: &str) -> Result<Vec<Package>, String> {
    let mut tokens = s.split_ascii_whitespace();
    let mut pkgs = Vec::new();
    while let Some(active) = tokens.next() {
        let mut next = |what: &str| {
            tokens.next().ok_or_else(|| {
                format!("attribute 'derivations' ends where a package's {what} should be")
            })
        };
        let priority = next("priority")?;
        let priority: i32 = priority
            .parse()
            .map_err(|_| format!("attribute 'derivations': '{priority}' is not a priority"))?;
        let count = next("number of outputs")?;
        let count: usize = count.parse().map_err(|_| {
            format!("attribute 'derivations': '{count}' is not a number of outputs")
        })?;
        for _ in 0..count {
            pkgs.push(Package {
                path: next("output path")?.to_owned(),
                active: active != "false",
                priority,
            });
        }
    }
    Ok(pkgs)
}

/// The builder: reads its attributes from `env` and builds the profile at `out`.
pub fn run(env: &BTreeMap<String, String>) -> Result<(), String> {
    let get = |name: &str| super::attr(env, name);
    let out = PathBuf::from(get("out")?);
    std::fs::create_dir_all(&out).map_err(|e| format!("creating '{}': {e}", out.display()))?;
    let pkgs = parse_derivations(get("derivations")?)?;
    let report = build_profile(&out, pkgs)?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    let manifest = out.join("manifest.nix");
    symlink(get("manifest")?, &manifest)
        .map_err(|e| format!("creating symlink '{}': {e}", manifest.display()))
}

/// What [`build_profile`] did.
#[derive(Debug, Default)]
pub struct Report {
    /// Symlinks made (counting those later replaced).
    pub symlinks: u64,
    /// Entries left out, in Nix's words: dangling symlinks, packages that are not
    /// directories.
    pub warnings: Vec<String>,
}

/// Links `pkgs` into the existing directory `out`.
pub fn build_profile(out: &Path, mut pkgs: Vec<Package>) -> Result<Report, String> {
    let mut b = Builder {
        out,
        priorities: HashMap::new(),
        done: HashSet::new(),
        postponed: BTreeSet::new(),
        report: Report::default(),
    };
    pkgs.sort_by(|a, b| (a.priority, &a.path).cmp(&(b.priority, &b.path)));
    for p in pkgs.iter().filter(|p| p.active) {
        b.add_package(&p.path, p.priority)?;
    }
    // Propagated packages come last so that they lose every collision; each round's are
    // taken in path order, one priority each.
    let mut priority = 1000;
    while !b.postponed.is_empty() {
        for dir in std::mem::take(&mut b.postponed) {
            b.add_package(&dir, priority)?;
            priority += 1;
        }
    }
    Ok(b.report)
}

struct Builder<'a> {
    out: &'a Path,
    /// The priority of the package each symlink made points into.
    priorities: HashMap<PathBuf, i32>,
    done: HashSet<String>,
    postponed: BTreeSet<String>,
    report: Report,
}

/// Files no profile shows: useless there, or the cause of pointless collisions between
/// packages that all carry one.
const LEFT_OUT: &[&str] = &[
    "/propagated-build-inputs",
    "/nix-support",
    "/perllocal.pod",
    "/info/dir",
    "/log",
    "/manifest.nix",
    "/manifest.json",
];

impl Builder<'_> {
    fn add_package(&mut self, dir: &str, priority: i32) -> Result<(), String> {
        if !self.done.insert(dir.to_owned()) {
            return Ok(());
        }
        let out = self.out.to_path_buf();
        self.link_tree(Path::new(dir), &out, priority)?;
        let file = Path::new(dir).join("nix-support/propagated-user-env-packages");
        match std::fs::read_to_string(&file) {
            Ok(list) => {
                for p in list.split([' ', '\n']).filter(|p| !p.is_empty()) {
                    if !self.done.contains(p) {
                        self.postponed.insert(p.to_owned());
                    }
                }
            }
            Err(e) if is_absent(&e) => {}
            Err(e) => return Err(format!("reading '{}': {e}", file.display())),
        }
        Ok(())
    }

    /// Links every entry of `src_dir` into `dst_dir` at `priority`.
    fn link_tree(&mut self, src_dir: &Path, dst_dir: &Path, priority: i32) -> Result<(), String> {
        let entries = match std::fs::read_dir(src_dir) {
            Ok(e) => e,
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                self.report.warnings.push(format!(
                    "not including '{}' in the user environment because it's not a directory",
                    src_dir.display()
                ));
                return Ok(());
            }
            Err(e) => return Err(format!("reading directory '{}': {e}", src_dir.display())),
        };
        for entry in entries {
            let entry =
                entry.map_err(|e| format!("reading directory '{}': {e}", src_dir.display()))?;
            let name = entry.file_name();
            // As a shell glob would, skip hidden entries.
            if name.as_encoded_bytes().first() == Some(&b'.') {
                continue;
            }
            let src = src_dir.join(&name);
            let dst = dst_dir.join(&name);
            let src_meta = match std::fs::metadata(&src) {
                Ok(m) => m,
                Err(e) if is_absent(&e) => {
                    self.report
                        .warnings
                        .push(format!("skipping dangling symlink '{}'", dst.display()));
                    continue;
                }
                Err(e) => return Err(format!("getting status of '{}': {e}", src.display())),
            };
            let src_str = src.to_string_lossy();
            if LEFT_OUT.iter().any(|s| src_str.ends_with(s)) {
                continue;
            }
            let dst_meta = match std::fs::symlink_metadata(&dst) {
                Ok(m) => Some(m),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(format!("getting status of '{}': {e}", dst.display())),
            };
            if src_meta.is_dir() {
                match dst_meta {
                    Some(m) if m.is_dir() => {
                        self.link_tree(&src, &dst, priority)?;
                        continue;
                    }
                    Some(m) if m.file_type().is_symlink() => {
                        // Two packages provide this directory: replace the link to the first
                        // with a directory of links into both.
                        let target = std::fs::canonicalize(&dst)
                            .map_err(|e| format!("resolving '{}': {e}", dst.display()))?;
                        let is_dir = std::fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir());
                        if !is_dir {
                            return Err(format!(
                                "collision between '{}' and non-directory '{}'",
                                src.display(),
                                target.display()
                            ));
                        }
                        std::fs::remove_file(&dst)
                            .map_err(|e| format!("unlinking '{}': {e}", dst.display()))?;
                        std::fs::DirBuilder::new()
                            .mode(0o755)
                            .create(&dst)
                            .map_err(|e| format!("creating directory '{}': {e}", dst.display()))?;
                        let first = self.priorities.get(&dst).copied().unwrap_or(0);
                        self.link_tree(&target, &dst, first)?;
                        self.link_tree(&src, &dst, priority)?;
                        continue;
                    }
                    _ => {}
                }
            } else if let Some(m) = dst_meta {
                if m.file_type().is_symlink() {
                    let previous = self.priorities.get(&dst).copied().unwrap_or(0);
                    if previous == priority {
                        let first = std::fs::read_link(&dst)
                            .map_err(|e| format!("reading symlink '{}': {e}", dst.display()))?;
                        return Err(format!(
                            "packages '{}' and '{}' have the same priority {priority}; use \
                             'nix-env --set-flag priority NUMBER INSTALLED_PKGNAME' to change \
                             the priority of one of the conflicting packages (0 being the \
                             highest priority)",
                            src.display(),
                            first.display()
                        ));
                    }
                    if previous < priority {
                        continue;
                    }
                    std::fs::remove_file(&dst)
                        .map_err(|e| format!("unlinking '{}': {e}", dst.display()))?;
                } else if m.is_dir() {
                    return Err(format!(
                        "collision between non-directory '{}' and directory '{}'",
                        src.display(),
                        dst.display()
                    ));
                }
            }
            symlink(&src, &dst).map_err(|e| {
                format!(
                    "creating symlink from '{}' to '{}': {e}",
                    dst.display(),
                    src.display()
                )
            })?;
            self.priorities.insert(dst, priority);
            self.report.symlinks += 1;
        }
        Ok(())
    }
}

fn is_absent(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn pkg(path: &Path, priority: i32) -> Package {
        Package {
            path: path.to_str().unwrap().to_owned(),
            active: true,
            priority,
        }
    }

    /// A package directory with the given files (`bin/x` etc.), each holding its own path.
    fn make(root: &Path, name: &str, files: &[&str]) -> PathBuf {
        let dir = root.join(name);
        for f in files {
            let p = dir.join(f);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, p.to_str().unwrap()).unwrap();
        }
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn link(p: &Path) -> PathBuf {
        fs::read_link(p).unwrap()
    }

    #[test]
    fn parses_groups_of_outputs() {
        let got = parse_derivations("1 5 2 /s/a-out /s/a-dev\nfalse -3 1 /s/b").unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!((got[1].path.as_str(), got[1].priority), ("/s/a-dev", 5));
        assert!(got[0].active && !got[2].active);
        assert_eq!(got[2].priority, -3);
        assert!(parse_derivations("1 5 2 /s/a")
            .unwrap_err()
            .contains("output path"));
        assert!(parse_derivations("1 x 1 /s/a").unwrap_err().contains("'x'"));
    }

    #[test]
    fn a_lone_package_is_linked_at_the_top() {
        let t = tempfile::tempdir().unwrap();
        let a = make(t.path(), "a", &["bin/a", "share/doc/a"]);
        let out = t.path().join("out");
        fs::create_dir(&out).unwrap();
        let r = build_profile(&out, vec![pkg(&a, 5)]).unwrap();
        assert_eq!(link(&out.join("bin")), a.join("bin"));
        assert_eq!(link(&out.join("share")), a.join("share"));
        assert_eq!(r.symlinks, 2);
    }

    #[test]
    fn shared_directories_become_directories_of_links() {
        let t = tempfile::tempdir().unwrap();
        let a = make(t.path(), "a", &["bin/a", "share/man/a.1"]);
        let b = make(t.path(), "b", &["bin/b", "share/man/b.1"]);
        let out = t.path().join("out");
        fs::create_dir(&out).unwrap();
        build_profile(&out, vec![pkg(&b, 5), pkg(&a, 5)]).unwrap();
        assert!(fs::symlink_metadata(out.join("bin")).unwrap().is_dir());
        assert_eq!(link(&out.join("bin/a")), a.join("bin/a"));
        assert_eq!(link(&out.join("bin/b")), b.join("bin/b"));
        // The first package's link, resolved, is what the expanded directory points into.
        assert_eq!(link(&out.join("share/man/a.1")), a.join("share/man/a.1"));
        assert_eq!(link(&out.join("share/man/b.1")), b.join("share/man/b.1"));
    }

    #[test]
    fn the_lower_priority_number_wins_and_equal_ones_conflict() {
        let t = tempfile::tempdir().unwrap();
        let a = make(t.path(), "a", &["bin/tool", "bin/a"]);
        let b = make(t.path(), "b", &["bin/tool", "bin/b"]);
        let out = t.path().join("out");
        fs::create_dir(&out).unwrap();
        build_profile(&out, vec![pkg(&a, 7), pkg(&b, 3)]).unwrap();
        assert_eq!(link(&out.join("bin/tool")), b.join("bin/tool"));
        assert_eq!(link(&out.join("bin/a")), a.join("bin/a"));

        let out2 = t.path().join("out2");
        fs::create_dir(&out2).unwrap();
        let e = build_profile(&out2, vec![pkg(&a, 5), pkg(&b, 5)]).unwrap_err();
        // The file being linked first, then the one already there.
        let (a_tool, b_tool) = (a.join("bin/tool"), b.join("bin/tool"));
        let want = format!(
            "packages '{}' and '{}' have the same priority 5",
            b_tool.display(),
            a_tool.display()
        );
        assert!(e.starts_with(&want), "{e}");
    }

    #[test]
    fn inactive_hidden_and_special_entries_are_left_out() {
        let t = tempfile::tempdir().unwrap();
        let a = make(
            t.path(),
            "a",
            &[
                ".hidden",
                "nix-support/setup-hook",
                "share/info/dir",
                "log",
                "bin/a",
            ],
        );
        let b = make(t.path(), "b", &["bin/b"]);
        // Another package with `share/info`, so that the directory is made of links and
        // `info/dir` comes up for linking (inside a link to one package's directory, it
        // is simply there).
        let c = make(t.path(), "c", &["share/info/c.info"]);
        std::os::unix::fs::symlink(t.path().join("nowhere"), a.join("dangling")).unwrap();
        let out = t.path().join("out");
        fs::create_dir(&out).unwrap();
        let mut inactive = pkg(&b, 5);
        inactive.active = false;
        let r = build_profile(&out, vec![pkg(&a, 5), inactive, pkg(&c, 5)]).unwrap();
        let mut names: Vec<_> = fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["bin", "share"]);
        assert!(out.join("share/info/c.info").exists());
        assert!(!out.join("share/info/dir").exists());
        assert!(!out.join("bin/b").exists());
        assert!(r.warnings[0].contains("dangling"), "{:?}", r.warnings);
    }

    #[test]
    fn propagated_packages_come_in_after_and_below_the_explicit_ones() {
        let t = tempfile::tempdir().unwrap();
        let dep = make(t.path(), "dep", &["bin/tool", "bin/dep"]);
        let a = make(t.path(), "a", &["bin/tool"]);
        fs::create_dir_all(a.join("nix-support")).unwrap();
        fs::write(
            a.join("nix-support/propagated-user-env-packages"),
            format!("{}\n", dep.display()),
        )
        .unwrap();
        let out = t.path().join("out");
        fs::create_dir(&out).unwrap();
        build_profile(&out, vec![pkg(&a, 5)]).unwrap();
        assert_eq!(link(&out.join("bin/tool")), a.join("bin/tool"));
        assert_eq!(link(&out.join("bin/dep")), dep.join("bin/dep"));
    }

    #[test]
    fn a_file_against_a_directory_is_a_collision() {
        let t = tempfile::tempdir().unwrap();
        let a = make(t.path(), "a", &["lib/x"]);
        let c = make(t.path(), "c", &["lib/y"]);
        let b = make(t.path(), "b", &["lib"]);
        let out = t.path().join("out");
        fs::create_dir(&out).unwrap();
        // Against a link to a directory, priorities decide; against a directory made of two
        // packages' links, a file cannot win.
        let e = build_profile(&out, vec![pkg(&a, 5), pkg(&c, 5), pkg(&b, 6)]).unwrap_err();
        assert!(e.contains("collision"), "{e}");
    }
}
