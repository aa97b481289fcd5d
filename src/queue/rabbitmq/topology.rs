//! Names and arguments of every exchange and queue under a prefix, and their idempotent
//! declaration (and deletion, for tests and decommissioning).
//!
//! ```text
//! publish ──shard.{i}──▶ {p}.work (topic) ──#.shard.{i}──▶ {p}.shard.{i} (quorum, SAC)
//!                              ▲                                 │ delivery limit
//!            TTL expired, same │ routing key                     ▼
//! retry ──retry{ms}.shard.{i}──▶ {p}.retry (topic) ──retry{ms}.#──▶ {p}.retry.{ms}ms (quorum, TTL)
//! dead-letter copy ──▶ {p}.dead (fanout) ──▶ {p}.dead-letter (quorum)
//! outcome event ──{type}──▶ {p}.events (topic), nobody has to be bound
//! ```

use std::time::Duration;

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use super::{declaring, short};
use crate::queue::{QueueError, QueueSettings};

/// Deliveries of one message from a shard queue before the broker dead-letters it to
/// `{p}.dead`. A message that crashes or hangs workers again and again must not block its
/// shard forever; 20 is also RabbitMQ 4's default, so 3.x and 4.x brokers behave alike.
pub(super) const DELIVERY_LIMIT: i64 = 20;

/// What [`Topology::declare`] creates, as data: every exchange, queue and binding, and every
/// (exchange, routing key) flagrelay publishes with. `declare` walks this same list, so the
/// contract tests that compare `schemas/asyncapi.yaml` with it compare with what is declared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologyDescription {
    pub exchanges: Vec<ExchangeDescription>,
    pub queues: Vec<QueueDescription>,
    /// Where flagrelay publishes: work, retry, dead-letter, events, and the lease token.
    pub publishes: Vec<Route>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeDescription {
    pub name: String,
    pub kind: ExchangeType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeType {
    Topic,
    Fanout,
}

impl ExchangeType {
    /// The AMQP exchange type name.
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeType::Topic => "topic",
            ExchangeType::Fanout => "fanout",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDescription {
    pub name: String,
    pub role: QueueRole,
    /// The binding pattern on its exchange; `None` for the leader queue (default exchange).
    pub binding: Option<Route>,
}

/// What a queue is for; decides its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueRole {
    DeadLetter,
    Shard(u16),
    /// Retry tier, in milliseconds.
    Retry(u64),
    /// The leader lease; declared by `lease.rs`, not by `declare`.
    Leader,
}

/// An exchange and a routing key (or binding pattern).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub exchange: String,
    pub routing_key: String,
}

fn route(exchange: String, routing_key: impl Into<String>) -> Route {
    Route {
        exchange,
        routing_key: routing_key.into(),
    }
}

/// Every name and argument of one deployment's topology.
#[derive(Debug, Clone)]
pub(super) struct Topology {
    prefix: String,
    shards: u16,
    /// Retry tiers in milliseconds, ascending, without duplicates: one queue each.
    tiers_ms: Vec<u64>,
}

impl Topology {
    pub(super) fn new(settings: &QueueSettings) -> Self {
        let mut tiers_ms: Vec<u64> = settings.retry_tiers.iter().map(millis).collect();
        tiers_ms.sort_unstable();
        tiers_ms.dedup();
        Self {
            prefix: settings.prefix.clone(),
            shards: settings.shards.max(1),
            tiers_ms,
        }
    }

    pub(super) fn work_exchange(&self) -> String {
        format!("{}.work", self.prefix)
    }

    pub(super) fn shard_queue(&self, shard: u16) -> String {
        format!("{}.shard.{shard}", self.prefix)
    }

    /// `#` so that both fresh messages (`shard.{i}`) and expired retries
    /// (`retry{ms}.shard.{i}`, dead-lettered with their routing key) land on shard `i`.
    fn shard_binding(shard: u16) -> String {
        format!("#.shard.{shard}")
    }

    pub(super) fn work_routing_key(shard: u16) -> String {
        format!("shard.{shard}")
    }

    pub(super) fn retry_exchange(&self) -> String {
        format!("{}.retry", self.prefix)
    }

    fn retry_queue(&self, tier_ms: u64) -> String {
        format!("{}.retry.{tier_ms}ms", self.prefix)
    }

    fn retry_binding(tier_ms: u64) -> String {
        format!("retry{tier_ms}.#")
    }

    /// Where a retry of a message from `shard` waits `tier`. Only declared tiers route; any
    /// other delay makes the publish unroutable (and so fail) instead of being lost.
    pub(super) fn retry_routing_key(tier: Duration, shard: u16) -> String {
        format!("retry{}.shard.{shard}", millis(&tier))
    }

