//! Rule order, the default rule, the guards and their overrides, grace periods, exemptions,
//! rechecks, needs, explanations, and the built-in mirror policy.

use super::{U, at, check, days, now};
use crate::policy::{
    Action, Facts, GraceStart, Guard, MirrorPolicy, Needs, Policy, RulePolicy, Truth,
};

const ORDER: &str = r#"
[[rule]]
name = "sales"
when = { department = "Sales" }
action = "keep_mail_flowing"

[[rule]]
name = "enabled"
when = { account_enabled = true }
action = "activate"

[[rule]]
name = "default"
action = "deactivate"
"#;

#[test]
fn first_match_wins_and_the_default_catches_the_rest() {
    let d = check(ORDER, |_| {}, "keep_mail_flowing by sales").unwrap();
    assert_eq!(d.trace.len(), 1, "rules after the winner are not tried");
    let d = check(
        ORDER,
        |u| u.graph.department = Some("HR".into()),
        "activate by enabled",
    )
    .unwrap();
    assert_eq!(
        d.trace.iter().map(|t| t.matched).collect::<Vec<_>>(),
        [Truth::False, Truth::True]
    );
    let d = check(
        ORDER,
        |u| {
            u.graph.department = None;
            u.disabled()
        },
        "deactivate by default",
    )
    .unwrap();
    assert_eq!(d.trace.len(), 3);
    assert!(d.trace[2].checks.is_empty());
    assert_eq!(
        d.reason,
        "no earlier rule matched; the default rule \"default\" says deactivate"
    );
    assert_eq!(
        d.trace.iter().map(|t| t.line).collect::<Vec<_>>(),
        [Some(2), Some(7), Some(12)]
    );
}

const GUARDED: &str = r#"
[[rule]]
name = "leaver"
when = { department = "Former" }
action = "deactivate"
override_guards = ["functional_account"]

[[rule]]
name = "boss"
when = { department = "Board" }
action = "deactivate"
override_guards = ["admin", "functional_account"]

[[rule]]
name = "enabled"
when = { account_enabled = true }
action = "activate"

[[rule]]
name = "default"
action = "deactivate"
"#;

#[test]
fn guards_hold_deactivation_unless_a_rule_lifts_them() {
    let pp = |t: &'static str| {
        move |u: &mut U| {
            u.disabled();
            u.pp.user_type = Some(t.into())
        }
    };
    let cases: &[(&str, &str, &str)] = &[
        ("end_user", "Sales", "deactivate by default"),
        ("organization_admin", "Sales", "ignore by guard:admin"),
        ("channel_admin", "Sales", "ignore by guard:admin"),
        (
            "functional_account",
            "Sales",
            "ignore by guard:functional_account",
        ),
        ("functional_account", "Former", "deactivate by leaver"),
        ("organization_admin", "Former", "ignore by guard:admin"),
        ("strategic_partner_admin", "Board", "deactivate by boss"),
    ];
    for (pp_type, dept, expect) in cases {
        let d = check(
            GUARDED,
            |u| {
                pp(pp_type)(u);
                u.graph.department = Some((*dept).into())
            },
            expect,
        )
        .unwrap();
        if expect.contains("guard") {
            assert_eq!(d.exempt, None, "a held decision leaves exemptions alone");
            assert!(d.reason.contains("wants deactivate, but"), "{}", d.reason);
            assert!(d.guard.is_some());
        }
    }
    // Guards only stop deactivation.
    check(
        GUARDED,
        |u| u.pp.user_type = Some("organization_admin".into()),
        "activate by enabled",
    );
}

const HOLD: &str = r#"
[[rule]]
name = "hold"
when = { member_of = "g-hold" }
action = "keep_mail_flowing"

[[rule]]
name = "enabled"
when = { account_enabled = true }
action = "activate"

[[rule]]
name = "default"
action = "deactivate"
"#;

#[test]
fn unknown_facts_never_lead_to_deactivation() {
    let no_groups = |u: &mut U| u.groups = None;
    // Unknown above an activation: activation goes ahead (mail keeps flowing either way).
    let d = check(HOLD, no_groups, "activate by enabled").unwrap();
    assert_eq!(d.trace[0].matched, Truth::Unknown);
    // Unknown above a deactivation: held, and the reason says what was missing.
    let d = check(
        HOLD,
        |u| {
            no_groups(u);
            u.disabled()
        },
        "ignore by guard:incomplete_facts",
    )
    .unwrap();
    assert_eq!(d.guard, Some(Guard::IncompleteFacts));
    assert!(
        d.reason
            .contains("rule \"hold\": group membership not fetched"),
        "{}",
        d.reason
    );
    // With the facts fetched, the same user is deactivated.
    check(HOLD, |u| u.disabled(), "deactivate by default");
    // An explicit override lets the deactivation through.
    let lifted = HOLD.replace(
        "name = \"default\"\naction = \"deactivate\"",
        "name = \"default\"\naction = \"deactivate\"\noverride_guards = [\"incomplete_facts\"]",
    );
    check(
        &lifted,
        |u| {
            no_groups(u);
            u.disabled()
        },
        "deactivate by default",
    );
}

