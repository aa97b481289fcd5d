//! The Graph-facing HTTP surface of the simulator: the client-credentials token endpoint,
//! `GET /v1.0/users/{id}`, the request log middleware, and the gate every API request
//! passes (injected latency, bearer-token check, injected throttling and failures, then the
//! token's permissions). Error bodies have Graph's (`{"error":{"code",...}}`) or Entra's
//! (`{"error","error_description"}`) shape. Subscriptions live in [`super::subscriptions`],
//! groups in [`super::groups`], mailbox settings in [`super::mailbox`].
//!
//! `GET /users/{id}` needs `User.Read.All` (or a broader directory permission), else 403
//! `Authorization_RequestDenied`. `employeeLeaveDateTime` additionally needs
//! `User-LifeCycleInfo.Read.All`: without it the property is left out of the answer even when
//! selected (the user is still returned), so a client reads it as unset. Real Graph's
//! behaviour here is not clearly documented; leaving it out is the reading that a client
//! cannot tell from "no leave date", which is the case worth testing.

use std::collections::HashMap;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::Utc;
use secrecy::ExposeSecret;
use serde_json::{Map, Value, json};
use subtle::ConstantTimeEq;

use super::delivery::MAX_RECORDS;
use super::permissions::{self, READ_LIFECYCLE_INFO, READ_USERS, TokenClaims};
use super::{
    Grant, GraphSim, RequestRecord, Tenant, batch, delta, groups, mailbox, subscriptions, users,
};
use crate::graph::USER_SELECT;

/// Properties `GET /users/{id}` returns without `$select` (Graph's default set: note that
/// `accountEnabled` and `proxyAddresses` are not in it).
const DEFAULT_USER_PROPERTIES: &[&str] = &[
    "businessPhones",
    "displayName",
    "givenName",
    "id",
    "jobTitle",
    "mail",
    "mobilePhone",
    "officeLocation",
    "preferredLanguage",
    "surname",
    "userPrincipalName",
];

/// Other real user properties the simulator does not model: selecting them yields `null`
/// (Graph's answer for an unset property), while unknown names get Graph's 400.
const OTHER_USER_PROPERTIES: &[&str] = &[
    "ageGroup",
    "city",
    "country",
    "createdDateTime",
    "creationType",
    "deletedDateTime",
    "employeeHireDate",
    "employeeId",
    "externalUserState",
    "identities",
    "lastPasswordChangeDateTime",
    "mailNickname",
    "onPremisesDistinguishedName",
    "onPremisesDomainName",
    "onPremisesImmutableId",
    "onPremisesLastSyncDateTime",
    "onPremisesSamAccountName",
    "onPremisesSecurityIdentifier",
    "onPremisesSyncEnabled",
    "onPremisesUserPrincipalName",
    "otherMails",
    "postalCode",
    "preferredDataLocation",
    "securityIdentifier",
    "showInAddressList",
    "state",
    "streetAddress",
    "usageLocation",
];

pub(super) fn routes() -> Router<GraphSim> {
    Router::new()
        .route("/{tenant}/oauth2/v2.0/token", post(token))
        .merge(api_routes())
        .merge(batch::routes())
}

/// The `/v1.0` API a batch's requests may address (everything but `$batch` itself).
pub(super) fn api_routes() -> Router<GraphSim> {
    Router::new()
        .route("/v1.0/users/{id}", get(get_user))
        .merge(users::routes())
        .merge(delta::routes())
        .merge(groups::routes())
        .merge(mailbox::routes())
        .merge(subscriptions::routes())
}

/// The tenant a request was for, left in the response's extensions for the request log.
#[derive(Debug, Clone)]
pub(super) struct TenantTag(pub String);

/// Who is calling, as established by the bearer token.
#[derive(Debug, Clone)]
pub(super) struct Caller {
    pub tenant_key: String,
    pub tenant_id: String,
    pub app_id: String,
    /// The application permissions the token was issued with.
    pub roles: Vec<String>,
}

impl Caller {
    /// Tag a response with the caller's tenant.
    pub fn tag(&self, mut resp: Response) -> Response {
        resp.extensions_mut()
            .insert(TenantTag(self.tenant_id.clone()));
        resp
    }

    pub fn respond(&self, result: Result<Response, ApiError>) -> Response {
        self.tag(result.unwrap_or_else(IntoResponse::into_response))
    }
}

