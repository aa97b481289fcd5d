//! The policy engine end to end through RabbitMQ and the simulators: shared mailboxes keep
//! mail flowing, security holds, grace periods, the breaker, dry-run, reload, explain.

use std::time::Duration;

use flagrelay::message::{self, Message};
use flagrelay::telemetry::Metrics;

use crate::support::{Backend, Options, TENANT, TestApp, eventually, processed};

const CONVERGE: Duration = Duration::from_secs(15);
const EXAMPLE: &str = include_str!("../../examples/policy.toml");

/// The shipped example with its breaker opened wide (these tests disable most of a tiny org).
fn example_without_breaker() -> String {
    let relaxed = EXAMPLE
        .replace("max_deactivations = 25", "max_deactivations = 100000")
        .replace("max_share = 0.10", "max_share = 1.0");
    assert_ne!(
        relaxed, EXAMPLE,
        "the example still has the breaker settings this test relaxes"
    );
    relaxed
}

async fn start(name: &str, policy: String) -> TestApp {
    TestApp::start(
        name,
        Options {
            policy: Some(policy),
            ..Options::default()
        },
    )
    .await
}

#[tokio::test]
async fn a_shared_mailbox_with_sign_in_blocked_stays_active_and_is_exempted_from_sync() {
    let t = start("shared", example_without_breaker()).await;
    let shared = t.sandbox.seed_user("reception", true, "end_user");
    t.sandbox
        .graph
        .set_mailbox_purpose(TENANT, &shared.id, Some("shared"))
        .unwrap();
    let person = t.sandbox.seed_user("person", true, "end_user");
    t.sandbox
        .graph
        .set_mailbox_purpose(TENANT, &person.id, Some("user"))
        .unwrap();
    assert!(eventually(CONVERGE, || processed(&t) >= 2).await);

    t.sandbox.set_enabled(&shared, false);
    t.sandbox.set_enabled(&person, false);
    assert!(
        eventually(CONVERGE, || t.sandbox.is_active(&person) == Some(false)).await,
        "an ordinary user is deactivated"
    );
    assert!(
        eventually(CONVERGE, || t
            .sandbox
            .proofpoint
            .exemptions(&t.sandbox.org)
            .contains(&shared.address))
        .await,
        "the shared mailbox is put on the sync-exemption list"
    );
    assert_eq!(t.sandbox.is_active(&shared), Some(true), "and stays active");
    assert!(
        !t.sandbox
            .proofpoint
            .exemptions(&t.sandbox.org)
            .contains(&person.address)
    );
    t.stop().await;
}

#[tokio::test]
async fn members_of_the_security_hold_group_keep_mail_flowing() {
    let t = start("hold", example_without_breaker()).await;
    let suspect = t.sandbox.seed_user("suspect", true, "end_user");
    t.sandbox
        .graph
        .add_group(
            TENANT,
            "00000000-0000-0000-0000-000000000000",
            "flagrelay security hold",
        )
        .unwrap();
    // Transitive: the user is in a nested group of the hold group.
    t.sandbox
        .graph
        .add_group(TENANT, "ir-case-42", "incident 42")
        .unwrap();
    t.sandbox
        .graph
        .add_member(TENANT, "00000000-0000-0000-0000-000000000000", "ir-case-42")
        .unwrap();
    t.sandbox
        .graph
        .add_member(TENANT, "ir-case-42", &suspect.id)
        .unwrap();
    assert!(eventually(CONVERGE, || processed(&t) >= 1).await);
    t.sandbox.set_enabled(&suspect, false);
    assert!(
        eventually(CONVERGE, || t
            .sandbox
            .proofpoint
            .exemptions(&t.sandbox.org)
            .contains(&suspect.address))
        .await,
        "held account exempted from sync"
    );
    assert_eq!(
        t.sandbox.is_active(&suspect),
        Some(true),
        "blocked during the investigation, still receiving mail"
    );
    t.stop().await;
}

const LEAVERS: &str = r#"
[breaker]
max_deactivations = 1000
max_share = 1.0
window = "1h"

[[rule]]
name = "leavers"
when.all = [{ account_enabled = false }, { employee_leave_date_time = { before = "now" } }]
action = "deactivate"
deactivate_after = "GRACE"

[[rule]]
name = "enabled"
when = { account_enabled = true }
action = "activate"

[[rule]]
name = "default"
action = "ignore"
"#;

