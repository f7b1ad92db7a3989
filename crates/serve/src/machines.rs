//! Nix machines files (the `builders` setting, `/etc/nix/machines` by default) and the
//! choice of a machine for a build, with per-machine build slots.
//!
//! ```text
//! spec     = entry { ("\n" | ";") entry }
//! entry    = "@" file                       (another machines file; a missing one is empty)
//!          | uri [systems [key [maxJobs [speedFactor [features [mandatory [hostKey]]]]]]]
//! comment  = "#" to the end of the entry
//! uri      = ssh://[user@]host[:port] | [user@]host   (a bare host means ssh://)
//! systems  = system{,system}                (default: this machine's system)
//! features, mandatory = feature{,feature}   (default: none)
//! maxJobs, speedFactor = unsigned integer   (default 1; a speed factor of 0 counts as 1)
//! hostKey  = base64 of the host's public key line
//! ```
//!
//! Fields are separated by blanks; `-` leaves a field at its default. A machine can take
//! a build when it supports the derivation's system, offers every required feature
//! (mandatory ones count as offered) and the build requires every one of its mandatory
//! features. Slots are lock files `<state>/current-load/<uri with '/' as '_'>-<n>`, one
//! per job a machine may run, held (fcntl write lock) for the length of a build, so that
//! concurrent hook processes share the machines fairly.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};

use nixb_store::locks::{lock_file, LockType};

