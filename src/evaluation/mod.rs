//! Evaluating one user, in three steps used alike by the worker, the drift sweep and
//! `policy explain` — so that what is explained and what the sweep reports is what is done:
//!
//! 1. [`gather`]: read what the policy needs (Graph, Proofpoint), and nothing more. IO.
//! 2. [`decide`]: the policy's decision and the [`Plan`] of writes that brings Proofpoint to
//!    it, with the user's next state (grace start, recheck). Pure: no IO, no clock.
//! 3. [`apply`]: carry the plan out behind the identity check and the breaker. IO.

pub mod apply;
pub mod gather;

use chrono::{DateTime, Utc};

use crate::policy::{Decision, Policy};
use crate::store::UserState;
use gather::Gathered;

/// What one evaluation decided, before any write.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub decision: Decision,
    pub plan: Plan,
    /// The user's state as read before this evaluation.
    pub previous: UserState,
    /// The user's state once the plan is carried out (grace start, recheck, whether
    /// flagrelay tracks an exemption of its own).
    pub state: UserState,
}

/// Decide for a gathered user: the grace start from the sign-in state, the policy's decision,
/// the recheck it asks for, and the writes that differ from Proofpoint now.
pub fn decide(
    policy: &dyn Policy,
    g: &Gathered,
    state: &UserState,
    now: DateTime<Utc>,
) -> Evaluation {
    let previous = state.clone();
    let mut state = state.clone();
    // A grace period measured from the moment sign-in was (first seen) blocked.
    match g.user.account_enabled {
        Some(false) => {
            state.disabled_since.get_or_insert(now);
        }
        Some(true) => state.disabled_since = None,
        None => {}
    }
    let decision = policy.decide(&g.facts(state.disabled_since), now);
    // Time alone can change some decisions (a grace period ending, a leave date passing).
    state.recheck_at = decision.recheck_at.filter(|t| *t > now);
    let plan = Plan::new(
        &decision,
        g.proofpoint.is_active,
        g.exempt,
        state.exemption_added,
    );
    if plan.forget_exemption {
        // Someone removed it by hand: it is no longer ours to track.
        state.exemption_added = false;
    }
    Evaluation {
        decision,
        plan,
        previous,
        state,
    }
}

/// The writes a decision calls for, given Proofpoint's current state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Plan {
    /// PUT the user with this `is_active`.
    pub set_active: Option<bool>,
    /// Add the user to the sync-exemption list (and remember flagrelay did).
    pub add_exemption: bool,
    /// Remove an exemption flagrelay added earlier.
    pub remove_exemption: bool,
    /// An exemption flagrelay added is gone already (removed by hand): stop tracking it.
    pub forget_exemption: bool,
}

impl Plan {
    /// `exempt`: whether the user is on the list now (`None`: not read).
    pub fn new(
        decision: &Decision,
        is_active: bool,
        exempt: Option<bool>,
        added_by_us: bool,
    ) -> Self {
        Plan {
            set_active: decision.action.desired_active().filter(|d| *d != is_active),
            add_exemption: decision.exempt == Some(true) && exempt == Some(false),
            remove_exemption: decision.exempt == Some(false) && exempt == Some(true) && added_by_us,
            forget_exemption: decision.exempt == Some(false)
                && exempt == Some(false)
                && added_by_us,
        }
    }

    /// Nothing to write to Proofpoint.
    pub fn is_empty(&self) -> bool {
        self.set_active.is_none() && !self.add_exemption && !self.remove_exemption
    }

    /// The plan makes the user Not Active (the breaker is asked first).
    pub fn deactivates(&self) -> bool {
        self.set_active == Some(false)
    }

    /// One line per write, for logs, the history and `policy explain`.
    pub fn describe(&self, was_active: bool) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(a) = self.set_active {
            out.push(format!("is_active {was_active} → {a}"));
        }
        if self.add_exemption {
            out.push("added to the sync-exemption list".to_owned());
        }
        if self.remove_exemption {
            out.push("removed the sync exemption flagrelay had added".to_owned());
        }
        out
    }
}

#[cfg(test)]
mod tests;
