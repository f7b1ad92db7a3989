//! The daemon's side channel while it works on an operation: log lines, activities and
//! their results, requests for more input (`READ`), output for the client (`WRITE`), and
//! the end of the work (`LAST`) or its failure (`ERROR`). Codes from worker-protocol.hh
//! (Nix 2.8):
//!
//! ```text
//! NEXT           0x6f6c6d67  str(line)
//! READ           0x64617461  u64(max bytes wanted)     client answers str(bytes)
//! WRITE          0x64617416  str(bytes)
//! LAST           0x616c7473
//! ERROR          0x63787470  >= 1.26: str("Error") u64(level) str(name) str(msg)
//!                                     u64(0: no position) u64(n) { u64(0) str(trace) }*n
//!                            <  1.26: str(msg) u64(exit status)
//! START_ACTIVITY 0x53545254  u64(id) u64(level) u64(type) str(text) fields u64(parent)
//! STOP_ACTIVITY  0x53544f50  u64(id)
//! RESULT         0x52534c54  u64(id) u64(type) fields
//! fields         = u64(n) { u64(0) u64(int) | u64(1) str(string) }*n
//! ```
//!
//! Activities exist on the wire from 1.20 on (older clients got `NEXT` lines instead);
//! every version nixb speaks has them.

use std::io::{Read, Write};

use crate::error::{ProtocolError, Result};
use crate::version::Version;
use crate::wire::{WireReader, WireWriter};

pub const STDERR_NEXT: u64 = 0x6f6c6d67;
pub const STDERR_READ: u64 = 0x64617461;
pub const STDERR_WRITE: u64 = 0x64617416;
pub const STDERR_LAST: u64 = 0x616c7473;
pub const STDERR_ERROR: u64 = 0x63787470;
pub const STDERR_START_ACTIVITY: u64 = 0x53545254;
pub const STDERR_STOP_ACTIVITY: u64 = 0x53544f50;
pub const STDERR_RESULT: u64 = 0x52534c54;

/// Longest log line, activity text or error message accepted from a daemon.
pub const MAX_LOG_LEN: u64 = 16 << 20;
/// Most fields of one activity or result.
pub const MAX_FIELDS: u64 = 1024;
/// Most trace lines of one error.
pub const MAX_TRACES: u64 = 4096;

/// Nix's `Verbosity` (logging.hh).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verbosity {
    Error = 0,
    Warn = 1,
    Notice = 2,
    Info = 3,
    Talkative = 4,
    Chatty = 5,
    Debug = 6,
    Vomit = 7,
}

impl Verbosity {
    pub fn from_u64(n: u64) -> Option<Verbosity> {
        use Verbosity::*;
        Some(match n {
            0 => Error,
            1 => Warn,
            2 => Notice,
            3 => Info,
            4 => Talkative,
            5 => Chatty,
            6 => Debug,
            7 => Vomit,
            _ => return None,
        })
    }

    pub(crate) fn read<R: Read>(r: &mut WireReader<R>, what: &'static str) -> Result<Verbosity> {
        let offset = r.offset();
        let n = r.read_u64(what)?;
        Verbosity::from_u64(n).ok_or(ProtocolError::UnknownValue {
            what,
            value: n,
            offset,
        })
    }
}

/// Nix's `ActivityType` (logging.hh). Types a newer Nix adds are kept as `Other`, so a
/// client passes them on as Nix's own client does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActivityType {
    Unknown,
    CopyPath,
    FileTransfer,
    Realise,
    CopyPaths,
    Builds,
    Build,
    OptimiseStore,
    VerifyPaths,
    Substitute,
    QueryPathInfo,
    PostBuildHook,
    BuildWaiting,
    /// Nix 2.19+.
    FetchTree,
    Other(u64),
}

const ACTIVITY_TYPES: &[(ActivityType, u64)] = &[
    (ActivityType::Unknown, 0),
    (ActivityType::CopyPath, 100),
    (ActivityType::FileTransfer, 101),
    (ActivityType::Realise, 102),
    (ActivityType::CopyPaths, 103),
    (ActivityType::Builds, 104),
    (ActivityType::Build, 105),
    (ActivityType::OptimiseStore, 106),
    (ActivityType::VerifyPaths, 107),
    (ActivityType::Substitute, 108),
    (ActivityType::QueryPathInfo, 109),
    (ActivityType::PostBuildHook, 110),
    (ActivityType::BuildWaiting, 111),
    (ActivityType::FetchTree, 112),
];

impl ActivityType {
    pub fn from_u64(n: u64) -> ActivityType {
        ACTIVITY_TYPES
            .iter()
            .find(|(_, c)| *c == n)
            .map(|(t, _)| *t)
            .unwrap_or(ActivityType::Other(n))
    }

