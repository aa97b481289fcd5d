//! The queue seam: publishing with durable acceptance, sharded consumption, and settlement
//! (ack / delayed retry / dead-letter) of what was consumed.
//!
//! Two backends implement [`Queue`]: [`rabbitmq::RabbitQueue`] (production; the only module
//! that imports lapin) and [`embedded::EmbeddedQueue`] (in-process, NOT durable, for `run` and
//! `demo` without a broker). Both pass the conformance tests in `tests/it/queue_conformance.rs`.
//!
//! Per-user serialization: every message carries a shard key (tenant + user id); the shard
//! is a stable hash of it ([`shard_for`]). Each shard is consumed by exactly one consumer at a
//! time across all processes (RabbitMQ: single-active-consumer queues), and deliveries from one
//! shard are handed to the worker in order; the worker additionally holds a per-key lock.

pub mod embedded;
pub mod rabbitmq;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::message::Encoded;

/// Header with the number of attempts already made (absent on a first delivery).
pub const ATTEMPT_HEADER: &str = "x-flagrelay-attempt";
/// Header with the last transient error, on retried and dead-lettered messages.
pub const LAST_ERROR_HEADER: &str = "x-flagrelay-last-error";
/// Header with the reason a message was dead-lettered.
pub const REASON_HEADER: &str = "x-flagrelay-reason";
/// Header with the RFC 3339 time a message was dead-lettered.
pub const DEAD_LETTERED_AT_HEADER: &str = "x-flagrelay-dead-lettered-at";

/// What every backend needs to know about the topology.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    /// Prefix of every exchange and queue name, so deployments (and tests) never collide.
    pub prefix: String,
    /// Number of shard queues. Changing it re-maps users to shards; drain the queues first.
    pub shards: u16,
    /// Delay tiers for retries, ascending. A retry waits for the smallest tier that is at
    /// least the requested delay (the largest tier when none is).
    pub retry_tiers: Vec<Duration>,
    /// Upper bound for a publish including its confirm; past it the publish has failed.
    pub publish_timeout: Duration,
    /// Unacknowledged deliveries per shard consumer.
    pub prefetch: u16,
}

impl QueueSettings {
    /// Settings with a given prefix and the defaults used in tests and the demo.
    pub fn with_prefix(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            shards: 4,
            retry_tiers: vec![
                Duration::from_millis(200),
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(30),
                Duration::from_secs(300),
            ],
            publish_timeout: Duration::from_secs(2),
            prefetch: 16,
        }
    }

    /// The tier a retry with `delay` waits in.
    pub fn tier_for(&self, delay: Duration) -> Duration {
        self.retry_tiers
            .iter()
            .copied()
            .find(|t| *t >= delay)
            .or_else(|| self.retry_tiers.last().copied())
            .unwrap_or(delay)
    }
}

/// Errors of the queue layer. All are transient from the publisher's point of view: the
/// receiver turns any of them into `503 Retry-After`, so Graph delivers again.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    #[error("broker did not answer within {0:?} ({1})")]
    Timeout(Duration, &'static str),
    #[error("broker refused the message (nack)")]
    Nacked,
    #[error("broker returned the message as unroutable (is the topology declared?)")]
    Unroutable,
    #[error("topology declaration failed for {name}: {reason}")]
    Topology { name: String, reason: String },
    #[error("the delivery's channel is gone; the broker will redeliver it")]
    ChannelGone,
}

/// How a consumed message leaves the worker. Decided by `worker::outcome`, carried out here.
#[derive(Debug, Clone, PartialEq)]
pub enum Settlement {
    /// Done (applied, nothing to do, or skipped on purpose).
    Ack,
    /// Try again after `delay` (rounded up to a retry tier); `attempt` is the count so far.
    Retry {
        delay: Duration,
        attempt: u32,
        last_error: String,
    },
    /// Give up: park it in the dead-letter queue with the reason.
    DeadLetter {
        reason: String,
        attempts: u32,
        last_error: String,
    },
}

/// Carries out a settlement for one delivery, on the channel it came from.
#[async_trait]
pub trait Acker: Send + Sync + std::fmt::Debug {
    async fn settle(
        self: Box<Self>,
        settlement: &Settlement,
        original: &Delivered,
    ) -> Result<(), QueueError>;
}

