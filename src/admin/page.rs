//! The status page: one server-rendered HTML document, readable without JavaScript (it
//! refreshes itself with a meta tag), built from a [`Snapshot`].
//!
//! User ids, addresses, rule names and error texts reach this page from Graph, Proofpoint
//! and the bus, so they are attacker-influenced: every value goes through [`escape`], and
//! the admin listener serves the page with a CSP that forbids scripts.

use std::fmt::Write as _;
use std::time::Duration;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};

use crate::store::HistoryEntry;
use crate::telemetry::status::{Decision, Snapshot, TenantHealth};

/// Seconds between the page's own refreshes.
const REFRESH_SECS: u32 = 10;

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5rem;color:#1a1a1a}\
table{border-collapse:collapse;margin-bottom:1rem}\
th,td{border:1px solid #bbb;padding:.25rem .6rem;text-align:left;vertical-align:top}\
th{background:#eee}.ok{color:#05632b}.bad{color:#b00020;font-weight:bold}\
.muted{color:#666}";

/// HTML-escape a value for text and attribute positions.
pub fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The document's head and the opening `<body>`, refreshing itself every `refresh` seconds.
pub(super) fn head(title: &str, refresh: Option<u32>) -> String {
    let refresh = refresh.map_or_else(String::new, |secs| {
        format!("<meta http-equiv=\"refresh\" content=\"{secs}\">")
    });
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">{refresh}\
         <title>flagrelay {}</title><style>{STYLE}</style></head><body>\n",
        escape(title)
    )
}

/// An HTML answer, with a CSP that forbids scripts and framing outright.
pub(super) fn html(body: String) -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
                ),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        body,
    )
        .into_response()
}

/// The whole page.
pub fn render(s: &Snapshot, role: &str, now: DateTime<Utc>) -> String {
    let mut h = head("status", Some(REFRESH_SECS));
    let _ = write!(
        h,
        "<h1>flagrelay status</h1>\n<p>Role: {} · Leader: {} · Version {} · {}</p>\n",
        escape(role),
        if s.leader { "yes" } else { "no" },
        env!("CARGO_PKG_VERSION"),
        when(now, now),
    );
    readiness(&mut h, s, now);
    queues(&mut h, s);
    breaker(&mut h, s, now);
    tenants(&mut h, s, now);
    match &s.fleet {
        Some(fleet) => fleet_decisions(&mut h, fleet, now),
        None => decisions(&mut h, &s.recent, now),
    }
    h.push_str("</body></html>\n");
    h
}

fn readiness(h: &mut String, s: &Snapshot, now: DateTime<Utc>) {
    h.push_str("<h2>Readiness</h2>\n");
    let Some(r) = &s.readiness else {
        h.push_str("<p class=\"muted\">Not checked yet.</p>\n");
        return;
    };
    let _ = writeln!(
        h,
        "<table id=\"readiness\"><tr><th>Check</th><th>State</th><th>Detail</th></tr>"
    );
    for c in &r.checks {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td class=\"{}\">{}</td><td>{}</td></tr>",
            escape(c.name),
            if c.ok { "ok" } else { "bad" },
            if c.ok { "ok" } else { "FAILING" },
            escape(&c.detail),
        );
    }
    let _ = writeln!(
        h,
        "</table><p class=\"muted\">Checked {}.</p>",
        when(r.checked_at, now)
    );
}

fn queues(h: &mut String, s: &Snapshot) {
    h.push_str("<h2>Queues</h2>\n");
    match &s.depths {
        Some(d) => {
            let class = if d.dead_letter > 0 { "bad" } else { "ok" };
            let _ = writeln!(
                h,
                "<p id=\"dead-letters\">Dead letters: <strong class=\"{class}\">{}</strong></p>\n\
                 <p>Work queues: {} ready · Retry tiers: {} waiting</p>",
                d.dead_letter, d.work, d.retry,
            );
        }
        None => h.push_str(
            "<p id=\"dead-letters\">Dead letters: <strong class=\"muted\">unknown</strong> \
             (the broker could not be asked)</p>\n",
        ),
    }
}

fn breaker(h: &mut String, s: &Snapshot, now: DateTime<Utc>) {
    h.push_str("<h2>Blast-radius breaker</h2>\n<p id=\"breaker\">Breaker: ");
    match &s.breaker {
        Some(b) => match &b.tripped {
            None => h.push_str("<strong class=\"ok\">closed</strong> (deactivations flow)"),
            Some((at, reason)) => {
                let _ = write!(
                    h,
                    "<strong class=\"bad\">TRIPPED</strong> {}: {} — deactivations are held \
                     until an operator runs <code>flagrelay breaker release</code>",
                    when(*at, now),
                    escape(reason),
                );
            }
        },
        None => h.push_str("<strong class=\"muted\">unknown</strong> (not read by this process)"),
    }
    h.push_str("</p>\n");
}

