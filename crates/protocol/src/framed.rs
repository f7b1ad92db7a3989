//! Framed data (protocol 1.23 and later for `AddToStoreNar`, 1.25 for `AddToStore`, and
//! `AddMultipleToStore`, `AddBuildLog`): the payload cut into frames, each a u64 length
//! followed by that many raw bytes (no padding), ended by a frame of length 0.
//!
//! [`FramedReader`] streams a payload to its caller: it never buffers a frame, checks
//! every frame length against [`MAX_FRAME_LEN`] and, when asked, the payload's running
//! total against a caller's cap (a NAR bomb is refused as soon as it crosses the cap, not
//! after it has been stored). [`FramedWriter`] cuts a stream into frames of
//! [`FRAME_SIZE`] bytes, as Nix's `FramedSink` does with its 32 KiB buffer.

use std::io::{self, Read, Write};

use crate::error::Result;
use crate::wire::{WireReader, WireWriter};

/// Largest frame accepted from a peer. Nix sends at most 32 KiB per frame; this leaves
/// room for other clients while keeping one length field from meaning "the rest of the
/// stream".
pub const MAX_FRAME_LEN: u64 = 64 << 20;

/// The frame size [`FramedWriter`] uses (Nix's `BufferedSink` default).
pub const FRAME_SIZE: usize = 32 << 10;

/// Reads the payload of a framed stream. After the caller is done (even early), call
/// [`finish`](FramedReader::finish) to consume the rest up to the end marker, so the
/// connection stays in step.
pub struct FramedReader<'a, R> {
    r: &'a mut WireReader<R>,
    left_in_frame: u64,
    done: bool,
    total: u64,
    max_total: u64,
}

impl<'a, R: Read> FramedReader<'a, R> {
    pub fn new(r: &'a mut WireReader<R>) -> FramedReader<'a, R> {
        FramedReader {
            r,
            left_in_frame: 0,
            done: false,
            total: 0,
            max_total: u64::MAX,
        }
    }

    /// Refuses payloads longer than `max` bytes (an error as soon as a frame would cross
    /// it).
    pub fn with_max_total(mut self, max: u64) -> FramedReader<'a, R> {
        self.max_total = max;
        self
    }

    /// Payload bytes delivered so far.
    pub fn total(&self) -> u64 {
        self.total
    }

    fn next_frame(&mut self) -> io::Result<()> {
        let at = self.r.offset();
        let len = self.r.read_u64("frame length").map_err(invalid)?;
        if len == 0 {
            self.done = true;
            return Ok(());
        }
        if len > MAX_FRAME_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "frame length at byte {at} is {len}, more than the {MAX_FRAME_LEN} allowed"
                ),
            ));
        }
        // The frame is taken even when it crosses the cap, so that `finish` can still
        // skip the rest and keep the connection in step.
        self.left_in_frame = len;
        if self.total.saturating_add(len) > self.max_total {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "framed data at byte {at} grows past the {} bytes allowed",
                    self.max_total
                ),
            ));
        }
        Ok(())
    }

    /// Reads and drops whatever is left of the payload, through the end marker (also
    /// after the cap of [`with_max_total`](Self::with_max_total) was hit: what is
    /// skipped is not kept). After a frame-length error the stream cannot be trusted
    /// to be in step; close the connection instead.
    pub fn finish(mut self) -> Result<u64> {
        self.max_total = u64::MAX;
        let mut buf = [0u8; 8192];
        loop {
            match self.read(&mut buf) {
                Ok(0) => return Ok(self.total),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(crate::ProtocolError::Io {
                        what: "framed data",
                        source,
                    })
                }
            }
        }
    }

    /// The whole payload, frame by frame (for replaying fixtures byte for byte).
    pub fn read_frames(mut self) -> Result<Vec<Vec<u8>>> {
        let mut frames = Vec::new();
        loop {
            self.next_frame()
                .map_err(|source| crate::ProtocolError::Io {
                    what: "framed data",
                    source,
                })?;
            if self.done {
                return Ok(frames);
            }
            let mut f = Vec::new();
            let n = self.left_in_frame;
            self.left_in_frame = 0;
            self.total += n;
            (&mut *self.r)
                .take(n)
                .read_to_end(&mut f)
                .map_err(|source| crate::ProtocolError::Io {
                    what: "framed data",
                    source,
                })?;
            if (f.len() as u64) < n {
                return Err(crate::wire::WireError::Eof {
                    what: "frame",
                    offset: self.r.offset(),
                }
                .into());
            }
            frames.push(f);
        }
    }
}

fn invalid(e: crate::wire::WireError) -> io::Error {
    let kind = if e.is_eof() {
        io::ErrorKind::UnexpectedEof
    } else {
        io::ErrorKind::InvalidData
    };
    io::Error::new(kind, e)
}

