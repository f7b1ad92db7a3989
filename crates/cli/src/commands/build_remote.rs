//! `nixb build-remote`: the build hook that offloads builds to the machines of the
//! `builders` setting (default `@$NIX_CONF_DIR/machines`) over SSH, speaking
//! `nix-store --serve` to them (see `nixb_serve::hook` for the line protocol). The engine
//! starts it with the hook's four arguments; requests come on stdin, replies and messages
//! go to stderr, the remote build log to file descriptor 4 (stderr when that is closed).
//! `NIX_SSHOPTS` adds options to every ssh command, as for Nix. With
//! `builders-use-substitutes` the machine is asked to fetch missing inputs from its own
//! substituters before anything is copied from here.

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;

use anyhow::{Context, Result};
use clap::Args;
use nixb_serve::hook::{machines_from_setting, Hook, HookSettings, SshConnector};

#[derive(Args)]
pub struct BuildRemoteArgs {
    /// SYSTEM MAX-SILENT-TIME PRINT-BUILD-TRACE TIMEOUT, as the engine passes them
    #[arg(num_args = 4, required = true, value_names = ["SYSTEM", "MAX_SILENT_TIME", "PRINT_BUILD_TRACE", "TIMEOUT"])]
    pub args: Vec<String>,
}

/// The builders spec: the setting, or Nix's default machines file.
pub fn builders_spec(s: &crate::settings::Settings) -> String {
    if s.builders.is_empty() {
        let conf = std::env::var_os("NIX_CONF_DIR")
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| "/etc/nix".into());
        format!("@{}/machines", std::path::Path::new(&conf).display())
    } else {
        s.builders.join(" ")
    }
}

/// The build log: fd 4 if the engine gave us one, else stderr.
fn log_sink() -> Box<dyn Write + Send> {
    // A copy of descriptor 4 (close-on-exec), or EBADF when it is not open.
    if let Ok(fd) = nix::fcntl::fcntl(4, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(0)) {
        // SAFETY: `fd` is the fresh descriptor fcntl just returned; the File owns it alone.
        return Box::new(unsafe { File::from_raw_fd(fd) });
    }
    Box::new(std::io::stderr())
}

pub fn run(args: BuildRemoteArgs, options: &[String]) -> Result<u8> {
    let settings = super::settings(options)?;
    let hs = HookSettings::from_args(&args.args)?;
    let machines = machines_from_setting(&builders_spec(&settings), &hs.this_system)?;
    let store = super::open_store()?;
    let ssh_opts: Vec<String> = std::env::var("NIX_SSHOPTS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let mut connector = SshConnector::new(store.store_dir().clone(), ssh_opts);
    let mut log = log_sink;
    let mut hook = Hook {
        settings: hs,
        machines,
        state_dir: store.config().state_dir.clone(),
        store: &store,
        use_substitutes: settings.builders_use_substitutes,
        local_features: settings.system_features.iter().cloned().collect(),
        connector: &mut connector,
        log: &mut log,
    };
    let mut stderr = std::io::stderr();
    let outcome = hook
        .run(&mut std::io::stdin().lock(), &mut stderr)
        .context("build hook")?;
    Ok(u8::try_from(outcome.exit_code()).unwrap_or(1))
}
