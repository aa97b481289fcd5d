//! [`Decision`]: what the policy decided, why, and the trace of every rule tried; rendered as
//! text for logs and `flagrelay policy explain`.

use std::fmt::{self, Write as _};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use super::{Action, Guard};

/// Three-valued truth: a condition on a fact that was not fetched is [`Truth::Unknown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Truth {
    True,
    False,
    Unknown,
}

impl Truth {
    pub fn from_bool(b: bool) -> Self {
        if b { Truth::True } else { Truth::False }
    }

    /// Kleene conjunction: false wins, then unknown.
    pub fn all(parts: impl IntoIterator<Item = Truth>) -> Truth {
        parts
            .into_iter()
            .fold(Truth::True, |acc, t| match (acc, t) {
                (Truth::False, _) | (_, Truth::False) => Truth::False,
                (Truth::Unknown, _) | (_, Truth::Unknown) => Truth::Unknown,
                _ => Truth::True,
            })
    }

    /// Kleene disjunction: true wins, then unknown.
    pub fn any(parts: impl IntoIterator<Item = Truth>) -> Truth {
        parts
            .into_iter()
            .fold(Truth::False, |acc, t| match (acc, t) {
                (Truth::True, _) | (_, Truth::True) => Truth::True,
                (Truth::Unknown, _) | (_, Truth::Unknown) => Truth::Unknown,
                _ => Truth::False,
            })
    }

    fn mark(self) -> &'static str {
        match self {
            Truth::True => "✓",
            Truth::False => "✗",
            Truth::Unknown => "?",
        }
    }
}

/// Kleene negation: unknown stays unknown.
impl std::ops::Not for Truth {
    type Output = Truth;

    fn not(self) -> Truth {
        match self {
            Truth::True => Truth::False,
            Truth::False => Truth::True,
            Truth::Unknown => Truth::Unknown,
        }
    }
}

/// One evaluated condition: its truth, a sentence, and the parts of a combinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub truth: Truth,
    /// e.g. `mailbox_purpose = shared ∈ [shared, room, equipment]`,
    /// `account_enabled is true, wanted false`, `member_of: unknown (group membership not fetched)`.
    pub text: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<Check>,
}

impl Check {
    pub fn leaf(truth: Truth, text: impl Into<String>) -> Self {
        Self {
            truth,
            text: text.into(),
            children: Vec::new(),
        }
    }
}

/// One rule tried, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleTrace {
    pub rule: String,
    /// Line of the rule in the policy file (`None` for built-in policies).
    pub line: Option<usize>,
    /// Only [`Truth::True`] matches; unknown does not.
    pub matched: Truth,
    /// The rule's condition, evaluated (empty for the default rule).
    pub checks: Vec<Check>,
}

/// Where a grace period was measured from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GraceStart {
    /// The user's `employeeLeaveDateTime` (the rule's condition refers to it).
    LeaveDate,
    /// [`super::Facts::disabled_since`], from the worker's durable record.
    DisabledSince,
    /// Neither was known: the grace starts now. The worker should record `now` as
    /// `disabled_since`, or the grace restarts at every evaluation.
    Now,
}

/// A `deactivate_after` grace period, running or over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Grace {
    pub from: GraceStart,
    pub started: DateTime<Utc>,
    /// Deactivation is due at this instant (`started + deactivate_after`).
    pub until: DateTime<Utc>,
}

/// A decision and why it was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub action: Action,
    /// The guard or rule that decided (`guard:admin`, `mirror`, a rule name, ...).
    pub rule: String,
    /// A sentence for logs, outcome events and `policy explain`.
    pub reason: String,
    /// Exemption-list requirement: `Some(true)` must be exempt; `Some(false)` not required by
    /// policy (the worker removes only an exemption flagrelay added itself); `None` leave the
    /// list as it is. See the module docs.
    pub exempt: Option<bool>,
    /// Evaluate this user again at this instant (end of a grace period, a leave date passing).
    pub recheck_at: Option<DateTime<Utc>>,
    /// The grace period of the winning `deactivate_after` rule, running or over.
    pub grace: Option<Grace>,
    /// The guard that held back a deactivation, if one did.
    pub guard: Option<Guard>,
    /// Every rule tried, in order; the last one is the one that matched.
    pub trace: Vec<RuleTrace>,
}

impl Decision {
    pub(crate) fn new(
        action: Action,
        rule: impl Into<String>,
        reason: impl Into<String>,
        trace: Vec<RuleTrace>,
    ) -> Self {
        Self {
            action,
            rule: rule.into(),
            reason: reason.into(),
            exempt: action.exempt(),
            recheck_at: None,
            grace: None,
            guard: None,
            trace,
        }
    }

    /// A guard holds back this (deactivating) decision: nothing changes.
    pub(crate) fn hold(&mut self, guard: Guard, why: String) {
        self.reason = format!("rule \"{}\" wants deactivate, but {why}", self.rule);
        self.action = Action::Ignore;
        self.exempt = None;
        self.grace = None;
        self.guard = Some(guard);
        self.rule = guard.rule_name();
    }

    /// The multi-line explanation printed by `flagrelay policy explain`.
    pub fn render_explanation(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "decision:  {} (by {})",
            self.action.as_str(),
            self.rule
        );
        let _ = writeln!(out, "why:       {}", self.reason);
        let exempt = match self.exempt {
            Some(true) => "required: keep the user on Proofpoint's Azure-sync exemption list",
            Some(false) => "not required by policy (remove it only if flagrelay added it)",
            None => "leave the exemption list as it is",
        };
        let _ = writeln!(out, "exemption: {exempt}");
        if let Some(g) = &self.grace {
            let from = match g.from {
                GraceStart::LeaveDate => "the leave date",
                GraceStart::DisabledSince => "when the account was first seen disabled",
                GraceStart::Now => "now (start unknown)",
            };
            let _ = writeln!(
                out,
                "grace:     from {from} {} until {}",
                stamp(g.started),
                stamp(g.until)
            );
        }
        if let Some(at) = self.recheck_at {
            let _ = writeln!(out, "recheck:   at {}", stamp(at));
        }
        let _ = writeln!(out, "rules tried, in order:");
        for t in &self.trace {
            let line = t.line.map(|l| format!(" (line {l})")).unwrap_or_default();
            let verdict = match t.matched {
                Truth::True => "matched",
                Truth::False => "no match",
                Truth::Unknown => "unknown, so no match",
            };
            let _ = writeln!(out, "  {} {}{line}: {verdict}", t.matched.mark(), t.rule);
            if t.checks.is_empty() {
                let _ = writeln!(out, "      (no condition: the default rule)");
            }
            for c in &t.checks {
                render_check(&mut out, c, 3);
            }
        }
        out
    }
}

fn render_check(out: &mut String, c: &Check, depth: usize) {
    let _ = writeln!(
        out,
        "{:width$}{} {}",
        "",
        c.truth.mark(),
        c.text,
        width = depth * 2
    );
    for child in &c.children {
        render_check(out, child, depth + 1);
    }
}

pub(crate) fn stamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// One line: `deactivate (by leavers): <reason>`.
impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (by {}): {}",
            self.action.as_str(),
            self.rule,
            self.reason
        )
    }
}
