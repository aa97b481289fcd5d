//! The in-process backend of [`Queue`], for `flagrelay run` and `demo` without a broker.
//! NOT durable: queued messages, pending retries and dead letters are lost when the process
//! exits.
//!
//! Same semantics as RabbitMQ where the worker can tell: messages go to shard
//! [`shard_for`]`(shard_key)` and are handed out in order per shard, at most `prefetch`
//! unsettled per shard; a retry waits [`QueueSettings::tier_for`] and comes back to the same
//! shard with the attempt headers; dead letters are kept for [`Queue::take_dead_letters`]; a
//! delivery dropped unsettled goes back to the front of its shard as redelivered.
//!
//! One consumer at a time, like a single-active-consumer queue: a second [`Queue::consume`]
//! returns at once, but its receiver only gets deliveries once the active consumer has
//! stopped (its token cancelled or its receiver dropped).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::{
    ATTEMPT_HEADER, Acker, DEAD_LETTERED_AT_HEADER, DeadLetter, Delivered, Delivery,
    LAST_ERROR_HEADER, Queue, QueueError, QueueSettings, REASON_HEADER, Settlement,
    last_error_header, shard_for,
};
use crate::message::Encoded;

/// Default bound on messages held (queued, in flight and waiting for a retry).
pub const DEFAULT_MAX_QUEUED: usize = 10_000;
/// Outcome events kept for [`EmbeddedQueue::events`]; older ones are forgotten.
pub const EVENTS_KEPT: usize = 1_000;

/// The in-process backend. Cheap to clone; clones share the queues.
#[derive(Debug, Clone)]
pub struct EmbeddedQueue {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: QueueSettings,
    max_queued: usize,
    state: Mutex<State>,
    /// Wakes the consumer task: something was queued or settled.
    wake: Notify,
    /// Held by the active consumer task (single active consumer).
    active: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Debug)]
struct State {
    shards: Vec<VecDeque<Stored>>,
    /// Handed out and not settled yet, per shard (bounded by `prefetch`).
    in_flight: Vec<usize>,
    /// Everything held: queued, in flight, and waiting for a retry. Bounded by `max_queued`.
    held: usize,
    /// Dead letters; bounded by `max_queued` as well (the oldest go first).
    dead: VecDeque<DeadLetter>,
    events: VecDeque<Encoded>,
}

#[derive(Debug, Clone)]
struct Stored {
    body: Bytes,
    headers: BTreeMap<String, String>,
    message_id: Option<String>,
    redelivered: bool,
}

impl EmbeddedQueue {
    /// An embedded queue holding at most [`DEFAULT_MAX_QUEUED`] messages.
    pub fn new(settings: QueueSettings) -> Self {
        Self::with_max_queued(settings, DEFAULT_MAX_QUEUED)
    }

    /// An embedded queue holding at most `max_queued` messages; a publish beyond that fails
    /// with [`QueueError::Unavailable`] (the receiver answers 503, Graph retries later).
    pub fn with_max_queued(settings: QueueSettings, max_queued: usize) -> Self {
        tracing::warn!(
            prefix = %settings.prefix,
            max_queued,
            "using the embedded queue: it is NOT durable; queued messages, retries and dead \
             letters are lost when this process exits. Configure RabbitMQ for production."
        );
        let shards = usize::from(settings.shards.max(1));
        Self {
            inner: Arc::new(Inner {
                max_queued,
                state: Mutex::new(State {
                    shards: vec![VecDeque::new(); shards],
                    in_flight: vec![0; shards],
                    held: 0,
                    dead: VecDeque::new(),
                    events: VecDeque::new(),
                }),
                wake: Notify::new(),
                active: Arc::new(tokio::sync::Mutex::new(())),
                settings,
            }),
        }
    }

    /// The last [`EVENTS_KEPT`] outcome events, oldest first.
    pub fn events(&self) -> Vec<Encoded> {
        self.inner.lock().events.iter().cloned().collect()
    }

    /// Messages held now: queued, in flight or waiting for a retry (not dead letters).
    pub fn held(&self) -> usize {
        self.inner.lock().held
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn shard_count(&self) -> u16 {
        self.settings.shards.max(1)
    }

    /// Take the next message a shard may hand out, shards in turn starting after `after`.
    fn next(&self, after: &mut usize) -> Option<(u16, Stored)> {
        let prefetch = usize::from(self.settings.prefetch.max(1));
        let mut state = self.lock();
        let n = state.shards.len();
        for step in 1..=n {
            let shard = (*after + step) % n;
            if state.in_flight[shard] < prefetch
                && let Some(message) = state.shards[shard].pop_front()
            {
                state.in_flight[shard] += 1;
                *after = shard;
                return Some((u16::try_from(shard).unwrap_or(0), message));
            }
        }
        None
    }

    /// A delivery left its consumer: settled (`requeue: None`) or given back.
    fn release(&self, shard: u16, requeue: Option<Stored>, still_held: bool) {
        let mut state = self.lock();
        let shard = usize::from(shard);
        state.in_flight[shard] = state.in_flight[shard].saturating_sub(1);
        match requeue {
            Some(message) => state.shards[shard].push_front(message),
            None if !still_held => state.held = state.held.saturating_sub(1),
            None => {}
        }
        drop(state);
        self.wake.notify_one();
    }
}

#[async_trait]
impl Queue for EmbeddedQueue {
    async fn declare(&self) -> Result<(), QueueError> {
        Ok(())
    }

