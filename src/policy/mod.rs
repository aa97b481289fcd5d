//! The policy: what should Proofpoint say about this user? Pure — facts in, [`Decision`] and
//! explanation out; no IO and no clock (the caller passes `now`).
//!
//! Two implementations sit behind the [`Policy`] trait: the built-in [`MirrorPolicy`] (used when
//! no policy file is configured: the guards, then Entra's `accountEnabled` mirrored onto
//! Proofpoint's `is_active`) and [`RulePolicy`], the declarative engine loaded from a TOML file
//! (`examples/policy.toml` is the shipped default; `schemas/policy.schema.json` describes it).
//!
//! # Layout
//! - `mod.rs`: the trait, [`Facts`], [`Needs`], [`Action`], the guards, [`MirrorPolicy`].
//! - [`decision`]: [`Decision`] and its trace, and the text rendering for `policy explain`.
//! - `file.rs`: the TOML model, parsing, and errors that name the line and the rule.
//! - `fact.rs`: the facts a rule can name and how each is read from [`Facts`].
//! - `matcher.rs`: `equals`, `one_of`, `glob`, `regex`, `exists`, `before`, `after`.
//! - `engine.rs`: [`RulePolicy`]: first match wins, three-valued evaluation, grace, guards.
//! - [`breaker`]: the blast-radius breaker's limits and its pure judgement.
//!
//! # Rules
//! Rules are tried top to bottom; the first whose `when` holds wins. The last rule has no
//! `when` and always matches (the default); the file is rejected otherwise.
//!
//! # Facts that were not fetched
//! Group membership, mailbox purpose, `employeeLeaveDateTime` and the exemption list each cost
//! an extra call or permission, so the worker fetches only what [`Policy::needs`] reports and
//! leaves the rest `None` in [`Facts`]. A condition on a fact that is not available evaluates to
//! **unknown** (three-valued logic: `all` is false if any part is false, else unknown if any part
//! is unknown; `any` is true if any part is true, else unknown if any part is unknown; `not`
//! keeps unknown). A rule only matches when its condition is *true*: unknown does not match, and
//! the trace says which fact was missing. `exists` on an unavailable fact is unknown too, not
//! false, so that `not { x = { exists = true } }` cannot silently match either.
//!
//! Not fetched is different from *absent*: a fetched user with no `department` simply has no
//! department (`exists` is false, `equals` is false).
//!
//! Because a rule skipped as unknown might have kept mail flowing, a `deactivate` reached after
//! any earlier rule evaluated to unknown is held back by the `incomplete_facts` guard (the
//! decision becomes `ignore`). flagrelay never stops someone's mail on incomplete facts.
//!
//! # Guards
//! Whatever the rules say, automation never deactivates a Proofpoint admin type
//! ([`crate::proofpoint::ADMIN_TYPES`]) or a functional account, and never deactivates on
//! incomplete facts (above). A `deactivate` rule may lift a guard explicitly, one by one, with
//! `override_guards = ["functional_account"]` (or `"admin"`, `"incomplete_facts"`). Guards only
//! stop deactivation: activating or keeping mail flowing is always allowed. There is no delete
//! action at all: flagrelay never deletes Proofpoint users.
//!
//! # Exemptions (`keep_mail_flowing`)
//! Proofpoint's scheduled Azure sync deactivates users whose sign-in is blocked. To keep mail
//! flowing for such a user (a shared mailbox, an account held during an investigation), the user
//! must be active *and* on the sync exemption list. [`Decision::exempt`] says what the policy
//! requires:
//! - `Some(true)` (`keep_mail_flowing`): the user must be on the exemption list. If it is not,
//!   the worker adds it and records that flagrelay added it.
//! - `Some(false)` (`activate`, `deactivate`): the policy does not require an exemption. The
//!   worker removes the exemption **only if flagrelay added it itself** (it tracks that in its
//!   durable record); exemptions an administrator made are never touched.
//! - `None` (`ignore`, a guard, a grace period): leave the exemption list as it is.
//!
//! # Grace periods (`deactivate_after`)
//! A `deactivate` rule may carry `deactivate_after = "7d"`. The grace period starts:
//! 1. at the user's `employeeLeaveDateTime`, when the rule's condition refers to
//!    `employee_leave_date_time` and the date is known;
//! 2. otherwise at [`Facts::disabled_since`], the moment the worker first saw the account
//!    disabled (from its durable record);
//! 3. otherwise *now*: the decision's [`Grace::from`] is [`GraceStart::Now`], and the worker
//!    should record `now` as `disabled_since` so that the grace does not restart every time.
//!
//! While `now < start + grace` the decision is `ignore` (Proofpoint is left as it is, nothing is
//! deactivated) with `recheck_at = Some(start + grace)`; from that instant on it is `deactivate`.
//! A user re-enabled during the grace period no longer matches a rule that requires
//! `account_enabled = false`, so a later rule (typically "enabled → activate") decides instead.
//!
//! # Rechecks
//! Graph sends no notification when time passes. [`Decision::recheck_at`] is the earliest future
//! instant at which the decision could change: the end of a grace period, or the moment a
//! `before`/`after` comparison evaluated on the way would flip (a leave date passing). The worker
//! should schedule a re-evaluation then.
//!
//! # The breaker
//! See [`breaker`]: the limits and the pure [`breaker::judge`]; the state store counts the
//! fleet's deactivations and asks it, in one transaction, before every deactivating write.

