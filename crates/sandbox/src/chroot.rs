//! Chroot mode: the builder's root directory, prepared by the parent, and the namespace part
//! of the child's plan.
//!
//! The parent creates `<root>` with `/tmp` (1777), `/etc` (the given files), the store
//! directory, `/dev` (symlinks and empty mount points), `/proc`, and one mount point per bind.
//! The child, already in its new namespaces, then mounts in this order:
//!
//! ```text
//! 1. / recursively private         nothing below may propagate back to the host
//! 2. lo up / setns to a pooled ns  (not for Network::Host)
//! 3. hostname, domain name         UTS namespace is private now
//! 4. <root> onto itself            pivot_root needs the new root to be a mount point
//! 5. binds, sorted by target       a parent directory is mounted before what lies inside it;
//!                                  read-only ones remounted at once, keeping nosuid/nodev/noexec
//! 6. tmpfs on /dev/shm, devpts     fresh, so nothing is shared with the host or other builds
//! 7. proc on /proc                 after the PID namespace exists (clone made it): shows only
//!                                  the sandbox's processes
//! 8. pivot_root, detach old root   last: every source path above is a host path
//! ```
//!
//! Non-directory inputs are bind-mounted onto empty files rather than hard-linked as Nix 1.x
//! did: a bind works across file systems, has no link-count limit (no EMLINK/EXDEV fallback
//! to copy), can be read-only, and disappears with the mount namespace.

use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::plan::{Mount, Step};
use crate::seccomp::Filter;
use crate::{BuildUserIds, SandboxError};

/// What the builder's root holds and how its namespaces are set up.
pub struct ChrootSpec {
    /// Directory to create (it must not exist yet) and populate as the builder's `/`. Left in
    /// place afterwards: moving outputs out of it and removing it are the caller's job. Once
    /// the sandbox is gone it holds only plain directories and files (the mounts lived in the
    /// builder's mount namespace).
    pub root: PathBuf,
    /// The store directory as the builder sees it, e.g. `/nix/store`; created writable so that
    /// the builder can create its outputs there.
    pub store_dir: PathBuf,
    /// The build directory, bound read-write at the same path inside.
    pub build_dir: PathBuf,
    /// The input closure and `sandbox-paths`. A bind with target `/dev` replaces the minimal
    /// `/dev`.
    pub binds: Vec<BindMount>,
    pub hostname: String,
    pub network: Network,
    /// Files written under `<root>/etc/` (name relative to `/etc`, contents).
    pub etc_files: Vec<(PathBuf, Vec<u8>)>,
    /// Bind `/dev/kvm` when the host has it.
    pub kvm: bool,
}

impl ChrootSpec {
    /// A spec with Nix's defaults: host name `localhost`, a private network, `/etc/passwd`,
    /// `/etc/group` and `/etc/hosts` as [`nix_etc_files`] writes them for `uid`/`gid`.
    pub fn new(root: PathBuf, store_dir: PathBuf, build_dir: PathBuf, uid: u32, gid: u32) -> Self {
        ChrootSpec {
            root,
            store_dir,
            build_dir,
            binds: Vec::new(),
            hostname: "localhost".into(),
            network: Network::Private,
            etc_files: nix_etc_files(uid, gid),
            kvm: false,
        }
    }
}

/// `/etc/passwd` (the build user as `nixbld`, and `nobody`), `/etc/group` and `/etc/hosts`
/// with the contents Nix gives them in the chroot.
pub fn nix_etc_files(uid: u32, gid: u32) -> Vec<(PathBuf, Vec<u8>)> {
    vec![
        (
            "passwd".into(),
            format!(
                "nixbld:x:{uid}:{gid}:Nix build user:/:/noshell\n\
                 nobody:x:65534:65534:Nobody:/:/noshell\n"
            )
            .into_bytes(),
        ),
        ("group".into(), format!("nixbld:!:{gid}:\n").into_bytes()),
        (
            "hosts".into(),
            b"127.0.0.1 localhost\n::1 localhost\n".to_vec(),
        ),
    ]
}