impl<R: Read> Read for FramedReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while !self.done && self.left_in_frame == 0 {
            self.next_frame()?;
        }
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.total.saturating_add(self.left_in_frame) > self.max_total {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "framed data grows past the {} bytes allowed",
                    self.max_total
                ),
            ));
        }
        let want = (buf.len() as u64).min(self.left_in_frame) as usize;
        let n = self.r.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("stream ends inside a frame at byte {}", self.r.offset()),
            ));
        }
        self.left_in_frame -= n as u64;
        self.total += n as u64;
        Ok(n)
    }
}

/// Writes a payload as frames of at most [`FRAME_SIZE`] bytes; [`finish`](Self::finish)
/// writes the end marker.
pub struct FramedWriter<'a, W: Write> {
    w: &'a mut WireWriter<W>,
    buf: Vec<u8>,
}

impl<'a, W: Write> FramedWriter<'a, W> {
    pub fn new(w: &'a mut WireWriter<W>) -> FramedWriter<'a, W> {
        FramedWriter {
            w,
            buf: Vec::with_capacity(FRAME_SIZE),
        }
    }

    fn emit(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        write_frame(self.w, &self.buf).map_err(io::Error::other)?;
        self.buf.clear();
        Ok(())
    }

    pub fn finish(mut self) -> Result<()> {
        self.emit().map_err(|source| crate::ProtocolError::Io {
            what: "framed data",
            source,
        })?;
        self.w.write_u64(0, "end of framed data")?;
        Ok(())
    }
}

/// One frame as it is.
pub fn write_frame<W: Write>(w: &mut WireWriter<W>, data: &[u8]) -> Result<()> {
    w.write_u64(data.len() as u64, "frame length")?;
    w.write_raw(data, "frame")?;
    Ok(())
}

/// Frames as they are, and the end marker (replays a recorded framing exactly).
pub fn write_frames<W: Write>(w: &mut WireWriter<W>, frames: &[Vec<u8>]) -> Result<()> {
    for f in frames {
        write_frame(w, f)?;
    }
    w.write_u64(0, "end of framed data")?;
    Ok(())
}

impl<W: Write> Write for FramedWriter<'_, W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = FRAME_SIZE - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == FRAME_SIZE {
            self.emit()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.emit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = WireWriter::new(&mut out);
        let mut f = FramedWriter::new(&mut w);
        f.write_all(payload).unwrap();
        f.finish().unwrap();
        w.flush().unwrap();
        drop(w);
        out
    }

    #[test]
    fn frames_are_length_then_raw_bytes_then_zero() {
        // Worked by hand: one frame of 3 bytes (no padding), then the 0 end marker.
        assert_eq!(
            framed(b"abc"),
            b"\x03\0\0\0\0\0\0\0abc\0\0\0\0\0\0\0\0".to_vec()
        );
        assert_eq!(framed(b""), vec![0u8; 8]);
    }

    #[test]
    fn a_large_payload_is_cut_at_frame_size_and_read_back() {
        let payload: Vec<u8> = (0..FRAME_SIZE * 2 + 5).map(|i| i as u8).collect();
        let bytes = framed(&payload);
        assert_eq!(bytes.len(), payload.len() + 8 * 4);
        let mut r = WireReader::new(&bytes[..]);
        let mut got = Vec::new();
        FramedReader::new(&mut r).read_to_end(&mut got).unwrap();
        assert_eq!(got, payload);
        assert_eq!(r.offset(), bytes.len() as u64);
    }

    #[test]
    fn a_huge_frame_length_and_a_bomb_are_refused() {
        let bytes = (1u64 << 60).to_le_bytes();
        let mut r = WireReader::new(&bytes[..]);
        let e = FramedReader::new(&mut r)
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("frame length at byte 0 is 1152921504606846976"),
            "{e}"
        );
        let bytes = framed(&[1u8; 100]);
        let mut r = WireReader::new(&bytes[..]);
        let e = FramedReader::new(&mut r)
            .with_max_total(64)
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(
            e.to_string().contains("grows past the 64 bytes allowed"),
            "{e}"
        );
    }

    #[test]
    fn finish_consumes_the_rest_so_the_stream_stays_in_step() {
        let mut bytes = framed(b"0123456789");
        bytes.extend_from_slice(&42u64.to_le_bytes());
        let mut r = WireReader::new(&bytes[..]);
        let mut f = FramedReader::new(&mut r);
        let mut two = [0u8; 2];
        f.read_exact(&mut two).unwrap();
        assert_eq!(f.finish().unwrap(), 10);
        assert_eq!(r.read_u64("next").unwrap(), 42);
    }
}
