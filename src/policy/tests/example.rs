//! The shipped example policy: every `examples/*policy*` file parses and validates against
//! `schemas/policy.schema.json`, and the default example decides as documented.

use std::path::PathBuf;

use serde_json::Value;

use super::{U, at, check, days};
use crate::policy::fact::Fact;
use crate::policy::{Group, Needs, Policy, RulePolicy};

const EXAMPLE: &str = include_str!("../../../examples/policy.toml");
const SCHEMA: &str = include_str!("../../../schemas/policy.schema.json");
/// (what, change to the standard user, expected brief).
type Case = (&'static str, fn(&mut U), &'static str);

const HOLD_GROUP: &str = "00000000-0000-0000-0000-000000000000";

fn example_files() -> Vec<(PathBuf, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().contains("policy"))
        })
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no policy examples under {}",
        dir.display()
    );
    files
}

fn validator() -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(SCHEMA).unwrap();
    assert_eq!(
        schema["$id"],
        "https://flagrelay.dev/schemas/policy.schema.json"
    );
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    jsonschema::validator_for(&schema).unwrap()
}

fn schema_errors(v: &jsonschema::Validator, toml_text: &str) -> Vec<String> {
    let doc: Value = toml::from_str(toml_text).unwrap();
    v.iter_errors(&doc)
        .map(|e| format!("{}: {e}", e.instance_path))
        .collect()
}

#[test]
fn every_example_policy_parses_and_matches_the_schema() {
    let v = validator();
    for (path, text) in example_files() {
        let name = path.display().to_string();
        if let Err(e) = RulePolicy::from_toml_str(&text, &name) {
            panic!("{e}");
        }
        assert_eq!(RulePolicy::load(&path).unwrap().source_name(), name);
        let errors = schema_errors(&v, &text);
        assert!(errors.is_empty(), "{name}: {errors:#?}");
    }
}

#[test]
fn the_example_decides_as_documented() {
    let hold = |u: &mut U| {
        u.groups = Some(vec![Group {
            id: HOLD_GROUP.into(),
            display_name: None,
        }]);
    };
    let in_grace = format!("ignore by leavers recheck={}", at(days(4)));
    let cases: &[Case] = &[
        ("enabled employee", |_| {}, "activate by enabled"),
        (
            "blocked employee",
            |u| u.disabled(),
            "deactivate by default",
        ),
        (
            "shared mailbox, blocked",
            |u| {
                u.disabled();
                u.mailbox = Some("shared".into())
            },
            "keep_mail_flowing by shared-mailboxes",
        ),
        (
            "room mailbox",
            |u| u.mailbox = Some("room".into()),
            "keep_mail_flowing by shared-mailboxes",
        ),
        (
            "held account, blocked",
            |u| {
                u.disabled();
                u.groups = Some(vec![Group {
                    id: HOLD_GROUP.into(),
                    display_name: None,
                }])
            },
            "keep_mail_flowing by security-hold",
        ),
        (
            "held by display name",
            |u| {
                u.disabled();
                u.groups = Some(vec![Group {
                    id: "x".into(),
                    display_name: Some("Flagrelay Security Hold".into()),
                }])
            },
            "keep_mail_flowing by security-hold",
        ),
        (
            "leaver, 10 days ago",
            |u| {
                u.disabled();
                u.leave(-days(10))
            },
            "deactivate by leavers",
        ),
        (
            "leaver, re-enabled",
            |u| u.leave(-days(3)),
            "activate by enabled",
        ),
        (
            "blocked admin",
            |u| {
                u.disabled();
                u.pp.user_type = Some("organization_admin".into())
            },
            "ignore by guard:admin",
        ),
        (
            "blocked functional account",
            |u| {
                u.disabled();
                u.pp.user_type = Some("functional_account".into())
            },
            "ignore by guard:functional_account",
        ),
        (
            "blocked, groups not fetched",
            |u| {
                u.disabled();
                u.groups = None
            },
            "ignore by guard:incomplete_facts",
        ),
    ];
    for (what, tweak, expect) in cases {
        let d = check(EXAMPLE, tweak, expect).unwrap();
        assert!(!d.reason.is_empty(), "{what}");
    }
    let d = check(
        EXAMPLE,
        |u| {
            hold(u);
            u.disabled();
            u.leave(-days(3))
        },
        "keep_mail_flowing by security-hold",
    )
    .unwrap();
    assert_eq!(d.exempt, Some(true));
    let d = check(
        EXAMPLE,
        |u| {
            u.disabled();
            u.leave(-days(3))
        },
        &in_grace,
    )
    .unwrap();
    assert_eq!(
        d.reason,
        format!(
            "the employee has left and sign-in is blocked; in the 7d grace period since the leave date \
         (2026-02-26T12:00:00Z): nothing is deactivated before {}",
            at(days(4))
        )
    );
    let p = RulePolicy::from_toml_str(EXAMPLE, "policy.toml").unwrap();
    assert_eq!(
        p.needs(),
        Needs {
            groups: true,
            mailbox_purpose: true,
            leave_date: true,
            exemptions: true
        }
    );
    assert_eq!(p.breaker().max_deactivations, 25);
    assert_eq!(p.breaker().window, std::time::Duration::from_secs(3600));
    assert_eq!(
        p.rule_names().collect::<Vec<_>>(),
        [
            "shared-mailboxes",
            "security-hold",
            "leavers",
            "enabled",
            "default"
        ]
    );
}