/// `source` on the host appears at `target` inside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindMount {
    pub target: PathBuf,
    pub source: PathBuf,
    /// A missing source is skipped instead of being an error (`sandbox-paths` entries with `?`).
    pub optional: bool,
    pub read_only: bool,
}

impl BindMount {
    /// `path` at the same place inside, read-write, required.
    pub fn same(path: impl Into<PathBuf>) -> BindMount {
        let p = path.into();
        BindMount {
            target: p.clone(),
            source: p,
            optional: false,
            read_only: false,
        }
    }

    pub fn read_only(mut self) -> BindMount {
        self.read_only = true;
        self
    }

    pub fn optional(mut self) -> BindMount {
        self.optional = true;
        self
    }
}

/// The builder's network.
pub enum Network {
    /// A fresh network namespace with only `lo`, made by the clone.
    Private,
    /// A never-used network namespace prepared ahead of time by a [`crate::NetNsPool`]
    /// (`lo` already up). Same isolation as `Private`, cheaper start.
    Prepared(OwnedFd),
    /// The host's network namespace, for fixed-output derivations (which must fetch); the
    /// host's `/etc/resolv.conf` and `/etc/services` are bound in when present.
    Host,
}

/// Device nodes of the minimal `/dev` (Nix's list).
const DEV_NODES: &[&str] = &["full", "null", "random", "tty", "urandom", "zero"];

pub(crate) struct Prepared {
    pub ns_steps: Vec<Step>,
    pub clone_flags: libc::c_int,
    filter: Filter,
}

impl Prepared {
    /// From before the user switch to just before exec: bounding set (needs CAP_SETPCAP, so
    /// before setuid), the user switch, then the remaining capability sets, no_new_privs and
    /// the seccomp filter (installing it unprivileged requires no_new_privs).
    pub fn privilege_steps(&self, user: Option<Vec<Step>>) -> Vec<Step> {
        let mut steps = vec![Step::DropBoundingSet(63)];
        steps.extend(user.unwrap_or_default());
        steps.extend([
            Step::ClearCapabilities,
            Step::NoNewPrivs,
            Step::Seccomp(self.filter.as_ptr()),
        ]);
        steps
    }
}

fn prep_err(step: String) -> impl FnOnce(std::io::Error) -> SandboxError {
    move |source| SandboxError::Prepare { step, source }
}

fn cpath(p: &Path) -> Result<CString, SandboxError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| SandboxError::InvalidSpec(format!("path {} contains a NUL byte", p.display())))
}

/// `inner` (absolute, no `..`) as a path under `root`.
fn under(root: &Path, inner: &Path, what: &str) -> Result<PathBuf, SandboxError> {
    let mut out = root.to_path_buf();
    let mut comps = inner.components();
    if comps.next() != Some(Component::RootDir) {
        return Err(SandboxError::InvalidSpec(format!(
            "{what} {} is not an absolute path",
            inner.display()
        )));
    }
    for c in comps {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => {
                return Err(SandboxError::InvalidSpec(format!(
                    "{what} {} must not contain '..'",
                    inner.display()
                )))
            }
        }
    }
    Ok(out)
}

fn mkdir_all(p: &Path) -> Result<(), SandboxError> {
    fs::create_dir_all(p).map_err(prep_err(format!("creating directory {}", p.display())))
}

fn chmod(p: &Path, mode: u32) -> Result<(), SandboxError> {
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .map_err(prep_err(format!("changing the mode of {}", p.display())))
}

fn chown_group(p: &Path, gid: u32) -> Result<(), SandboxError> {
    std::os::unix::fs::chown(p, Some(0), Some(gid))
        .map_err(prep_err(format!("changing the owner of {}", p.display())))
}

