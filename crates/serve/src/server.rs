//! The serving side of `nix-store --serve`: what runs on a build machine when another
//! machine connects (`nixb serve`, reached over SSH). It answers every command of the
//! protocol from a [`LocalStore`], and hands builds to a [`RemoteBuilder`] the caller
//! provides, the engine in production.
//!
//! As in Nix, the session ends cleanly when the client closes its side between
//! requests; any error (malformed request, invalid path, a NAR that does not match what
//! was announced) ends it with that error, since the byte stream can no longer be
//! trusted to be in step. Writing commands (imports, builds) are refused unless the
//! server was started with `--write`.

use std::collections::BTreeSet;
use std::io::{Read, Write};

use nixb_store::derivation::Derivation;
use nixb_store::local_store::{LocalStore, ValidPathInfo};
use nixb_store::{DerivedPath, StorePath};

use crate::error::ServeError;
use crate::import::{add_nar_to_store, dump_nar, export_paths, import_paths};
use crate::proto::{
    parse_nar_hash, parse_path, protocol_major, read_basic_derivation, read_opt_path, read_path,
    read_paths, write_path_info, write_paths, BuildOptions, BuildResult, BuildStatus, Command,
    SERVE_MAGIC_1, SERVE_MAGIC_2, SERVE_PROTOCOL_VERSION,
};
use crate::wire::{WireReader, WireWriter};

/// What a serving machine needs from its build engine.
pub trait RemoteBuilder {
    /// Builds `drv`, a `BasicDerivation` (no input derivations; its input sources are
    /// valid in `store`, copied there by the client), and registers its outputs in
    /// `store` with `drv_path` as their deriver. The build log goes wherever the
    /// implementation sends it; for `nixb serve` that is standard error, which SSH
    /// carries back to the client.
    fn build_derivation(
        &mut self,
        store: &LocalStore,
        drv_path: &StorePath,
        drv: &Derivation,
        options: &BuildOptions,
    ) -> BuildResult;

    /// Realises `paths` from derivations already in `store` (the `BuildPaths` command);
    /// on failure, the status and message to report.
    fn build_paths(
        &mut self,
        store: &LocalStore,
        paths: &[DerivedPath],
        options: &BuildOptions,
    ) -> Result<(), (BuildStatus, String)>;

    /// Tries to make `paths` (invalid here, no derivations among them) valid from this
    /// machine's own substituters, for a client that asked for it
    /// (`builders-use-substitutes`). Best effort, as in Nix: what cannot be substituted
    /// is simply still missing, and the client copies it. The default does nothing.
    fn substitute_paths(&mut self, store: &LocalStore, paths: &BTreeSet<StorePath>) {
        let _ = (store, paths);
    }
}

/// Serves one session on `reader`/`writer` until the client closes it. `write_allowed`
/// is `nix-store --serve --write`: without it only queries and dumps are answered.
pub fn serve<R: Read, W: Write>(
    reader: R,
    writer: W,
    store: &LocalStore,
    builder: &mut dyn RemoteBuilder,
    write_allowed: bool,
) -> Result<(), ServeError> {
    let mut r = WireReader::new(reader);
    let mut w = WireWriter::new(writer);
    let magic = r.read_u64("magic")?;
    if magic != SERVE_MAGIC_1 {
        return Err(ServeError::BadMagic {
            expected: SERVE_MAGIC_1,
            got: magic,
            stderr: String::new(),
        });
    }
    w.write_u64(SERVE_MAGIC_2, "magic")?;
    w.write_u64(SERVE_PROTOCOL_VERSION, "protocol version")?;
    w.flush()?;
    let client_version = r.read_u64("client protocol version")?;
    if protocol_major(client_version) != 0x200 {
        return Err(ServeError::Version(client_version));
    }
    // Answer in the older of the two dialects.
    let version = client_version.min(SERVE_PROTOCOL_VERSION);
    let mut session = Session {
        r,
        w,
        store,
        builder,
        write_allowed,
        version,
    };
    while let Some(cmd) = session.r.read_u64_or_eof("command")? {
        let at = session.r.offset() - 8;
        let command = Command::from_u64(cmd).ok_or(ServeError::UnknownCommand(cmd))?;
        tracing::debug!("serve: command {command:?} at byte {at}");
        session.dispatch(command)?;
        session.w.flush()?;
    }
    Ok(())
}

struct Session<'a, R: Read, W: Write> {
    r: WireReader<R>,
    w: WireWriter<W>,
    store: &'a LocalStore,
    builder: &'a mut dyn RemoteBuilder,
    write_allowed: bool,
    version: u64,
}

