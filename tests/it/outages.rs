//! The outside APIs failing for a while: Proofpoint answering 5xx or 429 for a sustained
//! period, Graph throttling with `Retry-After`. Retries must be spaced as configured (never a
//! hot loop), every change must land once the API recovers, and a message is dead-lettered
//! only after its last allowed attempt.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use flagrelay::queue::{ATTEMPT_HEADER, QueueSettings, Redrive};
use flagrelay::sim::sandbox::SeededUser;
use flagrelay::worker::outcome::{RetryPolicy, backoff};

use crate::support::{Options, TestApp, eventually, processed, test_queue_settings};

/// Start flagrelay with `max_attempts`, backoff 100 ms doubling up to 1 s, and ten users
/// (active, enabled). Only notifications drive work here: no delta backstop.
async fn app(name: &str, max_attempts: u32) -> (TestApp, Vec<SeededUser>, RetryPolicy) {
    let t = TestApp::start_with(
        name,
        Options {
            max_attempts,
            ..Options::default()
        },
        |c| {
            c.worker.backoff_base = Duration::from_millis(100);
            c.worker.backoff_max = Duration::from_secs(1);
            c.leader.delta_interval = Duration::from_secs(3600);
        },
    )
    .await;
    let policy = RetryPolicy {
        max_attempts,
        backoff_base: t.app.config.worker.backoff_base,
        backoff_max: t.app.config.worker.backoff_max,
    };
    let users: Vec<_> = (0..10)
        .map(|i| t.sandbox.seed_user(&format!("out{i}"), true, "end_user"))
        .collect();
    // Creating the users notified too; those evaluations are done before any fault.
    assert!(
        eventually(Duration::from_secs(30), || processed(&t)
            >= users.len() as u64)
        .await
    );
    t.sandbox.proofpoint.clear_records();
    (t, users, policy)
}

/// Every Proofpoint read of each user's record (one per evaluation attempt), in order.
fn reads_per_user(t: &TestApp) -> BTreeMap<String, Vec<(Instant, Instant, u16)>> {
    let mut reads: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for r in t.sandbox.proofpoint.request_log() {
        if r.method == "GET"
            && r.path.contains("/users/")
            && let Some(email) = r.email
        {
            reads
                .entry(email)
                .or_default()
                .push((r.started, r.finished, r.status));
        }
    }
    for v in reads.values_mut() {
        v.sort_by_key(|(started, ..)| *started);
    }
    reads
}

/// The shortest wait the configuration allows before attempt `n + 1`: the backoff of attempt
/// `n` at its lowest jitter (0.8), rounded up to the retry tier it waits in.
fn least_wait(settings: &QueueSettings, policy: &RetryPolicy, attempt: u32) -> Duration {
    settings.tier_for(backoff(policy, attempt).mul_f64(0.8))
}

#[tokio::test]
async fn a_sustained_proofpoint_outage_is_retried_with_spaced_attempts_and_every_change_lands() {
    let (t, users, policy) = app("pp-outage", 12).await;
    // The queue's tiers as the test harness configures them (100 ms, 300 ms, 1 s).
    let settings = test_queue_settings("tiers");
    let outage = Duration::from_secs(4);
    t.sandbox.proofpoint.fail_for(outage, 503);
    let outage_started = Instant::now();
    for u in &users {
        t.sandbox.set_enabled(u, false);
    }
    assert!(
        eventually(Duration::from_secs(60), || users
            .iter()
            .all(|u| t.sandbox.is_active(u) == Some(false)))
        .await,
        "every change landed after the outage"
    );
    assert!(
        outage_started.elapsed() >= outage,
        "nothing landed during the outage"
    );

    let reads = reads_per_user(&t);
    for u in &users {
        let attempts = &reads[&u.address.to_lowercase()];
        let failed = attempts.iter().filter(|(.., s)| *s == 503).count();
        assert!(
            failed >= 3,
            "{}: the outage was retried ({failed} failures)",
            u.address
        );
        assert!(
            failed < policy.max_attempts as usize,
            "{}: recovered before the last attempt",
            u.address
        );
        // Attempt n failed → attempt n+1 no sooner than the configured backoff allows.
        for (n, pair) in attempts.windows(2).enumerate() {
            let ((_, failed_at, status), (next_started, ..)) = (pair[0], pair[1]);
            assert_eq!(status, 503, "only failures are retried");
            let waited = next_started - failed_at;
            let least = least_wait(&settings, &policy, n as u32 + 1);
            // 2 % for the broker's millisecond TTL timer.
            assert!(
                waited >= least.mul_f64(0.98),
                "{}: attempt {} came {waited:?} after a failure; the configuration says at \
                 least {least:?}",
                u.address,
                n + 2
            );
        }
    }
    assert!(
        t.app.queue.peek_dead_letters(10).await.unwrap().is_empty(),
        "nothing dead-lettered: the outage ended before the attempts ran out"
    );
    t.stop().await;
}