pub mod breaker;
pub mod decision;
mod engine;
mod fact;
mod file;
mod matcher;

#[cfg(test)]
mod tests;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::graph::{GraphUser, USER_SELECT};
use crate::proofpoint::PpUser;

pub use breaker::{BreakerConfig, Trip, Verdict};
pub use decision::{Check, Decision, Grace, GraceStart, RuleTrace, Truth};
pub use engine::RulePolicy;
pub use file::PolicyError;

pub use crate::graph::Group;

/// What the policy can see about one user. Build it with [`Facts::new`] and the `with_*`
/// methods; anything not supplied counts as *not fetched* (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub user: &'a GraphUser,
    pub proofpoint: &'a PpUser,
    /// Transitive group memberships; `None` when not fetched (`Some(&[])`: member of none).
    pub groups: Option<&'a [Group]>,
    /// `userPurpose` from `mailboxSettings` (`user`, `linked`, `shared`, `room`, `equipment`,
    /// `others`); `None` when not fetched or the user has no mailbox.
    pub mailbox_purpose: Option<&'a str>,
    /// Whether `employeeLeaveDateTime` was selected (it needs its own permission). When false,
    /// `user.employee_leave_date_time` is not consulted and leave-date conditions are unknown.
    pub leave_date_fetched: bool,
    /// Whether the user is on Proofpoint's Azure-sync exemption list; `None` when not fetched.
    pub exempt: Option<bool>,
    /// When the worker first saw this account disabled, from its durable record; `None` when
    /// unknown or enabled. The start of a grace period when no leave date applies.
    pub disabled_since: Option<DateTime<Utc>>,
}

impl<'a> Facts<'a> {
    /// Facts with only the Graph user and the Proofpoint user; everything optional is unfetched.
    pub fn new(user: &'a GraphUser, proofpoint: &'a PpUser) -> Self {
        Self {
            user,
            proofpoint,
            groups: None,
            mailbox_purpose: None,
            leave_date_fetched: false,
            exempt: None,
            disabled_since: None,
        }
    }

    pub fn with_groups(mut self, groups: &'a [Group]) -> Self {
        self.groups = Some(groups);
        self
    }

    /// The mailbox's `userPurpose`; `""` means mailbox settings were read and the user has
    /// no mailbox (so `mailbox_purpose` is absent, not unknown).
    pub fn with_mailbox_purpose(mut self, purpose: &'a str) -> Self {
        self.mailbox_purpose = Some(purpose);
        self
    }