    pub fn to_u64(self) -> u64 {
        match self {
            ActivityType::Other(n) => n,
            t => ACTIVITY_TYPES
                .iter()
                .find(|(x, _)| *x == t)
                .map(|(_, c)| *c)
                .unwrap_or(0),
        }
    }
}

/// Nix's `ResultType` (logging.hh).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResultType {
    FileLinked,
    BuildLogLine,
    UntrustedPath,
    CorruptedPath,
    SetPhase,
    Progress,
    SetExpected,
    PostBuildLogLine,
    /// Nix 2.19+.
    FetchStatus,
    Other(u64),
}

const RESULT_TYPES: &[(ResultType, u64)] = &[
    (ResultType::FileLinked, 100),
    (ResultType::BuildLogLine, 101),
    (ResultType::UntrustedPath, 102),
    (ResultType::CorruptedPath, 103),
    (ResultType::SetPhase, 104),
    (ResultType::Progress, 105),
    (ResultType::SetExpected, 106),
    (ResultType::PostBuildLogLine, 107),
    (ResultType::FetchStatus, 108),
];

impl ResultType {
    pub fn from_u64(n: u64) -> ResultType {
        RESULT_TYPES
            .iter()
            .find(|(_, c)| *c == n)
            .map(|(t, _)| *t)
            .unwrap_or(ResultType::Other(n))
    }

    pub fn to_u64(self) -> u64 {
        match self {
            ResultType::Other(n) => n,
            t => RESULT_TYPES
                .iter()
                .find(|(x, _)| *x == t)
                .map(|(_, c)| *c)
                .unwrap_or(0),
        }
    }
}

/// One field of an activity or result. Strings are bytes: a build log line is whatever
/// the builder printed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Field {
    Int(u64),
    String(Vec<u8>),
}

impl Field {
    pub fn string(s: impl Into<String>) -> Field {
        Field::String(s.into().into_bytes())
    }
}

fn read_fields<R: Read>(r: &mut WireReader<R>) -> Result<Vec<Field>> {
    let start = r.offset();
    let n = r.read_count("fields", 16)?;
    if n > MAX_FIELDS {
        return Err(crate::wire::WireError::TooMany {
            what: "fields",
            offset: start,
            count: n,
            max: MAX_FIELDS,
        }
        .into());
    }
    let mut v = Vec::new();
    for _ in 0..n {
        let offset = r.offset();
        match r.read_u64("field type")? {
            0 => v.push(Field::Int(r.read_u64("int field")?)),
            1 => v.push(Field::String(
                r.read_bytes_max("string field", MAX_LOG_LEN)?,
            )),
            value => {
                return Err(ProtocolError::UnknownValue {
                    what: "field type",
                    value,
                    offset,
                })
            }
        }
    }
    Ok(v)
}

fn write_fields<W: Write>(w: &mut WireWriter<W>, fields: &[Field]) -> Result<()> {
    w.write_u64(fields.len() as u64, "fields")?;
    for f in fields {
        match f {
            Field::Int(i) => {
                w.write_u64(0, "field type")?;
                w.write_u64(*i, "int field")?;
            }
            Field::String(s) => {
                w.write_u64(1, "field type")?;
                w.write_bytes(s, "string field")?;
            }
        }
    }
    Ok(())
}

/// An error the daemon reports with `STDERR_ERROR`. Which fields travel depends on the
/// version: `status` only before 1.26, `level`, `name` and `traces` from 1.26 on; the
/// others get Nix's defaults when read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteError {
    pub level: Verbosity,
    /// Always "Error" in what Nix sends (the field is marked removed).
    pub name: String,
    pub message: String,
    pub traces: Vec<String>,
    /// The exit status Nix's client exits with.
    pub status: u64,
}

impl RemoteError {
    pub fn new(message: impl Into<String>) -> RemoteError {
        RemoteError {
            level: Verbosity::Error,
            name: "Error".into(),
            message: message.into(),
            traces: Vec::new(),
            status: 1,
        }
    }

