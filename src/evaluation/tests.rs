//! `decide`: the pure step, table-driven with injected time.

use chrono::{Duration, TimeZone, Utc};

use super::decide;
use super::gather::Gathered;
use crate::graph::GraphUser;
use crate::policy::{MirrorPolicy, RulePolicy};
use crate::proofpoint::PpUser;
use crate::store::UserState;

fn now() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap()
}

fn gathered(enabled: Option<bool>, active: bool, exempt: Option<bool>) -> Gathered {
    Gathered {
        user: GraphUser {
            id: "6f1c2b9a-0000-4000-8000-00000000000a".into(),
            account_enabled: enabled,
            ..GraphUser::default()
        },
        address: "a@contoso.test".into(),
        proofpoint: PpUser {
            primary_email: "a@contoso.test".into(),
            user_type: Some("end_user".into()),
            is_active: active,
            other: Default::default(),
        },
        groups: None,
        mailbox_purpose: None,
        exempt,
        leave_date_fetched: false,
    }
}

#[test]
fn the_grace_start_is_set_once_and_cleared_on_re_enable() {
    let earlier = now() - Duration::hours(3);
    let cases = [
        // (sign-in, stored disabled_since, expected disabled_since)
        (Some(false), None, Some(now())),
        (Some(false), Some(earlier), Some(earlier)),
        (Some(true), Some(earlier), None),
        (None, Some(earlier), Some(earlier)),
    ];
    for (enabled, stored, expected) in cases {
        let state = UserState {
            disabled_since: stored,
            ..UserState::default()
        };
        let eval = decide(&MirrorPolicy, &gathered(enabled, true, None), &state, now());
        assert_eq!(
            eval.state.disabled_since, expected,
            "{enabled:?} {stored:?}"
        );
        assert_eq!(eval.previous, state, "the state as read is kept");
    }
}

#[test]
fn the_plan_writes_only_what_differs() {
    let eval = decide(
        &MirrorPolicy,
        &gathered(Some(false), true, None),
        &UserState::default(),
        now(),
    );
    assert!(eval.plan.deactivates());
    assert_eq!(eval.plan.describe(true), ["is_active true → false"]);
    let settled = decide(
        &MirrorPolicy,
        &gathered(Some(false), false, None),
        &UserState::default(),
        now(),
    );
    assert!(settled.plan.is_empty());
}

#[test]
fn a_grace_period_asks_for_a_recheck_and_a_hand_removed_exemption_is_forgotten() {
    let policy = RulePolicy::from_toml_str(
        "[[rule]]\nname = \"leavers\"\nwhen = { account_enabled = false }\naction = \"deactivate\"\n\
         deactivate_after = \"2h\"\n\n[[rule]]\nname = \"default\"\naction = \"activate\"\n",
        "policy.toml",
    )
    .unwrap();
    let eval = decide(
        &policy,
        &gathered(Some(false), true, Some(false)),
        &UserState {
            exemption_added: true,
            ..UserState::default()
        },
        now(),
    );
    assert!(eval.plan.is_empty(), "in grace: nothing to write yet");
    assert_eq!(eval.state.recheck_at, Some(now() + Duration::hours(2)));
    assert!(
        eval.state.exemption_added,
        "the policy says nothing about exemptions"
    );

    let shared = RulePolicy::from_toml_str(
        "[[rule]]\nname = \"default\"\naction = \"activate\"\n",
        "policy.toml",
    )
    .unwrap();
    let forgot = decide(
        &shared,
        &gathered(Some(true), true, Some(false)),
        &UserState {
            exemption_added: true,
            ..UserState::default()
        },
        now(),
    );
    assert!(forgot.plan.forget_exemption, "{:?}", forgot.plan);
    assert!(
        !forgot.state.exemption_added,
        "removed by hand: no longer flagrelay's to track"
    );
}
