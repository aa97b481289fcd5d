//! Consume sessions: a connection with one channel per shard that forwards deliveries in order
//! into the worker's channel, reconnecting with capped exponential backoff and jitter; and the
//! acker that carries out a settlement on the channel a delivery came from.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::link::{Supervisor, Target};
use super::topology::Topology;
use super::{
    Config, broker_error, close_connection, open_connection, short, string_headers, string_table,
    within,
};
use crate::queue::{
    ATTEMPT_HEADER, Acker, DEAD_LETTERED_AT_HEADER, Delivered, Delivery, LAST_ERROR_HEADER,
    QueueError, REASON_HEADER, Settlement, last_error_header,
};

/// First reconnect delay, and the cap of its exponential growth.
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How long a stopping session keeps its channels open so that deliveries being processed can
/// still be settled; past it they are redelivered to whoever consumes next.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// Dead-lettering bookkeeping owned by the broker; not copied onto retry and dead-letter copies
/// (the copy is a new message, and RabbitMQ 4 ignores these when set by clients).
const BROKER_HEADERS: [&str; 8] = [
    "x-death",
    "x-delivery-count",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
];

/// Start consuming in a supervisor task; deliveries of every session go to the returned
/// receiver until `shutdown` is cancelled or the receiver is dropped.
pub(super) fn start(
    cfg: Arc<Config>,
    publisher: Arc<Supervisor>,
    shutdown: CancellationToken,
) -> mpsc::Receiver<Delivery> {
    // Prefetch already bounds what is in flight per shard; the channel only smooths hand-over.
    let (tx, rx) = mpsc::channel(usize::from(cfg.settings.prefetch.max(1)));
    tokio::spawn(supervise(cfg, publisher, tx, shutdown));
    rx
}