    pub fn read<R: Read>(r: &mut WireReader<R>, version: Version) -> Result<RemoteError> {
        if version.at_least(26) {
            let offset = r.offset();
            let kind = r.read_string_max("error type", 64)?;
            if kind != "Error" {
                return Err(ProtocolError::Field {
                    what: "error type",
                    value: kind,
                    reason: format!("expected 'Error' at byte {offset}"),
                });
            }
            let level = Verbosity::read(r, "error level")?;
            let name = r.read_string_max("error name", 4096)?;
            let message = lossy(r.read_bytes_max("error message", MAX_LOG_LEN)?);
            read_no_position(r, "error position")?;
            let start = r.offset();
            let n = r.read_count("error traces", 16)?;
            if n > MAX_TRACES {
                return Err(crate::wire::WireError::TooMany {
                    what: "error traces",
                    offset: start,
                    count: n,
                    max: MAX_TRACES,
                }
                .into());
            }
            let mut traces = Vec::new();
            for _ in 0..n {
                read_no_position(r, "trace position")?;
                traces.push(lossy(r.read_bytes_max("error trace", MAX_LOG_LEN)?));
            }
            Ok(RemoteError {
                level,
                name,
                message,
                traces,
                status: 1,
            })
        } else {
            let message = lossy(r.read_bytes_max("error message", MAX_LOG_LEN)?);
            let status = r.read_u64("error status")?;
            Ok(RemoteError {
                level: Verbosity::Error,
                name: "Error".into(),
                message,
                traces: Vec::new(),
                status,
            })
        }
    }

    pub fn write<W: Write>(&self, w: &mut WireWriter<W>, version: Version) -> Result<()> {
        if version.at_least(26) {
            w.write_str("Error", "error type")?;
            w.write_u64(self.level as u64, "error level")?;
            w.write_str(&self.name, "error name")?;
            w.write_str(&self.message, "error message")?;
            w.write_u64(0, "error position")?;
            w.write_u64(self.traces.len() as u64, "error traces")?;
            for t in &self.traces {
                w.write_u64(0, "trace position")?;
                w.write_str(t, "error trace")?;
            }
        } else {
            w.write_str(&self.message, "error message")?;
            w.write_u64(self.status, "error status")?;
        }
        Ok(())
    }
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Nix (2.8 to 2.24) never sends positions and refuses them; so do we.
fn read_no_position<R: Read>(r: &mut WireReader<R>, what: &'static str) -> Result<()> {
    let offset = r.offset();
    match r.read_u64(what)? {
        0 => Ok(()),
        value => Err(ProtocolError::UnknownValue {
            what,
            value,
            offset,
        }),
    }
}

fn lossy(b: Vec<u8>) -> String {
    match String::from_utf8(b) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    }
}

/// One message of the stderr channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StderrFrame {
    /// A log line (with its newline, as Nix sends it).
    Next(Vec<u8>),
    /// The daemon wants up to this many bytes of the client's input.
    Read(u64),
    /// Output for the client's sink (`nix-store --export`).
    Write(Vec<u8>),
    Last,
    Error(RemoteError),
    StartActivity {
        id: u64,
        level: Verbosity,
        kind: ActivityType,
        text: String,
        fields: Vec<Field>,
        parent: u64,
    },
    StopActivity {
        id: u64,
    },
    Result {
        id: u64,
        kind: ResultType,
        fields: Vec<Field>,
    },
}

impl StderrFrame {
    /// True for the two frames that end an operation's stderr channel.
    pub fn is_final(&self) -> bool {
        matches!(self, StderrFrame::Last | StderrFrame::Error(_))
    }

    pub fn read<R: Read>(r: &mut WireReader<R>, version: Version) -> Result<StderrFrame> {
        let offset = r.offset();
        let kind = r.read_u64("stderr message type")?;
        Ok(match kind {
            STDERR_NEXT => StderrFrame::Next(r.read_bytes_max("log line", MAX_LOG_LEN)?),
            STDERR_READ => StderrFrame::Read(r.read_u64("read request length")?),
            STDERR_WRITE => StderrFrame::Write(r.read_bytes("write data")?),
            STDERR_LAST => StderrFrame::Last,
            STDERR_ERROR => StderrFrame::Error(RemoteError::read(r, version)?),
            STDERR_START_ACTIVITY => {
                let id = r.read_u64("activity id")?;
                let level = Verbosity::read(r, "activity level")?;
                let kind = ActivityType::from_u64(r.read_u64("activity type")?);
                let text = lossy(r.read_bytes_max("activity text", MAX_LOG_LEN)?);
                let fields = read_fields(r)?;
                let parent = r.read_u64("parent activity")?;
                StderrFrame::StartActivity {
                    id,
                    level,
                    kind,
                    text,
                    fields,
                    parent,
                }
            }
            STDERR_STOP_ACTIVITY => StderrFrame::StopActivity {
                id: r.read_u64("activity id")?,
            },
            STDERR_RESULT => {
                let id = r.read_u64("activity id")?;
                let kind = ResultType::from_u64(r.read_u64("result type")?);
                let fields = read_fields(r)?;
                StderrFrame::Result { id, kind, fields }
            }
            kind => return Err(ProtocolError::UnknownStderr { kind, offset }),
        })
    }

