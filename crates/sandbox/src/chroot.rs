//! Chroot mode: the builder's root directory and the namespace part of its setup plan.

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use crate::plan::Step;
use crate::{BuildUserIds, SandboxError};

/// What the builder's root holds and how its namespaces are set up.
pub struct ChrootSpec {
    /// Directory to create (it must not exist) and populate as the builder's `/`.
    pub root: PathBuf,
    /// The store directory as the builder sees it, e.g. `/nix/store`; created writable so that
    /// the builder can create its outputs there.
    pub store_dir: PathBuf,
    /// The build directory, bound read-write at the same path inside.
    pub build_dir: PathBuf,
    /// The input closure and `sandbox-paths`.
    pub binds: Vec<BindMount>,
    pub hostname: String,
    pub network: Network,
    /// Files written under `<root>/etc/` (name relative to `/etc`, contents).
    pub etc_files: Vec<(PathBuf, Vec<u8>)>,
    /// Bind `/dev/kvm` when the host has it.
    pub kvm: bool,
}

/// `source` on the host appears at `target` inside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindMount {
    pub target: PathBuf,
    pub source: PathBuf,
    /// A missing source is skipped instead of being an error (`sandbox-paths` entries with `?`).
    pub optional: bool,
    pub read_only: bool,
}

/// The builder's network.
pub enum Network {
    /// A fresh network namespace with only `lo`.
    Private,
    /// A never-used network namespace prepared ahead of time by a [`crate::NetNsPool`]
    /// (`lo` already up).
    Prepared(OwnedFd),
    /// The host's network namespace, for fixed-output derivations; `/etc/resolv.conf` and
    /// `/etc/services` are bound in when present.
    Host,
}

pub(crate) struct Prepared {}

pub(crate) fn prepare(
    _spec: &ChrootSpec,
    _user: Option<&BuildUserIds>,
) -> Result<Prepared, SandboxError> {
    Err(SandboxError::InvalidSpec(
        "chroot isolation is not implemented yet".into(),
    ))
}

impl Prepared {
    pub fn namespace_steps(&self) -> Result<Vec<Step>, SandboxError> {
        Ok(vec![])
    }
    pub fn privilege_steps(&self, _user: Option<Vec<Step>>) -> Vec<Step> {
        vec![]
    }
    pub fn clone_flags(&self) -> libc::c_int {
        0
    }
}