    /// Mark `user.employee_leave_date_time` as fetched (absent when it is `None`).
    pub fn with_leave_date_fetched(mut self) -> Self {
        self.leave_date_fetched = true;
        self
    }

    pub fn with_exemption(mut self, exempt: bool) -> Self {
        self.exempt = Some(exempt);
        self
    }

    pub fn with_disabled_since(mut self, since: DateTime<Utc>) -> Self {
        self.disabled_since = Some(since);
        self
    }
}

/// What the loaded policy needs fetched beyond the plain user read. Each costs a call and a
/// permission, so the worker fetches exactly these and reports a missing permission.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Needs {
    /// A rule names `member_of` (Graph `GroupMember.Read.All`).
    pub groups: bool,
    /// A rule names `mailbox_purpose` (Graph `MailboxSettings.Read`).
    pub mailbox_purpose: bool,
    /// A rule names `employee_leave_date_time` (Graph `User-LifeCycleInfo.Read.All`).
    pub leave_date: bool,
    /// A rule names `proofpoint_exempt`, or an action is `keep_mail_flowing` (the worker must
    /// read and write the exemption list).
    pub exemptions: bool,
}

impl Needs {
    /// The Graph application permissions these needs add to `User.Read.All`.
    pub fn graph_permissions(&self) -> Vec<&'static str> {
        [
            (self.groups, "GroupMember.Read.All"),
            (self.mailbox_purpose, "MailboxSettings.Read"),
            (self.leave_date, "User-LifeCycleInfo.Read.All"),
        ]
        .into_iter()
        .filter_map(|(needed, p)| needed.then_some(p))
        .collect()
    }

    /// [`USER_SELECT`] without `employeeLeaveDateTime` unless the policy needs it.
    pub fn user_select(&self) -> Vec<&'static str> {
        USER_SELECT
            .iter()
            .copied()
            .filter(|p| self.leave_date || *p != "employeeLeaveDateTime")
            .collect()
    }

    fn merge(&mut self, other: Needs) {
        self.groups |= other.groups;
        self.mailbox_purpose |= other.mailbox_purpose;
        self.leave_date |= other.leave_date;
        self.exemptions |= other.exemptions;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Activate,
    Deactivate,
    /// Leave Proofpoint as it is.
    Ignore,
    /// Active in Proofpoint and on its Azure-sync exemption list, so mail keeps flowing even
    /// when sign-in is blocked.
    KeepMailFlowing,
}

impl Action {
    pub const ALL: [Action; 4] = [
        Action::Activate,
        Action::Deactivate,
        Action::Ignore,
        Action::KeepMailFlowing,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Activate => "activate",
            Action::Deactivate => "deactivate",
            Action::Ignore => "ignore",
            Action::KeepMailFlowing => "keep_mail_flowing",
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }

    /// The `is_active` value this action wants, if any.
    pub fn desired_active(self) -> Option<bool> {
        match self {
            Action::Activate | Action::KeepMailFlowing => Some(true),
            Action::Deactivate => Some(false),
            Action::Ignore => None,
        }
    }

    /// [`Decision::exempt`] for this action (see the module docs).
    pub fn exempt(self) -> Option<bool> {
        match self {
            Action::KeepMailFlowing => Some(true),
            Action::Activate | Action::Deactivate => Some(false),
            Action::Ignore => None,
        }
    }
}

/// A protection that holds back `deactivate` unless the winning rule lifts it explicitly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Guard {
    /// Proofpoint admin types are never deactivated by automation.
    Admin,
    /// Functional accounts (converted shared mailboxes) are free and left alone.
    FunctionalAccount,
    /// An earlier rule could not be evaluated because a fact was not fetched.
    IncompleteFacts,
}

