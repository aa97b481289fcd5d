//! Processing outcomes and the one function that turns an outcome into a settlement
//! (ack, delayed retry, or dead-letter). Nothing else in the crate decides that.

use std::time::Duration;

use crate::queue::Settlement;

/// What processing one message came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Proofpoint was changed (or, in dry-run, would have been).
    Applied { detail: Detail },
    /// Proofpoint already matched the decision.
    NoChange { detail: Detail },
    /// Left alone on purpose: deleted in Graph, unknown to Proofpoint, a guard, a lifecycle
    /// event nobody reacts to yet.
    Skipped { reason: String, detail: Detail },
    /// A scheduled recheck that is not due yet: parked again, silently, attempts untouched.
    Waiting { delay: Duration },
    /// A deactivation the blast-radius breaker holds back. Settled: the state store records
    /// the user as held, and an operator's release wakes it again.
    Held { reason: String, detail: Detail },
    /// The address is not this Graph object's to write (another object holds it, it lies
    /// outside the org's domains, or its binding changed): nothing written, an operator
    /// decides (`flagrelay identity`). Settled: `identity accept` wakes the user again.
    IdentityConflict {
        reason: &'static str,
        error: String,
        /// The other Graph objects involved.
        others: Vec<String>,
        detail: Detail,
    },
    /// Might work later: timeouts, 5xx, throttling (with the server's `Retry-After`).
    Transient {
        error: String,
        retry_after: Option<Duration>,
    },
    /// Cannot work without an operator: bad signature, undecodable, 401/403, rejected.
    Permanent { reason: &'static str, error: String },
}

/// What is known about the evaluation, for logs and the outcome event.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Detail {
    pub address: Option<String>,
    /// The user's UPN as Graph answered it (so `history --user UPN` finds the entry).
    pub upn: Option<String>,
    pub action: Option<String>,
    pub reason: String,
    pub was_active: Option<bool>,
    pub is_active: Option<bool>,
    /// The rule or guard that decided, once the policy ran.
    pub rule: Option<String>,
    /// On the sync-exemption list before / after (`None`: not read).
    pub was_exempt: Option<bool>,
    pub is_exempt: Option<bool>,
    /// The writes made to Proofpoint, one line each.
    pub writes: Vec<String>,
}

impl Outcome {
    /// The `result` field of the outcome event.
    pub fn result(&self) -> &'static str {
        match self {
            Outcome::Applied { .. } => "applied",
            Outcome::NoChange { .. } => "no_change",
            Outcome::Skipped { .. } | Outcome::Waiting { .. } => "skipped",
            Outcome::Held { .. } => "held",
            Outcome::IdentityConflict { .. } => "identity_conflict",
            // A transient outcome only reaches an event when its attempts are exhausted.
            Outcome::Transient { .. } | Outcome::Permanent { .. } => "dead_lettered",
        }
    }
}

/// How transient failures are retried.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; the last transient failure is dead-lettered.
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

/// The exponential backoff for attempt `n` (1-based), before jitter.
pub fn backoff(policy: &RetryPolicy, attempt: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(30));
    policy
        .backoff_base
        .saturating_mul(factor)
        .min(policy.backoff_max)
}