async fn supervise(
    cfg: Arc<Config>,
    publisher: Arc<Supervisor>,
    tx: mpsc::Sender<Delivery>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(BACKOFF_FIRST, BACKOFF_MAX);
    loop {
        let mut consuming = false;
        match session(&cfg, &publisher, &tx, &shutdown, &mut consuming).await {
            Ok(()) => {
                tracing::info!(prefix = %cfg.settings.prefix, "consumer stopped");
                return;
            }
            Err(e) => {
                if consuming {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                tracing::warn!(
                    prefix = %cfg.settings.prefix,
                    error = %e,
                    retry_in = ?delay,
                    "consume session ended; reconnecting"
                );
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// One connection's worth of consuming. `Ok` means stopped on purpose.
async fn session(
    cfg: &Arc<Config>,
    publisher: &Arc<Supervisor>,
    tx: &mpsc::Sender<Delivery>,
    shutdown: &CancellationToken,
    consuming: &mut bool,
) -> Result<(), QueueError> {
    let (session, consumers) = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        opened = Session::open(cfg) => opened?,
    };
    *consuming = true;
    tracing::info!(prefix = %cfg.settings.prefix, shards = cfg.settings.shards, "consuming");

    // Every forwarded delivery holds a clone; the session waits for them before closing.
    let (drain_tx, drain_rx) = mpsc::channel::<()>(1);
    let mut deliveries = stream::select_all(consumers.into_iter().zip(0u16..).map(
        |(consumer, shard)| -> BoxStream<'static, (u16, Option<lapin::Result<_>>)> {
            consumer
                .map(move |d| (shard, Some(d)))
                // A stream that ends means the broker cancelled the consumer.
                .chain(stream::once(async move { (shard, None) }))
                .boxed()
        },
    ));
    let period = cfg.watchdog_period();
    let mut watchdog = tokio::time::interval_at(Instant::now() + period, period);
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let ended = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            _ = tx.closed() => break Ok(()),
            _ = watchdog.tick() => {
                if let Err(e) = session.check(cfg, period).await {
                    break Err(e);
                }
            }
            next = deliveries.next() => match next {
                Some((shard, Some(Ok(d)))) => {
                    let delivery = to_delivery(d, shard, cfg, publisher, drain_tx.clone());
                    tokio::select! {
                        // Dropping the delivery gives it back to the broker.
                        _ = shutdown.cancelled() => break Ok(()),
                        sent = tx.send(delivery) => if sent.is_err() { break Ok(()) },
                    }
                }
                Some((_, Some(Err(e)))) => break Err(broker_error("consuming", &e)),
                Some((shard, None)) => {
                    break Err(QueueError::Unavailable(format!(
                        "the broker cancelled the consumer of shard {shard} (queue deleted?)"
                    )));
                }
                None => break Err(QueueError::Unavailable("no consumers left".into())),
            },
        }
    };
    match &ended {
        Ok(()) => {
            session.cancel_consumers(cfg).await;
            drop(deliveries);
            session.close(drain_tx, drain_rx, cfg).await;
        }
        Err(_) => {
            drop(deliveries);
            close_connection(session.connection);
        }
    }
    ended
}

/// The consumer's connection and channels.
struct Session {
    connection: Connection,
    /// One channel per shard: prefetch applies per shard, and a shard's acks go on its channel.
    shards: Vec<(Channel, ShortString)>,
    /// For the watchdog's passive declares.
    probe: Channel,
}

impl Session {
    async fn open(cfg: &Config) -> Result<(Self, Vec<lapin::Consumer>), QueueError> {
        let connection = open_connection(cfg, "consumer").await?;
        let op = cfg.op_timeout();
        let setup = async {
            let probe = within(op, "opening a channel", connection.create_channel()).await?;
            cfg.topology.declare(&probe, op).await?;
            let mut shards = Vec::new();
            let mut consumers = Vec::new();
            for shard in 0..cfg.settings.shards.max(1) {
                let ch = within(op, "opening a channel", connection.create_channel()).await?;
                let qos = ch.basic_qos(cfg.settings.prefetch.max(1), BasicQosOptions::default());
                within(op, "setting the prefetch", qos).await?;
                let tag = short(&format!(
                    "flagrelay-shard-{shard}-{}",
                    uuid::Uuid::new_v4().simple()
                ))?;
                let consume = ch.basic_consume(
                    short(&cfg.topology.shard_queue(shard))?,
                    tag.clone(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                );
                consumers.push(within(op, "starting a consumer", consume).await?);
                shards.push((ch, tag));
            }
            Ok((probe, shards, consumers))
        };
        match setup.await {
            Ok((probe, shards, consumers)) => Ok((
                Self {
                    connection,
                    shards,
                    probe,
                },
                consumers,
            )),
            Err(e) => {
                close_connection(connection);
                Err(e)
            }
        }
    }

    /// Prove the connection alive: its state, and a passive declare the broker must answer.
    async fn check(&self, cfg: &Config, limit: Duration) -> Result<(), QueueError> {
        if !self.connection.status().connected() {
            return Err(QueueError::Unavailable(
                "the consumer connection is gone".into(),
            ));
        }
        if self.shards.iter().any(|(ch, _)| !ch.status().connected()) {
            return Err(QueueError::Unavailable("a shard channel was closed".into()));
        }
        let probe = self.probe.queue_declare(
            short(&cfg.topology.shard_queue(0))?,
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        );
        within(limit, "checking the consumer connection", probe)
            .await
            .map(drop)
    }

    /// Stop receiving deliveries. With single-active-consumer, a standby takes the shard
    /// over right away.
    async fn cancel_consumers(&self, cfg: &Config) {
        let limit = cfg.settings.publish_timeout;
        futures::future::join_all(self.shards.iter().map(|(ch, tag)| {
            let cancel = ch.basic_cancel(tag.clone(), BasicCancelOptions::default());
            tokio::time::timeout(limit, cancel)
        }))
        .await;
    }

    /// Close cleanly once in-flight deliveries are settled (or the grace period is over).
    async fn close(
        self,
        drain_tx: mpsc::Sender<()>,
        mut drain_rx: mpsc::Receiver<()>,
        cfg: &Config,
    ) {
        let limit = cfg.settings.publish_timeout;
        drop(drain_tx);
        if tokio::time::timeout(DRAIN_GRACE, drain_rx.recv())
            .await
            .is_err()
        {
            tracing::warn!(
                grace = ?DRAIN_GRACE,
                "deliveries still unsettled at shutdown; the broker will redeliver them"
            );
        }
        // Unacked deliveries (there should be none) return to their queues.
        futures::future::join_all(self.shards.iter().map(|(ch, _)| {
            tokio::time::timeout(limit, ch.close(200, "flagrelay stopping".into()))
        }))
        .await;
        let _ = tokio::time::timeout(
            limit,
            self.connection.close(200, "flagrelay stopping".into()),
        )
        .await;
    }
}

fn to_delivery(
    d: lapin::message::Delivery,
    shard: u16,
    cfg: &Arc<Config>,
    publisher: &Arc<Supervisor>,
    drain: mpsc::Sender<()>,
) -> Delivery {
    let lapin::message::Delivery {
        data,
        properties,
        redelivered,
        acker,
        ..
    } = d;
    let delivered = Delivered {
        body: Bytes::from(data),
        headers: string_headers(properties.headers().as_ref()),
        message_id: properties.message_id().as_ref().map(|m| m.to_string()),
        redelivered,
        shard,
    };
    let acker = RabbitAcker {
        acker: Some(acker),
        properties,
        cfg: cfg.clone(),
        publisher: publisher.clone(),
        drain,
    };
    Delivery::new(delivered, Box::new(acker))
}

/// Settles one delivery: copies go through the publisher link (confirmed), the ack goes on
/// the channel the delivery came from.
struct RabbitAcker {
    /// `None` once used. Still `Some` when dropped: the delivery is requeued.
    acker: Option<lapin::Acker>,
    /// The original's properties, so copies keep content type, id, type and timestamp.
    properties: BasicProperties,
    cfg: Arc<Config>,
    publisher: Arc<Supervisor>,
    /// Keeps the session's channels open until this delivery is settled (`Session::close`).
    drain: mpsc::Sender<()>,
}

impl std::fmt::Debug for RabbitAcker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitAcker")
            .field("acker", &self.acker)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Acker for RabbitAcker {
    async fn settle(
        mut self: Box<Self>,
        settlement: &Settlement,
        original: &Delivered,
    ) -> Result<(), QueueError> {
        let topology = &self.cfg.topology;
        match settlement {
            Settlement::Ack => {}
            Settlement::Retry {
                delay,
                attempt,
                last_error,
            } => {
                let tier = self.cfg.settings.tier_for(*delay);
                let properties = copy_properties(
                    &self.properties,
                    &[
                        (ATTEMPT_HEADER, attempt.to_string()),
                        (LAST_ERROR_HEADER, last_error_header(last_error)),
                    ],
                );
                let target = Target {
                    exchange: &topology.retry_exchange(),
                    routing_key: &Topology::retry_routing_key(tier, original.shard),
                    mandatory: true,
                };
                // On failure `self` drops unacked: the original is requeued, nothing is lost.
                self.publisher
                    .publish(target, &original.body, properties)
                    .await?;
            }
            Settlement::DeadLetter {
                reason,
                attempts,
                last_error,
            } => {
                let properties = copy_properties(
                    &self.properties,
                    &[
                        (REASON_HEADER, reason.clone()),
                        (ATTEMPT_HEADER, attempts.to_string()),
                        (LAST_ERROR_HEADER, last_error_header(last_error)),
                        (DEAD_LETTERED_AT_HEADER, chrono::Utc::now().to_rfc3339()),
                    ],
                );
                let target = Target {
                    exchange: &topology.dead_exchange(),
                    routing_key: &Topology::work_routing_key(original.shard),
                    mandatory: true,
                };
                self.publisher
                    .publish(target, &original.body, properties)
                    .await?;
            }
        }
        let acker = self.acker.take().ok_or(QueueError::ChannelGone)?;
        ack(&acker, self.cfg.settings.publish_timeout).await
    }
}

impl Drop for RabbitAcker {
    fn drop(&mut self) {
        let Some(acker) = self.acker.take() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if !acker.usable() {
            return; // its channel is gone: the broker requeues it by itself
        }
        let limit = self.cfg.settings.publish_timeout;
        let drain = self.drain.clone();
        rt.spawn(async move {
            let requeue = BasicNackOptions {
                multiple: false,
                requeue: true,
            };
            if let Ok(Err(e)) = tokio::time::timeout(limit, acker.nack(requeue)).await {
                tracing::debug!(error = %e, "could not requeue a dropped delivery");
            }
            drop(drain);
        });
    }
}

async fn ack(acker: &lapin::Acker, limit: Duration) -> Result<(), QueueError> {
    if !acker.usable() {
        return Err(QueueError::ChannelGone);
    }
    match tokio::time::timeout(limit, acker.ack(BasicAckOptions::default())).await {
        Ok(Ok(true)) => Ok(()),
        Ok(Ok(false)) => Err(QueueError::ChannelGone),
        Ok(Err(_)) if acker.poisoned() => Err(QueueError::ChannelGone),
        Ok(Err(e)) => Err(broker_error("acknowledging a delivery", &e)),
        Err(_) => Err(QueueError::Timeout(limit, "acknowledging a delivery")),
    }
}

/// The original's properties with its application headers plus `extra` (persistent).
fn copy_properties(original: &BasicProperties, extra: &[(&str, String)]) -> BasicProperties {
    let mut table = FieldTable::default();
    if let Some(headers) = original.headers() {
        for (k, v) in headers.inner() {
            if !BROKER_HEADERS.contains(&k.as_str()) {
                table.insert(k.clone(), v.clone());
            }
        }
    }
    let extra = extra
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    original
        .clone()
        .with_headers(string_table(&extra, table))
        .with_delivery_mode(2)
}

/// Capped exponential backoff with "equal jitter": half of each delay is fixed, half random,
/// so that many workers do not reconnect in lockstep after a broker restart.
#[derive(Debug)]
struct Backoff {
    first: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            attempt: 0,
        }
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }

    fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .first
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{AMQPValue, LongString};

    #[test]
    fn backoff_grows_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<_> = (0..10).map(|_| b.next_delay()).collect();
        for (i, d) in delays.iter().enumerate() {
            let ceiling = Duration::from_millis(100 << i).min(Duration::from_secs(2));
            assert!(*d >= ceiling / 2 && *d <= ceiling, "{i}: {d:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn copies_keep_application_headers_and_drop_the_brokers() {
        let mut h = FieldTable::default();
        h.insert(
            "x-flagrelay-signature".into(),
            AMQPValue::LongString("s".into()),
        );
        h.insert("x-delivery-count".into(), AMQPValue::LongLongInt(2));
        h.insert(
            "x-first-death-reason".into(),
            AMQPValue::LongString(LongString::from("expired")),
        );
        let original = BasicProperties::default()
            .with_message_id("m1".into())
            .with_headers(h);
        let copy = copy_properties(&original, &[(ATTEMPT_HEADER, "3".into())]);
        let headers = string_headers(copy.headers().as_ref());
        assert_eq!(headers.get("x-flagrelay-signature").unwrap(), "s");
        assert_eq!(headers.get(ATTEMPT_HEADER).unwrap(), "3");
        assert!(!headers.contains_key("x-delivery-count"));
        assert!(!headers.contains_key("x-first-death-reason"));
        assert_eq!(copy.message_id().as_ref().unwrap().as_str(), "m1");
        assert_eq!(copy.delivery_mode(), &Some(2));
    }
}
