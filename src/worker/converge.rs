//! Converging one user: coalesce, read the stored state, then the three steps of
//! [`crate::evaluation`] (gather, decide, apply), and turn how they ended into an [`Outcome`].

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::outcome::{Detail, Outcome};
use super::{Org, Worker};
use crate::evaluation::apply::{Applied, ApplyError, Effects, apply};
use crate::evaluation::gather::{GatherError, Gathered, gather};
use crate::evaluation::{Evaluation, decide};
use crate::graph::GraphError;
use crate::identity::IdentityConflict;
use crate::ids::UserKey;
use crate::message::{self, Message, Origin, UserChanged};
use crate::proofpoint::{OrgAccess, PpError};
use crate::store::{ConflictRecord, StoreError};

/// Clock difference tolerated between the receiver's and the worker's hosts when coalescing.
const CLOCK_MARGIN: chrono::Duration = chrono::Duration::seconds(2);

/// When the last completed evaluation of a user started.
///
/// Two ways to know that a message is already reflected by it: the message was received
/// (by whichever receiver, on whichever host's clock) more than [`CLOCK_MARGIN`] before it;
/// or this process took the message from the queue before it started (one clock, no
/// margin: this coalesces a burst of notifications for one change however close together).
/// Either way the message was published before the evaluation read Graph, so the change it
/// reports was visible to that read. (Graph's own replication lag, a read that does not yet
/// show a change it has notified, is not covered here; the delta backstop is.)
#[derive(Debug, Clone, Copy)]
pub(super) struct Evaluated {
    wall: DateTime<Utc>,
    local: Instant,
}

impl Evaluated {
    /// Whether this evaluation reflects a message received at `received_at` and taken from
    /// the queue by this process at `taken`.
    fn covers(&self, received_at: DateTime<Utc>, taken: Instant) -> bool {
        self.wall > received_at + CLOCK_MARGIN || self.local > taken
    }
}
/// How long the org's user count (the breaker's denominator) is cached.
const ORG_SIZE_TTL: Duration = Duration::from_secs(600);

impl Worker {
    pub(super) async fn converge_user(&self, m: &UserChanged, taken: Instant) -> Outcome {
        let Some(org) = self.orgs.get(&m.tenant_id) else {
            return Outcome::Permanent {
                reason: "unknown_tenant",
                error: format!("tenant {} is not configured", m.tenant_id),
            };
        };
        if !m.user_id.is_object_id() {
            return self.requeue_by_object_id(m).await;
        }
        let now = Utc::now();
        let started = Evaluated {
            wall: now,
            local: Instant::now(),
        };
        let key = UserKey::new(m.tenant_id.clone(), m.user_id.clone());
        if m.origin != Origin::Recheck && self.evaluated_since(&key, m.received_at, taken) {
            return skipped(
                "coalesced",
                "an evaluation that started after this message arrived already converged the user",
                Detail::default(),
            );
        }
        let outcome = self.evaluate(m, &key, org, now).await;
        if matches!(
            outcome,
            Outcome::Applied { .. } | Outcome::NoChange { .. } | Outcome::Skipped { .. }
        ) {
            self.mark_evaluated(key, started);
        }
        outcome
    }

    /// A message naming the user by UPN: find the object id and queue the message again under
    /// it, so that the shard, the lock and the state row are the object id's alone.
    async fn requeue_by_object_id(&self, m: &UserChanged) -> Outcome {
        let found = self
            .deps
            .graph
            .get_user(m.tenant_id.as_str(), m.user_id.as_str(), &["id"])
            .await;
        match found {
            Ok(Some(user)) => {
                let again = Message::UserChanged(UserChanged {
                    user_id: user.id.as_str().into(),
                    ..m.clone()
                });
                match self
                    .deps
                    .queue
                    .publish(&message::encode(&again, &self.signer))
                    .await
                {
                    Ok(()) => skipped(
                        "requeued_by_object_id",
                        &format!(
                            "{} is object {}; queued under the object id",
                            m.user_id, user.id
                        ),
                        Detail::default(),
                    ),
                    Err(e) => Outcome::Transient {
                        error: format!("queueing under the object id: {e}"),
                        retry_after: None,
                    },
                }
            }
            Ok(None) => gather_failure(GatherError::Deleted),
            Err(e) => graph_failure(e),
        }
    }

