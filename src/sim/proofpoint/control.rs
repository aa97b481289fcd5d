//! The simulator's own `/_sim` control routes, for people running `flagrelay sim`: dump the
//! state, create orgs and users, read the records, set faults. No auth: bind to loopback.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, put};
use serde_json::{Map, Value, json};

use super::state::Refusal;
use super::{ProofpointSim, ProofpointSimFaults, SimError};

pub(super) fn router(sim: ProofpointSim) -> axum::Router {
    axum::Router::new()
        .route("/state", get(state))
        .route("/orgs/{domain}", put(put_org))
        .route("/orgs/{domain}/users", put(put_user))
        .route("/requests", get(requests))
        .route("/writes", get(writes))
        .route("/faults", get(get_faults).post(set_faults))
        .with_state(sim)
}

impl From<SimError> for Refusal {
    fn from(e: SimError) -> Self {
        match e {
            SimError::Refused { status, message } => Refusal::new(
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
                message,
            ),
            SimError::InvalidUser(e) => Refusal::bad_request(e.to_string()),
        }
    }
}

fn json_body(body: &[u8]) -> Result<Value, Refusal> {
    serde_json::from_slice(body).map_err(|e| Refusal::bad_request(format!("invalid JSON: {e}")))
}

/// Every org with its users (as stored), exemptions, sync settings and cap; admins without
/// passwords; the PUT mode and counters.
async fn state(State(sim): State<ProofpointSim>) -> Json<Value> {
    let st = sim.state();
    let orgs: Map<String, Value> = st
        .orgs
        .iter()
        .map(|(key, o)| {
            let org = json!({
                "domain": o.domain,
                "stack": o.stack,
                "license_cap": o.license_cap,
                "users": o.users.values().collect::<Vec<_>>(),
                "exemptions": o.exemptions,
                "azure": o.azure,
            });
            (key.clone(), org)
        })
        .collect();
    let admins: Vec<Value> = st
        .admins
        .values()
        .map(|a| json!({ "username": a.username, "orgs": a.orgs, "read_only": a.read_only }))
        .collect();
    Json(json!({
        "put_mode": st.put_mode,
        "orgs": orgs,
        "admins": admins,
        "counters": st.counters,
    }))
}

/// Create an org (idempotent); an optional body `{"license_cap": n | null}` sets the cap.
async fn put_org(
    State(sim): State<ProofpointSim>,
    Path(domain): Path<String>,
    body: Bytes,
) -> Result<StatusCode, Refusal> {
    let cap = if body.is_empty() {
        Value::Null
    } else {
        json_body(&body)?
            .get_mut("license_cap")
            .map_or(Value::Null, Value::take)
    };
    let cap = match cap {
        Value::Null => None,
        n => Some(
            n.as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| Refusal::bad_request("license_cap must be a number"))?,
        ),
    };
    sim.add_org(&domain);
    sim.set_license_cap(&domain, cap)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Store a user as given (the set-up back door; see [`ProofpointSim::upsert_user`]).
async fn put_user(
    State(sim): State<ProofpointSim>,
    Path(domain): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, Refusal> {
    Ok(Json(sim.upsert_user_json(&domain, json_body(&body)?)?))
}

async fn requests(State(sim): State<ProofpointSim>) -> Json<Value> {
    Json(json!(sim.request_log()))
}

async fn writes(State(sim): State<ProofpointSim>) -> Json<Value> {
    Json(json!(sim.writes()))
}

async fn get_faults(State(sim): State<ProofpointSim>) -> Json<ProofpointSimFaults> {
    Json(sim.faults())
}

/// Replace the fault settings (the JSON form of [`ProofpointSimFaults`]).
async fn set_faults(State(sim): State<ProofpointSim>, body: Bytes) -> Result<StatusCode, Refusal> {
    let faults: ProofpointSimFaults = serde_json::from_slice(&body)
        .map_err(|e| Refusal::bad_request(format!("invalid faults: {e}")))?;
    faults.validate().map_err(Refusal::bad_request)?;
    sim.set_faults(faults);
    Ok(StatusCode::NO_CONTENT)
}
