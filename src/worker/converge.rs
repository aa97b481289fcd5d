//! Converging one user: gather the facts the policy needs, decide, and bring Proofpoint (its
//! `is_active` and the sync-exemption list) to the decision, writing only what differs.
//!
//! Order of writes for `keep_mail_flowing` follows the manual fix admins apply today:
//! activate first, then exempt from sync. Exemptions are removed only when flagrelay added
//! them itself (recorded in the state store). Deactivations pass the blast-radius breaker.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::Worker;
use super::gather::{GatherError, gather};
use super::outcome::{Detail, Outcome};
use crate::graph::GraphError;
use crate::message::{self, Message, Origin, UserChanged};
use crate::policy::Verdict;
use crate::proofpoint::{OrgAccess, PpError};
use crate::state::UserState;

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
        let Some(org) = self.orgs.get(&m.tenant_id.to_ascii_lowercase()) else {
            return Outcome::Permanent {
                reason: "unknown_tenant",
                error: format!("tenant {} is not configured", m.tenant_id),
            };
        };
        let now = Utc::now();
        let started = Evaluated {
            wall: now,
            local: Instant::now(),
        };
        let key = format!(
            "{}/{}",
            m.tenant_id.to_ascii_lowercase(),
            m.user_id.to_ascii_lowercase()
        );
        if m.origin != Origin::Recheck && self.evaluated_since(&key, m.received_at, taken) {
            return skipped(
                "coalesced",
                "an evaluation that started after this message arrived already converged the user",
                Detail::default(),
            );
        }
        let outcome = self.evaluate(m, org, now).await;
        if matches!(
            outcome,
            Outcome::Applied { .. } | Outcome::NoChange { .. } | Outcome::Skipped { .. }
        ) {
            self.mark_evaluated(key, started);
        }
        outcome
    }

    /// Whether an evaluation of the user started after the message arrived: see
    /// [`Evaluated`].
    fn evaluated_since(&self, key: &str, received_at: DateTime<Utc>, taken: Instant) -> bool {
        let map = self
            .evaluated
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(key)
            .is_some_and(|started| started.covers(received_at, taken))
    }

    fn mark_evaluated(&self, key: String, started: Evaluated) {
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

    async fn evaluate(&self, m: &UserChanged, org: &OrgAccess, now: DateTime<Utc>) -> Outcome {
        let mut state = match self.deps.state.user(&m.tenant_id, &m.user_id) {
            Ok(s) => s,
            Err(e) => {
                return Outcome::Transient {
                    error: e.to_string(),
                    retry_after: None,
                };
            }
        };
        let before = state.clone();
        if m.origin == Origin::Recheck {
            if state.recheck_at != m.not_before {
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
            org,
            &m.tenant_id,
            &m.user_id,
            &needs,
            state.exemption_added,
        )
        .await
        {
            Ok(g) => g,
            Err(e) => return gather_failure(e),
        };
        let mut detail = Detail {
            address: Some(g.address.clone()),
            ..Detail::default()
        };
        let (address, pp_user, exempt) = (&g.address, &g.proofpoint, g.exempt);

        // The start of a grace period that is measured from the moment sign-in was blocked.
        match g.user.account_enabled {
            Some(false) => {
                state.disabled_since.get_or_insert(now);
            }
            Some(true) => state.disabled_since = None,
            None => {}
        }
        let facts = g.facts(state.disabled_since);
        let decision = policy.decide(&facts, now);
        detail.action = Some(decision.action.as_str().to_owned());
        detail.reason = format!("{}: {}", decision.rule, decision.reason);
        detail.rule = Some(decision.rule.clone());
        detail.was_active = Some(pp_user.is_active);
        detail.is_active = Some(pp_user.is_active);
        detail.was_exempt = exempt;
        detail.is_exempt = exempt;

        // Time alone can change some decisions (a grace period ending, a leave date passing):
        // schedule a durable recheck, once per due time.
        let recheck = decision.recheck_at.filter(|t| *t > now);
        if let Some(due) = recheck
            && recheck != state.recheck_at
            && let Err(e) = self.schedule_recheck(m, due).await
        {
            return Outcome::Transient {
                error: format!("scheduling a recheck: {e}"),
                retry_after: None,
            };
        }
        state.recheck_at = recheck;

        let plan = Plan::new(&decision, pp_user.is_active, exempt, state.exemption_added);
        let mut changed = false;
        if let Some(desired) = plan.set_active {
            if !desired && let Some(held) = self.breaker_allows(org, now).await {
                let _ = self.save(m, &before, &state).await;
                return Outcome::Held {
                    reason: held,
                    delay: self.settings.breaker_recheck,
                    detail,
                };
            }
            if !self.settings.dry_run {
                // Read-modify-write of the whole object: unknown fields go back as read.
                let mut updated = pp_user.clone();
                updated.is_active = desired;
                if let Err(e) = self.deps.proofpoint.put_user(org, &updated).await {
                    return pp_failure(e);
                }
            }
            detail.is_active = Some(desired);
            changed = true;
        }
        if plan.add_exemption {
            if !self.settings.dry_run {
                if let Err(e) = self.deps.proofpoint.add_exemption(org, address).await {
                    return pp_failure(e);
                }
                state.exemption_added = true;
            }
            detail.is_exempt = Some(true);
            detail.reason.push_str("; added to the sync-exemption list");
            changed = true;
        } else if plan.remove_exemption {
            if !self.settings.dry_run {
                if let Err(e) = self.deps.proofpoint.remove_exemption(org, address).await {
                    return pp_failure(e);
                }
                state.exemption_added = false;
            }
            detail.is_exempt = Some(false);
            detail
                .reason
                .push_str("; removed the sync exemption flagrelay had added");
            changed = true;
        } else if plan.forget_exemption {
            // Someone removed it by hand: it is no longer ours to track.
            state.exemption_added = false;
        }
        if let Err(e) = self.save(m, &before, &state).await {
            return Outcome::Transient {
                error: e.to_string(),
                retry_after: None,
            };
        }
        if changed {
            Outcome::Applied { detail }
        } else if decision.action.desired_active().is_none() {
            Outcome::Skipped {
                reason: decision.rule,
                detail,
            }
        } else {
            Outcome::NoChange { detail }
        }
    }

    /// Store the user's state if it changed. The write ends with an fsync, which can take
    /// milliseconds: it runs on the blocking pool, never on the async workers (where it
    /// stalled every other evaluation; BENCHMARKS.md, "End to end").
    async fn save(
        &self,
        m: &UserChanged,
        before: &UserState,
        state: &UserState,
    ) -> Result<(), crate::state::StateError> {
        if state == before {
            return Ok(());
        }
        let (store, tenant, user, state) = (
            self.deps.state.clone(),
            m.tenant_id.clone(),
            m.user_id.clone(),
            state.clone(),
        );
        let dir = store.dir().to_owned();
        match tokio::task::spawn_blocking(move || store.put_user(&tenant, &user, &state)).await {
            Ok(written) => written,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Only when the runtime shuts down: the message is not acked and comes back.
            Err(e) => Err(crate::state::StateError::Io {
                path: dir,
                source: std::io::Error::other(e),
            }),
        }
    }

    /// Publish a recheck for `due`; it waits in the delay queues until then.
    async fn schedule_recheck(
        &self,
        m: &UserChanged,
        due: DateTime<Utc>,
    ) -> Result<(), crate::queue::QueueError> {
        let recheck = Message::UserChanged(UserChanged {
            change_type: "recheck".into(),
            subscription_id: None,
            event_time: None,
            received_at: Utc::now(),
            origin: Origin::Recheck,
            not_before: Some(due),
            ..m.clone()
        });
        tracing::info!(%due, "recheck scheduled");
        self.deps
            .queue
            .publish(&message::encode(&recheck, &self.signer))
            .await
    }

    /// `None` when the breaker lets this deactivation through, else why it is held.
    async fn breaker_allows(&self, org: &OrgAccess, now: DateTime<Utc>) -> Option<String> {
        let total = self.org_size(org).await;
        let mut breaker = self.breaker.lock().await;
        if breaker.is_tripped() && matches!(self.deps.state.active_trip(), Ok(None)) {
            breaker.release();
            self.deps
                .metrics
                .set_breaker(Some(crate::telemetry::status::BreakerView {
                    tripped: None,
                }));
            tracing::warn!("breaker released by an operator; deactivations resume");
        }
        match breaker.attempt(now, total) {
            Verdict::Allow => None,
            Verdict::Tripped(trip) => {
                let newly = trip.at == now;
                if newly {
                    crate::telemetry::Metrics::inc(&self.deps.metrics.breaker_trips_total);
                    self.deps
                        .metrics
                        .set_breaker(Some(crate::telemetry::status::BreakerView {
                            tripped: Some((trip.at, trip.reason.clone())),
                        }));
                    tracing::error!(
                        reason = %trip.reason,
                        "ALERT: blast-radius breaker tripped; deactivations are held until an operator runs `flagrelay breaker release`"
                    );
                    let file = crate::state::BreakerFile {
                        tripped: Some(trip.clone()),
                        released_at: None,
                    };
                    if let Err(e) = self.deps.state.put_breaker(&file) {
                        tracing::error!(error = %e, "could not persist the breaker trip");
                    }
                }
                Some(trip.reason)
            }
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

/// The writes a decision calls for, given Proofpoint's current state. Pure; shared by the
/// worker and `policy explain` so that what is explained is what is done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Plan {
    /// PUT the user with this `is_active`.
    pub set_active: Option<bool>,
    /// Add the user to the sync-exemption list (and remember flagrelay did).
    pub add_exemption: bool,
    /// Remove an exemption flagrelay added earlier.
    pub remove_exemption: bool,
    /// An exemption flagrelay added is gone already (removed by hand): stop tracking it.
    pub forget_exemption: bool,
}

impl Plan {
    /// `exempt`: whether the user is on the list now (`None`: not read).
    pub fn new(
        decision: &crate::policy::Decision,
        is_active: bool,
        exempt: Option<bool>,
        added_by_us: bool,
    ) -> Self {
        Plan {
            set_active: decision.action.desired_active().filter(|d| *d != is_active),
            add_exemption: decision.exempt == Some(true) && exempt == Some(false),
            remove_exemption: decision.exempt == Some(false) && exempt == Some(true) && added_by_us,
            forget_exemption: decision.exempt == Some(false)
                && exempt == Some(false)
                && added_by_us,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.set_active.is_none() && !self.add_exemption && !self.remove_exemption
    }
}

fn gather_failure(e: GatherError) -> Outcome {
    match e {
        GatherError::Deleted => skipped(
            "deleted_in_graph",
            "Graph answers 404: the user is deleted; Proofpoint is left alone",
            Detail::default(),
        ),
        GatherError::NoAddress => skipped("no_address", &e.to_string(), Detail::default()),
        GatherError::UnknownToProofpoint(address) => skipped(
            "unknown_to_proofpoint",
            "Proofpoint has no user with this address",
            Detail {
                address: Some(address),
                ..Detail::default()
            },
        ),
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
