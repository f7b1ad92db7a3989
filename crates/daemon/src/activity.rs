//! The engine's events as Nix's activities: what a daemon client sees in its progress
//! display and `-L` output, and what `nixb realise --log-format internal-json` prints.
//!
//! Each builder is a `Build` activity; its log lines are `BuildLogLine` results of that
//! activity; the engine's messages, hook output and substituter output are plain `NEXT`
//! lines. A running build's unfinished last line is held until its newline or the end of
//! the build.

use std::collections::{HashMap, VecDeque};

use nixb_goals::{Event, Failure, FailureKind, Level, ResourceUsage};
use nixb_protocol::stderr::{ActivityType, Field, ResultType, Verbosity};
use nixb_protocol::StderrFrame;
use nixb_store::{StoreDir, StorePath};

/// How many log lines a failed builder's error quotes (Nix's `log-lines` default).
const LOG_TAIL: usize = 10;

/// Turns events into frames, keeping what a later frame or message needs: the activity of
/// each running build, the last lines of each build's log and what each builder used.
pub struct Activities {
    store_dir: StoreDir,
    next_id: u64,
    /// Per running build: its activity and the unfinished last line of its log.
    builds: HashMap<StorePath, (u64, Vec<u8>)>,
    /// The last lines of each build's log, for the error of a failed builder.
    tails: HashMap<StorePath, VecDeque<Vec<u8>>>,
    /// What each builder used, for the build results' CPU times.
    usage: HashMap<StorePath, ResourceUsage>,
}

impl Activities {
    /// Activity ids start at `first_id` (a connection numbers its activities across its
    /// operations, see [`Activities::next_id`]).
    pub fn new(store_dir: StoreDir, first_id: u64) -> Activities {
        Activities {
            store_dir,
            next_id: first_id,
            builds: HashMap::new(),
            tails: HashMap::new(),
            usage: HashMap::new(),
        }
    }

    /// The id the next activity would get.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// The frames `e` stands for, handed to `out` in order.
    pub fn translate(&mut self, e: Event, out: &mut dyn FnMut(StderrFrame)) {
        match e {
            Event::BuildStarted { drv, .. } => self.start(drv, out),
            Event::BuildLog { drv, chunk } => {
                // A client that joined a build already running (another client's) sees
                // it from its first log chunk on.
                if !self.builds.contains_key(&drv) {
                    self.start(drv.clone(), out);
                }
                let Some((id, mut pending)) = self.builds.remove(&drv) else {
                    return;
                };
                pending.extend_from_slice(&chunk);
                let mut start = 0;
                while let Some(nl) = pending[start..].iter().position(|&b| b == b'\n') {
                    let line = pending[start..start + nl].to_vec();
                    self.log_line(&drv, id, line, out);
                    start += nl + 1;
                }
                pending.drain(..start);
                self.builds.insert(drv, (id, pending));
            }
            Event::BuildResources { drv, usage } => {
                self.usage.insert(drv, usage);
            }
            Event::BuildSucceeded { drv } => {
                self.stop(&drv, out);
                // Only a failure quotes the log's last lines: a long request's successful
                // builds keep nothing.
                self.tails.remove(&drv);
            }
            Event::BuildFailed { drv, .. } => self.stop(&drv, out),
            Event::Message { level, text } => {
                let prefix = match level {
                    Level::Error => "error: ",
                    Level::Warn => "warning: ",
                    Level::Info => "",
                    Level::Debug => return,
                };
                out(StderrFrame::Next(format!("{prefix}{text}\n").into_bytes()));
            }
            Event::HookOutput { text, .. } => {
                out(StderrFrame::Next(format!("{text}\n").into_bytes()));
            }
            Event::SubstituterLog { chunk, .. } => out(StderrFrame::Next(chunk)),
            _ => {}
        }
    }

    /// Starts the `Build` activity of `drv`.
    fn start(&mut self, drv: StorePath, out: &mut dyn FnMut(StderrFrame)) {
        let id = self.next_id;
        self.next_id += 1;
        let printed = self.store_dir.print(&drv);
        out(StderrFrame::StartActivity {
            id,
            level: Verbosity::Info,
            kind: ActivityType::Build,
            text: format!("building '{printed}'"),
            // drv path, machine (empty: here), round, rounds.
            fields: vec![
                Field::string(printed),
                Field::string(""),
                Field::Int(1),
                Field::Int(1),
            ],
            parent: 0,
        });
        self.builds.insert(drv, (id, Vec::new()));
    }

    /// Ends the activities of builds still running (the engine stopped before they
    /// finished), flushing their unfinished lines.
    pub fn finish(&mut self, out: &mut dyn FnMut(StderrFrame)) {
        let running: Vec<StorePath> = self.builds.keys().cloned().collect();
        for drv in running {
            self.stop(&drv, out);
        }
    }

    /// A failed builder's error as Nix words it for a client that does not show build
    /// logs in full: the last lines of the log, and where the rest is. Other failures
    /// keep their message.
    pub fn failure_message(&self, f: &Failure) -> String {
        if f.kind != FailureKind::BuilderFailed {
            return f.message.clone();
        }
        let Some(tail) = self.tails.get(&f.path).filter(|t| !t.is_empty()) else {
            return f.message.clone();
        };
        let mut msg = format!("{};\nlast {} log lines:\n", f.message, tail.len());
        for line in tail {
            msg.push_str("> ");
            msg.push_str(&String::from_utf8_lossy(line));
            msg.push('\n');
        }
        msg.push_str(&format!(
            "For full logs, run 'nix log {}'.",
            self.store_dir.print(&f.path)
        ));
        msg
    }

