//! The RabbitMQ backend of [`Queue`]: durable, sharded, with delayed retries and dead letters
//! built from core AMQP 0-9-1 features only (no plugins; RabbitMQ 3.10 to 4.x).
//!
//! This module tree is the only place in the crate that imports lapin.
//! - [`topology`]: names and arguments of every exchange and queue, and their declaration.
//! - [`link`]: the publisher connection supervisor (connect on demand, confirm every publish).
//! - [`consumer`]: consume sessions that reconnect with backoff, and the acker that carries out
//!   a [`Settlement`](crate::queue::Settlement).
//!
//! Invariants: every broker operation runs under a timeout; a connection that failed or timed
//! out is dropped, never reused; the topology is declared on every new connection before it
//! publishes or consumes; the URL's password is never logged.

mod consumer;
mod lease;
mod link;
mod topology;

pub use self::topology::{
    ExchangeDescription, ExchangeType, QueueDescription, QueueRole, Route, TopologyDescription,
};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Connection, ConnectionProperties, ErrorKind};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::link::{Supervisor, Target};
use self::topology::Topology;
use super::{DeadLetter, Delivery, Queue, QueueError, QueueSettings, shard_for};
use crate::config::redact_url;
use crate::message::{CONTENT_TYPE, Encoded};

/// Heartbeat interval asked of the broker unless the URL sets `heartbeat=`: a peer that
/// vanishes without closing the socket is noticed within two intervals.
const HEARTBEAT_SECS: u16 = 10;

/// The RabbitMQ backend. Cheap to clone; clones share the publisher connection.
#[derive(Debug, Clone)]
pub struct RabbitQueue {
    cfg: Arc<Config>,
    publisher: Arc<Supervisor>,
}

impl RabbitQueue {
    /// A backend for the broker at `url` (`amqp://user:pass@host:port/vhost`). Does no IO:
    /// the first call that needs the broker connects and declares the topology.
    pub fn new(url: SecretString, settings: QueueSettings) -> Self {
        let cfg = Arc::new(Config {
            topology: Topology::new(&settings),
            url,
            settings,
        });
        Self {
            publisher: Arc::new(Supervisor::new(cfg.clone())),
            cfg,
        }
    }

    /// The settings this backend was made with (prefix, shards, retry tiers, ...).
    pub fn settings(&self) -> &QueueSettings {
        &self.cfg.settings
    }

    /// Every exchange, queue, binding and publishing route of a deployment with `settings`,
    /// exactly as [`Queue::declare`] declares them (the leader queue is declared by the lease).
    pub fn describe(settings: &QueueSettings) -> TopologyDescription {
        Topology::new(settings).describe()
    }

    /// Delete every exchange and queue of this prefix, with their messages. For tests and for
    /// decommissioning a deployment; consumers of the prefix lose their queues.
    pub async fn delete_topology(&self) -> Result<(), QueueError> {
        let limit = self.cfg.op_timeout();
        let (link, _) = self.publisher.link(Instant::now() + limit, limit).await?;
        let ch = within(limit, "opening a channel", link.connection.create_channel()).await?;
        let result = self.cfg.topology.delete(&ch, limit).await;
        let _ = tokio::time::timeout(limit, ch.close(200, "deleted".into())).await;
        result
    }
}

#[async_trait]
impl Queue for RabbitQueue {
    async fn declare(&self) -> Result<(), QueueError> {
        let limit = self.cfg.op_timeout();
        let (link, fresh) = self
            .publisher
            .link(Instant::now() + self.cfg.setup_timeout(), limit)
            .await?;
        if fresh {
            return Ok(()); // a new link has just declared everything
        }
        let ch = within(limit, "opening a channel", link.connection.create_channel())
            .await
            .inspect_err(|_| self.publisher.invalidate(&link))?;
        let result = self.cfg.topology.declare(&ch, limit).await;
        let _ = tokio::time::timeout(limit, ch.close(200, "declared".into())).await;
        if let Err(QueueError::Timeout(..)) = &result {
            self.publisher.invalidate(&link);
        }
        result
    }

    async fn publish(&self, message: &Encoded) -> Result<(), QueueError> {
        let shard = shard_for(&message.shard_key, self.cfg.settings.shards);
        let target = Target {
            exchange: &self.cfg.topology.work_exchange(),
            routing_key: &Topology::work_routing_key(shard),
            mandatory: true,
        };
        self.publisher
            .publish(target, &message.body, message_properties(message)?)
            .await
    }

