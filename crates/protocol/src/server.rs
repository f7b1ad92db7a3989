//! The daemon's side of one connection, without an engine: the greeting, reading
//! requests, the stderr channel while an operation runs, and the answer. What an
//! operation does is the caller's business.
//!
//! ```text
//! accept:   handshake, then STDERR_LAST (the start-up stderr channel, empty)
//! per op:   read_request -> [frames, data transfer] -> finish(response) | fail(error)
//! ```
//!
//! A request that cannot be read (an unknown operation, a malformed field) leaves the
//! stream out of step: answer it with [`ServerConnection::fail`] and close the
//! connection, as Nix's daemon does.
//!
//! Both directions are buffered: a request is taken from the socket in one `read` (not
//! one per field), and an answer, with the `STDERR_LAST` before it, leaves in one
//! `write`. Everything the client sends is read through this connection, so the bytes
//! of a following request that the buffer took early are never lost.

use std::io::{self, BufReader, Read, Write};

use nixb_store::StoreDir;

use crate::error::{ProtocolError, Result};
use crate::framed::FramedReader;
use crate::handshake::{server_greeting, Handshake, ServerInfo};
use crate::ops::{Op, Request, Response};
use crate::stderr::{RemoteError, StderrFrame};
use crate::types::Ctx;
use crate::wire::{WireReader, WireWriter};

/// Most bytes asked for in one `STDERR_READ` (Nix asks for what its buffer holds).
pub const TUNNEL_CHUNK: u64 = 32 << 10;

/// The read buffer of a connection (Nix's daemon reads through a 32 KiB one). Only the
/// pages a read fills become resident, so an idle connection costs one page of it.
pub const READ_BUFFER: usize = 32 << 10;

pub struct ServerConnection<R: Read, W: Write> {
    r: WireReader<BufReader<R>>,
    w: WireWriter<W>,
    cx: Ctx,
    handshake: Handshake,
}

impl<R: Read, W: Write> ServerConnection<R, W> {
    /// Runs the daemon's side of the greeting and closes the start-up stderr channel.
    pub fn accept(
        reader: R,
        writer: W,
        store_dir: StoreDir,
        info: &ServerInfo,
    ) -> Result<ServerConnection<R, W>> {
        let mut r = WireReader::new(BufReader::with_capacity(READ_BUFFER, reader));
        let mut w = WireWriter::new(writer);
        let handshake = server_greeting(&mut r, &mut w, info)?;
        let cx = Ctx {
            version: handshake.version,
            features: handshake.features.clone(),
            store_dir,
        };
        Ok(ServerConnection {
            r,
            w,
            cx,
            handshake,
        })
    }

    pub fn ctx(&self) -> &Ctx {
        &self.cx
    }

    pub fn handshake(&self) -> &Handshake {
        &self.handshake
    }

    /// The next request; `None` when the client has closed the connection between
    /// requests.
    pub fn read_request(&mut self) -> Result<Option<Request>> {
        let Some(n) = self.r.read_u64_or_eof("operation")? else {
            return Ok(None);
        };
        let op = Op::from_u64(n).ok_or(ProtocolError::UnknownOp(n))?;
        Request::read(op, &mut self.r, &self.cx).map(Some)
    }

    /// Sends one stderr frame (a log line, an activity, a result) and flushes it, so the
    /// client shows it at once.
    pub fn frame(&mut self, f: &StderrFrame) -> Result<()> {
        f.write(&mut self.w, self.cx.version)?;
        self.w.flush()?;
        Ok(())
    }

    /// Ends the operation: `STDERR_LAST`, then the answer to `req`.
    pub fn finish(&mut self, req: &Request, resp: &Response) -> Result<()> {
        StderrFrame::Last.write(&mut self.w, self.cx.version)?;
        resp.write_for(req, &mut self.w, &self.cx)?;
        self.w.flush()?;
        Ok(())
    }

    /// Ends the operation with an error (in the form the client's version reads).
    pub fn fail(&mut self, e: &RemoteError) -> Result<()> {
        StderrFrame::Error(e.clone()).write(&mut self.w, self.cx.version)?;
        self.w.flush()?;
        Ok(())
    }

    /// The framed data that follows the current request.
    pub fn framed(&mut self) -> FramedReader<'_, BufReader<R>> {
        FramedReader::new(&mut self.r)
    }

    /// Data the client sends on request (`ImportPaths`, `AddToStoreNar` before 1.23):
    /// each read sends `STDERR_READ` and takes the client's answer.
    pub fn tunnel(&mut self) -> TunnelSource<'_, R, W> {
        TunnelSource {
            conn: self,
            pending: Vec::new(),
            at: 0,
        }
    }

    /// Output for the client's sink (`ExportPath`): each write goes as one
    /// `STDERR_WRITE` frame.
    pub fn tunnel_sink(&mut self) -> TunnelSink<'_, R, W> {
        TunnelSink { conn: self }
    }

    /// Ends `NarFromPath`: `STDERR_LAST`, then the NAR streamed from `nar` (which must
    /// hold exactly one NAR; it is copied as it is read, never held whole).
    pub fn finish_nar(&mut self, nar: &mut dyn Read) -> Result<u64> {
        StderrFrame::Last.write(&mut self.w, self.cx.version)?;
        let n = io::copy(nar, &mut self.w).map_err(|source| ProtocolError::Io {
            what: "sending a nar",
            source,
        })?;
        self.w.flush()?;
        Ok(n)
    }

    /// The raw stream from the client (a plain NAR after `AddToStore` before 1.25), through
    /// the connection's buffer.
    pub fn reader(&mut self) -> &mut WireReader<BufReader<R>> {
        &mut self.r
    }

    /// The raw stream to the client (a NAR after `STDERR_LAST` for `NarFromPath`).
    pub fn writer(&mut self) -> &mut WireWriter<W> {
        &mut self.w
    }
}

/// Sends output to the client as `STDERR_WRITE` frames.
pub struct TunnelSink<'a, R: Read, W: Write> {
    conn: &'a mut ServerConnection<R, W>,
}

impl<R: Read, W: Write> Write for TunnelSink<'_, R, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(TUNNEL_CHUNK as usize);
        StderrFrame::Write(buf[..n].to_vec())
            .write(&mut self.conn.w, self.conn.cx.version)
            .map_err(io::Error::other)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.conn.w.flush().map_err(io::Error::other)
    }
}

/// Pulls the client's input through `STDERR_READ` requests.
pub struct TunnelSource<'a, R: Read, W: Write> {
    conn: &'a mut ServerConnection<R, W>,
    pending: Vec<u8>,
    at: usize,
}

impl<R: Read, W: Write> Read for TunnelSource<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.at == self.pending.len() {
            self.conn
                .frame(&StderrFrame::Read(TUNNEL_CHUNK))
                .map_err(io::Error::other)?;
            let b = self
                .conn
                .r
                .read_bytes_max("tunnelled data", TUNNEL_CHUNK)
                .map_err(io::Error::other)?;
            if b.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the client has no more data to send",
                ));
            }
            self.pending = b;
            self.at = 0;
        }
        let n = buf.len().min(self.pending.len() - self.at);
        buf[..n].copy_from_slice(&self.pending[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}