#[derive(Debug, thiserror::Error)]
pub enum MachinesError {
    #[error("bad machine specification '{line}': {reason}")]
    Bad { line: String, reason: String },
    #[error("reading machines file '{}': {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("machines file '{}' includes itself", path.display())]
    Recursive { path: PathBuf },
    #[error("build slot lock '{}': {reason}", path.display())]
    Slot { path: PathBuf, reason: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Machine {
    /// `ssh://[user@]host[:port]` (or another store URI, which only SSH builds use).
    pub store_uri: String,
    pub systems: Vec<String>,
    /// Private key for SSH, empty for the default.
    pub ssh_key: String,
    pub max_jobs: u32,
    pub speed_factor: u32,
    pub supported_features: BTreeSet<String>,
    pub mandatory_features: BTreeSet<String>,
    /// Base64 of the host's public key line; empty to use the user's known hosts.
    pub public_host_key: String,
}

impl Machine {
    pub fn supports_system(&self, system: &str) -> bool {
        system == "builtin" || self.systems.iter().any(|s| s == system)
    }

    /// Whether this machine may take a build for `system` requiring `features`.
    pub fn can_build(&self, system: &str, features: &BTreeSet<String>) -> bool {
        self.supports_system(system)
            && features
                .iter()
                .all(|f| self.supported_features.contains(f) || self.mandatory_features.contains(f))
            && self.mandatory_features.iter().all(|f| features.contains(f))
    }

    /// The host part of an `ssh://` URI (`[user@]host`) and its port.
    pub fn ssh_host(&self) -> Option<(String, Option<u16>)> {
        let rest = self.store_uri.strip_prefix("ssh://")?;
        let rest = rest.split(['?', '/']).next().unwrap_or(rest);
        // [user@]host[:port], with IPv6 literals in brackets.
        if let Some((h, p)) = rest.rsplit_once(':') {
            if !h.ends_with(']') && h.contains(':') {
                return Some((rest.to_string(), None));
            }
            if let Ok(port) = p.parse::<u16>() {
                return Some((h.to_string(), Some(port)));
            }
        }
        Some((rest.to_string(), None))
    }

    /// The slot lock file name prefix for this machine.
    fn slot_stem(&self) -> String {
        self.store_uri.replace('/', "_")
    }
}

/// Parses a `builders` value (or the text of a machines file). `this_system` is the
/// default system; `@file` entries are read relative to nothing (absolute paths, as Nix).
pub fn parse_machines(spec: &str, this_system: &str) -> Result<Vec<Machine>, MachinesError> {
    let mut out = Vec::new();
    expand(spec, this_system, &mut Vec::new(), &mut out)?;
    Ok(out)
}

fn expand(
    spec: &str,
    this_system: &str,
    including: &mut Vec<PathBuf>,
    out: &mut Vec<Machine>,
) -> Result<(), MachinesError> {
    for entry in spec.split(['\n', ';']) {
        let entry = entry.split('#').next().unwrap_or("").trim();
        if entry.is_empty() {
            continue;
        }
        if let Some(file) = entry.strip_prefix('@') {
            let path = PathBuf::from(file.trim());
            if including.contains(&path) {
                return Err(MachinesError::Recursive { path });
            }
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                // As Nix: the default /etc/nix/machines need not exist.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(MachinesError::Read { path, source }),
            };
            including.push(path);
            expand(&text, this_system, including, out)?;
            including.pop();
            continue;
        }
        out.push(parse_line(entry, this_system)?);
    }
    Ok(())
}

fn parse_line(line: &str, this_system: &str) -> Result<Machine, MachinesError> {
    let t: Vec<&str> = line.split_whitespace().collect();
    let bad = |reason: String| MachinesError::Bad {
        line: line.to_string(),
        reason,
    };
    let field = |i: usize| t.get(i).copied().filter(|s| !s.is_empty() && *s != "-");
    let list = |i: usize| -> BTreeSet<String> {
        field(i)
            .map(|s| {
                s.split(',')
                    .filter(|x| !x.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    let number = |i: usize, what: &str| -> Result<u32, MachinesError> {
        match field(i) {
            None => Ok(1),
            Some(s) => s.parse::<u32>().map_err(|_| {
                bad(format!(
                    "{what} (column {}) '{s}' is not an unsigned integer",
                    i + 1
                ))
            }),
        }
    };
    let uri = field(0).ok_or_else(|| bad("no store uri in the first column".into()))?;
    let store_uri =
        if uri.contains("://") || uri.contains('/') || ["auto", "daemon", "local"].contains(&uri) {
            uri.to_string()
        } else {
            format!("ssh://{uri}")
        };
    let systems = match field(1) {
        Some(s) => s
            .split(',')
            .filter(|x| !x.is_empty())
            .map(str::to_string)
            .collect(),
        None => vec![this_system.to_string()],
    };
    let public_host_key = match field(7) {
        Some(k) => {
            data_encoding::BASE64
                .decode(k.as_bytes())
                .map_err(|e| bad(format!("public host key (column 8) is not base64: {e}")))?;
            k.to_string()
        }
        None => String::new(),
    };
    Ok(Machine {
        store_uri,
        systems,
        ssh_key: field(2).unwrap_or("").to_string(),
        max_jobs: number(3, "maximum jobs")?,
        // A speed factor of 0 would divide by zero when comparing loads.
        speed_factor: number(4, "speed factor")?.max(1),
        supported_features: list(5),
        mandatory_features: list(6),
        public_host_key,
    })
}

/// A held build slot on a machine; released when dropped.
#[derive(Debug)]
pub struct SlotLock {
    pub path: PathBuf,
    _file: File,
}

/// The outcome of looking for a machine.
#[derive(Debug)]
pub enum Choice {
    /// This machine, with one of its slots held.
    Machine(usize, SlotLock),
    /// Some machine could take it, but all of their slots are busy.
    AllBusy,
    /// No machine can build this system with these features.
    NoneSuitable,
}

/// Picks the least loaded suitable machine (load divided by speed factor; ties go to
/// the faster machine, then the less loaded one) that has a free slot, and takes that
/// slot. Machines whose index is in `exclude` (found unreachable) are passed over.
pub fn choose_machine(
    machines: &[Machine],
    system: &str,
    features: &BTreeSet<String>,
    state_dir: &Path,
    exclude: &BTreeSet<usize>,
) -> Result<Choice, MachinesError> {
    let dir = state_dir.join("current-load");
    std::fs::create_dir_all(&dir).map_err(|source| MachinesError::Read {
        path: dir.clone(),
        source,
    })?;
    let mut right_type = false;
    let mut best: Option<(usize, u32, SlotLock)> = None;
    for (i, m) in machines.iter().enumerate() {
        if !m.can_build(system, features) {
            continue;
        }
        right_type = true;
        if exclude.contains(&i) || m.max_jobs == 0 {
            continue;
        }
        // Count busy slots and keep the first free one.
        let mut load = 0u32;
        let mut free: Option<SlotLock> = None;
        for slot in 0..m.max_jobs {
            let path = dir.join(format!("{}-{slot}", m.slot_stem()));
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| MachinesError::Slot {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            let got = if free.is_none() {
                lock_file(&file, LockType::Write, false).map_err(|e| MachinesError::Slot {
                    path: path.clone(),
                    reason: e.to_string(),
                })?
            } else {
                // Probe without keeping a second slot: try, and let go at once.
                let g =
                    lock_file(&file, LockType::Write, false).map_err(|e| MachinesError::Slot {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                if g {
                    let _ = lock_file(&file, LockType::None, false);
                }
                g
            };
            if !got {
                load += 1;
            } else if free.is_none() {
                free = Some(SlotLock { path, _file: file });
            }
        }
        let Some(slot) = free else { continue };
        let better = match &best {
            None => true,
            Some((bi, bload, _)) => {
                let b = &machines[*bi];
                // Compare load/speed without floating point: a/s < b/t <=> a*t < b*s.
                let lhs = u64::from(load) * u64::from(b.speed_factor);
                let rhs = u64::from(*bload) * u64::from(m.speed_factor);
                lhs < rhs
                    || (lhs == rhs
                        && (m.speed_factor > b.speed_factor
                            || (m.speed_factor == b.speed_factor && load < *bload)))
            }
        };
        if better {
            best = Some((i, load, slot));
        }
    }
    Ok(match best {
        Some((i, _, slot)) => Choice::Machine(i, slot),
        None if right_type => Choice::AllBusy,
        None => Choice::NoneSuitable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feats(s: &[&str]) -> BTreeSet<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn full_line_and_defaults() {
        let key = data_encoding::BASE64.encode(b"ssh-ed25519 AAAAC3Nza host");
        let spec = format!(
            "ssh://alice@big:2222 x86_64-linux,i686-linux /k 8 3 kvm,big-parallel benchmark {key}\n\
             # a comment line\n small - - - - ; nix@other aarch64-linux # trailing\n"
        );
        let ms = parse_machines(&spec, "x86_64-linux").unwrap();
        assert_eq!(ms.len(), 3);
        assert_eq!(ms[0].store_uri, "ssh://alice@big:2222");
        assert_eq!(ms[0].systems, ["x86_64-linux", "i686-linux"]);
        assert_eq!(ms[0].ssh_key, "/k");
        assert_eq!((ms[0].max_jobs, ms[0].speed_factor), (8, 3));
        assert_eq!(ms[0].supported_features, feats(&["kvm", "big-parallel"]));
        assert_eq!(ms[0].mandatory_features, feats(&["benchmark"]));
        assert_eq!(ms[0].public_host_key, key);
        assert_eq!(ms[0].ssh_host(), Some(("alice@big".into(), Some(2222))));
        // A bare host gets ssh://, `-` and missing fields their defaults.
        assert_eq!(ms[1].store_uri, "ssh://small");
        assert_eq!(ms[1].systems, ["x86_64-linux"]);
        assert_eq!((ms[1].max_jobs, ms[1].speed_factor), (1, 1));
        assert_eq!(ms[2].store_uri, "ssh://nix@other");
        assert_eq!(ms[2].systems, ["aarch64-linux"]);
    }

    #[test]
    fn bad_lines_are_named() {
        let e = parse_machines("host x86_64-linux - many", "x").unwrap_err();
        assert_eq!(
            e.to_string(),
            "bad machine specification 'host x86_64-linux - many': maximum jobs (column 4) 'many' is not an unsigned integer"
        );
        let e = parse_machines("host - - 1 1 - - not*base64", "x").unwrap_err();
        assert!(e.to_string().contains("not base64"), "{e}");
        assert_eq!(
            parse_machines("host - - 1 0", "x").unwrap()[0].speed_factor,
            1
        );
    }

    #[test]
    fn includes_missing_files_and_recursion() {
        let d = tempfile::tempdir().unwrap();
        let inner = d.path().join("inner");
        std::fs::write(&inner, "a\nb x86_64-linux\n").unwrap();
        let spec = format!(
            "@{}; c ; @{}/does-not-exist",
            inner.display(),
            d.path().display()
        );
        let ms = parse_machines(&spec, "s").unwrap();
        let uris: Vec<_> = ms.iter().map(|m| m.store_uri.as_str()).collect();
        assert_eq!(uris, ["ssh://a", "ssh://b", "ssh://c"]);
        let looping = d.path().join("loop");
        std::fs::write(&looping, format!("@{}\n", looping.display())).unwrap();
        assert!(matches!(
            parse_machines(&format!("@{}", looping.display()), "s"),
            Err(MachinesError::Recursive { .. })
        ));
    }

    #[test]
    fn features_and_mandatory_features() {
        let m = &parse_machines("h x86_64-linux - 1 1 kvm bench", "s").unwrap()[0];
        assert!(m.can_build("x86_64-linux", &feats(&["bench"])));
        assert!(m.can_build("x86_64-linux", &feats(&["bench", "kvm"])));
        // Mandatory feature not asked for: this machine is reserved for such builds.
        assert!(!m.can_build("x86_64-linux", &feats(&["kvm"])));
        assert!(!m.can_build("x86_64-linux", &feats(&["bench", "cuda"])));
        assert!(!m.can_build("aarch64-linux", &feats(&["bench"])));
        assert!(m.can_build("builtin", &feats(&["bench"])));
    }

    #[test]
    fn slots_load_and_speed_pick_the_machine() {
        let d = tempfile::tempdir().unwrap();
        let ms = parse_machines(
            "slow x86_64-linux - 2 1; fast x86_64-linux - 1 4; other aarch64-linux",
            "s",
        )
        .unwrap();
        let none: BTreeSet<usize> = BTreeSet::new();
        let pick = |ex: &BTreeSet<usize>| {
            choose_machine(&ms, "x86_64-linux", &feats(&[]), d.path(), ex).unwrap()
        };
        // Both idle: equal load ratio, the faster wins.
        let Choice::Machine(first, s1) = pick(&none) else {
            panic!()
        };
        assert_eq!(first, 1);
        assert!(
            s1.path.ends_with("current-load/ssh:__fast-0"),
            "{}",
            s1.path.display()
        );
        // fast is full now: slow takes the next two builds, then everything is busy.
        let Choice::Machine(second, s2) = pick(&none) else {
            panic!()
        };
        assert_eq!(second, 0);
        let Choice::Machine(third, s3) = pick(&none) else {
            panic!()
        };
        assert_eq!(third, 0);
        assert_ne!(s2.path, s3.path);
        assert!(matches!(pick(&none), Choice::AllBusy));
        // Releasing a slot frees it for the next build.
        drop(s1);
        assert!(matches!(pick(&none), Choice::Machine(1, _)));
        // Excluded (unreachable) machines are skipped.
        drop(s2);
        assert!(matches!(pick(&BTreeSet::from([1])), Choice::Machine(0, _)));
        assert!(matches!(
            choose_machine(&ms, "riscv64-linux", &feats(&[]), d.path(), &none).unwrap(),
            Choice::NoneSuitable
        ));
    }
}
