//! The simulator's HTTP control API under `/_sim`, for people and scripts driving
//! `flagrelay sim`. Every route calls the same [`GraphSim`] method a Rust test would, so user
//! changes made here notify subscriptions too. Bad input gets 400 with `{"error": "..."}`,
//! unknown tenants and users 404.
//!
//! - `PUT    /_sim/tenants/{t}`                 add a tenant
//! - `GET    /_sim/tenants/{t}/users`           list users
//! - `GET    /_sim/tenants/{t}/users/{id}`      one user
//! - `PUT    /_sim/tenants/{t}/users/{id}`      create or replace (JSON `GraphUser`)
//! - `PATCH  /_sim/tenants/{t}/users/{id}`      change some properties (`null` unsets)
//! - `DELETE /_sim/tenants/{t}/users/{id}`      hard delete (and its memberships, mailbox)
//! - `POST   /_sim/tenants/{t}/users/{id}/soft-delete`  soft delete (delta: `changed`)
//! - `POST   /_sim/tenants/{t}/delta/expire`    expire every delta and skip token
//! - `GET|PUT /_sim/tenants/{t}/users/{id}/mailbox`  read or set the mailbox purpose:
//!   `{"userPurpose": "shared"}`, `{"userPurpose": null}` for no mailbox (no notification)
//! - `GET    /_sim/tenants/{t}/groups`          groups with their direct members
//! - `PUT    /_sim/tenants/{t}/groups/{g}`      create or rename: `{"displayName": "..."}`
//! - `PUT|DELETE /_sim/tenants/{t}/groups/{g}/members/{id}`  add or remove a user or group
//!   (no notification, as in Graph)
//! - `GET|PUT /_sim/apps/{client_id}/permissions`  the app's application permissions, as a
//!   JSON array of names (new tokens carry them)
//! - `GET    /_sim/tenants/{t}/subscriptions`   all apps' subscriptions (no `clientState`)
//! - `POST   /_sim/tenants/{t}/subscriptions/{id}/reauthorization-required`  send that
//!   lifecycle notification
//! - `GET|POST /_sim/faults`                    read or replace the [`GraphSimFaults`]
//! - `GET    /_sim/deliveries`, `/_sim/requests`, `/_sim/stats`  observations

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde_json::{Map, Value, json};

use super::{GraphSim, GraphSimFaults, SimError};
use crate::graph::{GraphUser, USER_SELECT};

pub(super) fn routes() -> Router<GraphSim> {
    Router::new()
        .route("/_sim/tenants/{tenant}", put(add_tenant))
        .route("/_sim/tenants/{tenant}/users", get(list_users))
        .route(
            "/_sim/tenants/{tenant}/users/{id}",
            get(get_user)
                .put(put_user)
                .patch(patch_user)
                .delete(delete_user),
        )
        .route(
            "/_sim/tenants/{tenant}/users/{id}/mailbox",
            get(get_mailbox).put(put_mailbox),
        )
        .route(
            "/_sim/tenants/{tenant}/users/{id}/soft-delete",
            post(soft_delete_user),
        )
        .route("/_sim/tenants/{tenant}/delta/expire", post(expire_delta))
        .route("/_sim/tenants/{tenant}/groups", get(list_groups))
        .route("/_sim/tenants/{tenant}/groups/{group}", put(put_group))
        .route(
            "/_sim/tenants/{tenant}/groups/{group}/members/{member}",
            put(add_member).delete(remove_member),
        )
        .route(
            "/_sim/apps/{client_id}/permissions",
            get(get_permissions).put(put_permissions),
        )
        .route("/_sim/tenants/{tenant}/subscriptions", get(subscriptions))
        .route(
            "/_sim/tenants/{tenant}/subscriptions/{id}/reauthorization-required",
            post(reauthorization_required),
        )
        .route("/_sim/faults", get(get_faults).post(set_faults))
        .route("/_sim/deliveries", get(deliveries))
        .route("/_sim/requests", get(requests))
        .route("/_sim/stats", get(stats))
}

/// A control API refusal.
struct ControlError(StatusCode, String);

impl From<SimError> for ControlError {
    fn from(e: SimError) -> Self {
        let status = match e {
            SimError::UnknownTenant(_)
            | SimError::UnknownUser { .. }
            | SimError::UnknownSubscription { .. }
            | SimError::UnknownApp(_)
            | SimError::UnknownGroup { .. }
            | SimError::UnknownMember { .. }
            | SimError::NotAMember { .. } => StatusCode::NOT_FOUND,
            SimError::Invalid(_) => StatusCode::BAD_REQUEST,
        };
        Self(status, e.to_string())
    }
}

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({ "error": self.1 }))).into_response()
    }
}