#[tokio::test]
async fn a_leaver_is_deactivated_only_after_the_grace_period() {
    let t = start("grace", LEAVERS.replace("GRACE", "3s")).await;
    let leaver = t.sandbox.seed_user("leaver", true, "end_user");
    assert!(eventually(CONVERGE, || processed(&t) >= 1).await);
    // Leave date a moment ago: the grace period runs until about three seconds from now.
    t.sandbox
        .graph
        .update_user(TENANT, &leaver.id, |u| {
            u.employee_leave_date_time = Some(chrono::Utc::now());
            u.account_enabled = Some(false);
        })
        .unwrap();
    assert!(
        eventually(CONVERGE, || processed(&t) >= 2).await,
        "the change was evaluated"
    );
    assert_eq!(
        t.sandbox.is_active(&leaver),
        Some(true),
        "still active during the grace period"
    );
    // No new notification: only the durable recheck can deactivate the user now.
    assert!(
        eventually(CONVERGE, || t.sandbox.is_active(&leaver) == Some(false)).await,
        "deactivated when the grace ended"
    );
    t.stop().await;
}

#[tokio::test]
async fn a_user_re_enabled_during_the_grace_period_stays_active() {
    let t = start("regrace", LEAVERS.replace("GRACE", "2s")).await;
    let u = t.sandbox.seed_user("returner", true, "end_user");
    assert!(eventually(CONVERGE, || processed(&t) >= 1).await);
    t.sandbox
        .graph
        .update_user(TENANT, &u.id, |g| {
            g.employee_leave_date_time = Some(chrono::Utc::now());
            g.account_enabled = Some(false);
        })
        .unwrap();
    assert!(eventually(CONVERGE, || processed(&t) >= 2).await);
    t.sandbox.set_enabled(&u, true);
    assert!(eventually(CONVERGE, || processed(&t) >= 3).await);
    // Well past the grace period: the re-enabled user's evaluation replaced the recheck the
    // block scheduled (a recheck still due re-reads the facts), and nothing deactivates.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        t.sandbox.is_active(&u),
        Some(true),
        "re-enabled during the grace period: kept active"
    );
    t.stop().await;
}

const SMALL_BREAKER: &str = r#"
[breaker]
max_deactivations = 3
max_share = 1.0
window = "1h"

[[rule]]
name = "enabled"
when = { account_enabled = true }
action = "activate"

[[rule]]
name = "default"
action = "deactivate"
"#;

#[tokio::test]
async fn the_breaker_trips_on_a_mass_disable_and_holds_until_released() {
    let mut opts = Options {
        policy: Some(SMALL_BREAKER.to_owned()),
        ..Options::default()
    };
    opts.backend = Backend::Rabbit;
    let t = TestApp::start_with("breaker", opts, |_| {}).await;
    let users: Vec<_> = (0..8)
        .map(|i| t.sandbox.seed_user(&format!("staff{i}"), true, "end_user"))
        .collect();
    assert!(eventually(CONVERGE, || processed(&t) >= 8).await);
    for u in &users {
        t.sandbox.set_enabled(u, false);
    }
    let inactive = || {
        users
            .iter()
            .filter(|u| t.sandbox.is_active(u) == Some(false))
            .count()
    };
    assert!(
        eventually(CONVERGE, || Metrics::get(
            &t.app.metrics.outcomes_held_total
        ) >= 5)
        .await,
        "the rest are held"
    );
    assert!(
        eventually(CONVERGE, || inactive() == 3).await,
        "the limit's worth were deactivated"
    );
    assert_eq!(Metrics::get(&t.app.metrics.breaker_trips_total), 1);
    // Held, not lost: recorded in the state store, still not applied.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(inactive(), 3);

    let store = t.app.store().await.unwrap();
    let config = t.app.policy.current().breaker();
    let report = store
        .breaker_report(&config, chrono::Utc::now())
        .await
        .unwrap();
    assert_eq!(
        report.trips().count(),
        1,
        "the trip is in the store, for every process and for operators: {report:?}"
    );
    assert_eq!(
        report.held.len(),
        5,
        "the held users are listed: {report:?}"
    );
    let released = store
        .release_breaker(None, chrono::Utc::now())
        .await
        .unwrap();
    assert_eq!(released.approved.len(), 5);
    assert!(
        eventually(CONVERGE, || inactive() == 8).await,
        "released: every deactivation held at the release proceeds, not just a fresh window's worth"
    );
    let after = store
        .breaker_report(&config, chrono::Utc::now())
        .await
        .unwrap();
    assert!(
        after.held.is_empty() && after.trips().count() == 0,
        "{after:?}"
    );
    t.stop().await;
}

