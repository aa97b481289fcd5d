//! Queue conformance: every behaviour the worker and the receiver rely on, checked against both
//! backends. Each scenario is one generic function over a [`Backend`]; the `conformance!` macro
//! instantiates it as `rabbit::<name>` (real broker, unique prefix, 2 shards) and
//! `embedded::<name>`. A few scenarios only make sense for RabbitMQ (unreachable broker,
//! topology conflicts, dying connections) and live in `rabbit_only`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flagrelay::message::Encoded;
use flagrelay::queue::embedded::EmbeddedQueue;
use flagrelay::queue::rabbitmq::RabbitQueue;
use flagrelay::queue::{
    ATTEMPT_HEADER, DEAD_LETTERED_AT_HEADER, Delivery, Depths, LAST_ERROR_HEADER,
    LAST_ERROR_MAX_BYTES, Queue, QueueError, QueueSettings, REASON_HEADER, Settlement, shard_for,
};
use tokio::sync::mpsc::Receiver;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::support;

/// Longest wait for something that should happen (generous: CI machines are slow).
const PATIENCE: Duration = Duration::from_secs(10);
/// How long "nothing else arrives" is watched.
const QUIET: Duration = Duration::from_millis(400);

/// One backend under test, plus what some scenarios need besides the trait.
struct Backend {
    queue: Arc<dyn Queue>,
    /// Another handle on the same queues: a second process (RabbitMQ) or a clone (embedded).
    other: Box<dyn Fn() -> Arc<dyn Queue> + Send + Sync>,
    settings: QueueSettings,
    rabbit: Option<RabbitQueue>,
}

fn settings(prefix: String) -> QueueSettings {
    QueueSettings {
        prefix,
        shards: 2,
        retry_tiers: vec![Duration::from_millis(100), Duration::from_millis(300)],
        publish_timeout: Duration::from_secs(2),
        prefetch: 8,
    }
}

async fn rabbit(test: &str) -> Backend {
    support::require_broker().await;
    let settings = settings(support::unique_prefix(test));
    let queue = RabbitQueue::new(support::amqp_secret(), settings.clone());
    let s = settings.clone();
    Backend {
        queue: Arc::new(queue.clone()),
        other: Box::new(move || Arc::new(RabbitQueue::new(support::amqp_secret(), s.clone()))),
        settings,
        rabbit: Some(queue),
    }
}

fn embedded(test: &str) -> Backend {
    let settings = settings(support::unique_prefix(test));
    let queue = EmbeddedQueue::new(settings.clone());
    let other = queue.clone();
    Backend {
        queue: Arc::new(queue),
        other: Box::new(move || Arc::new(other.clone())),
        settings,
        rabbit: None,
    }
}

impl Backend {
    /// Delete the test's exchanges and queues (after every consumer has stopped).
    async fn cleanup(self) {
        if let Some(rabbit) = self.rabbit {
            rabbit.delete_topology().await.expect("delete topology");
        }
    }

    /// A shard key that lands on `shard`.
    fn key_on(&self, shard: u16) -> String {
        (0..)
            .map(|i| format!("tenant/user-{i}"))
            .find(|k| shard_for(k, self.settings.shards) == shard)
            .expect("some key hits every shard")
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod rabbit {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let backend = super::rabbit(stringify!($name)).await;
                    super::$name(&backend).await;
                    backend.cleanup().await;
                }
            )*
        }
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let backend = super::embedded(stringify!($name));
                    super::$name(&backend).await;
                    backend.cleanup().await;
                }
            )*
        }
    };
}

conformance!(
    declare_twice_is_fine,
    publish_consume_ack_and_nothing_comes_back,
    one_key_is_delivered_in_order,
    concurrent_publishes_each_get_their_confirm,
    retry_waits_for_its_tier_and_counts_attempts,
    dead_letter_keeps_reason_attempts_and_error,
    unsettled_delivery_is_redelivered,
    one_consumer_per_shard_and_takeover,
    publish_event_needs_nobody_bound,
    depths_count_ready_waiting_and_dead_messages,
);

