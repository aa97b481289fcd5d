//! What this process knows about its own health, for the admin listener's status page and
//! `/readyz`: the last readiness check, queue depths, the breaker, the leader's view of each
//! tenant (subscription, delta sync), and a bounded ring of recent decisions.
//!
//! Written by the parts that observe these things (the probe, the worker, the leader's
//! duties), next to their log lines; read as one consistent [`Snapshot`]. Nothing here does
//! IO, so serving the page or `/readyz` never waits on Graph, Proofpoint or the broker.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::queue::Depths;

/// Decisions kept for the status page; older ones are forgotten.
pub const RECENT_DECISIONS: usize = 100;

/// One evaluation's result as an operator reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub at: DateTime<Utc>,
    pub tenant_id: String,
    /// The Proofpoint address when known, else the Graph user id.
    pub user: String,
    /// `applied`, `no_change`, `skipped`, `held` or `dead_lettered`.
    pub result: String,
    /// The policy's action, when it got that far.
    pub action: Option<String>,
    /// The rule or guard that decided, or why nothing was decided.
    pub rule: String,
    /// From the notification's receipt (or a recheck's due time) to this outcome.
    pub latency: Option<Duration>,
    pub dry_run: bool,
}

/// One readiness check's last result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// `broker`, `graph` or `proofpoint`.
    pub name: &'static str,
    pub ok: bool,
    /// `ok`, or what failed (which tenant or org, and the error).
    pub detail: String,
}

/// The last readiness round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub checked_at: DateTime<Utc>,
    pub checks: Vec<Check>,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }
}

/// The blast-radius breaker as read from the shared state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerView {
    /// When it tripped and why; `None`: closed (deactivations flow).
    pub tripped: Option<(DateTime<Utc>, String)>,
}

/// The leader's last `ensure` of a tenant's subscription.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscriptionHealth {
    pub checked_at: Option<DateTime<Utc>>,
    pub id: Option<String>,
    pub expires: Option<DateTime<Utc>>,
    /// The last attempt's error; `None` when it succeeded.
    pub error: Option<String>,
}

/// The leader's delta polling of a tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeltaHealth {
    pub last_attempt: Option<DateTime<Utc>>,
    pub last_success: Option<DateTime<Utc>>,
    /// The last attempt's error; `None` when it succeeded.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantHealth {
    pub subscription: Option<SubscriptionHealth>,
    pub delta: Option<DeltaHealth>,
}

/// Everything the status page shows, copied out at once.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Newest first.
    pub recent: Vec<Decision>,
    /// Leader's view per tenant id; empty in a process that does not lead.
    pub tenants: BTreeMap<String, TenantHealth>,
    pub readiness: Option<Readiness>,
    /// Whether this process holds the leader lease.
    pub leader: bool,
    /// `None` until read (or when it could not be read).
    pub breaker: Option<BreakerView>,
    /// `None` until read (or when the broker could not be asked).
    pub depths: Option<Depths>,
    /// The newest decisions of every worker, read from the state store by the probe;
    /// `None` until read, when the store could not be read, or in a role without a store.
    pub fleet: Option<Vec<crate::store::HistoryEntry>>,
}

/// The shared, lock-protected status. Every method holds the lock only to copy or write.
#[derive(Debug, Default)]
pub struct Status {
    inner: Mutex<Snapshot>,
}

impl Status {
    fn lock(&self) -> std::sync::MutexGuard<'_, Snapshot> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn snapshot(&self) -> Snapshot {
        self.lock().clone()
    }

    pub fn push_decision(&self, decision: Decision) {
        let mut s = self.lock();
        s.recent.insert(0, decision);
        s.recent.truncate(RECENT_DECISIONS);
    }

    pub fn readiness(&self) -> Option<Readiness> {
        self.lock().readiness.clone()
    }

    pub(super) fn set_readiness(&self, readiness: Readiness) {
        self.lock().readiness = Some(readiness);
    }

    pub(super) fn set_depths(&self, depths: Option<Depths>) {
        self.lock().depths = depths;
    }

    pub(super) fn set_breaker(&self, breaker: Option<BreakerView>) {
        self.lock().breaker = breaker;
    }

    pub fn set_fleet(&self, fleet: Option<Vec<crate::store::HistoryEntry>>) {
        self.lock().fleet = fleet;
    }

    /// Leading or not; losing the lease forgets the leader's per-tenant view, so a former
    /// leader does not report stale subscription or delta health.
    pub(super) fn set_leader(&self, leader: bool) {
        let mut s = self.lock();
        s.leader = leader;
        if !leader {
            s.tenants.clear();
        }
    }

    pub(super) fn update_tenant(&self, tenant_id: &str, f: impl FnOnce(&mut TenantHealth)) {
        f(self.lock().tenants.entry(tenant_id.to_owned()).or_default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(n: usize) -> Decision {
        Decision {
            at: Utc::now(),
            tenant_id: "t".into(),
            user: format!("user{n}@example.com"),
            result: "applied".into(),
            action: Some("deactivate".into()),
            rule: "default".into(),
            latency: Some(Duration::from_millis(120)),
            dry_run: false,
        }
    }

    #[test]
    fn the_ring_keeps_the_newest_decisions_first_and_is_bounded() {
        let status = Status::default();
        for n in 0..RECENT_DECISIONS + 5 {
            status.push_decision(decision(n));
        }
        let recent = status.snapshot().recent;
        assert_eq!(recent.len(), RECENT_DECISIONS);
        assert_eq!(
            recent[0].user,
            format!("user{}@example.com", RECENT_DECISIONS + 4)
        );
        assert_eq!(recent.last().unwrap().user, "user5@example.com");
    }

    #[test]
    fn losing_the_lease_forgets_the_leaders_view() {
        let status = Status::default();
        status.set_leader(true);
        status.update_tenant("t1", |t| {
            t.delta = Some(DeltaHealth {
                last_success: Some(Utc::now()),
                ..DeltaHealth::default()
            })
        });
        assert_eq!(status.snapshot().tenants.len(), 1);
        status.set_leader(false);
        let s = status.snapshot();
        assert!(!s.leader);
        assert!(s.tenants.is_empty());
    }
}
