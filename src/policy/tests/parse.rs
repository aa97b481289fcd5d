//! Rejected policy files: every error names the line, and the rule when it is inside one.

use super::check;

/// A rule text (starting on line 1) followed by a valid default rule.
fn with_default(rule: &str) -> String {
    format!("{rule}\n[[rule]]\nname = \"default\"\naction = \"ignore\"\n")
}

fn rejects(cases: &[(String, &str)]) {
    for (policy, expect) in cases {
        check(policy, |_| {}, &format!("error: {expect}"));
    }
}

#[test]
fn errors_in_conditions_name_line_and_rule() {
    rejects(&[
        (
            with_default(
                "[[rule]]\nname = \"leavers\"\nwhen = { acount_enabled = false }\naction = \"deactivate\"",
            ),
            "policy.toml:3: rule \"leavers\": unknown fact `acount_enabled` (did you mean `account_enabled`?)",
        ),
        (
            with_default(
                "[[rule]]\nname = \"r\"\nwhen = { department = { regex = \"(unclosed\" } }\naction = \"ignore\"",
            ),
            "policy.toml:3: rule \"r\": `department`: bad regex `(unclosed`: error: unclosed group",
        ),
        (
            with_default(
                "[[rule]]\nname = \"r\"\nwhen = { mailbox_purpose = { one_of = [] } }\naction = \"ignore\"",
            ),
            "policy.toml:3: rule \"r\": `mailbox_purpose`: one_of is empty, so it could never match",
        ),
        (
            with_default(
                "[[rule]]\nname = \"r\"\nwhen = { mailbox_purpose = \"shraed\" }\naction = \"ignore\"",
            ),
            "policy.toml:3: rule \"r\": `mailbox_purpose` is never `shraed` (known values: user, linked, shared, room, equipment, others)",
        ),
        (
            with_default(
                "[[rule]]\nname = \"r\"\nwhen = { department = { like = \"x\" } }\naction = \"ignore\"",
            ),
            "policy.toml:3: rule \"r\": unknown matcher `like` for `department`",
        ),
        (
            with_default(
                "[[rule]]\nname = \"r\"\nwhen = { account_enabled = { glob = \"t*\" } }\naction = \"ignore\"",
            ),
            "policy.toml:3: rule \"r\": `glob` does not apply to `account_enabled` (a true/false fact: use equals or exists)",
        ),
        (
            with_default(
                "[[rule]]\nname = \"r\"\nwhen = { account_enabled = \"yes\" }\naction = \"ignore\"",
            ),
            "policy.toml:3: rule \"r\": `account_enabled` is true or false, not string",
        ),
        (
            with_default(
                "[[rule]]\nname = \"r\"\nwhen = { department = [\"a\"] }\naction = \"ignore\"",
            ),
            "policy.toml:3: rule \"r\": `department`: a list is not a matcher; write { one_of = [...] }",
        ),
        (
            with_default(
                "[[rule]]\nname = \"r\"\nwhen = { employee_leave_date_time = { before = \"yesterday\" } }\naction = \"ignore\"",
            ),
            "policy.toml:3: rule \"r\": `employee_leave_date_time`: bad time `yesterday`",
        ),
        (
            with_default(
                "[[rule]]\nname = \"r\"\nwhen = { employee_leave_date_time = { before = \"7 dys ago\" } }\naction = \"ignore\"",
            ),
            "policy.toml:3: rule \"r\": `employee_leave_date_time`: bad duration `7 dys`",
        ),
        (
            with_default(
                "[[rule]]\nname = \"r\"\nwhen = { department = { equals = \"a\", glob = \"b\" } }\naction = \"ignore\"",
            ),
            "policy.toml:3: rule \"r\": `department` needs exactly one matcher",
        ),
        (
            with_default("[[rule]]\nname = \"r\"\nwhen = {}\naction = \"ignore\""),
            "policy.toml:3: rule \"r\": empty condition",
        ),
        (
            with_default("[[rule]]\nname = \"r\"\nwhen = { any = [] }\naction = \"ignore\""),
            "policy.toml:3: rule \"r\": `any` is empty",
        ),
        (
            with_default(
                "[[rule]]\nname = \"r\"\nwhen = { extension_attribute16 = \"x\" }\naction = \"ignore\"",
            ),
            "policy.toml:3: rule \"r\": unknown fact `extension_attribute16` (did you mean `extension_attribute1`?)",
        ),
        // Deep inside a multi-line condition: the line of the offending part.
        (
            with_default(
                "[[rule]]\nname = \"deep\"\naction = \"ignore\"\n[rule.when]\nall = [\n  { department = \"x\" },\n  { not = { mial = \"y\" } },\n]",
            ),
            "policy.toml:7: rule \"deep\": unknown fact `mial` (did you mean `mail`?)",
        ),
    ]);
}

