//! [`RulePolicy`]: the declarative engine. Rules are tried in order, first match wins;
//! conditions are evaluated in three-valued logic with a trace; then the guards and the grace
//! period of the winning rule apply. See the module docs of [`crate::policy`] for semantics.

use std::path::Path;

use chrono::{DateTime, Utc};

use super::breaker::BreakerConfig;
use super::decision::{Check, Decision, Grace, GraceStart, RuleTrace, Truth, stamp};
use super::fact::{Fact, Value};
use super::file::{self, PolicyError};
use super::matcher::Matcher;
use super::{Action, Facts, Guard, Needs, Policy, guard_reason, protected_by};

/// A compiled condition.
#[derive(Debug, Clone)]
pub(crate) enum Cond {
    All(Vec<Cond>),
    Any(Vec<Cond>),
    Not(Box<Cond>),
    Test { fact: Fact, matcher: Matcher },
}

/// A compiled rule.
#[derive(Debug, Clone)]
pub(crate) struct Rule {
    pub(crate) name: String,
    pub(crate) description: Option<String>,
    /// `None`: the default rule.
    pub(crate) when: Option<Cond>,
    pub(crate) action: Action,
    /// `deactivate_after`, and the text as written for explanations.
    pub(crate) grace: Option<(chrono::Duration, String)>,
    pub(crate) overrides: Vec<Guard>,
    pub(crate) line: usize,
}

/// A policy loaded from a TOML policy file (see `examples/policy.toml`).
#[derive(Debug, Clone)]
pub struct RulePolicy {
    source: String,
    rules: Vec<Rule>,
    needs: Needs,
    breaker: BreakerConfig,
}

impl RulePolicy {
    /// Parse and compile a policy. `source_name` (usually the file name) prefixes errors.
    pub fn from_toml_str(text: &str, source_name: &str) -> Result<Self, PolicyError> {
        file::parse(text, source_name)
    }

    /// Read and compile a policy file: the only IO in this module.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, PolicyError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    pub(crate) fn new(source: &str, rules: Vec<Rule>, breaker: BreakerConfig) -> Self {
        let mut needs = Needs::default();
        for r in &rules {
            if let Some(c) = &r.when {
                c.visit(&mut |f| needs.merge(f.needs()));
            }
            needs.exemptions |= r.action == Action::KeepMailFlowing;
        }
        Self {
            source: source.to_owned(),
            rules,
            needs,
            breaker,
        }
    }

    /// Where the policy came from (the file name given when loading).
    pub fn source_name(&self) -> &str {
        &self.source
    }

    /// Rule names, in evaluation order.
    pub fn rule_names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.name.as_str())
    }
}

impl Policy for RulePolicy {
    fn decide(&self, facts: &Facts<'_>, now: DateTime<Utc>) -> Decision {
        let mut ev = Eval {
            facts,
            now,
            flips: Vec::new(),
            unavailable: Vec::new(),
        };
        let mut trace = Vec::new();
        let mut unknown = Vec::new();
        let mut winner = None;
        for rule in &self.rules {
            ev.unavailable.clear();
            let checks: Vec<Check> = rule.when.iter().map(|c| c.eval(&mut ev)).collect();
            let matched = checks.first().map_or(Truth::True, |c| c.truth);
            if matched == Truth::Unknown {
                ev.unavailable.dedup();
                unknown.push(format!(
                    "rule \"{}\": {}",
                    rule.name,
                    ev.unavailable.join(", ")
                ));
            }
            trace.push(RuleTrace {
                rule: rule.name.clone(),
                line: Some(rule.line),
                matched,
                checks,
            });
            if matched == Truth::True {
                winner = Some(rule);
                break;
            }
        }
        let rule = winner.expect("parsing guarantees a last rule without a condition");
        let reason = match (
            &rule.description,
            trace.last().and_then(|t| t.checks.first()),
        ) {
            (Some(d), _) => d.clone(),
            (None, Some(check)) => format!("rule \"{}\" matched: {}", rule.name, summary(check)),
            (None, None) => format!(
                "no earlier rule matched; the default rule \"{}\" says {}",
                rule.name,
                rule.action.as_str()
            ),
        };
        let mut d = Decision::new(rule.action, &rule.name, reason, trace);
        if rule.action == Action::Deactivate {
            deactivate(&mut d, rule, facts, now, &unknown, &mut ev.flips);
        }
        d.recheck_at = ev.flips.into_iter().filter(|t| *t > now).min();
        d
    }

    fn needs(&self) -> Needs {
        self.needs
    }

    fn breaker(&self) -> BreakerConfig {
        self.breaker
    }
}

