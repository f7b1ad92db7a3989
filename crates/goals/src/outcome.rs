//! The outcome of a run: the goals that failed, in order, and the exit status Nix 2.x gives
//! for them. Goals report a failure once (through the scheduler); the bits of the exit
//! status follow from the kinds of the failures, so nobody sets them by hand.

use nixb_store::StorePath;

use crate::event::FailureKind;

/// One failed goal, for the outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The derivation (or, for a missing source, the path) that failed.
    pub path: StorePath,
    pub kind: FailureKind,
    pub message: String,
}

/// What went wrong in a run so far.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    failures: Vec<Failure>,
    /// A build failed in a way that would fail again (the original's
    /// `permanentFailure`).
    permanent_failure: bool,
    timed_out: bool,
    hash_mismatch: bool,
    check_mismatch: bool,
}

impl Outcome {
    /// Records a failure; `permanent` marks a build that would fail again.
    pub fn record(&mut self, failure: Failure, permanent: bool) {
        self.permanent_failure |= permanent;
        match failure.kind {
            FailureKind::TimedOut => self.timed_out = true,
            FailureKind::HashMismatch => self.hash_mismatch = true,
            FailureKind::NotDeterministic => self.check_mismatch = true,
            _ => {}
        }
        self.failures.push(failure);
    }

    /// Nix 2.x's exit status for a run with failures: 100 plus bits for a timeout (1), a
    /// fixed-output hash mismatch (2) and a `--check` mismatch (4); 1 for other failures.
    pub fn failing_exit_status(&self) -> i32 {
        let build_failure = self.permanent_failure || self.timed_out || self.hash_mismatch;
        let mut mask = 0;
        if build_failure {
            mask |= 0x04;
        }
        if self.timed_out {
            mask |= 0x01;
        }
        if self.hash_mismatch {
            mask |= 0x02;
        }
        if self.check_mismatch {
            mask |= 0x08;
        }
        if mask != 0 {
            mask | 0x60
        } else {
            1
        }
    }

    /// The failures, in the order they were recorded.
    pub fn into_failures(self) -> Vec<Failure> {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(kind: FailureKind) -> Failure {
        Failure {
            path: StorePath::from_base_name("00000000000000000000000000000000-x").unwrap(),
            kind,
            message: String::new(),
        }
    }

    /// The statuses Nix's manual documents ("special exit codes for build failure"): 100
    /// generic, 101 timeout, 102 hash mismatch, 104 not deterministic, several failures of
    /// a keep-going run combined by bitwise or (101 | 102 | 104 = 111); 1 otherwise.
    #[test]
    fn exit_status_bits_follow_the_failure_kinds() {
        let status = |fs: &[(FailureKind, bool)]| {
            let mut o = Outcome::default();
            for &(k, p) in fs {
                o.record(failure(k), p);
            }
            o.failing_exit_status()
        };
        assert_eq!(status(&[(FailureKind::SetupFailed, false)]), 1);
        assert_eq!(status(&[(FailureKind::BuilderFailed, true)]), 100);
        assert_eq!(status(&[(FailureKind::TimedOut, false)]), 101);
        assert_eq!(status(&[(FailureKind::HashMismatch, true)]), 102);
        assert_eq!(status(&[(FailureKind::NotDeterministic, false)]), 104);
        assert_eq!(
            status(&[
                (FailureKind::TimedOut, false),
                (FailureKind::HashMismatch, true),
                (FailureKind::NotDeterministic, false)
            ]),
            111
        );
        assert_eq!(status(&[(FailureKind::LogLimitExceeded, false)]), 1);
    }
}