/// What was consumed, as the worker sees it.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub body: Bytes,
    /// String-valued application headers (signature, key id, attempt bookkeeping).
    pub headers: BTreeMap<String, String>,
    pub message_id: Option<String>,
    /// The broker says it delivered this before (a consumer died holding it).
    pub redelivered: bool,
    pub shard: u16,
}

impl Delivered {
    /// Attempts already made before this delivery (0 on the first).
    pub fn attempt(&self) -> u32 {
        self.headers
            .get(ATTEMPT_HEADER)
            .and_then(|a| a.parse().ok())
            .unwrap_or(0)
    }

    /// Body and headers as an [`Encoded`] message again (for retry and dead-letter copies).
    pub fn to_encoded(&self, extra: &[(&str, String)]) -> Encoded {
        let mut headers = self.headers.clone();
        for (k, v) in extra {
            headers.insert((*k).to_owned(), v.clone());
        }
        Encoded {
            id: self.message_id.clone().unwrap_or_default(),
            event_type: "",
            shard_key: String::new(),
            routing_key: String::new(),
            body: self.body.clone(),
            headers,
        }
    }
}

/// One consumed message and the means to settle it. Dropping it unsettled gives it back: both
/// backends requeue it right away (RabbitMQ: `basic.nack` with requeue, best effort), and the
/// broker redelivers it anyway when the consumer goes away. Either way it comes back with
/// `redelivered = true`.
#[derive(Debug)]
pub struct Delivery {
    pub delivered: Delivered,
    acker: Box<dyn Acker>,
}

impl Delivery {
    pub fn new(delivered: Delivered, acker: Box<dyn Acker>) -> Self {
        Self { delivered, acker }
    }

    pub async fn settle(self, settlement: &Settlement) -> Result<(), QueueError> {
        self.acker.settle(settlement, &self.delivered).await
    }
}

/// A message parked in the dead-letter queue.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub message_id: Option<String>,
    pub body: Bytes,
    pub headers: BTreeMap<String, String>,
}

impl DeadLetter {
    pub fn reason(&self) -> Option<&str> {
        self.headers.get(REASON_HEADER).map(String::as_str)
    }

    /// The message as it goes back to the work queues on a redrive: same body and signature,
    /// the dead-letter bookkeeping removed (attempts start again), the shard key read from
    /// the envelope (tenant and subject).
    pub fn redrive_copy(&self) -> Encoded {
        let env: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_default();
        let shard_key = format!(
            "{}/{}",
            env["data"]["tenant_id"].as_str().unwrap_or(""),
            env["subject"].as_str().unwrap_or("")
        );
        let mut headers = self.headers.clone();
        for h in [
            ATTEMPT_HEADER,
            LAST_ERROR_HEADER,
            REASON_HEADER,
            DEAD_LETTERED_AT_HEADER,
        ] {
            headers.remove(h);
        }
        Encoded {
            id: self.message_id.clone().unwrap_or_default(),
            event_type: "",
            shard_key,
            routing_key: String::new(),
            body: self.body.clone(),
            headers,
        }
    }
}

/// Messages waiting in the queues, for the depth gauges and the status page.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Depths {
    /// Ready on the shard queues (deliveries a worker holds unacknowledged are not counted).
    pub work: u64,
    /// Waiting on the retry delay tiers (retries, parked rechecks, breaker-held deactivations).
    pub retry: u64,
    /// In the dead-letter queue.
    pub dead_letter: u64,
}

/// Which dead letters a redrive takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redrive {
    All,
    /// By message id.
    Ids(Vec<String>),
}

impl Redrive {
    pub fn wants(&self, d: &DeadLetter) -> bool {
        match self {
            Redrive::All => true,
            Redrive::Ids(ids) => d.message_id.as_ref().is_some_and(|m| ids.contains(m)),
        }
    }
}

/// The broker seam.
#[async_trait]
pub trait Queue: Send + Sync + std::fmt::Debug {
    /// Declare exchanges and queues (idempotent). Backends also re-declare after reconnecting.
    async fn declare(&self) -> Result<(), QueueError>;

