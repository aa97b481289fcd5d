//! The blast-radius breaker: [`judge`] on counts as the state store sees them, the `[breaker]`
//! section of the policy file and its schema.

use std::time::Duration;

use chrono::Duration as Delta;
use serde_json::Value;

use super::now;
use crate::policy::breaker::{
    self, Counts, DAY, GlobalLimits, LimitKind, Scope, judge, limits_text, window_start,
};
use crate::policy::{BreakerConfig, Policy, RulePolicy, Trip, Verdict};

const ORG: &str = "contoso.com";
const SCHEMA: &str = include_str!("../../../schemas/policy.schema.json");

fn hours(n: u64) -> Duration {
    Duration::from_secs(n * 3600)
}

/// Small, distinct limits, so that a case can only pass through the setting it is about:
/// per org 3 per hour (share 1.0) and 5 per day; global 7 per 2 h and 11 per day.
fn small() -> BreakerConfig {
    BreakerConfig {
        max_deactivations: 3,
        max_share: 1.0,
        window: hours(1),
        max_per_day: 5,
        global: GlobalLimits {
            max_deactivations: 7,
            window: hours(2),
            max_per_day: 11,
        },
    }
}

/// `"allow"`, or `"<scope> <kind> <counted>/<limit>"`.
fn brief(v: &Verdict) -> String {
    match v {
        Verdict::Allow => "allow".into(),
        Verdict::Tripped(t) => format!("{} {} {}/{}", t.scope, t.limit_kind, t.counted, t.limit),
    }
}

/// The one helper: judge one more deactivation in [`ORG`] with `counts` (org window, org day,
/// global window, global day) already counted and `total_users` known, and compare the brief.
fn check(config: &BreakerConfig, counts: [usize; 4], total_users: usize, expect: &str) -> Verdict {
    let [org_in_window, org_in_day, global_in_window, global_in_day] = counts;
    let counts = Counts {
        org_in_window,
        org_in_day,
        global_in_window,
        global_in_day,
    };
    let v = judge(config, ORG, &counts, total_users, now());
    assert_eq!(
        brief(&v),
        expect,
        "{counts:?} of {total_users} users, {config:?}"
    );
    v
}

fn tripped(v: Verdict) -> Trip {
    match v {
        Verdict::Tripped(t) => t,
        Verdict::Allow => panic!("allowed"),
    }
}

#[test]
fn every_limit_trips_exactly_at_its_boundary() {
    let defaults = BreakerConfig::default();
    let cases: [(&BreakerConfig, [usize; 4], &str); 20] = [
        // Org window: the limit-th is allowed, one more trips.
        (&defaults, [24, 24, 24, 24], "allow"),
        (&defaults, [25, 25, 25, 25], "contoso.com window 25/25"),
        (&small(), [2, 2, 2, 2], "allow"),
        (&small(), [3, 3, 3, 3], "contoso.com window 3/3"),
        // Org day.
        (&defaults, [0, 99, 50, 99], "allow"),
        (&defaults, [0, 100, 50, 100], "contoso.com day 100/100"),
        (&small(), [0, 4, 4, 4], "allow"),
        (&small(), [0, 5, 5, 5], "contoso.com day 5/5"),
        // Global window.
        (&defaults, [0, 0, 99, 99], "allow"),
        (&defaults, [0, 0, 100, 100], "global window 100/100"),
        (&small(), [0, 0, 6, 6], "allow"),
        (&small(), [0, 0, 7, 7], "global window 7/7"),
        // Global day.
        (&defaults, [0, 0, 0, 399], "allow"),
        (&defaults, [0, 0, 0, 400], "global day 400/400"),
        (&small(), [0, 0, 0, 10], "allow"),
        (&small(), [0, 0, 0, 11], "global day 11/11"),
        // Counts already past a limit (it was lowered meanwhile) trip too.
        (&small(), [12, 12, 12, 12], "global day 12/11"),
        (&small(), [4, 4, 4, 4], "contoso.com window 4/3"),
        // Nothing counted yet.
        (&defaults, [0, 0, 0, 0], "allow"),
        (&small(), [0, 0, 0, 0], "allow"),
    ];
    for (config, counts, expect) in cases {
        check(config, counts, 10_000, expect);
    }
}