/// A Graph error answer: `{"error":{"code","message","innerError":{"date"}}}`.
#[derive(Debug)]
pub(super) struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "InvalidRequest", message)
    }

    fn unauthenticated(message: &str) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "InvalidAuthenticationToken",
            message,
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "code": self.code,
            "message": self.message,
            "innerError": {"date": Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)},
        }});
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// Request log and Graph's `request-id` / `client-request-id` response headers.
pub(super) async fn log_request(State(sim): State<GraphSim>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let started_at = Utc::now();
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let client_request_id = req
        .headers()
        .get("client-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut resp = next.run(req).await;
    let request_id = uuid::Uuid::new_v4().to_string();
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("request-id", v);
    }
    if let Some(v) = client_request_id
        .as_deref()
        .and_then(|c| HeaderValue::from_str(c).ok())
    {
        resp.headers_mut().insert("client-request-id", v);
    }
    let tenant = resp.extensions().get::<TenantTag>().map(|t| t.0.clone());
    let status = resp.status().as_u16();
    tracing::debug!(
        method = %method,
        path = %path,
        tenant = tenant.as_deref().unwrap_or(""),
        status,
        request_id = %request_id,
        "graph sim request"
    );
    let mut st = sim.state();
    if st.requests.len() >= MAX_RECORDS {
        st.requests.drain(..MAX_RECORDS / 10);
    }
    st.requests.push(RequestRecord {
        method,
        path,
        query,
        tenant,
        client_request_id,
        status,
        started,
        finished: Instant::now(),
        started_at,
        finished_at: Utc::now(),
        in_batch: batch::in_batch(),
    });
    resp
}

/// Every API request passes here: injected latency (once per batch, not per request in it),
/// the bearer token, then injected throttling and failures (which, as in Graph, only
/// authenticated callers see, and which hit a batch's requests, not the batch itself).
pub(super) async fn gate(sim: &GraphSim, headers: &HeaderMap) -> Result<Caller, Response> {
    let caller = admit(sim, headers).await?;
    match injected_failure(sim) {
        Some(err) => Err(caller.tag(err.into_response())),
        None => Ok(caller),
    }
}

/// Injected latency (once per batch, not per request in it), then the bearer token.
pub(super) async fn admit(sim: &GraphSim, headers: &HeaderMap) -> Result<Caller, Response> {
    let latency = sim.state().faults.api_latency;
    if !latency.is_zero() && !batch::in_batch() {
        tokio::time::sleep(latency).await;
    }
    authenticate(sim, headers).map_err(IntoResponse::into_response)
}

/// [`gate`], then 403 unless the token carries one of `permissions`.
pub(super) async fn gate_with(
    sim: &GraphSim,
    headers: &HeaderMap,
    permissions: &[&str],
) -> Result<Caller, Response> {
    let caller = gate(sim, headers).await?;
    match caller.require(permissions) {
        Ok(()) => Ok(caller),
        Err(err) => Err(caller.respond(Err(err))),
    }
}

fn authenticate(sim: &GraphSim, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::unauthenticated("Access token is empty."))?;
    let mut st = sim.state();
    let grant = st
        .tokens
        .get(token)
        .ok_or_else(|| ApiError::unauthenticated("Access token validation failure."))?;
    if grant.expires_at <= Instant::now() {
        st.tokens.remove(token);
        return Err(ApiError::unauthenticated(
            "Lifetime validation failed, the token is expired.",
        ));
    }
    let app_id = grant.app_id.clone();
    let tenant_key = grant.tenant_key.clone();
    let roles = grant.roles.clone();
    let tenant = st
        .tenants
        .get(&tenant_key)
        .ok_or_else(|| ApiError::unauthenticated("Access token validation failure."))?;
    Ok(Caller {
        tenant_id: tenant.id.clone(),
        tenant_key,
        app_id,
        roles,
    })
}

fn injected_failure(sim: &GraphSim) -> Option<ApiError> {
    let mut st = sim.state();
    let faults = &mut st.faults;
    if faults.throttle_next > 0 {
        faults.throttle_next -= 1;
        let mut err = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "TooManyRequests",
            "Too many requests.",
        );
        err.retry_after = faults.throttle_retry_after_secs;
        return Some(err);
    }
    if faults.fail_next > 0 {
        faults.fail_next -= 1;
        let status =
            StatusCode::from_u16(faults.fail_status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let code = match status.as_u16() {
            503 => "serviceNotAvailable",
            504 => "gatewayTimeout",
            s if s >= 500 => "generalException",
            _ => "invalidRequest",
        };
        return Some(ApiError::new(status, code, "Injected failure."));
    }
    None
}