fn bad_request(message: impl Into<String>) -> ControlError {
    ControlError(StatusCode::BAD_REQUEST, message.into())
}

fn json_body(body: &[u8]) -> Result<Value, ControlError> {
    serde_json::from_slice(body).map_err(|e| bad_request(format!("invalid JSON: {e}")))
}

/// Refuse properties `GraphUser` does not know (a typo would otherwise be silently ignored).
fn check_user_keys(object: &Map<String, Value>) -> Result<(), ControlError> {
    match object
        .keys()
        .find(|k| !k.starts_with("@odata.") && !USER_SELECT.contains(&k.as_str()))
    {
        Some(k) => Err(bad_request(format!(
            "unknown user property {k:?}; known: {}",
            USER_SELECT.join(", ")
        ))),
        None => Ok(()),
    }
}

/// Apply a JSON merge patch (top level; `null` unsets) to a user.
fn merge_user(user: &GraphUser, patch: &Map<String, Value>) -> Result<GraphUser, ControlError> {
    let mut object = match serde_json::to_value(user) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    };
    for (k, v) in patch {
        if k == "id" && v.as_str() != Some(user.id.as_str()) {
            return Err(bad_request("a user's id cannot change"));
        }
        if v.is_null() {
            object.remove(k);
        } else {
            object.insert(k.clone(), v.clone());
        }
    }
    serde_json::from_value(Value::Object(object))
        .map_err(|e| bad_request(format!("invalid user: {e}")))
}

async fn add_tenant(State(sim): State<GraphSim>, Path(tenant): Path<String>) -> StatusCode {
    sim.add_tenant(&tenant);
    StatusCode::NO_CONTENT
}

async fn list_users(
    State(sim): State<GraphSim>,
    Path(tenant): Path<String>,
) -> Result<Response, ControlError> {
    Ok(axum::Json(sim.users(&tenant)?).into_response())
}