    async fn publish_event(&self, message: &Encoded) -> Result<(), QueueError> {
        let target = Target {
            exchange: &self.cfg.topology.events_exchange(),
            // By decision (`decision.deactivated`, ...), computed in `message.rs`.
            routing_key: &message.routing_key,
            // Other systems subscribe if they want to; an event nobody reads is not an error.
            mandatory: false,
        };
        self.publisher
            .publish(target, &message.body, message_properties(message)?)
            .await
    }

    async fn consume(
        &self,
        shutdown: CancellationToken,
    ) -> Result<mpsc::Receiver<Delivery>, QueueError> {
        // A topology conflict needs an operator: report it now. A broker that is merely down
        // is retried by the consumer supervisor.
        match self.declare().await {
            Err(e @ QueueError::Topology { .. }) => return Err(e),
            Err(e) => tracing::warn!(error = %e, "broker not ready; consuming as soon as it is"),
            Ok(()) => {}
        }
        Ok(consumer::start(
            self.cfg.clone(),
            self.publisher.clone(),
            shutdown,
        ))
    }

    async fn take_dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, QueueError> {
        let limit = self.cfg.op_timeout();
        let (link, _) = self.publisher.link(Instant::now() + limit, limit).await?;
        let ch = within(limit, "opening a channel", link.connection.create_channel()).await?;
        let queue = short(&self.cfg.topology.dead_queue())?;
        let mut taken = Vec::new();
        let mut last_tag = None;
        let fetched = async {
            while taken.len() < max {
                let get = ch.basic_get(queue.clone(), BasicGetOptions { no_ack: false });
                let Some(message) = within(limit, "fetching a dead letter", get).await? else {
                    break;
                };
                last_tag = Some(message.delivery.delivery_tag);
                taken.push(dead_letter(message.delivery));
            }
            if let Some(tag) = last_tag {
                let ack = ch.basic_ack(tag, BasicAckOptions { multiple: true });
                within(limit, "removing dead letters", ack).await?;
            }
            Ok(())
        }
        .await;
        // Close-ok comes after the broker processed the ack. On failure, whatever was fetched
        // but not acked goes back to the dead-letter queue.
        let _ = tokio::time::timeout(limit, ch.close(200, "taken".into())).await;
        fetched.map(|()| taken)
    }

    async fn peek_dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, QueueError> {
        let limit = self.cfg.op_timeout();
        let (link, _) = self.publisher.link(Instant::now() + limit, limit).await?;
        let ch = within(limit, "opening a channel", link.connection.create_channel()).await?;
        let queue = short(&self.cfg.topology.dead_queue())?;
        let mut seen = Vec::new();
        let fetched = async {
            while seen.len() < max {
                let get = ch.basic_get(queue.clone(), BasicGetOptions { no_ack: false });
                let Some(message) = within(limit, "reading a dead letter", get).await? else {
                    break;
                };
                seen.push(dead_letter(message.delivery));
            }
            Ok::<_, QueueError>(())
        }
        .await;
        // Nothing was acknowledged: closing the channel puts every letter back.
        let _ = tokio::time::timeout(limit, ch.close(200, "peeked".into())).await;
        fetched.map(|()| seen)
    }

    async fn redrive_dead_letters(&self, which: &super::Redrive) -> Result<usize, QueueError> {
        let limit = self.cfg.op_timeout();
        let (link, _) = self.publisher.link(Instant::now() + limit, limit).await?;
        let ch = within(limit, "opening a channel", link.connection.create_channel()).await?;
        let queue = short(&self.cfg.topology.dead_queue())?;
        let mut redriven = 0;
        let result = async {
            loop {
                let get = ch.basic_get(queue.clone(), BasicGetOptions { no_ack: false });
                let Some(message) = within(limit, "reading a dead letter", get).await? else {
                    break;
                };
                let tag = message.delivery.delivery_tag;
                let d = dead_letter(message.delivery);
                if which.wants(&d) {
                    // Confirmed on the work queues first, then removed from the dead letters.
                    self.publish(&d.redrive_copy()).await?;
                    within(
                        limit,
                        "removing a redriven dead letter",
                        ch.basic_ack(tag, BasicAckOptions::default()),
                    )
                    .await?;
                    redriven += 1;
                }
            }
            Ok::<_, QueueError>(())
        }
        .await;
        // Letters not chosen were never acknowledged and go back as they were.
        let _ = tokio::time::timeout(limit, ch.close(200, "redriven".into())).await;
        result.map(|()| redriven)
    }

