//! The leader lease: one process at a time runs the singleton duties (subscriptions, delta
//! polling, drift sweeps), with failover when it dies.
//!
//! `{p}.leader` is a quorum queue with a single active consumer holding a token message.
//! Every replica consumes it; the broker delivers only to the active consumer, which keeps the
//! token unacknowledged for as long as it leads. When its connection dies the broker makes the
//! next consumer active and hands it the token (redelivered), and that replica leads. A replica
//! that loses its connection steps down at once. Extra tokens (two replicas starting at once)
//! are harmless — only the active consumer ever receives any — and `x-max-length: 1` bounds
//! how many wait.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::BasicProperties;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Config, close_connection, declaring, open_connection, short, within};
use crate::queue::QueueError;

/// Start holding (or waiting for) the lease until `shutdown`; the receiver says whether this
/// process leads right now.
pub(super) fn start(cfg: Arc<Config>, shutdown: CancellationToken) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut delay = Duration::from_millis(200);
        loop {
            let result = session(&cfg, &tx, &shutdown).await;
            if tx.send_replace(false) {
                tracing::warn!(prefix = %cfg.settings.prefix, "stepped down as leader");
            }
            match result {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "leader lease session ended; reconnecting")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    });
    rx
}

fn leader_queue_args() -> FieldTable {
    let mut t = FieldTable::default();
    // Replicated: the token survives a broker node loss.
    t.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    // The lease itself: only one consumer receives the token at a time.
    t.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    // At most one spare token waits (ready messages count, the held one does not).
    t.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
    t
}

async fn session(
    cfg: &Config,
    tx: &watch::Sender<bool>,
    shutdown: &CancellationToken,
) -> Result<(), QueueError> {
    let connection = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        c = open_connection(cfg, "leader lease") => c?,
    };
    let op = cfg.op_timeout();
    let name = cfg.topology.leader_queue();
    let result = async {
        let ch = within(op, "opening a channel", connection.create_channel()).await?;
        let options = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        let queue = declaring(op, &name, ch.queue_declare(short(&name)?, options, leader_queue_args())).await?;
        if queue.message_count() == 0 {
            let props = BasicProperties::default().with_delivery_mode(2);
            let publish = ch.basic_publish(short("")?, short(&name)?, BasicPublishOptions::default(), b"lease", props);
            within(op, "publishing the lease token", publish).await?;
        }
        within(op, "setting the prefetch", ch.basic_qos(1, BasicQosOptions::default())).await?;
        let tag = short(&format!("flagrelay-leader-{}", uuid::Uuid::new_v4().simple()))?;
        let consume = ch.basic_consume(short(&name)?, tag, BasicConsumeOptions::default(), FieldTable::default());
        let mut consumer = within(op, "waiting for the lease", consume).await?;
        let mut watchdog = tokio::time::interval(cfg.watchdog_period());
        // Held unacknowledged while leading; the broker takes it back when we go away.
        let mut _token = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = watchdog.tick() => {
                    if !connection.status().connected() {
                        return Err(QueueError::Unavailable("the lease connection is gone".into()));
                    }
                }
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        if _token.is_none() {
                            tracing::info!(prefix = %cfg.settings.prefix, "became leader");
                            tx.send_replace(true);
                        }
                        _token.get_or_insert(delivery);
                    }
                    Some(Err(e)) => return Err(QueueError::Unavailable(format!("leader lease: {e}"))),
                    None => return Err(QueueError::Unavailable("the broker cancelled the lease consumer".into())),
                },
            }
        }
    }
    .await;
    close_connection(connection);
    result
}
