//! A writer for the `newc` cpio format, the one the kernel unpacks as an initramfs.
//!
//! ```text
//! entry   = header name NUL pad4 data pad4
//! header  = "070701" + 13 fields of 8 upper-case hex digits:
//!           ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor
//!           namesize (including the NUL) check (always 0)
//! archive = entry* entry("TRAILER!!!", all fields 0 but nlink 1) pad4
//! ```
//!
//! pad4 pads with zeros to a multiple of 4 bytes counted from the start of the archive; the
//! header is 110 bytes, so a name is padded such that 110 + namesize is a multiple of 4.
//! Every entry is owned by root and has mtime 0, so the same inputs give the same bytes.
//! Parent directories are emitted automatically (mode 0755) before their first child.

use std::collections::BTreeSet;

pub struct Cpio {
    buf: Vec<u8>,
    next_ino: u32,
    dirs: BTreeSet<String>,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

impl Cpio {
    pub fn new() -> Cpio {
        Cpio {
            buf: Vec::new(),
            next_ino: 1,
            dirs: BTreeSet::new(),
        }
    }

    /// Adds a directory (and its parents). `path` is relative to the root, e.g. `etc/nix`.
    pub fn dir(&mut self, path: &str, mode: u32) {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return;
        }
        self.parents(path);
        self.dirs.insert(path.to_string());
        self.entry(path, S_IFDIR | mode, 2, b"");
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        let path = path.trim_matches('/');
        self.parents(path);
        self.entry(path, S_IFREG | mode, 1, data);
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        let path = path.trim_matches('/');
        self.parents(path);
        self.entry(path, S_IFLNK | 0o777, 1, target.as_bytes());
    }

    /// Appends the trailer and returns the archive; its length is a multiple of 4, so another
    /// archive may be concatenated after it.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 1, b"");
        self.buf
    }

    fn parents(&mut self, path: &str) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent, 0o755);
        }
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, data: &[u8]) {
        let ino = if name == "TRAILER!!!" {
            0
        } else {
            self.next_ino
        };
        self.next_ino += 1;
        let fields = [
            ino,
            mode,
            0,
            0,
            nlink,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.buf.len() & 3 != 0 {
            self.buf.push(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GNU cpio (an independent implementation) must list and extract what we write.
    #[test]
    fn gnu_cpio_reads_it() {
        if std::process::Command::new("cpio")
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(
                std::env::var_os("CI").is_none(),
                "cpio is not installed (apt install cpio)"
            );
            eprintln!("skipping: cpio not installed");
            return;
        }
        let mut c = Cpio::new();
        c.file("a/b/hello.txt", 0o644, b"hello\n");
        c.symlink("a/link", "b/hello.txt");
        c.file("odd", 0o755, b"12345");
        let bytes = c.finish();
        assert_eq!(bytes.len() & 3, 0);
        let dir = std::env::temp_dir().join(format!("xtask-cpio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-i", "-d", "--quiet", "--no-absolute-filenames"])
            .current_dir(&dir)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        assert!(child.wait().unwrap().success());
        assert_eq!(
            std::fs::read(dir.join("a/b/hello.txt")).unwrap(),
            b"hello\n"
        );
        assert_eq!(std::fs::read(dir.join("a/link")).unwrap(), b"hello\n");
        assert_eq!(
            std::fs::read_link(dir.join("a/link")).unwrap().to_str(),
            Some("b/hello.txt")
        );
        assert_eq!(std::fs::read(dir.join("odd")).unwrap(), b"12345");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
