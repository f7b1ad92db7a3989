//! The build hook: the program the engine asks to take builds elsewhere, speaking the
//! original engine's line protocol (the hook's standard input carries requests, its
//! standard error carries replies, file descriptor 4 the build log):
//!
//! ```text
//! argv      = hook <this system> <max silent time> <print build trace 0|1> <build timeout>
//! request   = <am willing 0|1> " " <system> " " <drv path> " " <feature>{,<feature>} "\n"
//! reply     = "# accept\n" | "# decline\n" | "# postpone\n"   (other stderr lines are
//!             messages the engine passes on)
//! after "# accept", two lines on stdin:
//!   inputs  = { <store path> " " } "\n"     (the input closure, derivations included)
//!   outputs = { <store path> " " } "\n"     (the outputs to bring back)
//! exit      = 0 built, 100 the remote build failed, 101 it timed out there (as the
//!             original's Perl hook; the engine then sets its timeout bit), anything
//!             else a hook failure
//! ```
//!
//! A hook process answers requests until it accepts one (declined and postponed ones
//! leave it waiting for the next), builds that one and exits. `am willing` tells whether
//! the engine has a free local slot: a build the local machine could do is declined
//! rather than postponed when no remote slot is free. Unlike Nix 1.x, the machine is
//! connected to *before* accepting, so an unreachable machine is reported (named, with
//! ssh's own words) and passed over for the next one, or the build declined for the
//! engine to do locally.

use std::collections::BTreeSet;
use std::io::{BufRead, Write};
use std::path::PathBuf;

use nixb_store::local_store::LocalStore;
use nixb_store::StorePath;

use crate::error::ServeError;
use crate::machines::{choose_machine, Choice, Machine};
use crate::proto::{basic_derivation, parse_path, BuildOptions};
use crate::transport::{ChildClient, ServeChild, SshTarget};

/// The settings the engine passes on the hook's command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookSettings {
    pub this_system: String,
    pub max_silent_time: u64,
    pub print_build_trace: bool,
    pub build_timeout: u64,
}

impl HookSettings {
    /// Parses the arguments after the program name.
    pub fn from_args(args: &[String]) -> Result<HookSettings, ServeError> {
        let bad = |reason: String| ServeError::Field {
            what: "build hook arguments",
            path: args.join(" "),
            value: String::new(),
            reason,
        };
        if args.len() != 4 {
            return Err(bad(format!(
                "expected 4 (system, max silent time, print build trace, build timeout), got {}",
                args.len()
            )));
        }
        let num = |i: usize, what: &str| {
            args[i]
                .parse::<u64>()
                .map_err(|_| bad(format!("{what} '{}' is not a number", args[i])))
        };
        Ok(HookSettings {
            this_system: args[0].clone(),
            max_silent_time: num(1, "max silent time")?,
            print_build_trace: num(2, "print build trace")? != 0,
            build_timeout: num(3, "build timeout")?,
        })
    }

