//! A small blocking client over any `Read + Write` pair (a unix socket, the pipes of
//! `nix-daemon --stdio`): the greeting, `SetOptions`, and the operations a front end
//! needs, with the daemon's stderr channel handled in between (log frames go to the
//! caller's callback; `STDERR_READ` and `STDERR_WRITE` to the data source and sink given
//! for the operation).
//!
//! Data that follows a request is written whole before the stderr channel is read, so a
//! daemon that logs a great deal while it reads a large upload could stall on a full
//! socket; Nix's own client streams from a second thread. This client is meant for
//! tests, tools and nixb's own queries.

use std::collections::BTreeSet;
use std::io::{self, BufReader, Read, Write};

use nixb_store::{StoreDir, StorePath};

use crate::error::{ProtocolError, Result};
use crate::framed::FramedWriter;
use crate::handshake::{client_handshake, ClientInfo, Handshake};
use crate::nar::copy_nar;
use crate::ops::{AddToStoreRequest, Request, Response};
use crate::stderr::StderrFrame;
use crate::types::{
    BuildMode, ClientSettings, Ctx, DerivedPath, KeyedBuildResult, Missing, PathInfo, ValidPathInfo,
};
use crate::wire::{WireReader, WireWriter};

/// Where a daemon's log frames go.
pub type FrameSink<'a> = &'a mut dyn FnMut(&StderrFrame);

pub struct Client<R: Read, W: Write> {
    /// Buffered, as the server's side: an answer is taken in one `read`, not one per field.
    r: WireReader<BufReader<R>>,
    w: WireWriter<W>,
    cx: Ctx,
    handshake: Handshake,
    /// Start-up messages the daemon sent before its first `STDERR_LAST`.
    pub startup_frames: Vec<StderrFrame>,
}

impl<R: Read, W: Write> Client<R, W> {
    /// Greets the daemon and reads its start-up stderr channel.
    pub fn connect(
        reader: R,
        writer: W,
        store_dir: StoreDir,
        info: &ClientInfo,
    ) -> Result<Client<R, W>> {
        let mut r = WireReader::new(BufReader::with_capacity(crate::server::READ_BUFFER, reader));
        let mut w = WireWriter::new(writer);
        let handshake = client_handshake(&mut r, &mut w, info)?;
        let cx = Ctx {
            version: handshake.version,
            features: handshake.features.clone(),
            store_dir,
        };
        let mut c = Client {
            r,
            w,
            cx,
            handshake,
            startup_frames: Vec::new(),
        };
        let mut frames = Vec::new();
        c.process_stderr(&mut |f| frames.push(f.clone()), None, None)?;
        c.startup_frames = frames;
        Ok(c)
    }

    pub fn ctx(&self) -> &Ctx {
        &self.cx
    }

    pub fn handshake(&self) -> &Handshake {
        &self.handshake
    }

    /// Reads stderr frames up to `STDERR_LAST`; `STDERR_ERROR` becomes
    /// [`ProtocolError::Remote`].
    fn process_stderr(
        &mut self,
        on_frame: FrameSink<'_>,
        mut source: Option<&mut dyn Read>,
        mut sink: Option<&mut dyn Write>,
    ) -> Result<()> {
        loop {
            let f = StderrFrame::read(&mut self.r, self.cx.version)?;
            match f {
                StderrFrame::Last => return Ok(()),
                StderrFrame::Error(e) => return Err(ProtocolError::Remote(e)),
                StderrFrame::Read(n) => {
                    let src = source.as_deref_mut().ok_or(ProtocolError::Unexpected {
                        what: "stderr channel",
                        kind: "STDERR_READ",
                    })?;
                    let mut buf = vec![0u8; n.min(crate::server::TUNNEL_CHUNK) as usize];
                    let got = read_some(src, &mut buf)?;
                    self.w.write_bytes(&buf[..got], "read reply")?;
                    self.w.flush()?;
                }
                StderrFrame::Write(b) => {
                    let out = sink.as_deref_mut().ok_or(ProtocolError::Unexpected {
                        what: "stderr channel",
                        kind: "STDERR_WRITE",
                    })?;
                    out.write_all(&b).map_err(|source| ProtocolError::Io {
                        what: "writing the daemon's output",
                        source,
                    })?;
                }
                f => on_frame(&f),
            }
        }
    }

    /// Sends `req` (and `data` the way `req` carries it), handles the stderr channel,
    /// and reads the answer. `NarFromPath`'s NAR is returned in [`Response::Nar`]; use
    /// [`nar_from_path`](Self::nar_from_path) to stream it instead.
    pub fn request(
        &mut self,
        req: &Request,
        data: Option<&mut dyn Read>,
        on_frame: FrameSink<'_>,
    ) -> Result<Response> {
        self.send(req, data, on_frame)?;
        Response::read(req, &mut self.r, &self.cx)
    }

