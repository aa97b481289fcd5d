//! Decisions from the state store on the admin listener: the table of every worker's recent
//! decisions on the status page (read by the probe), and `/history?user=…`, one user's
//! history ("why did X stop receiving mail on Tuesday") — the page `flagrelay history`
//! prints, for an operator with a browser.
//!
//! `/history` is the one admin route that reads the store per request: one indexed query,
//! bounded by [`LIMIT`] rows, [`TIMEOUT`] and [`CONCURRENT`] requests at a time (more are
//! answered 503 at once rather than queued behind a slow store).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;
use tokio::sync::{OnceCell, Semaphore};

use super::page::{self, escape, when};
use crate::store::{HistoryEntry, HistoryQuery, Store};

/// Most entries one page shows.
pub const LIMIT: usize = 200;
/// Longest the store may take to answer.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// History requests served at once.
pub const CONCURRENT: usize = 2;
/// Longest `user` accepted (an object id, a UPN or an address).
const MAX_USER_LEN: usize = 320;

/// The store, once the process opened it (`None`: a role without one, such as `serve`).
#[derive(Debug, Clone)]
pub struct HistorySource {
    pub store: Option<Arc<OnceCell<Arc<dyn Store>>>>,
    pub permits: Arc<Semaphore>,
}

impl HistorySource {
    pub fn new(store: Option<Arc<OnceCell<Arc<dyn Store>>>>) -> Self {
        Self {
            store,
            permits: Arc::new(Semaphore::new(CONCURRENT)),
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct HistoryParams {
    user: Option<String>,
    /// `7d`, `12h`, or an RFC 3339 time; default 30 days.
    since: Option<String>,
}

/// `GET /history?user=ID|UPN|ADDRESS[&since=7d]`.
pub async fn user_history(
    State(state): State<super::AdminState>,
    Query(params): Query<HistoryParams>,
) -> Response {
    let now = Utc::now();
    let Some(user) = params
        .user
        .as_deref()
        .map(str::trim)
        .filter(|u| !u.is_empty())
    else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "`user` is required: an object id, UPN or address",
        );
    };
    if user.len() > MAX_USER_LEN || user.chars().any(char::is_control) {
        return refuse(
            StatusCode::BAD_REQUEST,
            "`user` is not an id, a UPN or an address",
        );
    }
    let since = match crate::history::parse_since(params.since.as_deref().unwrap_or("30d"), now) {
        Ok(since) => since,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, &e),
    };
    let Some(store) = state.history.store.as_ref().and_then(|s| s.get().cloned()) else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "this process has no state store open (a receiver-only role): ask a worker's admin listener",
        );
    };
    let Ok(_permit) = state.history.permits.try_acquire() else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy: try again in a moment",
        );
    };
    let query = HistoryQuery {
        user: Some(user.to_owned()),
        since: Some(since),
        limit: LIMIT,
    };
    match tokio::time::timeout(TIMEOUT, store.history(&query)).await {
        Ok(Ok(entries)) => page::html(render(user, since, &entries, now)),
        Ok(Err(error)) => {
            tracing::warn!(%error, "history page: the store could not be read");
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "the state store could not be read",
            )
        }
        Err(_) => refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "the state store did not answer in time",
        ),
    }
}

fn refuse(status: StatusCode, why: &str) -> Response {
    (status, format!("{why}\n")).into_response()
}

/// One user's page.
pub fn render(
    user: &str,
    since: DateTime<Utc>,
    entries: &[HistoryEntry],
    now: DateTime<Utc>,
) -> String {
    let mut h = page::head(&format!("history of {user}"), None);
    let _ = writeln!(
        h,
        "<h1>History of {}</h1>\n<p>Since {} · newest first · at most {LIMIT} · \
         <a href=\"/\">status page</a></p>",
        escape(user),
        when(since, now),
    );
    if entries.is_empty() {
        h.push_str("<p class=\"muted\">No decisions recorded for this user in that time.</p>\n");
    } else {
        table(&mut h, "history", entries, now, true);
    }
    h.push_str("</body></html>\n");
    h
}

