//! `GET /v1.0/users`: the tenant's users, optionally narrowed by the `$filter` subset of
//! [`super::filter`] (how flagrelay finds every holder of an address).
//!
//! Needs `User.Read.All` (or a broader directory permission), else 403
//! `Authorization_RequestDenied`, like `GET /users/{id}`. Query options: `$filter`,
//! `$select` (validated and rendered as for a single user), `$top` (1..=999, default 100)
//! capped by [`super::GraphSimSettings::users_page_size`], `$skiptoken` (in the
//! `@odata.nextLink` only), and `$count`. Any other option is refused with 400
//! `Request_UnsupportedQuery` rather than ignored.
//!
//! The filter needs no advanced query parameters (Graph documents `eq` on `mail`,
//! `userPrincipalName` and `proxyAddresses` as supported by default); sending
//! `ConsistencyLevel: eventual` is accepted too. As documented for directory objects,
//! `$count=true` only adds `@odata.count` together with that header, and is silently
//! ignored without it.

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use super::GraphSim;
use super::api::{ApiError, api_base, eventual_consistency, gate_with, query_option};
use super::delta::render_item;
use super::filter::UserFilter;
use super::paging::{Paging, next_query};
use super::permissions::{READ_LIFECYCLE_INFO, READ_USERS};

/// Query options the route understands (compared without `$`, case-insensitively).
const OPTIONS: &[&str] = &["filter", "select", "top", "skiptoken", "count"];

pub(super) fn routes() -> Router<GraphSim> {
    Router::new().route("/v1.0/users", get(list_users))
}

async fn list_users(
    State(sim): State<GraphSim>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let caller = match gate_with(&sim, &headers, READ_USERS).await {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let lifecycle = caller.has_any(READ_LIFECYCLE_INFO);
    let result = serve(
        &sim,
        query.as_deref(),
        &headers,
        &caller.tenant_key,
        lifecycle,
    );
    caller.respond(result)
}

fn serve(
    sim: &GraphSim,
    query: Option<&str>,
    headers: &HeaderMap,
    tenant_key: &str,
    lifecycle: bool,
) -> Result<Response, ApiError> {
    check_options(query)?;
    let filter = query_option(query, "filter")
        .map(|f| UserFilter::parse(&f))
        .transpose()?;
    let Paging { top, skip } = Paging::from_query(query)?;
    let select = query_option(query, "select");
    let count = query_option(query, "count").is_some_and(|c| c.eq_ignore_ascii_case("true"))
        && eventual_consistency(headers);
    let base = api_base(headers);
    let st = sim.state();
    let page_size = top.min(st.settings.users_page_size.max(1));
    let matching: Vec<_> = match (st.tenants.get(tenant_key), &filter) {
        (None, _) => Vec::new(),
        (Some(t), None) => t.users.values().collect(),
        // Looked up by value, then checked clause by clause: what a scan would find.
        (Some(t), Some(f)) => t
            .addresses
            .candidates(f)
            .iter()
            .filter_map(|key| t.users.get(key))
            .filter(|u| f.matches(u))
            .collect(),
    };
    let value = matching
        .iter()
        .skip(skip)
        .take(page_size)
        .map(|u| render_item(u, select.as_deref(), &base, lifecycle))
        .collect::<Result<Vec<Value>, ApiError>>()?;
    let context = match select.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        Some(s) => format!("{base}/$metadata#users({s})"),
        None => format!("{base}/$metadata#users"),
    };
    let mut body = json!({"@odata.context": context, "value": value});
    if count {
        body["@odata.count"] = json!(matching.len());
    }
    if skip + page_size < matching.len() {
        let next = next_query(query, skip + page_size);
        body["@odata.nextLink"] = json!(format!("{base}/users?{next}"));
    }
    Ok((StatusCode::OK, axum::Json(body)).into_response())
}

/// Refuse query options the simulator does not model (`$search`, `$orderby`, `$expand`...)
/// instead of answering as if they had not been sent.
fn check_options(query: Option<&str>) -> Result<(), ApiError> {
    let pairs = url::form_urlencoded::parse(query.unwrap_or("").as_bytes());
    for (key, _) in pairs {
        let name = key.strip_prefix('$').unwrap_or(&key);
        if !OPTIONS.iter().any(|o| o.eq_ignore_ascii_case(name)) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "Request_UnsupportedQuery",
                format!("The simulator does not support the query option '{key}' on users."),
            ));
        }
    }
    Ok(())
}
