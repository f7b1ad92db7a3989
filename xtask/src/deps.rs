//! Installing the Debian packages the suite needs.
use anyhow::{bail, Context, Result};
use std::process::Command;

/// Debian packages the whole suite needs, with a command each provides.
pub const PACKAGES: &[(&str, &str)] = &[
    ("nix-bin", "nix-store"),
    ("qemu-system-x86", "qemu-system-x86_64"),
    ("busybox-static", "busybox"),
    ("cpio", "cpio"),
    ("xz-utils", "xz"),
    // The unpack-channel oracle test has GNU tar make bzip2-compressed channel tarballs.
    ("bzip2", "bzip2"),
    ("bubblewrap", "bwrap"),
    ("iproute2", "ip"),
    // Remote-build tests start sshd in network namespaces and reach it with ssh.
    ("openssh-server", "/usr/sbin/sshd"),
    ("openssh-client", "ssh-keygen"),
    // The collector's oracle test holds a store path by a memory map alone (ctypes).
    ("python3", "python3"),
    // The rootless tests re-run test binaries as a uid without a passwd entry.
    ("util-linux", "setpriv"),
];

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd} >/dev/null 2>&1"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn have_kernel() -> bool {
    std::fs::read_dir("/boot")
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
        })
        .unwrap_or(false)
}

/// Installs whatever is missing when running as root; otherwise says what is missing.
pub fn ensure() -> Result<()> {
    let mut missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, c)| !have(c))
        .map(|(p, _)| *p)
        .collect();
    if !have_kernel() {
        missing.push("linux-image-amd64");
    }
    if missing.is_empty() {
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "missing Debian packages: {} (run as root to install them, or install them yourself)",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    let ok = Command::new("apt-get")
        .arg("update")
        .arg("-qq")
        .status()
        .context("running apt-get update")?;
    if !ok.success() {
        bail!("apt-get update failed");
    }
    let ok = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get install")?;
    if !ok.success() {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}
