//! The blast-radius breaker: a pure state machine (no clock, no IO; `now` is passed in) that
//! stops automated deactivations when too many happen too fast — a misconfigured policy, a
//! Graph outage that returns users disabled, or a mass change in Entra should cost a few
//! mailboxes, not the whole organization's mail.
//!
//! # How the worker uses it
//! - Keep one [`Breaker`] per Proofpoint organization, built from [`super::Policy::breaker`].
//! - Just before every write that deactivates a user (never for no-change or activations),
//!   call [`Breaker::attempt`] with `now` and the number of users the worker knows in that
//!   organization. [`Verdict::Allow`] counts the deactivation: go ahead. On
//!   [`Verdict::Tripped`], do not write: keep the decision queued (retry later, do not drop or
//!   ack it as done) and raise an alert carrying [`BreakerState`].
//! - Once tripped it stays tripped — every further attempt answers `Tripped` — until an
//!   operator calls [`Breaker::release`] (which also forgets the window, so the queued
//!   deactivations can proceed). Time alone never closes it.
//! - The state lives in memory: several worker processes each keep their own limit, and a
//!   restart forgets the window (and a trip). Persist [`BreakerState`] if that matters.

use std::collections::VecDeque;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Limits, from the `[breaker]` section of the policy file.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BreakerConfig {
    /// At most this many deactivations per window.
    pub max_deactivations: u32,
    /// And at most this fraction of the known users per window (at least one deactivation is
    /// always allowed, so tiny organizations are not locked out).
    pub max_share: f64,
    /// The sliding window both limits count over.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            max_deactivations: 25,
            max_share: 0.10,
            window: Duration::from_secs(3600),
        }
    }
}

impl BreakerConfig {
    /// Deactivations allowed per window for an organization of `total_users`:
    /// `min(max_deactivations, max(1, floor(max_share × total_users)))`.
    pub fn limit(&self, total_users: usize) -> usize {
        let share = (self.max_share * total_users as f64).floor() as usize;
        (self.max_deactivations as usize).min(share.max(1))
    }
}

/// The answer to [`Breaker::attempt`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Deactivate; it has been counted.
    Allow,
    /// Do not deactivate; keep the decision queued and alert.
    Tripped(Trip),
}

/// Why and when the breaker tripped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trip {
    pub at: DateTime<Utc>,
    /// Deactivations already allowed in the window when the one over the limit was asked for.
    pub in_window: usize,
    pub limit: usize,
    pub total_users: usize,
    pub reason: String,
}

/// What an alert or a status page shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BreakerState {
    pub config: BreakerConfig,
    /// Deactivations counted in the window ending at the `now` asked about.
    pub in_window: usize,
    pub tripped: Option<Trip>,
}

#[derive(Debug, Clone)]
pub struct Breaker {
    config: BreakerConfig,
    /// When each deactivation in the window was allowed, oldest first.
    recent: VecDeque<DateTime<Utc>>,
    tripped: Option<Trip>,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            recent: VecDeque::new(),
            tripped: None,
        }
    }

    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    /// Ask to deactivate one user now. Counts it when allowed; trips when it would exceed
    /// either limit; answers `Tripped` for as long as it is tripped.
    pub fn attempt(&mut self, now: DateTime<Utc>, total_users: usize) -> Verdict {
        if let Some(trip) = &self.tripped {
            return Verdict::Tripped(trip.clone());
        }
        self.forget_before(now);
        let limit = self.config.limit(total_users);
        let in_window = self.recent.len();
        if in_window < limit {
            self.recent.push_back(now);
            return Verdict::Allow;
        }
        let trip = Trip {
            at: now,
            in_window,
            limit,
            total_users,
            reason: format!(
                "{in_window} deactivations within {} already reach the limit of {limit} \
                 (max_deactivations {}, max_share {} of {total_users} known users)",
                humantime::format_duration(self.config.window),
                self.config.max_deactivations,
                self.config.max_share,
            ),
        };
        self.tripped = Some(trip.clone());
        Verdict::Tripped(trip)
    }

    /// Put back a trip persisted before a restart: it holds until released.
    pub fn restore(&mut self, trip: Trip) {
        self.tripped = Some(trip);
    }

    pub fn is_tripped(&self) -> bool {
        self.tripped.is_some()
    }

    /// Close the breaker again (an operator has looked) and forget the window. Returns the trip
    /// that was released, if any.
    pub fn release(&mut self) -> Option<Trip> {
        self.recent.clear();
        self.tripped.take()
    }

    /// The state at `now`, for alerts. Does not change anything.
    pub fn state(&self, now: DateTime<Utc>) -> BreakerState {
        let start = window_start(now, self.config.window);
        BreakerState {
            config: self.config,
            in_window: self.recent.iter().filter(|t| **t > start).count(),
            tripped: self.tripped.clone(),
        }
    }

    fn forget_before(&mut self, now: DateTime<Utc>) {
        let start = window_start(now, self.config.window);
        while self.recent.front().is_some_and(|t| *t <= start) {
            self.recent.pop_front();
        }
    }
}

/// Deactivations at or before this instant have left the window.
fn window_start(now: DateTime<Utc>, window: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(window)
        .ok()
        .and_then(|w| now.checked_sub_signed(w))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}
