//! `/v1.0/subscriptions` of the simulator: create (validated as Graph does for users, then
//! the real validation handshake against the subscriber), list (paged, only the caller's
//! app, never `clientState`), get, renew (`PATCH`), delete and reauthorize.
//!
//! Every route needs `User.Read.All` (or a broader directory permission) in the token.
//!
//! Deliberate difference from Graph: `http://` notification URLs are accepted, so that
//! local receivers work without TLS. Graph itself requires `https://`.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, NaiveDateTime, SubsecRound, TimeDelta, Utc};
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::{Value, json};
use url::Url;

use super::api::{ApiError, Caller, api_base, gate_with, query_option};
use super::delivery::{graph_time, handshake};
use super::permissions::READ_USERS;
use super::{GraphSim, SimSubscription, State as SimState};
use crate::graph::Subscription;

/// Longest lifetime of a users subscription (just under 29 days).
const MAX_LIFETIME_MINUTES: i64 = 41_760;
/// Shorter requested lifetimes are raised to this.
const MIN_LIFETIME_MINUTES: i64 = 45;
const MAX_CLIENT_STATE_CHARS: usize = 128;

pub(super) fn routes() -> Router<GraphSim> {
    Router::new()
        .route(
            "/v1.0/subscriptions",
            post(create_subscription).get(list_subscriptions),
        )
        .route(
            "/v1.0/subscriptions/{id}",
            get(get_subscription)
                .patch(renew_subscription)
                .delete(delete_subscription),
        )
        .route("/v1.0/subscriptions/{id}/reauthorize", post(reauthorize))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateRequest {
    change_type: Option<String>,
    notification_url: Option<String>,
    lifecycle_notification_url: Option<String>,
    resource: Option<String>,
    expiration_date_time: Option<String>,
    client_state: Option<String>,
    include_resource_data: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RenewRequest {
    expiration_date_time: Option<String>,
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("Invalid request body: {e}")))
}

/// `updated` and/or `deleted`, normalised (sorted, deduplicated) for conflict checks.
fn parse_change_type(raw: &str) -> Result<Vec<&'static str>, ApiError> {
    let mut types = Vec::new();
    for t in raw.split(',').map(str::trim) {
        let t = match t.to_ascii_lowercase().as_str() {
            "updated" => "updated",
            "deleted" => "deleted",
            other => {
                return Err(ApiError::bad_request(format!(
                    "ChangeType '{other}' is not supported for resource 'users'. Supported: updated, deleted."
                )));
            }
        };
        if !types.contains(&t) {
            types.push(t);
        }
    }
    types.sort_unstable();
    Ok(types)
}

/// `users` or `users/{id}` (case-insensitive, leading `/` allowed), normalised to lower case.
fn normalize_resource(raw: &str) -> Result<String, ApiError> {
    let r = raw.trim().trim_start_matches('/');
    let ok = match r.split_once('/') {
        None => r.eq_ignore_ascii_case("users"),
        Some((coll, id)) => {
            coll.eq_ignore_ascii_case("users") && !id.is_empty() && !id.contains(['/', '?'])
        }
    };
    if ok {
        Ok(r.to_ascii_lowercase())
    } else {
        Err(ApiError::bad_request(format!(
            "Resource '{raw}' is not supported by this simulator: use 'users' or 'users/{{id}}'."
        )))
    }
}