    /// Whether an evaluation of the user started after the message arrived: see
    /// [`Evaluated`].
    fn evaluated_since(&self, key: &UserKey, received_at: DateTime<Utc>, taken: Instant) -> bool {
        let map = self
            .evaluated
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(key)
            .is_some_and(|started| started.covers(received_at, taken))
    }

    fn mark_evaluated(&self, key: UserKey, started: Evaluated) {
        let mut map = self
            .evaluated
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() > 100_000 {
            let horizon = started.wall - chrono::Duration::hours(1);
            map.retain(|_, t| t.wall > horizon);
        }
        map.insert(key, started);
    }

    async fn evaluate(
        &self,
        m: &UserChanged,
        key: &UserKey,
        org: &Org,
        now: DateTime<Utc>,
    ) -> Outcome {
        let store = self.deps.store.as_ref();
        let record = match store.user(key).await {
            Ok(r) => r,
            Err(e) => return store_failure(e),
        };
        if m.origin == Origin::Recheck {
            if record.state.recheck_at != m.not_before {
                return skipped(
                    "stale_recheck",
                    "a newer evaluation replaced this recheck",
                    Detail::default(),
                );
            }
            if let Some(due) = m.not_before.filter(|due| *due > now) {
                return Outcome::Waiting {
                    delay: (due - now).to_std().unwrap_or_default(),
                };
            }
        }
        let policy = self.deps.policy.current();
        let needs = policy.needs();
        let g = match gather(
            self.deps.graph.as_ref(),
            self.deps.proofpoint.as_ref(),
            &org.access,
            &org.domains,
            key,
            &needs,
            record.state.exemption_added,
        )
        .await
        {
            Ok(g) => g,
            Err(GatherError::Identity(c)) if c.reason() != "no_address" => {
                return self.refuse(key, None, c, Detail::default(), now).await;
            }
            Err(e) => return gather_failure(e),
        };
        let eval = decide(policy.as_ref(), &g, &record.state, now);
        if record.held.is_some()
            && !eval.plan.deactivates()
            && let Err(e) = store.forget_held(key).await
        {
            return store_failure(e);
        }
        let mut detail = detail_of(&eval, &g);
        let total = if eval.plan.deactivates() {
            self.org_size(&org.access).await
        } else {
            0
        };
        let fx = Effects {
            graph: self.deps.graph.as_ref(),
            proofpoint: self.deps.proofpoint.as_ref(),
            store,
            org: &org.access,
            breaker: &policy.breaker(),
            dry_run: self.settings.dry_run,
        };
        match apply(&fx, key, &g, &eval, total, now).await {
            Ok(Applied::Written { writes }) => {
                // Whatever was in conflict is settled: the writes passed the identity
                // check, or the user no longer needs any. The operator's list follows.
                if record.conflicted
                    && let Err(e) = store.clear_conflict(key).await
                {
                    tracing::warn!(error = %e, "could not clear a settled identity conflict");
                }
                detail.writes = writes;
                written(&eval, detail)
            }
            Ok(Applied::Held { trip, newly }) => {
                unchanged(&mut detail);
                if newly {
                    self.tripped(&trip);
                }
                Outcome::Held {
                    reason: trip.reason,
                    detail,
                }
            }
            Ok(Applied::Refused { conflict }) => {
                unchanged(&mut detail);
                self.refuse(key, Some(&g.address), conflict, detail, now)
                    .await
            }
            Err(e) => apply_failure(e),
        }
    }