    async fn purge_dead_letters(&self) -> Result<usize, QueueError> {
        let limit = self.cfg.op_timeout();
        let (link, _) = self.publisher.link(Instant::now() + limit, limit).await?;
        let ch = within(limit, "opening a channel", link.connection.create_channel()).await?;
        let purge = ch.queue_purge(
            short(&self.cfg.topology.dead_queue())?,
            lapin::options::QueuePurgeOptions::default(),
        );
        let n = within(limit, "purging the dead letters", purge).await;
        let _ = tokio::time::timeout(limit, ch.close(200, "purged".into())).await;
        n.map(|n| n as usize)
    }

    async fn ready(&self) -> bool {
        let limit = Duration::from_secs(1);
        self.publisher
            .link(Instant::now() + limit, limit)
            .await
            .is_ok()
    }

    async fn depths(&self) -> Result<super::Depths, QueueError> {
        let limit = self.cfg.op_timeout();
        let (link, _) = self.publisher.link(Instant::now() + limit, limit).await?;
        let ch = within(limit, "opening a channel", link.connection.create_channel()).await?;
        let depths = self.cfg.topology.depths(&ch, limit).await;
        let _ = tokio::time::timeout(limit, ch.close(200, "counted".into())).await;
        depths
    }

    fn durable(&self) -> bool {
        true
    }

    fn leader_lease(&self, shutdown: CancellationToken) -> tokio::sync::watch::Receiver<bool> {
        lease::start(self.cfg.clone(), shutdown)
    }
}

/// What every part of the backend needs to know.
struct Config {
    url: SecretString,
    settings: QueueSettings,
    topology: Topology,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("url", &redact_url(self.url.expose_secret()))
            .field("prefix", &self.settings.prefix)
            .field("shards", &self.settings.shards)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Declarations, channel set-up and the like. Creating quorum queues takes a Raft
    /// election each, so this is never shorter than 5 s.
    fn op_timeout(&self) -> Duration {
        self.settings.publish_timeout.max(Duration::from_secs(5))
    }

    /// TCP + TLS + AMQP handshake.
    fn connect_timeout(&self) -> Duration {
        self.op_timeout()
    }

    /// Connecting and declaring the whole topology.
    fn setup_timeout(&self) -> Duration {
        self.connect_timeout() + 2 * self.op_timeout()
    }

    /// How often a consume session proves its connection alive with a passive declare: lapin
    /// has reports of consumer streams that neither end nor fail when the broker dies.
    fn watchdog_period(&self) -> Duration {
        self.settings
            .publish_timeout
            .clamp(Duration::from_secs(1), Duration::from_secs(5))
    }

    fn uri(&self) -> Result<AMQPUri, QueueError> {
        amqp_uri(self.url.expose_secret())
    }
}

fn dead_letter(d: lapin::message::Delivery) -> DeadLetter {
    DeadLetter {
        message_id: d.properties.message_id().as_ref().map(|m| m.to_string()),
        headers: string_headers(d.properties.headers().as_ref()),
        body: Bytes::from(d.data),
    }
}

/// Parse the URL, defaulting the heartbeat to [`HEARTBEAT_SECS`].
fn amqp_uri(url: &str) -> Result<AMQPUri, QueueError> {
    let invalid = || QueueError::Unavailable(format!("invalid AMQP URL {}", redact_url(url)));
    let parsed = url::Url::parse(url).map_err(|_| invalid())?;
    let mut uri: AMQPUri = url.parse().map_err(|_| invalid())?;
    // amq-protocol-uri 10.6 reads the host with `Url::domain()`, which is None for IP
    // addresses, and then silently connects to "localhost" instead.
    match parsed.host() {
        Some(url::Host::Ipv4(ip)) => uri.authority.host = ip.to_string(),
        Some(url::Host::Ipv6(ip)) => uri.authority.host = ip.to_string(),
        Some(url::Host::Domain(_)) | None => {}
    }
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(HEARTBEAT_SECS);
    }
    Ok(uri)
}