/// Parse and bound an `expirationDateTime` the way Graph does for users.
fn parse_expiration(raw: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, ApiError> {
    let parsed = DateTime::parse_from_rfc3339(raw.trim())
        .map(|d| d.with_timezone(&Utc))
        .or_else(|_| {
            NaiveDateTime::parse_from_str(raw.trim(), "%Y-%m-%dT%H:%M:%S%.f").map(|n| n.and_utc())
        })
        .map_err(|_| {
            ApiError::bad_request(format!(
                "expirationDateTime '{raw}' is not a valid date-time."
            ))
        })?;
    if parsed <= now {
        return Err(ApiError::bad_request(
            "Subscription expiration can only be in the future.",
        ));
    }
    if parsed > now + TimeDelta::minutes(MAX_LIFETIME_MINUTES) {
        return Err(ApiError::bad_request(format!(
            "Subscription expiration can only be {MAX_LIFETIME_MINUTES} minutes in the future."
        )));
    }
    let floor = now + TimeDelta::minutes(MIN_LIFETIME_MINUTES);
    // Graph keeps 100 ns ticks; truncating keeps round trips through its format exact.
    Ok(parsed.max(floor).trunc_subsecs(7))
}

fn parse_url(field: &str, raw: &str) -> Result<Url, ApiError> {
    let url = Url::parse(raw.trim())
        .map_err(|_| ApiError::bad_request(format!("{field} '{raw}' is not a valid URL.")))?;
    // Graph requires https; the simulator also accepts http for local receivers.
    if !matches!(url.scheme(), "https" | "http") || !url.has_host() {
        return Err(ApiError::bad_request(format!(
            "{field} must be an https URL."
        )));
    }
    Ok(url)
}

/// The subscription as Graph renders it (never with `clientState`).
fn render(sub: &SimSubscription, base: &str) -> Value {
    let s = &sub.subscription;
    json!({
        "@odata.context": format!("{base}/$metadata#subscriptions/$entity"),
        "id": s.id,
        "resource": s.resource,
        "applicationId": sub.application_id,
        "changeType": s.change_type,
        "notificationUrl": s.notification_url,
        "notificationQueryOptions": null,
        "lifecycleNotificationUrl": s.lifecycle_notification_url,
        "expirationDateTime": graph_time(s.expiration_date_time),
        "creatorId": sub.creator_id,
        "includeResourceData": null,
        "latestSupportedTlsVersion": "v1_2",
        "encryptionCertificate": null,
        "encryptionCertificateId": null,
        "notificationUrlAppId": null,
    })
}

/// Same app, same change types, same resource: Graph answers 409.
fn conflicts(st: &SimState, caller: &Caller, types: &[&str], resource: &str) -> bool {
    st.tenants.get(&caller.tenant_key).is_some_and(|t| {
        t.subscriptions.values().any(|s| {
            s.application_id == caller.app_id
                && s.subscription.expiration_date_time > Utc::now()
                && parse_change_type(&s.subscription.change_type).is_ok_and(|t| t == types)
                && normalize_resource(&s.subscription.resource).is_ok_and(|r| r == resource)
        })
    })
}

fn check_capacity(
    st: &SimState,
    caller: &Caller,
    types: &[&str],
    resource: &str,
) -> Result<(), ApiError> {
    if conflicts(st, caller, types, resource) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "ExtensionError",
            "Subscription operation failed: a subscription with the same changeType and resource \
             already exists for this application.",
        ));
    }
    let own = st
        .tenants
        .get(&caller.tenant_key)
        .map(|t| {
            t.subscriptions
                .values()
                .filter(|s| s.application_id == caller.app_id)
                .count()
        })
        .unwrap_or(0);
    if own >= st.settings.max_subscriptions_per_app_per_tenant {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "ExtensionError",
            "Subscription operation failed: the number of subscriptions of this application \
             in this tenant has exceeded the quota.",
        ));
    }
    Ok(())
}

/// `POST /v1.0/subscriptions`.
async fn create_subscription(
    State(sim): State<GraphSim>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let caller = match gate_with(&sim, &headers, READ_USERS).await {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let result = create(&sim, &caller, &headers, &body).await;
    caller.respond(result)
}

async fn create(
    sim: &GraphSim,
    caller: &Caller,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let req: CreateRequest = parse_json(body)?;
    let missing = |f: &str| ApiError::bad_request(format!("Property '{f}' is required."));
    let raw_types = req.change_type.ok_or_else(|| missing("changeType"))?;
    let types = parse_change_type(&raw_types)?;
    let resource_raw = req.resource.ok_or_else(|| missing("resource"))?;
    let resource = normalize_resource(&resource_raw)?;
    let notification_url = parse_url(
        "notificationUrl",
        &req.notification_url
            .ok_or_else(|| missing("notificationUrl"))?,
    )?;
    let lifecycle_url = req
        .lifecycle_notification_url
        .as_deref()
        .map(|u| parse_url("lifecycleNotificationUrl", u))
        .transpose()?;
    let expiration = parse_expiration(
        &req.expiration_date_time
            .ok_or_else(|| missing("expirationDateTime"))?,
        Utc::now(),
    )?;
    if req
        .client_state
        .as_ref()
        .is_some_and(|s| s.chars().count() > MAX_CLIENT_STATE_CHARS)
    {
        return Err(ApiError::bad_request(format!(
            "clientState must be at most {MAX_CLIENT_STATE_CHARS} characters."
        )));
    }
    if req.include_resource_data == Some(true) {
        return Err(ApiError::bad_request(
            "Rich notifications (includeResourceData) are not supported for resource 'users'.",
        ));
    }
    let timeout = {
        let st = sim.state();
        check_capacity(&st, caller, &types, &resource)?;
        st.settings.handshake_timeout
    };

    // The handshake, without the lock: once for the notification URL, then once more for
    // the lifecycle URL, even when it is the same URL (as Graph does).
    for url in std::iter::once(&notification_url).chain(lifecycle_url.as_ref()) {
        if let Err(reason) = handshake(&sim.inner.http, url, timeout).await {
            tracing::info!(url = %url, reason = %reason, "graph sim subscription validation failed");
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "ValidationError",
                format!(
                    "Subscription validation request failed. Notification endpoint must \
                     respond with 200 OK to validation request. ({reason})"
                ),
            ));
        }
    }

    let mut st = sim.state();
    // Checked again: another creation may have won while the handshake ran.
    check_capacity(&st, caller, &types, &resource)?;
    let tenant = st.tenants.get_mut(&caller.tenant_key).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "InvalidAuthenticationToken",
            "Unknown tenant.",
        )
    })?;
    let creator_id = tenant
        .service_principals
        .entry(caller.app_id.clone())
        .or_insert_with(|| uuid::Uuid::new_v4().to_string())
        .clone();
    let sub = SimSubscription {
        tenant_id: tenant.id.clone(),
        application_id: caller.app_id.clone(),
        creator_id,
        subscription: Subscription {
            id: uuid::Uuid::new_v4().to_string(),
            resource: resource_raw,
            change_type: raw_types,
            notification_url: notification_url.to_string(),
            lifecycle_notification_url: lifecycle_url.map(|u| u.to_string()),
            expiration_date_time: expiration,
        },
        client_state: req.client_state.map(SecretString::from),
    };
    tracing::info!(
        tenant = %sub.tenant_id,
        subscription_id = %sub.subscription.id,
        resource = %sub.subscription.resource,
        "graph sim created a subscription"
    );
    let body = render(&sub, &api_base(headers));
    tenant
        .subscriptions
        .insert(sub.subscription.id.clone(), sub);
    Ok((StatusCode::CREATED, axum::Json(body)).into_response())
}

