//! Logging set-up and the process's counters.
//!
//! Logs are `tracing` events with key/value fields; each unit of work runs in a span carrying
//! tenant, user and message ids. [`Metrics`] holds the counters an operator alerts on; they
//! are bumped next to the log line of the same event and exposed as Prometheus text at
//! `/metrics` by the receiver.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing_subscriber::EnvFilter;

use crate::config::LogConfig;

/// Install the global subscriber. `RUST_LOG` wins over the configured filter.
pub fn init(cfg: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests, `demo` inside a process that already logs) is harmless.
    let _ = if cfg.format == "json" {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.compact().try_init()
    };
}

macro_rules! counters {
    ($($name:ident: $help:literal),* $(,)?) => {
        /// Process-wide counters (monotonic).
        #[derive(Debug, Default)]
        pub struct Metrics {
            $(#[doc = $help] pub $name: AtomicU64,)*
        }

        impl Metrics {
            /// Prometheus text exposition of every counter.
            pub fn render(&self) -> String {
                let mut out = String::new();
                $(
                    let _ = writeln!(out, "# HELP flagrelay_{} {}", stringify!($name), $help);
                    let _ = writeln!(out, "# TYPE flagrelay_{} counter", stringify!($name));
                    let _ = writeln!(out, "flagrelay_{} {}", stringify!($name), self.$name.load(Ordering::Relaxed));
                )*
                out
            }
        }
    };
}

counters! {
    notifications_received_total: "Notification items received by the webhook.",
    notifications_enqueued_total: "Notification items durably enqueued.",
    notifications_dropped_client_state_total: "Items dropped because clientState did not match.",
    notifications_dropped_unknown_tenant_total: "Items dropped because the tenant is not configured.",
    notifications_dropped_malformed_total: "Items dropped because they could not be parsed.",
    webhook_unavailable_total: "Batches answered 503 because the broker did not take them.",
    webhook_saturated_total: "Batches answered 503 at once because receiver.max_in_flight items were being published.",
    handshakes_total: "Validation handshakes answered.",
    outcomes_applied_total: "Proofpoint users changed (or, in dry-run, that would be).",
    outcomes_no_change_total: "Evaluations where Proofpoint already matched the decision.",
    outcomes_skipped_total: "Evaluations skipped on purpose (deleted user, unknown to Proofpoint, guard).",
    outcomes_retried_total: "Transient failures scheduled for a delayed retry.",
    outcomes_dead_lettered_total: "Messages dead-lettered (permanent failure or attempts exhausted).",
    signature_failures_total: "Messages on the bus that failed signature verification.",
    outcome_event_failures_total: "Outcome events that could not be published.",
    outcomes_held_total: "Deactivations held back by the tripped blast-radius breaker.",
    breaker_trips_total: "Times the blast-radius breaker tripped (alert on any increase).",
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        Metrics::inc(&m.handshakes_total);
        let text = m.render();
        assert!(text.contains("# TYPE flagrelay_handshakes_total counter"));
        assert!(text.contains("flagrelay_handshakes_total 1\n"));
    }
}