/// A new connection, named for the management UI, within the connect timeout.
async fn open_connection(cfg: &Config, role: &str) -> Result<Connection, QueueError> {
    let uri = cfg.uri()?;
    let name = format!("flagrelay {role} ({})", cfg.settings.prefix);
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let limit = cfg.connect_timeout();
    match tokio::time::timeout(limit, Connection::connect_uri(uri, props)).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(e)) => Err(QueueError::Unavailable(format!(
            "cannot connect to {}: {e}",
            redact_url(cfg.url.expose_secret())
        ))),
        Err(_) => Err(QueueError::Timeout(limit, "connecting to the broker")),
    }
}

/// Close a connection in the background, without waiting more than a second for the broker.
fn close_connection(connection: Connection) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            let close = connection.close(200, "flagrelay reconnecting or stopping".into());
            let _ = tokio::time::timeout(Duration::from_secs(1), close).await;
        });
    }
}

/// Run a broker operation under a timeout.
async fn within<T>(
    limit: Duration,
    what: &'static str,
    fut: impl Future<Output = lapin::Result<T>>,
) -> Result<T, QueueError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(|e| broker_error(what, &e)),
        Err(_) => Err(QueueError::Timeout(limit, what)),
    }
}

/// Run a declaration (or deletion) of `name` under a timeout, telling the operator what to do
/// when the broker refuses it.
async fn declaring<T>(
    limit: Duration,
    name: &str,
    fut: impl Future<Output = lapin::Result<T>>,
) -> Result<T, QueueError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(|e| declare_error(name, &e)),
        Err(_) => Err(QueueError::Timeout(limit, "declaring the topology")),
    }
}

fn broker_error(what: &'static str, e: &lapin::Error) -> QueueError {
    QueueError::Unavailable(format!("{what}: {e}"))
}

fn declare_error(name: &str, e: &lapin::Error) -> QueueError {
    if let ErrorKind::ProtocolError(amqp) = e.kind() {
        let said = amqp.get_message();
        let reason = match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => Some(format!(
                "the broker refused it ({said}): {name} already exists with other arguments or \
                 another type (an older flagrelay, another tool, or by hand). Stop flagrelay, \
                 drain {name}, delete it (`rabbitmqctl delete_queue {name}` or \
                 `rabbitmqadmin delete exchange name={name}`) and start again so it is \
                 re-created, or configure another amqp.prefix"
            )),
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => Some(format!(
                "the broker refused it ({said}): give the AMQP user configure, write and read \
                 permissions on names starting with the prefix"
            )),
            _ => None,
        };
        if let Some(reason) = reason {
            return QueueError::Topology {
                name: name.to_owned(),
                reason,
            };
        }
    }
    broker_error("declaring the topology", e)
}

/// `QueueError` is not `Clone` (its API is shared); connect results are shared by waiters.
fn clone_error(e: &QueueError) -> QueueError {
    match e {
        QueueError::Unavailable(s) => QueueError::Unavailable(s.clone()),
        QueueError::Timeout(d, what) => QueueError::Timeout(*d, what),
        QueueError::Nacked => QueueError::Nacked,
        QueueError::Unroutable => QueueError::Unroutable,
        QueueError::Topology { name, reason } => QueueError::Topology {
            name: name.clone(),
            reason: reason.clone(),
        },
        QueueError::ChannelGone => QueueError::ChannelGone,
    }
}

/// A name for the wire (AMQP short strings hold at most 255 bytes).
fn short(s: &str) -> Result<ShortString, QueueError> {
    ShortString::try_new(s).map_err(|_| QueueError::Topology {
        name: s.chars().take(64).collect(),
        reason: "longer than the 255 bytes AMQP allows; use a shorter amqp.prefix".into(),
    })
}

/// Properties of a work message or event: persistent CloudEvents JSON with its id and type.
fn message_properties(message: &Encoded) -> Result<BasicProperties, QueueError> {
    let mut props = BasicProperties::default()
        .with_content_type(CONTENT_TYPE.into())
        // Persistent: written to disk before the confirm (quorum queues always are).
        .with_delivery_mode(2)
        .with_timestamp(chrono::Utc::now().timestamp().try_into().unwrap_or(0))
        .with_headers(string_table(&message.headers, FieldTable::default()));
    if !message.id.is_empty() {
        props = props.with_message_id(short(&message.id)?);
    }
    if !message.event_type.is_empty() {
        props = props.with_type(message.event_type.into());
    }
    Ok(props)
}

