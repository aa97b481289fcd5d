//! The delta-query backstop: Graph does not guarantee notification delivery, and user
//! notifications can lag 10–30 minutes. The leader polls `/users/delta` per tenant on an
//! interval and puts every changed user into the same pipeline a notification would, so a
//! change reaches Proofpoint within the poll interval plus processing time even when its
//! notification never comes.
//!
//! The `deltaLink` is kept per tenant in the state store and saved only
//! after every change it covers is durably queued: a crash re-polls from the previous link
//! (duplicates are harmless; the worker coalesces them). The very first sync of a tenant
//! establishes the baseline without queueing anyone (the drift sweep handles existing
//! drift); an expired or invalid token (`410`, `syncStateNotFound`) triggers a full resync
//! that queues every user, since changes in between are unknown.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::TenantConfig;
use crate::graph::{DeltaNext, DeltaPage, GraphApi, GraphError};
use crate::message::{self, Message, Origin, Signer, UserChanged};
use crate::queue::{Queue, QueueError};
use crate::store::{Store, StoreError};
use crate::telemetry::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("delta query for tenant {tenant}: {source}")]
    Graph { tenant: String, source: GraphError },
    #[error("queueing a delta hit: {0}")]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What one poll of one tenant did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PollReport {
    /// Users queued for evaluation.
    pub queued: usize,
    /// The first sync of the tenant: baseline only, nobody queued.
    pub baseline: bool,
    /// The stored token had expired: a full resync queued everyone.
    pub resynced: bool,
}

/// Polls delta for every tenant while this process leads.
#[derive(Debug, Clone)]
pub struct Reconciler {
    pub graph: Arc<dyn GraphApi>,
    pub queue: Arc<dyn Queue>,
    pub signer: Signer,
    pub store: Arc<dyn Store>,
    pub tenants: Vec<TenantConfig>,
    /// `$select`: the properties the policy needs (only their changes are reported).
    pub select: Vec<&'static str>,
    pub interval: Duration,
}

impl Reconciler {
    /// Poll every `interval` while `leader` is true, until `shutdown`; each round's result is
    /// recorded in `metrics` (delta lag, status page).
    pub async fn run(
        self,
        mut leader: watch::Receiver<bool>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = leader.wait_for(|l| *l) => if changed.is_err() { return },
            }
            for tenant in &self.tenants {
                match self.poll(tenant).await {
                    Ok(r) if r.queued > 0 || r.baseline || r.resynced => {
                        metrics.delta_polled(&tenant.id, Ok(()));
                        tracing::info!(tenant_id = %tenant.id, queued = r.queued, baseline = r.baseline, resynced = r.resynced, "delta poll");
                    }
                    Ok(_) => {
                        metrics.delta_polled(&tenant.id, Ok(()));
                        tracing::debug!(tenant_id = %tenant.id, "delta poll: no changes")
                    }
                    Err(e) => {
                        metrics.delta_polled(&tenant.id, Err(&e.to_string()));
                        tracing::warn!(tenant_id = %tenant.id, error = %e, "delta poll failed; next try at the next interval")
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.interval) => {}
            }
        }
    }

    /// One delta round for one tenant: follow `nextLink`s to the `deltaLink`, queue the
    /// changes, then store the new link.
    pub async fn poll(&self, tenant: &TenantConfig) -> Result<PollReport, ReconcileError> {
        let stored = self.store.delta_link(&tenant.id).await?;
        let mut report = PollReport {
            baseline: stored.is_none(),
            ..PollReport::default()
        };
        let first = match &stored {
            Some(link) => match self.graph.users_delta_next(&tenant.id, link).await {
                Err(GraphError::DeltaTokenExpired { .. }) => {
                    tracing::warn!(tenant_id = %tenant.id, "delta token expired or invalid; full resync");
                    report.resynced = true;
                    self.graph.users_delta_start(&tenant.id, &self.select).await
                }
                other => other,
            },
            None => self.graph.users_delta_start(&tenant.id, &self.select).await,
        };
        let mut page = first.map_err(|source| ReconcileError::Graph {
            tenant: tenant.id.to_string(),
            source,
        })?;
        loop {
            if !report.baseline {
                report.queued += self.queue_page(tenant, &page).await?;
            }
            match page.next {
                DeltaNext::NextLink(next) => {
                    page = self
                        .graph
                        .users_delta_next(&tenant.id, &next)
                        .await
                        .map_err(|source| ReconcileError::Graph {
                            tenant: tenant.id.to_string(),
                            source,
                        })?;
                }
                DeltaNext::DeltaLink(link) => {
                    self.store
                        .put_delta_link(&tenant.id, &link, Utc::now())
                        .await?;
                    return Ok(report);
                }
            }
        }
    }

    async fn queue_page(
        &self,
        tenant: &TenantConfig,
        page: &DeltaPage,
    ) -> Result<usize, QueueError> {
        let changed = page.users.iter().map(|u| (u.id.as_str(), "updated"));
        let removed = page.removed.iter().map(|r| (r.id.as_str(), "deleted"));
        let messages: Vec<_> = changed
            .chain(removed)
            .map(|(user_id, change_type)| {
                message::encode(
                    &Message::UserChanged(UserChanged {
                        tenant_id: tenant.id.clone(),
                        user_id: user_id.into(),
                        change_type: change_type.to_owned(),
                        subscription_id: None,
                        event_time: None,
                        received_at: Utc::now(),
                        origin: Origin::Delta,
                        not_before: None,
                    }),
                    &self.signer,
                )
            })
            .collect();
        let results =
            futures::future::join_all(messages.iter().map(|m| self.queue.publish(m))).await;
        results.into_iter().collect::<Result<Vec<()>, _>>()?;
        Ok(messages.len())
    }
}