    pub fn write<W: Write>(&self, w: &mut WireWriter<W>, version: Version) -> Result<()> {
        match self {
            StderrFrame::Next(s) => {
                w.write_u64(STDERR_NEXT, "stderr message type")?;
                w.write_bytes(s, "log line")?;
            }
            StderrFrame::Read(n) => {
                w.write_u64(STDERR_READ, "stderr message type")?;
                w.write_u64(*n, "read request length")?;
            }
            StderrFrame::Write(b) => {
                w.write_u64(STDERR_WRITE, "stderr message type")?;
                w.write_bytes(b, "write data")?;
            }
            StderrFrame::Last => w.write_u64(STDERR_LAST, "stderr message type")?,
            StderrFrame::Error(e) => {
                w.write_u64(STDERR_ERROR, "stderr message type")?;
                e.write(w, version)?;
            }
            StderrFrame::StartActivity {
                id,
                level,
                kind,
                text,
                fields,
                parent,
            } => {
                w.write_u64(STDERR_START_ACTIVITY, "stderr message type")?;
                w.write_u64(*id, "activity id")?;
                w.write_u64(*level as u64, "activity level")?;
                w.write_u64(kind.to_u64(), "activity type")?;
                w.write_str(text, "activity text")?;
                write_fields(w, fields)?;
                w.write_u64(*parent, "parent activity")?;
            }
            StderrFrame::StopActivity { id } => {
                w.write_u64(STDERR_STOP_ACTIVITY, "stderr message type")?;
                w.write_u64(*id, "activity id")?;
            }
            StderrFrame::Result { id, kind, fields } => {
                w.write_u64(STDERR_RESULT, "stderr message type")?;
                w.write_u64(*id, "activity id")?;
                w.write_u64(kind.to_u64(), "result type")?;
                write_fields(w, fields)?;
            }
        }
        Ok(())
    }
}

/// The frame as one line of Nix's structured log (`--log-format internal-json`, what
/// `nix-output-monitor` reads): `@nix ` and a JSON object with sorted keys, as Nix 2.8's
/// JSON logger writes it. Log lines become `msg` at level 0 (as Nix's client logs a
/// daemon's `NEXT` line), without their newline. The parent of an activity is not
/// printed (Nix 2.8 does not either). `None` for frames that are not log output (`READ`,
/// `WRITE`, `LAST`, `ERROR`).
pub fn to_internal_json(f: &StderrFrame) -> Option<String> {
    let mut o = String::from("@nix {");
    match f {
        StderrFrame::Next(line) => {
            let s = String::from_utf8_lossy(line);
            let s = s.strip_suffix('\n').unwrap_or(&s);
            o.push_str("\"action\":\"msg\",\"level\":0,\"msg\":");
            json_str(&mut o, s);
        }
        StderrFrame::StartActivity {
            id,
            level,
            kind,
            text,
            fields,
            parent: _,
        } => {
            o.push_str("\"action\":\"start\",");
            json_fields(&mut o, fields);
            o.push_str(&format!(
                "\"id\":{id},\"level\":{},\"text\":",
                *level as u64
            ));
            json_str(&mut o, text);
            o.push_str(&format!(",\"type\":{}", kind.to_u64()));
        }
        StderrFrame::StopActivity { id } => {
            o.push_str(&format!("\"action\":\"stop\",\"id\":{id}"));
        }
        StderrFrame::Result { id, kind, fields } => {
            o.push_str("\"action\":\"result\",");
            json_fields(&mut o, fields);
            o.push_str(&format!("\"id\":{id},\"type\":{}", kind.to_u64()));
        }
        StderrFrame::Read(_)
        | StderrFrame::Write(_)
        | StderrFrame::Last
        | StderrFrame::Error(_) => return None,
    }
    o.push('}');
    Some(o)
}

/// `"fields":[...],` when there are any (Nix leaves the key out otherwise).
fn json_fields(o: &mut String, fields: &[Field]) {
    if fields.is_empty() {
        return;
    }
    o.push_str("\"fields\":[");
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        match f {
            Field::Int(n) => o.push_str(&n.to_string()),
            Field::String(b) => json_str(o, &String::from_utf8_lossy(b)),
        }
    }
    o.push_str("],");
}

/// A JSON string as nlohmann::json prints it: short escapes for `"`, `\`, backspace,
/// form feed, newline, carriage return and tab, `\u00xx` for other control characters,
/// everything else as it is.
fn json_str(o: &mut String, s: &str) {
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\u{8}' => o.push_str("\\b"),
            '\u{c}' => o.push_str("\\f"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
}