    /// Raise the alert for a trip this process caused (every process sees it in the store).
    fn tripped(&self, trip: &crate::policy::breaker::Trip) {
        crate::telemetry::Metrics::inc(&self.deps.metrics.breaker_trips_total);
        self.deps
            .metrics
            .set_breaker(Some(crate::telemetry::status::BreakerView {
                tripped: Some((trip.at, trip.reason.clone())),
            }));
        tracing::error!(
            scope = %trip.scope,
            reason = %trip.reason,
            "ALERT: blast-radius breaker tripped; deactivations are held until an operator runs `flagrelay breaker release`"
        );
    }

    /// Record an identity conflict for the operator, raise the alert, and settle.
    async fn refuse(
        &self,
        key: &UserKey,
        address: Option<&str>,
        conflict: IdentityConflict,
        detail: Detail,
        now: DateTime<Utc>,
    ) -> Outcome {
        let record = ConflictRecord {
            tenant_id: key.tenant.clone(),
            object_id: key.user.clone(),
            address: address.map(str::to_owned).unwrap_or_default(),
            reason: conflict.reason().to_owned(),
            others: conflict.other_object_ids(),
            detail: conflict.to_string(),
            seen_at: now,
        };
        if !self.settings.dry_run
            && let Err(e) = self.deps.store.record_conflict(&record).await
        {
            return store_failure(e);
        }
        self.deps.metrics.identity_conflict(conflict.reason());
        tracing::error!(
            object_id = %key.user,
            others = ?record.others,
            reason = conflict.reason(),
            error = %conflict,
            "ALERT: identity conflict; nothing written to Proofpoint. Check the objects and run `flagrelay identity accept` if the change is legitimate"
        );
        Outcome::IdentityConflict {
            reason: conflict.reason(),
            error: conflict.to_string(),
            others: record.others,
            detail,
        }
    }

    /// Users in the org (the breaker's denominator), cached; unknown counts as 0 users,
    /// which makes the share limit strict (never looser) while Proofpoint cannot be read.
    async fn org_size(&self, org: &OrgAccess) -> usize {
        let mut sizes = self.org_sizes.lock().await;
        if let Some((at, n)) = sizes.get(&org.domain)
            && at.elapsed() < ORG_SIZE_TTL
        {
            return *n;
        }
        match self.deps.proofpoint.count_users(org).await {
            Ok(n) => {
                sizes.insert(org.domain.clone(), (Instant::now(), n));
                n
            }
            Err(e) => {
                tracing::warn!(error = %e, org = %org.domain, "could not count the org's users for the breaker");
                0
            }
        }
    }
}

/// What the outcome event and the history tell about an evaluation.
fn detail_of(eval: &Evaluation, g: &Gathered) -> Detail {
    let (active, exempt) = (g.proofpoint.is_active, g.exempt);
    Detail {
        address: Some(g.address.clone()),
        upn: g.user.user_principal_name.clone(),
        action: Some(eval.decision.action.as_str().to_owned()),
        reason: format!("{}: {}", eval.decision.rule, eval.decision.reason),
        rule: Some(eval.decision.rule.clone()),
        was_active: Some(active),
        is_active: Some(eval.plan.set_active.unwrap_or(active)),
        was_exempt: exempt,
        is_exempt: if eval.plan.add_exemption {
            Some(true)
        } else if eval.plan.remove_exemption {
            Some(false)
        } else {
            exempt
        },
        writes: Vec::new(),
    }
}

/// Nothing was written after all: Proofpoint stays as read.
fn unchanged(detail: &mut Detail) {
    detail.is_active = detail.was_active;
    detail.is_exempt = detail.was_exempt;
}

/// The outcome of a plan carried out.
fn written(eval: &Evaluation, mut detail: Detail) -> Outcome {
    if !eval.plan.is_empty() {
        if eval.plan.add_exemption {
            detail.reason.push_str("; added to the sync-exemption list");
        } else if eval.plan.remove_exemption {
            detail
                .reason
                .push_str("; removed the sync exemption flagrelay had added");
        }
        Outcome::Applied { detail }
    } else if eval.decision.action.desired_active().is_none() {
        Outcome::Skipped {
            reason: eval.decision.rule.clone(),
            detail,
        }
    } else {
        Outcome::NoChange { detail }
    }
}