#[tokio::test]
async fn proofpoint_throttling_longer_than_the_attempts_dead_letters_only_after_the_last_attempt() {
    let max_attempts = 4;
    let (t, users, _) = app("pp-throttle", max_attempts).await;
    t.sandbox
        .proofpoint
        .set_faults(flagrelay::sim::proofpoint::ProofpointSimFaults {
            fail_for: Some(Duration::from_secs(600)),
            fail_for_status: 429,
            ..Default::default()
        });
    for u in &users {
        t.sandbox.set_enabled(u, false);
    }
    let queue = t.app.queue.clone();
    let mut letters = Vec::new();
    for _ in 0..300 {
        letters = queue.peek_dead_letters(100).await.unwrap();
        if letters.len() >= users.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(letters.len(), users.len(), "one dead letter per user");
    for letter in &letters {
        assert_eq!(letter.reason(), Some("max_attempts_exceeded"));
        assert_eq!(
            letter.headers.get(ATTEMPT_HEADER).map(String::as_str),
            Some(max_attempts.to_string().as_str()),
            "dead-lettered after exactly max_attempts attempts"
        );
    }
    // The simulator saw exactly max_attempts reads per user: not one more, not one fewer.
    let reads = reads_per_user(&t);
    for u in &users {
        assert_eq!(
            reads[&u.address.to_lowercase()].len(),
            max_attempts as usize,
            "{}",
            u.address
        );
    }
    for u in &users {
        assert_eq!(t.sandbox.is_active(u), Some(true), "nothing was written");
    }

    // Throttling is over; the operator redrives everything and it lands.
    t.sandbox.proofpoint.clear_faults();
    assert_eq!(
        queue.redrive_dead_letters(&Redrive::All).await.unwrap(),
        users.len()
    );
    assert!(
        eventually(Duration::from_secs(30), || users
            .iter()
            .all(|u| t.sandbox.is_active(u) == Some(false)))
        .await,
        "every change landed after the redrive"
    );
    t.stop().await;
}

#[tokio::test]
async fn graph_throttling_with_retry_after_is_honoured_end_to_end() {
    let (t, users, _) = app("graph-429", 5).await;
    let (first, second) = (&users[0], &users[1]);
    let retry_after = Duration::from_secs(1);
    let since = Instant::now();
    let user_reads = || {
        t.sandbox
            .graph
            .request_log()
            .into_iter()
            .filter(|r| r.started >= since && r.path.contains("/users"))
            .collect::<Vec<_>>()
    };
    t.sandbox
        .graph
        .throttle_next(1, Some(retry_after.as_secs()));
    t.sandbox.set_enabled(first, false);
    assert!(
        eventually(Duration::from_secs(10), || user_reads()
            .iter()
            .any(|r| r.status == 429))
        .await,
        "the worker's read was throttled"
    );
    // Another user changes while the tenant is throttled: its read must wait too.
    t.sandbox.set_enabled(second, false);
    assert!(
        eventually(Duration::from_secs(30), || [first, second]
            .iter()
            .all(|u| t.sandbox.is_active(u) == Some(false)))
        .await,
        "both changes landed after the throttling"
    );
    let reads = user_reads();
    let throttled = reads.iter().find(|r| r.status == 429).unwrap();
    // Graph throttles the app in the tenant: after the 429, no read of any user went out
    // before Retry-After had passed. (Reads already on their way when the 429 was answered
    // cannot be called back; they get 100 ms, less than the shortest retry tier.)
    let in_flight = Duration::from_millis(100);
    let quiet_until = throttled.finished + retry_after.mul_f64(0.98);
    let early: Vec<_> = reads
        .iter()
        .filter(|r| r.started > throttled.finished + in_flight && r.started < quiet_until)
        .map(|r| (&r.path, r.started - throttled.finished))
        .collect();
    assert!(
        early.is_empty(),
        "requests sent within Retry-After of a 429: {early:?}"
    );
    for u in [first, second] {
        assert!(
            reads
                .iter()
                .any(|r| r.path.contains(&u.id) && r.status == 200 && r.started >= quiet_until),
            "{} was read after Retry-After",
            u.address
        );
    }
    t.stop().await;
}