/// A table of stored decisions; `detail` adds origin, writes, Proofpoint before/after and
/// the trace id (the per-user page), else each user links to its history.
pub fn table(h: &mut String, id: &str, entries: &[HistoryEntry], now: DateTime<Utc>, detail: bool) {
    let _ = write!(
        h,
        "<table id=\"{id}\"><tr><th>When</th><th>User</th><th>Result</th><th>Decision</th>\
         <th>Rule / reason</th><th>Latency</th><th>Worker</th><th>Tenant</th>"
    );
    if detail {
        h.push_str(
            "<th>Origin</th><th>Writes</th><th>Proofpoint before → after</th><th>Trace</th>",
        );
    }
    h.push_str("</tr>\n");
    for e in entries {
        let user = e
            .address
            .as_deref()
            .or(e.upn.as_deref())
            .unwrap_or(e.user_id.as_str());
        let user = if detail {
            escape(user)
        } else {
            format!(
                "<a href=\"/history?user={}\">{}</a>",
                utf8_percent_encode(e.user_id.as_str(), NON_ALPHANUMERIC),
                escape(user)
            )
        };
        let result = if e.dry_run {
            format!("{} (dry run)", escape(&e.result))
        } else {
            escape(&e.result)
        };
        let class = match e.result.as_str() {
            "dead_lettered" | "held" | "identity_conflict" => " class=\"bad\"",
            _ => "",
        };
        let rule = escape(&crate::history::why(e));
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{user}</td><td{class}>{result}</td><td>{}</td><td>{rule}</td>\
             <td>{}</td><td>{}</td><td>{}</td>",
            when(e.at, now),
            escape(e.action.as_deref().unwrap_or("—")),
            e.latency_ms
                .map_or_else(|| "—".into(), |ms| format!("{ms} ms")),
            escape(&e.worker),
            escape(e.tenant_id.as_str()),
        );
        if detail {
            let writes = if e.writes.is_empty() {
                "—".to_owned()
            } else {
                e.writes
                    .iter()
                    .map(|w| escape(w))
                    .collect::<Vec<_>>()
                    .join("<br>")
            };
            let _ = write!(
                h,
                "<td>{}</td><td>{writes}</td><td>{}</td><td>{}</td>",
                escape(&e.origin),
                before_after(e),
                escape(e.trace_id.as_deref().unwrap_or("—")),
            );
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</table>\n");
}

/// `active yes → no · exempt no → yes`.
fn before_after(e: &HistoryEntry) -> String {
    let flag = |v: Option<bool>| match v {
        Some(true) => "yes",
        Some(false) => "no",
        None => "?",
    };
    format!(
        "active {} → {} · exempt {} → {}",
        flag(e.was_active),
        flag(e.is_active),
        flag(e.was_exempt),
        flag(e.is_exempt)
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ids::{TenantId, UserId};

    const HOSTILE: &str = "<script>alert(1)</script>\"'&";

    pub(crate) fn entry(now: DateTime<Utc>) -> HistoryEntry {
        HistoryEntry {
            at: now - chrono::Duration::hours(30),
            tenant_id: TenantId::new("tenant-1"),
            user_id: UserId::new("0b5e3a4c-1111-4222-8333-944445555666"),
            upn: Some("alice@contoso.test".into()),
            address: Some(format!("{HOSTILE}@contoso.test")),
            origin: "notification".into(),
            result: "applied".into(),
            action: Some("deactivate".into()),
            rule: Some("mirror".into()),
            reason: HOSTILE.into(),
            writes: vec!["is_active true → false".into()],
            was_active: Some(true),
            is_active: Some(false),
            was_exempt: Some(false),
            is_exempt: Some(false),
            dry_run: false,
            latency_ms: Some(42),
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
            worker: "host-a:4242".into(),
        }
    }

    #[test]
    fn a_users_page_says_what_was_decided_written_and_by_whom_escaped() {
        let now = Utc::now();
        let since = now - chrono::Duration::days(7);
        let html = render("alice@contoso.test", since, &[entry(now)], now);
        assert!(!html.contains("<script"), "{html}");
        for expected in [
            "History of alice@contoso.test",
            "<td>deactivate</td>",
            "mirror: &lt;script&gt;",
            "is_active true → false",
            "active yes → no · exempt no → no",
            "host-a:4242",
            "notification",
            "4bf92f3577b34da6a3ce929d0e0e4736",
            "42 ms",
            "(1day 6h ago)",
        ] {
            assert!(html.contains(expected), "missing {expected:?} in {html}");
        }
        let empty = render("nobody", since, &[], now);
        assert!(empty.contains("No decisions recorded"), "{empty}");
    }

    #[test]
    fn the_status_table_links_each_user_to_its_history() {
        let now = Utc::now();
        let mut h = String::new();
        table(&mut h, "fleet", &[entry(now)], now, false);
        assert!(
            h.contains("<a href=\"/history?user=0b5e3a4c%2D1111%2D4222%2D8333%2D944445555666\">"),
            "{h}"
        );
        assert!(!h.contains("<script"), "{h}");
    }
}