#[test]
fn the_share_rule_limits_the_org_window() {
    // Default: min(25, max(1, floor(0.10 × users))).
    let cases = [
        (20, 1, "allow"),
        (20, 2, "contoso.com window 2/2"),
        (100, 9, "allow"),
        (100, 10, "contoso.com window 10/10"),
        (249, 23, "allow"),
        (249, 24, "contoso.com window 24/24"),
        (1000, 24, "allow"),
        (1000, 25, "contoso.com window 25/25"),
    ];
    for (users, counted, expect) in cases {
        check(
            &BreakerConfig::default(),
            [counted, counted, counted, counted],
            users,
            expect,
        );
    }
}

#[test]
fn tiny_organizations_always_get_one() {
    for users in [0, 1, 5, 9, 19] {
        check(&BreakerConfig::default(), [0, 0, 0, 0], users, "allow");
        check(
            &BreakerConfig::default(),
            [1, 1, 1, 1],
            users,
            "contoso.com window 1/1",
        );
    }
    assert_eq!(BreakerConfig::default().limit(0), 1);
}

#[test]
fn the_broadest_limit_reached_is_named() {
    // Every limit of `small()` full, then one fewer at a time from the broadest.
    let cases = [
        ([3, 5, 7, 11], "global day 11/11"),
        ([3, 5, 7, 0], "global window 7/7"),
        ([3, 5, 0, 0], "contoso.com day 5/5"),
        ([3, 0, 0, 0], "contoso.com window 3/3"),
        ([0, 5, 7, 0], "global window 7/7"),
        ([3, 0, 0, 11], "global day 11/11"),
    ];
    for (counts, expect) in cases {
        check(&small(), counts, 100, expect);
    }
}

#[test]
fn reasons_name_scope_counts_limit_window_and_settings() {
    let cases: [([usize; 4], &str, &[&str]); 4] = [
        (
            [0, 0, 0, 11],
            "global day 11/11",
            &[
                "global (all organizations together): 11 deactivations within the last 24h already reach the day limit of 11 ([breaker.global] max_per_day = 11)",
            ],
        ),
        (
            [0, 0, 7, 0],
            "global window 7/7",
            &[
                "global (all organizations together): 7 ",
                "last 2h ",
                "window limit of 7 ",
                "[breaker.global] max_deactivations = 7",
            ],
        ),
        (
            [0, 5, 0, 0],
            "contoso.com day 5/5",
            &[
                "organization contoso.com: 5 ",
                "last 24h ",
                "day limit of 5 ",
                "[breaker] max_per_day = 5",
            ],
        ),
        (
            [3, 0, 0, 0],
            "contoso.com window 3/3",
            &[
                "organization contoso.com: 3 deactivations within the last 1h already reach the window limit of 3 ([breaker] max_deactivations = 3, max_share = 1 of 40 known users, at least 1)",
            ],
        ),
    ];
    for (counts, expect, parts) in cases {
        let trip = tripped(check(&small(), counts, 40, expect));
        for part in parts {
            assert!(
                trip.reason.contains(part),
                "{part:?} not in {:?}",
                trip.reason
            );
        }
        assert_eq!((trip.at, trip.total_users), (now(), 40));
    }
}

#[test]
fn trips_round_trip_as_json_and_old_trips_still_load() {
    let trip = tripped(check(&small(), [0, 5, 0, 0], 40, "contoso.com day 5/5"));
    let json = serde_json::to_value(&trip).unwrap();
    assert_eq!(json["scope"], "contoso.com");
    assert_eq!(json["limit_kind"], "day");
    assert_eq!(json["counted"], 5);
    assert_eq!(serde_json::from_value::<Trip>(json).unwrap(), trip);
    // Saved by the per-process breaker before scopes and kinds existed.
    let old =
        r#"{"at":"2026-03-01T12:00:00Z","in_window":3,"limit":3,"total_users":100,"reason":"r"}"#;
    let old: Trip = serde_json::from_str(old).unwrap();
    assert_eq!(
        (old.scope.as_str(), old.limit_kind, old.counted, old.at),
        ("global", LimitKind::Window, 3, now())
    );
}