fn gather_failure(e: GatherError) -> Outcome {
    match e {
        GatherError::Deleted => skipped(
            "deleted_in_graph",
            "Graph answers 404: the user is deleted; Proofpoint is left alone",
            Detail::default(),
        ),
        GatherError::UnknownToProofpoint(address) => skipped(
            "unknown_to_proofpoint",
            "Proofpoint has no user with this address",
            Detail {
                address: Some(address),
                ..Detail::default()
            },
        ),
        // Handled by the caller (an alert and a record for the operator).
        GatherError::Identity(c) => skipped(c.reason(), &c.to_string(), Detail::default()),
        GatherError::Graph(e) => graph_failure(e),
        GatherError::Proofpoint(e) => pp_failure(e),
    }
}

pub(super) fn skipped(reason: &str, why: &str, mut detail: Detail) -> Outcome {
    detail.reason = why.to_owned();
    Outcome::Skipped {
        reason: reason.to_owned(),
        detail,
    }
}

/// The state is unknown: never act on a guess (a deactivation needs the breaker's answer).
fn store_failure(e: StoreError) -> Outcome {
    Outcome::Transient {
        error: e.to_string(),
        retry_after: None,
    }
}

fn apply_failure(e: ApplyError) -> Outcome {
    match e {
        ApplyError::Proofpoint(e) => pp_failure(e),
        ApplyError::Graph(e) => graph_failure(e),
        ApplyError::Store(e) => store_failure(e),
        ApplyError::Unconfirmed(c) => Outcome::Transient {
            error: c.to_string(),
            retry_after: None,
        },
    }
}

fn graph_failure(e: GraphError) -> Outcome {
    if e.is_retryable() {
        Outcome::Transient {
            retry_after: e.retry_after(),
            error: format!("graph: {e}"),
        }
    } else if matches!(e, GraphError::Unauthorized { .. }) {
        Outcome::Permanent {
            reason: "graph_unauthorized",
            error: e.to_string(),
        }
    } else {
        Outcome::Permanent {
            reason: "graph_rejected",
            error: e.to_string(),
        }
    }
}

fn pp_failure(e: PpError) -> Outcome {
    if e.is_retryable() {
        Outcome::Transient {
            retry_after: e.retry_after(),
            error: format!("proofpoint: {e}"),
        }
    } else if matches!(e, PpError::Unauthorized { .. }) {
        Outcome::Permanent {
            reason: "proofpoint_unauthorized",
            error: e.to_string(),
        }
    } else {
        Outcome::Permanent {
            reason: "proofpoint_rejected",
            error: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_evaluation_covers_messages_taken_before_it_or_received_well_before_it() {
        let taken = Instant::now();
        let received_at = Utc::now();
        let just_after = Evaluated {
            wall: received_at + chrono::Duration::milliseconds(5),
            local: taken + Duration::from_millis(5),
        };
        assert!(
            just_after.covers(received_at, taken),
            "taken before the evaluation started: covered, however close (one clock)"
        );
        let started_before_taken = Evaluated {
            wall: received_at + chrono::Duration::milliseconds(5),
            local: taken - Duration::from_millis(1),
        };
        assert!(
            !started_before_taken.covers(received_at, taken),
            "arrived while it ran: its change may postdate the read"
        );
        let long_after_receipt = Evaluated {
            wall: received_at + CLOCK_MARGIN + chrono::Duration::milliseconds(1),
            local: taken - Duration::from_millis(1),
        };
        assert!(
            long_after_receipt.covers(received_at, taken),
            "received (by any receiver) more than the clock margin before: covered"
        );
        let within_margin = Evaluated {
            wall: received_at + CLOCK_MARGIN,
            local: taken - Duration::from_millis(1),
        };
        assert!(!within_margin.covers(received_at, taken));
    }
}
