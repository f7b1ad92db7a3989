//! Copying one NAR from a stream without unpacking it: where a NAR travels unframed
//! (the `NarFromPath` reply, `AddToStore` before 1.25), its end is known only from its
//! grammar (see `nixb_store::nar` for the format). The walk bounds every token: tags and
//! names have hard caps, file contents are streamed, and it is iterative with nesting
//! limited to [`MAX_NAR_DEPTH`], so a hostile archive can exhaust neither the stack of a
//! small connection thread nor anything else.

use std::io::{Read, Write};

use crate::error::{ProtocolError, Result};
use crate::wire::{padding_len, WireReader};

/// Deepest directory nesting accepted (Linux paths stop at 4096 bytes, so real trees
/// are far shallower).
pub const MAX_NAR_DEPTH: usize = 2048;
const MAX_TOKEN: u64 = 4096;

struct Copier<'a, R, W: ?Sized> {
    r: &'a mut WireReader<R>,
    w: &'a mut W,
}

impl<R: Read, W: Write + ?Sized> Copier<'_, R, W> {
    fn bad(&self, reason: impl Into<String>) -> ProtocolError {
        ProtocolError::Nar {
            offset: self.r.offset(),
            reason: reason.into(),
        }
    }

    fn out(&mut self, b: &[u8]) -> Result<()> {
        self.w.write_all(b).map_err(|source| ProtocolError::Io {
            what: "copying a nar",
            source,
        })
    }

    fn token(&mut self) -> Result<Vec<u8>> {
        let s = self.r.read_bytes_max("nar token", MAX_TOKEN)?;
        self.out(&(s.len() as u64).to_le_bytes())?;
        self.out(&s)?;
        self.out(&[0u8; 8][..padding_len(s.len() as u64)])?;
        Ok(s)
    }

    fn expect(&mut self, want: &str) -> Result<()> {
        let t = self.token()?;
        if t != want.as_bytes() {
            return Err(self.bad(format!(
                "expected '{want}', got '{}'",
                String::from_utf8_lossy(&t)
            )));
        }
        Ok(())
    }

    fn contents(&mut self) -> Result<()> {
        let len = self.r.read_u64("nar file size")?;
        self.out(&len.to_le_bytes())?;
        let mut left = len;
        let mut buf = vec![0u8; 64 << 10];
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            self.r
                .read_exact(&mut buf[..n])
                .map_err(|source| ProtocolError::Io {
                    what: "nar file contents",
                    source,
                })?;
            self.out(&buf[..n])?;
            left -= n as u64;
        }
        let pad = padding_len(len);
        let mut p = [0u8; 8];
        self.r
            .read_exact(&mut p[..pad])
            .map_err(|source| ProtocolError::Io {
                what: "nar padding",
                source,
            })?;
        if p.iter().any(|&b| b != 0) {
            return Err(self.bad("non-zero padding after file contents"));
        }
        self.out(&p[..pad])
    }

    /// Walks one node and everything under it. Iterative, with only a depth counter: a
    /// connection's thread may have a small stack, and an archive may nest deeply.
    fn walk(&mut self) -> Result<()> {
        // Directories open around the current position.
        let mut depth = 0usize;
        loop {
            // At the start of a node.
            self.expect("(")?;
            self.expect("type")?;
            let t = self.token()?;
            match &t[..] {
                b"regular" => {
                    let mut tag = self.token()?;
                    if tag == b"executable" {
                        self.expect("")?;
                        tag = self.token()?;
                    }
                    if tag != b"contents" {
                        return Err(self.bad("expected 'contents'"));
                    }
                    self.contents()?;
                    self.expect(")")?;
                }
                b"symlink" => {
                    self.expect("target")?;
                    self.token()?;
                    self.expect(")")?;
                }
                b"directory" => {
                    depth += 1;
                    if depth > MAX_NAR_DEPTH {
                        return Err(
                            self.bad(format!("nested deeper than {MAX_NAR_DEPTH} directories"))
                        );
                    }
                }
                _ => {
                    return Err(self.bad(format!(
                        "unknown node type '{}'",
                        String::from_utf8_lossy(&t)
                    )))
                }
            }
            if t != b"directory" {
                if depth == 0 {
                    return Ok(());
                }
                // The ")" of the entry that held this file or symlink.
                self.expect(")")?;
            }
            // Inside a directory: more entries, or its end.
            loop {
                let tag = self.token()?;
                match &tag[..] {
                    b")" => {
                        depth -= 1;
                        if depth == 0 {
                            return Ok(());
                        }
                        // The ")" of the entry that held this directory.
                        self.expect(")")?;
                    }
                    b"entry" => {
                        self.expect("(")?;
                        self.expect("name")?;
                        self.token()?;
                        self.expect("node")?;
                        break;
                    }
                    _ => return Err(self.bad("expected 'entry' or ')'")),
                }
            }
        }
    }
}