    pub(super) fn dead_exchange(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    pub(super) fn dead_queue(&self) -> String {
        format!("{}.dead-letter", self.prefix)
    }

    /// The leader lease (see `lease.rs`); declared by the lease itself, not with the rest.
    pub(super) fn leader_queue(&self) -> String {
        format!("{}.leader", self.prefix)
    }

    pub(super) fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }

    /// Everything this deployment declares and publishes to (see [`TopologyDescription`]).
    pub(super) fn describe(&self) -> TopologyDescription {
        let exchanges = [
            (self.work_exchange(), ExchangeType::Topic),
            (self.retry_exchange(), ExchangeType::Topic),
            (self.dead_exchange(), ExchangeType::Fanout),
            (self.events_exchange(), ExchangeType::Topic),
        ]
        .into_iter()
        .map(|(name, kind)| ExchangeDescription { name, kind })
        .collect();

        let mut queues = vec![QueueDescription {
            name: self.dead_queue(),
            role: QueueRole::DeadLetter,
            binding: Some(route(self.dead_exchange(), "")),
        }];
        let mut publishes = Vec::new();
        for shard in 0..self.shards {
            queues.push(QueueDescription {
                name: self.shard_queue(shard),
                role: QueueRole::Shard(shard),
                binding: Some(route(self.work_exchange(), Self::shard_binding(shard))),
            });
            publishes.push(route(self.work_exchange(), Self::work_routing_key(shard)));
            // Dead-letter copies keep the shard's key; the fanout exchange ignores it.
            publishes.push(route(self.dead_exchange(), Self::work_routing_key(shard)));
        }
        for &tier in &self.tiers_ms {
            queues.push(QueueDescription {
                name: self.retry_queue(tier),
                role: QueueRole::Retry(tier),
                binding: Some(route(self.retry_exchange(), Self::retry_binding(tier))),
            });
            for shard in 0..self.shards {
                let key = Self::retry_routing_key(Duration::from_millis(tier), shard);
                publishes.push(route(self.retry_exchange(), key));
            }
        }
        queues.push(QueueDescription {
            name: self.leader_queue(),
            role: QueueRole::Leader,
            binding: None,
        });
        // The lease token goes through the default exchange straight to the leader queue.
        publishes.push(route(String::new(), self.leader_queue()));
        for decision in crate::message::Announcement::ALL {
            publishes.push(route(self.events_exchange(), decision.routing_key()));
        }
        TopologyDescription {
            exchanges,
            queues,
            publishes,
        }
    }