#[test]
fn scopes_read_as_global_or_the_org_domain() {
    let cases = [(Scope::Global, "global"), (Scope::Org(ORG.into()), ORG)];
    for (scope, text) in cases {
        assert_eq!(scope.to_string(), text);
        assert_eq!(Scope::from(text.to_owned()), scope);
        let json = serde_json::to_string(&scope).unwrap();
        assert_eq!(json, format!("\"{text}\""));
        assert_eq!(serde_json::from_str::<Scope>(&json).unwrap(), scope);
    }
}

#[test]
fn the_store_counts_over_the_window_and_a_day() {
    assert_eq!(breaker::windows(&small()), (hours(1), hours(2)));
    assert_eq!(DAY, hours(24));
    // An instant exactly one window ago has left the window.
    assert_eq!(window_start(now(), hours(1)), now() - Delta::hours(1));
}

#[test]
fn limits_text_has_one_line_per_scope() {
    assert_eq!(
        limits_text(&BreakerConfig::default()),
        "global (all organizations together): at most 100 deactivations within 1h and 400 within 24h\n\
         per organization: at most 25 deactivations and at most 0.1 of its known users (at least 1) within 1h, and 100 within 24h"
    );
}

#[test]
fn default_limits() {
    let expect = BreakerConfig {
        max_deactivations: 25,
        max_share: 0.10,
        window: hours(1),
        max_per_day: 100,
        global: GlobalLimits {
            max_deactivations: 100,
            window: hours(1),
            max_per_day: 400,
        },
    };
    assert_eq!(BreakerConfig::default(), expect);
    let json = serde_json::to_value(expect).unwrap();
    assert_eq!(json["max_per_day"], 100);
    assert_eq!(json["global"]["window"], "1h");
}

/// `section` (starting on line 1) followed by a default rule.
fn policy(section: &str) -> String {
    format!("{section}\n[[rule]]\nname = \"default\"\naction = \"ignore\"\n")
}

fn parsed(section: &str) -> Result<BreakerConfig, String> {
    RulePolicy::from_toml_str(&policy(section), "policy.toml")
        .map(|p| p.breaker())
        .map_err(|e| e.to_string())
}

#[test]
fn parsing_defaults_and_every_key() {
    let full = "[breaker]\nmax_deactivations = 3\nmax_share = 1.0\nwindow = \"1h\"\nmax_per_day = 5\n\
                [breaker.global]\nmax_deactivations = 7\nwindow = \"2h\"\nmax_per_day = 11";
    let raised = |org: u32, global: u32| {
        let mut c = BreakerConfig::default();
        (c.max_deactivations, c.max_per_day) = (org, org.max(100));
        (c.global.max_deactivations, c.global.max_per_day) = (global, global.max(400));
        c
    };
    let mut weekly = BreakerConfig {
        window: hours(24 * 7),
        max_per_day: 10,
        ..BreakerConfig::default()
    };
    weekly.global.max_deactivations = 100;
    let cases = [
        ("", BreakerConfig::default()),
        ("[breaker]", BreakerConfig::default()),
        ("[breaker.global]", BreakerConfig::default()),
        (full, small()),
        // An omitted max_per_day follows a raised window limit (files written before day
        // limits existed keep their meaning).
        ("[breaker]\nmax_deactivations = 500", raised(500, 100)),
        (
            "[breaker.global]\nmax_deactivations = 1000",
            raised(25, 1000),
        ),
        ("[breaker]\nmax_deactivations = 7", raised(7, 100)),
        // A window longer than a day may have the smaller day limit.
        ("[breaker]\nwindow = \"7d\"\nmax_per_day = 10", weekly),
    ];
    for (section, expect) in cases {
        assert_eq!(parsed(section), Ok(expect), "{section}");
    }
}