    fn send(
        &mut self,
        req: &Request,
        mut data: Option<&mut dyn Read>,
        on_frame: FrameSink<'_>,
    ) -> Result<()> {
        use crate::ops::DataTransfer;
        req.write(&mut self.w, &self.cx)?;
        let transfer = req.data(&self.cx);
        match transfer {
            DataTransfer::Framed => {
                let mut f = FramedWriter::new(&mut self.w);
                if let Some(d) = data.as_deref_mut() {
                    io::copy(d, &mut f).map_err(|source| ProtocolError::Io {
                        what: "sending framed data",
                        source,
                    })?;
                }
                f.finish()?;
            }
            DataTransfer::Nar => {
                let d = data.as_deref_mut().ok_or(ProtocolError::Unexpected {
                    what: "request",
                    kind: "no nar for a request that needs one",
                })?;
                let mut r = WireReader::new(d);
                copy_nar(&mut r, &mut self.w)?;
            }
            DataTransfer::None | DataTransfer::Tunnelled => {}
        }
        self.w.flush()?;
        let source = if transfer == DataTransfer::Tunnelled {
            data
        } else {
            None
        };
        self.process_stderr(on_frame, source, None)
            .map_err(ProtocolError::in_op(req.op().name()))
    }

    pub fn set_options(&mut self, s: &ClientSettings) -> Result<()> {
        self.request(&Request::SetOptions(s.clone()), None, &mut |_| {})?;
        Ok(())
    }

    pub fn is_valid_path(&mut self, p: &StorePath) -> Result<bool> {
        match self.request(&Request::IsValidPath(p.clone()), None, &mut |_| {})? {
            Response::Bool(b) => Ok(b),
            r => Err(unexpected(r)),
        }
    }

    pub fn query_valid_paths(
        &mut self,
        paths: &BTreeSet<StorePath>,
        substitute: bool,
    ) -> Result<BTreeSet<StorePath>> {
        let req = Request::QueryValidPaths {
            paths: paths.clone(),
            substitute,
        };
        match self.request(&req, None, &mut |_| {})? {
            Response::Paths(p) => Ok(p),
            r => Err(unexpected(r)),
        }
    }

    pub fn query_path_info(&mut self, p: &StorePath) -> Result<Option<PathInfo>> {
        match self.request(&Request::QueryPathInfo(p.clone()), None, &mut |_| {})? {
            Response::PathInfo(i) => Ok(i),
            r => Err(unexpected(r)),
        }
    }

    /// Adds content under a content-address method (`text:sha256` for text with
    /// references, `fixed:r:sha256` for a NAR, `fixed:sha256` for a flat file):
    /// `AddToStore` from 1.25; `AddTextToStore` before for text. `dump` is the NAR or
    /// the flat contents, as the method says.
    pub fn add_to_store(
        &mut self,
        name: &str,
        method: &str,
        references: &BTreeSet<StorePath>,
        dump: &mut dyn Read,
    ) -> Result<ValidPathInfo> {
        if !self.cx.at_least(25) {
            if method != "text:sha256" {
                return Err(ProtocolError::NeedsVersion {
                    what: "AddToStore with a content-address method other than text",
                    needs: crate::Version::new(1, 25),
                    version: self.cx.version,
                });
            }
            let mut text = Vec::new();
            dump.read_to_end(&mut text)
                .map_err(|source| ProtocolError::Io {
                    what: "reading the text to add",
                    source,
                })?;
            let req = Request::AddTextToStore {
                name: name.to_string(),
                text,
                references: references.clone(),
            };
            let path = match self.request(&req, None, &mut |_| {})? {
                Response::Path(p) => p,
                r => return Err(unexpected(r)),
            };
            let info = self
                .query_path_info(&path)?
                .ok_or_else(|| ProtocolError::Field {
                    what: "added path",
                    value: self.cx.store_dir.print(&path),
                    reason: "the daemon says it is not valid".into(),
                })?;
            return Ok(ValidPathInfo { path, info });
        }
        let req = Request::AddToStore(AddToStoreRequest {
            name: name.to_string(),
            method: method.to_string(),
            references: references.clone(),
            repair: false,
        });
        match self.request(&req, Some(dump), &mut |_| {})? {
            Response::ValidPathInfo(v) => Ok(v),
            r => Err(unexpected(r)),
        }
    }

    pub fn add_temp_root(&mut self, p: &StorePath) -> Result<()> {
        self.request(&Request::AddTempRoot(p.clone()), None, &mut |_| {})?;
        Ok(())
    }