/// `http://{Host}/v1.0`, for `@odata.context` and `@odata.nextLink`.
pub(super) fn api_base(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("localhost");
    format!("http://{host}/v1.0")
}

/// Whether the request carries `ConsistencyLevel: eventual`, the header of Graph's advanced
/// queries on directory objects.
pub(super) fn eventual_consistency(headers: &HeaderMap) -> bool {
    headers
        .get("consistencylevel")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("eventual"))
}

/// A query option by name (`$select` and `select` alike, as Graph v1.0 accepts both).
pub(super) fn query_option(query: Option<&str>, name: &str) -> Option<String> {
    let query = query?;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k.strip_prefix('$').unwrap_or(k).eq_ignore_ascii_case(name))
        .map(|(_, v)| v.into_owned())
}

// ---------------------------------------------------------------------------------------
// Token endpoint

/// An Entra (AAD) error answer: `{"error","error_description":"AADSTS<code>: ...",...}`.
struct AadError {
    status: StatusCode,
    error: &'static str,
    code: u32,
    description: String,
}

fn aad_error(status: StatusCode, error: &'static str, code: u32, description: String) -> AadError {
    AadError {
        status,
        error,
        code,
        description,
    }
}

impl IntoResponse for AadError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": self.error,
            "error_description": format!("AADSTS{}: {}", self.code, self.description),
            "error_codes": [self.code],
            "timestamp": Utc::now().format("%Y-%m-%d %H:%M:%SZ").to_string(),
            "trace_id": uuid::Uuid::new_v4(),
            "correlation_id": uuid::Uuid::new_v4(),
        });
        (self.status, axum::Json(body)).into_response()
    }
}

/// `POST /{tenant}/oauth2/v2.0/token`, client credentials grant with a secret.
async fn token(State(sim): State<GraphSim>, Path(tenant): Path<String>, body: Bytes) -> Response {
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let mut resp = issue_token(&sim, &tenant, &form).unwrap_or_else(IntoResponse::into_response);
    resp.extensions_mut().insert(TenantTag(tenant));
    resp
}

fn issue_token(
    sim: &GraphSim,
    tenant: &str,
    form: &HashMap<String, String>,
) -> Result<Response, AadError> {
    let field = |name: &str| {
        form.get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                aad_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    900144,
                    format!("The request body must contain the following parameter: '{name}'."),
                )
            })
    };
    let mut st = sim.state();
    st.token_requests += 1;
    let tenant_key = tenant.to_ascii_lowercase();
    let Some(tenant_id) = st.tenants.get(&tenant_key).map(|t| t.id.clone()) else {
        return Err(aad_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            90002,
            format!(
                "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID \
                 and are signing into the correct cloud."
            ),
        ));
    };
    let grant_type = field("grant_type")?;
    let client_id = field("client_id")?;
    let secret = field("client_secret")?;
    let scope = field("scope")?;
    if grant_type != "client_credentials" {
        return Err(aad_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            format!("The app requested an unsupported grant type '{grant_type}'."),
        ));
    }
    if !scope.ends_with("/.default") {
        return Err(aad_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            1002012,
            format!(
                "The provided value for scope {scope} is not valid. Client credential flows \
                 must have a scope value with /.default suffixed to the resource identifier."
            ),
        ));
    }
    let app_key = client_id.to_ascii_lowercase();
    let Some(app) = st.apps.get(&app_key) else {
        return Err(aad_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            700016,
            format!(
                "Application with identifier '{client_id}' was not found in the directory \
                 '{tenant_id}'."
            ),
        ));
    };
    let secret_ok: bool = app
        .secret
        .expose_secret()
        .as_bytes()
        .ct_eq(secret.as_bytes())
        .into();
    if !secret_ok {
        return Err(aad_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000215,
            format!(
                "Invalid client secret provided. Ensure the secret being sent in the request is \
                 the client secret value, not the client secret ID, for a secret added to app \
                 '{client_id}'."
            ),
        ));
    }
    let roles = app.roles.clone();
    let lifetime = st.settings.token_lifetime;
    let opaque = st.settings.opaque_tokens;
    let now = Instant::now();
    st.tokens.retain(|_, g| g.expires_at > now);
    let service_principal_id = st
        .tenants
        .get_mut(&tenant_key)
        .map(|t| {
            t.service_principals
                .entry(app_key.clone())
                .or_insert_with(|| uuid::Uuid::new_v4().to_string())
                .clone()
        })
        .unwrap_or_default();
    let access_token = if opaque {
        permissions::opaque_token()
    } else {
        permissions::mint_token(&TokenClaims {
            tenant_id: &tenant_id,
            app_id: &app_key,
            service_principal_id: &service_principal_id,
            audience: scope.trim_end_matches("/.default"),
            roles: &roles,
            lifetime_secs: lifetime.as_secs(),
        })
    };
    st.tokens.insert(
        access_token.clone(),
        Grant {
            tenant_key,
            app_id: app_key,
            expires_at: now + lifetime,
            roles,
        },
    );
    let body = json!({
        "token_type": "Bearer",
        "expires_in": lifetime.as_secs(),
        "ext_expires_in": lifetime.as_secs(),
        "access_token": access_token,
    });
    Ok((StatusCode::OK, axum::Json(body)).into_response())
}

