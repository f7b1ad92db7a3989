//! The wire encoding shared by the worker protocol, `nix-store --serve` and the export
//! format:
//!
//! ```text
//! u64(n)      = n as 8 bytes, little endian
//! bool(b)     = u64(0 | 1)            (any non-zero value reads as true, as in Nix)
//! str(s)      = u64(len(s)) s <zero padding to a multiple of 8>
//! strs(l)     = u64(count) str(l[0]) ... str(l[count-1])
//! map(m)      = u64(count) str(k0) str(v0) ... str(k[count-1]) str(v[count-1])
//! ```
//!
//! [`WireReader`] counts the bytes it consumed so that every error names the offset and
//! the field being read. It is bounded by construction:
//!
//! - every length is checked against a named limit ([`MAX_STRING_LEN`], [`MAX_LIST_LEN`],
//!   or the caller's own, e.g. `crate::limits::MAX_PATH_LEN`) *and* against what the
//!   current frame can still hold ([`WireReader::set_limit`]) before anything is
//!   allocated;
//! - a string's buffer grows only as its bytes actually arrive (in chunks of at most
//!   [`READ_CHUNK`]), so a peer that announces 200 MiB and sends nothing costs nothing;
//! - list counts are never used to pre-allocate.
//!
//! It also implements [`Read`], so that a NAR embedded in the stream can be consumed
//! through it with the offset kept right.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufWriter, Read, Write};

/// Longest string accepted from a peer unless the caller names a tighter limit.
/// Environment values of real derivations can be large (whole scripts, `__json`), and
/// `AddTextToStore` carries whole files, but not this large; the cap bounds what a
/// hostile or confused peer can make us allocate.
pub const MAX_STRING_LEN: u64 = 256 << 20;

/// Most elements accepted in one list, set or map. Real lists are far below it (a NixOS
/// system's closure has a few thousand paths, a derivation's environment a few hundred
/// entries); it keeps a peer sending millions of empty strings from making us hold
/// millions of (24-byte) `String`s.
pub const MAX_LIST_LEN: u64 = 1 << 20;

