//! Fault injection through the whole pipeline: broker connections cut, and the broker itself
//! restarted, in the middle of a load of notifications. (The queue layer's own cut-and-freeze
//! tests are in `queue_conformance`; worker processes killed are in `process`.)

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use flagrelay::sim::sandbox::SeededUser;
use futures::StreamExt;
use secrecy::{ExposeSecret, SecretString};

use crate::rabbit_node::RabbitNode;
use crate::support::{Options, Proxy, TestApp, change_notification, eventually};

/// Notifications posted per load.
const NOTIFICATIONS: usize = 1000;
/// How long one notification may keep getting 503 before the test calls the receiver stuck.
const GIVE_UP_AFTER: Duration = Duration::from_secs(180);

/// flagrelay on `amqp_url` with 200 users whose final state is set without notifications
/// (nobody is subscribed): every other user blocked. Only notifications may converge them
/// here: the delta backstop is off.
async fn app_with_users(name: &str, amqp_url: SecretString) -> (TestApp, Vec<SeededUser>) {
    let opts = Options {
        amqp_url: Some(amqp_url),
        subscribe: false,
        ..Options::default()
    };
    let t = TestApp::start_with(name, opts, |c| {
        c.leader.delta_interval = Duration::from_secs(3600);
        c.receiver.retry_after = Duration::from_secs(1);
    })
    .await;
    let users: Vec<_> = (0..200)
        .map(|i| {
            t.sandbox
                .seed_user(&format!("load{i:03}"), true, "end_user")
        })
        .collect();
    for u in users.iter().step_by(2) {
        t.sandbox.set_enabled(u, false);
    }
    (t, users)
}

/// What the load saw.
#[derive(Debug, Default)]
struct Counts {
    accepted: AtomicUsize,
    unavailable: AtomicUsize,
}

/// Post [`NOTIFICATIONS`] notifications as Graph does (five per user, 20 in flight, each
/// retried on 503), while `fault` runs alongside with the live counts. Returns the counts.
async fn load_with_fault<F>(t: &TestApp, users: &[SeededUser], fault: F) -> Arc<Counts>
where
    F: AsyncFnOnce(&Counts),
{
    let client = reqwest::Client::new();
    let endpoint = format!("{}/graph/notifications", t.url);
    let client_state = t.app.config.graph.client_state().expose_secret().to_owned();
    let counts = Arc::new(Counts::default());
    let load = futures::stream::iter(0..NOTIFICATIONS).for_each_concurrent(20, |n| {
        let user = &users[n % users.len()];
        let body = serde_json::json!({"value": [change_notification(&client_state, &user.id, n)]});
        let (client, endpoint, counts) = (&client, &endpoint, counts.clone());
        async move {
            let deadline = Instant::now() + GIVE_UP_AFTER;
            while Instant::now() < deadline {
                // A refused or reset connection is what Graph would see too: try again.
                let Ok(answer) = client.post(endpoint).json(&body).send().await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                match answer.status().as_u16() {
                    202 => {
                        counts.accepted.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    503 => {
                        counts.unavailable.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    other => panic!("unexpected status {other}"),
                }
            }
            panic!("notification {n} never accepted: the receiver did not recover");
        }
    });
    tokio::join!(load, fault(&counts));
    counts
}

/// Wait until `counts` shows at least `mark` accepted notifications.
async fn accepted_reaches(counts: &Counts, mark: usize) {
    while counts.accepted.load(Ordering::SeqCst) < mark {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Every notification got its 202 and every user reached its final state.
async fn assert_everything_converged(t: &TestApp, users: &[SeededUser], counts: &Counts) {
    assert_eq!(
        counts.accepted.load(Ordering::SeqCst),
        NOTIFICATIONS,
        "every notification was eventually accepted"
    );
    let converged = || {
        users
            .iter()
            .enumerate()
            .all(|(i, u)| t.sandbox.is_active(u) == Some(i % 2 == 1))
    };
    assert!(
        eventually(Duration::from_secs(120), converged).await,
        "every user converged after the faults"
    );
    eprintln!(
        "503 answers during the faults: {}",
        counts.unavailable.load(Ordering::SeqCst)
    );
}

#[tokio::test]
async fn broker_cuts_under_a_load_of_1000_notifications_lose_nothing_answered_202() {
    let proxy = Proxy::start().await;
    let (t, users) = app_with_users("cut", proxy.url()).await;
    // Cut every broker connection twice while the load runs.
    let counts = load_with_fault(&t, &users, async |counts| {
        for mark in [300, 700] {
            accepted_reaches(counts, mark).await;
            proxy.kill_all();
        }
    })
    .await;
    assert_everything_converged(&t, &users, &counts).await;
    t.stop().await;
}

#[tokio::test]
async fn broker_restart_under_a_load_of_1000_notifications_loses_nothing_answered_202() {
    // A node of this test's own: restarting the shared broker would break the other tests.
    let mut node = RabbitNode::start().await;
    let (t, users) = app_with_users("restart", node.url()).await;
    let counts = load_with_fault(&t, &users, async |counts| {
        accepted_reaches(counts, 400).await;
        // Down for as long as a real node takes to stop and start again (seconds, here).
        node.restart().await;
        let during = counts.unavailable.load(Ordering::SeqCst);
        assert!(
            during > 0,
            "the receiver answered 503 while the broker was down"
        );
    })
    .await;
    assert_everything_converged(&t, &users, &counts).await;
    t.stop().await;
}
