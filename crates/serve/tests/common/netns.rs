//! Test hosts in network namespaces, reached over real SSH.
//!
//! Each [`SshHost`] is a network namespace made by the test, joined to the test's own
//! namespace by a veth pair on a private /30 (`10.232.<pid % 250>.<4n>`: host side
//! `.4n+1`, namespace side `.4n+2`), with Debian's `sshd` listening on the namespace's
//! address, port 22. sshd gets a fresh host key, one authorized client key and a
//! `ForceCommand`, so whatever the client asks to run, the host runs the caller's
//! script (which sees the request in `$SSH_ORIGINAL_COMMAND`). sshd runs in a private
//! mount namespace with its own `/run`, so nothing of the machine's is touched. Dropping
//! the host kills sshd and deletes the namespace (and with it the veth pair).
//!
//! Used by `crates/serve/tests/netns_ssh.rs` (through `common`) and by
//! `tests/tests/remote_netns.rs` (through `#[path]`): it depends on `std` and
//! `nixb-testsupport` alone. Needs root, `ip`, `unshare`, `/usr/sbin/sshd` and `ssh-keygen`;
//! [`can_run`] says whether they are here, and under `CI=true` their absence is a failure,
//! not a skip.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpStream};

use nixb_testsupport::Need;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// What these hosts need of the machine.
const NEEDS: &[Need] = &[
    Need::Root,
    Need::Program("ip"),
    Need::Program("unshare"),
    Need::Program("/usr/sbin/sshd"),
    Need::Program("ssh"),
    Need::Program("ssh-keygen"),
];

/// True when namespaces and sshd can be used here; see [`nixb_testsupport::required`] for
/// what happens otherwise (`cargo xtask test` installs openssh-server, openssh-client and
/// iproute2).
pub fn can_run() -> bool {
    nixb_testsupport::required(NEEDS)
}

fn run(cmd: &mut Command) {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Plain padded base64 (RFC 4648), as Nix's machines file wants the host key; written
/// out here so that the machines parser is checked against an independent encoder.
pub fn base64(b: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// A network namespace with sshd on its address; torn down on drop.
pub struct SshHost {
    pub ns: String,
    /// The namespace's address, where sshd listens (port 22).
    pub ip: String,
    /// The test namespace's end of the veth pair.
    pub host_ip: String,
    /// The client's private key, authorized by this host.
    pub client_key: PathBuf,
    /// The host's public key line (`ssh-ed25519 AAAA... host`).
    pub host_pub: String,
    dir: PathBuf,
    sshd: Option<Child>,
}

impl SshHost {
    /// Makes the namespace and starts sshd in it; every login runs `forced` (an
    /// executable). `dir` holds the keys, config and sshd's log.
    pub fn start(dir: &Path, forced: &Path) -> SshHost {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < 64, "at most 64 test hosts per process");
        let pid = std::process::id();
        let ns = format!("nixb-t{pid}-{n}");
        let net = format!("10.232.{}", pid % 250);
        let (host_ip, ip) = (
            format!("{net}.{}", 4 * n + 1),
            format!("{net}.{}", 4 * n + 2),
        );
        // Interface names have at most 15 bytes.
        let (veth_host, veth_ns) = (
            format!("nx{}-{n}h", pid % 100_000),
            format!("nx{}-{n}n", pid % 100_000),
        );
        std::fs::create_dir_all(dir).unwrap();
        let mut host = SshHost {
            ns: ns.clone(),
            ip: ip.clone(),
            host_ip: host_ip.clone(),
            client_key: dir.join("client"),
            host_pub: String::new(),
            dir: dir.to_path_buf(),
            sshd: None,
        };
        run(Command::new("ip").args(["netns", "add", &ns]));
        run(Command::new("ip").args([
            "link", "add", &veth_host, "type", "veth", "peer", "name", &veth_ns,
        ]));
        run(Command::new("ip").args(["link", "set", &veth_ns, "netns", &ns]));
        run(Command::new("ip").args(["addr", "add", &format!("{host_ip}/30"), "dev", &veth_host]));
        run(Command::new("ip").args(["link", "set", &veth_host, "up"]));
        run(Command::new("ip").args([
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ip}/30"),
            "dev",
            &veth_ns,
        ]));
        run(Command::new("ip").args(["-n", &ns, "link", "set", &veth_ns, "up"]));
        run(Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]));

        for k in ["host", "client"] {
            let _ = std::fs::remove_file(dir.join(k));
            let _ = std::fs::remove_file(dir.join(format!("{k}.pub")));
            run(Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", k, "-f"])
                .arg(dir.join(k)));
        }
        std::fs::copy(dir.join("client.pub"), dir.join("authorized_keys")).unwrap();
        host.host_pub = std::fs::read_to_string(dir.join("host.pub"))
            .unwrap()
            .trim()
            .to_string();
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "ListenAddress {ip}:22\nHostKey {d}/host\nAuthorizedKeysFile {d}/authorized_keys\n\
                 PidFile none\nStrictModes no\nUsePAM no\nPermitRootLogin prohibit-password\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 ForceCommand {forced}\n",
                d = dir.display(),
                forced = forced.display(),
            ),
        )
        .unwrap();
        // sshd wants /run/sshd (privilege separation): a private /run instead of the
        // machine's.
        let log = std::fs::File::create(dir.join("sshd.log")).unwrap();
        host.sshd = Some(
            Command::new("ip")
                .args(["netns", "exec", &ns, "unshare", "--mount", "--propagation", "private"])
                .args(["sh", "-c"])
                .arg(r#"mount -t tmpfs tmpfs /run && mkdir -m 755 /run/sshd && exec /usr/sbin/sshd -D -e -f "$1""#)
                .arg("sh")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        let addr: SocketAddr = format!("{ip}:22").parse().unwrap();
        let t0 = Instant::now();
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "sshd in {ns} did not come up: {}",
                host.sshd_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        host
    }

    /// `ssh://root@<ip>`, as a machines file names it.
    pub fn uri(&self) -> String {
        format!("ssh://root@{}", self.ip)
    }

    /// A machines-file line for this host: its key and pinned host key.
    pub fn machines_line(
        &self,
        systems: &str,
        max_jobs: u32,
        speed: u32,
        features: &str,
    ) -> String {
        format!(
            "{} {systems} {} {max_jobs} {speed} {features} - {}",
            self.uri(),
            self.client_key.display(),
            base64(self.host_pub.as_bytes())
        )
    }

    pub fn sshd_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }
}

impl Drop for SshHost {
    fn drop(&mut self) {
        if let Some(mut c) = self.sshd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Deleting the namespace deletes the veth end inside it, and so its peer.
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}
