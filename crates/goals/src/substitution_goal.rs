//! The substitution goal: make one store path valid without building it.
//!
//! States as in the original: `init` (done if the path is valid) → `tryNext` (ask the next
//! substituter; none left means `NoSubstituters`, which tells a waiting derivation goal to
//! build instead). nixb has no substituters yet, so `tryNext` answers at once; the
//! [`Substituters`] seam is where binary caches will plug in (query info, realise the
//! references, then fetch under the path's lock, as the original's later states do).

use nixb_store::StorePath;

use crate::error::quoted;
use crate::event::{FailureKind, Level};
use crate::graph::{ExitCode, GoalId};
use crate::worker::{Failure, Worker};

/// Where substitutes come from. None are configured yet.
pub(crate) trait Substituters {
    /// Whether some substituter could provide `path`.
    fn has_substitute(&self, path: &StorePath) -> bool;
}

/// The empty list of substituters.
pub(crate) struct NoSubstituters;

impl Substituters for NoSubstituters {
    fn has_substitute(&self, _path: &StorePath) -> bool {
        false
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Init,
}

pub(crate) struct SubstitutionGoal {
    path: StorePath,
    repair: bool,
    state: State,
}

impl SubstitutionGoal {
    pub fn new(path: StorePath, repair: bool) -> SubstitutionGoal {
        SubstitutionGoal {
            path,
            repair,
            state: State::Init,
        }
    }

    pub fn work(&mut self, id: GoalId, w: &mut Worker<'_>) {
        match self.state {
            State::Init => self.init(id, w),
        }
    }

    fn init(&mut self, id: GoalId, w: &mut Worker<'_>) {
        let _ = w.store.add_temp_root(&self.path);
        match w.store.is_valid_path(&self.path) {
            Ok(true) if !self.repair => return w.am_done(id, ExitCode::Success),
            Ok(_) => {}
            Err(e) => {
                let message = format!(
                    "checking validity of {}: {e}",
                    quoted(w.store_dir(), &self.path)
                );
                w.message(Level::Error, message.clone());
                w.record_failure(Failure {
                    path: self.path.clone(),
                    kind: FailureKind::SetupFailed,
                    message,
                });
                return w.am_done(id, ExitCode::Failed);
            }
        }
        self.try_next(id, w);
    }

    fn try_next(&mut self, id: GoalId, w: &mut Worker<'_>) {
        // With no substituter able to provide the path, report `NoSubstituters` rather than
        // failure: a derivation goal waiting for its outputs then builds them. (The
        // original's "hack", kept because it is what makes the fallback to building work.)
        let subs = NoSubstituters;
        if !w.cfg.use_substitutes || !subs.has_substitute(&self.path) {
            return w.am_done(id, ExitCode::NoSubstituters);
        }
        w.am_done(id, ExitCode::Failed);
    }
}
