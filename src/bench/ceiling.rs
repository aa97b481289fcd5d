//! The two reference servers `bench receiver` compares flagrelay with, each started by it as a
//! child process (`flagrelay bench ceiling --kind ...`) on the same machine:
//!
//! - `http`: axum answering `202` to every POST once the body is read: what the HTTP stack
//!   and the load generator allow at all (the HTTP ceiling).
//! - `broker`: the same, but each request first publishes as many messages as the request has
//!   items, each as large as the envelope flagrelay would publish (same signature headers,
//!   persistent), to the same topology (flagrelay's own declaration), on one confirm-mode
//!   channel, and waits for every confirm: what the broker allows through lapin alone (the
//!   broker ceiling). No parsing, authentication, signing or link supervision.
//!
//! This is the one file outside `queue/rabbitmq/` that imports lapin, on purpose: its point is
//! to measure raw lapin (ARCHITECTURE.md, invariant 10).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use anyhow::Context as _;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use secrecy::ExposeSecret;

use crate::config::Config;
use crate::message::{self, Encoded, Message, Origin, UserChanged};
use crate::queue::Queue as _;
use crate::queue::rabbitmq::RabbitQueue;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CeilingKind {
    /// A bare axum handler answering 202.
    Http,
    /// Raw lapin publishes with confirms, then 202.
    Broker,
}

#[derive(Debug, clap::Args)]
pub struct CeilingArgs {
    #[arg(long, value_enum)]
    pub kind: CeilingKind,
    #[arg(long)]
    pub listen: SocketAddr,
    /// Messages published per request (the items per batch the load generator sends).
    #[arg(long, default_value_t = 1)]
    pub items: usize,
}

/// A message of exactly the size and headers flagrelay's receiver publishes for one item.
pub fn sample_message(config: &Config) -> Encoded {
    let m = Message::UserChanged(UserChanged {
        tenant_id: config
            .tenants
            .first()
            .map_or_else(|| uuid::Uuid::nil().to_string().into(), |t| t.id.clone()),
        user_id: uuid::Uuid::new_v4().to_string().into(),
        change_type: "updated".into(),
        subscription_id: Some(uuid::Uuid::new_v4().to_string()),
        event_time: Some(chrono::Utc::now()),
        received_at: chrono::Utc::now(),
        origin: Origin::Notification,
        not_before: None,
    });
    message::encode(&m, &config.signing.signer())
}

struct Publisher {
    channel: Channel,
    exchange: ShortString,
    shards: u16,
    next: AtomicU16,
    message: Encoded,
    properties: BasicProperties,
    items: usize,
    // Kept open for as long as the server runs.
    _connection: Connection,
}

/// Serve the reference server until killed. The configuration (`--config`) gives the broker,
/// prefix, shard count and signing key.
pub async fn serve(args: CeilingArgs, config: Option<&Path>) -> anyhow::Result<()> {
    let router = match args.kind {
        CeilingKind::Http => Router::new().route("/graph/notifications", post(accept)),
        CeilingKind::Broker => {
            let config = Config::load(config)?;
            let publisher = Arc::new(connect(&config, args.items).await?);
            Router::new()
                .route("/graph/notifications", post(publish))
                .with_state(publisher)
        }
    };
    let router = router.route("/healthz", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    axum::serve(listener, router).await?;
    Ok(())
}

async fn accept(_body: Bytes) -> StatusCode {
    StatusCode::ACCEPTED
}

async fn publish(State(p): State<Arc<Publisher>>, _body: Bytes) -> StatusCode {
    let sends = (0..p.items).map(|_| {
        let shard = p.next.fetch_add(1, Ordering::Relaxed) % p.shards;
        let p = p.clone();
        async move {
            let confirm = p
                .channel
                .basic_publish(
                    p.exchange.clone(),
                    ShortString::from(format!("shard.{shard}")),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    &p.message.body,
                    p.properties.clone(),
                )
                .await?;
            confirm.await
        }
    });
    let confirms = futures::future::join_all(sends).await;
    let all_acked = confirms
        .iter()
        .all(|c| matches!(c, Ok(Confirmation::Ack(None))));
    if all_acked {
        StatusCode::ACCEPTED
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn connect(config: &Config, items: usize) -> anyhow::Result<Publisher> {
    let url = config
        .amqp
        .url
        .as_ref()
        .context("the broker ceiling needs amqp.url")?;
    let settings = config.amqp.queue_settings();
    // flagrelay's own declaration: the same quorum shard queues behind the same exchange.
    RabbitQueue::new(url.clone(), settings.clone())
        .declare()
        .await?;
    let mut uri: AMQPUri = url
        .expose_secret()
        .parse()
        .map_err(|_| anyhow::anyhow!("invalid value for `amqp.url`"))?;
    // lapin reads IP hosts as "localhost" (see queue/rabbitmq.rs); name the IP itself.
    match url::Url::parse(url.expose_secret())
        .ok()
        .and_then(|u| u.host().map(|h| h.to_owned()))
    {
        Some(url::Host::Ipv4(ip)) => uri.authority.host = ip.to_string(),
        Some(url::Host::Ipv6(ip)) => uri.authority.host = ip.to_string(),
        _ => {}
    }
    let connection = Connection::connect_uri(uri, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let message = sample_message(config);
    let mut headers = FieldTable::default();
    for (k, v) in &message.headers {
        headers.insert(
            ShortString::from(k.as_str()),
            AMQPValue::LongString(LongString::from(v.as_str())),
        );
    }
    let properties = BasicProperties::default()
        .with_content_type(message::CONTENT_TYPE.into())
        .with_delivery_mode(2)
        .with_message_id(ShortString::from(message.id.as_str()))
        .with_type(ShortString::from(message.event_type))
        .with_headers(headers);
    Ok(Publisher {
        channel,
        exchange: ShortString::from(format!("{}.work", settings.prefix)),
        shards: settings.shards,
        next: AtomicU16::new(0),
        message,
        properties,
        items,
        _connection: connection,
    })
}