fn tenants(h: &mut String, s: &Snapshot, now: DateTime<Utc>) {
    h.push_str("<h2>Tenants</h2>\n");
    if s.tenants.is_empty() {
        h.push_str(if s.leader {
            "<p class=\"muted\">No subscription or delta round finished yet.</p>\n"
        } else {
            "<p class=\"muted\">Subscriptions and delta polling run in the leader; this \
             process does not lead. Open the leader's status page.</p>\n"
        });
        return;
    }
    h.push_str(
        "<table id=\"tenants\"><tr><th>Tenant</th><th>Subscription</th>\
         <th>Last delta sync</th></tr>\n",
    );
    for (tenant, t) in &s.tenants {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(tenant),
            subscription_cell(t, now),
            delta_cell(t, now),
        );
    }
    h.push_str("</table>\n");
}

fn subscription_cell(t: &TenantHealth, now: DateTime<Utc>) -> String {
    let Some(sub) = &t.subscription else {
        return "<span class=\"muted\">not checked yet</span>".into();
    };
    let mut cell = match (&sub.id, sub.expires) {
        (Some(id), Some(expires)) if expires > now => format!(
            "<span class=\"ok\">active</span> {}, expires {}",
            escape(id),
            when(expires, now)
        ),
        (Some(id), Some(expires)) => format!(
            "<span class=\"bad\">EXPIRED</span> {}, {}",
            escape(id),
            when(expires, now)
        ),
        _ => "<span class=\"bad\">none</span>".into(),
    };
    if let Some(e) = &sub.error {
        let _ = write!(
            cell,
            "<br><span class=\"bad\">last check failed:</span> {}",
            escape(e)
        );
    }
    cell
}

fn delta_cell(t: &TenantHealth, now: DateTime<Utc>) -> String {
    let Some(d) = &t.delta else {
        return "<span class=\"muted\">no round yet</span>".into();
    };
    let mut cell = match d.last_success {
        Some(at) => when(at, now),
        None => "<span class=\"bad\">never succeeded</span>".into(),
    };
    if let Some(e) = &d.error {
        let _ = write!(
            cell,
            "<br><span class=\"bad\">last round failed:</span> {}",
            escape(e)
        );
    }
    cell
}

/// Every worker's newest decisions, from the state store; each user links to its history.
fn fleet_decisions(h: &mut String, fleet: &[HistoryEntry], now: DateTime<Utc>) {
    h.push_str(
        "<h2>Recent decisions</h2>\n<p class=\"muted\">Of every worker, from the state store. \
         A user's whole history: <code>/history?user=ID|UPN|ADDRESS</code> or \
         <code>flagrelay history --user …</code>.</p>\n",
    );
    if fleet.is_empty() {
        h.push_str("<p class=\"muted\">None recorded yet.</p>\n");
        return;
    }
    super::history::table(h, "decisions", fleet, now, false);
}

/// This process's own newest decisions: what is left when the store was not read.
fn decisions(h: &mut String, recent: &[Decision], now: DateTime<Utc>) {
    h.push_str(
        "<h2>Recent decisions</h2>\n<p class=\"muted\">Of this process only: the state \
         store was not read (a receiver-only role, or the store does not answer).</p>\n",
    );
    if recent.is_empty() {
        h.push_str("<p class=\"muted\">None since this process started.</p>\n");
        return;
    }
    h.push_str(
        "<table id=\"decisions\"><tr><th>When</th><th>User</th><th>Result</th>\
         <th>Decision</th><th>Rule</th><th>Latency</th><th>Tenant</th></tr>\n",
    );
    for d in recent {
        let result = if d.dry_run {
            format!("{} (dry run)", escape(&d.result))
        } else {
            escape(&d.result)
        };
        let class = match d.result.as_str() {
            "dead_lettered" | "held" => " class=\"bad\"",
            _ => "",
        };
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td{class}>{result}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td></tr>",
            when(d.at, now),
            escape(&d.user),
            escape(d.action.as_deref().unwrap_or("—")),
            escape(&d.rule),
            d.latency.map_or_else(|| "—".into(), latency),
            escape(&d.tenant_id),
        );
    }
    h.push_str("</table>\n");
}