// ---------------------------------------------------------------------------------------
// Users

/// `GET /v1.0/users/{id | userPrincipalName}`.
async fn get_user(
    State(sim): State<GraphSim>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let caller = match gate_with(&sim, &headers, READ_USERS).await {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let result = (|| {
        let select = query_option(query.as_deref(), "select");
        let user = {
            let st = sim.state();
            let tenant = st.tenants.get(&caller.tenant_key);
            tenant.and_then(|t| find_user(t, &id)).cloned()
        };
        let Some(user) = user else {
            return Err(user_not_found(&id));
        };
        let lifecycle = caller.has_any(READ_LIFECYCLE_INFO);
        let body = render_user(&user, select.as_deref(), &api_base(&headers), lifecycle)?;
        Ok((StatusCode::OK, axum::Json(Value::Object(body))).into_response())
    })();
    caller.respond(result)
}

/// A user by id or by userPrincipalName, as Graph resolves `/users/{id | userPrincipalName}`.
pub(super) fn find_user<'a>(tenant: &'a Tenant, id: &str) -> Option<&'a crate::graph::GraphUser> {
    tenant.users.get(&id.to_ascii_lowercase()).or_else(|| {
        tenant.users.values().find(|u| {
            u.user_principal_name
                .as_deref()
                .is_some_and(|upn| upn.eq_ignore_ascii_case(id))
        })
    })
}

/// Graph's 404 for a user that does not exist.
pub(super) fn user_not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "Request_ResourceNotFound",
        format!(
            "Resource '{id}' does not exist or one of its queried reference-property objects are not present."
        ),
    )
}

/// A user as Graph renders it: the `$select`ed properties (unset ones as `null`, `id`
/// always), or the default set without `$select`. `employeeLeaveDateTime` is left out
/// unless the caller may read lifecycle info (`lifecycle`).
pub(super) fn render_user(
    user: &crate::graph::GraphUser,
    select: Option<&str>,
    base: &str,
    lifecycle: bool,
) -> Result<Map<String, Value>, ApiError> {
    let full = match serde_json::to_value(user) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    };
    let mut wanted: Vec<&'static str> = Vec::new();
    match select.map(str::trim).filter(|s| !s.is_empty()) {
        None => wanted.extend(DEFAULT_USER_PROPERTIES),
        Some(list) => {
            for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                let known = USER_SELECT
                    .iter()
                    .chain(DEFAULT_USER_PROPERTIES)
                    .chain(OTHER_USER_PROPERTIES)
                    .find(|p| p.eq_ignore_ascii_case(name))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "Could not find a property named '{name}' on type 'microsoft.graph.user'."
                        ))
                    })?;
                wanted.push(known);
            }
        }
    }
    let mut out = Map::new();
    let context = match select {
        Some(s) if !s.trim().is_empty() => format!("{base}/$metadata#users({s})/$entity"),
        _ => format!("{base}/$metadata#users/$entity"),
    };
    out.insert("@odata.context".into(), Value::String(context));
    out.insert("id".into(), Value::String(user.id.clone()));
    for name in wanted {
        if name == "employeeLeaveDateTime" && !lifecycle {
            continue;
        }
        let value = full.get(name).cloned().unwrap_or(match name {
            "businessPhones" | "otherMails" | "identities" => Value::Array(Vec::new()),
            _ => Value::Null,
        });
        out.insert(name.to_owned(), value);
    }
    Ok(out)
}
