//! The decision history: every evaluation's result, kept in the state store for
//! `flagrelay history` ("why did X stop receiving mail on Tuesday") and the status page.
//!
//! Workers hand entries to a [`HistorySink`]; one background task per process writes them in
//! batches (one transaction per batch, so an evaluation never waits for the store's commit).
//! A store that cannot take a batch is retried a few times, then the batch is dropped with an
//! error log and `flagrelay_history_write_failures_total`: the history informs, it never
//! holds up or undoes a decision. The leader prunes entries past `state.history_retention`.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::store::{HistoryEntry, Store};
use crate::telemetry::Metrics;

/// Entries waiting for the writer; beyond this, evaluations wait (backpressure).
const BUFFER: usize = 10_000;
/// At most this many entries per transaction.
const BATCH: usize = 500;
/// How long the writer gathers a batch.
const LINGER: Duration = Duration::from_millis(100);

/// Where workers put history entries. Cloning shares the writer.
#[derive(Debug, Clone)]
pub struct HistorySink {
    tx: Option<mpsc::Sender<HistoryEntry>>,
    worker: Arc<str>,
}

impl HistorySink {
    /// A sink that keeps nothing (tools that never evaluate).
    pub fn discard() -> Self {
        Self {
            tx: None,
            worker: worker_name().into(),
        }
    }

    /// Start the writer for `store`; it drains what it was given before `shutdown` returns
    /// from [`HistoryWriter::finished`].
    pub fn spawn(
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> (Self, HistoryWriter) {
        let (tx, rx) = mpsc::channel(BUFFER);
        let task = tokio::spawn(write_batches(store, metrics, rx, shutdown));
        (
            Self {
                tx: Some(tx),
                worker: worker_name().into(),
            },
            HistoryWriter { task },
        )
    }

    /// This process, as the history names it (`host:pid`).
    pub fn worker(&self) -> &str {
        &self.worker
    }

    /// Queue an entry; waits only when the writer is far behind.
    pub fn record(&self, entry: HistoryEntry) {
        let Some(tx) = &self.tx else { return };
        if let Err(mpsc::error::TrySendError::Full(entry)) = tx.try_send(entry) {
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(entry).await;
            });
        }
    }
}

/// The background writer of a [`HistorySink`].
#[derive(Debug)]
pub struct HistoryWriter {
    task: tokio::task::JoinHandle<()>,
}

impl HistoryWriter {
    /// Wait until everything handed over before shutdown is written (or given up).
    pub async fn finished(self) {
        let _ = self.task.await;
    }
}

fn worker_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}:{}", std::process::id())
}

async fn write_batches(
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    mut rx: mpsc::Receiver<HistoryEntry>,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let first = tokio::select! {
            e = rx.recv() => e,
            _ = shutdown.cancelled() => { rx.close(); rx.recv().await }
        };
        let Some(first) = first else { break };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + LINGER;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(e)) => batch.push(e),
                _ => break,
            }
        }
        write(store.as_ref(), &metrics, &mut batch).await;
    }
}

async fn write(store: &dyn Store, metrics: &Metrics, batch: &mut Vec<HistoryEntry>) {
    let mut wait = Duration::from_millis(200);
    for attempt in 1..=4 {
        match store.record_history(batch).await {
            Ok(()) => {
                batch.clear();
                return;
            }
            Err(e) if attempt < 4 => {
                tracing::warn!(error = %e, entries = batch.len(), "could not write the decision history; retrying");
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            Err(e) => {
                Metrics::inc_by(&metrics.history_write_failures_total, batch.len() as u64);
                tracing::error!(error = %e, entries = batch.len(), "could not write the decision history; these entries are lost (the decisions stand)");
            }
        }
    }
    batch.clear();
}

/// `--since 7d` (or an RFC 3339 time) as the earliest time to show.
pub fn parse_since(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    let d = humantime::parse_duration(text).map_err(|e| {
        format!("`{text}` is neither a duration (7d, 12h) nor an RFC 3339 time: {e}")
    })?;
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| now.checked_sub_signed(d))
        .ok_or_else(|| format!("`{text}` reaches too far back"))
}