#[tokio::test]
async fn dry_run_decides_and_publishes_but_writes_nothing() {
    let opts = Options {
        backend: Backend::Embedded,
        ..Options::default()
    };
    let t = TestApp::start_with("dryrun", opts, |c| c.worker.dry_run = true).await;
    let u = t.sandbox.seed_user("dry", true, "end_user");
    assert!(eventually(CONVERGE, || processed(&t) >= 1).await);
    t.sandbox.set_enabled(&u, false);
    assert!(
        eventually(CONVERGE, || Metrics::get(
            &t.app.metrics.outcomes_applied_total
        ) >= 1)
        .await
    );
    assert_eq!(
        t.sandbox.is_active(&u),
        Some(true),
        "nothing written to Proofpoint"
    );
    assert!(
        t.sandbox
            .proofpoint
            .writes()
            .iter()
            .all(|w| w.method != "PUT" || w.email.as_deref() != Some(u.address.as_str()))
    );
    let events = t.embedded().expect("embedded backend").events();
    let verifier = t.app.config.signing.verifier();
    let dry = events.iter().filter_map(|e| message::decode(&e.body, &e.headers, &verifier).ok()).any(|d| {
        matches!(&d.message, Message::UserOutcome(o) if o.dry_run && o.result == "applied" && o.action.as_deref() == Some("deactivate"))
    });
    assert!(dry, "an outcome event says what would have been done");
    t.stop().await;
}

#[tokio::test]
async fn an_invalid_policy_on_reload_is_refused_and_the_old_one_stays() {
    let t = start("reload", example_without_breaker()).await;
    let path = t.app.config.policy.file.clone().unwrap();
    std::fs::write(
        &path,
        "[[rule]]\nname = \"broken\"\nwhen = { acount_enabled = false }\naction = \"deactivate\"\n",
    )
    .unwrap();
    let err = format!("{:#}", t.app.reload_policy().unwrap_err());
    assert!(
        err.contains(":3:") && err.contains("broken"),
        "names the line and the rule: {err}"
    );
    assert!(
        t.app.policy.current().needs().mailbox_purpose,
        "the example policy is still in force"
    );
    std::fs::write(&path, LEAVERS.replace("GRACE", "1d")).unwrap();
    t.app.reload_policy().unwrap();
    assert!(
        !t.app.policy.current().needs().mailbox_purpose,
        "a valid file replaces it"
    );
    t.stop().await;
}

#[test]
fn policy_check_accepts_every_shipped_example_and_explain_shows_rules_and_writes() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .contains("policy")
        {
            let text = flagrelay::explain::check(&path)
                .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            assert!(text.contains("valid"), "{text}");
        }
    }
    let policy = flagrelay::policy::RulePolicy::load(dir.join("policy.toml")).unwrap();
    let input: flagrelay::explain::OfflineUser = serde_json::from_value(serde_json::json!({
        "user": {"id": "u1", "accountEnabled": false, "mail": "room1@example.com"},
        "proofpoint": {"primary_email": "room1@example.com", "type": "end_user", "is_active": false},
        "groups": [],
        "mailbox_purpose": "room",
        "exempt": false
    }))
    .unwrap();
    let text = flagrelay::explain::explain_offline(&policy, input, chrono::Utc::now());
    assert!(text.contains("shared-mailboxes"), "{text}");
    assert!(text.contains("is_active: false → true"), "{text}");
    assert!(
        text.contains("exemptions   add room1@example.com"),
        "{text}"
    );
}

#[tokio::test]
async fn explain_reads_the_live_user_and_reports_missing_permissions() {
    let opts = Options {
        policy: Some(example_without_breaker()),
        worker: false,
        subscribe: false,
        ..Options::default()
    };
    let t = TestApp::start("explain", opts).await;
    let room = t.sandbox.seed_user("room7", false, "end_user");
    t.sandbox
        .graph
        .set_mailbox_purpose(TENANT, &room.id, Some("room"))
        .unwrap();
    let policy = t.app.policy.current();

    // By UPN, as an admin would type it.
    let text =
        flagrelay::explain::explain_live(&t.app.config, policy.as_ref(), &room.address, None)
            .await
            .unwrap();
    assert!(text.contains("shared-mailboxes"), "{text}");
    assert!(text.contains("keep_mail_flowing"), "{text}");
    assert!(
        text.contains(&format!("exemptions   add {}", room.address)),
        "{text}"
    );
    assert_eq!(
        t.sandbox.is_active(&room),
        Some(true),
        "explain writes nothing"
    );

    // The admin forgot to consent MailboxSettings.Read.
    t.sandbox
        .graph
        .set_app_permissions(
            &t.app.config.graph.client_id,
            &["User.Read.All", "GroupMember.Read.All"],
        )
        .unwrap();
    let err = format!(
        "{:#}",
        flagrelay::explain::explain_live(&t.app.config, policy.as_ref(), &room.id, None)
            .await
            .unwrap_err()
    );
    assert!(err.contains("lacks MailboxSettings.Read"), "{err}");
    t.stop().await;
}