/// Apply the guards, then the grace period, to a winning `deactivate` rule.
fn deactivate(
    d: &mut Decision,
    rule: &Rule,
    facts: &Facts<'_>,
    now: DateTime<Utc>,
    unknown: &[String],
    flips: &mut Vec<DateTime<Utc>>,
) {
    let incomplete = (!unknown.is_empty()).then_some(Guard::IncompleteFacts);
    if let Some(g) = [protected_by(facts.proofpoint), incomplete]
        .into_iter()
        .flatten()
        .find(|g| !rule.overrides.contains(g))
    {
        d.hold(g, guard_reason(g, facts.proofpoint, &unknown.join("; ")));
        return;
    }
    let Some((grace, grace_text)) = &rule.grace else {
        return;
    };
    let leave = facts.leave_date_fetched
        && rule
            .when
            .as_ref()
            .is_some_and(|c| c.mentions(Fact::EmployeeLeaveDateTime));
    let (from, started, since) = match (
        leave
            .then_some(facts.user.employee_leave_date_time)
            .flatten(),
        facts.disabled_since,
    ) {
        (Some(t), _) => (GraceStart::LeaveDate, t, "the leave date"),
        (None, Some(t)) => (
            GraceStart::DisabledSince,
            t,
            "the account was first seen disabled",
        ),
        (None, None) => (
            GraceStart::Now,
            now,
            "now (no leave date or disable time known)",
        ),
    };
    let until = started
        .checked_add_signed(*grace)
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    d.grace = Some(Grace {
        from,
        started,
        until,
    });
    if now < until {
        d.action = Action::Ignore;
        d.exempt = None;
        d.reason = format!(
            "{}; in the {grace_text} grace period since {since} ({}): nothing is deactivated before {}",
            d.reason,
            stamp(started),
            stamp(until)
        );
        flips.push(until);
    } else {
        d.reason = format!(
            "{}; the {grace_text} grace period since {since} ({}) ended at {}",
            d.reason,
            stamp(started),
            stamp(until)
        );
    }
}

/// The checks that made a condition come out as it did, as one line.
fn summary(c: &Check) -> String {
    match c.text.as_str() {
        "not" => format!(
            "not ({})",
            c.children
                .iter()
                .map(summary)
                .collect::<Vec<_>>()
                .join("; ")
        ),
        _ if c.children.is_empty() => c.text.clone(),
        _ => c
            .children
            .iter()
            .filter(|k| k.truth == c.truth)
            .map(summary)
            .collect::<Vec<_>>()
            .join("; "),
    }
}

struct Eval<'e, 'a> {
    facts: &'e Facts<'a>,
    now: DateTime<Utc>,
    /// Instants at which a time comparison evaluated so far would flip.
    flips: Vec<DateTime<Utc>>,
    /// Why facts were unavailable in the rule being evaluated.
    unavailable: Vec<&'static str>,
}

impl Cond {
    fn eval(&self, ev: &mut Eval<'_, '_>) -> Check {
        let combine = |text: &str, children: Vec<Check>, truth: fn(Vec<Truth>) -> Truth| Check {
            truth: truth(children.iter().map(|c| c.truth).collect()),
            text: text.into(),
            children,
        };
        match self {
            Cond::Test { fact, matcher } => {
                let value = fact.value(ev.facts);
                if let Value::Unavailable(why) = value {
                    ev.unavailable.push(why);
                }
                let (truth, text, flip) = matcher.eval(&fact.name(), &value, ev.now);
                ev.flips.extend(flip);
                Check::leaf(truth, text)
            }
            Cond::All(parts) => combine(
                "all of",
                parts.iter().map(|p| p.eval(ev)).collect(),
                Truth::all,
            ),
            Cond::Any(parts) => combine(
                "any of",
                parts.iter().map(|p| p.eval(ev)).collect(),
                Truth::any,
            ),
            Cond::Not(part) => {
                let child = part.eval(ev);
                Check {
                    truth: !child.truth,
                    text: "not".into(),
                    children: vec![child],
                }
            }
        }
    }

    /// Call `f` for every fact the condition names.
    fn visit(&self, f: &mut impl FnMut(Fact)) {
        match self {
            Cond::All(parts) | Cond::Any(parts) => parts.iter().for_each(|p| p.visit(f)),
            Cond::Not(part) => part.visit(f),
            Cond::Test { fact, .. } => f(*fact),
        }
    }

    fn mentions(&self, fact: Fact) -> bool {
        let mut found = false;
        self.visit(&mut |f| found |= f == fact);
        found
    }
}
