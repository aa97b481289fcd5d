//! Telling others what an evaluation decided: the status page's recent decisions and the
//! latency histograms, the decision history in the state store, and the outcome event on the
//! bus. None of these decides anything or changes a settlement.

use chrono::{DateTime, Utc};

use super::Worker;
use super::outcome::{Detail, Outcome};
use crate::message::{self, Message, TraceContext, UserChanged, UserOutcome};
use crate::store::HistoryEntry;
use crate::telemetry::Metrics;
use crate::telemetry::status::Decision;

impl Worker {
    /// The status page's recent decisions, the end-to-end latency histograms (when Proofpoint
    /// was written) and the history entry.
    pub(super) fn record_decision(
        &self,
        cause: &UserChanged,
        outcome: &Outcome,
        trace: &TraceContext,
    ) {
        let now = Utc::now();
        let started = started(cause);
        let origin = origin_name(cause);
        if matches!(outcome, Outcome::Applied { .. }) && !self.settings.dry_run {
            self.deps
                .metrics
                .write_landed(&origin, started, cause.event_time, now);
        }
        let detail = detail_of(outcome);
        let rule = match outcome {
            Outcome::Skipped { reason, detail } if !detail.reason.is_empty() => {
                format!("{reason}: {}", detail.reason)
            }
            Outcome::Skipped { reason, .. } => reason.clone(),
            Outcome::Held { reason, .. } => format!("held by the breaker: {reason}"),
            Outcome::IdentityConflict { reason, error, .. } => format!("{reason}: {error}"),
            Outcome::Transient { error, .. } => error.clone(),
            Outcome::Permanent { reason, .. } => (*reason).to_owned(),
            _ => detail.map(|d| d.reason.clone()).unwrap_or_default(),
        };
        let latency = (now - started).to_std().ok();
        self.deps.metrics.status.push_decision(Decision {
            at: now,
            tenant_id: cause.tenant_id.to_string(),
            user: detail
                .and_then(|d| d.address.clone())
                .unwrap_or_else(|| cause.user_id.to_string()),
            result: outcome.result().to_owned(),
            action: detail.and_then(|d| d.action.clone()),
            rule: rule.clone(),
            latency,
            dry_run: self.settings.dry_run,
        });
        let empty = Detail::default();
        let d = detail.unwrap_or(&empty);
        self.deps.history.record(HistoryEntry {
            at: now,
            tenant_id: cause.tenant_id.clone(),
            user_id: cause.user_id.clone(),
            upn: d.upn.as_deref().map(str::to_ascii_lowercase),
            address: d.address.clone(),
            origin,
            result: outcome.result().to_owned(),
            action: d.action.clone(),
            rule: d.rule.clone(),
            reason: rule,
            writes: d.writes.clone(),
            was_active: d.was_active,
            is_active: d.is_active,
            was_exempt: d.was_exempt,
            is_exempt: d.is_exempt,
            dry_run: self.settings.dry_run,
            latency_ms: latency.and_then(|l| i64::try_from(l.as_millis()).ok()),
            trace_id: Some(trace.trace_id().to_owned()),
            worker: self.deps.history.worker().to_owned(),
        });
    }

    pub(super) async fn publish_outcome(
        &self,
        cause: &UserChanged,
        cause_id: &str,
        outcome: &Outcome,
        trace: &TraceContext,
    ) {
        let (detail, reason) = match outcome {
            Outcome::Applied { detail } | Outcome::NoChange { detail } => {
                (detail.clone(), detail.reason.clone())
            }
            Outcome::Skipped { reason, detail } => (detail.clone(), reason.clone()),
            Outcome::Held { reason, detail } => {
                (detail.clone(), format!("held by the breaker: {reason}"))
            }
            Outcome::IdentityConflict {
                reason,
                error,
                detail,
                ..
            } => (detail.clone(), format!("{reason}: {error}")),
            Outcome::Waiting { .. } => {
                (Detail::default(), "waiting for a scheduled recheck".into())
            }
            Outcome::Transient { error, .. } => (Detail::default(), error.clone()),
            Outcome::Permanent { reason, error } => {
                (Detail::default(), format!("{reason}: {error}"))
            }
        };
        let others = match outcome {
            Outcome::IdentityConflict { others, .. } => Some(others.clone()),
            _ => None,
        };
        let latency = (Utc::now() - cause.received_at).num_milliseconds();
        let event = Message::UserOutcome(UserOutcome {
            tenant_id: cause.tenant_id.to_string(),
            user_id: cause.user_id.to_string(),
            address: detail.address,
            result: outcome.result().to_owned(),
            action: detail.action,
            reason,
            was_active: detail.was_active,
            is_active: detail.is_active,
            dry_run: self.settings.dry_run,
            cause_id: cause_id.to_owned(),
            latency_ms: u64::try_from(latency).ok(),
            rule: detail.rule,
            was_exempt: detail.was_exempt,
            is_exempt: detail.is_exempt,
            conflicting_object_ids: others,
        });
        // Outcome events inform other systems; Proofpoint's state is the truth. A failed
        // publish is counted and logged, and does not undo or repeat the work.
        if let Err(error) = self
            .deps
            .queue
            .publish_event(&message::encode_traced(&event, &self.signer, trace))
            .await
        {
            Metrics::inc(&self.deps.metrics.outcome_event_failures_total);
            tracing::warn!(%error, "could not publish the outcome event");
        }
    }
}

/// When the change started counting: a recheck's clock starts when it falls due.
fn started(cause: &UserChanged) -> DateTime<Utc> {
    cause
        .not_before
        .map_or(cause.received_at, |due| due.max(cause.received_at))
}

/// The origin by its wire name (`notification`, `delta`, ...).
fn origin_name(cause: &UserChanged) -> String {
    serde_json::to_value(cause.origin)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// What is known about the evaluation, when it got far enough to know anything.
pub(super) fn detail_of(outcome: &Outcome) -> Option<&Detail> {
    match outcome {
        Outcome::Applied { detail }
        | Outcome::NoChange { detail }
        | Outcome::Skipped { detail, .. }
        | Outcome::Held { detail, .. }
        | Outcome::IdentityConflict { detail, .. } => Some(detail),
        Outcome::Waiting { .. } | Outcome::Transient { .. } | Outcome::Permanent { .. } => None,
    }
}