    pub fn to_args(&self) -> Vec<String> {
        vec![
            self.this_system.clone(),
            self.max_silent_time.to_string(),
            (self.print_build_trace as u8).to_string(),
            self.build_timeout.to_string(),
        ]
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookRequest {
    /// The engine could build it locally now.
    pub am_willing: bool,
    pub platform: String,
    pub drv_path: String,
    pub required_features: BTreeSet<String>,
}

impl HookRequest {
    pub fn parse(line: &str) -> Result<HookRequest, ServeError> {
        let t: Vec<&str> = line.split_whitespace().collect();
        let bad = |reason: &str| ServeError::Field {
            what: "build hook request",
            path: line.trim_end().to_string(),
            value: String::new(),
            reason: reason.to_string(),
        };
        if !(3..=4).contains(&t.len()) {
            return Err(bad("expected '<am willing> <system> <drv> [features]'"));
        }
        let am_willing = match t[0] {
            "0" => false,
            "1" => true,
            _ => return Err(bad("'am willing' must be 0 or 1")),
        };
        Ok(HookRequest {
            am_willing,
            platform: t[1].to_string(),
            drv_path: t[2].to_string(),
            required_features: t
                .get(3)
                .map(|f| {
                    f.split(',')
                        .filter(|x| !x.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    /// The request line the engine writes (without the newline).
    pub fn to_line(&self) -> String {
        let features: Vec<&str> = self.required_features.iter().map(|s| s.as_str()).collect();
        format!(
            "{} {} {} {}",
            self.am_willing as u8,
            self.platform,
            self.drv_path,
            features.join(",")
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookReply {
    Accept,
    Decline,
    Postpone,
}

impl HookReply {
    pub fn to_line(self) -> &'static str {
        match self {
            HookReply::Accept => "# accept",
            HookReply::Decline => "# decline",
            HookReply::Postpone => "# postpone",
        }
    }

    /// For the engine: `Some` for a reply line, `None` for a message to pass on; an
    /// unknown `# ` line is an error.
    pub fn parse(line: &str) -> Result<Option<HookReply>, ServeError> {
        let Some(word) = line.trim_end_matches('\n').strip_prefix("# ") else {
            return Ok(None);
        };
        match word {
            "accept" => Ok(Some(HookReply::Accept)),
            "decline" => Ok(Some(HookReply::Decline)),
            "postpone" => Ok(Some(HookReply::Postpone)),
            _ => Err(ServeError::Field {
                what: "build hook reply",
                path: String::new(),
                value: line.trim_end().to_string(),
                reason: "expected accept, decline or postpone".into(),
            }),
        }
    }
}

/// A line of blank-separated paths (the original ends each with a blank).
pub fn parse_path_list(line: &str) -> Vec<String> {
    line.split_whitespace().map(str::to_string).collect()
}

pub fn format_path_list<'a>(paths: impl IntoIterator<Item = &'a str>) -> String {
    paths.into_iter().map(|p| format!("{p} ")).collect()
}

/// How the hook reaches a machine; [`SshConnector`] in production.
pub trait Connector {
    fn connect(
        &mut self,
        machine: &Machine,
        log: Box<dyn Write + Send>,
    ) -> Result<(ChildClient, ServeChild), ServeError>;
}

/// Connects with `ssh` as Nix does (see [`SshTarget`]).
pub struct SshConnector {
    /// The store directory, the same on every machine.
    pub store_dir: nixb_store::StoreDir,
    /// Options for every ssh invocation (e.g. `-F config` in tests).
    pub extra_args: Vec<String>,
    /// Pinned known-hosts files live as long as the connector.
    known_hosts: Vec<crate::transport::tempfile_lite::TempFile>,
}

impl SshConnector {
    pub fn new(store_dir: nixb_store::StoreDir, extra_args: Vec<String>) -> SshConnector {
        SshConnector {
            store_dir,
            extra_args,
            known_hosts: Vec::new(),
        }
    }
}

impl Connector for SshConnector {
    fn connect(
        &mut self,
        m: &Machine,
        log: Box<dyn Write + Send>,
    ) -> Result<(ChildClient, ServeChild), ServeError> {
        let (host, port) = m.ssh_host().ok_or_else(|| {
            ServeError::peer(
                &m.store_uri,
                ServeError::Field {
                    what: "store uri",
                    path: m.store_uri.clone(),
                    value: m.store_uri.clone(),
                    reason: "only ssh:// machines can build remotely".into(),
                },
            )
        })?;
        let mut t = SshTarget::new(host);
        t.port = port;
        t.extra_args = self.extra_args.clone();
        if !m.ssh_key.is_empty() {
            t.key = Some(PathBuf::from(&m.ssh_key));
        }
        if !m.public_host_key.is_empty() {
            let decoded = data_encoding::BASE64
                .decode(m.public_host_key.as_bytes())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    ServeError::peer(
                        &m.store_uri,
                        ServeError::Field {
                            what: "public host key",
                            path: m.store_uri.clone(),
                            value: m.public_host_key.clone(),
                            reason: "not base64 of a key line".into(),
                        },
                    )
                })?;
            t.public_host_key = Some(decoded);
        }
        let (c, h, known) = t.connect(self.store_dir.clone(), log)?;
        self.known_hosts.extend(known);
        Ok((c, h))
    }
}

/// How a hook session ended; [`exit_code`](HookOutcome::exit_code) is what the hook
/// process exits with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HookOutcome {
    /// The engine closed the request stream without any build accepted.
    NoneAccepted,
    Built {
        machine: String,
        drv: String,
    },
    /// The remote build failed (the log has the details).
    BuildFailed {
        machine: String,
        drv: String,
        message: String,
        /// It failed because `timeout` or `max-silent-time` ran out over there.
        timed_out: bool,
    },
}

impl HookOutcome {
    pub fn exit_code(&self) -> i32 {
        match self {
            HookOutcome::NoneAccepted | HookOutcome::Built { .. } => 0,
            HookOutcome::BuildFailed {
                timed_out: true, ..
            } => 101,
            HookOutcome::BuildFailed { .. } => 100,
        }
    }
}

/// Removes terminal colour sequences (Nix 2.8 puts them in its error messages even when
/// not talking to a terminal).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for d in chars.by_ref() {
                if ('@'..='~').contains(&d) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Everything the hook needs besides its standard streams.
/// Nix's report of a build no machine can take: the derivation, what it requires and every
/// machine considered, one `(systems, maxjobs, supportedFeatures, mandatoryFeatures)` line
/// each, as Nix 2.x's build hook prints it.
pub fn no_machine_message(req: &HookRequest, machines: &[Machine]) -> String {
    let join =
        |v: &mut dyn Iterator<Item = &String>| v.map(String::as_str).collect::<Vec<_>>().join(", ");
    let base = req.drv_path.rsplit('/').next().unwrap_or(&req.drv_path);
    let mut m = format!(
        "Failed to find a machine for remote build!\nderivation: {base}\nrequired (system, features): ({}, {})\n{} available machines:\n(systems, maxjobs, supportedFeatures, mandatoryFeatures)\n",
        req.platform,
        join(&mut req.required_features.iter()),
        machines.len()
    );
    for machine in machines {
        m.push_str(&format!(
            "({}, {}, {}, {})\n",
            join(&mut machine.systems.iter()),
            machine.max_jobs,
            join(&mut machine.supported_features.iter()),
            join(&mut machine.mandatory_features.iter())
        ));
    }
    m
}

pub struct Hook<'a> {
    pub settings: HookSettings,
    pub machines: Vec<Machine>,
    /// Where `current-load/` (the slot lock files) lives: the engine's state directory.
    pub state_dir: PathBuf,
    pub store: &'a LocalStore,
    /// `builders-use-substitutes`: let the machine fetch the inputs it lacks from its own
    /// substituters before they are copied from here.
    pub use_substitutes: bool,
    /// `system-features` of this machine: with them, a build no machine can take that the
    /// local machine cannot do either is reported with the machines considered.
    pub local_features: BTreeSet<String>,
    pub connector: &'a mut dyn Connector,
    /// Makes a sink for a remote's standard error (the build log, fd 4 in the hook).
    pub log: &'a mut dyn FnMut() -> Box<dyn Write + Send>,
}

impl Hook<'_> {
    /// Serves requests from `requests` until one is accepted and built, or the stream
    /// ends. Replies and messages go to `replies` (the hook's standard error).
    pub fn run(
        &mut self,
        requests: &mut impl BufRead,
        replies: &mut impl Write,
    ) -> Result<HookOutcome, ServeError> {
        let io = |source| ServeError::Io {
            step: "talking to the engine through",
            path: "the build hook pipes".into(),
            source,
        };
        loop {
            let mut line = String::new();
            if requests.read_line(&mut line).map_err(io)? == 0 {
                return Ok(HookOutcome::NoneAccepted);
            }
            if line.trim().is_empty() {
                continue;
            }
            let req = HookRequest::parse(&line)?;
            let reply = |replies: &mut dyn Write, r: HookReply| -> Result<(), ServeError> {
                writeln!(replies, "{}", r.to_line())
                    .and_then(|()| replies.flush())
                    .map_err(io)
            };
            match self.find_machine(&req, &mut *replies)? {
                Found::Reply(r) => reply(replies, r)?,
                Found::Session(i, slot, client, child) => {
                    reply(replies, HookReply::Accept)?;
                    let mut inputs = String::new();
                    let mut outputs = String::new();
                    requests.read_line(&mut inputs).map_err(io)?;
                    requests.read_line(&mut outputs).map_err(io)?;
                    let outcome =
                        self.build(i, &req, &parse_path_list(&outputs), *client, child, replies);
                    drop(slot);
                    return outcome;
                }
            }
        }
    }

    fn find_machine(
        &mut self,
        req: &HookRequest,
        replies: &mut impl Write,
    ) -> Result<Found, ServeError> {
        let can_build_locally = req.am_willing && req.platform == self.settings.this_system;
        let mut unreachable = BTreeSet::new();
        loop {
            let choice = choose_machine(
                &self.machines,
                &req.platform,
                &req.required_features,
                &self.state_dir,
                &unreachable,
            )
            .map_err(|e| ServeError::Io {
                step: "choosing a machine for",
                path: req.drv_path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
            match choice {
                Choice::NoneSuitable => {
                    let could_build_locally = req.platform == self.settings.this_system
                        && req.required_features.is_subset(&self.local_features);
                    if !could_build_locally {
                        // Declined by every machine and not buildable here: say why, as
                        // Nix's hook does, before the engine reports the failure.
                        let _ =
                            replies.write_all(no_machine_message(req, &self.machines).as_bytes());
                    }
                    return Ok(Found::Reply(HookReply::Decline));
                }
                // Every suitable machine that is up is busy: wait for one, unless the
                // local machine can do it now, or the rest were unreachable.
                Choice::AllBusy if can_build_locally || !unreachable.is_empty() => {
                    return Ok(Found::Reply(HookReply::Decline))
                }
                Choice::AllBusy => return Ok(Found::Reply(HookReply::Postpone)),
                Choice::Machine(i, slot) => {
                    let m = &self.machines[i];
                    match self.connector.connect(m, (self.log)()) {
                        Ok((client, child)) => {
                            return Ok(Found::Session(i, slot, Box::new(client), child))
                        }
                        Err(e) => {
                            let _ = writeln!(
                                replies,
                                "cannot build on '{}': {}",
                                m.store_uri,
                                strip_ansi(&e.to_string())
                            );
                            unreachable.insert(i);
                        }
                    }
                }
            }
        }
    }

    fn build(
        &mut self,
        machine: usize,
        req: &HookRequest,
        wanted: &[String],
        mut client: ChildClient,
        child: ServeChild,
        replies: &mut impl Write,
    ) -> Result<HookOutcome, ServeError> {
        let store = self.store;
        let dir = store.store_dir().clone();
        let uri = self.machines[machine].store_uri.clone();
        let drv_path = parse_path(&dir, &req.drv_path, "build hook request")?;
        let drv = store.read_derivation(&drv_path)?;
        let basic = basic_derivation(&dir, &drv, |p| Ok(store.read_derivation(p)?.output_paths()))?;
        let options = BuildOptions {
            max_silent_time: self.settings.max_silent_time,
            build_timeout: self.settings.build_timeout,
            ..BuildOptions::default()
        };
        let _ = writeln!(replies, "building '{}' on '{uri}'", req.drv_path);
        client.copy_closure_to(store, &basic.input_srcs, self.use_substitutes)?;
        let result = client.build_derivation(&drv_path, &basic, &options)?;
        if !result.status.is_success() {
            let message = strip_ansi(&result.error_msg);
            let _ = writeln!(
                replies,
                "build of '{}' on '{uri}' failed: {message}",
                req.drv_path
            );
            let _ = client.close();
            let _ = child.wait();
            return Ok(HookOutcome::BuildFailed {
                machine: uri,
                drv: req.drv_path.clone(),
                message,
                timed_out: result.status == crate::proto::BuildStatus::TimedOut,
            });
        }
        let mut outputs: BTreeSet<StorePath> = BTreeSet::new();
        for o in wanted {
            outputs.insert(parse_path(&dir, o, "build hook output list")?);
        }
        if outputs.is_empty() {
            outputs = drv.output_paths().into_values().collect();
        }
        // The engine holds the outputs' locks while we run.
        crate::import::assume_locks_held(outputs.iter().map(|p| dir.to_path(p)));
        client.copy_paths_from(store, &outputs)?;
        client.close()?;
        child.wait()?;
        Ok(HookOutcome::Built {
            machine: uri,
            drv: req.drv_path.clone(),
        })
    }
}

enum Found {
    Reply(HookReply),
    Session(
        usize,
        crate::machines::SlotLock,
        Box<ChildClient>,
        ServeChild,
    ),
}

/// Reads the machines of the `builders` setting, as `nixb build-remote` does.
pub fn machines_from_setting(
    builders: &str,
    this_system: &str,
) -> Result<Vec<Machine>, ServeError> {
    crate::machines::parse_machines(builders, this_system).map_err(|e| ServeError::Field {
        what: "builders setting",
        path: String::new(),
        value: builders.to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_and_reply_lines_round_trip() {
        let line =
            "1 x86_64-linux /nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x.drv big-parallel,kvm\n";
        let r = HookRequest::parse(line).unwrap();
        assert!(r.am_willing);
        assert_eq!(r.required_features.len(), 2);
        assert_eq!(r.to_line(), line.trim_end());
        // No features: the original writes a trailing blank.
        let r = HookRequest::parse("0 aarch64-linux /s/x.drv \n").unwrap();
        assert!(!r.am_willing && r.required_features.is_empty());
        assert!(HookRequest::parse("yes x /d").is_err());
        assert_eq!(
            HookReply::parse("# postpone\n").unwrap(),
            Some(HookReply::Postpone)
        );
        assert_eq!(HookReply::parse("some message").unwrap(), None);
        assert!(HookReply::parse("# maybe").is_err());
        assert_eq!(parse_path_list("/a /b \n"), ["/a", "/b"]);
        assert_eq!(format_path_list(["/a", "/b"]), "/a /b ");
    }

    #[test]
    fn settings_from_argv() {
        let a: Vec<String> = ["x86_64-linux", "60", "1", "3600"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let s = HookSettings::from_args(&a).unwrap();
        assert_eq!(
            (s.max_silent_time, s.print_build_trace, s.build_timeout),
            (60, true, 3600)
        );
        assert_eq!(s.to_args(), a);
        assert!(HookSettings::from_args(&a[..3]).is_err());
    }

    #[test]
    fn exit_codes_follow_the_original_hook() {
        let failed = |timed_out| HookOutcome::BuildFailed {
            machine: "ssh://m".into(),
            drv: "/s/x.drv".into(),
            message: String::new(),
            timed_out,
        };
        // 100: the build failed there; 101: it timed out there (the engine's timeout bit).
        assert_eq!(failed(false).exit_code(), 100);
        assert_eq!(failed(true).exit_code(), 101);
        assert_eq!(HookOutcome::NoneAccepted.exit_code(), 0);
    }

    #[test]
    fn ansi_sequences_are_removed() {
        assert_eq!(
            strip_ansi("\u{1b}[0mbuilder for '\u{1b}[35;1m/s/x.drv\u{1b}[0m' failed"),
            "builder for '/s/x.drv' failed"
        );
    }
}