/// `table` plus `headers` as AMQP long strings (overriding entries of the same name).
fn string_table(headers: &BTreeMap<String, String>, mut table: FieldTable) -> FieldTable {
    for (k, v) in headers {
        match ShortString::try_new(k.as_str()) {
            Ok(key) => {
                table.insert(key, AMQPValue::LongString(LongString::from(v.as_str())));
            }
            Err(_) => tracing::warn!(header = %k, "header name too long for AMQP; dropped"),
        }
    }
    table
}

/// String-valued headers, plus numbers and booleans rendered as text (the broker's
/// `x-delivery-count` is one). Tables and arrays such as `x-death` are left out.
fn string_headers(table: Option<&FieldTable>) -> BTreeMap<String, String> {
    let Some(table) = table else {
        return BTreeMap::new();
    };
    table
        .inner()
        .iter()
        .filter_map(|(k, v)| {
            let text = match v {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.to_string(),
                AMQPValue::Boolean(b) => b.to_string(),
                AMQPValue::ShortShortInt(n) => n.to_string(),
                AMQPValue::ShortShortUInt(n) => n.to_string(),
                AMQPValue::ShortInt(n) => n.to_string(),
                AMQPValue::ShortUInt(n) => n.to_string(),
                AMQPValue::LongInt(n) => n.to_string(),
                AMQPValue::LongUInt(n) => n.to_string(),
                AMQPValue::LongLongInt(n) => n.to_string(),
                AMQPValue::Timestamp(n) => n.to_string(),
                _ => return None,
            };
            Some((k.to_string(), text))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldArray;

    #[test]
    fn uri_keeps_ip_hosts_and_defaults_the_heartbeat() {
        let uri = amqp_uri("amqp://guest:pw@10.1.2.3:5673/%2f").unwrap();
        assert_eq!(uri.authority.host, "10.1.2.3");
        assert_eq!(uri.authority.port, 5673);
        assert_eq!(uri.vhost, "/");
        assert_eq!(uri.query.heartbeat, Some(HEARTBEAT_SECS));
        let uri = amqp_uri("amqps://u:p@rabbit.example/prod?heartbeat=30").unwrap();
        assert_eq!(uri.authority.host, "rabbit.example");
        assert_eq!(uri.vhost, "prod");
        assert_eq!(uri.query.heartbeat, Some(30));
    }

    #[test]
    fn invalid_url_errors_never_show_the_password() {
        for url in ["http://u:hunter2@h/", "amqp://u:hunter2@h/?heartbeat=x"] {
            let e = amqp_uri(url).unwrap_err().to_string();
            assert!(!e.contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn work_messages_are_persistent_cloudevents_with_their_headers() {
        let mut headers = BTreeMap::new();
        headers.insert("x-flagrelay-signature".to_owned(), "abc".to_owned());
        let m = Encoded {
            id: "id-1".into(),
            event_type: "io.flagrelay.test.v1",
            shard_key: "t/u".into(),
            routing_key: String::new(),
            body: Bytes::from_static(b"{}"),
            headers,
        };
        let p = message_properties(&m).unwrap();
        assert_eq!(p.delivery_mode(), &Some(2));
        assert_eq!(
            p.content_type().as_ref().map(|c| c.as_str()),
            Some(CONTENT_TYPE)
        );
        assert_eq!(p.message_id().as_ref().map(|c| c.as_str()), Some("id-1"));
        assert_eq!(
            p.kind().as_ref().map(|c| c.as_str()),
            Some("io.flagrelay.test.v1")
        );
        assert!(p.timestamp().is_some());
        let back = string_headers(p.headers().as_ref());
        assert_eq!(back, m.headers);
    }

    #[test]
    fn headers_render_scalars_and_skip_tables() {
        let mut t = FieldTable::default();
        t.insert("a".into(), AMQPValue::LongString("x".into()));
        t.insert("x-delivery-count".into(), AMQPValue::LongLongInt(3));
        t.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(
                FieldTable::default(),
            )])),
        );
        let h = string_headers(Some(&t));
        assert_eq!(h.get("a").map(String::as_str), Some("x"));
        assert_eq!(h.get("x-delivery-count").map(String::as_str), Some("3"));
        assert!(!h.contains_key("x-death"));
    }

    #[test]
    fn overlong_names_are_topology_errors_not_panics() {
        assert!(matches!(
            short(&"p".repeat(300)),
            Err(QueueError::Topology { .. })
        ));
    }
}
