//! The guest kernel: which one, how to boot it fast under TCG, which modules it needs, and
//! whether KVM can be used.
//!
//! Under TCG, decompressing Debian's xz bzImage costs about 5 s, so the ELF `vmlinux` inside
//! it is extracted once (cached under `target/vm-cache/`) and booted through its PVH entry
//! point, which QEMU uses on its own for an ELF kernel with the Xen PHYS32_ENTRY note.
//! Debian builds virtio and 9p as modules; the guest has no modprobe, so the xtask resolves
//! their order from `modules.dep` and the guest `insmod`s them in that order.

use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub struct Kernel {
    pub version: String,
    /// The bzImage in /boot.
    pub image: PathBuf,
    pub modules_dir: PathBuf,
}

/// `VM_KERNEL` if set, else the newest `/boot/vmlinuz-*` by version.
pub fn find() -> Result<Kernel> {
    let image = match std::env::var_os("VM_KERNEL") {
        Some(k) => PathBuf::from(k),
        None => {
            let mut found: Vec<String> = std::fs::read_dir("/boot")
                .context("reading /boot")?
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with("vmlinuz-"))
                .collect();
            found.sort_by_key(|n| version_key(n));
            match found.pop() {
                Some(n) => Path::new("/boot").join(n),
                None => bail!(
                    "no /boot/vmlinuz-* found (apt install linux-image-amd64, or set VM_KERNEL)"
                ),
            }
        }
    };
    let name = image
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let Some(version) = name.strip_prefix("vmlinuz-") else {
        bail!(
            "kernel {}: expected a file named vmlinuz-<version>",
            image.display()
        );
    };
    let modules_dir = Path::new("/lib/modules").join(version);
    if !modules_dir.join("modules.dep").is_file() {
        bail!(
            "kernel {}: {} has no modules.dep",
            image.display(),
            modules_dir.display()
        );
    }
    std::fs::File::open(&image)
        .with_context(|| format!("kernel {} is not readable", image.display()))?;
    Ok(Kernel {
        version: version.to_string(),
        image,
        modules_dir,
    })
}

/// Numbers compare as numbers, so 6.10 sorts after 6.9.
fn version_key(s: &str) -> Vec<(u64, String)> {
    s.split(|c: char| !c.is_ascii_alphanumeric())
        .map(|p| (p.parse().unwrap_or(0), p.to_string()))
        .collect()
}

/// The uncompressed ELF kernel, extracted from the bzImage on first use.
pub fn vmlinux(kernel: &Kernel, cache: &Path) -> Result<PathBuf> {
    let out = cache.join(format!("vmlinux-{}", kernel.version));
    if out.is_file() {
        return Ok(out);
    }
    let image = std::fs::read(&kernel.image)
        .with_context(|| format!("reading {}", kernel.image.display()))?;
    // The bzImage carries the compressed kernel somewhere after its setup code; try each
    // compressor's magic and keep the first payload that decompresses to an ELF file.
    let magics: [(&[u8], &[&str]); 3] = [
        (b"\xfd7zXZ\x00", &["xz", "-dc", "--single-stream"]),
        (b"\x28\xb5\x2f\xfd", &["zstd", "-dc"]),
        (b"\x1f\x8b\x08", &["gzip", "-dc"]),
    ];
    let tmp = cache.join(format!("vmlinux-{}.tmp", kernel.version));
    for (magic, cmd) in magics {
        for off in find_all(&image, magic).into_iter().take(3) {
            let Ok(elf) = decompress(cmd, &image[off..]) else {
                continue;
            };
            if elf.starts_with(b"\x7fELF") {
                std::fs::write(&tmp, &elf).with_context(|| format!("writing {}", tmp.display()))?;
                std::fs::rename(&tmp, &out)
                    .with_context(|| format!("renaming to {}", out.display()))?;
                return Ok(out);
            }
        }
    }
    bail!(
        "kernel {}: found no xz, zstd or gzip payload that decompresses to an ELF vmlinux",
        kernel.image.display()
    )
}