/// `GET /v1.0/subscriptions`: this app's live subscriptions, paged with `$skiptoken`.
async fn list_subscriptions(
    State(sim): State<GraphSim>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let caller = match gate_with(&sim, &headers, READ_USERS).await {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let result = (|| {
        let skip = match query_option(query.as_deref(), "skiptoken") {
            None => 0,
            Some(t) => t
                .parse::<usize>()
                .map_err(|_| ApiError::bad_request("Invalid $skiptoken."))?,
        };
        let base = api_base(&headers);
        let st = sim.state();
        let page_size = st.settings.page_size.max(1);
        let now = Utc::now();
        let own: Vec<Value> = st
            .tenants
            .get(&caller.tenant_key)
            .map(|t| {
                t.subscriptions
                    .values()
                    .filter(|s| {
                        s.application_id == caller.app_id
                            && s.subscription.expiration_date_time > now
                    })
                    .map(|s| render(s, &base))
                    .collect()
            })
            .unwrap_or_default();
        let page: Vec<Value> = own.iter().skip(skip).take(page_size).cloned().collect();
        let mut body = json!({
            "@odata.context": format!("{base}/$metadata#subscriptions"),
            "value": page,
        });
        if skip + page_size < own.len() {
            body["@odata.nextLink"] = json!(format!(
                "{base}/subscriptions?$skiptoken={}",
                skip + page_size
            ));
        }
        Ok((StatusCode::OK, axum::Json(body)).into_response())
    })();
    caller.respond(result)
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "ResourceNotFound",
        format!("The object was not found: subscription '{id}'."),
    )
}

/// The caller's own subscription (other apps' are invisible, as in Graph).
fn own_subscription<'a>(
    st: &'a mut SimState,
    caller: &Caller,
    id: &str,
) -> Result<&'a mut SimSubscription, ApiError> {
    st.tenants
        .get_mut(&caller.tenant_key)
        .and_then(|t| t.subscriptions.get_mut(id))
        .filter(|s| s.application_id == caller.app_id)
        .ok_or_else(|| not_found(id))
}

async fn get_subscription(
    State(sim): State<GraphSim>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let caller = match gate_with(&sim, &headers, READ_USERS).await {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let mut st = sim.state();
    let result = own_subscription(&mut st, &caller, &id)
        .map(|s| (StatusCode::OK, axum::Json(render(s, &api_base(&headers)))).into_response());
    caller.respond(result)
}

/// `PATCH /v1.0/subscriptions/{id}` with a new `expirationDateTime` (renewal).
async fn renew_subscription(
    State(sim): State<GraphSim>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let caller = match gate_with(&sim, &headers, READ_USERS).await {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let result = (|| {
        let req: RenewRequest = parse_json(&body)?;
        let raw = req
            .expiration_date_time
            .ok_or_else(|| ApiError::bad_request("Property 'expirationDateTime' is required."))?;
        let expiration = parse_expiration(&raw, Utc::now())?;
        let mut st = sim.state();
        let sub = own_subscription(&mut st, &caller, &id)?;
        sub.subscription.expiration_date_time = expiration;
        Ok((StatusCode::OK, axum::Json(render(sub, &api_base(&headers)))).into_response())
    })();
    caller.respond(result)
}

async fn delete_subscription(
    State(sim): State<GraphSim>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let caller = match gate_with(&sim, &headers, READ_USERS).await {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let mut st = sim.state();
    let result = own_subscription(&mut st, &caller, &id).map(|_| ());
    let result = result.map(|()| {
        if let Some(t) = st.tenants.get_mut(&caller.tenant_key) {
            t.subscriptions.remove(&id);
        }
        StatusCode::NO_CONTENT.into_response()
    });
    caller.respond(result)
}

/// `POST /v1.0/subscriptions/{id}/reauthorize`: 204, expiry unchanged.
async fn reauthorize(
    State(sim): State<GraphSim>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let caller = match gate_with(&sim, &headers, READ_USERS).await {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let mut st = sim.state();
    let result =
        own_subscription(&mut st, &caller, &id).map(|_| StatusCode::NO_CONTENT.into_response());
    caller.respond(result)
}
