//! The policy: what should Proofpoint say about this user? Pure — facts in, decision and
//! explanation out; no IO and no clock (the caller passes `now`).
//!
//! Guards come first and no rule overrides them: Proofpoint admin types and functional
//! accounts are never changed by automation. Then the rules decide. The built-in
//! [`MirrorPolicy`] mirrors Entra's `accountEnabled` onto Proofpoint's `is_active`; the
//! declarative rule engine plugs in behind the same [`Policy`] trait.

use chrono::{DateTime, Utc};

use crate::graph::GraphUser;
use crate::proofpoint::PpUser;

/// What the policy can see about one user.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub user: &'a GraphUser,
    pub proofpoint: &'a PpUser,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Activate,
    Deactivate,
    /// Leave Proofpoint as it is.
    Ignore,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Activate => "activate",
            Action::Deactivate => "deactivate",
            Action::Ignore => "ignore",
        }
    }

    /// The `is_active` value this action wants, if any.
    pub fn desired_active(self) -> Option<bool> {
        match self {
            Action::Activate => Some(true),
            Action::Deactivate => Some(false),
            Action::Ignore => None,
        }
    }
}

/// A decision and why it was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    /// The guard or rule that decided (`guard:admin`, `mirror`, a rule name, ...).
    pub rule: String,
    /// A sentence for logs, outcome events and `policy explain`.
    pub reason: String,
}

/// Decides per user. Implementations must be pure and cheap.
pub trait Policy: Send + Sync + std::fmt::Debug {
    fn decide(&self, facts: &Facts<'_>, now: DateTime<Utc>) -> Decision;
}

/// Guards that hold whatever the rules say.
pub fn guard(facts: &Facts<'_>) -> Option<Decision> {
    let pp = facts.proofpoint;
    if pp.is_admin() {
        return Some(Decision {
            action: Action::Ignore,
            rule: "guard:admin".into(),
            reason: format!(
                "Proofpoint user type {} is an admin type; automation never changes it",
                pp.user_type.as_deref().unwrap_or("?")
            ),
        });
    }
    if pp.is_functional() {
        return Some(Decision {
            action: Action::Ignore,
            rule: "guard:functional_account".into(),
            reason: "functional accounts (converted shared mailboxes) are left alone".into(),
        });
    }
    None
}

/// Mirror `accountEnabled` onto `is_active`, behind the guards.
#[derive(Debug, Clone, Copy, Default)]
pub struct MirrorPolicy;

impl Policy for MirrorPolicy {
    fn decide(&self, facts: &Facts<'_>, _now: DateTime<Utc>) -> Decision {
        if let Some(d) = guard(facts) {
            return d;
        }
        match facts.user.account_enabled {
            Some(true) => Decision {
                action: Action::Activate,
                rule: "mirror".into(),
                reason: "sign-in is allowed in Entra (accountEnabled=true)".into(),
            },
            Some(false) => Decision {
                action: Action::Deactivate,
                rule: "mirror".into(),
                reason: "sign-in is blocked in Entra (accountEnabled=false)".into(),
            },
            None => Decision {
                action: Action::Ignore,
                rule: "mirror".into(),
                reason: "Graph did not return accountEnabled; nothing to mirror".into(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(enabled: Option<bool>, pp_type: &str, expected: Action, rule: &str) {
        let user = GraphUser {
            id: "u".into(),
            account_enabled: enabled,
            ..Default::default()
        };
        let pp = PpUser {
            primary_email: "u@example.com".into(),
            user_type: Some(pp_type.into()),
            is_active: true,
            other: Default::default(),
        };
        let d = MirrorPolicy.decide(
            &Facts {
                user: &user,
                proofpoint: &pp,
            },
            Utc::now(),
        );
        assert_eq!(
            (d.action, d.rule.as_str()),
            (expected, rule),
            "{enabled:?} {pp_type}"
        );
    }

    #[test]
    fn mirrors_behind_guards() {
        check(Some(true), "end_user", Action::Activate, "mirror");
        check(Some(false), "end_user", Action::Deactivate, "mirror");
        check(Some(false), "silent_user", Action::Deactivate, "mirror");
        check(None, "end_user", Action::Ignore, "mirror");
        check(
            Some(false),
            "functional_account",
            Action::Ignore,
            "guard:functional_account",
        );
        for admin in crate::proofpoint::ADMIN_TYPES {
            check(Some(false), admin, Action::Ignore, "guard:admin");
        }
    }
}