const LEAVERS: &str = r#"
[[rule]]
name = "leavers"
when.all = [
    { account_enabled = false },
    { employee_leave_date_time = { before = "now" } },
]
action = "deactivate"
deactivate_after = "7d"

[[rule]]
name = "enabled"
when = { account_enabled = true }
action = "activate"

[[rule]]
name = "default"
action = "deactivate"
"#;

#[test]
fn grace_from_the_leave_date() {
    let in_grace = format!("ignore by leavers recheck={}", at(days(4)));
    let d = check(
        LEAVERS,
        |u| {
            u.disabled();
            u.leave(-days(3))
        },
        &in_grace,
    )
    .unwrap();
    let g = d.grace.unwrap();
    assert_eq!(
        (g.from, g.started, g.until),
        (GraceStart::LeaveDate, now() - days(3), now() + days(4))
    );
    assert_eq!(d.exempt, None);
    assert!(
        d.reason
            .contains("in the 7d grace period since the leave date"),
        "{}",
        d.reason
    );
    // The leave date wins over disabled_since when the rule names it.
    check(
        LEAVERS,
        |u| {
            u.disabled();
            u.leave(-days(3));
            u.disabled_since = Some(now() - days(30))
        },
        &in_grace,
    );
    // Exactly at the end of the grace period, and after it.
    check(
        LEAVERS,
        |u| {
            u.disabled();
            u.leave(-days(7))
        },
        "deactivate by leavers",
    );
    let d = check(
        LEAVERS,
        |u| {
            u.disabled();
            u.leave(-days(10))
        },
        "deactivate by leavers",
    )
    .unwrap();
    assert!(
        d.reason.contains("grace period since the leave date"),
        "{}",
        d.reason
    );
    assert_eq!(d.exempt, Some(false));
    // Re-enabled during the grace period: activated.
    check(LEAVERS, |u| u.leave(-days(3)), "activate by enabled");
    // Leave date still ahead: not a leaver yet; recheck when it passes.
    check(
        LEAVERS,
        |u| {
            u.disabled();
            u.leave(days(2))
        },
        &format!("deactivate by default recheck={}", at(days(2))),
    );
}

const DISABLED: &str = r#"
[[rule]]
name = "disabled"
when = { account_enabled = false }
action = "deactivate"
deactivate_after = "2d"

[[rule]]
name = "default"
action = "activate"
"#;

#[test]
fn grace_from_disabled_since_or_from_now() {
    let d = check(
        DISABLED,
        |u| {
            u.disabled();
            u.disabled_since = Some(now() - days(1))
        },
        &format!("ignore by disabled recheck={}", at(days(1))),
    )
    .unwrap();
    assert_eq!(d.grace.unwrap().from, GraceStart::DisabledSince);
    check(
        DISABLED,
        |u| {
            u.disabled();
            u.disabled_since = Some(now() - days(3))
        },
        "deactivate by disabled",
    );
    // Start unknown: the grace starts now, and the decision says so.
    let d = check(
        DISABLED,
        |u| u.disabled(),
        &format!("ignore by disabled recheck={}", at(days(2))),
    )
    .unwrap();
    assert_eq!(d.grace.unwrap().from, GraceStart::Now);
    // A leave date the rule does not name does not start the grace.
    let d = check(
        DISABLED,
        |u| {
            u.disabled();
            u.leave(-days(30));
            u.disabled_since = Some(now() - days(1))
        },
        &format!("ignore by disabled recheck={}", at(days(1))),
    )
    .unwrap();
    assert_eq!(d.grace.unwrap().from, GraceStart::DisabledSince);
    // Guards come before the grace: no grace, no recheck.
    check(
        DISABLED,
        |u| {
            u.disabled();
            u.pp.user_type = Some("functional_account".into())
        },
        "ignore by guard:functional_account",
    );
    // Re-enabled: activated.
    check(
        DISABLED,
        |u| u.disabled_since = Some(now() - days(1)),
        "activate by default",
    );
}

#[test]
fn exemption_requirement_follows_the_action() {
    let policy = |action: &str| format!("[[rule]]\nname = \"all\"\naction = \"{action}\"\n");
    let cases = [
        (Action::KeepMailFlowing, Some(true)),
        (Action::Activate, Some(false)),
        (Action::Deactivate, Some(false)),
        (Action::Ignore, None),
    ];
    for (action, exempt) in cases {
        let d = check(
            &policy(action.as_str()),
            |_| {},
            &format!("{} by all", action.as_str()),
        )
        .unwrap();
        assert_eq!(d.exempt, exempt, "{action:?}");
        assert_eq!(d.action.desired_active(), action.desired_active());
    }
    assert_eq!(Action::KeepMailFlowing.desired_active(), Some(true));
}

