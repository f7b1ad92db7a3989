//! Running QEMU: the command line, the console stream, and turning how the machine ended
//! into a result.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::guest::EXIT_MARKER;

pub struct Machine {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub kvm: bool,
    pub mem_mb: u32,
    /// Virtual CPUs (`-smp`); under TCG each is a host thread of its own.
    pub cpus: u32,
    /// Host directories shared read-only, in the order the guest mounts them (`ws<i>`).
    pub shares: Vec<PathBuf>,
    pub debug: bool,
    pub timeout: Duration,
    pub console_log: PathBuf,
}

/// The exit status the guest reported.
pub fn run(m: &Machine) -> Result<i32> {
    // quiet boot, no crypto self-tests, no W+X scan, no ACPI PCI link setup (each costs a
    // noticeable fraction of a second under TCG); panic=-1 + -no-reboot ends QEMU on a panic.
    let mut append = String::from(
        "console=ttyS0 panic=-1 cryptomgr.notests rodata=off mitigations=off nokaslr no_timer_check acpi=noirq",
    );
    append.push_str(if m.debug {
        " loglevel=6 printk.time=1"
    } else {
        " quiet loglevel=2"
    });
    if let Ok(extra) = std::env::var("VM_APPEND") {
        append.push(' ');
        append.push_str(&extra);
    }
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", "pc", "-m", &m.mem_mb.to_string()]);
    cmd.args(["-smp", &m.cpus.to_string()]);
    if m.kvm {
        cmd.args(["-accel", "kvm", "-cpu", "host"]);
    } else {
        cmd.args(["-accel", "tcg", "-cpu", "max"]);
    }
    cmd.args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    cmd.args([
        "-chardev",
        "stdio,id=con,signal=off",
        "-serial",
        "chardev:con",
    ]);
    cmd.arg("-kernel")
        .arg(&m.kernel)
        .arg("-initrd")
        .arg(&m.initrd);
    cmd.args(["-append", &append]);
    cmd.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
    let usr = Path::new("/usr").to_path_buf();
    let shares = std::iter::once(("usr".to_string(), &usr)).chain(
        m.shares
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("ws{i}"), p)),
    );
    for (i, (tag, path)) in shares.enumerate() {
        let path = path
            .to_str()
            .with_context(|| format!("share {} is not UTF-8", path.display()))?;
        if path.contains(',') {
            bail!("cannot share {path} over 9p: QEMU's option syntax does not allow ',' in paths");
        }
        cmd.args([
            "-fsdev",
            &format!("local,id=fs{i},path={path},security_model=none,readonly=on"),
        ]);
        cmd.args([
            "-device",
            &format!("virtio-9p-pci,fsdev=fs{i},mount_tag={tag}"),
        ]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());

    let mut log = std::fs::File::create(&m.console_log)
        .with_context(|| format!("creating {}", m.console_log.display()))?;
    let mut child = cmd
        .spawn()
        .context("starting qemu-system-x86_64 (apt install qemu-system-x86)")?;
    let mut stdout = child.stdout.take().context("qemu stdout")?;
    // Stream the console to stderr and the log as it comes, and keep it for the verdict.
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 8192];
        let mut err = std::io::stderr();
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let _ = err.write_all(&buf[..n]);
                    let _ = log.write_all(&buf[..n]);
                    all.extend_from_slice(&buf[..n]);
                }
            }
        }
        all
    });

    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().context("waiting for qemu")? {
            break Some(st);
        }
        if start.elapsed() > m.timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let console = reader.join().unwrap_or_default();
    let console = String::from_utf8_lossy(&console);
    let log = m.console_log.display();

    if let Some(rc) = console
        .rmatch_indices(EXIT_MARKER)
        .find_map(|(i, _)| parse_marker(&console[i + EXIT_MARKER.len()..]))
    {
        return Ok(rc);
    }
    let Some(status) = status else {
        bail!(
            "the VM did not finish within {} s (console: {log})",
            m.timeout.as_secs()
        );
    };
    if let Some(line) = console.lines().find(|l| l.contains("Kernel panic")) {
        bail!(
            "the guest kernel panicked: {} (console: {log})",
            line.trim()
        );
    }
    // isa-debug-exit: the marker was lost but the guest still said how it ended.
    if let Some(code) = status.code() {
        if code & 1 == 1 {
            return Ok((code - 1) / 2);
        }
    }
    bail!("the VM ended without reporting a status (qemu: {status}; console: {log})")
}

/// `<digits>@@` after the marker.
fn parse_marker(rest: &str) -> Option<i32> {
    let end = rest.find("@@")?;
    rest[..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker() {
        assert_eq!(parse_marker("17@@\n"), Some(17));
        assert_eq!(parse_marker("$rc@@"), None);
        assert_eq!(parse_marker("3"), None);
    }
}
