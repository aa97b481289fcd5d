//! The publisher link: one shared connection with a confirm-mode channel, opened on demand by
//! a small supervisor, with the topology declared on every (re)connect, and dropped on any
//! error or timeout so that the next call reconnects.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::time::Instant;

use super::{Config, clone_error, close_connection, open_connection, short, within};
use crate::queue::QueueError;

/// An open connection with its publisher channel.
pub(super) struct Link {
    pub(super) connection: Connection,
    /// Confirm mode; shared by every concurrent publish, each awaiting its own confirm.
    publisher: Channel,
    /// lapin assigns a publish's confirm tag and queues its frames under two different locks,
    /// so two publishes racing on different threads could swap tags (and confirms). Polling
    /// `basic_publish` under this lock makes the pair atomic; it is never held across an
    /// await, and confirms are awaited without it.
    gate: Mutex<()>,
}

impl Link {
    fn healthy(&self) -> bool {
        self.connection.status().connected() && self.publisher.status().connected()
    }
}

type Connecting = Shared<BoxFuture<'static, Result<Arc<Link>, Arc<QueueError>>>>;

enum Slot {
    Down,
    /// A connect attempt runs in its own task, so callers that give up (their deadline passed)
    /// do not abort it: the next caller finds it finished.
    Connecting(Connecting),
    Up(Arc<Link>),
}

/// Owns the publisher link.
pub(super) struct Supervisor {
    cfg: Arc<Config>,
    slot: Mutex<Slot>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &*self.lock() {
            Slot::Down => "down",
            Slot::Connecting(_) => "connecting",
            Slot::Up(_) => "up",
        };
        f.debug_struct("Supervisor")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

/// What a publish goes to.
pub(super) struct Target<'a> {
    pub(super) exchange: &'a str,
    pub(super) routing_key: &'a str,
    /// A returned (unroutable) message is a failure; off for events nobody may listen to.
    pub(super) mandatory: bool,
}

