//! Work due at a time, run by the leader: every second it asks the state store for what is
//! due — a user's recheck (a grace period ending, a leave date passing) or a wake-up (an
//! operator released held deactivations or accepted an identity) — and queues a message for
//! each, so it is acted on within a couple of seconds of its due time. Every hour it prunes
//! the decision history past `state.history_retention`.
//!
//! Published first, marked queued after: a leader that dies in between queues the work
//! again (a duplicate, which the worker coalesces or finds stale), never loses it.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::message::{self, Message, Origin, Signer, UserChanged};
use crate::queue::Queue;
use crate::store::{Due, DueKind, Store, StoreError};

/// How often the due list is read.
pub const TICK: Duration = Duration::from_secs(1);
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Due items queued per tick at most (the rest wait for the next tick).
const PER_TICK: usize = 1000;

#[derive(Debug, Clone)]
pub struct Scheduler {
    pub store: Arc<dyn Store>,
    pub queue: Arc<dyn Queue>,
    pub signer: Signer,
    pub history_retention: Duration,
}

impl Scheduler {
    /// Run while `leader` is true, until `shutdown`.
    pub async fn run(self, mut leader: watch::Receiver<bool>, shutdown: CancellationToken) {
        let mut last_prune: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = leader.wait_for(|l| *l) => if changed.is_err() { return },
            }
            match self.tick().await {
                Ok(n) if n > 0 => tracing::debug!(queued = n, "due work queued"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "could not queue due work; next tick"),
            }
            if last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
                last_prune = Some(tokio::time::Instant::now());
                self.prune().await;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(TICK) => {}
            }
        }
    }

    /// Queue everything due now; how many were queued.
    pub async fn tick(&self) -> Result<usize, StoreError> {
        let now = Utc::now();
        let due = self.store.due(now, PER_TICK).await?;
        let mut queued = 0;
        for d in &due {
            let encoded = message::encode(&Message::UserChanged(message_for(d)), &self.signer);
            if let Err(e) = self.queue.publish(&encoded).await {
                tracing::warn!(error = %e, user = %d.key, "could not queue due work; next tick");
                continue;
            }
            self.store.mark_queued(d, Utc::now()).await?;
            queued += 1;
        }
        Ok(queued)
    }

    async fn prune(&self) {
        let now = Utc::now();
        let before = chrono::Duration::from_std(self.history_retention)
            .ok()
            .and_then(|r| now.checked_sub_signed(r))
            .unwrap_or(chrono::DateTime::<Utc>::MIN_UTC);
        match self.store.prune(before, now).await {
            Ok(p) => tracing::info!(
                history = p.history,
                breaker_counts = p.deactivations,
                "pruned the state store"
            ),
            Err(e) => tracing::warn!(error = %e, "could not prune the state store"),
        }
    }
}

/// The message for due work: a recheck carries its due time (the worker drops it as stale
/// when the user's recheck moved meanwhile); a wake-up is an ordinary look at the user.
fn message_for(d: &Due) -> UserChanged {
    let (change_type, origin, not_before) = match d.kind {
        DueKind::Recheck => ("recheck", Origin::Recheck, Some(d.at)),
        DueKind::Wake => ("wake", Origin::Manual, None),
    };
    UserChanged {
        tenant_id: d.key.tenant.clone(),
        user_id: d.key.user.clone(),
        change_type: change_type.into(),
        subscription_id: None,
        event_time: None,
        received_at: Utc::now(),
        origin,
        not_before,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::UserKey;
    use crate::queue::QueueSettings;
    use crate::queue::embedded::EmbeddedQueue;
    use crate::store::{SqlStore, UserState};

    #[tokio::test]
    async fn due_rechecks_and_wake_ups_are_queued_once_each() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            SqlStore::sqlite(dir.path(), &Default::default())
                .await
                .unwrap(),
        );
        let queue = EmbeddedQueue::new(QueueSettings::with_prefix("sched"));
        let scheduler = Scheduler {
            store: store.clone(),
            queue: Arc::new(queue.clone()),
            signer: Signer::new("k1", "k".repeat(32).into()),
            history_retention: Duration::from_secs(3600),
        };
        let now = Utc::now();
        let due = UserKey::new("t".into(), "6f1c2b9a-0000-4000-8000-00000000000a".into());
        let later = UserKey::new("t".into(), "6f1c2b9a-0000-4000-8000-00000000000b".into());
        let woken = UserKey::new("t".into(), "6f1c2b9a-0000-4000-8000-00000000000c".into());
        let recheck = |at| UserState {
            recheck_at: Some(at),
            ..UserState::default()
        };
        store
            .put_user(&due, &recheck(now - chrono::Duration::seconds(1)), now)
            .await
            .unwrap();
        store
            .put_user(&later, &recheck(now + chrono::Duration::hours(1)), now)
            .await
            .unwrap();
        store.wake(&woken, now).await.unwrap();

        assert_eq!(
            scheduler.tick().await.unwrap(),
            2,
            "the recheck due and the wake-up"
        );
        assert_eq!(queue.held(), 2);
        assert_eq!(scheduler.tick().await.unwrap(), 0, "each is queued once");
        assert_eq!(queue.held(), 2);
    }

    #[test]
    fn a_recheck_carries_its_due_time_and_a_wake_up_is_an_ordinary_look() {
        let key = UserKey::new("t".into(), "u".into());
        let at = Utc::now();
        let r = message_for(&Due {
            key: key.clone(),
            at,
            kind: DueKind::Recheck,
        });
        assert_eq!((r.origin, r.not_before), (Origin::Recheck, Some(at)));
        let w = message_for(&Due {
            key,
            at,
            kind: DueKind::Wake,
        });
        assert_eq!((w.origin, w.not_before), (Origin::Manual, None));
    }
}