    async fn publish(&self, message: &Encoded) -> Result<(), QueueError> {
        let shard = shard_for(&message.shard_key, self.inner.shard_count());
        let mut state = self.inner.lock();
        if state.held >= self.inner.max_queued {
            return Err(QueueError::Unavailable(format!(
                "the embedded queue is full ({} messages)",
                self.inner.max_queued
            )));
        }
        state.held += 1;
        state.shards[usize::from(shard)].push_back(Stored {
            body: message.body.clone(),
            headers: message.headers.clone(),
            message_id: Some(message.id.clone()).filter(|id| !id.is_empty()),
            redelivered: false,
        });
        drop(state);
        self.inner.wake.notify_one();
        Ok(())
    }

    async fn publish_event(&self, message: &Encoded) -> Result<(), QueueError> {
        let mut state = self.inner.lock();
        if state.events.len() >= EVENTS_KEPT {
            state.events.pop_front();
        }
        state.events.push_back(message.clone());
        Ok(())
    }

    async fn consume(
        &self,
        shutdown: CancellationToken,
    ) -> Result<mpsc::Receiver<Delivery>, QueueError> {
        let (tx, rx) = mpsc::channel(usize::from(self.inner.settings.prefetch.max(1)));
        tokio::spawn(forward(self.inner.clone(), tx, shutdown));
        Ok(rx)
    }

    async fn take_dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, QueueError> {
        let mut state = self.inner.lock();
        let n = max.min(state.dead.len());
        Ok(state.dead.drain(..n).collect())
    }

    async fn peek_dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, QueueError> {
        Ok(self.inner.lock().dead.iter().take(max).cloned().collect())
    }

    async fn redrive_dead_letters(&self, which: &super::Redrive) -> Result<usize, QueueError> {
        let chosen: Vec<DeadLetter> = {
            let mut state = self.inner.lock();
            let all: Vec<DeadLetter> = state.dead.drain(..).collect();
            let (chosen, kept): (Vec<_>, Vec<_>) = all.into_iter().partition(|d| which.wants(d));
            state.dead = kept.into();
            chosen
        };
        for d in &chosen {
            self.publish(&d.redrive_copy()).await?;
        }
        Ok(chosen.len())
    }

    async fn purge_dead_letters(&self) -> Result<usize, QueueError> {
        let mut state = self.inner.lock();
        let n = state.dead.len();
        state.dead.clear();
        Ok(n)
    }

    async fn ready(&self) -> bool {
        true
    }

    async fn depths(&self) -> Result<super::Depths, QueueError> {
        let state = self.inner.lock();
        let queued: usize = state.shards.iter().map(VecDeque::len).sum();
        let in_flight: usize = state.in_flight.iter().sum();
        // `held` counts queued, in flight and waiting for a retry: the rest waits.
        let waiting = state.held.saturating_sub(queued + in_flight);
        Ok(super::Depths {
            work: queued as u64,
            retry: waiting as u64,
            dead_letter: state.dead.len() as u64,
        })
    }

    fn durable(&self) -> bool {
        false
    }

    /// One process, one leader.
    fn leader_lease(&self, _shutdown: CancellationToken) -> tokio::sync::watch::Receiver<bool> {
        tokio::sync::watch::channel(true).1
    }
}

/// The consumer task: waits to be the active consumer, then hands out messages until stopped.
async fn forward(inner: Arc<Inner>, tx: mpsc::Sender<Delivery>, shutdown: CancellationToken) {
    let _active = tokio::select! {
        guard = inner.active.clone().lock_owned() => guard,
        _ = shutdown.cancelled() => return,
        _ = tx.closed() => return,
    };
    let mut after = usize::from(inner.shard_count()) - 1; // so that shard 0 goes first
    loop {
        let woken = inner.wake.notified();
        let mut woken = std::pin::pin!(woken);
        woken.as_mut().enable();
        match inner.next(&mut after) {
            Some((shard, message)) => {
                let delivery = Delivery::new(
                    Delivered {
                        body: message.body.clone(),
                        headers: message.headers.clone(),
                        message_id: message.message_id.clone(),
                        redelivered: message.redelivered,
                        shard,
                    },
                    Box::new(EmbeddedAcker {
                        inner: Arc::downgrade(&inner),
                        shard,
                        message: Some(message),
                    }),
                );
                // A delivery that cannot be handed over is dropped, which requeues it.
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    sent = tx.send(delivery) => if sent.is_err() { return },
                }
            }
            None => tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tx.closed() => return,
                _ = woken => {}
            },
        }
    }
}