/// Copies exactly one NAR from `r` to `w`; returns its size.
pub fn copy_nar<R: Read, W: Write + ?Sized>(r: &mut WireReader<R>, w: &mut W) -> Result<u64> {
    let start = r.offset();
    let mut c = Copier { r, w };
    c.expect("nix-archive-1")?;
    c.walk()?;
    Ok(c.r.offset() - start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_a_nar_made_by_the_store_crate_and_stops_at_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("t");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/f"), b"hello").unwrap();
        std::os::unix::fs::symlink("sub/f", root.join("l")).unwrap();
        let mut nar = Vec::new();
        nixb_store::nar::dump_path(&root, &mut nar).unwrap();
        let mut stream = nar.clone();
        stream.extend_from_slice(b"trailing");
        let mut r = WireReader::new(&stream[..]);
        let mut out = Vec::new();
        assert_eq!(copy_nar(&mut r, &mut out).unwrap(), nar.len() as u64);
        assert_eq!(out, nar);
        let e = copy_nar(&mut WireReader::new(&nar[..nar.len() - 8]), &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("stream ends"), "{e}");
    }

    fn tok(v: &mut Vec<u8>, b: &[u8]) {
        v.extend_from_slice(&(b.len() as u64).to_le_bytes());
        v.extend_from_slice(b);
        v.resize(v.len() + (8 - b.len() % 8) % 8, 0);
    }

    /// Directories nested `depth` deep around one empty file.
    fn nested(depth: usize) -> Vec<u8> {
        let mut v = Vec::new();
        tok(&mut v, b"nix-archive-1");
        for _ in 0..depth {
            for t in [
                &b"("[..],
                b"type",
                b"directory",
                b"entry",
                b"(",
                b"name",
                b"d",
                b"node",
            ] {
                tok(&mut v, t);
            }
        }
        for t in [&b"("[..], b"type", b"regular", b"contents", b"", b")"] {
            tok(&mut v, t);
        }
        for _ in 0..depth {
            tok(&mut v, b")");
            tok(&mut v, b")");
        }
        v
    }

    #[test]
    fn nesting_is_bounded() {
        let ok = nested(MAX_NAR_DEPTH);
        assert_eq!(
            copy_nar(&mut WireReader::new(&ok[..]), &mut Vec::new()).unwrap(),
            ok.len() as u64
        );
        // Also on a thread with the small stack a daemon may give a connection.
        let t = std::thread::Builder::new()
            .stack_size(64 << 10)
            .spawn(move || copy_nar(&mut WireReader::new(&ok[..]), &mut std::io::sink()).is_ok())
            .unwrap();
        assert!(t.join().unwrap());
        let deep = nested(MAX_NAR_DEPTH + 1);
        let e = copy_nar(&mut WireReader::new(&deep[..]), &mut Vec::new()).unwrap_err();
        assert!(
            e.to_string()
                .contains("nested deeper than 2048 directories"),
            "{e}"
        );
    }
}