#[test]
fn parsing_refusals_name_the_line_and_the_key() {
    let zero = "must be at least 1: 0 would hold every deactivation; to stop deactivating, use a \
                guard or an `ignore` rule instead";
    let cases = [
        ("[breaker]\nmax_deactivations = 0".to_owned(), format!("policy.toml:2: [breaker] max_deactivations {zero}")),
        ("[breaker]\nmax_per_day = 0".into(), format!("policy.toml:2: [breaker] max_per_day {zero}")),
        ("[breaker.global]\nmax_deactivations = 0".into(), format!("policy.toml:2: [breaker.global] max_deactivations {zero}")),
        ("[breaker]\n[breaker.global]\nmax_per_day = 0".into(), format!("policy.toml:3: [breaker.global] max_per_day {zero}")),
        ("[breaker]\nmax_per_day = -1".into(), "policy.toml:2: [breaker] max_per_day must be a whole number from 1 to 4294967295".into()),
        ("[breaker.global]\nmax_deactivations = 4294967296".into(), "policy.toml:2: [breaker.global] max_deactivations must be a whole number from 1 to 4294967295".into()),
        (
            "[breaker]\nmax_deactivations = 30\nmax_per_day = 29".into(),
            "policy.toml:3: [breaker] max_per_day (29) is smaller than max_deactivations (30): within a day the window limit could never be reached".into(),
        ),
        ("[breaker]\nmax_per_day = 24".into(), "policy.toml:2: [breaker] max_per_day (24) is smaller than max_deactivations (25)".into()),
        ("[breaker.global]\nwindow = \"1d\"\nmax_per_day = 99".into(), "policy.toml:3: [breaker.global] max_per_day (99) is smaller than max_deactivations (100)".into()),
        ("[breaker]\nwindow = \"59s\"".into(), "policy.toml:2: [breaker] window: `59s` is outside the allowed range of 1 minute to 7 days".into()),
        ("[breaker]\nwindow = \"7d 1s\"".into(), "policy.toml:2: [breaker] window: `7d 1s` is outside the allowed range".into()),
        ("[breaker.global]\nwindow = \"30s\"".into(), "policy.toml:2: [breaker.global] window: `30s` is outside the allowed range".into()),
        ("[breaker.global]\nwindow = \"soon\"".into(), "policy.toml:2: [breaker.global] window: `soon` is not a positive duration".into()),
        ("[breaker.global]\nmax_share = 0.5".into(), "policy.toml:2: unknown field `max_share`".into()),
        ("[breaker]\n\n[breaker.global]\nwindw = \"1h\"".into(), "policy.toml:4: unknown field `windw`".into()),
        ("[breaker.globl]\nwindow = \"1h\"".into(), "policy.toml:1: unknown field `globl`".into()),
    ];
    for (section, expect) in cases {
        let got = parsed(&section).unwrap_err();
        assert!(
            got.starts_with(&expect),
            "{section}\nexpected: {expect}\n     got: {got}"
        );
    }
}

#[test]
fn the_schema_accepts_the_keys_and_refuses_what_the_parser_refuses() {
    let schema: Value = serde_json::from_str(SCHEMA).unwrap();
    let v = jsonschema::validator_for(&schema).unwrap();
    let valid = |section: &str| {
        let doc: Value = toml::from_str(&policy(section)).unwrap();
        v.is_valid(&doc)
    };
    let full = "[breaker]\nmax_per_day = 100\n[breaker.global]\nmax_deactivations = 100\nwindow = \"1h\"\nmax_per_day = 400";
    assert!(valid(full));
    assert!(parsed(full).is_ok());
    for refused in [
        "[breaker]\nmax_per_day = 0",
        "[breaker.global]\nmax_deactivations = 0",
        "[breaker.global]\nmax_per_day = 0",
        "[breaker.global]\nmax_share = 0.5",
        "[breaker.global]\nwindow = \"soon\"",
        "[breaker.global]\nwindow = 60",
    ] {
        assert!(!valid(refused), "schema accepts:\n{refused}");
        assert!(parsed(refused).is_err(), "parser accepts:\n{refused}");
    }
}
