//! Table-driven tests of the policy engine. Every engine and parsing case goes through one
//! [`check`]: a policy text, a tweak to a standard user, and the expected decision in brief
//! (`"activate by enabled"`, `"ignore by leavers recheck=…"`, `"error: policy.toml:3: …"`).

mod breaker;
mod conditions;
mod example;
mod parse;
mod rules;

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};

use super::decision::stamp;
use super::{Decision, Facts, Group, Policy, RulePolicy};
use crate::graph::GraphUser;
use crate::proofpoint::PpUser;

/// The `now` every case runs at unless it says otherwise.
pub(super) fn now() -> DateTime<Utc> {
    "2026-03-01T12:00:00Z".parse().unwrap()
}

pub(super) fn days(n: i64) -> Duration {
    Duration::days(n)
}

/// Everything a case can vary: the user as Graph and Proofpoint see it, what was fetched, and
/// the time of evaluation.
#[derive(Debug, Clone)]
pub(super) struct U {
    pub graph: GraphUser,
    pub pp: PpUser,
    pub groups: Option<Vec<Group>>,
    pub mailbox: Option<String>,
    pub leave_fetched: bool,
    pub exempt: Option<bool>,
    pub disabled_since: Option<DateTime<Utc>>,
    pub now: DateTime<Utc>,
}

impl Default for U {
    /// An ordinary, enabled employee, with every optional fact fetched.
    fn default() -> Self {
        let ext = BTreeMap::from([
            ("extensionAttribute1".to_owned(), Some("hold".to_owned())),
            ("extensionAttribute2".to_owned(), None),
        ]);
        Self {
            graph: GraphUser {
                id: "u1".into(),
                account_enabled: Some(true),
                user_principal_name: Some("alice@contoso.com".into()),
                mail: Some("Alice@Contoso.com".into()),
                proxy_addresses: Some(vec![
                    "SMTP:alice@contoso.com".into(),
                    "smtp:alice@fabrikam.com".into(),
                    "SIP:alice@contoso.com".into(),
                    "X500:/o=Contoso/cn=alice".into(),
                ]),
                user_type: Some("Member".into()),
                department: Some("Sales".into()),
                company_name: Some("Contoso".into()),
                employee_type: Some("Employee".into()),
                employee_leave_date_time: None,
                on_premises_extension_attributes: Some(ext),
            },
            pp: PpUser {
                primary_email: "alice@contoso.com".into(),
                user_type: Some("end_user".into()),
                is_active: true,
                other: Default::default(),
            },
            groups: Some(vec![Group {
                id: "g-sales".into(),
                display_name: Some("All Sales".into()),
            }]),
            mailbox: Some("user".into()),
            leave_fetched: true,
            exempt: Some(false),
            disabled_since: None,
            now: now(),
        }
    }
}

impl U {
    pub fn facts(&self) -> Facts<'_> {
        let mut f = Facts::new(&self.graph, &self.pp);
        f.groups = self.groups.as_deref();
        f.mailbox_purpose = self.mailbox.as_deref();
        f.leave_date_fetched = self.leave_fetched;
        f.exempt = self.exempt;
        f.disabled_since = self.disabled_since;
        f
    }

    pub fn disabled(&mut self) {
        self.graph.account_enabled = Some(false);
    }

    pub fn leave(&mut self, offset: Duration) {
        self.graph.employee_leave_date_time = Some(self.now + offset);
    }
}

/// `"<action> by <rule>"`, plus ` recheck=<time>` when the decision asks for one.
pub(super) fn brief(d: &Decision) -> String {
    let mut s = format!("{} by {}", d.action.as_str(), d.rule);
    if let Some(at) = d.recheck_at {
        s.push_str(&format!(" recheck={}", stamp(at)));
    }
    s
}

/// The one helper: parse `policy` (as `policy.toml`), decide for the standard user changed by
/// `tweak`, and compare with `expect`. A policy that does not parse gives
/// `"error: <message>"`, compared as a prefix (library error texts may go on).
pub(super) fn check(policy: &str, tweak: impl FnOnce(&mut U), expect: &str) -> Option<Decision> {
    let got = match RulePolicy::from_toml_str(policy, "policy.toml") {
        Err(e) => {
            let msg = format!("error: {e}");
            assert!(
                expect.starts_with("error: ") && msg.starts_with(expect),
                "\n{policy}\nexpected: {expect}\n     got: {msg}\n"
            );
            return None;
        }
        Ok(p) => {
            let mut u = U::default();
            tweak(&mut u);
            p.decide(&u.facts(), u.now)
        }
    };
    assert_eq!(
        brief(&got),
        expect,
        "\n{policy}\n{}",
        got.render_explanation()
    );
    Some(got)
}

/// `now + offset` as the brief prints it.
pub(super) fn at(offset: Duration) -> String {
    stamp(now() + offset)
}
