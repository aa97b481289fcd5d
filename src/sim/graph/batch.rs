//! JSON batching: `POST /v1.0/$batch` with up to 20 requests, each answered as if sent on
//! its own.
//!
//! As in Graph:
//! - the batch needs a valid token; then each request passes the gate with the batch's
//!   token, as a request of its own: permissions, injected throttling and failures
//!   (`throttle_next`, `fail_next` count the batch's requests, not the batch), 404s are per
//!   request, in its `status`, `headers` (`Retry-After`) and `body`;
//! - the batch answers 200 whatever its requests' statuses; a malformed batch (no
//!   `requests`, more than 20, a request without `id`, `method` or `url`, duplicate ids, a
//!   nested `$batch`, an absolute URL) is one 400;
//! - the requests run concurrently and the answers come back in an order of their own
//!   (shuffled with the simulator's seeded generator): match them by `id`.
//!
//! The batch's injected latency stands for the one round trip; its requests add none.
//! `dependsOn` is not simulated (refused with 400), nor are request bodies (reads only).
//! Each request is recorded in the request log with [`super::RequestRecord::in_batch`].

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use rand::seq::SliceRandom;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tower::ServiceExt;

use super::GraphSim;
use super::api::{self, ApiError, admit};

/// Graph's limit of requests in one batch.
pub const MAX_BATCH_REQUESTS: usize = 20;

tokio::task_local! {
    /// Set while a batch's requests run: they add no latency of their own and are logged as
    /// part of the batch.
    static IN_BATCH: ();
}

/// Whether the current task is serving a request inside a batch.
pub(super) fn in_batch() -> bool {
    IN_BATCH.try_with(|_| ()).is_ok()
}

pub(super) fn routes() -> Router<GraphSim> {
    Router::new().route("/v1.0/$batch", post(batch))
}

#[derive(Deserialize)]
struct BatchBody {
    requests: Vec<SubRequest>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SubRequest {
    id: String,
    method: String,
    url: String,
    #[serde(default)]
    headers: Map<String, Value>,
    #[serde(default)]
    depends_on: Option<Value>,
    #[serde(default)]
    body: Option<Value>,
}

async fn batch(State(sim): State<GraphSim>, headers: HeaderMap, body: Bytes) -> Response {
    let caller = match admit(&sim, &headers).await {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let requests = match parse(&body) {
        Ok(r) => r,
        Err(e) => return caller.respond(Err(e)),
    };
    // The batch's requests go through the same routes (and request log) as any other.
    let inner = api::api_routes()
        .layer(axum::middleware::from_fn_with_state(
            sim.clone(),
            api::log_request,
        ))
        .with_state(sim.clone());
    let run = requests.into_iter().map(|r| {
        let inner = inner.clone();
        let outer = headers.clone();
        async move {
            let id = r.id.clone();
            let answer = match sub_request(&r, &outer) {
                Ok(req) => match inner.oneshot(req).await {
                    Ok(resp) => render(resp).await,
                    Err(never) => match never {},
                },
                Err(e) => render(e.into_response()).await,
            };
            (id, answer)
        }
    });
    let mut answers: Vec<Value> = IN_BATCH
        .scope((), futures::future::join_all(run))
        .await
        .into_iter()
        .map(|(id, mut answer)| {
            answer.insert("id".into(), Value::String(id));
            Value::Object(answer)
        })
        .collect();
    answers.shuffle(&mut sim.state().rng);
    caller.respond(Ok((
        StatusCode::OK,
        axum::Json(json!({ "responses": answers })),
    )
        .into_response()))
}

/// The batch's requests, or why the batch as a whole is refused.
fn parse(body: &[u8]) -> Result<Vec<SubRequest>, ApiError> {
    let batch: BatchBody = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "Invalid batch payload format: every request needs id, method and url ({e})."
        ))
    })?;
    if batch.requests.is_empty() {
        return Err(ApiError::bad_request("The batch holds no requests."));
    }
    if batch.requests.len() > MAX_BATCH_REQUESTS {
        return Err(ApiError::bad_request(format!(
            "A batch may hold at most {MAX_BATCH_REQUESTS} requests; this one holds {}.",
            batch.requests.len()
        )));
    }
    let mut seen = std::collections::HashSet::new();
    for r in &batch.requests {
        if r.id.trim().is_empty() || !seen.insert(r.id.as_str()) {
            return Err(ApiError::bad_request(format!(
                "Request ids must be unique and not empty; {:?} is not.",
                r.id
            )));
        }
        if r.depends_on.is_some() {
            return Err(ApiError::bad_request(
                "dependsOn is not simulated (flagrelay's batches are independent reads).",
            ));
        }
        let path = r.url.trim_start_matches('/');
        if r.url.contains("://") || path.starts_with("$batch") {
            return Err(ApiError::bad_request(format!(
                "The url of request {:?} must be relative to the version and not a batch.",
                r.id
            )));
        }
    }
    Ok(batch.requests)
}

/// One of the batch's requests as an HTTP request of its own, with the batch's token.
fn sub_request(r: &SubRequest, outer: &HeaderMap) -> Result<Request<Body>, ApiError> {
    if r.body.is_some() || !r.method.eq_ignore_ascii_case("GET") {
        return Err(ApiError::bad_request(format!(
            "The simulator batches reads only (GET without a body); request {:?} is {}.",
            r.id, r.method
        )));
    }
    let uri = format!("/v1.0/{}", r.url.trim_start_matches('/'));
    let mut req = Request::builder().method("GET").uri(&uri);
    for name in [header::AUTHORIZATION, header::HOST] {
        if let Some(v) = outer.get(&name) {
            req = req.header(name, v);
        }
    }
    for (name, value) in &r.headers {
        if let Some(v) = value.as_str() {
            req = req.header(name.as_str(), v);
        }
    }
    req.body(Body::empty())
        .map_err(|e| ApiError::bad_request(format!("Invalid request {:?}: {e}.", r.id)))
}

/// An HTTP answer as a batch response entry: `status`, `headers`, `body`.
async fn render(resp: Response) -> Map<String, Value> {
    let status = resp.status().as_u16();
    let mut headers = Map::new();
    for name in [header::CONTENT_TYPE, header::RETRY_AFTER] {
        if let Some(v) = resp.headers().get(&name).and_then(|v| v.to_str().ok()) {
            headers.insert(name.to_string(), Value::String(v.to_owned()));
        }
    }
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap_or_default();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    let mut out = Map::new();
    out.insert("status".into(), Value::from(status));
    out.insert("headers".into(), Value::Object(headers));
    if !bytes.is_empty() {
        out.insert("body".into(), body);
    }
    out
}