/// The rule and the reason, the rule named once (the reason usually starts with it).
pub fn why(e: &HistoryEntry) -> String {
    match e.rule.as_deref() {
        Some(rule) if !rule.is_empty() && !e.reason.starts_with(rule) => {
            format!("{rule}: {}", e.reason)
        }
        _ => e.reason.clone(),
    }
}

/// The table `flagrelay history` prints, newest first.
pub fn render(entries: &[HistoryEntry]) -> String {
    if entries.is_empty() {
        return "no decisions recorded for this query\n".into();
    }
    let mut out = format!(
        "{:<24} {:<13} {:<36} {:<30} {:<18} {:<14} {}\n",
        "when (UTC)", "origin", "user", "address", "result", "action", "rule / reason; writes"
    );
    for e in entries {
        let mut why = why(e);
        if !e.writes.is_empty() {
            why.push_str(&format!("; wrote: {}", e.writes.join(", ")));
        }
        if e.dry_run {
            why.push_str(" (dry run)");
        }
        out.push_str(&format!(
            "{:<24} {:<13} {:<36} {:<30} {:<18} {:<14} {}\n",
            e.at.format("%Y-%m-%d %H:%M:%S%.3f"),
            e.origin,
            e.user_id,
            e.address.as_deref().unwrap_or("-"),
            e.result,
            e.action.as_deref().unwrap_or("-"),
            why
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{HistoryQuery, SqlStore};

    fn entry(user: &str, at: DateTime<Utc>) -> HistoryEntry {
        HistoryEntry {
            at,
            tenant_id: "t".into(),
            user_id: user.into(),
            upn: None,
            address: Some(format!("{user}@contoso.test")),
            origin: "notification".into(),
            result: "applied".into(),
            action: Some("deactivate".into()),
            rule: Some("mirror".into()),
            reason: "mirror: sign-in blocked".into(),
            writes: vec!["is_active true → false".into()],
            was_active: Some(true),
            is_active: Some(false),
            was_exempt: None,
            is_exempt: None,
            dry_run: false,
            latency_ms: Some(12),
            trace_id: None,
            worker: "host:1".into(),
        }
    }

    #[tokio::test]
    async fn the_writer_drains_everything_handed_over_before_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            SqlStore::sqlite(dir.path(), &Default::default())
                .await
                .unwrap(),
        );
        let stop = CancellationToken::new();
        let (sink, writer) = HistorySink::spawn(store.clone(), Arc::default(), stop.clone());
        let now = Utc::now();
        for i in 0..1200 {
            sink.record(entry(&format!("u{i}"), now));
        }
        stop.cancel();
        writer.finished().await;
        let all = store
            .history(&HistoryQuery {
                limit: 5000,
                ..HistoryQuery::default()
            })
            .await
            .unwrap();
        assert_eq!(
            all.len(),
            1200,
            "nothing handed over is dropped at shutdown"
        );
    }

    #[test]
    fn since_takes_durations_and_times_and_refuses_the_rest() {
        let now = Utc::now();
        assert_eq!(
            parse_since("7d", now).unwrap(),
            now - chrono::Duration::days(7)
        );
        assert_eq!(
            parse_since("2026-11-30T08:00:00Z", now)
                .unwrap()
                .to_rfc3339(),
            "2026-11-30T08:00:00+00:00"
        );
        assert!(parse_since("last tuesday", now).is_err());
    }

    #[test]
    fn the_table_shows_the_rule_and_the_writes() {
        let text = render(&[entry("u1", Utc::now())]);
        assert!(text.contains("u1@contoso.test"), "{text}");
        assert!(
            text.contains("mirror: sign-in blocked; wrote: is_active true → false"),
            "{text}"
        );
        assert!(render(&[]).contains("no decisions"));
    }
}
