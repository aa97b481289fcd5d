//! The webhook receiver: Graph's validation handshake, and change/lifecycle notification
//! collections turned into signed messages on the queue.
//!
//! The request path does no Graph or Proofpoint IO: it parses, authenticates each item by its
//! `clientState` (constant time), signs, publishes with publisher confirms, and answers `202`
//! only when every valid item is durably queued. Anything the broker does not confirm turns
//! the whole batch into `503 Retry-After`, and Graph delivers it again (duplicates are
//! harmless downstream). Items with a wrong `clientState` or an unknown tenant are dropped
//! and counted, and the batch still gets `202`, so a prober learns nothing.
//!
//! Publishes awaiting a confirm are bounded (`receiver.max_in_flight`): a batch that does not
//! fit is answered `503 Retry-After` at once, so an overloaded receiver answers early rather
//! than slowly (Graph drops endpoints that take more than 3 s).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::Utc;
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::message::{
    self, Encoded, Message, Origin, Signer, SubscriptionLifecycle, TraceContext, UserChanged,
};
use crate::notification::{self, ItemError};
use crate::queue::Queue;
use crate::telemetry::Metrics;

/// Longest validation token echoed back; Graph's are a few hundred characters.
const MAX_VALIDATION_TOKEN: usize = 1024;

/// Everything a request handler needs; cheap to clone.
#[derive(Clone)]
pub struct ReceiverState {
    client_state: SecretString,
    /// Lower-cased configured tenant ids.
    tenants: Arc<HashSet<String>>,
    queue: Arc<dyn Queue>,
    signer: Signer,
    metrics: Arc<Metrics>,
    max_items: usize,
    retry_after: Duration,
    /// Permits for items awaiting the broker's confirm (`receiver.max_in_flight`).
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
}

impl std::fmt::Debug for ReceiverState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiverState")
            .field("tenants", &self.tenants)
            .finish_non_exhaustive()
    }
}

/// Settings of the receiver not owned by other parts.
#[derive(Debug, Clone)]
pub struct ReceiverSettings {
    pub max_body_bytes: usize,
    pub max_items: usize,
    pub max_in_flight: usize,
    pub retry_after: Duration,
    pub request_timeout: Duration,
}

impl ReceiverState {
    pub fn new(
        client_state: SecretString,
        tenants: impl IntoIterator<Item = String>,
        queue: Arc<dyn Queue>,
        signer: Signer,
        metrics: Arc<Metrics>,
        settings: &ReceiverSettings,
    ) -> Self {
        Self {
            client_state,
            tenants: Arc::new(
                tenants
                    .into_iter()
                    .map(|t| t.to_ascii_lowercase())
                    .collect(),
            ),
            queue,
            signer,
            metrics,
            max_items: settings.max_items,
            retry_after: settings.retry_after,
            in_flight: Arc::new(Semaphore::new(settings.max_in_flight)),
            max_in_flight: settings.max_in_flight,
        }
    }
}

/// The receiver's routes: `/graph/notifications`, `/graph/lifecycle`, and `/healthz` and
/// `/readyz` for load balancers. Nothing else: this listener faces Graph and the internet;
/// metrics and the status page live on the admin listener (`crate::admin`).
pub fn router(state: ReceiverState, settings: &ReceiverSettings) -> Router {
    Router::new()
        .route("/graph/notifications", post(notifications))
        .route("/graph/lifecycle", post(lifecycle))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .layer(DefaultBodyLimit::max(settings.max_body_bytes))
        // Slow or stalled clients are cut off instead of holding a connection forever.
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            settings.request_timeout,
        ))
        .with_state(state)
}

/// Serve `router` on `listener` until `shutdown`; then stop accepting and let the requests in
/// flight finish (for at most `drain`).
///
/// This is `axum::serve` plus what a listener facing the internet needs: a client that has not
/// sent its request headers within `header_timeout` is disconnected (a slow or stalled
/// client, deliberate or not, holds a connection and a task only that long). Bodies are
/// bounded by the router's own timeout.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    header_timeout: Duration,
    drain: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;

    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of file descriptors and the like: pause rather than spin.
                Err(error) => {
                    tracing::warn!(%error, "could not accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let connection = builder
            .serve_connection_with_upgrades(
                TokioIo::new(stream),
                TowerToHyperService::new(router.clone()),
            )
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(error = %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?drain,
            "requests still in flight at the shutdown deadline; closing"
        );
    }
}