    /// What each builder seen so far used, by derivation.
    pub fn take_usage(&mut self) -> HashMap<StorePath, ResourceUsage> {
        std::mem::take(&mut self.usage)
    }

    fn log_line(
        &mut self,
        drv: &StorePath,
        id: u64,
        line: Vec<u8>,
        out: &mut dyn FnMut(StderrFrame),
    ) {
        let tail = self.tails.entry(drv.clone()).or_default();
        if tail.len() == LOG_TAIL {
            tail.pop_front();
        }
        tail.push_back(line.clone());
        out(StderrFrame::Result {
            id,
            kind: ResultType::BuildLogLine,
            fields: vec![Field::String(line)],
        });
    }

    fn stop(&mut self, drv: &StorePath, out: &mut dyn FnMut(StderrFrame)) {
        if let Some((id, rest)) = self.builds.remove(drv) {
            if !rest.is_empty() {
                self.log_line(drv, id, rest, out);
            }
            out(StderrFrame::StopActivity { id });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> StoreDir {
        StoreDir::new("/nix/store").unwrap()
    }

    fn drv() -> StorePath {
        StorePath::from_base_name("0c7n2dq0zp8f7j3y4dn9wz5d2w8w6gqz-x.drv").unwrap()
    }

    fn started() -> Event {
        Event::BuildStarted {
            drv: drv(),
            outputs: Vec::new(),
            mode: nixb_goals::BuildMode::Normal,
            platform: "x86_64-linux".into(),
            log_file: None,
        }
    }

    fn run(a: &mut Activities, events: Vec<Event>) -> Vec<String> {
        let mut lines = Vec::new();
        for e in events {
            a.translate(e, &mut |f| {
                lines.extend(nixb_protocol::stderr::to_internal_json(&f));
            });
        }
        a.finish(&mut |f| lines.extend(nixb_protocol::stderr::to_internal_json(&f)));
        lines
    }

    #[test]
    fn a_build_is_one_activity_with_its_lines_and_an_unfinished_last_line() {
        let mut a = Activities::new(dir(), 7);
        let lines = run(
            &mut a,
            vec![
                started(),
                Event::BuildLog {
                    drv: drv(),
                    chunk: b"one\ntw".to_vec(),
                },
                Event::BuildLog {
                    drv: drv(),
                    chunk: b"o\nthree".to_vec(),
                },
            ],
        );
        let p = "/nix/store/0c7n2dq0zp8f7j3y4dn9wz5d2w8w6gqz-x.drv";
        assert_eq!(
            lines,
            vec![
                format!(
                    "@nix {{\"action\":\"start\",\"fields\":[\"{p}\",\"\",1,1],\"id\":7,\
                     \"level\":3,\"text\":\"building '{p}'\",\"type\":105}}"
                ),
                "@nix {\"action\":\"result\",\"fields\":[\"one\"],\"id\":7,\"type\":101}".into(),
                "@nix {\"action\":\"result\",\"fields\":[\"two\"],\"id\":7,\"type\":101}".into(),
                "@nix {\"action\":\"result\",\"fields\":[\"three\"],\"id\":7,\"type\":101}".into(),
                "@nix {\"action\":\"stop\",\"id\":7}".into(),
            ]
        );
        assert_eq!(a.next_id(), 8);
    }

    /// A client that joins another client's running build is shown it from its first log
    /// chunk on, as an activity of its own.
    #[test]
    fn a_build_joined_while_it_runs_starts_with_its_first_log_chunk() {
        let mut a = Activities::new(dir(), 3);
        let lines = run(
            &mut a,
            vec![
                Event::BuildLog {
                    drv: drv(),
                    chunk: b"later\n".to_vec(),
                },
                Event::BuildSucceeded { drv: drv() },
            ],
        );
        let p = "/nix/store/0c7n2dq0zp8f7j3y4dn9wz5d2w8w6gqz-x.drv";
        assert_eq!(
            lines,
            vec![
                format!(
                    "@nix {{\"action\":\"start\",\"fields\":[\"{p}\",\"\",1,1],\"id\":3,\
                     \"level\":3,\"text\":\"building '{p}'\",\"type\":105}}"
                ),
                "@nix {\"action\":\"result\",\"fields\":[\"later\"],\"id\":3,\"type\":101}".into(),
                "@nix {\"action\":\"stop\",\"id\":3}".into(),
            ]
        );
    }

    #[test]
    fn a_failed_builder_quotes_the_last_ten_lines() {
        let mut a = Activities::new(dir(), 1);
        let mut log = String::new();
        for i in 0..12 {
            log.push_str(&format!("line {i}\n"));
        }
        run(
            &mut a,
            vec![
                started(),
                Event::BuildLog {
                    drv: drv(),
                    chunk: log.into_bytes(),
                },
            ],
        );
        let msg = a.failure_message(&Failure {
            path: drv(),
            kind: FailureKind::BuilderFailed,
            message: "builder failed".into(),
        });
        assert!(msg.starts_with("builder failed;\nlast 10 log lines:\n> line 2\n"));
        assert!(msg.contains("> line 11\nFor full logs, run 'nix log /nix/store/"));
    }
}