impl Guard {
    pub const ALL: [Guard; 3] = [
        Guard::Admin,
        Guard::FunctionalAccount,
        Guard::IncompleteFacts,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Guard::Admin => "admin",
            Guard::FunctionalAccount => "functional_account",
            Guard::IncompleteFacts => "incomplete_facts",
        }
    }

    pub fn parse(s: &str) -> Option<Guard> {
        Self::ALL.into_iter().find(|g| g.as_str() == s)
    }

    /// The name a decision made by this guard carries in [`Decision::rule`].
    pub fn rule_name(self) -> String {
        format!("guard:{}", self.as_str())
    }
}

/// The Proofpoint-type guard protecting this user from deactivation, if any.
pub fn protected_by(pp: &PpUser) -> Option<Guard> {
    if pp.is_admin() {
        Some(Guard::Admin)
    } else if pp.is_functional() {
        Some(Guard::FunctionalAccount)
    } else {
        None
    }
}

/// Why a guard held back a deactivation, as a sentence.
pub(crate) fn guard_reason(guard: Guard, pp: &PpUser, detail: &str) -> String {
    match guard {
        Guard::Admin => format!(
            "Proofpoint user type {} is an admin type; automation never deactivates it",
            pp.user_type.as_deref().unwrap_or("?")
        ),
        Guard::FunctionalAccount => {
            "functional accounts (converted shared mailboxes) are never deactivated".into()
        }
        Guard::IncompleteFacts => format!(
            "an earlier rule could not be evaluated ({detail}); flagrelay does not stop mail on \
             incomplete facts"
        ),
    }
}

/// Decides per user. Implementations must be pure and cheap.
pub trait Policy: Send + Sync + std::fmt::Debug {
    fn decide(&self, facts: &Facts<'_>, now: DateTime<Utc>) -> Decision;

    /// What the worker must fetch for [`Policy::decide`] to see every fact the policy names.
    fn needs(&self) -> Needs {
        Needs::default()
    }

    /// Limits of the blast-radius breaker (per Proofpoint organization and over all of them).
    fn breaker(&self) -> BreakerConfig {
        BreakerConfig::default()
    }
}

/// Mirror `accountEnabled` onto `is_active`, behind the guards. The built-in policy when no
/// policy file is configured; it needs nothing beyond the plain user read.
#[derive(Debug, Clone, Copy, Default)]
pub struct MirrorPolicy;

impl Policy for MirrorPolicy {
    fn decide(&self, facts: &Facts<'_>, _now: DateTime<Utc>) -> Decision {
        let (truth, text, action, reason) = match facts.user.account_enabled {
            Some(true) => (
                Truth::True,
                "account_enabled is true",
                Action::Activate,
                "sign-in is allowed in Entra (accountEnabled=true)",
            ),
            Some(false) => (
                Truth::False,
                "account_enabled is false",
                Action::Deactivate,
                "sign-in is blocked in Entra (accountEnabled=false)",
            ),
            None => (
                Truth::Unknown,
                "account_enabled is unknown: Graph did not return accountEnabled",
                Action::Ignore,
                "Graph did not return accountEnabled; nothing to mirror",
            ),
        };
        let trace = vec![RuleTrace {
            rule: "mirror".into(),
            line: None,
            matched: Truth::True,
            checks: vec![Check::leaf(truth, text)],
        }];
        let mut d = Decision::new(action, "mirror", reason, trace);
        if action == Action::Deactivate
            && let Some(g) = protected_by(facts.proofpoint)
        {
            d.hold(g, guard_reason(g, facts.proofpoint, ""));
        }
        d
    }
}

/// The policy in force, replaceable at run time (SIGHUP reload) without stopping workers.
#[derive(Debug)]
pub struct SharedPolicy(std::sync::RwLock<std::sync::Arc<dyn Policy>>);

impl SharedPolicy {
    pub fn new(policy: std::sync::Arc<dyn Policy>) -> Self {
        Self(std::sync::RwLock::new(policy))
    }

    /// The policy for one evaluation (a reload never changes it mid-evaluation).
    pub fn current(&self) -> std::sync::Arc<dyn Policy> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn replace(&self, policy: std::sync::Arc<dyn Policy>) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = policy;
    }
}