/// Why a request was refused, mapped to a status in one place.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("validationToken is empty, too long, or contains markup or control characters")]
    BadValidationToken,
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    #[error("request body is empty")]
    EmptyBody,
    #[error("request body is not a notification collection: {0}")]
    BadCollection(#[from] notification::CollectionError),
    #[error("collection has {0} items; the limit is {1}")]
    TooManyItems(usize, usize),
    #[error("queue unavailable; retry later")]
    Unavailable(Duration),
    #[error("too many notifications being queued at once; retry later")]
    Saturated(Duration),
}

impl IntoResponse for WebhookError {
    fn into_response(self) -> Response {
        let status = match &self {
            Self::BadValidationToken | Self::EmptyBody | Self::BadCollection(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::TooManyItems(..) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unavailable(_) | Self::Saturated(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        let mut resp = (status, self.to_string()).into_response();
        if let Self::Unavailable(after) | Self::Saturated(after) = self {
            let secs = after.as_secs().max(1).to_string();
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_str(&secs).expect("digits"),
            );
        }
        resp
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Change,
    Lifecycle,
}

async fn notifications(
    State(state): State<ReceiverState>,
    query: RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, WebhookError> {
    handle(state, Kind::Change, query, headers, body).await
}

async fn lifecycle(
    State(state): State<ReceiverState>,
    query: RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, WebhookError> {
    handle(state, Kind::Lifecycle, query, headers, body).await
}

async fn handle(
    state: ReceiverState,
    kind: Kind,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, WebhookError> {
    if let Some(token) = validation_token(query.as_deref()) {
        return handshake(&state, token);
    }
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(WebhookError::UnsupportedMediaType);
    }
    // Saturated: refuse before spending CPU on parsing and signing.
    if state.in_flight.available_permits() == 0 {
        return Err(state.saturated(0));
    }
    let span = tracing::info_span!(
        "notifications",
        items = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    // Continue the caller's trace when Graph or a proxy sent a valid `traceparent`, else
    // start one; every message of the batch carries it to the worker.
    let incoming = headers
        .get(message::TRACEPARENT_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse);
    let trace = crate::otlp::continue_trace(&span, incoming);
    let encoded = state.prepare(kind, &body, &trace)?;
    span.record("items", encoded.len());
    publish_batch(&state, &encoded).instrument(span).await
}

/// Publish the signed messages of one collection; `202` only when every one is confirmed.
async fn publish_batch(
    state: &ReceiverState,
    encoded: &[Encoded],
) -> Result<Response, WebhookError> {
    // Held until every publish of the batch is settled. A batch larger than the whole budget
    // takes all of it rather than never fitting.
    let wanted = u32::try_from(encoded.len().min(state.max_in_flight)).unwrap_or(u32::MAX);
    let Ok(_permits) = state.in_flight.clone().try_acquire_many_owned(wanted) else {
        return Err(state.saturated(encoded.len()));
    };
    let results = futures::future::join_all(encoded.iter().map(|e| async {
        let started = std::time::Instant::now();
        let result = state.queue.publish(e).await;
        if result.is_ok() {
            state
                .metrics
                .publish_confirm_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        result
    }))
    .await;
    let failures: Vec<_> = results.into_iter().filter_map(Result::err).collect();
    if let Some(first) = failures.first() {
        Metrics::inc(&state.metrics.webhook_unavailable_total);
        tracing::warn!(
            error = %first,
            failed = failures.len(),
            items = encoded.len(),
            "could not durably enqueue the batch; answering 503 so Graph retries"
        );
        return Err(WebhookError::Unavailable(state.retry_after));
    }
    state
        .metrics
        .notifications_enqueued_total
        .inc_by(encoded.len() as u64);
    for e in encoded {
        tracing::debug!(message_id = %e.id, shard_key = %e.shard_key, "enqueued");
    }
    Ok(StatusCode::ACCEPTED.into_response())
}

impl ReceiverState {
    /// Everything the webhook does to a notification collection before publishing: parse,
    /// authenticate each item, build and sign the envelopes. No IO.
    fn prepare(
        &self,
        kind: Kind,
        body: &[u8],
        trace: &TraceContext,
    ) -> Result<Vec<Encoded>, WebhookError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err(WebhookError::EmptyBody);
        }
        let items = notification::parse_collection(body)?;
        if items.len() > self.max_items {
            return Err(WebhookError::TooManyItems(items.len(), self.max_items));
        }
        let received_at = Utc::now();
        let messages: Vec<Message> = items
            .iter()
            .filter_map(|item| {
                Metrics::inc(&self.metrics.notifications_received_total);
                let parsed = match kind {
                    Kind::Change => notification::parse_change(item).map(|n| {
                        let m = Message::UserChanged(UserChanged {
                            tenant_id: n.tenant_id.into(),
                            user_id: n.user_id.into(),
                            change_type: n.change_type,
                            subscription_id: n.subscription_id,
                            event_time: n.event_time,
                            received_at,
                            origin: Origin::Notification,
                            not_before: None,
                        });
                        (m, n.client_state)
                    }),
                    Kind::Lifecycle => notification::parse_lifecycle(item).map(|n| {
                        let m = Message::Lifecycle(SubscriptionLifecycle {
                            tenant_id: n.tenant_id.into(),
                            subscription_id: n.subscription_id,
                            lifecycle_event: n.lifecycle_event,
                            subscription_expiration: n.subscription_expiration,
                            received_at,
                        });
                        (m, n.client_state)
                    }),
                };
                self.admit(parsed)
            })
            .collect();
        Ok(messages
            .iter()
            .map(|m| message::encode_traced(m, &self.signer, trace))
            .collect())
    }

    /// Count and answer a batch refused because `receiver.max_in_flight` items are being
    /// published.
    fn saturated(&self, items: usize) -> WebhookError {
        Metrics::inc(&self.metrics.webhook_saturated_total);
        tracing::debug!(
            items,
            "receiver saturated (receiver.max_in_flight); answering 503 at once"
        );
        WebhookError::Saturated(self.retry_after)
    }

    /// [`ReceiverState::prepare`] of a change-notification collection, for the
    /// micro-benchmarks (`benches/`).
    pub fn prepare_changes(&self, body: &[u8]) -> Result<Vec<Encoded>, WebhookError> {
        self.prepare(Kind::Change, body, &TraceContext::new_root())
    }
}

impl ReceiverState {
    /// Authenticate one parsed item: known tenant and matching clientState, or dropped.
    fn admit(&self, parsed: Result<(Message, Option<String>), ItemError>) -> Option<Message> {
        let (message, client_state) = match parsed {
            Ok(p) => p,
            Err(error) => {
                Metrics::inc(&self.metrics.notifications_dropped_malformed_total);
                tracing::warn!(%error, "dropping a notification item that could not be parsed");
                return None;
            }
        };
        let expected = self.client_state.expose_secret().as_bytes();
        let given = client_state.as_deref().unwrap_or("").as_bytes();
        if !bool::from(expected.ct_eq(given)) {
            Metrics::inc(&self.metrics.notifications_dropped_client_state_total);
            tracing::warn!(
                tenant_id = %message.tenant_id(),
                subject = %message.subject(),
                "dropping a notification item whose clientState does not match (forged or stale subscription)"
            );
            return None;
        }
        if !self
            .tenants
            .contains(&message.tenant_id().to_ascii_lowercase())
        {
            Metrics::inc(&self.metrics.notifications_dropped_unknown_tenant_total);
            tracing::warn!(tenant_id = %message.tenant_id(), "dropping a notification item for a tenant that is not configured");
            return None;
        }
        Some(message)
    }
}

fn validation_token(query: Option<&str>) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == "validationToken")
        .map(|(_, v)| v.into_owned())
}

fn handshake(state: &ReceiverState, token: String) -> Result<Response, WebhookError> {
    let acceptable = !token.is_empty()
        && token.len() <= MAX_VALIDATION_TOKEN
        && !token
            .chars()
            .any(|c| c.is_control() || matches!(c, '<' | '>'));
    if !acceptable {
        tracing::warn!(
            len = token.len(),
            "refusing a validation token with markup, control characters or absurd length"
        );
        return Err(WebhookError::BadValidationToken);
    }
    Metrics::inc(&state.metrics.handshakes_total);
    tracing::info!("answering Graph validation handshake");
    Ok((
        StatusCode::OK,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        token,
    )
        .into_response())
}

/// Ready when the broker takes messages, as the admin probe last found (cached: a load
/// balancer's probes never open broker connections). The admin listener's `/readyz` has the
/// full picture.
async fn readyz(State(state): State<ReceiverState>) -> Response {
    if state.metrics.broker_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "queue not reachable").into_response()
    }
}
