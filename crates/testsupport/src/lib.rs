#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

use std::process::{Command, Stdio};
use std::sync::OnceLock;

pub mod store;
pub use store::TestStore;

/// Something a test needs of the machine it runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Effective uid 0 (namespaces, mounts, chown).
    Root,
    /// Real Nix 2.8 (`nix-store` on `PATH`, Debian's `nix-bin`), the oracle.
    Nix,
    /// A program found on `PATH` (or an absolute path that exists).
    Program(&'static str),
}

impl Need {
    fn present(self) -> bool {
        match self {
            Need::Root => nix::unistd::geteuid().is_root(),
            Need::Nix => {
                static NIX: OnceLock<bool> = OnceLock::new();
                *NIX.get_or_init(|| {
                    Command::new("nix-store")
                        .arg("--version")
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .is_ok_and(|s| s.success())
                })
            }
            Need::Program(p) if p.contains('/') => std::path::Path::new(p).exists(),
            Need::Program(p) => std::env::var_os("PATH")
                .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(p).is_file())),
        }
    }

    fn describe(self) -> String {
        match self {
            Need::Root => "root".to_owned(),
            Need::Nix => "real Nix (nix-store from Debian's nix-bin)".to_owned(),
            Need::Program(p) => format!("the program '{p}'"),
        }
    }
}

/// Whether the calling test has everything in `needs`. When something is missing: under
/// `CI=true` this panics, naming it; elsewhere it prints a `SKIPPED` line naming the test
/// and what is missing, and returns false, for the test to return at once.
pub fn required(needs: &[Need]) -> bool {
    let missing: Vec<String> = needs
        .iter()
        .filter(|n| !n.present())
        .map(|n| n.describe())
        .collect();
    if missing.is_empty() {
        return true;
    }
    // libtest runs each test on a thread named after it.
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_owned();
    let what = missing.join(", ");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "{test} needs {what}, which CI=true requires (`cargo xtask test` installs real Nix; \
             run it as root)"
        );
    }
    eprintln!("SKIPPED {test}: needs {what}");
    false
}

/// Re-runs the calling test binary as uid and gid `id`, which need no passwd entry
/// (`setpriv --reuid --regid --clear-groups`, from util-linux), with `env` set, skipping
/// the tests named in `skip`, and asserts that every other test passed and none was
/// [`required`]-skipped: the pass count must be the count listed, and no `SKIPPED` line
/// may appear. For suites that must also pass without root.
pub fn rerun_unprivileged(id: u32, env: (&str, &str), skip: &[&str]) {
    let exe = std::env::current_exe().expect("the test binary's path");
    let listed = Command::new(&exe)
        .args(["--list", "--format=terse"])
        .output()
        .expect("listing the tests");
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    let expected = listed
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .filter(|name| !skip.contains(name))
        .count();
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={id}"))
        .arg(format!("--regid={id}"))
        .arg("--clear-groups")
        .arg(&exe)
        // Uncaptured, so that a guard's SKIPPED line reaches us even from a passing test.
        .args(["--exact", "--test-threads=2", "--nocapture"])
        .env(env.0, env.1)
        // A TMPDIR of root's could not be written to.
        .env_remove("TMPDIR");
    for name in skip {
        cmd.args(["--skip", name]);
    }
    let out = cmd.output().expect("running setpriv (util-linux)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the unprivileged re-run failed:\n{stdout}\n{stderr}"
    );
    let summary = format!("test result: ok. {expected} passed; 0 failed");
    assert!(
        stdout.contains(&summary),
        "expected '{summary}' from the unprivileged re-run:\n{stdout}\n{stderr}"
    );
    assert!(
        !stderr.contains("SKIPPED") && !stdout.contains("SKIPPED"),
        "a test skipped itself in the unprivileged re-run:\n{stdout}\n{stderr}"
    );
}

/// Returns from the calling test unless the machine has everything named (variants of
/// [`Need`]: `require!(Nix)`, `require!(Root, Nix)`, `require!(Program("sshd"))`); see
/// [`required`] for what happens when something is missing.
#[macro_export]
macro_rules! require {
    ($($need:ident $(($arg:expr))?),+ $(,)?) => {
        if !$crate::required(&[$($crate::Need::$need $(($arg))?),+]) {
            return;
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn present_things_pass_and_missing_ones_are_named() {
        assert!(required(&[Need::Program("sh")]));
        assert!(required(&[Need::Program("/bin/sh")]));
        assert!(!Need::Program("no-such-program-here").present());
        assert!(!Need::Program("/no/such/file").present());
        assert_eq!(
            Need::Program("sshd").describe(),
            "the program 'sshd'".to_owned()
        );
    }

    #[test]
    fn missing_things_panic_under_ci_and_skip_elsewhere() {
        // Run in a child process: the outcome depends on the CI variable, which a test
        // must not change in its own (shared) environment.
        let exe = std::env::current_exe().unwrap();
        for (ci, expect_success, expect_text) in [
            ("true", false, "needs the program 'no-such-program-here'"),
            ("", true, "SKIPPED"),
        ] {
            let out = Command::new(&exe)
                .args([
                    "--exact",
                    "tests::guarded",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("CI", ci)
                .env("NIXB_TESTSUPPORT_CHILD", "1")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stderr).into_owned()
                + &String::from_utf8_lossy(&out.stdout);
            assert_eq!(out.status.success(), expect_success, "CI={ci}: {text}");
            assert!(text.contains(expect_text), "CI={ci}: {text}");
            assert!(text.contains("tests::guarded"), "CI={ci}: {text}");
        }
    }

    /// The guarded test the one above runs in a child process.
    #[test]
    fn guarded() {
        if std::env::var_os("NIXB_TESTSUPPORT_CHILD").is_none() {
            return;
        }
        require!(Program("no-such-program-here"));
        unreachable!("require! let a test with a missing program go on");
    }
}