/// Settles one embedded delivery; dropped unsettled, it puts the message back in front.
#[derive(Debug)]
struct EmbeddedAcker {
    inner: Weak<Inner>,
    shard: u16,
    /// `None` once settled.
    message: Option<Stored>,
}

#[async_trait]
impl Acker for EmbeddedAcker {
    async fn settle(
        mut self: Box<Self>,
        settlement: &Settlement,
        original: &Delivered,
    ) -> Result<(), QueueError> {
        let inner = self.inner.upgrade().ok_or(QueueError::ChannelGone)?;
        let Some(mut message) = self.message.take() else {
            return Err(QueueError::ChannelGone);
        };
        message.body = original.body.clone();
        message.redelivered = false;
        match settlement {
            Settlement::Ack => inner.release(self.shard, None, false),
            Settlement::Retry {
                delay,
                attempt,
                last_error,
            } => {
                message
                    .headers
                    .insert(ATTEMPT_HEADER.to_owned(), attempt.to_string());
                message
                    .headers
                    .insert(LAST_ERROR_HEADER.to_owned(), last_error_header(last_error));
                // Still held while it waits, so memory stays bounded.
                inner.release(self.shard, None, true);
                let tier = inner.settings.tier_for(*delay);
                let weak = self.inner.clone();
                let shard = usize::from(self.shard);
                tokio::spawn(async move {
                    tokio::time::sleep(tier).await;
                    if let Some(inner) = weak.upgrade() {
                        inner.lock().shards[shard].push_back(message);
                        inner.wake.notify_one();
                    }
                });
            }
            Settlement::DeadLetter {
                reason,
                attempts,
                last_error,
            } => {
                let mut headers = message.headers;
                headers.insert(REASON_HEADER.to_owned(), reason.clone());
                headers.insert(ATTEMPT_HEADER.to_owned(), attempts.to_string());
                headers.insert(LAST_ERROR_HEADER.to_owned(), last_error_header(last_error));
                headers.insert(
                    DEAD_LETTERED_AT_HEADER.to_owned(),
                    chrono::Utc::now().to_rfc3339(),
                );
                {
                    let mut state = inner.lock();
                    if state.dead.len() >= inner.max_queued {
                        tracing::warn!("embedded dead-letter list full; dropping the oldest");
                        state.dead.pop_front();
                    }
                    state.dead.push_back(DeadLetter {
                        message_id: message.message_id,
                        body: message.body,
                        headers,
                    });
                }
                inner.release(self.shard, None, false);
            }
        }
        Ok(())
    }
}

impl Drop for EmbeddedAcker {
    fn drop(&mut self) {
        if let (Some(mut message), Some(inner)) = (self.message.take(), self.inner.upgrade()) {
            message.redelivered = true;
            inner.release(self.shard, Some(message), true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn encoded(key: &str, id: &str) -> Encoded {
        Encoded {
            id: id.into(),
            event_type: "t",
            shard_key: key.into(),
            routing_key: String::new(),
            body: Bytes::from(id.to_owned()),
            headers: BTreeMap::new(),
        }
    }

    #[tokio::test]
    async fn publish_beyond_the_bound_is_unavailable_and_settling_frees_room() {
        let q = EmbeddedQueue::with_max_queued(QueueSettings::with_prefix("t"), 2);
        q.publish(&encoded("k", "1")).await.unwrap();
        q.publish(&encoded("k", "2")).await.unwrap();
        assert!(matches!(
            q.publish(&encoded("k", "3")).await,
            Err(QueueError::Unavailable(_))
        ));
        let stop = CancellationToken::new();
        let mut rx = q.consume(stop.clone()).await.unwrap();
        let d = tokio::time::timeout(Duration::from_secs(1), rx.recv())
            .await
            .unwrap()
            .unwrap();
        d.settle(&Settlement::Ack).await.unwrap();
        assert_eq!(q.held(), 1);
        q.publish(&encoded("k", "3")).await.unwrap();
        stop.cancel();
    }

    #[tokio::test]
    async fn events_keep_only_the_latest() {
        let q = EmbeddedQueue::new(QueueSettings::with_prefix("t"));
        for i in 0..EVENTS_KEPT + 5 {
            q.publish_event(&encoded("k", &i.to_string()))
                .await
                .unwrap();
        }
        let events = q.events();
        assert_eq!(events.len(), EVENTS_KEPT);
        assert_eq!(events[0].id, "5");
    }
}