fn message(key: &str, n: usize) -> Encoded {
    let id = uuid::Uuid::new_v4().to_string();
    let mut headers = BTreeMap::new();
    headers.insert("x-flagrelay-signature".to_owned(), format!("sig-{n}"));
    headers.insert("x-flagrelay-key-id".to_owned(), "k1".to_owned());
    Encoded {
        body: Bytes::from(format!(r#"{{"id":"{id}","n":{n}}}"#)),
        id,
        event_type: "io.flagrelay.test.v1",
        shard_key: key.to_owned(),
        routing_key: String::new(),
        headers,
    }
}

async fn next(rx: &mut Receiver<Delivery>) -> Delivery {
    tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .expect("a delivery within the patience")
        .expect("the consumer is still running")
}

async fn assert_quiet(rx: &mut Receiver<Delivery>, watch: Duration) {
    if let Ok(Some(d)) = tokio::time::timeout(watch, rx.recv()).await {
        panic!("unexpected delivery: {:?}", d.delivered);
    }
}

/// Stop a consumer and wait until it has (its receiver ends); undelivered messages go back.
async fn stop(token: CancellationToken, mut rx: Receiver<Delivery>) {
    token.cancel();
    tokio::time::timeout(PATIENCE, async { while rx.recv().await.is_some() {} })
        .await
        .expect("the consumer stops within the patience");
}

async fn consume(queue: &Arc<dyn Queue>) -> (CancellationToken, Receiver<Delivery>) {
    let token = CancellationToken::new();
    let rx = queue.consume(token.clone()).await.expect("consume");
    (token, rx)
}

async fn declare_twice_is_fine(b: &Backend) {
    b.queue.declare().await.expect("first declare");
    b.queue.declare().await.expect("second declare");
    (b.other)()
        .declare()
        .await
        .expect("declare from another instance");
}

async fn publish_consume_ack_and_nothing_comes_back(b: &Backend) {
    let key = b.key_on(1);
    let sent = message(&key, 1);
    b.queue.publish(&sent).await.expect("publish");
    let (token, mut rx) = consume(&b.queue).await;
    let d = next(&mut rx).await;
    assert_eq!(d.delivered.body, sent.body);
    assert_eq!(d.delivered.message_id.as_deref(), Some(sent.id.as_str()));
    assert_eq!(d.delivered.shard, 1);
    assert!(!d.delivered.redelivered);
    assert_eq!(d.delivered.attempt(), 0);
    for (k, v) in &sent.headers {
        assert_eq!(d.delivered.headers.get(k), Some(v), "header {k}");
    }
    d.settle(&Settlement::Ack).await.expect("ack");
    assert_quiet(&mut rx, QUIET).await;
    stop(token, rx).await;

    // A new consumer (a restarted worker) does not get it again either.
    let (token, mut rx) = consume(&b.queue).await;
    assert_quiet(&mut rx, QUIET).await;
    stop(token, rx).await;
}

async fn one_key_is_delivered_in_order(b: &Backend) {
    let key = b.key_on(0);
    let sent: Vec<_> = (0..20).map(|n| message(&key, n)).collect();
    for m in &sent {
        b.queue.publish(m).await.expect("publish");
    }
    let (token, mut rx) = consume(&b.queue).await;
    for m in &sent {
        let d = next(&mut rx).await;
        assert_eq!(d.delivered.message_id.as_deref(), Some(m.id.as_str()));
        d.settle(&Settlement::Ack).await.expect("ack");
    }
    stop(token, rx).await;
}

async fn concurrent_publishes_each_get_their_confirm(b: &Backend) {
    let sent: Vec<_> = (0..200)
        .map(|n| message(&format!("tenant/user-{}", n % 17), n))
        .collect();
    let tasks: Vec<_> = sent
        .iter()
        .cloned()
        .map(|m| {
            let q = b.queue.clone();
            tokio::spawn(async move { q.publish(&m).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().expect("every publish is confirmed");
    }
    let (token, mut rx) = consume(&b.queue).await;
    let mut ids = HashSet::new();
    for _ in &sent {
        let d = next(&mut rx).await;
        ids.insert(d.delivered.message_id.clone().unwrap());
        d.settle(&Settlement::Ack).await.expect("ack");
    }
    let expected: HashSet<_> = sent.iter().map(|m| m.id.clone()).collect();
    assert_eq!(ids, expected);
    stop(token, rx).await;
}

async fn retry_waits_for_its_tier_and_counts_attempts(b: &Backend) {
    let key = b.key_on(1);
    let sent = message(&key, 7);
    b.queue.publish(&sent).await.expect("publish");
    let (token, mut rx) = consume(&b.queue).await;
    let d = next(&mut rx).await;

    // 250 ms rounds up to the 300 ms tier.
    let long_error = "e".repeat(3 * LAST_ERROR_MAX_BYTES);
    let retried_at = Instant::now();
    let retry = Settlement::Retry {
        delay: Duration::from_millis(250),
        attempt: 1,
        last_error: long_error,
    };
    d.settle(&retry).await.expect("retry");
    let d = next(&mut rx).await;
    let waited = retried_at.elapsed();
    assert!(
        waited >= Duration::from_millis(300),
        "came back after {waited:?}"
    );
    assert_eq!(d.delivered.message_id.as_deref(), Some(sent.id.as_str()));
    assert_eq!(d.delivered.body, sent.body);
    assert_eq!(d.delivered.shard, 1, "back on its own shard");
    assert_eq!(d.delivered.attempt(), 1);
    let error = &d.delivered.headers[LAST_ERROR_HEADER];
    assert!(error.starts_with("eee") && error.len() <= LAST_ERROR_MAX_BYTES);
    assert_eq!(
        d.delivered.headers.get("x-flagrelay-signature"),
        sent.headers.get("x-flagrelay-signature")
    );

    // A second retry on the shortest tier counts on.
    let retried_at = Instant::now();
    let retry = Settlement::Retry {
        delay: Duration::from_millis(1),
        attempt: 2,
        last_error: "HTTP 503 from Graph".into(),
    };
    d.settle(&retry).await.expect("retry again");
    let d = next(&mut rx).await;
    assert!(retried_at.elapsed() >= Duration::from_millis(100));
    assert_eq!(d.delivered.attempt(), 2);
    assert_eq!(
        d.delivered.headers[LAST_ERROR_HEADER],
        "HTTP 503 from Graph"
    );
    d.settle(&Settlement::Ack).await.expect("ack");
    assert_quiet(&mut rx, QUIET).await;
    stop(token, rx).await;
}

async fn dead_letter_keeps_reason_attempts_and_error(b: &Backend) {
    let sent = message(&b.key_on(0), 3);
    b.queue.publish(&sent).await.expect("publish");
    let (token, mut rx) = consume(&b.queue).await;
    let d = next(&mut rx).await;
    let dead = Settlement::DeadLetter {
        reason: "unknown message type".into(),
        attempts: 3,
        last_error: "boom".into(),
    };
    d.settle(&dead).await.expect("dead-letter");
    assert_quiet(&mut rx, QUIET).await;
    stop(token, rx).await;

    let letters = b.queue.take_dead_letters(10).await.expect("take");
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter.message_id.as_deref(), Some(sent.id.as_str()));
    assert_eq!(letter.body, sent.body);
    assert_eq!(letter.reason(), Some("unknown message type"));
    assert_eq!(letter.headers[REASON_HEADER], "unknown message type");
    assert_eq!(letter.headers[ATTEMPT_HEADER], "3");
    assert_eq!(letter.headers[LAST_ERROR_HEADER], "boom");
    chrono::DateTime::parse_from_rfc3339(&letter.headers[DEAD_LETTERED_AT_HEADER])
        .expect("dead-lettered-at is RFC 3339");
    assert!(
        b.queue.take_dead_letters(10).await.unwrap().is_empty(),
        "taken means removed"
    );
}

/// Poll `depths()` until `want` holds (counts can trail a confirm by a moment).
async fn depths_until(b: &Backend, what: &str, want: impl Fn(&Depths) -> bool) -> Depths {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let d = b.queue.depths().await.expect("depths");
        if want(&d) {
            return d;
        }
        assert!(Instant::now() < deadline, "{what}: last read {d:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn depths_count_ready_waiting_and_dead_messages(b: &Backend) {
    b.queue.declare().await.expect("declare");
    assert_eq!(b.queue.depths().await.expect("depths"), Depths::default());
    for n in 0..3 {
        b.queue
            .publish(&message(&b.key_on(n % 2), n.into()))
            .await
            .expect("publish");
    }
    depths_until(b, "three ready", |d| d.work == 3).await;

    let (token, mut rx) = consume(&b.queue).await;
    let (d1, d2, d3) = (
        next(&mut rx).await,
        next(&mut rx).await,
        next(&mut rx).await,
    );
    // Handed to a consumer and unacknowledged: no longer ready.
    depths_until(b, "none ready while held", |d| d.work == 0).await;
    d1.settle(&Settlement::Ack).await.expect("ack");
    d2.settle(&Settlement::DeadLetter {
        reason: "test".into(),
        attempts: 1,
        last_error: "boom".into(),
    })
    .await
    .expect("dead-letter");
    let parked = Instant::now();
    d3.settle(&Settlement::Retry {
        delay: Duration::from_millis(300),
        attempt: 1,
        last_error: "later".into(),
    })
    .await
    .expect("retry");
    let d = b.queue.depths().await.expect("depths");
    assert_eq!(d.dead_letter, 1, "{d:?}");
    if parked.elapsed() < Duration::from_millis(250) {
        assert_eq!(d.retry, 1, "waiting on its 300 ms tier: {d:?}");
    } else {
        assert_eq!(d.retry + d.work, 1, "waiting, or back already: {d:?}");
    }
    stop(token, rx).await;
    // Back from its tier with nobody consuming: ready on its shard again.
    depths_until(b, "the retry is back", |d| {
        d.work == 1 && d.retry == 0 && d.dead_letter == 1
    })
    .await;
}

async fn unsettled_delivery_is_redelivered(b: &Backend) {
    let sent = message(&b.key_on(1), 1);
    b.queue.publish(&sent).await.expect("publish");
    let (token, mut rx) = consume(&b.queue).await;
    let d = next(&mut rx).await;
    assert!(!d.delivered.redelivered);
    // The worker dies holding it, then the consumer goes away.
    drop(d);
    stop(token, rx).await;

    let (token, mut rx) = consume(&(b.other)()).await;
    let d = next(&mut rx).await;
    assert_eq!(d.delivered.message_id.as_deref(), Some(sent.id.as_str()));
    assert!(d.delivered.redelivered, "flagged as redelivered");
    d.settle(&Settlement::Ack).await.expect("ack");
    assert_quiet(&mut rx, QUIET).await;
    stop(token, rx).await;
}

/// Receive `n` deliveries from either consumer, ack them, and say who got which shard.
async fn collect(
    n: usize,
    a: &mut Receiver<Delivery>,
    b: Option<&mut Receiver<Delivery>>,
) -> HashMap<u16, HashSet<&'static str>> {
    let mut served: HashMap<u16, HashSet<&'static str>> = HashMap::new();
    let mut b = b;
    for _ in 0..n {
        let (who, d) = tokio::time::timeout(PATIENCE, async {
            match b.as_deref_mut() {
                Some(b) => tokio::select! {
                    Some(d) = a.recv() => ("a", d),
                    Some(d) = b.recv() => ("b", d),
                },
                None => ("a", a.recv().await.expect("consumer a runs")),
            }
        })
        .await
        .expect("every message is delivered");
        served.entry(d.delivered.shard).or_default().insert(who);
        d.settle(&Settlement::Ack).await.expect("ack");
    }
    served
}

async fn one_consumer_per_shard_and_takeover(b: &Backend) {
    let first = b.queue.clone();
    let second = (b.other)();
    let (token_a, mut rx_a) = consume(&first).await;
    let (token_b, mut rx_b) = consume(&second).await;
    // Give both a moment to register with the broker before anything is published.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let keys: Vec<_> = (0..b.settings.shards).map(|s| b.key_on(s)).collect();
    for round in 0..5 {
        for key in &keys {
            b.queue
                .publish(&message(key, round))
                .await
                .expect("publish");
        }
    }
    let served = collect(5 * keys.len(), &mut rx_a, Some(&mut rx_b)).await;
    assert_eq!(
        served.len(),
        keys.len(),
        "every shard delivered: {served:?}"
    );
    for (shard, who) in &served {
        assert_eq!(
            who.len(),
            1,
            "shard {shard} served by one consumer: {served:?}"
        );
    }
    assert_quiet(&mut rx_a, Duration::from_millis(100)).await;
    assert_quiet(&mut rx_b, Duration::from_millis(100)).await;

    // The first consumer stops: the other takes over every shard.
    stop(token_a, rx_a).await;
    for key in &keys {
        b.queue.publish(&message(key, 9)).await.expect("publish");
    }
    let served = collect(keys.len(), &mut rx_b, None).await;
    assert_eq!(
        served.len(),
        keys.len(),
        "the standby serves every shard now"
    );
    stop(token_b, rx_b).await;
}

async fn publish_event_needs_nobody_bound(b: &Backend) {
    let mut event = message("tenant/user", 1);
    event.event_type = "io.flagrelay.user.outcome.v1";
    event.routing_key = "decision.no_change".into();
    b.queue.publish_event(&event).await.expect("publish event");
    assert!(b.queue.ready().await);
}

#[test]
fn backends_say_whether_they_are_durable() {
    let s = settings("durability".into());
    assert!(RabbitQueue::new(support::amqp_secret(), s.clone()).durable());
    assert!(!EmbeddedQueue::new(s).durable());
}

#[tokio::test]
async fn embedded_keeps_the_last_events_for_tests() {
    let q = EmbeddedQueue::new(settings(support::unique_prefix("events")));
    let mut event = message("tenant/user", 1);
    event.event_type = "io.flagrelay.user.outcome.v1";
    q.publish_event(&event).await.unwrap();
    assert_eq!(q.events(), vec![event]);
}

mod rabbit_only {
    use super::*;
    use secrecy::SecretString;

    fn unreachable(publish_timeout: Duration) -> RabbitQueue {
        let mut s = settings(support::unique_prefix("unreachable"));
        s.publish_timeout = publish_timeout;
        RabbitQueue::new(
            SecretString::from("amqp://guest:guest@127.0.0.1:1/%2f".to_owned()),
            s,
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publish_to_a_missing_broker_fails_within_the_timeout() {
        let limit = Duration::from_millis(800);
        let q = unreachable(limit);
        let started = Instant::now();
        let result = tokio::time::timeout(limit * 3, q.publish(&message("t/u", 1)))
            .await
            .expect("publish never hangs");
        assert!(
            matches!(
                result,
                Err(QueueError::Unavailable(_) | QueueError::Timeout(..))
            ),
            "{result:?}"
        );
        assert!(started.elapsed() <= limit + Duration::from_millis(500));
        let msg = result.unwrap_err().to_string();
        assert!(!msg.contains("guest:guest"), "no password in errors: {msg}");
        assert!(!q.ready().await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publish_to_a_silent_host_times_out() {
        // A listener that accepts TCP but never speaks AMQP: the handshake hangs.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let _hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let mut s = settings(support::unique_prefix("silent"));
        s.publish_timeout = Duration::from_millis(500);
        let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
        let q = RabbitQueue::new(SecretString::from(url), s);
        let started = Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(3), q.publish(&message("t/u", 1)))
            .await
            .expect("publish never hangs");
        assert!(matches!(result, Err(QueueError::Timeout(..))), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn consuming_from_a_missing_broker_retries_until_stopped() {
        let q = unreachable(Duration::from_millis(500));
        let token = CancellationToken::new();
        let mut rx = q
            .consume(token.clone())
            .await
            .expect("retries in the background");
        assert_quiet(&mut rx, Duration::from_millis(700)).await;
        token.cancel();
        let ended = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await;
        assert!(matches!(ended, Ok(None)), "stops when cancelled");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conflicting_queue_arguments_are_a_topology_error() {
        support::require_broker().await;
        let s = settings(support::unique_prefix("conflict"));
        let shard0 = format!("{}.shard.0", s.prefix);
        // Someone created the shard queue as a classic queue.
        let conn = lapin::Connection::connect(&support::amqp_url(), Default::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.queue_declare(
            shard0.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();

        let q = RabbitQueue::new(support::amqp_secret(), s);
        match q.declare().await {
            Err(QueueError::Topology { name, reason }) => {
                assert_eq!(name, shard0);
                assert!(reason.contains("delete"), "tells what to do: {reason}");
            }
            other => panic!("expected a topology error, got {other:?}"),
        }
        assert!(matches!(
            q.publish(&message("t/u", 1)).await,
            Err(QueueError::Topology { .. })
        ));
        let token = CancellationToken::new();
        assert!(matches!(
            q.consume(token).await,
            Err(QueueError::Topology { .. })
        ));

        ch.queue_delete(shard0.as_str().into(), Default::default())
            .await
            .unwrap();
        q.delete_topology().await.expect("cleanup");
        let _ = conn.close(200, "bye".into()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unroutable_publish_is_an_error() {
        let b = super::rabbit("unroutable").await;
        b.queue.declare().await.expect("declare");
        // Someone removed shard 0's binding: its messages have nowhere to go.
        let conn = lapin::Connection::connect(&support::amqp_url(), Default::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.queue_unbind(
            format!("{}.shard.0", b.settings.prefix).as_str().into(),
            format!("{}.work", b.settings.prefix).as_str().into(),
            "#.shard.0".into(),
            Default::default(),
        )
        .await
        .unwrap();
        let _ = conn.close(200, "bye".into()).await;

        let result = b.queue.publish(&message(&b.key_on(0), 1)).await;
        assert!(matches!(result, Err(QueueError::Unroutable)), "{result:?}");
        b.queue
            .publish(&message(&b.key_on(1), 2))
            .await
            .expect("shard 1 is still bound");
        b.cleanup().await;
    }

    /// Publish until it works (the first publish after a cut may fail; the receiver answers
    /// 503 and Graph retries the same way).
    async fn publish_eventually(q: &RabbitQueue, m: &Encoded) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match q.publish(m).await {
                Ok(()) => return,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("publish failed, retrying: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("publish never recovered: {e}"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn consumer_and_publisher_survive_cut_and_silent_connections() {
        support::require_broker().await;
        let proxy = support::Proxy::start().await;
        let mut s = settings(support::unique_prefix("reconnect"));
        s.publish_timeout = Duration::from_millis(700);
        let key = (0..)
            .map(|i| format!("tenant/user-{i}"))
            .find(|k| shard_for(k, s.shards) == 0)
            .unwrap();
        let q = RabbitQueue::new(proxy.url(), s);
        let token = CancellationToken::new();
        let mut rx = q.consume(token.clone()).await.expect("consume");

        // A delivery held while the connection is cut cannot be acked, and comes back.
        let first = message(&key, 1);
        q.publish(&first).await.expect("publish");
        let held = next(&mut rx).await;
        proxy.kill_all();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let acked = held.settle(&Settlement::Ack).await;
        assert!(matches!(acked, Err(QueueError::ChannelGone)), "{acked:?}");

        let second = message(&key, 2);
        publish_eventually(&q, &second).await;
        let again = next(&mut rx).await;
        assert_eq!(
            again.delivered.message_id.as_deref(),
            Some(first.id.as_str())
        );
        assert!(again.delivered.redelivered);
        again
            .settle(&Settlement::Ack)
            .await
            .expect("ack after reconnect");
        let d = next(&mut rx).await;
        assert_eq!(d.delivered.message_id.as_deref(), Some(second.id.as_str()));
        d.settle(&Settlement::Ack).await.expect("ack");

        // The broker goes silent: nothing ends or errors; the watchdog and the publish
        // timeout notice, and both sides reconnect (new connections are forwarded again).
        proxy.freeze_all();
        let third = message(&key, 3);
        publish_eventually(&q, &third).await;
        loop {
            let d = next(&mut rx).await;
            let id = d.delivered.message_id.clone().unwrap();
            if id == third.id {
                d.settle(&Settlement::Ack).await.expect("ack");
                break;
            }
            // An ack swallowed by the frozen connection never reached the broker, which
            // rightly delivers that message again: at least once.
            assert!(
                id == second.id && d.delivered.redelivered,
                "only an earlier message may come back first: {:?}",
                d.delivered
            );
            d.settle(&Settlement::Ack).await.expect("ack");
        }

        stop(token, rx).await;
        q.delete_topology().await.expect("cleanup");
        drop(proxy);
    }
}

/// Exactly one of two processes leads; when the leader goes away the other takes over.
#[tokio::test]
async fn rabbit_leader_lease_fails_over() {
    support::require_broker().await;
    let settings = support::test_queue_settings("lease");
    let a = RabbitQueue::new(support::amqp_secret(), settings.clone());
    let b = RabbitQueue::new(support::amqp_secret(), settings);
    let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
    let mut lead_a = a.leader_lease(stop_a.clone());
    let within = Duration::from_secs(20);
    tokio::time::timeout(within, lead_a.wait_for(|l| *l))
        .await
        .expect("a leads")
        .unwrap();
    let lead_b = b.leader_lease(stop_b.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(*lead_a.borrow() && !*lead_b.borrow(), "exactly one leader");

    stop_a.cancel();
    let mut lead_b = lead_b;
    tokio::time::timeout(within, lead_b.wait_for(|l| *l))
        .await
        .expect("b takes over")
        .unwrap();
    assert!(!*lead_a.borrow(), "a stepped down");
    stop_b.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    a.delete_topology().await.unwrap();
}

#[tokio::test]
async fn embedded_always_leads() {
    let q = EmbeddedQueue::new(support::test_queue_settings("lease-embedded"));
    assert!(*q.leader_lease(CancellationToken::new()).borrow());
}