impl<R: Read, W: Write> Session<'_, R, W> {
    fn need_write(&self, what: &'static str) -> Result<(), ServeError> {
        if self.write_allowed {
            Ok(())
        } else {
            Err(ServeError::NotAllowed(what))
        }
    }

    fn dispatch(&mut self, command: Command) -> Result<(), ServeError> {
        let dir = self.store.store_dir().clone();
        match command {
            Command::QueryValidPaths => {
                let lock = self.r.read_bool("lock flag")?;
                let substitute = self.r.read_bool("substitute flag")?;
                let paths = read_paths(&mut self.r, &dir, "paths")?;
                if substitute && self.write_allowed {
                    // Only plain paths: a derivation asked about here is one the client
                    // will copy, never one to build.
                    let mut wanted = BTreeSet::new();
                    for p in &paths {
                        if !p.is_derivation() && !self.store.is_valid_path(p)? {
                            wanted.insert(p.clone());
                        }
                    }
                    if !wanted.is_empty() {
                        self.builder.substitute_paths(self.store, &wanted);
                    }
                }
                let mut valid = BTreeSet::new();
                for p in paths {
                    if self.store.is_valid_path(&p)? {
                        if lock && self.write_allowed {
                            // Keep it from the collector until the client's build is done.
                            self.store.add_temp_root(&p)?;
                        }
                        valid.insert(p);
                    }
                }
                write_paths(&mut self.w, &dir, &valid, "valid paths")?;
            }
            Command::QueryPathInfos => {
                let paths = read_paths(&mut self.r, &dir, "paths")?;
                for p in &paths {
                    if let Some(info) = self.store.query_path_info(p)? {
                        write_path_info(&mut self.w, &dir, &info, self.version)?;
                    }
                }
                self.w.write_str("", "end of path infos")?;
            }
            Command::DumpStorePath => {
                let p = read_path(&mut self.r, &dir, "path to dump")?;
                if !self.store.is_valid_path(&p)? {
                    return Err(ServeError::NotValid(dir.print(&p)));
                }
                dump_nar(self.store, &p, &mut self.w)?;
            }
            Command::ImportPaths => {
                self.need_write("importing paths")?;
                import_paths(self.store, &mut self.r)?;
                self.w.write_u64(1, "import result")?;
            }
            Command::ExportPaths => {
                let _obsolete = self.r.read_u64("obsolete flag")?;
                let paths = read_paths(&mut self.r, &dir, "paths to export")?;
                export_paths(self.store, &paths, &mut self.w)?;
            }
            Command::BuildPaths => {
                self.need_write("building paths")?;
                let raw = self.r.read_strings("paths to build")?;
                let mut paths = Vec::new();
                for s in &raw {
                    paths.push(
                        DerivedPath::parse(&dir, s).map_err(|source| ServeError::Path {
                            what: "paths to build",
                            value: s.clone(),
                            source,
                        })?,
                    );
                }
                let options = BuildOptions::read(&mut self.r, self.version)?;
                match self.builder.build_paths(self.store, &paths, &options) {
                    Ok(()) => self.w.write_u64(0, "build status")?,
                    Err((status, msg)) => {
                        // Zero means success on this command; never send it for a failure.
                        let code = match status.to_u64() {
                            0 => BuildStatus::MiscFailure.to_u64(),
                            c => c,
                        };
                        self.w.write_u64(code, "build status")?;
                        self.w.write_str(&msg, "build error message")?;
                    }
                }
            }
            Command::BuildDerivation => {
                self.need_write("building paths")?;
                let drv_path = read_path(&mut self.r, &dir, "derivation path")?;
                let drv = read_basic_derivation(&mut self.r, &dir, &drv_path)?;
                let options = BuildOptions::read(&mut self.r, self.version)?;
                let result = self
                    .builder
                    .build_derivation(self.store, &drv_path, &drv, &options);
                result.write(&mut self.w, self.version)?;
            }
            Command::QueryClosure => {
                let include_outputs = self.r.read_bool("include outputs flag")?;
                let paths = read_paths(&mut self.r, &dir, "paths")?;
                for p in &paths {
                    if !self.store.is_valid_path(p)? {
                        return Err(ServeError::NotValid(dir.print(p)));
                    }
                }
                let mut closure = self.store.compute_closure(&paths)?;
                if include_outputs {
                    let mut outs = BTreeSet::new();
                    for p in closure.iter().filter(|p| p.is_derivation()) {
                        for o in self.store.query_derivation_outputs(p)?.into_values() {
                            if self.store.is_valid_path(&o)? {
                                outs.insert(o);
                            }
                        }
                    }
                    closure.extend(self.store.compute_closure(&outs)?);
                }
                write_paths(&mut self.w, &dir, &closure, "closure")?;
            }
            Command::AddToStoreNar => {
                self.need_write("importing paths")?;
                let path_s = self.r.read_string("path")?;
                let path = parse_path(&dir, &path_s, "path to add")?;
                let deriver = read_opt_path(&mut self.r, &dir, "deriver")?;
                let hash = self.r.read_string("nar hash")?;
                let nar_hash = parse_nar_hash(&hash, &path_s)?;
                let references = read_paths(&mut self.r, &dir, "references")?;
                let registration_time = self.r.read_u64("registration time")?;
                let nar_size = self.r.read_u64("nar size")?;
                let ultimate = self.r.read_bool("ultimate flag")?;
                let sigs = self.r.read_strings("signatures")?;
                let ca = self.r.read_string("content address")?;
                if nar_size == 0 {
                    return Err(ServeError::Field {
                        what: "nar size",
                        path: path_s,
                        value: "0".into(),
                        reason: "missing (a nar is never empty)".into(),
                    });
                }
                let info = ValidPathInfo {
                    path,
                    nar_hash,
                    nar_size,
                    deriver,
                    references,
                    registration_time: i64::try_from(registration_time).unwrap_or(0),
                    ultimate,
                    sigs,
                    ca: (!ca.is_empty()).then_some(ca),
                };
                // Exactly nar_size bytes belong to this request, whatever they contain.
                let mut nar = (&mut self.r).take(nar_size);
                let res = add_nar_to_store(self.store, &info, &mut nar);
                let rest = std::io::copy(&mut nar, &mut std::io::sink());
                res?;
                match rest {
                    Ok(0) => {}
                    Ok(n) => {
                        return Err(ServeError::SizeMismatch {
                            path: path_s,
                            expected: nar_size,
                            got: nar_size - n,
                        })
                    }
                    Err(source) => {
                        return Err(ServeError::Io {
                            step: "reading nar of",
                            path: path_s,
                            source,
                        })
                    }
                }
                self.w.write_u64(1, "add result")?;
            }
        }
        Ok(())
    }
}
