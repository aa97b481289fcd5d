//! End to end through the real RabbitMQ and both simulators: Graph change → notification →
//! receiver → queue → worker → Proofpoint.

use std::time::Duration;

use flagrelay::queue::{DeadLetter, Queue};
use flagrelay::telemetry::Metrics;

use crate::support::{Backend, ORG_B, Options, TENANT, TENANT_B, TestApp, eventually, processed};

const CONVERGE: Duration = Duration::from_secs(15);

async fn dead_letters(queue: &dyn Queue, want: usize) -> Vec<DeadLetter> {
    let mut all = Vec::new();
    for _ in 0..150 {
        all.extend(queue.take_dead_letters(10).await.unwrap());
        if all.len() >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    all
}

#[tokio::test]
async fn a_flip_in_entra_reaches_proofpoint_both_ways() {
    for backend in [Backend::Rabbit, Backend::Embedded] {
        let t = TestApp::start(
            "flip",
            Options {
                backend,
                ..Options::default()
            },
        )
        .await;
        let alice = t.sandbox.seed_user("alice", true, "end_user");
        t.sandbox.set_enabled(&alice, false);
        assert!(
            eventually(CONVERGE, || t.sandbox.is_active(&alice) == Some(false)).await,
            "{backend:?}: deactivated"
        );
        t.sandbox.set_enabled(&alice, true);
        assert!(
            eventually(CONVERGE, || t.sandbox.is_active(&alice) == Some(true)).await,
            "{backend:?}: re-activated"
        );
        // Read-modify-write kept the fields flagrelay does not know.
        let stored = t
            .sandbox
            .proofpoint
            .user(&t.sandbox.org, &alice.address)
            .unwrap();
        assert_eq!(
            stored.other.get("odin_settings"),
            Some(&serde_json::json!({"kept": true})),
            "{backend:?}"
        );
        assert_eq!(
            stored.other.get("firstname"),
            Some(&serde_json::json!("alice"))
        );
        // The outcome is counted just after the write lands.
        assert!(
            eventually(CONVERGE, || Metrics::get(
                &t.app.metrics.outcomes_applied_total
            ) >= 2)
            .await
        );
        t.stop().await;
    }
}

#[tokio::test]
async fn duplicates_reordering_and_delays_converge_to_the_final_state() {
    let t = TestApp::start("dupes", Options::default()).await;
    let users: Vec<_> = (0..8)
        .map(|i| t.sandbox.seed_user(&format!("dup{i}"), true, "end_user"))
        .collect();
    t.sandbox
        .graph
        .set_faults(flagrelay::sim::graph::GraphSimFaults {
            duplicate_probability: 0.5,
            reorder_window: 5,
            delivery_delay: Duration::from_millis(20),
            delivery_jitter: Duration::from_millis(80),
            ..Default::default()
        })
        .unwrap();
    // Several flips per user; the last one decides.
    for round in 0..3 {
        for u in &users {
            t.sandbox.set_enabled(u, round % 2 == 1);
        }
    }
    for u in &users {
        t.sandbox.set_enabled(u, false);
    }
    assert!(
        eventually(CONVERGE, || users
            .iter()
            .all(|u| t.sandbox.is_active(u) == Some(false)))
        .await,
        "every user converged to Not Active"
    );
    assert!(t.sandbox.graph.settle(Duration::from_secs(10)).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        users.iter().all(|u| t.sandbox.is_active(u) == Some(false)),
        "late duplicates did not undo it"
    );
    t.stop().await;
}

#[tokio::test]
async fn proofpoint_503s_are_retried_then_applied() {
    let t = TestApp::start("pp503", Options::default()).await;
    let bob = t.sandbox.seed_user("bob", true, "end_user");
    assert!(
        t.sandbox.graph.settle(Duration::from_secs(5)).await,
        "seeding notifications delivered"
    );
    t.sandbox.proofpoint.fail_next(3, 503);
    t.sandbox.set_enabled(&bob, false);
    assert!(eventually(CONVERGE, || t.sandbox.is_active(&bob) == Some(false)).await);
    let failures = t
        .sandbox
        .proofpoint
        .request_log()
        .iter()
        .filter(|r| r.status == 503)
        .count();
    assert_eq!(failures, 3, "the injected failures were hit");
    assert!(Metrics::get(&t.app.metrics.outcomes_retried_total) >= 1);
    t.stop().await;
}

#[tokio::test]
async fn exhausted_attempts_are_dead_lettered_with_their_reason() {
    let t = TestApp::start(
        "maxattempts",
        Options {
            max_attempts: 2,
            ..Options::default()
        },
    )
    .await;
    let carol = t.sandbox.seed_user("carol", true, "end_user");
    assert!(
        t.sandbox.graph.settle(Duration::from_secs(5)).await,
        "seeding notifications delivered"
    );
    t.sandbox.proofpoint.fail_for(Duration::from_secs(60), 503);
    t.sandbox.set_enabled(&carol, false);
    let dead = dead_letters(t.app.queue.as_ref(), 1).await;
    let d = dead.first().expect("a dead letter");
    assert_eq!(d.reason(), Some("max_attempts_exceeded"));
    assert_eq!(
        d.headers
            .get(flagrelay::queue::ATTEMPT_HEADER)
            .map(String::as_str),
        Some("2")
    );
    assert!(
        d.headers
            .get(flagrelay::queue::LAST_ERROR_HEADER)
            .is_some_and(|e| e.contains("503")),
        "{:?}",
        d.headers
    );
    assert_eq!(
        t.sandbox.is_active(&carol),
        Some(true),
        "Proofpoint untouched"
    );
    t.stop().await;
}

#[tokio::test]
async fn a_message_with_a_bad_signature_is_dead_lettered_and_never_applied() {
    let t = TestApp::start("badsig", Options::default()).await;
    let dave = t.sandbox.seed_user("dave", true, "end_user");
    // The seeding notification must be fully processed first: a worker reading Graph after
    // the silent change below would (rightly) apply it.
    assert!(
        eventually(CONVERGE, || processed(&t) >= 1).await,
        "seeding processed"
    );
    // Block sign-in in Graph *without* a notification, then forge one signed with a wrong key.
    t.sandbox
        .graph
        .set_faults(flagrelay::sim::graph::GraphSimFaults {
            drop_probability: 1.0,
            ..Default::default()
        })
        .unwrap();
    t.sandbox.set_enabled(&dave, false);
    t.app
        .queue
        .publish(&crate::support::forged_change(&dave.id))
        .await
        .unwrap();
    let dead = dead_letters(t.app.queue.as_ref(), 1).await;
    assert_eq!(
        dead.first().and_then(DeadLetter::reason),
        Some("bad_signature")
    );
    assert_eq!(Metrics::get(&t.app.metrics.signature_failures_total), 1);
    assert_eq!(
        t.sandbox.is_active(&dave),
        Some(true),
        "a forged message changed nothing"
    );
    t.stop().await;
}

#[tokio::test]
async fn deleted_unknown_and_protected_users_are_left_alone() {
    let t = TestApp::start("leftalone", Options::default()).await;
    let admin = t.sandbox.seed_user("boss", true, "organization_admin");
    let functional = t.sandbox.seed_user("sales", true, "functional_account");
    let gone = t.sandbox.seed_user("gone", true, "end_user");
    // Let the three seeding notifications be processed, then count from there.
    assert!(
        eventually(CONVERGE, || processed(&t) >= 3).await,
        "seeding processed"
    );
    let skipped_before = Metrics::get(&t.app.metrics.outcomes_skipped_total);
    t.sandbox.set_enabled(&admin, false);
    t.sandbox.set_enabled(&functional, false);
    t.sandbox.graph.delete_user(TENANT, &gone.id).unwrap();
    // A user Proofpoint does not know.
    t.sandbox
        .graph
        .upsert_user(
            TENANT,
            flagrelay::graph::GraphUser {
                id: "ext-1".into(),
                account_enabled: Some(false),
                mail: Some("stranger@contoso.test".into()),
                ..Default::default()
            },
        )
        .unwrap();
    assert!(
        eventually(CONVERGE, || Metrics::get(
            &t.app.metrics.outcomes_skipped_total
        ) >= skipped_before + 4)
        .await
    );
    assert_eq!(t.sandbox.is_active(&admin), Some(true));
    assert_eq!(t.sandbox.is_active(&functional), Some(true));
    assert_eq!(t.sandbox.is_active(&gone), Some(true));
    assert_eq!(Metrics::get(&t.app.metrics.outcomes_applied_total), 0);
    t.stop().await;
}

#[tokio::test]
async fn two_tenants_with_two_orgs_are_kept_apart() {
    let t = TestApp::start(
        "tenants",
        Options {
            second_tenant: true,
            ..Options::default()
        },
    )
    .await;
    let alice = t.sandbox.seed_user("alice", true, "end_user");
    let bob = t
        .sandbox
        .seed_user_in(TENANT_B, ORG_B, "bob", true, "end_user");
    // The same mailbox name exists in both orgs.
    let alice_b = t
        .sandbox
        .seed_user_in(TENANT_B, ORG_B, "alice", true, "end_user");
    assert!(eventually(CONVERGE, || processed(&t) >= 3).await);
    t.sandbox.set_enabled(&bob, false);
    t.sandbox.set_enabled(&alice_b, false);
    assert!(
        eventually(CONVERGE, || t.sandbox.is_active(&bob) == Some(false)).await,
        "tenant B's change reached org B"
    );
    assert!(eventually(CONVERGE, || t.sandbox.is_active(&alice_b) == Some(false)).await);
    assert_eq!(
        t.sandbox.is_active(&alice),
        Some(true),
        "org A's alice untouched by tenant B's alice"
    );
    let org_a_writes = t
        .sandbox
        .proofpoint
        .writes()
        .iter()
        .filter(|w| w.domain == t.sandbox.org && w.method == "PUT")
        .count();
    assert_eq!(org_a_writes, 0, "nothing was written to org A");
    t.stop().await;
}

#[tokio::test]
async fn queued_messages_for_one_user_are_coalesced_into_one_evaluation() {
    let t = TestApp::start(
        "coalesce",
        Options {
            worker: false,
            ..Options::default()
        },
    )
    .await;
    let u = t.sandbox.seed_user("busy", true, "end_user");
    for enabled in [false, true, false, true, false] {
        t.sandbox.set_enabled(&u, enabled);
    }
    assert!(
        t.sandbox.graph.settle(Duration::from_secs(10)).await,
        "six notifications queued"
    );
    // Older than the clock margin by the time the worker starts.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn(
        t.app
            .worker(flagrelay::history::HistorySink::discard())
            .await
            .unwrap()
            .run(stop.clone()),
    );
    assert!(eventually(CONVERGE, || processed(&t) >= 6).await);
    assert_eq!(
        t.sandbox.is_active(&u),
        Some(false),
        "converged to the final state"
    );
    let reads = t
        .sandbox
        .proofpoint
        .request_log()
        .iter()
        .filter(|r| r.method == "GET" && r.email.as_deref() == Some(u.address.as_str()))
        .count();
    assert_eq!(
        reads, 1,
        "one evaluation read Proofpoint; the other five were coalesced"
    );
    assert_eq!(Metrics::get(&t.app.metrics.outcomes_skipped_total), 5);
    stop.cancel();
    let _ = worker.await;
    t.stop().await;
}