    /// Arguments of every `{p}.shard.{i}` queue.
    pub(super) fn shard_queue_args(&self) -> FieldTable {
        let mut t = FieldTable::default();
        // Replicated and always persistent; the only type with delivery limits, SAC and
        // at-least-once dead-lettering on 3.10+.
        t.insert("x-queue-type".into(), text("quorum"));
        // One active consumer per shard across all processes: deliveries of one user are
        // processed in order, never by two workers at once. Others wait as hot standbys.
        t.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        // Poison messages: after this many deliveries the broker dead-letters the message.
        t.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(DELIVERY_LIMIT),
        );
        // ...to the dead-letter exchange, where operators find it.
        t.insert("x-dead-letter-exchange".into(), text(&self.dead_exchange()));
        // Default dead-lettering is at-most-once (lost if the DLQ is unavailable); keep the
        // message in the shard until the dead-letter queue has confirmed it.
        t.insert("x-dead-letter-strategy".into(), text("at-least-once"));
        // Required by at-least-once (the broker silently falls back to at-most-once without
        // it). No length limit is set, so it never rejects anything by itself.
        t.insert("x-overflow".into(), text("reject-publish"));
        t
    }

    /// Arguments of the `{p}.retry.{ms}ms` queue of one tier.
    pub(super) fn retry_queue_args(&self, tier_ms: u64) -> FieldTable {
        let mut t = FieldTable::default();
        // Durable and replicated like the shards: a retry waiting here is still work owed.
        t.insert("x-queue-type".into(), text("quorum"));
        // The delay itself: one TTL per queue, because messages only expire from the head.
        t.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(i64::try_from(tier_ms).unwrap_or(i64::MAX)),
        );
        // Expired messages go back to the work exchange with their routing key
        // (`retry{ms}.shard.{i}`), which `#.shard.{i}` routes to the original shard.
        t.insert("x-dead-letter-exchange".into(), text(&self.work_exchange()));
        // Expiry must not lose the retry: keep it until the shard queue has confirmed it.
        t.insert("x-dead-letter-strategy".into(), text("at-least-once"));
        // Required by at-least-once; there is no length limit, so nothing is ever rejected.
        t.insert("x-overflow".into(), text("reject-publish"));
        t
    }

    /// Arguments of `{p}.dead-letter`.
    pub(super) fn dead_queue_args() -> FieldTable {
        let mut t = FieldTable::default();
        // Dead letters are kept until an operator looks at them: replicated and persistent.
        t.insert("x-queue-type".into(), text("quorum"));
        t
    }

    /// Declare everything (idempotent). Runs on its own channel: a 406 closes it.
    pub(super) async fn declare(&self, ch: &Channel, limit: Duration) -> Result<(), QueueError> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let plan = self.describe();
        for exchange in &plan.exchanges {
            let kind = match exchange.kind {
                ExchangeType::Topic => ExchangeKind::Topic,
                ExchangeType::Fanout => ExchangeKind::Fanout,
            };
            let name = &exchange.name;
            let declare = ch.exchange_declare(short(name)?, kind, durable, FieldTable::default());
            declaring(limit, name, declare).await?;
        }
        for queue in &plan.queues {
            let args = match queue.role {
                QueueRole::DeadLetter => Self::dead_queue_args(),
                QueueRole::Shard(_) => self.shard_queue_args(),
                QueueRole::Retry(tier) => self.retry_queue_args(tier),
                QueueRole::Leader => continue, // the lease declares its own queue
            };
            self.queue(ch, limit, &queue.name, args).await?;
            if let Some(b) = &queue.binding {
                self.bind(ch, limit, &queue.name, &b.exchange, &b.routing_key)
                    .await?;
            }
        }
        Ok(())
    }

    async fn queue(
        &self,
        ch: &Channel,
        limit: Duration,
        name: &str,
        args: FieldTable,
    ) -> Result<(), QueueError> {
        let options = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        declaring(limit, name, ch.queue_declare(short(name)?, options, args))
            .await
            .map(drop)
    }

    async fn bind(
        &self,
        ch: &Channel,
        limit: Duration,
        queue: &str,
        exchange: &str,
        pattern: &str,
    ) -> Result<(), QueueError> {
        let bind = ch.queue_bind(
            short(queue)?,
            short(exchange)?,
            short(pattern)?,
            QueueBindOptions::default(),
            FieldTable::default(),
        );
        declaring(limit, queue, bind).await
    }

    /// Messages ready in the shard, retry and dead-letter queues, by passive declares (which
    /// change nothing; a queue that does not exist fails the call with 404).
    pub(super) async fn depths(
        &self,
        ch: &Channel,
        limit: Duration,
    ) -> Result<crate::queue::Depths, QueueError> {
        let mut depths = crate::queue::Depths::default();
        for shard in 0..self.shards {
            depths.work += ready_messages(ch, limit, &self.shard_queue(shard)).await?;
        }
        for &tier in &self.tiers_ms {
            depths.retry += ready_messages(ch, limit, &self.retry_queue(tier)).await?;
        }
        depths.dead_letter = ready_messages(ch, limit, &self.dead_queue()).await?;
        Ok(depths)
    }

    /// Delete every queue and exchange of the prefix, messages included.
    pub(super) async fn delete(&self, ch: &Channel, limit: Duration) -> Result<(), QueueError> {
        let mut queues = vec![self.dead_queue()];
        queues.extend((0..self.shards).map(|s| self.shard_queue(s)));
        queues.extend(self.tiers_ms.iter().map(|t| self.retry_queue(*t)));
        queues.push(self.leader_queue());
        for queue in queues {
            let delete = ch.queue_delete(short(&queue)?, QueueDeleteOptions::default());
            declaring(limit, &queue, delete).await?;
        }
        for exchange in [
            self.work_exchange(),
            self.retry_exchange(),
            self.dead_exchange(),
            self.events_exchange(),
        ] {
            let delete = ch.exchange_delete(short(&exchange)?, ExchangeDeleteOptions::default());
            declaring(limit, &exchange, delete).await?;
        }
        Ok(())
    }
}