fn find_all(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    hay.windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

/// Runs a decompressor over `input`; trailing garbage after the stream makes some of them
/// fail, so the output is judged by its content, not the exit status.
fn decompress(cmd: &[&str], input: &[u8]) -> Result<Vec<u8>> {
    let mut child = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("running {}", cmd[0]))?;
    let mut stdin = child.stdin.take().context("decompressor stdin")?;
    let data = input.to_vec();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        // The decompressor may stop reading early (end of stream); that is fine.
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output()?;
    let _ = writer.join();
    Ok(out.stdout)
}

/// The modules to load (dependencies first) so that `wanted` work, as paths relative to
/// the modules directory.
pub fn resolve_modules(kernel: &Kernel, wanted: &[&str]) -> Result<Vec<String>> {
    let dep_file = kernel.modules_dir.join("modules.dep");
    let deps = std::fs::read_to_string(&dep_file)
        .with_context(|| format!("reading {}", dep_file.display()))?;
    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    for w in wanted {
        visit(
            &deps,
            &dep_file,
            &w.replace('-', "_"),
            &mut seen,
            &mut order,
        )?;
    }
    Ok(order)
}

fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.split(".ko").next().unwrap_or(base).replace('-', "_")
}

fn visit(
    deps: &str,
    dep_file: &Path,
    name: &str,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<String>,
) -> Result<()> {
    let line = deps
        .lines()
        .find(|l| l.split(':').next().is_some_and(|p| module_name(p) == name))
        .with_context(|| format!("module {name} not found in {}", dep_file.display()))?;
    let (path, rest) = line.split_once(':').unwrap_or((line, ""));
    if !seen.insert(path.to_string()) {
        return Ok(());
    }
    // modules.dep lists the full transitive closure; visiting each keeps the order right.
    for dep in rest.split_whitespace() {
        visit(deps, dep_file, &module_name(dep), seen, order)?;
    }
    order.push(path.to_string());
    Ok(())
}

/// A module file without its appended signature: checking signatures costs a noticeable
/// fraction of a second under TCG, and the kernel loads unsigned modules (it only taints
/// itself) unless `module.sig_enforce` is set.
pub fn strip_signature(ko: &[u8]) -> &[u8] {
    const MAGIC: &[u8] = b"~Module signature appended~\n";
    // struct module_signature: 12 bytes before the magic, the last 4 the signature length
    // (big endian).
    let Some(body) = ko.strip_suffix(MAGIC) else {
        return ko;
    };
    if body.len() < 12 {
        return ko;
    }
    let info = &body[body.len() - 12..];
    let sig_len = u32::from_be_bytes([info[8], info[9], info[10], info[11]]) as usize;
    let end = body.len() - 12;
    if sig_len > end {
        return ko;
    }
    &body[..end - sig_len]
}

/// KVM only on real hardware virtualisation. On a PVM host (`kvm_pvm`) `/dev/kvm` exists
/// but a stock kernel crawls (and `-cpu host` aborts on an MSR), so TCG is the choice there.
pub fn use_kvm() -> bool {
    let writable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let module = |m: &str| Path::new("/sys/module").join(m).exists();
    writable && !module("kvm_pvm") && (module("kvm_intel") || module("kvm_amd"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_numerically() {
        let mut v = vec![
            "vmlinuz-6.10.1-amd64",
            "vmlinuz-6.9.12-amd64",
            "vmlinuz-6.1.0-56-amd64",
        ];
        v.sort_by_key(|n| version_key(n));
        assert_eq!(
            v,
            [
                "vmlinuz-6.1.0-56-amd64",
                "vmlinuz-6.9.12-amd64",
                "vmlinuz-6.10.1-amd64"
            ]
        );
    }

    #[test]
    fn signature_is_stripped() {
        let mut ko = b"ELFBODY".to_vec();
        let sig = b"SIGNATURE";
        ko.extend_from_slice(sig);
        ko.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0]);
        ko.extend_from_slice(&(sig.len() as u32).to_be_bytes());
        ko.extend_from_slice(b"~Module signature appended~\n");
        assert_eq!(strip_signature(&ko), b"ELFBODY");
        assert_eq!(strip_signature(b"ELFBODY"), b"ELFBODY");
    }

    #[test]
    fn module_names() {
        assert_eq!(module_name("kernel/net/9p/9pnet_virtio.ko"), "9pnet_virtio");
        assert_eq!(
            module_name("kernel/drivers/char/hw_random/virtio-rng.ko.xz"),
            "virtio_rng"
        );
    }
}