/// Map an outcome to a settlement.
///
/// `previous_attempts` is how often the message was tried before this delivery; `jitter` is a
/// factor in `[0.8, 1.2]` chosen by the caller (kept out of here so this stays pure).
pub fn settle(
    outcome: &Outcome,
    previous_attempts: u32,
    policy: &RetryPolicy,
    jitter: f64,
) -> Settlement {
    let attempt = previous_attempts.saturating_add(1);
    match outcome {
        Outcome::Applied { .. }
        | Outcome::NoChange { .. }
        | Outcome::Skipped { .. }
        | Outcome::Held { .. }
        | Outcome::IdentityConflict { .. } => Settlement::Ack,
        // Parking is not an attempt: the count stays as it was.
        Outcome::Waiting { delay } => Settlement::Retry {
            delay: *delay,
            attempt: previous_attempts,
            last_error: "waiting for a scheduled recheck".into(),
        },
        Outcome::Permanent { reason, error } => Settlement::DeadLetter {
            reason: (*reason).to_owned(),
            attempts: attempt,
            last_error: error.clone(),
        },
        Outcome::Transient { error, .. } if attempt >= policy.max_attempts => {
            Settlement::DeadLetter {
                reason: "max_attempts_exceeded".into(),
                attempts: attempt,
                last_error: error.clone(),
            }
        }
        Outcome::Transient { error, retry_after } => {
            let jittered = backoff(policy, attempt).mul_f64(jitter.clamp(0.8, 1.2));
            // The server's Retry-After is a floor, never shortened by jitter.
            let delay = retry_after.map_or(jittered, |r| r.max(jittered));
            Settlement::Retry {
                delay,
                attempt,
                last_error: error.clone(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        max_attempts: 4,
        backoff_base: Duration::from_secs(1),
        backoff_max: Duration::from_secs(5),
    };

    fn transient(retry_after: Option<u64>) -> Outcome {
        Outcome::Transient {
            error: "503".into(),
            retry_after: retry_after.map(Duration::from_secs),
        }
    }

    fn check(outcome: Outcome, previous: u32, jitter: f64, expected: Settlement) {
        assert_eq!(
            settle(&outcome, previous, &POLICY, jitter),
            expected,
            "{outcome:?} after {previous}"
        );
    }

    fn retry(ms: u64, attempt: u32) -> Settlement {
        Settlement::Retry {
            delay: Duration::from_millis(ms),
            attempt,
            last_error: "503".into(),
        }
    }

    #[test]
    fn settled_outcomes_are_acked() {
        check(
            Outcome::Applied {
                detail: Detail::default(),
            },
            0,
            1.0,
            Settlement::Ack,
        );
        check(
            Outcome::NoChange {
                detail: Detail::default(),
            },
            3,
            1.0,
            Settlement::Ack,
        );
        check(
            Outcome::Skipped {
                reason: "x".into(),
                detail: Detail::default(),
            },
            0,
            1.0,
            Settlement::Ack,
        );
    }

    #[test]
    fn transient_failures_back_off_exponentially_with_jitter_and_a_cap() {
        check(transient(None), 0, 1.0, retry(1000, 1));
        check(transient(None), 1, 1.0, retry(2000, 2));
        check(transient(None), 2, 1.0, retry(4000, 3));
        check(transient(None), 0, 1.2, retry(1200, 1));
        check(transient(None), 0, 0.8, retry(800, 1));
        check(transient(None), 0, 7.0, retry(1200, 1)); // jitter is clamped
        assert_eq!(backoff(&POLICY, 30), Duration::from_secs(5));
    }

    #[test]
    fn held_deactivations_and_identity_conflicts_are_settled_in_the_store() {
        check(
            Outcome::Held {
                reason: "tripped".into(),
                detail: Detail::default(),
            },
            3,
            1.0,
            Settlement::Ack,
        );
        check(
            Outcome::IdentityConflict {
                reason: "address_held_by_other",
                error: "x".into(),
                others: vec!["o".into()],
                detail: Detail::default(),
            },
            0,
            1.0,
            Settlement::Ack,
        );
    }

    #[test]
    fn waiting_messages_are_parked_without_counting_an_attempt() {
        let delay = Duration::from_secs(600);
        let parked = |last_error: &str| Settlement::Retry {
            delay,
            attempt: 3,
            last_error: last_error.into(),
        };
        check(
            Outcome::Waiting { delay },
            3,
            1.2,
            parked("waiting for a scheduled recheck"),
        );
    }

    #[test]
    fn retry_after_is_a_floor() {
        check(transient(Some(30)), 0, 0.8, retry(30_000, 1));
        check(transient(Some(0)), 1, 1.0, retry(2000, 2));
    }

    #[test]
    fn the_last_attempt_dead_letters_and_permanent_failures_do_at_once() {
        check(
            transient(None),
            3,
            1.0,
            Settlement::DeadLetter {
                reason: "max_attempts_exceeded".into(),
                attempts: 4,
                last_error: "503".into(),
            },
        );
        check(
            Outcome::Permanent {
                reason: "bad_signature",
                error: "nope".into(),
            },
            0,
            1.0,
            Settlement::DeadLetter {
                reason: "bad_signature".into(),
                attempts: 1,
                last_error: "nope".into(),
            },
        );
    }
}
