//! The worker: consume, verify, read the user's current state, decide, converge Proofpoint,
//! settle.
//!
//! Level-triggered: a message only says "look at user X". The worker reads Graph and
//! Proofpoint *now*, asks the [`Policy`], and writes only when Proofpoint differs, with a
//! read-modify-write PUT of the whole object. Replays, duplicates and reordering therefore
//! converge to the same state. Two messages for the same user never run at once: shards
//! give that across processes, a per-key lock within one.

pub mod converge;
pub mod outcome;
mod report;

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use rand::Rng;
use tokio::sync::{Mutex, OwnedMutexGuard, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, field};

use crate::graph::GraphApi;
use crate::identity::OrgDomains;
use crate::ids::{TenantId, UserKey};
use crate::message::{self, DecodeError, Decoded, Message, Signer, TraceContext, Verifier};
use crate::policy::SharedPolicy;
use crate::proofpoint::{OrgAccess, ProofpointApi};
use crate::queue::{Delivered, Delivery, Queue, QueueError, Settlement};
use crate::store::Store;
use crate::telemetry::Metrics;
use outcome::{Detail, Outcome, RetryPolicy};

/// The parts a worker talks to.
#[derive(Debug, Clone)]
pub struct WorkerDeps {
    pub queue: Arc<dyn Queue>,
    pub graph: Arc<dyn GraphApi>,
    pub proofpoint: Arc<dyn ProofpointApi>,
    pub policy: Arc<SharedPolicy>,
    pub metrics: Arc<Metrics>,
    pub store: Arc<dyn Store>,
    /// Where each evaluation's result goes (batched into the store).
    pub history: crate::history::HistorySink,
}

/// A tenant's Proofpoint organization: how to reach it, and the mail domains flagrelay may
/// write for it.
#[derive(Debug, Clone)]
pub struct Org {
    pub access: OrgAccess,
    pub domains: OrgDomains,
}

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Messages processed at once in this process.
    pub concurrency: usize,
    pub retry: RetryPolicy,
    /// Decide and publish outcome events, but never write to Proofpoint.
    pub dry_run: bool,
    /// After shutdown is requested, how long in-flight messages may take to finish.
    pub shutdown_deadline: Duration,
}

/// A running worker's shared state.
#[derive(Debug)]
pub struct Worker {
    deps: WorkerDeps,
    settings: WorkerSettings,
    verifier: Verifier,
    signer: Signer,
    /// Entra tenant → its Proofpoint organization.
    orgs: HashMap<TenantId, Org>,
    locks: KeyedLocks,
    /// Shard key → start of the last completed evaluation, by the wall clock and by this
    /// process's clock: a message that arrived before it is already reflected in
    /// Proofpoint (coalescing duplicates, late notifications and delta hits for the same
    /// change). See [`converge`].
    evaluated: StdMutex<HashMap<UserKey, converge::Evaluated>>,
    /// Org domain → (when counted, users): the breaker's share denominator.
    org_sizes: Mutex<HashMap<String, (std::time::Instant, usize)>>,
}

impl Worker {
    pub fn new(
        deps: WorkerDeps,
        settings: WorkerSettings,
        verifier: Verifier,
        signer: Signer,
        orgs: impl IntoIterator<Item = (TenantId, Org)>,
    ) -> Arc<Self> {
        Arc::new(Self {
            org_sizes: Mutex::new(HashMap::new()),
            evaluated: StdMutex::new(HashMap::new()),
            deps,
            settings,
            verifier,
            signer,
            orgs: orgs.into_iter().collect(),
            locks: KeyedLocks::default(),
        })
    }