async fn get_user(
    State(sim): State<GraphSim>,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<Response, ControlError> {
    sim.users(&tenant)?;
    let user = sim.user(&tenant, &id).ok_or(SimError::UnknownUser {
        tenant_id: tenant,
        user_id: id,
    })?;
    Ok(axum::Json(user).into_response())
}

async fn put_user(
    State(sim): State<GraphSim>,
    Path((tenant, id)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ControlError> {
    let mut value = json_body(&body)?;
    let object = value
        .as_object_mut()
        .ok_or_else(|| bad_request("expected a JSON object"))?;
    check_user_keys(object)?;
    match object.get("id") {
        None => {
            object.insert("id".into(), Value::String(id.clone()));
        }
        Some(Value::String(given)) if given.eq_ignore_ascii_case(&id) => {}
        Some(_) => return Err(bad_request("the body's id must match the path")),
    }
    let user: GraphUser =
        serde_json::from_value(value).map_err(|e| bad_request(format!("invalid user: {e}")))?;
    sim.upsert_user(&tenant, user.clone())?;
    Ok(axum::Json(user).into_response())
}

async fn patch_user(
    State(sim): State<GraphSim>,
    Path((tenant, id)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ControlError> {
    let value = json_body(&body)?;
    let patch = value
        .as_object()
        .ok_or_else(|| bad_request("expected a JSON object"))?;
    check_user_keys(patch)?;
    let current = sim.user(&tenant, &id).ok_or_else(|| {
        sim.users(&tenant).err().unwrap_or(SimError::UnknownUser {
            tenant_id: tenant.clone(),
            user_id: id.clone(),
        })
    })?;
    // Validated on a snapshot first, so that a bad patch neither changes nor notifies.
    merge_user(&current, patch)?;
    let updated = sim.update_user(&tenant, &id, |u| {
        if let Ok(merged) = merge_user(u, patch) {
            *u = merged;
        }
    })?;
    Ok(axum::Json(updated).into_response())
}

async fn delete_user(
    State(sim): State<GraphSim>,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<StatusCode, ControlError> {
    sim.delete_user(&tenant, &id)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn soft_delete_user(
    State(sim): State<GraphSim>,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<StatusCode, ControlError> {
    sim.soft_delete_user(&tenant, &id)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn expire_delta(
    State(sim): State<GraphSim>,
    Path(tenant): Path<String>,
) -> Result<StatusCode, ControlError> {
    sim.expire_delta_tokens(&tenant)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn get_mailbox(
    State(sim): State<GraphSim>,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<Response, ControlError> {
    sim.users(&tenant)?;
    let user = sim.user(&tenant, &id).ok_or(SimError::UnknownUser {
        tenant_id: tenant.clone(),
        user_id: id,
    })?;
    let purpose = sim.mailbox_purpose(&tenant, &user.id);
    Ok(axum::Json(json!({ "userPurpose": purpose })).into_response())
}

async fn put_mailbox(
    State(sim): State<GraphSim>,
    Path((tenant, id)): Path<(String, String)>,
    body: Bytes,
) -> Result<StatusCode, ControlError> {
    let value = json_body(&body)?;
    let purpose = match value.get("userPurpose") {
        Some(Value::String(p)) => Some(p.as_str()),
        Some(Value::Null) => None,
        _ => {
            return Err(bad_request(
                r#"expected {"userPurpose": "<purpose>"} or {"userPurpose": null}"#,
            ));
        }
    };
    sim.set_mailbox_purpose(&tenant, &id, purpose)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_groups(
    State(sim): State<GraphSim>,
    Path(tenant): Path<String>,
) -> Result<Response, ControlError> {
    Ok(axum::Json(sim.groups(&tenant)?).into_response())
}

async fn put_group(
    State(sim): State<GraphSim>,
    Path((tenant, group)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ControlError> {
    let value = json_body(&body)?;
    let name = value
        .get("displayName")
        .and_then(Value::as_str)
        .ok_or_else(|| bad_request(r#"expected {"displayName": "<name>"}"#))?;
    sim.add_group(&tenant, &group, name)?;
    let created = sim
        .groups(&tenant)?
        .into_iter()
        .find(|g| g.id.eq_ignore_ascii_case(&group));
    Ok(axum::Json(created).into_response())
}

async fn add_member(
    State(sim): State<GraphSim>,
    Path((tenant, group, member)): Path<(String, String, String)>,
) -> Result<StatusCode, ControlError> {
    sim.add_member(&tenant, &group, &member)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn remove_member(
    State(sim): State<GraphSim>,
    Path((tenant, group, member)): Path<(String, String, String)>,
) -> Result<StatusCode, ControlError> {
    sim.remove_member(&tenant, &group, &member)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn get_permissions(
    State(sim): State<GraphSim>,
    Path(client_id): Path<String>,
) -> Result<Response, ControlError> {
    Ok(axum::Json(sim.app_permissions(&client_id)?).into_response())
}

async fn put_permissions(
    State(sim): State<GraphSim>,
    Path(client_id): Path<String>,
    body: Bytes,
) -> Result<Response, ControlError> {
    let names: Vec<String> = serde_json::from_slice(&body)
        .map_err(|e| bad_request(format!("expected a JSON array of permission names: {e}")))?;
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    sim.set_app_permissions(&client_id, &names)?;
    Ok(axum::Json(sim.app_permissions(&client_id)?).into_response())
}

async fn subscriptions(
    State(sim): State<GraphSim>,
    Path(tenant): Path<String>,
) -> Result<Response, ControlError> {
    sim.users(&tenant)?;
    Ok(axum::Json(sim.subscriptions(&tenant)).into_response())
}

async fn reauthorization_required(
    State(sim): State<GraphSim>,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<StatusCode, ControlError> {
    sim.request_reauthorization(&tenant, &id)?;
    Ok(StatusCode::ACCEPTED)
}

async fn get_faults(State(sim): State<GraphSim>) -> Response {
    axum::Json(sim.faults()).into_response()
}

/// Replace the fault settings; fields left out take their defaults.
async fn set_faults(State(sim): State<GraphSim>, body: Bytes) -> Result<Response, ControlError> {
    let faults: GraphSimFaults = serde_json::from_slice(&body)
        .map_err(|e| bad_request(format!("invalid fault settings: {e}")))?;
    sim.set_faults(faults)?;
    Ok(axum::Json(sim.faults()).into_response())
}

async fn deliveries(State(sim): State<GraphSim>) -> Response {
    axum::Json(sim.deliveries()).into_response()
}

async fn requests(State(sim): State<GraphSim>) -> Response {
    axum::Json(sim.request_log()).into_response()
}

async fn stats(State(sim): State<GraphSim>) -> Response {
    axum::Json(json!({
        "token_requests": sim.token_requests(),
        "pending_deliveries": sim.pending_deliveries(),
    }))
    .into_response()
}
