//! Logging set-up, the process's Prometheus metrics, and its [`status`] for the admin
//! listener.
//!
//! Logs are `tracing` events with key/value fields; each unit of work runs in a span carrying
//! tenant, user and message ids. [`Metrics`] holds what an operator graphs and alerts on,
//! built on the `prometheus-client` crate: counters are bumped next to the log line of the
//! same event; gauges that depend on the broker or the clock are set by the admin probe or
//! computed when `/metrics` is scraped. The admin listener (`crate::admin`) serves them.

pub mod status;

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::queue::Depths;
use status::{BreakerView, Readiness, Status};

use crate::config::LogConfig;

/// Install the global subscriber. `RUST_LOG` wins over the configured filter.
pub fn init(cfg: &LogConfig) {
    // With the `otlp` feature and OTEL_EXPORTER_OTLP_ENDPOINT set, spans are exported too.
    if crate::otlp::init(cfg) {
        return;
    }
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if cfg.format == "json" {
        fmt.json().flatten_event(true).boxed()
    } else {
        fmt.compact().boxed()
    };
    // A second init (tests, `demo` inside a process that already logs) is harmless.
    let _ = tracing_subscriber::registry()
        .with(quiet_dependencies())
        .with(fmt.with_filter(log_filter(cfg)))
        .try_init();
}

