//! The background checks behind `/readyz`, the depth and breaker gauges and the status page
//! (whose recent decisions of all workers are read from the store here, not per request).
//!
//! Run on an interval (`admin.check_every`), never per request: a load balancer or a scrape
//! must not turn into a token request to Entra or a call to Proofpoint. Each round records
//! its results in [`Metrics`]; a check that changes state is logged once, not every round.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::graph::GraphApi;
use crate::policy::SharedPolicy;
use crate::proofpoint::{OrgAccess, ProofpointApi};
use crate::queue::Queue;
use crate::store::{HistoryEntry, HistoryQuery, Store};
use crate::telemetry::Metrics;
use crate::telemetry::status::{BreakerView, Check, RECENT_DECISIONS, Readiness};

/// Longest a single check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// What the probe looks at. Graph and Proofpoint are checked only for roles that call them
/// (`work`, `run`): a receiver-only process is ready when the broker is.
#[derive(Debug, Clone)]
pub struct Probe {
    pub queue: Arc<dyn Queue>,
    /// Graph and the tenants to get a token for; `None`: not checked.
    pub graph: Option<(Arc<dyn GraphApi>, Vec<String>)>,
    /// Proofpoint and the organizations to check the credentials on; `None`: not checked.
    pub proofpoint: Option<(Arc<dyn ProofpointApi>, Vec<OrgAccess>)>,
    /// The state store, checked for readiness and read for the breaker (`None`: a role that
    /// does not use it).
    pub store: Option<Arc<dyn Store>>,
    /// The breaker's limits come from the policy in force.
    pub policy: Arc<SharedPolicy>,
    pub metrics: Arc<Metrics>,
    pub every: Duration,
}

impl Probe {
    /// Check now, then every `every`, until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.check_once() => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.every) => {}
            }
        }
    }

    /// One round: readiness, queue depths, breaker.
    pub async fn check_once(&self) {
        let mut checks = vec![self.broker().await];
        if let Some((graph, tenants)) = &self.graph {
            checks.push(graph_check(graph.as_ref(), tenants).await);
        }
        if let Some((pp, orgs)) = &self.proofpoint {
            checks.push(proofpoint_check(pp.as_ref(), orgs).await);
        }
        if let Some(store) = &self.store {
            checks.push(store_check(store.as_ref()).await);
        }
        let previous = self.metrics.status.readiness();
        for c in &checks {
            let was = previous
                .as_ref()
                .and_then(|p| p.check(c.name))
                .map(|p| p.ok);
            match (was, c.ok) {
                (Some(true) | None, false) => {
                    tracing::warn!(check = c.name, detail = %c.detail, "readiness check failing")
                }
                (Some(false), true) => {
                    tracing::info!(check = c.name, "readiness check passes again")
                }
                _ => {}
            }
        }
        let broker_ok = checks.first().is_some_and(|c| c.ok);
        self.metrics.set_readiness(Readiness {
            checked_at: Utc::now(),
            checks,
        });

        let depths = if broker_ok {
            match tokio::time::timeout(CHECK_TIMEOUT, self.queue.depths()).await {
                Ok(Ok(d)) => Some(d),
                Ok(Err(error)) => {
                    tracing::debug!(%error, "could not read queue depths");
                    None
                }
                Err(_) => None,
            }
        } else {
            None
        };
        self.metrics.set_depths(depths);

        if let Some(store) = &self.store {
            let config = self.policy.current().breaker();
            let report =
                tokio::time::timeout(CHECK_TIMEOUT, store.breaker_report(&config, Utc::now()));
            let breaker = match report.await {
                Ok(Ok(report)) => Some(BreakerView {
                    tripped: report.trips().next().map(|t| (t.at, t.reason.clone())),
                }),
                Ok(Err(error)) => {
                    tracing::warn!(%error, "could not read the breaker state");
                    None
                }
                Err(_) => None,
            };
            self.metrics.set_breaker(breaker);
            self.metrics
                .status
                .set_fleet(fleet_recent(store.as_ref()).await);
        }
    }

    async fn broker(&self) -> Check {
        let ok = tokio::time::timeout(CHECK_TIMEOUT, self.queue.ready())
            .await
            .unwrap_or(false);
        Check {
            name: "broker",
            ok,
            detail: if ok {
                "ok".into()
            } else {
                "the broker is not reachable (see the log for the connection error)".into()
            },
        }
    }
}

/// The state store answers (without it nothing is deactivated and most work is retried).
async fn store_check(store: &dyn Store) -> Check {
    let failures = match tokio::time::timeout(CHECK_TIMEOUT, store.ping()).await {
        Ok(Ok(())) => Vec::new(),
        Ok(Err(e)) => vec![e.to_string()],
        Err(_) => vec![format!("no answer in {CHECK_TIMEOUT:?}")],
    };
    verdict("store", failures)
}

/// The newest decisions of every worker (the status page's table), `None` when the store
/// does not answer: the page then says so instead of showing only this process's.
async fn fleet_recent(store: &dyn Store) -> Option<Vec<HistoryEntry>> {
    let query = HistoryQuery {
        limit: RECENT_DECISIONS,
        ..HistoryQuery::default()
    };
    match tokio::time::timeout(CHECK_TIMEOUT, store.history(&query)).await {
        Ok(Ok(entries)) => Some(entries),
        Ok(Err(error)) => {
            tracing::warn!(%error, "could not read the recent decisions from the store");
            None
        }
        Err(_) => None,
    }
}

/// A token for every tenant: the cached one, or a fresh one from the authority.
async fn graph_check(graph: &dyn GraphApi, tenants: &[String]) -> Check {
    let mut failures = Vec::new();
    for tenant in tenants {
        match tokio::time::timeout(CHECK_TIMEOUT, graph.granted_permissions(tenant)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => failures.push(format!("tenant {tenant}: {e}")),
            Err(_) => failures.push(format!("tenant {tenant}: no answer in {CHECK_TIMEOUT:?}")),
        }
    }
    verdict("graph", failures)
}

/// The credentials are accepted on every organization: the (small) sync-exemption list is
/// read, which needs the same rights as the worker's reads.
async fn proofpoint_check(pp: &dyn ProofpointApi, orgs: &[OrgAccess]) -> Check {
    let mut failures = Vec::new();
    for org in orgs {
        match tokio::time::timeout(CHECK_TIMEOUT, pp.exemptions(org)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => failures.push(format!("org {}: {e}", org.domain)),
            Err(_) => failures.push(format!(
                "org {}: no answer in {CHECK_TIMEOUT:?}",
                org.domain
            )),
        }
    }
    verdict("proofpoint", failures)
}

fn verdict(name: &'static str, failures: Vec<String>) -> Check {
    Check {
        name,
        ok: failures.is_empty(),
        detail: if failures.is_empty() {
            "ok".into()
        } else {
            failures.join("; ")
        },
    }
}