    pub fn ensure_path(&mut self, p: &StorePath) -> Result<()> {
        self.request(&Request::EnsurePath(p.clone()), None, &mut |_| {})?;
        Ok(())
    }

    pub fn query_missing(&mut self, paths: &[DerivedPath]) -> Result<Missing> {
        match self.request(&Request::QueryMissing(paths.to_vec()), None, &mut |_| {})? {
            Response::Missing(m) => Ok(m),
            r => Err(unexpected(r)),
        }
    }

    pub fn build_paths(
        &mut self,
        paths: &[DerivedPath],
        mode: BuildMode,
        on_frame: FrameSink<'_>,
    ) -> Result<()> {
        let req = Request::BuildPaths {
            paths: paths.to_vec(),
            mode,
        };
        self.request(&req, None, on_frame)?;
        Ok(())
    }

    pub fn build_paths_with_results(
        &mut self,
        paths: &[DerivedPath],
        mode: BuildMode,
        on_frame: FrameSink<'_>,
    ) -> Result<Vec<KeyedBuildResult>> {
        let req = Request::BuildPathsWithResults {
            paths: paths.to_vec(),
            mode,
        };
        match self.request(&req, None, on_frame)? {
            Response::BuildResults(v) => Ok(v),
            r => Err(unexpected(r)),
        }
    }

    /// Adds a path with its NAR (what `nix copy` does one path at a time): framed from
    /// 1.23, pulled by the daemon with `STDERR_READ` before.
    pub fn add_to_store_nar(
        &mut self,
        info: &ValidPathInfo,
        nar: &mut dyn Read,
        repair: bool,
        dont_check_sigs: bool,
    ) -> Result<()> {
        let req = Request::AddToStoreNar(crate::ops::AddToStoreNarRequest {
            info: info.clone(),
            repair,
            dont_check_sigs,
        });
        self.request(&req, Some(nar), &mut |_| {})?;
        Ok(())
    }

    /// Adds several paths in one framed stream (`AddMultipleToStore`, the form
    /// `nix copy` uses from 1.32): references first, as the daemon adds them in order.
    pub fn add_multiple_to_store(
        &mut self,
        items: &mut [(ValidPathInfo, &mut dyn Read)],
        repair: bool,
        dont_check_sigs: bool,
    ) -> Result<()> {
        let mut payload = Vec::new();
        {
            let mut w = WireWriter::new(&mut payload);
            crate::ops::write_multiple_header(&mut w, items.len() as u64)?;
            for (info, nar) in items.iter_mut() {
                crate::ops::write_multiple_item(&mut w, &self.cx, info)?;
                let mut r = WireReader::new(&mut **nar);
                copy_nar(&mut r, &mut w)?;
            }
            w.flush()?;
        }
        let req = Request::AddMultipleToStore {
            repair,
            dont_check_sigs,
        };
        self.request(&req, Some(&mut &payload[..]), &mut |_| {})?;
        Ok(())
    }

    pub fn query_path_from_hash_part(&mut self, hash_part: &str) -> Result<Option<StorePath>> {
        let req = Request::QueryPathFromHashPart(hash_part.to_string());
        match self.request(&req, None, &mut |_| {})? {
            Response::OptPath(p) => Ok(p),
            r => Err(unexpected(r)),
        }
    }

    /// `nix-store --export` of one path through the daemon (`ExportPath`): the export
    /// stream arrives in `STDERR_WRITE` frames and goes to `sink`.
    pub fn export_path(&mut self, p: &StorePath, sink: &mut dyn Write) -> Result<()> {
        let req = Request::ExportPath {
            path: p.clone(),
            sign: 0,
        };
        req.write(&mut self.w, &self.cx)?;
        self.w.flush()?;
        self.process_stderr(&mut |_| {}, None, Some(sink))
            .map_err(ProtocolError::in_op("ExportPath"))?;
        Response::read(&req, &mut self.r, &self.cx)?;
        Ok(())
    }

    /// Streams a path's NAR into `sink`; returns its size.
    pub fn nar_from_path(&mut self, p: &StorePath, sink: &mut dyn Write) -> Result<u64> {
        let req = Request::NarFromPath(p.clone());
        self.send(&req, None, &mut |_| {})?;
        copy_nar(&mut self.r, sink).map_err(ProtocolError::in_op("NarFromPath"))
    }
}

fn unexpected(r: Response) -> ProtocolError {
    ProtocolError::Field {
        what: "response",
        value: format!("{r:?}").chars().take(200).collect(),
        reason: "not the answer this operation has".into(),
    }
}

fn read_some(src: &mut dyn Read, buf: &mut [u8]) -> Result<usize> {
    loop {
        match src.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(ProtocolError::Io {
                    what: "reading data for the daemon",
                    source,
                })
            }
        }
    }
}