/// `2026-11-23 10:00:01 UTC (12s ago)` / `(in 3d)`.
pub(super) fn when(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let stamp = at.format("%Y-%m-%d %H:%M:%S UTC");
    let delta = now - at;
    let (secs, future) = if delta < chrono::Duration::zero() {
        (-delta.num_seconds(), true)
    } else {
        (delta.num_seconds(), false)
    };
    if secs == 0 {
        return format!("{stamp}");
    }
    let span = humantime::format_duration(Duration::from_secs(secs.unsigned_abs()))
        .to_string()
        .split(' ')
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    if future {
        format!("{stamp} (in {span})")
    } else {
        format!("{stamp} ({span} ago)")
    }
}

fn latency(d: Duration) -> String {
    if d < Duration::from_secs(10) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::Depths;
    use crate::telemetry::status::{
        BreakerView, Check, DeltaHealth, Readiness, SubscriptionHealth,
    };

    const HOSTILE: &str = "<script>alert(1)</script>\"'&";

    fn snapshot(now: DateTime<Utc>) -> Snapshot {
        let mut s = Snapshot {
            leader: true,
            readiness: Some(Readiness {
                checked_at: now,
                checks: vec![
                    Check {
                        name: "broker",
                        ok: true,
                        detail: "ok".into(),
                    },
                    Check {
                        name: "graph",
                        ok: false,
                        detail: format!("tenant t: {HOSTILE}"),
                    },
                ],
            }),
            breaker: Some(BreakerView {
                tripped: Some((now - chrono::Duration::minutes(5), HOSTILE.into())),
            }),
            depths: Some(Depths {
                work: 4,
                retry: 1,
                dead_letter: 2,
            }),
            ..Snapshot::default()
        };
        s.tenants.insert(
            "tenant-1".into(),
            TenantHealth {
                subscription: Some(SubscriptionHealth {
                    checked_at: Some(now),
                    id: Some("sub-1".into()),
                    expires: Some(now + chrono::Duration::days(20)),
                    error: None,
                }),
                delta: Some(DeltaHealth {
                    last_attempt: Some(now),
                    last_success: Some(now - chrono::Duration::seconds(30)),
                    error: Some(HOSTILE.into()),
                }),
            },
        );
        s.recent.push(Decision {
            at: now,
            tenant_id: "tenant-1".into(),
            user: format!("{HOSTILE}@example.com"),
            result: "applied".into(),
            action: Some("deactivate".into()),
            rule: HOSTILE.into(),
            latency: Some(Duration::from_millis(420)),
            dry_run: false,
        });
        s
    }

    #[test]
    fn every_attacker_influenced_value_is_escaped() {
        let now = Utc::now();
        let html = render(&snapshot(now), "run", now);
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("alert(1)</script>"), "{html}");
        assert!(
            html.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;&amp;@example.com"),
            "{html}"
        );
    }

    #[test]
    fn the_page_shows_what_an_operator_needs() {
        let now = Utc::now();
        let html = render(&snapshot(now), "run", now);
        for expected in [
            "Leader: yes",
            "Dead letters: <strong class=\"bad\">2</strong>",
            "Work queues: 4 ready",
            "<strong class=\"bad\">TRIPPED</strong>",
            "sub-1, expires",
            "(in 20days)",
            "(30s ago)",
            "<td>deactivate</td>",
            "420 ms",
            "FAILING",
        ] {
            assert!(html.contains(expected), "missing {expected:?} in {html}");
        }
    }

    #[test]
    fn the_decisions_of_every_worker_come_from_the_store_when_it_was_read() {
        let now = Utc::now();
        let mut s = snapshot(now);
        s.fleet = Some(vec![crate::admin::history::tests::entry(now)]);
        let html = render(&s, "work", now);
        assert!(
            html.contains("Of every worker, from the state store"),
            "{html}"
        );
        assert!(html.contains("host-a:4242"), "{html}");
        assert!(html.contains("/history?user="), "{html}");
        assert!(!html.contains("<script"), "{html}");
        let html = render(&snapshot(now), "work", now);
        assert!(html.contains("Of this process only"), "{html}");
    }

    #[test]
    fn unknowns_are_said_not_guessed() {
        let now = Utc::now();
        let html = render(&Snapshot::default(), "serve", now);
        assert!(html.contains("Not checked yet."), "{html}");
        assert!(
            html.contains("Dead letters: <strong class=\"muted\">unknown"),
            "{html}"
        );
        assert!(
            html.contains("Breaker: <strong class=\"muted\">unknown"),
            "{html}"
        );
        assert!(html.contains("this process does not lead"), "{html}");
        assert!(html.contains("None since this process started."), "{html}");
    }
}
