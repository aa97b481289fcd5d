//! The admin listener: `/healthz`, `/readyz`, Prometheus `/metrics` and the status page `/`,
//! for operators and their monitoring — never on the public webhook listener, which Graph
//! (and so anyone on the internet) reaches.
//!
//! Nothing here does IO per request. Readiness (broker connected, Graph token obtainable,
//! Proofpoint credentials accepted), queue depths and the breaker are checked by the
//! [`probe::Probe`] on an interval and cached in [`Metrics::status`]; a scrape or a load
//! balancer hammering `/readyz` costs a lock and a copy.
//!
//! - [`probe`]: the background checks.
//! - [`page`]: the server-rendered status page (no JavaScript; every value escaped).
//! - [`history`]: decisions from the store: every worker's on the page, one user's at
//!   `/history?user=…` (the one route that reads the store per request, bounded).

pub mod history;
pub mod page;
pub mod probe;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::telemetry::Metrics;

/// Content type of `prometheus-client`'s text encoding.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the admin routes read.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    /// `serve`, `work` or `run`: shown on the page.
    pub role: &'static str,
    /// What `/history` reads.
    pub history: history::HistorySource,
}

/// The admin routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/history", get(history::user_history))
        .with_state(state)
}

/// Serve the admin routes on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// 200 when every check of the last round passed, else 503; the body names each check and,
/// for a failed one, what failed. 503 "not checked yet" until the first round is done.
async fn readyz(State(state): State<AdminState>) -> Response {
    let Some(readiness) = state.metrics.status.readiness() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "not checked yet\n").into_response();
    };
    let mut body = String::new();
    for c in &readiness.checks {
        let verdict = if c.ok { "ok" } else { "FAIL" };
        body.push_str(&format!("{}: {verdict}", c.name));
        if !c.ok {
            body.push_str(&format!(" ({})", c.detail));
        }
        body.push('\n');
    }
    body.push_str(&format!(
        "checked at {}\n",
        readiness.checked_at.to_rfc3339()
    ));
    let status = if readiness.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body).into_response()
}

async fn metrics(State(state): State<AdminState>) -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS))],
        state.metrics.render(),
    )
        .into_response()
}

async fn status_page(State(state): State<AdminState>) -> Response {
    page::html(page::render(
        &state.metrics.status.snapshot(),
        state.role,
        chrono::Utc::now(),
    ))
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;
    use crate::telemetry::status::{Check, Readiness};

    async fn get_path(state: &AdminState, path: &str) -> (StatusCode, String, String) {
        let resp = router(state.clone())
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let ct = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, ct, String::from_utf8(body.to_vec()).unwrap())
    }

    fn state() -> AdminState {
        AdminState {
            metrics: Arc::new(Metrics::default()),
            role: "run",
            history: history::HistorySource::new(None),
        }
    }

    #[tokio::test]
    async fn readyz_answers_from_the_cache_and_names_the_failing_check() {
        let s = state();
        let (status, _, body) = get_path(&s, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("not checked yet"), "{body}");

        let check = |name, ok, detail: &str| Check {
            name,
            ok,
            detail: detail.into(),
        };
        s.metrics.set_readiness(Readiness {
            checked_at: chrono::Utc::now(),
            checks: vec![
                check("broker", true, "ok"),
                check(
                    "proofpoint",
                    false,
                    "org contoso.test: proofpoint refused the credentials",
                ),
            ],
        });
        let (status, _, body) = get_path(&s, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("broker: ok"), "{body}");
        assert!(
            body.contains("proofpoint: FAIL (org contoso.test: proofpoint refused"),
            "{body}"
        );

        s.metrics.set_readiness(Readiness {
            checked_at: chrono::Utc::now(),
            checks: vec![check("broker", true, "ok")],
        });
        let (status, _, _) = get_path(&s, "/readyz").await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn metrics_health_and_page_are_served() {
        let s = state();
        let (status, ct, body) = get_path(&s, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
        assert!(body.contains("flagrelay_notifications_received_total 0"));
        let (status, _, body) = get_path(&s, "/healthz").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
        let (status, ct, body) = get_path(&s, "/").await;
        assert_eq!(status, StatusCode::OK);
        assert!(ct.starts_with("text/html"), "{ct}");
        assert!(body.contains("<title>flagrelay"), "{body}");
    }
}