    /// Consume until `shutdown`; then stop taking messages, let in-flight ones finish (up to
    /// the deadline), and close the consumer so anything unsettled returns to the queue.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), QueueError> {
        // The consumer gets its own token: it must outlive in-flight work so acks can go out.
        let consumer = CancellationToken::new();
        let mut deliveries = self.deps.queue.consume(consumer.clone()).await?;
        let slots = Arc::new(Semaphore::new(self.settings.concurrency));
        let mut tasks = JoinSet::new();
        tracing::info!(
            concurrency = self.settings.concurrency,
            dry_run = self.settings.dry_run,
            "worker consuming"
        );
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = slots.clone().acquire_owned() => p.expect("semaphore is never closed"),
            };
            let delivery = tokio::select! {
                _ = shutdown.cancelled() => break,
                d = deliveries.recv() => match d {
                    Some(d) => d,
                    None => break,
                },
            };
            let me = self.clone();
            tasks.spawn(async move {
                me.handle(delivery).await;
                drop(permit);
            });
            while tasks.try_join_next().is_some() {}
        }
        let in_flight = tasks.len();
        tracing::info!(in_flight, "worker stopping; finishing in-flight messages");
        let drained = tokio::time::timeout(self.settings.shutdown_deadline, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                left = tasks.len(),
                "shutdown deadline passed; unsettled messages return to the queue"
            );
            tasks.abort_all();
        }
        // Stop the consumer and give back what it still buffers (dropped deliveries are
        // requeued); the channel closes once the consumer has shut down cleanly.
        consumer.cancel();
        let _ = tokio::time::timeout(self.settings.shutdown_deadline, async {
            while deliveries.recv().await.is_some() {}
        })
        .await;
        Ok(())
    }

    /// Process one delivery end to end and settle it.
    pub async fn handle(&self, delivery: Delivery) {
        let taken = std::time::Instant::now();
        let previous = delivery.delivered.attempt();
        let span = tracing::info_span!(
            "message",
            message_id = delivery.delivered.message_id.as_deref().unwrap_or(""),
            tenant_id = field::Empty,
            user_id = field::Empty,
            attempt = previous + 1,
            redelivered = delivery.delivered.redelivered,
            trace_id = field::Empty,
            span_id = field::Empty,
        );
        // This evaluation is a span of the trace the message came with (the receiver's, or
        // whoever queued it); a message without a valid `traceparent` starts a new trace.
        let trace =
            crate::otlp::continue_trace(&span, message::trace_of(&delivery.delivered.headers));
        async {
            let decoded = match self.decode(&delivery.delivered) {
                Ok(d) => d,
                Err(outcome) => {
                    return self
                        .finish(delivery, None, *outcome, previous, &trace)
                        .await;
                }
            };
            Span::current().record("tenant_id", decoded.message.tenant_id());
            Span::current().record("user_id", decoded.message.subject());
            // Per-user serialization within this process; shards give it across processes.
            let _guard = self.locks.lock(decoded.message.shard_key()).await;
            let outcome = self.process(&decoded, taken).await;
            self.finish(delivery, Some(&decoded), outcome, previous, &trace)
                .await;
        }
        .instrument(span)
        .await
    }

    fn decode(&self, delivered: &Delivered) -> Result<Decoded, Box<Outcome>> {
        message::decode(&delivered.body, &delivered.headers, &self.verifier).map_err(|e| {
            let reason = match e {
                DecodeError::MissingSignature | DecodeError::UnknownKey(_) | DecodeError::BadSignature => {
                    Metrics::inc(&self.deps.metrics.signature_failures_total);
                    tracing::error!(
                        error = %e,
                        shard = delivered.shard,
                        "SECURITY: a message on the bus failed signature verification; dead-lettering it. \
                         Something that is not flagrelay (or has the wrong key) is publishing to this exchange."
                    );
                    "bad_signature"
                }
                DecodeError::Malformed(_) => "undecodable",
                DecodeError::UnsupportedVersion(_) | DecodeError::UnknownType(_) => "unknown_message_type",
            };
            Box::new(Outcome::Permanent { reason, error: e.to_string() })
        })
    }

    /// Decide what this message means and carry it out (no settlement here). `taken`: when
    /// this process took the message from the queue.
    async fn process(&self, decoded: &Decoded, taken: std::time::Instant) -> Outcome {
        match &decoded.message {
            Message::UserChanged(m) => self.converge_user(m, taken).await,
            Message::Lifecycle(l) => self.lifecycle(l).await,
            Message::UserOutcome(_) => Outcome::Permanent {
                reason: "unexpected_message_type",
                error: "outcome events do not belong on the work queues".into(),
            },
        }
    }

    /// Settle, count, log and publish the outcome event.
    async fn finish(
        &self,
        delivery: Delivery,
        decoded: Option<&Decoded>,
        outcome: Outcome,
        previous: u32,
        trace: &TraceContext,
    ) {
        let jitter = rand::rng().random_range(0.8..=1.2);
        let settlement = outcome::settle(&outcome, previous, &self.settings.retry, jitter);
        let metrics = &self.deps.metrics;
        let counted = match (&settlement, &outcome) {
            (Settlement::Ack, Outcome::Applied { detail }) => {
                Metrics::inc(&metrics.outcomes_applied_total);
                tracing::info!(address = ?detail.address, action = ?detail.action, reason = %detail.reason, dry_run = self.settings.dry_run, "applied");
                "applied"
            }
            (Settlement::Ack, Outcome::NoChange { detail }) => {
                Metrics::inc(&metrics.outcomes_no_change_total);
                tracing::info!(address = ?detail.address, reason = %detail.reason, "no change needed");
                "no_change"
            }
            (Settlement::Ack, Outcome::Held { reason, detail }) => {
                Metrics::inc(&metrics.outcomes_held_total);
                tracing::warn!(address = ?detail.address, %reason, "deactivation held by the breaker until released");
                "held"
            }
            (Settlement::Ack, Outcome::IdentityConflict { reason, .. }) => {
                tracing::warn!(%reason, "identity conflict; nothing written");
                "identity_conflict"
            }
            (Settlement::Ack, _) => {
                Metrics::inc(&metrics.outcomes_skipped_total);
                tracing::info!(outcome = ?outcome, "skipped");
                "skipped"
            }
            (Settlement::Retry { delay, .. }, Outcome::Waiting { .. }) => {
                tracing::debug!(?delay, "recheck not due yet; parked again");
                "parked"
            }
            (
                Settlement::Retry {
                    delay,
                    attempt,
                    last_error,
                },
                _,
            ) => {
                Metrics::inc(&metrics.outcomes_retried_total);
                tracing::warn!(?delay, attempt, error = %last_error, "transient failure; retry scheduled");
                "retried"
            }
            (
                Settlement::DeadLetter {
                    reason,
                    attempts,
                    last_error,
                },
                _,
            ) => {
                Metrics::inc(&metrics.outcomes_dead_lettered_total);
                tracing::error!(%reason, attempts, error = %last_error, "dead-lettered");
                "dead_lettered"
            }
        };
        metrics.processed(
            counted,
            report::detail_of(&outcome).and_then(|d| d.action.as_deref()),
        );
        let announce = !matches!(settlement, Settlement::Retry { .. });
        if announce && let Some(Message::UserChanged(m)) = decoded.map(|d| &d.message) {
            self.record_decision(m, &outcome, trace);
            let cause_id = decoded.map(|d| d.id.as_str()).unwrap_or("");
            self.publish_outcome(m, cause_id, &outcome, trace).await;
        }
        if let Err(error) = delivery.settle(&settlement).await {
            tracing::warn!(%error, "could not settle the message; the broker will redeliver it");
        }
    }

    /// `reauthorizationRequired`: reauthorize now (Graph pauses a subscription that is not);
    /// changes missed meanwhile are caught by the leader's next delta poll.
    async fn lifecycle(&self, l: &crate::message::SubscriptionLifecycle) -> Outcome {
        if l.lifecycle_event != "reauthorizationRequired" {
            tracing::info!(lifecycle_event = %l.lifecycle_event, "lifecycle event recorded (no action for users)");
            return Outcome::Skipped {
                reason: "lifecycle_event_recorded".into(),
                detail: Detail::default(),
            };
        }
        match self
            .deps
            .graph
            .reauthorize_subscription(&l.tenant_id, &l.subscription_id)
            .await
        {
            Ok(()) => {
                tracing::info!(subscription_id = %l.subscription_id, "subscription reauthorized");
                Outcome::Skipped {
                    reason: "subscription_reauthorized".into(),
                    detail: Detail::default(),
                }
            }
            Err(crate::graph::GraphError::Rejected { status: 404, .. }) => {
                tracing::warn!(subscription_id = %l.subscription_id, "subscription gone; the leader's subscription manager recreates it");
                Outcome::Skipped {
                    reason: "subscription_gone".into(),
                    detail: Detail::default(),
                }
            }
            Err(e) if e.is_retryable() => Outcome::Transient {
                retry_after: e.retry_after(),
                error: format!("graph: {e}"),
            },
            Err(e) => Outcome::Permanent {
                reason: "graph_rejected",
                error: e.to_string(),
            },
        }
    }
}

/// One async mutex per key, removed again when nobody holds or waits for it.
#[derive(Debug, Default)]
struct KeyedLocks {
    map: Arc<StdMutex<HashMap<String, Arc<Mutex<()>>>>>,
}

struct KeyGuard {
    key: String,
    map: Arc<StdMutex<HashMap<String, Arc<Mutex<()>>>>>,
    guard: Option<OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    async fn lock(&self, key: String) -> KeyGuard {
        let mutex = {
            let mut map = self.map.lock().expect("lock map poisoned");
            map.entry(key.clone()).or_default().clone()
        };
        let guard = mutex.lock_owned().await;
        KeyGuard {
            key,
            map: self.map.clone(),
            guard: Some(guard),
        }
    }
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        let mut map = self.map.lock().expect("lock map poisoned");
        // Release first, then drop the entry if only the map still refers to it.
        self.guard.take();
        if map
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            map.remove(&self.key);
        }
    }
}