/// The configured filter (`log.filter`), unless `RUST_LOG` is set; `info` if neither parses.
pub(crate) fn log_filter(cfg: &LogConfig) -> EnvFilter {
    EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Crates whose debug and trace output carries credentials: lapin and amq-protocol print the
/// AMQP login frame (user and password), h2/hyper/reqwest print request headers (bearer
/// tokens, Proofpoint's `X-Password`), sqlx the connection. They never log below `info`,
/// whatever the filter says (a lower filter still quiets them further).
const CREDENTIAL_LOGGERS: &[&str] = &[
    "lapin",
    "amq_protocol",
    "h2",
    "hyper",
    "hyper_util",
    "reqwest",
    "sqlx",
    "rustls",
    "native_tls",
];

/// The global filter that keeps [`CREDENTIAL_LOGGERS`] at `info` or above.
pub(crate) fn quiet_dependencies<S>() -> impl Layer<S> + Send + Sync
where
    S: tracing::Subscriber,
{
    tracing_subscriber::filter::filter_fn(|meta| {
        *meta.level() <= tracing::Level::INFO || !is_credential_logger(meta.target())
    })
}

fn is_credential_logger(target: &str) -> bool {
    let krate = target.split("::").next().unwrap_or(target);
    CREDENTIAL_LOGGERS
        .iter()
        .any(|c| krate == *c || krate.starts_with(&format!("{c}_")))
}

/// Label of the notifications rejected by the receiver.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Labels of processed messages.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProcessedLabels {
    /// `applied`, `no_change`, `skipped`, `held`, `parked`, `retried`, `dead_lettered`.
    outcome: &'static str,
    /// The policy's action, or `none` when processing did not get that far.
    decision: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OriginLabel {
    origin: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabel {
    queue: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabel {
    tenant: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabel {
    check: &'static str,
}

type GaugeF64 = Gauge<f64, AtomicU64>;

/// Publish + confirm takes milliseconds on a healthy broker; the top buckets show trouble
/// before `amqp.publish_timeout` (2 s by default) turns it into 503s.
const CONFIRM_BUCKETS: [f64; 12] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
];
/// End to end: seconds when healthy, minutes when retries or throttling are involved.
const LATENCY_BUCKETS: [f64; 15] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

fn confirm_histogram() -> Histogram {
    Histogram::new(CONFIRM_BUCKETS)
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// Every metric of the process, registered once; cheap to bump from any task.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Notification items received by the webhook.
    pub notifications_received_total: Counter,
    /// Notification items accepted: durably enqueued (publisher confirm).
    pub notifications_enqueued_total: Counter,
    /// Rejected: clientState did not match (`reason="client_state"`).
    pub notifications_dropped_client_state_total: Counter,
    /// Rejected: tenant not configured (`reason="unknown_tenant"`).
    pub notifications_dropped_unknown_tenant_total: Counter,
    /// Rejected: could not be parsed (`reason="malformed"`).
    pub notifications_dropped_malformed_total: Counter,
    pub webhook_unavailable_total: Counter,
    /// Batches answered 503 at once because `receiver.max_in_flight` items were in flight.
    pub webhook_saturated_total: Counter,
    pub handshakes_total: Counter,
    /// Seconds from publish to the broker's confirm, per notification item.
    pub publish_confirm_seconds: Histogram,
    pub outcomes_applied_total: Counter,
    pub outcomes_no_change_total: Counter,
    pub outcomes_skipped_total: Counter,
    pub outcomes_retried_total: Counter,
    pub outcomes_dead_lettered_total: Counter,
    pub signature_failures_total: Counter,
    pub outcome_event_failures_total: Counter,
    pub outcomes_held_total: Counter,
    pub breaker_trips_total: Counter,
    /// History entries the state store could not take (the decisions stand).
    pub history_write_failures_total: Counter,
    identity_conflicts: Family<ReasonLabel, Counter>,
    processed: Family<ProcessedLabels, Counter>,
    latency_from_receipt: Family<OriginLabel, Histogram, fn() -> Histogram>,
    latency_from_event_time: Histogram,
    queue_depth: Family<QueueLabel, Gauge>,
    dead_letter_depth: Gauge,
    breaker_tripped: Gauge,
    leader: Gauge,
    ready: Family<CheckLabel, Gauge>,
    subscription_expiry: Family<TenantLabel, GaugeF64>,
    delta_lag: Family<TenantLabel, GaugeF64>,
    /// The status page's data (and the cached readiness).
    pub status: Status,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::default();
        let rejected = Family::<ReasonLabel, Counter>::default();
        let reason = |reason| rejected.get_or_create(&ReasonLabel { reason }).clone();
        let m = Self {
            notifications_received_total: Counter::default(),
            notifications_enqueued_total: Counter::default(),
            notifications_dropped_client_state_total: reason("client_state"),
            notifications_dropped_unknown_tenant_total: reason("unknown_tenant"),
            notifications_dropped_malformed_total: reason("malformed"),
            webhook_unavailable_total: Counter::default(),
            webhook_saturated_total: Counter::default(),
            handshakes_total: Counter::default(),
            publish_confirm_seconds: confirm_histogram(),
            outcomes_applied_total: Counter::default(),
            outcomes_no_change_total: Counter::default(),
            outcomes_skipped_total: Counter::default(),
            outcomes_retried_total: Counter::default(),
            outcomes_dead_lettered_total: Counter::default(),
            signature_failures_total: Counter::default(),
            outcome_event_failures_total: Counter::default(),
            outcomes_held_total: Counter::default(),
            breaker_trips_total: Counter::default(),
            history_write_failures_total: Counter::default(),
            identity_conflicts: Family::default(),
            processed: Family::default(),
            latency_from_receipt: Family::new_with_constructor(latency_histogram),
            latency_from_event_time: latency_histogram(),
            queue_depth: Family::default(),
            dead_letter_depth: Gauge::default(),
            breaker_tripped: Gauge::default(),
            leader: Gauge::default(),
            ready: Family::default(),
            subscription_expiry: Family::default(),
            delta_lag: Family::default(),
            status: Status::default(),
            registry: Registry::default(),
        };
        // Counters get `_total` appended by the encoder.
        let counters = [
            (
                "notifications_received",
                "Notification items received by the webhook",
                &m.notifications_received_total,
            ),
            (
                "notifications_enqueued",
                "Notification items accepted: durably enqueued (publisher confirm)",
                &m.notifications_enqueued_total,
            ),
            (
                "webhook_unavailable",
                "Batches answered 503 because the broker did not take them (Graph retries)",
                &m.webhook_unavailable_total,
            ),
            (
                "webhook_saturated",
                "Batches answered 503 at once because receiver.max_in_flight items were being published",
                &m.webhook_saturated_total,
            ),
            (
                "handshakes",
                "Validation handshakes answered",
                &m.handshakes_total,
            ),
            (
                "outcomes_applied",
                "Proofpoint users changed (or, in dry-run, that would be)",
                &m.outcomes_applied_total,
            ),
            (
                "outcomes_no_change",
                "Evaluations where Proofpoint already matched the decision",
                &m.outcomes_no_change_total,
            ),
            (
                "outcomes_skipped",
                "Evaluations skipped on purpose (deleted user, unknown to Proofpoint, guard, coalesced)",
                &m.outcomes_skipped_total,
            ),
            (
                "outcomes_retried",
                "Transient failures scheduled for a delayed retry",
                &m.outcomes_retried_total,
            ),
            (
                "outcomes_dead_lettered",
                "Messages dead-lettered (permanent failure or attempts exhausted)",
                &m.outcomes_dead_lettered_total,
            ),
            (
                "signature_failures",
                "Messages on the bus that failed signature verification",
                &m.signature_failures_total,
            ),
            (
                "outcome_event_failures",
                "Outcome events that could not be published",
                &m.outcome_event_failures_total,
            ),
            (
                "outcomes_held",
                "Deactivations held back by the tripped blast-radius breaker",
                &m.outcomes_held_total,
            ),
            (
                "breaker_trips",
                "Times the blast-radius breaker tripped (alert on any increase)",
                &m.breaker_trips_total,
            ),
            (
                "history_write_failures",
                "Decision-history entries the state store could not take (the decisions stand)",
                &m.history_write_failures_total,
            ),
        ];
        // (prometheus-client ends every help text with a period itself.)
        for (name, help, counter) in counters {
            r.register(format!("flagrelay_{name}"), help, counter.clone());
        }
        r.register(
            "flagrelay_notifications_rejected",
            "Notification items dropped by the webhook, by reason (client_state, unknown_tenant, malformed)",
            rejected,
        );
        r.register_with_unit(
            "flagrelay_publish_confirm",
            "Time from publishing a notification item to the broker's confirm",
            Unit::Seconds,
            m.publish_confirm_seconds.clone(),
        );
        r.register(
            "flagrelay_identity_conflicts",
            "Writes refused because the address is not the Graph object's, by reason (alert on any increase)",
            m.identity_conflicts.clone(),
        );
        r.register(
            "flagrelay_messages_processed",
            "Messages a worker finished with, by outcome and the policy's decision",
            m.processed.clone(),
        );
        r.register_with_unit(
            "flagrelay_latency_from_receipt",
            "Time from flagrelay receiving a change (or a recheck falling due) to the Proofpoint write, by origin",
            Unit::Seconds,
            m.latency_from_receipt.clone(),
        );
        r.register_with_unit(
            "flagrelay_latency_from_event_time",
            "Time from Graph's eventTime of a notification to the Proofpoint write",
            Unit::Seconds,
            m.latency_from_event_time.clone(),
        );
        r.register(
            "flagrelay_queue_depth",
            "Messages ready in the work queues (queue=work) and waiting on the retry tiers (queue=retry)",
            m.queue_depth.clone(),
        );
        r.register(
            "flagrelay_dead_letter_depth",
            "Messages in the dead-letter queue (alert when above 0)",
            m.dead_letter_depth.clone(),
        );
        r.register(
            "flagrelay_breaker_tripped",
            "1 while the blast-radius breaker holds deactivations, else 0",
            m.breaker_tripped.clone(),
        );
        r.register(
            "flagrelay_leader",
            "1 while this process holds the leader lease, else 0",
            m.leader.clone(),
        );
        r.register(
            "flagrelay_ready",
            "1 when the readiness check passed at its last run, else 0, by check (broker, graph, proofpoint)",
            m.ready.clone(),
        );
        r.register_with_unit(
            "flagrelay_subscription_expiry",
            "Seconds until the tenant's Graph subscription expires (leader only)",
            Unit::Seconds,
            m.subscription_expiry.clone(),
        );
        r.register_with_unit(
            "flagrelay_delta_lag",
            "Seconds since the tenant's last successful delta sync (leader only)",
            Unit::Seconds,
            m.delta_lag.clone(),
        );
        Self { registry: r, ..m }
    }

    /// Bump a counter by one.
    pub fn inc(counter: &Counter) {
        counter.inc();
    }

    /// Bump a counter by `n`.
    pub fn inc_by(counter: &Counter, n: u64) {
        counter.inc_by(n);
    }

    /// A write refused by the identity check.
    pub fn identity_conflict(&self, reason: &'static str) {
        self.identity_conflicts
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// How many writes were refused for `reason`.
    pub fn identity_conflict_count(&self, reason: &'static str) -> u64 {
        self.identity_conflicts
            .get_or_create(&ReasonLabel { reason })
            .get()
    }

    /// A counter's value.
    pub fn get(counter: &Counter) -> u64 {
        counter.get()
    }

    /// A worker finished with a message.
    pub fn processed(&self, outcome: &'static str, decision: Option<&str>) {
        let labels = ProcessedLabels {
            outcome,
            decision: decision.unwrap_or("none").to_owned(),
        };
        self.processed.get_or_create(&labels).inc();
    }

    /// How many messages ended with `outcome` and `decision` (`None`: no decision).
    pub fn processed_count(&self, outcome: &'static str, decision: Option<&str>) -> u64 {
        let labels = ProcessedLabels {
            outcome,
            decision: decision.unwrap_or("none").to_owned(),
        };
        self.processed.get_or_create(&labels).get()
    }

    /// A Proofpoint write landed: `started` is when the change reached flagrelay (or a
    /// recheck fell due), `event_time` Graph's time of the change when it sent one.
    pub fn write_landed(
        &self,
        origin: &str,
        started: DateTime<Utc>,
        event_time: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) {
        let label = OriginLabel {
            origin: origin.to_owned(),
        };
        self.latency_from_receipt
            .get_or_create(&label)
            .observe(seconds_between(started, now));
        if let Some(t) = event_time {
            self.latency_from_event_time
                .observe(seconds_between(t, now));
        }
    }

    /// The probe's readiness round: cached for `/readyz` and exported per check.
    pub fn set_readiness(&self, readiness: Readiness) {
        for c in &readiness.checks {
            self.ready
                .get_or_create(&CheckLabel { check: c.name })
                .set(i64::from(c.ok));
        }
        self.status.set_readiness(readiness);
    }

    /// Whether the broker check passed at its last run (the public `/readyz`).
    pub fn broker_ready(&self) -> bool {
        self.status
            .readiness()
            .and_then(|r| r.check("broker").map(|c| c.ok))
            .unwrap_or(false)
    }

    /// Queue depths as just read; `None` when the broker could not be asked (the gauges
    /// keep their last values, the status page says unknown).
    pub fn set_depths(&self, depths: Option<Depths>) {
        if let Some(d) = depths {
            let set = |queue, n: u64| {
                self.queue_depth
                    .get_or_create(&QueueLabel { queue })
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            };
            set("work", d.work);
            set("retry", d.retry);
            self.dead_letter_depth
                .set(i64::try_from(d.dead_letter).unwrap_or(i64::MAX));
        }
        self.status.set_depths(depths);
    }

    /// The breaker as read from the state directory, or just tripped/released by a worker.
    pub fn set_breaker(&self, breaker: Option<BreakerView>) {
        if let Some(b) = &breaker {
            self.breaker_tripped.set(i64::from(b.tripped.is_some()));
        }
        self.status.set_breaker(breaker);
    }

    /// This process took or lost the leader lease.
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
        if !leader {
            self.subscription_expiry.clear();
            self.delta_lag.clear();
        }
        self.status.set_leader(leader);
    }

    /// The leader ensured a tenant's subscription.
    pub fn subscription_ensured(&self, tenant_id: &str, id: &str, expires: DateTime<Utc>) {
        self.status.update_tenant(tenant_id, |t| {
            t.subscription = Some(status::SubscriptionHealth {
                checked_at: Some(Utc::now()),
                id: Some(id.to_owned()),
                expires: Some(expires),
                error: None,
            });
        });
    }

    /// The leader could not ensure a tenant's subscription (what it knew before stays).
    pub fn subscription_failed(&self, tenant_id: &str, error: &str) {
        self.status.update_tenant(tenant_id, |t| {
            let s = t.subscription.get_or_insert_with(Default::default);
            s.checked_at = Some(Utc::now());
            s.error = Some(error.to_owned());
        });
    }

    /// The leader finished a delta round for a tenant (`Err`: it failed, with the error).
    pub fn delta_polled(&self, tenant_id: &str, result: Result<(), &str>) {
        let now = Utc::now();
        self.status.update_tenant(tenant_id, |t| {
            let d = t.delta.get_or_insert_with(Default::default);
            d.last_attempt = Some(now);
            match result {
                Ok(()) => {
                    d.last_success = Some(now);
                    d.error = None;
                }
                Err(e) => d.error = Some(e.to_owned()),
            }
        });
    }

    /// Prometheus text exposition (OpenMetrics) of every metric, with the clock-derived
    /// gauges (subscription expiry, delta lag) computed now.
    pub fn render(&self) -> String {
        let now = Utc::now();
        for (tenant, health) in self.status.snapshot().tenants {
            let label = TenantLabel { tenant };
            if let Some(expires) = health.subscription.and_then(|s| s.expires) {
                self.subscription_expiry
                    .get_or_create(&label)
                    .set((expires - now).num_milliseconds() as f64 / 1000.0);
            }
            if let Some(last) = health.delta.and_then(|d| d.last_success) {
                self.delta_lag
                    .get_or_create(&label)
                    .set(seconds_between(last, now));
            }
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Seconds from `from` to `to`, never negative (hosts' clocks differ a little).
fn seconds_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).to_std().unwrap_or(Duration::ZERO).as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text_with_the_existing_counter_names() {
        let m = Metrics::default();
        Metrics::inc(&m.handshakes_total);
        Metrics::inc(&m.notifications_dropped_client_state_total);
        let text = m.render();
        assert!(
            text.contains("# TYPE flagrelay_handshakes counter"),
            "{text}"
        );
        assert!(text.contains("flagrelay_handshakes_total 1\n"), "{text}");
        assert!(
            text.contains("flagrelay_notifications_rejected_total{reason=\"client_state\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("flagrelay_notifications_rejected_total{reason=\"malformed\"} 0\n"),
            "rejection reasons exist from the start: {text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn processed_messages_are_labelled_by_outcome_and_decision() {
        let m = Metrics::default();
        m.processed("applied", Some("deactivate"));
        m.processed("applied", Some("deactivate"));
        m.processed("dead_lettered", None);
        assert_eq!(m.processed_count("applied", Some("deactivate")), 2);
        let text = m.render();
        assert!(
            text.contains(
                "flagrelay_messages_processed_total{outcome=\"applied\",decision=\"deactivate\"} 2\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "flagrelay_messages_processed_total{outcome=\"dead_lettered\",decision=\"none\"} 1\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn latency_histograms_count_writes_from_receipt_and_from_event_time() {
        let m = Metrics::default();
        let now = Utc::now();
        m.write_landed(
            "notification",
            now - chrono::Duration::milliseconds(300),
            Some(now - chrono::Duration::seconds(40)),
            now,
        );
        m.write_landed("delta", now - chrono::Duration::seconds(2), None, now);
        let text = m.render();
        assert!(
            text.contains("flagrelay_latency_from_receipt_seconds_bucket{le=\"0.5\",origin=\"notification\"} 1\n")
                || text.contains("flagrelay_latency_from_receipt_seconds_bucket{origin=\"notification\",le=\"0.5\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("flagrelay_latency_from_event_time_seconds_count 1\n"),
            "{text}"
        );
    }

    #[test]
    fn clock_derived_gauges_are_computed_at_scrape_and_dropped_when_leadership_is_lost() {
        let m = Metrics::default();
        m.set_leader(true);
        m.subscription_ensured("t1", "sub-1", Utc::now() + chrono::Duration::hours(2));
        m.delta_polled("t1", Ok(()));
        let text = m.render();
        let expiry = text
            .lines()
            .find(|l| l.starts_with("flagrelay_subscription_expiry_seconds{tenant=\"t1\"}"))
            .unwrap_or_else(|| panic!("{text}"));
        let secs: f64 = expiry.rsplit(' ').next().unwrap().parse().unwrap();
        assert!((7000.0..=7200.0).contains(&secs), "{expiry}");
        assert!(
            text.contains("flagrelay_delta_lag_seconds{tenant=\"t1\"}"),
            "{text}"
        );
        assert!(text.contains("flagrelay_leader 1\n"), "{text}");
        m.set_leader(false);
        let text = m.render();
        assert!(!text.contains("tenant=\"t1\""), "{text}");
        assert!(text.contains("flagrelay_leader 0\n"), "{text}");
    }

    #[test]
    fn depths_and_breaker_become_gauges() {
        let m = Metrics::default();
        m.set_depths(Some(Depths {
            work: 3,
            retry: 2,
            dead_letter: 7,
        }));
        m.set_breaker(Some(BreakerView {
            tripped: Some((Utc::now(), "too many".into())),
        }));
        let text = m.render();
        assert!(
            text.contains("flagrelay_queue_depth{queue=\"work\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("flagrelay_queue_depth{queue=\"retry\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("flagrelay_dead_letter_depth 7\n"), "{text}");
        assert!(text.contains("flagrelay_breaker_tripped 1\n"), "{text}");
    }
}