/// Messages ready in queue `name`, by a passive declare.
async fn ready_messages(ch: &Channel, limit: Duration, name: &str) -> Result<u64, QueueError> {
    let options = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let declare = ch.queue_declare(short(name)?, options, FieldTable::default());
    Ok(u64::from(
        declaring(limit, name, declare).await?.message_count(),
    ))
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn millis(d: &Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::ShortString;

    fn arg<'a>(t: &'a FieldTable, key: &str) -> Option<&'a AMQPValue> {
        t.inner().get(&ShortString::from(key))
    }

    fn topology() -> Topology {
        let mut s = QueueSettings::with_prefix("fr");
        s.shards = 3;
        s.retry_tiers = vec![
            Duration::from_millis(300),
            Duration::from_millis(100),
            Duration::from_millis(300),
        ];
        Topology::new(&s)
    }

    #[test]
    fn names_live_under_the_prefix() {
        let t = topology();
        assert_eq!(t.work_exchange(), "fr.work");
        assert_eq!(t.shard_queue(2), "fr.shard.2");
        assert_eq!(t.retry_exchange(), "fr.retry");
        assert_eq!(t.retry_queue(100), "fr.retry.100ms");
        assert_eq!(t.dead_exchange(), "fr.dead");
        assert_eq!(t.dead_queue(), "fr.dead-letter");
        assert_eq!(t.events_exchange(), "fr.events");
        assert_eq!(
            t.tiers_ms,
            vec![100, 300],
            "sorted, one queue per distinct tier"
        );
    }

    /// AMQP topic matching, enough of it to check our keys against our patterns.
    fn topic_matches(pattern: &str, key: &str) -> bool {
        fn go(p: &[&str], k: &[&str]) -> bool {
            match (p.first(), k.first()) {
                (None, None) => true,
                (Some(&"#"), _) => go(&p[1..], k) || (!k.is_empty() && go(p, &k[1..])),
                (Some(&"*"), Some(_)) => go(&p[1..], &k[1..]),
                (Some(a), Some(b)) if a == b => go(&p[1..], &k[1..]),
                _ => false,
            }
        }
        let p: Vec<_> = pattern.split('.').collect();
        let k: Vec<_> = key.split('.').collect();
        go(&p, &k)
    }

    #[test]
    fn fresh_and_expired_retry_messages_route_to_their_own_shard_only() {
        let t = topology();
        for shard in 0..t.shards {
            let fresh = Topology::work_routing_key(shard);
            let retry = Topology::retry_routing_key(Duration::from_millis(300), shard);
            assert_eq!(retry, format!("retry300.shard.{shard}"));
            for target in 0..t.shards {
                let binding = Topology::shard_binding(target);
                assert_eq!(topic_matches(&binding, &fresh), shard == target, "{fresh}");
                // After the TTL the retry is dead-lettered to the work exchange with this key.
                assert_eq!(topic_matches(&binding, &retry), shard == target, "{retry}");
            }
            // A retry reaches exactly its tier's queue on the retry exchange.
            assert!(topic_matches(&Topology::retry_binding(300), &retry));
            assert!(!topic_matches(&Topology::retry_binding(100), &retry));
        }
        // shard.1 must not match shard.10's binding and vice versa.
        assert!(!topic_matches(&Topology::shard_binding(1), "shard.10"));
        assert!(!topic_matches(&Topology::shard_binding(10), "shard.1"));
    }

    #[test]
    fn shard_queues_are_quorum_sac_with_a_delivery_limit_and_safe_dead_lettering() {
        let t = topology();
        let a = t.shard_queue_args();
        assert_eq!(arg(&a, "x-queue-type"), Some(&text("quorum")));
        assert_eq!(
            arg(&a, "x-single-active-consumer"),
            Some(&AMQPValue::Boolean(true))
        );
        assert_eq!(
            arg(&a, "x-delivery-limit"),
            Some(&AMQPValue::LongLongInt(DELIVERY_LIMIT))
        );
        assert_eq!(arg(&a, "x-dead-letter-exchange"), Some(&text("fr.dead")));
        assert_eq!(
            arg(&a, "x-dead-letter-strategy"),
            Some(&text("at-least-once"))
        );
        assert_eq!(arg(&a, "x-overflow"), Some(&text("reject-publish")));
    }

    #[test]
    fn retry_queues_have_one_ttl_and_dead_letter_back_to_work() {
        let t = topology();
        let a = t.retry_queue_args(300);
        assert_eq!(arg(&a, "x-queue-type"), Some(&text("quorum")));
        assert_eq!(arg(&a, "x-message-ttl"), Some(&AMQPValue::LongLongInt(300)));
        assert_eq!(arg(&a, "x-dead-letter-exchange"), Some(&text("fr.work")));
        assert_eq!(
            arg(&a, "x-dead-letter-strategy"),
            Some(&text("at-least-once"))
        );
        assert_eq!(arg(&a, "x-overflow"), Some(&text("reject-publish")));
        assert!(
            arg(&a, "x-dead-letter-routing-key").is_none(),
            "keep the key"
        );
        assert_eq!(
            arg(&Topology::dead_queue_args(), "x-queue-type"),
            Some(&text("quorum"))
        );
    }
}