impl Supervisor {
    pub(super) fn new(cfg: Arc<Config>) -> Self {
        Self {
            cfg,
            slot: Mutex::new(Slot::Down),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current link, connecting if there is none, by `deadline` (`limit` names it in the
    /// error). `true` when this call waited for a new connection, which has just declared
    /// the topology.
    pub(super) async fn link(
        &self,
        deadline: Instant,
        limit: Duration,
    ) -> Result<(Arc<Link>, bool), QueueError> {
        let connecting = {
            let mut slot = self.lock();
            match &*slot {
                Slot::Up(link) if link.healthy() => return Ok((link.clone(), false)),
                Slot::Connecting(c) => c.clone(),
                _ => {
                    let cfg = self.cfg.clone();
                    let task = tokio::spawn(async move { establish(&cfg).await });
                    let c = async move {
                        match task.await {
                            Ok(r) => r.map_err(Arc::new),
                            Err(e) => Err(Arc::new(QueueError::Unavailable(format!(
                                "the connect task failed: {e}"
                            )))),
                        }
                    }
                    .boxed()
                    .shared();
                    *slot = Slot::Connecting(c.clone());
                    c
                }
            }
        };
        let waited = tokio::time::timeout_at(deadline, connecting.clone()).await;
        let Ok(result) = waited else {
            return Err(QueueError::Timeout(limit, "connecting to the broker"));
        };
        let mut slot = self.lock();
        if let Slot::Connecting(c) = &*slot
            && c.ptr_eq(&connecting)
        {
            *slot = match &result {
                Ok(link) => Slot::Up(link.clone()),
                Err(_) => Slot::Down,
            };
        }
        result.map(|l| (l, true)).map_err(|e| clone_error(&e))
    }

    /// Forget `link` (if it is still the current one) and close it in the background.
    pub(super) fn invalidate(&self, link: &Arc<Link>) {
        let mut slot = self.lock();
        if let Slot::Up(current) = &*slot
            && Arc::ptr_eq(current, link)
        {
            *slot = Slot::Down;
            // In-flight publishes on it fail now rather than at their deadline.
            let link = link.clone();
            tokio::spawn(async move {
                let close = link.connection.close(200, "flagrelay reconnecting".into());
                let _ = tokio::time::timeout(Duration::from_secs(1), close).await;
            });
        }
    }

    /// Publish and wait for the broker's confirm, all within `publish_timeout`. Ok only for an
    /// ack without a returned message.
    pub(super) async fn publish(
        &self,
        target: Target<'_>,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), QueueError> {
        let limit = self.cfg.settings.publish_timeout;
        let deadline = Instant::now() + limit;
        let mut retried = false;
        loop {
            let (link, fresh) = self.link(deadline, limit).await?;
            let confirm = {
                let send = link.publisher.basic_publish(
                    short(target.exchange)?,
                    short(target.routing_key)?,
                    BasicPublishOptions {
                        mandatory: target.mandatory,
                        immediate: false,
                    },
                    body,
                    properties.clone(),
                );
                let mut send = std::pin::pin!(send);
                let gated = std::future::poll_fn(|cx| {
                    let _gate = link.gate.lock().unwrap_or_else(|e| e.into_inner());
                    send.as_mut().poll(cx)
                });
                within_deadline(deadline, limit, "sending a message", gated).await
            };
            let confirm = match confirm {
                Ok(confirm) => confirm,
                Err(e) => {
                    self.invalidate(&link);
                    // Nothing reached the broker: safe to try once more on a new connection
                    // when the failure was a stale link rather than a fresh one.
                    if !fresh && !retried && Instant::now() < deadline {
                        retried = true;
                        tracing::debug!(error = %e, "publisher link was stale; reconnecting");
                        continue;
                    }
                    return Err(e);
                }
            };
            let confirmation = within_deadline(
                deadline,
                limit,
                "waiting for the publisher confirm",
                confirm,
            )
            .await
            .inspect_err(|_| self.invalidate(&link))?;
            return match confirmation {
                Confirmation::Ack(None) => Ok(()),
                Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
                    // lapin hands a returned message to whichever confirm completes next; with a
                    // multiple-ack it can be another publish's. Treat ours as failed either way
                    // (a false failure only causes a harmless redelivery) and say whose it was.
                    let returned_id = returned
                        .delivery
                        .properties
                        .message_id()
                        .as_ref()
                        .map(ToString::to_string);
                    tracing::warn!(
                        exchange = target.exchange,
                        routing_key = target.routing_key,
                        returned_message_id = ?returned_id,
                        reply = %returned.reply_text,
                        "broker returned an unroutable message"
                    );
                    Err(QueueError::Unroutable)
                }
                Confirmation::Nack(None) => Err(QueueError::Nacked),
                Confirmation::NotRequested => Err(QueueError::Unavailable(
                    "the publisher channel is not in confirm mode".into(),
                )),
            };
        }
    }
}

async fn within_deadline<T>(
    deadline: Instant,
    limit: Duration,
    what: &'static str,
    fut: impl Future<Output = lapin::Result<T>>,
) -> Result<T, QueueError> {
    match tokio::time::timeout_at(deadline, fut).await {
        Ok(r) => r.map_err(|e| super::broker_error(what, &e)),
        Err(_) => Err(QueueError::Timeout(limit, what)),
    }
}

/// Connect, declare the topology, open the confirm-mode publisher channel.
async fn establish(cfg: &Config) -> Result<Arc<Link>, QueueError> {
    let connection = open_connection(cfg, "publisher").await?;
    let setup = async {
        let op = cfg.op_timeout();
        let ch = within(op, "opening a channel", connection.create_channel()).await?;
        cfg.topology.declare(&ch, op).await?;
        // The declaring channel is closed by the broker on a 406; a failing close is fine.
        let _ = tokio::time::timeout(op, ch.close(200, "declared".into())).await;
        let publisher = within(op, "opening a channel", connection.create_channel()).await?;
        within(
            op,
            "enabling publisher confirms",
            publisher.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        Ok(publisher)
    };
    match setup.await {
        Ok(publisher) => {
            tracing::info!(prefix = %cfg.settings.prefix, "publisher connected to RabbitMQ");
            Ok(Arc::new(Link {
                connection,
                publisher,
                gate: Mutex::new(()),
            }))
        }
        Err(e) => {
            close_connection(connection);
            Err(e)
        }
    }
}
