//! Fault injection for the Proofpoint simulator: latency with jitter, the next N answers
//! failed, a random failure rate (seedable, so a failing run can be replayed), and a sustained
//! outage that recovers by itself.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Fault settings; set from Rust ([`super::ProofpointSim::set_faults`]) or as JSON on
/// `POST /_sim/faults` (durations in humantime form, e.g. `"250ms"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProofpointSimFaults {
    /// Added before every API answer (lets tests exceed the client's timeout).
    #[serde(with = "humantime_serde")]
    pub latency: Duration,
    /// A uniformly random extra delay in `0..=jitter` on top of `latency`.
    #[serde(with = "humantime_serde")]
    pub jitter: Duration,
    /// Statuses to answer the next requests with, in order, one each.
    pub fail_next: Vec<u16>,
    /// Probability in `0.0..=1.0` that a request fails with `failure_status`.
    pub failure_rate: f64,
    pub failure_status: u16,
    /// Seed for the jitter and failure-rate draws; `None` = from the OS.
    pub seed: Option<u64>,
    /// A sustained outage: every request fails with `fail_for_status` for this long (counted
    /// from when the faults are set), then the simulator recovers.
    #[serde(with = "humantime_serde")]
    pub fail_for: Option<Duration>,
    pub fail_for_status: u16,
    /// Sent as `Retry-After` (seconds) with injected 429s. Proofpoint has never been seen to
    /// send one; this lets tests check the client would honour it.
    pub retry_after_secs: Option<u64>,
}

impl Default for ProofpointSimFaults {
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            jitter: Duration::ZERO,
            fail_next: Vec::new(),
            failure_rate: 0.0,
            failure_status: 503,
            seed: None,
            fail_for: None,
            fail_for_status: 503,
            retry_after_secs: None,
        }
    }
}

impl ProofpointSimFaults {
    /// Refuse settings the simulator could not honour (HTTP statuses must be errors).
    pub fn validate(&self) -> Result<(), String> {
        let statuses = self
            .fail_next
            .iter()
            .chain([&self.failure_status, &self.fail_for_status]);
        for s in statuses {
            if !(400..=599).contains(s) {
                return Err(format!("{s} is not an HTTP error status (400..=599)"));
            }
        }
        if !(0.0..=1.0).contains(&self.failure_rate) {
            return Err("failure_rate must be between 0.0 and 1.0".into());
        }
        Ok(())
    }
}

/// What to do with one incoming request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Decision {
    pub delay: Duration,
    /// Answer with this status instead of handling the request.
    pub fail: Option<u16>,
    pub retry_after_secs: Option<u64>,
}

/// The live fault state: settings plus what has been consumed of them.
#[derive(Debug)]
pub(super) struct FaultState {
    settings: ProofpointSimFaults,
    queue: VecDeque<u16>,
    outage_until: Option<Instant>,
    rng: StdRng,
}

impl Default for FaultState {
    fn default() -> Self {
        let mut s = Self {
            settings: ProofpointSimFaults::default(),
            queue: VecDeque::new(),
            outage_until: None,
            rng: StdRng::seed_from_u64(0),
        };
        s.set(ProofpointSimFaults::default(), Instant::now());
        s
    }
}

impl FaultState {
    /// Replace all settings; the outage (if any) starts now, the RNG is re-seeded.
    pub fn set(&mut self, settings: ProofpointSimFaults, now: Instant) {
        self.queue = settings.fail_next.iter().copied().collect();
        self.outage_until = settings.fail_for.map(|d| now + d);
        self.rng = match settings.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        self.settings = settings;
    }

    pub fn settings_mut(&mut self) -> &mut ProofpointSimFaults {
        &mut self.settings
    }

    pub fn push_failures(&mut self, n: usize, status: u16) {
        self.queue.extend(std::iter::repeat_n(status, n));
    }

    pub fn start_outage(&mut self, duration: Duration, status: u16, now: Instant) {
        self.settings.fail_for = Some(duration);
        self.settings.fail_for_status = status;
        self.outage_until = Some(now + duration);
    }

    /// The current settings, with `fail_next` and `fail_for` showing what is left.
    pub fn current(&self, now: Instant) -> ProofpointSimFaults {
        let mut s = self.settings.clone();
        s.fail_next = self.queue.iter().copied().collect();
        s.fail_for = self
            .outage_until
            .and_then(|until| until.checked_duration_since(now))
            .filter(|d| !d.is_zero());
        s
    }

    /// Decide the fate of one request: an outage wins, then the queued failures, then chance.
    pub fn decide(&mut self, now: Instant) -> Decision {
        let s = &self.settings;
        let jitter = if s.jitter.is_zero() {
            Duration::ZERO
        } else {
            let nanos = u64::try_from(s.jitter.as_nanos()).unwrap_or(u64::MAX);
            Duration::from_nanos(self.rng.random_range(0..=nanos))
        };
        let delay = s.latency + jitter;
        let fail = if self.outage_until.is_some_and(|until| now < until) {
            Some(s.fail_for_status)
        } else if let Some(status) = self.queue.pop_front() {
            Some(status)
        } else if s.failure_rate > 0.0 && self.rng.random_bool(s.failure_rate.min(1.0)) {
            Some(s.failure_status)
        } else {
            None
        };
        Decision {
            delay,
            fail,
            retry_after_secs: self.settings.retry_after_secs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outage_then_queue_then_rate_with_a_replayable_seed() {
        let t0 = Instant::now();
        let mut f = FaultState::default();
        f.set(
            ProofpointSimFaults {
                fail_next: vec![429, 500],
                fail_for: Some(Duration::from_secs(10)),
                ..Default::default()
            },
            t0,
        );
        assert_eq!(f.decide(t0).fail, Some(503), "outage first");
        let later = t0 + Duration::from_secs(11);
        assert_eq!(f.decide(later).fail, Some(429));
        assert_eq!(f.decide(later).fail, Some(500));
        assert_eq!(f.decide(later).fail, None);

        let draws = |seed| {
            let mut f = FaultState::default();
            f.set(
                ProofpointSimFaults {
                    failure_rate: 0.5,
                    seed: Some(seed),
                    jitter: Duration::from_millis(5),
                    ..Default::default()
                },
                t0,
            );
            (0..32).map(|_| f.decide(t0)).collect::<Vec<_>>()
        };
        assert_eq!(draws(7), draws(7));
        assert!(draws(7).iter().any(|d| d.fail.is_some()));
        assert!(draws(7).iter().any(|d| d.fail.is_none()));
        assert!(draws(7).iter().all(|d| d.delay <= Duration::from_millis(5)));
    }

    #[test]
    fn non_error_statuses_are_refused() {
        let f = ProofpointSimFaults {
            fail_next: vec![200],
            ..Default::default()
        };
        assert!(f.validate().is_err());
        assert!(ProofpointSimFaults::default().validate().is_ok());
    }
}