#[test]
fn the_schema_knows_every_fact_and_rejects_what_the_parser_rejects() {
    let v = validator();
    // Every fact the engine knows is accepted by both the schema and the parser.
    let facts = Fact::all_names();
    let conds = facts
        .iter()
        .map(|f| format!("{{ {f} = {{ exists = true }} }}"))
        .collect::<Vec<_>>()
        .join(", ");
    let all = format!(
        "[[rule]]\nname = \"a\"\nwhen = {{ any = [{conds}] }}\naction = \"ignore\"\n[[rule]]\nname = \"b\"\naction = \"ignore\"\n"
    );
    assert!(
        schema_errors(&v, &all).is_empty(),
        "{:#?}",
        schema_errors(&v, &all)
    );
    RulePolicy::from_toml_str(&all, "all").unwrap();
    let rejected = [
        "[[rule]]\nname = \"a\"\nwhen = { acount_enabled = false }\naction = \"ignore\"\n",
        "[[rule]]\nname = \"a\"\naction = \"delete\"\n",
        "[[rule]]\nname = \"a\"\naction = \"activate\"\ndeactivate_after = \"7d\"\n",
        "[[rule]]\nname = \"a\"\naction = \"ignore\"\noverride_guards = [\"admin\"]\n",
        "[[rule]]\nname = \"a\"\nwhen = { department = { one_of = [] } }\naction = \"ignore\"\n",
        "[[rule]]\nname = \"a\"\nwhen = { mailbox_purpose = \"shraed\" }\naction = \"ignore\"\n",
        "[[rule]]\nname = \"a\"\nwhen = { account_enabled = { glob = \"t*\" } }\naction = \"ignore\"\n",
        "[[rule]]\nname = \"a\"\nwhen = { employee_leave_date_time = { before = \"yesterday\" } }\naction = \"ignore\"\n",
        "[[rule]]\nname = \"a\"\nwhen = { extension_attribute16 = \"x\" }\naction = \"ignore\"\n",
        "[[rule]]\nname = \"a\"\nactoin = \"ignore\"\n",
        "[brekaer]\n[[rule]]\nname = \"a\"\naction = \"ignore\"\n",
        "[breaker]\nmax_share = 1.5\n[[rule]]\nname = \"a\"\naction = \"ignore\"\n",
        "[breaker]\nwindow = \"soon\"\n[[rule]]\nname = \"a\"\naction = \"ignore\"\n",
    ];
    for text in rejected {
        assert!(
            !schema_errors(&v, text).is_empty(),
            "schema accepts:\n{text}"
        );
        assert!(
            RulePolicy::from_toml_str(text, "p").is_err(),
            "parser accepts:\n{text}"
        );
    }
}