#[tokio::test]
async fn dead_letters_are_listed_without_loss_then_redriven_through_the_normal_path() {
    use flagrelay::queue::Redrive;
    for backend in [Backend::Rabbit, Backend::Embedded] {
        let t = TestApp::start(
            "redrive",
            Options {
                backend,
                max_attempts: 2,
                ..Options::default()
            },
        )
        .await;
        let u = t.sandbox.seed_user("parked", true, "end_user");
        assert!(eventually(CONVERGE, || processed(&t) >= 1).await);
        t.sandbox.proofpoint.fail_for(Duration::from_secs(60), 503);
        t.sandbox.set_enabled(&u, false);
        let q = t.app.queue.clone();
        let mut letters = Vec::new();
        for _ in 0..150 {
            letters = q.peek_dead_letters(10).await.unwrap();
            if !letters.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(letters.len(), 1, "{backend:?}");
        assert_eq!(
            q.peek_dead_letters(10).await.unwrap().len(),
            1,
            "{backend:?}: peeking removes nothing"
        );
        assert_eq!(
            q.redrive_dead_letters(&Redrive::Ids(vec!["not-an-id".into()]))
                .await
                .unwrap(),
            0
        );

        // The outage is over; the operator redrives the letter.
        t.sandbox.proofpoint.clear_faults();
        let id = letters[0].message_id.clone().unwrap();
        assert_eq!(
            q.redrive_dead_letters(&Redrive::Ids(vec![id]))
                .await
                .unwrap(),
            1
        );
        assert!(
            eventually(CONVERGE, || t.sandbox.is_active(&u) == Some(false)).await,
            "{backend:?}: applied after redrive"
        );
        assert!(
            q.peek_dead_letters(10).await.unwrap().is_empty(),
            "{backend:?}"
        );
        assert_eq!(q.purge_dead_letters().await.unwrap(), 0);
        t.stop().await;
    }
}