/// Most bytes read from the peer into a buffer in one step.
pub const READ_CHUNK: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("reading {what} at byte {offset}: {source}")]
    Io {
        what: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("stream ends at byte {offset} while reading {what}")]
    Eof { what: &'static str, offset: u64 },
    #[error("{what} at byte {offset} is {len} bytes long, more than the {max} allowed")]
    TooLong {
        what: &'static str,
        offset: u64,
        len: u64,
        max: u64,
    },
    #[error("{what} at byte {offset} has {count} elements, more than the {max} allowed")]
    TooMany {
        what: &'static str,
        offset: u64,
        count: u64,
        max: u64,
    },
    #[error("non-zero padding after {what} at byte {offset}")]
    Padding { what: &'static str, offset: u64 },
    #[error("{what} at byte {offset} is not valid utf-8")]
    Utf8 { what: &'static str, offset: u64 },
    #[error("{what} at byte {offset} is {value}, which does not fit")]
    Range {
        what: &'static str,
        offset: u64,
        value: u64,
    },
    #[error("writing {what}: {source}")]
    Write {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

impl WireError {
    /// True when the peer closed the stream (cleanly or mid-field).
    pub fn is_eof(&self) -> bool {
        matches!(self, WireError::Eof { .. })
    }
}

/// Bytes of zero padding after a payload of `len` bytes.
pub fn padding_len(len: u64) -> usize {
    ((8 - len % 8) % 8) as usize
}

pub struct WireReader<R> {
    inner: R,
    offset: u64,
    /// Absolute offset past which this reader must not read (the end of the current
    /// frame, when the caller knows it).
    end: Option<u64>,
}

impl<R: Read> WireReader<R> {
    pub fn new(inner: R) -> WireReader<R> {
        WireReader {
            inner,
            offset: 0,
            end: None,
        }
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Allows at most `remaining` more bytes to be read (`None`: no limit besides the
    /// named ones). A length or count that the rest of the frame cannot hold is an error
    /// before anything is allocated.
    pub fn set_limit(&mut self, remaining: Option<u64>) {
        self.end = remaining.map(|n| self.offset.saturating_add(n));
    }

    /// Bytes the current limit still allows (`u64::MAX` without one).
    pub fn remaining(&self) -> u64 {
        match self.end {
            Some(end) => end.saturating_sub(self.offset),
            None => u64::MAX,
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    fn fill(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), WireError> {
        if buf.len() as u64 > self.remaining() {
            return Err(WireError::TooLong {
                what,
                offset: self.offset,
                len: buf.len() as u64,
                max: self.remaining(),
            });
        }
        let mut done = 0;
        while done < buf.len() {
            match self.inner.read(&mut buf[done..]) {
                Ok(0) => {
                    return Err(WireError::Eof {
                        what,
                        offset: self.offset,
                    })
                }
                Ok(n) => {
                    done += n;
                    self.offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(WireError::Io {
                        what,
                        offset: self.offset,
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    pub fn read_u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        let mut b = [0u8; 8];
        self.fill(&mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }

    /// A u64 that must be at most `max` (Nix's `readNum<T>` for a narrower T).
    pub fn read_u64_max(&mut self, what: &'static str, max: u64) -> Result<u64, WireError> {
        let offset = self.offset;
        let value = self.read_u64(what)?;
        if value > max {
            return Err(WireError::Range {
                what,
                offset,
                value,
            });
        }
        Ok(value)
    }

    /// Like [`read_u64`](Self::read_u64), but a clean end of stream before the first byte
    /// is `None`: how a server learns that its client has gone.
    pub fn read_u64_or_eof(&mut self, what: &'static str) -> Result<Option<u64>, WireError> {
        let mut b = [0u8; 8];
        loop {
            match self.inner.read(&mut b[..1]) {
                Ok(0) => return Ok(None),
                Ok(_) => {
                    self.offset += 1;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(WireError::Io {
                        what,
                        offset: self.offset,
                        source,
                    })
                }
            }
        }
        self.fill(&mut b[1..], what)?;
        Ok(Some(u64::from_le_bytes(b)))
    }

    pub fn read_bool(&mut self, what: &'static str) -> Result<bool, WireError> {
        Ok(self.read_u64(what)? != 0)
    }

    /// A string of at most `max` bytes, as raw bytes. The length is checked against `max`
    /// and against the current limit before any allocation, and the buffer then grows
    /// only as bytes arrive.
    pub fn read_bytes_max(&mut self, what: &'static str, max: u64) -> Result<Vec<u8>, WireError> {
        let start = self.offset;
        let len = self.read_u64(what)?;
        let room = self.remaining();
        let padded = len.saturating_add(padding_len(len) as u64);
        if len > max || padded > room {
            return Err(WireError::TooLong {
                what,
                offset: start,
                len,
                max: max.min(room),
            });
        }
        let mut v = Vec::with_capacity((len as usize).min(READ_CHUNK));
        let mut left = len as usize;
        while left > 0 {
            let n = left.min(READ_CHUNK);
            let at = v.len();
            v.resize(at + n, 0);
            self.fill(&mut v[at..], what)?;
            left -= n;
        }
        let pad = padding_len(len);
        let mut p = [0u8; 8];
        let pad_at = self.offset;
        self.fill(&mut p[..pad], what)?;
        if p[..pad].iter().any(|&b| b != 0) {
            return Err(WireError::Padding {
                what,
                offset: pad_at,
            });
        }
        Ok(v)
    }

    pub fn read_bytes(&mut self, what: &'static str) -> Result<Vec<u8>, WireError> {
        self.read_bytes_max(what, MAX_STRING_LEN)
    }

    /// A utf-8 string of at most `max` bytes.
    pub fn read_string_max(&mut self, what: &'static str, max: u64) -> Result<String, WireError> {
        let start = self.offset;
        let b = self.read_bytes_max(what, max)?;
        String::from_utf8(b).map_err(|_| WireError::Utf8 {
            what,
            offset: start,
        })
    }

    /// A string that must be utf-8 (store paths, names, hashes, and everything that ends
    /// up in a derivation, whose strings nixb keeps as Rust strings).
    pub fn read_string(&mut self, what: &'static str) -> Result<String, WireError> {
        self.read_string_max(what, MAX_STRING_LEN)
    }

    /// The element count of a list: at most [`MAX_LIST_LEN`], and no more than the
    /// current limit can hold at `min_item` bytes per element.
    pub fn read_count(&mut self, what: &'static str, min_item: u64) -> Result<u64, WireError> {
        let start = self.offset;
        let count = self.read_u64(what)?;
        let room = self.remaining() / min_item.max(1);
        let max = MAX_LIST_LEN.min(room);
        if count > max {
            return Err(WireError::TooMany {
                what,
                offset: start,
                count,
                max,
            });
        }
        Ok(count)
    }

    pub fn read_strings(&mut self, what: &'static str) -> Result<Vec<String>, WireError> {
        self.read_strings_max(what, MAX_STRING_LEN)
    }

    /// A list of strings of at most `max` bytes each.
    pub fn read_strings_max(
        &mut self,
        what: &'static str,
        max: u64,
    ) -> Result<Vec<String>, WireError> {
        let n = self.read_count(what, 8)?;
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(self.read_string_max(what, max)?);
        }
        Ok(v)
    }

    /// A set of strings (Nix writes `std::set`, sorted; duplicates are merged).
    pub fn read_string_set(&mut self, what: &'static str) -> Result<BTreeSet<String>, WireError> {
        Ok(self.read_strings(what)?.into_iter().collect())
    }

    /// A map of strings to strings (`StringMap`).
    pub fn read_string_map(
        &mut self,
        what: &'static str,
    ) -> Result<BTreeMap<String, String>, WireError> {
        let n = self.read_count(what, 16)?;
        let mut m = BTreeMap::new();
        for _ in 0..n {
            let k = self.read_string(what)?;
            let v = self.read_string(what)?;
            m.insert(k, v);
        }
        Ok(m)
    }
}

impl<R: Read> Read for WireReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let room = self.remaining();
        let want = (buf.len() as u64).min(room) as usize;
        if want == 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("read past the end of the frame at byte {}", self.offset),
            ));
        }
        let n = self.inner.read(&mut buf[..want])?;
        self.offset += n as u64;
        Ok(n)
    }
}

/// Buffers everything written until [`flush`](WireWriter::flush): a request goes out
/// as one write, and nothing is left sitting in the buffer while we wait for a reply as
/// long as callers flush before reading.
pub struct WireWriter<W: Write> {
    inner: BufWriter<W>,
}

impl<W: Write> WireWriter<W> {
    pub fn new(inner: W) -> WireWriter<W> {
        WireWriter {
            inner: BufWriter::with_capacity(64 * 1024, inner),
        }
    }

    pub fn get_ref(&self) -> &W {
        self.inner.get_ref()
    }

    pub fn get_mut(&mut self) -> &mut BufWriter<W> {
        &mut self.inner
    }

    /// Flushes and gives back the underlying writer.
    pub fn into_inner(self) -> Result<W, WireError> {
        self.inner.into_inner().map_err(|e| WireError::Write {
            what: "flushing",
            source: e.into_error(),
        })
    }

    fn put(&mut self, b: &[u8], what: &'static str) -> Result<(), WireError> {
        self.inner
            .write_all(b)
            .map_err(|source| WireError::Write { what, source })
    }

    pub fn write_u64(&mut self, n: u64, what: &'static str) -> Result<(), WireError> {
        self.put(&n.to_le_bytes(), what)
    }

    pub fn write_bool(&mut self, b: bool, what: &'static str) -> Result<(), WireError> {
        self.write_u64(b as u64, what)
    }

    pub fn write_bytes(&mut self, s: &[u8], what: &'static str) -> Result<(), WireError> {
        self.write_u64(s.len() as u64, what)?;
        self.put(s, what)?;
        self.put(&[0u8; 8][..padding_len(s.len() as u64)], what)
    }

    pub fn write_str(&mut self, s: &str, what: &'static str) -> Result<(), WireError> {
        self.write_bytes(s.as_bytes(), what)
    }

    pub fn write_strings<'a>(
        &mut self,
        items: impl ExactSizeIterator<Item = &'a str>,
        what: &'static str,
    ) -> Result<(), WireError> {
        self.write_u64(items.len() as u64, what)?;
        for s in items {
            self.write_str(s, what)?;
        }
        Ok(())
    }

    pub fn write_string_map(
        &mut self,
        m: &BTreeMap<String, String>,
        what: &'static str,
    ) -> Result<(), WireError> {
        self.write_u64(m.len() as u64, what)?;
        for (k, v) in m {
            self.write_str(k, what)?;
            self.write_str(v, what)?;
        }
        Ok(())
    }

    /// Raw bytes (a NAR), without framing.
    pub fn write_raw(&mut self, b: &[u8], what: &'static str) -> Result<(), WireError> {
        self.put(b, what)
    }

    pub fn flush(&mut self) -> Result<(), WireError> {
        self.inner.flush().map_err(|source| WireError::Write {
            what: "flushing",
            source,
        })
    }
}

impl<W: Write> Write for WireWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(f: impl FnOnce(&mut WireWriter<&mut Vec<u8>>)) -> Vec<u8> {
        let mut v = Vec::new();
        let mut w = WireWriter::new(&mut v);
        f(&mut w);
        w.flush().unwrap();
        drop(w);
        v
    }

    #[test]
    fn string_framing_matches_the_nix_encoding() {
        // Worked by hand: length 3 as u64 LE, "abc", five bytes of padding.
        let v = encode(|w| w.write_str("abc", "s").unwrap());
        assert_eq!(v, b"\x03\0\0\0\0\0\0\0abc\0\0\0\0\0");
        // Length 8 needs no padding; the empty string is just its length.
        let v = encode(|w| {
            w.write_str("12345678", "s").unwrap();
            w.write_str("", "s").unwrap();
        });
        assert_eq!(v, b"\x08\0\0\0\0\0\0\x0012345678\0\0\0\0\0\0\0\0");
    }

    #[test]
    fn strings_round_trip_at_every_padding_length() {
        let items: Vec<String> = (0..17).map(|n| "x".repeat(n)).collect();
        let v = encode(|w| {
            w.write_strings(items.iter().map(|s| s.as_str()), "l")
                .unwrap()
        });
        let mut r = WireReader::new(&v[..]);
        assert_eq!(r.read_strings("l").unwrap(), items);
        assert_eq!(r.offset(), v.len() as u64);
    }

    #[test]
    fn a_string_longer_than_one_chunk_round_trips() {
        let big = vec![7u8; READ_CHUNK * 2 + 3];
        let v = encode(|w| w.write_bytes(&big, "s").unwrap());
        assert_eq!(v.len(), 8 + big.len() + 5);
        assert_eq!(WireReader::new(&v[..]).read_bytes("s").unwrap(), big);
    }

    #[test]
    fn errors_name_field_and_offset() {
        let mut bad = b"\x03\0\0\0\0\0\0\0abc\0\x01\0\0\0".to_vec();
        let e = WireReader::new(&bad[..])
            .read_string("deriver")
            .unwrap_err();
        assert_eq!(e.to_string(), "non-zero padding after deriver at byte 11");
        bad.truncate(10);
        let e = WireReader::new(&bad[..])
            .read_string("deriver")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "stream ends at byte 10 while reading deriver"
        );
        let huge = (MAX_STRING_LEN + 1).to_le_bytes();
        let e = WireReader::new(&huge[..])
            .read_string("env value")
            .unwrap_err();
        assert!(matches!(e, WireError::TooLong { offset: 0, .. }), "{e}");
        let e = WireReader::new(&b"\x01\0\0\0\0\0\0\0\xff\0\0\0\0\0\0\0"[..])
            .read_string("path")
            .unwrap_err();
        assert_eq!(e.to_string(), "path at byte 0 is not valid utf-8");
    }

    #[test]
    fn a_2_pow_60_length_is_refused_before_allocation() {
        let huge = (1u64 << 60).to_le_bytes();
        let e = WireReader::new(&huge[..]).read_bytes("name").unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "name at byte 0 is {} bytes long, more than the {} allowed",
                1u64 << 60,
                MAX_STRING_LEN
            )
        );
        let e = WireReader::new(&huge[..]).read_strings("refs").unwrap_err();
        assert!(
            matches!(e, WireError::TooMany { count, .. } if count == 1 << 60),
            "{e}"
        );
    }

    #[test]
    fn a_frame_limit_bounds_lengths_and_counts() {
        // A 100-byte string announced inside a frame that holds only 24 more bytes.
        let mut v = encode(|w| w.write_u64(100, "s").unwrap());
        v.extend_from_slice(&[0u8; 100]);
        let mut r = WireReader::new(&v[..]);
        r.set_limit(Some(32));
        let e = r.read_bytes("s").unwrap_err();
        assert_eq!(
            e.to_string(),
            "s at byte 0 is 100 bytes long, more than the 24 allowed"
        );
        // Four elements cannot fit in 8 remaining bytes (8 bytes each at least).
        let v = encode(|w| {
            w.write_u64(4, "l").unwrap();
            w.write_u64(0, "l").unwrap();
        });
        let mut r = WireReader::new(&v[..]);
        r.set_limit(Some(16));
        let e = r.read_strings("l").unwrap_err();
        assert!(
            matches!(
                e,
                WireError::TooMany {
                    count: 4,
                    max: 1,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn narrow_numbers_are_range_checked() {
        let v = 300u64.to_le_bytes();
        let e = WireReader::new(&v[..])
            .read_u64_max("build mode", 2)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "build mode at byte 0 is 300, which does not fit"
        );
    }

    #[test]
    fn eof_before_a_command_is_clean() {
        assert_eq!(
            WireReader::new(&b""[..])
                .read_u64_or_eof("command")
                .unwrap(),
            None
        );
        let e = WireReader::new(&b"\x01\0"[..])
            .read_u64_or_eof("command")
            .unwrap_err();
        assert!(matches!(e, WireError::Eof { offset: 2, .. }), "{e}");
    }
}