#[test]
fn errors_in_rules_name_line_and_rule() {
    rejects(&[
        (
            with_default(
                "[[rule]]\nname = \"r\"\nwhen = { department = \"x\" }\naction = \"deactiavte\"",
            ),
            "policy.toml:4: rule \"r\": unknown action `deactiavte` (expected activate, deactivate, ignore or keep_mail_flowing)",
        ),
        (
            with_default(
                "[[rule]]\nname = \"r\"\nwhen = { department = \"x\" }\naction = \"activate\"\ndeactivate_after = \"7d\"",
            ),
            "policy.toml:5: rule \"r\": deactivate_after only applies to action = \"deactivate\" (this rule's action is activate)",
        ),
        (
            with_default(
                "[[rule]]\nname = \"r\"\nwhen = { department = \"x\" }\naction = \"deactivate\"\ndeactivate_after = \"7 dys\"",
            ),
            "policy.toml:5: rule \"r\": deactivate_after: bad duration `7 dys`",
        ),
        (
            with_default(
                "[[rule]]\nname = \"r\"\nwhen = { department = \"x\" }\naction = \"keep_mail_flowing\"\noverride_guards = [\"admin\"]",
            ),
            "policy.toml:5: rule \"r\": override_guards only applies to action = \"deactivate\"",
        ),
        (
            with_default(
                "[[rule]]\nname = \"r\"\nwhen = { department = \"x\" }\naction = \"deactivate\"\noverride_guards = [\"admins\"]",
            ),
            "policy.toml:5: rule \"r\": unknown guard `admins` (expected admin, functional_account or incomplete_facts)",
        ),
        (
            with_default(
                "[[rule]]\nname = \"r\"\nwhen = { department = \"x\" }\nactoin = \"ignore\"",
            ),
            "policy.toml:4: rule \"r\": unknown field `actoin`",
        ),
        (
            with_default("[[rule]]\nname = \"r\"\nwhen = { department = \"x\" }"),
            "policy.toml:1: rule \"r\": missing field `action`",
        ),
        (
            with_default(
                "[[rule]]\nname = \"default\"\nwhen = { department = \"x\" }\naction = \"ignore\"",
            ),
            "policy.toml:6: rule \"default\": duplicate rule name",
        ),
        (
            with_default(
                "[[rule]]\nname = \"  \"\nwhen = { department = \"x\" }\naction = \"ignore\"",
            ),
            "policy.toml:2: the rule name is empty",
        ),
        (
            with_default("[[rule]]\nname = 3\naction = \"ignore\""),
            "policy.toml:2: invalid type: integer `3`, expected a string",
        ),
    ]);
}

#[test]
fn errors_in_the_file_structure() {
    rejects(&[
        ("".into(), "policy.toml:1: no rules"),
        ("# only a comment\n".into(), "policy.toml:1: no rules"),
        (
            "[[rule]]\nname = \"a\"\nwhen = { department = \"x\" }\naction = \"ignore\"\n".into(),
            "policy.toml:1: rule \"a\": missing final default rule",
        ),
        (
            "[[rule]]\nname = \"a\"\naction = \"ignore\"\n\n[[rule]]\nname = \"b\"\naction = \"activate\"\n".into(),
            "policy.toml:1: rule \"a\": default rule not last: a rule without `when` always matches, so the 1 rule(s) after it",
        ),
        ("[brekaer]\nwindow = \"1h\"\n".into(), "policy.toml:1: unknown field `brekaer`"),
        ("[[rule]]\nname = \"a\nx".into(), "policy.toml:2: "),
        (
            with_default("[breaker]\nmax_share = 1.5"),
            "policy.toml:2: [breaker] max_share is a fraction of the known users in (0, 1]",
        ),
        (with_default("[breaker]\nmax_deactivations = 0"), "policy.toml:2: [breaker] max_deactivations must be"),
        (with_default("[breaker]\nwindow = \"0s\""), "policy.toml:2: [breaker] window: `0s` is not a positive duration"),
        (with_default("[breaker]\nwindwo = \"1h\""), "policy.toml:2: unknown field `windwo`"),
    ]);
}

#[test]
fn accepted_forms() {
    let ok = [
        // Dotted keys, sub-tables and inline arrays of tables all work.
        "[[rule]]\nname = \"a\"\nwhen.department = \"x\"\naction = \"ignore\"\n[[rule]]\nname = \"b\"\naction = \"ignore\"\n",
        "rule = [ { name = \"a\", when = { mail = { exists = false } }, action = \"activate\" }, { name = \"b\", action = \"ignore\" } ]\n",
        "[breaker]\nmax_share = 1\n[[rule]]\nname = \"b\"\naction = \"ignore\"\n",
        "[[rule]]\nname = \"a\"\nwhen = { employee_leave_date_time = { after = \"in 1h 30m\" } }\naction = \"deactivate\"\ndeactivate_after = \"2weeks\"\noverride_guards = []\n[[rule]]\nname = \"b\"\naction = \"ignore\"\n",
    ];
    for text in ok {
        check(text, |_| {}, "ignore by b");
    }
    let e = crate::policy::RulePolicy::load("/nonexistent/policy.toml").unwrap_err();
    assert_eq!(
        e.to_string(),
        "/nonexistent/policy.toml: cannot read the policy file"
    );
    assert!(std::error::Error::source(&e).is_some());
}
