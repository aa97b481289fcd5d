//! The drift sweep: evaluate every user of a tenant and compare the decision with what
//! Proofpoint actually says — catching manual edits in Proofpoint, changes made by
//! Proofpoint's own scheduled sync, and anything lost. Differences are put back through the
//! normal pipeline (so retries, guards and the breaker apply), never written from here.
//!
//! Cost: the whole Proofpoint org in one call, the exemption list once, Graph users in pages
//! (a full delta round with the policy's `$select`), and per user only the extra facts the
//! policy needs. Graph throttling (429 + `Retry-After`) is waited out, page by page.

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;

use crate::config::{Config, TenantConfig};
use crate::evaluation::gather::{complete, on_list};
use crate::evaluation::{Plan, decide};
use crate::graph::{DeltaNext, DeltaPage, GraphApi, GraphError};
use crate::identity::{OrgDomains, choose_address};
use crate::ids::UserKey;
use crate::message::{self, Message, Origin, Signer, UserChanged};
use crate::policy::Policy;
use crate::proofpoint::{PpError, ProofpointApi};
use crate::queue::{Queue, QueueError};
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("graph: {0}")]
    Graph(#[from] GraphError),
    #[error("proofpoint: {0}")]
    Proofpoint(#[from] PpError),
    #[error("queueing a correction: {0}")]
    Queue(#[from] QueueError),
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
}

/// One user whose Proofpoint state differs from the policy's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    pub user_id: String,
    pub address: String,
    pub is_active: bool,
    pub exempt: Option<bool>,
    pub action: String,
    pub rule: String,
    pub plan: Plan,
}

/// What a sweep of one tenant found.
#[derive(Debug, Clone, Default)]
pub struct SweepReport {
    pub graph_users: usize,
    /// Graph users Proofpoint does not know (left alone, as by the worker).
    pub not_in_proofpoint: usize,
    pub drifts: Vec<Drift>,
    /// Corrections put on the queue (0 in dry-run).
    pub queued: usize,
}

/// Everything a sweep talks to.
#[derive(Debug, Clone, Copy)]
pub struct Sweeper<'a> {
    pub config: &'a Config,
    pub graph: &'a dyn GraphApi,
    pub proofpoint: &'a dyn ProofpointApi,
    pub queue: &'a dyn Queue,
    pub policy: &'a dyn Policy,
    pub signer: &'a Signer,
    pub store: &'a dyn Store,
}

impl Sweeper<'_> {
    /// Sweep one tenant; `progress` is told (done, total) as Graph pages arrive.
    pub async fn sweep(
        &self,
        tenant: &TenantConfig,
        dry_run: bool,
        progress: &mut (dyn FnMut(usize, Option<usize>) + Send),
    ) -> Result<SweepReport, SweepError> {
        let org = self.config.org_access(tenant);
        let domains = OrgDomains::new(&tenant.org_domain, &tenant.accepted_domains);
        let needs = self.policy.needs();
        let pp_users: HashMap<String, _> = self
            .proofpoint
            .list_users(&org)
            .await?
            .into_iter()
            .map(|u| (u.primary_email.to_ascii_lowercase(), u))
            .collect();
        let exemptions: Option<Vec<String>> = if needs.exemptions {
            Some(self.proofpoint.exemptions(&org).await?)
        } else {
            None
        };
        let mut report = SweepReport::default();
        let select = needs.user_select();
        let mut page = self
            .page(|| self.graph.users_delta_start(&tenant.id, &select))
            .await?;
        let now = Utc::now();
        loop {
            for user in &page.users {
                report.graph_users += 1;
                // The worker refuses what is outside the org's domains; the sweep leaves it out.
                let Ok(chosen) = choose_address(user, &domains) else {
                    continue;
                };
                let address = chosen.address;
                let Some(pp) = pp_users.get(&address) else {
                    report.not_in_proofpoint += 1;
                    continue;
                };
                let key = UserKey::new(tenant.id.clone(), user.id.as_str().into());
                let state = self.store.user(&key).await?.state;
                let exempt = exemptions.as_deref().map(|list| on_list(list, &address));
                let g = complete(
                    self.graph,
                    &tenant.id,
                    user.clone(),
                    address,
                    pp.clone(),
                    &needs,
                    exempt,
                )
                .await?;
                let eval = decide(self.policy, &g, &state, now);
                let (decision, plan) = (&eval.decision, eval.plan);
                if !plan.is_empty() {
                    report.drifts.push(Drift {
                        user_id: user.id.clone(),
                        address: g.address.clone(),
                        is_active: pp.is_active,
                        exempt,
                        action: decision.action.as_str().to_owned(),
                        rule: decision.rule.clone(),
                        plan,
                    });
                }
            }
            progress(report.graph_users, None);
            match page.next {
                DeltaNext::NextLink(next) => {
                    page = self
                        .page(|| self.graph.users_delta_next(&tenant.id, &next))
                        .await?
                }
                DeltaNext::DeltaLink(_) => break,
            }
        }
        if !dry_run {
            for d in &report.drifts {
                let correction = Message::UserChanged(UserChanged {
                    tenant_id: tenant.id.clone(),
                    user_id: d.user_id.as_str().into(),
                    change_type: "sweep".into(),
                    subscription_id: None,
                    event_time: None,
                    received_at: Utc::now(),
                    origin: Origin::Sweep,
                    not_before: None,
                });
                self.queue
                    .publish(&message::encode(&correction, self.signer))
                    .await?;
                report.queued += 1;
            }
        }
        Ok(report)
    }

    /// One Graph page, waiting out throttling (`Retry-After`, else a short backoff).
    async fn page<F, Fut>(&self, mut fetch: F) -> Result<DeltaPage, GraphError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<DeltaPage, GraphError>>,
    {
        let mut backoff = Duration::from_secs(1);
        for _ in 0..8 {
            match fetch().await {
                Err(
                    e @ (GraphError::Throttled { .. }
                    | GraphError::Server { .. }
                    | GraphError::Timeout),
                ) => {
                    let wait = e.retry_after().unwrap_or(backoff);
                    tracing::warn!(error = %e, ?wait, "Graph throttled the sweep; waiting");
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
                other => return other,
            }
        }
        fetch().await
    }
}

/// The table printed at the end of `flagrelay reconcile`.
pub fn render(tenant: &str, report: &SweepReport, dry_run: bool) -> String {
    let mut out = format!(
        "tenant {tenant}: {} Graph users, {} unknown to Proofpoint, {} differ{}\n",
        report.graph_users,
        report.not_in_proofpoint,
        report.drifts.len(),
        if dry_run {
            " (dry run: nothing queued)"
        } else {
            ""
        }
    );
    if report.drifts.is_empty() {
        return out;
    }
    out.push_str(&format!(
        "  {:<40} {:<10} {:<18} {:<26} {}\n",
        "address", "active now", "decision", "rule", "correction"
    ));
    for d in &report.drifts {
        let mut fix = Vec::new();
        if let Some(a) = d.plan.set_active {
            fix.push(format!("is_active → {a}"));
        }
        if d.plan.add_exemption {
            fix.push("exempt from sync".to_owned());
        }
        if d.plan.remove_exemption {
            fix.push("remove flagrelay's exemption".to_owned());
        }
        let verb = if dry_run { "would queue" } else { "queued" };
        out.push_str(&format!(
            "  {:<40} {:<10} {:<18} {:<26} {verb}: {}\n",
            d.address,
            d.is_active,
            d.action,
            d.rule,
            fix.join(", ")
        ));
    }
    out
}