/// Mount flags of the file system holding `p` that a read-only remount must keep (the kernel
/// refuses to drop a locked nosuid/nodev/noexec, and we would not want to drop them anyway).
fn kept_flags(p: &Path) -> Result<libc::c_ulong, SandboxError> {
    let c = cpath(p)?;
    // SAFETY: statvfs fills the zeroed struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } == -1 {
        return Err(SandboxError::Prepare {
            step: format!("getting the mount flags of {}", p.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    let pairs = [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ];
    Ok(pairs
        .iter()
        .filter(|(st_flag, _)| st.f_flag & st_flag != 0)
        .fold(0, |acc, (_, ms)| acc | ms))
}

fn mount(
    what: &'static str,
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<Step, SandboxError> {
    let c = |s: Option<&str>| s.map(|s| CString::new(s).unwrap_or_default());
    Ok(Step::Mount {
        mount: Mount {
            source: c(source),
            target: cpath(target)?,
            fstype: c(fstype),
            flags,
            data: c(data),
        },
        what,
    })
}

/// Creates the root tree and returns the namespace steps.
pub(crate) fn prepare(
    spec: &ChrootSpec,
    user: Option<&BuildUserIds>,
) -> Result<Prepared, SandboxError> {
    let root = &spec.root;
    if !root.is_absolute() {
        return Err(SandboxError::InvalidSpec(format!(
            "chroot directory {} is not an absolute path",
            root.display()
        )));
    }
    fs::create_dir(root).map_err(prep_err(format!(
        "creating chroot directory {}",
        root.display()
    )))?;
    // Only root and the build user's group may enter: other local users have no business
    // looking at (or racing with) a build in progress.
    match user {
        Some(u) => {
            chmod(root, 0o750)?;
            chown_group(root, u.gid)?;
        }
        None => chmod(root, 0o755)?,
    }

    // Many builders need a writable /tmp, even when the build directory is elsewhere.
    let tmp = root.join("tmp");
    mkdir_all(&tmp)?;
    chmod(&tmp, 0o1777)?;

    let etc = root.join("etc");
    mkdir_all(&etc)?;
    for (name, contents) in &spec.etc_files {
        let p = under(&etc, &Path::new("/").join(name), "/etc file")?;
        if let Some(dir) = p.parent() {
            mkdir_all(dir)?;
        }
        fs::write(&p, contents).map_err(prep_err(format!("writing {}", p.display())))?;
    }

    // The builder creates its outputs here; sticky so builders cannot remove each other's.
    let store = under(root, &spec.store_dir, "store directory")?;
    mkdir_all(&store)?;
    match user {
        Some(u) => {
            chown_group(&store, u.gid)?;
            chmod(&store, 0o1775)?;
        }
        None => chmod(&store, 0o1777)?,
    }

    let mut binds = spec.binds.clone();
    binds.push(BindMount::same(&spec.build_dir));
    let host_dev = binds.iter().any(|b| b.target == Path::new("/dev"));
    if matches!(spec.network, Network::Host) {
        for f in ["/etc/resolv.conf", "/etc/services"] {
            binds.push(BindMount::same(f).read_only().optional());
        }
    }
    if !host_dev {
        for n in DEV_NODES {
            binds.push(BindMount::same(format!("/dev/{n}")));
        }
        if spec.kvm && Path::new("/dev/kvm").exists() {
            binds.push(BindMount::same("/dev/kvm"));
        }
    }
    // Path order is component-wise, so a directory sorts before anything inside it.
    binds.sort_by(|a, b| a.target.cmp(&b.target));
    binds.dedup_by(|later, earlier| later.target == earlier.target);

    let mut steps = vec![Step::MakeMountsPrivate];
    let mut clone_flags =
        libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    match &spec.network {
        Network::Private => {
            clone_flags |= libc::CLONE_NEWNET;
            steps.push(Step::LoopbackUp);
        }
        Network::Prepared(fd) => steps.push(Step::JoinNetNs(fd.as_raw_fd())),
        Network::Host => {}
    }
    let hostname = CString::new(spec.hostname.as_bytes())
        .map_err(|_| SandboxError::InvalidSpec("host name contains a NUL byte".into()))?;
    steps.push(Step::SetHostname(hostname));
    steps.push(Step::SetDomainname(CString::from(c"(none)")));

    let root_str = root.to_string_lossy();
    steps.push(mount(
        "bind mounting the chroot onto itself:",
        Some(&root_str),
        root,
        None,
        libc::MS_BIND,
        None,
    )?);

    for b in &binds {
        let target = under(root, &b.target, "bind target")?;
        let meta = match fs::metadata(&b.source) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && b.optional => continue,
            Err(e) => {
                return Err(SandboxError::Prepare {
                    step: format!("getting attributes of bind source {}", b.source.display()),
                    source: e,
                })
            }
        };
        if meta.is_dir() {
            mkdir_all(&target)?;
        } else {
            if let Some(dir) = target.parent() {
                mkdir_all(dir)?;
            }
            fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&target)
                .map_err(prep_err(format!(
                    "creating mount point {}",
                    target.display()
                )))?;
        }
        steps.push(Step::Mount {
            mount: Mount {
                source: Some(cpath(&b.source)?),
                target: cpath(&target)?,
                fstype: None,
                flags: libc::MS_BIND | libc::MS_REC,
                data: None,
            },
            what: "bind mounting",
        });
        if b.read_only {
            let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | kept_flags(&b.source)?;
            steps.push(mount(
                "remounting read-only",
                None,
                &target,
                None,
                flags,
                None,
            )?);
        }
    }

    if !host_dev {
        let dev = root.join("dev");
        mkdir_all(&dev)?;
        for (name, to) in [
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ] {
            let link = dev.join(name);
            symlink(to, &link).map_err(prep_err(format!("creating symlink {}", link.display())))?;
        }
        // A fresh tmpfs: whatever the builder leaves in /dev/shm goes away with it.
        let shm = dev.join("shm");
        mkdir_all(&shm)?;
        steps.push(mount(
            "mounting tmpfs on",
            Some("none"),
            &shm,
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV,
            Some("mode=1777"),
        )?);
        // A private devpts instance, so the builder can open ptys without seeing the host's.
        if Path::new("/dev/pts/ptmx").exists() {
            let pts = dev.join("pts");
            mkdir_all(&pts)?;
            steps.push(mount(
                "mounting devpts on",
                Some("none"),
                &pts,
                Some("devpts"),
                libc::MS_NOSUID | libc::MS_NOEXEC,
                Some("newinstance,ptmxmode=0666,mode=0620"),
            )?);
            let ptmx = dev.join("ptmx");
            symlink("pts/ptmx", &ptmx)
                .map_err(prep_err(format!("creating symlink {}", ptmx.display())))?;
        }
    }

    let proc_dir = root.join("proc");
    mkdir_all(&proc_dir)?;
    steps.push(mount(
        "mounting proc on",
        Some("none"),
        &proc_dir,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?);

    steps.push(Step::PivotRoot(cpath(root)?));

    Ok(Prepared {
        ns_steps: steps,
        clone_flags,
        filter: Filter::new()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path) -> ChrootSpec {
        let build = dir.join("build");
        fs::create_dir(&build).unwrap();
        let mut s = ChrootSpec::new(dir.join("root"), "/nix/store".into(), build, 1000, 100);
        s.binds = vec![
            BindMount::same("/usr").read_only(),
            BindMount::same("/bin").read_only(),
            BindMount::same("/no/such/path").optional(),
        ];
        s
    }

    fn describe(p: &Prepared) -> Vec<String> {
        p.ns_steps.iter().map(Step::describe).collect()
    }

    fn position(steps: &[String], needle: &str) -> usize {
        steps
            .iter()
            .position(|s| s.contains(needle))
            .unwrap_or_else(|| panic!("no step containing {needle:?} in {steps:#?}"))
    }

    #[test]
    fn plan_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(dir.path());
        let p = prepare(&s, None).unwrap();
        let steps = describe(&p);
        let root = s.root.display().to_string();
        assert_eq!(steps[0], "making all mounts private");
        assert_eq!(steps[1], "bringing up the loopback interface");
        assert_eq!(steps[2], "setting the host name to localhost");
        assert_eq!(steps[3], "setting the domain name to (none)");
        assert_eq!(
            steps[4],
            format!("bind mounting the chroot onto itself: {root} on {root}")
        );
        let bin = position(&steps, &format!("bind mounting /bin on {root}/bin"));
        let usr = position(&steps, &format!("bind mounting /usr on {root}/usr"));
        assert!(bin < usr, "binds are sorted by target");
        assert_eq!(steps[bin + 1], format!("remounting read-only {root}/bin"));
        let build = position(&steps, &format!("bind mounting {}", s.build_dir.display()));
        let null = position(
            &steps,
            &format!("bind mounting /dev/null on {root}/dev/null"),
        );
        let proc_ = position(&steps, "mounting proc on");
        let shm = position(&steps, &format!("mounting tmpfs on {root}/dev/shm"));
        let last_bind = steps
            .iter()
            .rposition(|s| s.starts_with("bind mounting"))
            .unwrap();
        assert!(build < proc_ && null < proc_ && usr < proc_ && shm < proc_);
        assert!(last_bind < shm);
        assert_eq!(
            steps.last().unwrap(),
            &format!("pivoting the root to {root}")
        );
        assert!(!steps.iter().any(|s| s.contains("/no/such/path")));
        assert_eq!(
            p.clone_flags & libc::CLONE_NEWNET,
            libc::CLONE_NEWNET,
            "private network by default"
        );

        // The tree the parent made.
        let mode = |p: &str| fs::metadata(s.root.join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("tmp"), 0o1777);
        assert_eq!(mode("nix/store"), 0o1777);
        assert!(s.root.join("usr").is_dir());
        assert!(
            s.root.join("dev/null").is_file(),
            "file mount point for a device node"
        );
        assert_eq!(
            fs::read_link(s.root.join("dev/stderr")).unwrap(),
            Path::new("/proc/self/fd/2")
        );
        assert_eq!(
            fs::read_to_string(s.root.join("etc/passwd")).unwrap(),
            "nixbld:x:1000:100:Nix build user:/:/noshell\nnobody:x:65534:65534:Nobody:/:/noshell\n"
        );
    }

    #[test]
    fn user_switch_sits_between_bounding_set_and_seccomp() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(dir.path());
        let p = prepare(&s, None).unwrap();
        let user = crate::BuildUserIds {
            uid: 1,
            gid: 2,
            supplementary: vec![],
        };
        let steps: Vec<String> = p
            .privilege_steps(Some(crate::user_steps(&user)))
            .iter()
            .map(Step::describe)
            .collect();
        assert_eq!(
            steps,
            [
                "dropping the capability bounding set",
                "setting supplementary groups to []",
                "setgid to 2",
                "setuid to 1",
                "clearing capabilities",
                "setting no_new_privs",
                "installing the seccomp filter",
            ]
        );
    }

    #[test]
    fn host_network_keeps_the_namespace_and_binds_resolv_conf() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path());
        s.network = Network::Host;
        let p = prepare(&s, None).unwrap();
        assert_eq!(p.clone_flags & libc::CLONE_NEWNET, 0);
        let steps = describe(&p);
        assert!(!steps.iter().any(|s| s.contains("loopback")));
        if Path::new("/etc/resolv.conf").exists() {
            position(&steps, "bind mounting /etc/resolv.conf");
        }
    }

    #[test]
    fn escaping_targets_and_existing_roots_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path());
        s.binds.push(BindMount {
            target: "/../../etc".into(),
            source: "/etc".into(),
            optional: false,
            read_only: false,
        });
        let e = prepare(&s, None).err().expect("'..' refused");
        assert_eq!(
            e.to_string(),
            "invalid sandbox spec: bind target /../../etc must not contain '..'"
        );
        // The root now exists from the attempt above: a second prepare must not reuse it.
        let s2 = spec_again(dir.path());
        let e = prepare(&s2, None).err().expect("existing root refused");
        assert!(
            e.to_string().starts_with(&format!(
                "preparing the sandbox: creating chroot directory {}:",
                s2.root.display()
            )),
            "{e}"
        );
    }

    fn spec_again(dir: &Path) -> ChrootSpec {
        ChrootSpec::new(
            dir.join("root"),
            "/nix/store".into(),
            dir.join("build"),
            1,
            1,
        )
    }
}