    /// Put a work message on its shard queue. Returns only once the broker has durably
    /// accepted it (publisher confirm); every other result is an error.
    async fn publish(&self, message: &Encoded) -> Result<(), QueueError>;

    /// Publish an outcome event on the events exchange for other systems. Confirmed, but not
    /// mandatory: nobody has to be listening.
    async fn publish_event(&self, message: &Encoded) -> Result<(), QueueError>;

    /// Consume every shard until `shutdown` is cancelled. Deliveries of one shard arrive in
    /// order; the backend reconnects by itself when the broker goes away.
    async fn consume(
        &self,
        shutdown: CancellationToken,
    ) -> Result<mpsc::Receiver<Delivery>, QueueError>;

    /// Take up to `max` messages out of the dead-letter queue (they are removed).
    async fn take_dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, QueueError>;

    /// Look at up to `max` dead letters without removing any.
    async fn peek_dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, QueueError>;

    /// Put the chosen dead letters back on the work queues (the normal path, attempts reset);
    /// each leaves the dead-letter queue only once its copy is confirmed. Returns how many.
    async fn redrive_dead_letters(&self, which: &Redrive) -> Result<usize, QueueError>;

    /// Delete every dead letter; returns how many there were.
    async fn purge_dead_letters(&self) -> Result<usize, QueueError>;

    /// Whether the broker is reachable now (readiness probe).
    async fn ready(&self) -> bool;

    /// How many messages wait in the work, retry and dead-letter queues now (RabbitMQ:
    /// passive declares, which report ready messages).
    async fn depths(&self) -> Result<Depths, QueueError>;

    /// True when messages survive a restart of the process (false for the embedded backend).
    fn durable(&self) -> bool;

    /// Take part in leader election until `shutdown`: the receiver is `true` while this
    /// process holds the lease (exactly one process across the deployment does, with
    /// failover when it dies). See `rabbitmq/lease.rs`.
    fn leader_lease(&self, shutdown: CancellationToken) -> tokio::sync::watch::Receiver<bool>;
}

/// Longest [`LAST_ERROR_HEADER`] value, in bytes: errors can quote whole API responses.
pub const LAST_ERROR_MAX_BYTES: usize = 1024;

/// `error` cut to at most [`LAST_ERROR_MAX_BYTES`] on a character boundary, for the header.
pub fn last_error_header(error: &str) -> String {
    if error.len() <= LAST_ERROR_MAX_BYTES {
        return error.to_owned();
    }
    const ELLIPSIS: &str = "…";
    let mut end = LAST_ERROR_MAX_BYTES - ELLIPSIS.len();
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{ELLIPSIS}", &error[..end])
}

/// Stable shard of a key: the same on every process, platform and release.
pub fn shard_for(key: &str, shards: u16) -> u16 {
    let digest = Sha256::digest(key.as_bytes());
    let n = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
    (n % u64::from(shards.max(1))) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_is_stable_and_in_range() {
        assert_eq!(shard_for("t/u1", 8), shard_for("t/u1", 8));
        let counts = (0..800).fold([0u32; 8], |mut acc, i| {
            acc[shard_for(&format!("t/user-{i}"), 8) as usize] += 1;
            acc
        });
        assert!(counts.iter().all(|c| *c > 50), "roughly even: {counts:?}");
    }

    #[test]
    fn last_error_is_cut_on_a_char_boundary() {
        assert_eq!(last_error_header("short"), "short");
        let long = "é".repeat(LAST_ERROR_MAX_BYTES);
        let cut = last_error_header(&long);
        assert!(cut.len() <= LAST_ERROR_MAX_BYTES, "{}", cut.len());
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn retry_rounds_up_to_a_tier() {
        let s = QueueSettings::with_prefix("x");
        assert_eq!(
            s.tier_for(Duration::from_millis(1)),
            Duration::from_millis(200)
        );
        assert_eq!(s.tier_for(Duration::from_secs(2)), Duration::from_secs(5));
        assert_eq!(
            s.tier_for(Duration::from_secs(3600)),
            Duration::from_secs(300)
        );
    }
}
