//! Each fact and each matcher, the combinators, and facts that were not fetched: a one-rule
//! policy `hit` (activate) before a default that deactivates. So a true condition gives
//! `activate by hit`, a false one `deactivate by default`, and an unknown one is held back by
//! the incomplete-facts guard. Each row also names a fragment the trace must contain.

use super::{U, check, days};
use crate::policy::Check;

const T: &str = "activate by hit";
const F: &str = "deactivate by default";
const UNKNOWN: &str = "ignore by guard:incomplete_facts";

type Row = (&'static str, fn(&mut U), &'static str, &'static str);

fn same(_: &mut U) {}

fn run(rows: &[Row]) {
    for (cond, tweak, expect, fragment) in rows {
        let policy = format!(
            "[[rule]]\nname = \"hit\"\nwhen = {cond}\naction = \"activate\"\n\n\
             [[rule]]\nname = \"default\"\naction = \"deactivate\"\n"
        );
        let d = check(&policy, tweak, expect).unwrap();
        let text = d.trace[0]
            .checks
            .iter()
            .map(all_text)
            .collect::<Vec<_>>()
            .join(" | ");
        assert!(
            text.contains(fragment),
            "{cond}: trace `{text}` lacks `{fragment}`"
        );
    }
}

fn all_text(c: &Check) -> String {
    std::iter::once(c.text.clone())
        .chain(c.children.iter().map(all_text))
        .collect::<Vec<_>>()
        .join(" | ")
}

#[test]
fn identity_and_directory_facts() {
    run(&[
        (
            "{ account_enabled = true }",
            same,
            T,
            "account_enabled is true",
        ),
        (
            "{ account_enabled = false }",
            same,
            F,
            "account_enabled is true, wanted false",
        ),
        (
            "{ account_enabled = { equals = false } }",
            |u| u.disabled(),
            T,
            "account_enabled is false",
        ),
        (
            "{ account_enabled = false }",
            |u| u.graph.account_enabled = None,
            UNKNOWN,
            "Graph did not return accountEnabled",
        ),
        (
            "{ user_principal_name = \"ALICE@contoso.com\" }",
            same,
            T,
            "user_principal_name = \"alice@contoso.com\"",
        ),
        (
            "{ upn_domain = \"contoso.com\" }",
            same,
            T,
            "upn_domain = \"contoso.com\"",
        ),
        (
            "{ mail = { glob = \"*@contoso.com\" } }",
            same,
            T,
            "matches glob \"*@contoso.com\"",
        ),
        (
            "{ mail = { glob = \"alice@*.org\" } }",
            same,
            F,
            "does not match glob",
        ),
        (
            "{ mail = { glob = \"al?ce@contoso.com\" } }",
            same,
            T,
            "matches glob",
        ),
        (
            "{ mail_domain = \"fabrikam.com\" }",
            same,
            F,
            "mail_domain = \"Contoso.com\" ≠ \"fabrikam.com\"",
        ),
        (
            "{ mail = { exists = true } }",
            |u| u.graph.mail = None,
            F,
            "mail is absent, wanted present",
        ),
        (
            "{ mail = { exists = false } }",
            |u| u.graph.mail = None,
            T,
            "mail is absent",
        ),
        (
            "{ mail_domain = \"contoso.com\" }",
            |u| u.graph.mail = None,
            F,
            "mail_domain is absent, wanted = \"contoso.com\"",
        ),
        (
            "{ user_type = \"Guest\" }",
            same,
            F,
            "user_type = \"Member\" ≠ \"Guest\"",
        ),
        (
            "{ user_type = \"member\" }",
            same,
            T,
            "user_type = \"Member\"",
        ),
        (
            "{ department = \"Sales\" }",
            same,
            T,
            "department = \"Sales\"",
        ),
        (
            "{ department = \"Sales\" }",
            |u| u.graph.department = None,
            F,
            "department is absent, wanted = \"Sales\"",
        ),
        (
            "{ company_name = { regex = \"^Con\" } }",
            same,
            T,
            "matches regex /^Con/",
        ),
        (
            "{ company_name = { regex = \"^con\" } }",
            same,
            F,
            "does not match regex /^con/",
        ),
        (
            "{ company_name = { regex = \"(?i)^con\" } }",
            same,
            T,
            "matches regex",
        ),
        (
            "{ company_name = { regex = \"tos\" } }",
            same,
            T,
            "matches regex /tos/",
        ),
        (
            "{ employee_type = { one_of = [\"Contractor\", \"Vendor\"] } }",
            same,
            F,
            "employee_type = \"Employee\" ∉ [Contractor, Vendor]",
        ),
        (
            "{ employee_type = { one_of = [\"Contractor\", \"employee\"] } }",
            same,
            T,
            "∈ [Contractor, employee]",
        ),
        (
            "{ extension_attribute1 = \"hold\" }",
            same,
            T,
            "extension_attribute1 = \"hold\"",
        ),
        (
            "{ extension_attribute2 = { exists = true } }",
            same,
            F,
            "extension_attribute2 is absent, wanted present",
        ),
        (
            "{ extension_attribute15 = { exists = false } }",
            same,
            T,
            "extension_attribute15 is absent",
        ),
        (
            "{ extension_attribute1 = \"hold\" }",
            |u| u.graph.on_premises_extension_attributes = None,
            F,
            "absent",
        ),
    ]);
}

#[test]
fn proxy_address_lists() {
    run(&[
        (
            "{ proxy_addresses = \"alice@fabrikam.com\" }",
            same,
            T,
            "proxy_addresses has \"alice@fabrikam.com\"",
        ),
        (
            "{ proxy_domains = { one_of = [\"fabrikam.com\"] } }",
            same,
            T,
            "proxy_domains has \"fabrikam.com\" ∈ [fabrikam.com]",
        ),
        (
            "{ proxy_domains = { glob = \"*.example\" } }",
            same,
            F,
            "none matches glob \"*.example\"",
        ),
        // Only SMTP addresses count: the SIP entry is not an address.
        (
            "{ proxy_addresses = { glob = \"sip*\" } }",
            same,
            F,
            "none matches glob",
        ),
        (
            "{ proxy_addresses = { regex = \"^alice@\" } }",
            same,
            T,
            "matches regex",
        ),
        (
            "{ proxy_addresses = { exists = true } }",
            |u| u.graph.proxy_addresses = None,
            F,
            "proxy_addresses is empty, wanted present",
        ),
        (
            "{ proxy_domains = \"contoso.com\" }",
            |u| u.graph.proxy_addresses = Some(vec![]),
            F,
            "proxy_domains is empty",
        ),
    ]);
}

#[test]
fn leave_date_before_after_and_exists() {
    run(&[
        (
            "{ employee_leave_date_time = { exists = true } }",
            same,
            F,
            "employee_leave_date_time is absent, wanted present",
        ),
        (
            "{ employee_leave_date_time = { exists = false } }",
            same,
            T,
            "employee_leave_date_time is absent",
        ),
        (
            "{ employee_leave_date_time = { exists = true } }",
            |u| u.leave(days(-1)),
            T,
            "is present",
        ),
        (
            "{ employee_leave_date_time = { before = \"now\" } }",
            |u| u.leave(days(-1)),
            T,
            "2026-02-28T12:00:00Z is before now",
        ),
        (
            "{ employee_leave_date_time = { before = \"now\" } }",
            same,
            F,
            "employee_leave_date_time is absent, wanted before now",
        ),
        // Not yet: false now, and a recheck when the leave date passes.
        (
            "{ employee_leave_date_time = { before = \"now\" } }",
            |u| u.leave(days(1)),
            "deactivate by default recheck=2026-03-02T12:00:00Z",
            "is not before now",
        ),
        (
            "{ employee_leave_date_time = { before = \"7d ago\" } }",
            |u| u.leave(days(-8)),
            T,
            "is before 7d ago (2026-02-22T12:00:00Z)",
        ),
        (
            "{ employee_leave_date_time = { before = \"7d ago\" } }",
            |u| u.leave(days(-6)),
            "deactivate by default recheck=2026-03-02T12:00:00Z",
            "is not before 7d ago",
        ),
        // Boundaries: `before` includes the instant, `after` does not.
        (
            "{ employee_leave_date_time = { before = \"7d ago\" } }",
            |u| u.leave(days(-7)),
            T,
            "is before 7d ago",
        ),
        (
            "{ employee_leave_date_time = { after = \"7d ago\" } }",
            |u| u.leave(days(-7)),
            F,
            "is not after 7d ago",
        ),
        (
            "{ employee_leave_date_time = { after = \"now\" } }",
            |u| u.leave(days(3)),
            "activate by hit recheck=2026-03-04T12:00:00Z",
            "is after now",
        ),
        (
            "{ employee_leave_date_time = { after = \"in 30d\" } }",
            |u| u.leave(days(10)),
            F,
            "is not after in 30d",
        ),
        (
            "{ employee_leave_date_time = { before = \"2026-01-01T00:00:00Z\" } }",
            |u| u.graph.employee_leave_date_time = Some("2025-12-31T00:00:00Z".parse().unwrap()),
            T,
            "is before 2026-01-01T00:00:00Z",
        ),
        // Not fetched: unknown, including `exists` either way.
        (
            "{ employee_leave_date_time = { before = \"now\" } }",
            |u| u.leave_fetched = false,
            UNKNOWN,
            "employeeLeaveDateTime not fetched",
        ),
        (
            "{ employee_leave_date_time = { exists = false } }",
            |u| u.leave_fetched = false,
            UNKNOWN,
            "unknown",
        ),
    ]);
}

#[test]
fn groups_mailbox_purpose_and_proofpoint_state() {
    run(&[
        (
            "{ member_of = \"g-sales\" }",
            same,
            T,
            "member_of: group \"All Sales\" (g-sales) = \"g-sales\"",
        ),
        (
            "{ member_of = \"all sales\" }",
            same,
            T,
            "group \"All Sales\"",
        ),
        (
            "{ member_of = { glob = \"*hold*\" } }",
            same,
            F,
            "none of the user's 1 groups matches glob",
        ),
        (
            "{ member_of = \"g-sales\" }",
            |u| u.groups = Some(vec![]),
            F,
            "the user is in no groups",
        ),
        (
            "{ member_of = \"g-sales\" }",
            |u| u.groups = None,
            UNKNOWN,
            "member_of: unknown (group membership not fetched)",
        ),
        (
            "{ mailbox_purpose = { one_of = [\"shared\", \"room\", \"equipment\"] } }",
            |u| u.mailbox = Some("shared".into()),
            T,
            "mailbox_purpose = \"shared\" ∈ [shared, room, equipment]",
        ),
        (
            "{ mailbox_purpose = { one_of = [\"shared\", \"room\", \"equipment\"] } }",
            same,
            F,
            "mailbox_purpose = \"user\" ∉ [shared, room, equipment]",
        ),
        (
            "{ mailbox_purpose = \"shared\" }",
            |u| u.mailbox = None,
            UNKNOWN,
            "mailbox settings not fetched",
        ),
        (
            "{ proofpoint_type = \"end_user\" }",
            same,
            T,
            "proofpoint_type = \"end_user\"",
        ),
        (
            "{ proofpoint_active = false }",
            same,
            F,
            "proofpoint_active is true, wanted false",
        ),
        (
            "{ proofpoint_exempt = true }",
            |u| u.exempt = Some(true),
            T,
            "proofpoint_exempt is true",
        ),
        (
            "{ proofpoint_exempt = true }",
            |u| u.exempt = None,
            UNKNOWN,
            "exemption list not fetched",
        ),
    ]);
}

#[test]
fn all_any_not_in_three_valued_logic() {
    let no_mailbox = |u: &mut U| u.mailbox = None;
    run(&[
        (
            "{ all = [{ account_enabled = true }, { department = \"Sales\" }] }",
            same,
            T,
            "all of",
        ),
        (
            "{ all = [{ account_enabled = true }, { department = \"HR\" }] }",
            same,
            F,
            "department = \"Sales\" ≠ \"HR\"",
        ),
        (
            "{ account_enabled = true, department = \"HR\" }",
            same,
            F,
            "all of",
        ),
        (
            "{ any = [{ department = \"HR\" }, { department = \"Sales\" }] }",
            same,
            T,
            "any of",
        ),
        (
            "{ any = [{ department = \"HR\" }, { department = \"IT\" }] }",
            same,
            F,
            "any of",
        ),
        // Unknown parts: false wins in `all`, true wins in `any`, otherwise unknown.
        (
            "{ any = [{ department = \"HR\" }, { mailbox_purpose = \"shared\" }] }",
            no_mailbox,
            UNKNOWN,
            "mailbox settings not fetched",
        ),
        (
            "{ any = [{ department = \"Sales\" }, { mailbox_purpose = \"shared\" }] }",
            no_mailbox,
            T,
            "any of",
        ),
        (
            "{ all = [{ department = \"HR\" }, { mailbox_purpose = \"shared\" }] }",
            no_mailbox,
            F,
            "all of",
        ),
        (
            "{ all = [{ department = \"Sales\" }, { mailbox_purpose = \"shared\" }] }",
            no_mailbox,
            UNKNOWN,
            "all of",
        ),
        ("{ not = { department = \"HR\" } }", same, T, "not"),
        ("{ not = { department = \"Sales\" } }", same, F, "not"),
        (
            "{ not = { mailbox_purpose = \"shared\" } }",
            no_mailbox,
            UNKNOWN,
            "not",
        ),
        (
            "{ not = { mailbox_purpose = { exists = true } } }",
            no_mailbox,
            UNKNOWN,
            "unknown",
        ),
        (
            "{ any = [{ not = { department = \"HR\" } }, { all = [{ account_enabled = false }] }] }",
            same,
            T,
            "any of",
        ),
    ]);
}