#[test]
fn needs_report_what_the_rules_name() {
    let needs = |text: &str| RulePolicy::from_toml_str(text, "p").unwrap().needs();
    assert_eq!(
        needs(ORDER),
        Needs {
            exemptions: true,
            ..Needs::default()
        }
    );
    assert_eq!(
        needs(HOLD),
        Needs {
            groups: true,
            exemptions: true,
            ..Needs::default()
        }
    );
    assert_eq!(
        needs(LEAVERS),
        Needs {
            leave_date: true,
            ..Needs::default()
        }
    );
    assert_eq!(needs(DISABLED), Needs::default());
    let exempt = "[[rule]]\nname = \"a\"\nwhen = { not = { proofpoint_exempt = true } }\naction = \"ignore\"\n[[rule]]\nname = \"b\"\naction = \"ignore\"\n";
    assert_eq!(
        needs(exempt),
        Needs {
            exemptions: true,
            ..Needs::default()
        }
    );
    let all = Needs {
        groups: true,
        mailbox_purpose: true,
        leave_date: true,
        exemptions: true,
    };
    assert_eq!(
        all.graph_permissions(),
        [
            "GroupMember.Read.All",
            "MailboxSettings.Read",
            "User-LifeCycleInfo.Read.All"
        ]
    );
    assert!(Needs::default().graph_permissions().is_empty());
    assert!(
        !Needs::default()
            .user_select()
            .contains(&"employeeLeaveDateTime")
    );
    assert!(all.user_select().contains(&"employeeLeaveDateTime"));
    assert_eq!(MirrorPolicy.needs(), Needs::default());
}

#[test]
fn explanation_lists_every_rule_tried() {
    let d = check(
        HOLD,
        |u| {
            u.groups = Some(vec![]);
            u.disabled()
        },
        "deactivate by default",
    )
    .unwrap();
    let text = d.render_explanation();
    for line in [
        "decision:  deactivate (by default)",
        "exemption: not required by policy",
        "✗ hold (line 2): no match",
        "✗ member_of: the user is in no groups, wanted = \"g-hold\"",
        "✗ enabled (line 7): no match",
        "✗ account_enabled is false, wanted true",
        "✓ default (line 12): matched",
        "(no condition: the default rule)",
    ] {
        assert!(text.contains(line), "missing `{line}` in\n{text}");
    }
    assert_eq!(
        d.to_string(),
        format!("deactivate (by default): {}", d.reason)
    );
    let d = check(
        LEAVERS,
        |u| {
            u.disabled();
            u.leave(-days(1))
        },
        &format!("ignore by leavers recheck={}", at(days(6))),
    )
    .unwrap();
    let text = d.render_explanation();
    assert!(
        text.contains(
            "grace:     from the leave date 2026-02-28T12:00:00Z until 2026-03-07T12:00:00Z"
        ),
        "{text}"
    );
    assert!(
        text.contains("recheck:   at 2026-03-07T12:00:00Z"),
        "{text}"
    );
}

#[test]
fn mirror_policy_mirrors_behind_the_guards() {
    let cases: &[(Option<bool>, &str, Action, &str)] = &[
        (Some(true), "end_user", Action::Activate, "mirror"),
        (Some(false), "end_user", Action::Deactivate, "mirror"),
        (Some(false), "silent_user", Action::Deactivate, "mirror"),
        (None, "end_user", Action::Ignore, "mirror"),
        (
            Some(false),
            "functional_account",
            Action::Ignore,
            "guard:functional_account",
        ),
        (Some(true), "organization_admin", Action::Activate, "mirror"),
    ];
    for (enabled, pp_type, action, rule) in cases {
        let mut u = U::default();
        u.graph.account_enabled = *enabled;
        u.pp.user_type = Some((*pp_type).into());
        let d = MirrorPolicy.decide(&Facts::new(&u.graph, &u.pp), now());
        assert_eq!(
            (d.action, d.rule.as_str()),
            (*action, *rule),
            "{enabled:?} {pp_type}"
        );
    }
    for admin in crate::proofpoint::ADMIN_TYPES {
        let mut u = U::default();
        u.disabled();
        u.pp.user_type = Some((*admin).into());
        let d = MirrorPolicy.decide(&Facts::new(&u.graph, &u.pp), now());
        assert_eq!((d.action, d.rule.as_str()), (Action::Ignore, "guard:admin"));
    }
}
