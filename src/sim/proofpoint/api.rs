//! The simulated `/api/v1` routes, and the middleware that applies injected faults and
//! records every request (including ones the client abandoned).

use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{OriginalUri, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use chrono::Utc;
use serde_json::{Value, json};

use super::state::{Access, Admin, Refusal, looks_like_email};
use super::{ProofpointSim, RequestRecord};

/// The prefix every API path carries; stripped to find the org and e-mail for the log.
const PREFIX: &str = "/api/v1";

pub(super) fn router(sim: ProofpointSim) -> axum::Router {
    axum::Router::new()
        .route("/me", get(me))
        .route("/endpoints/{domain}", get(endpoint))
        .route("/orgs/{domain}/users", get(list_users).post(create_users))
        .route(
            "/orgs/{domain}/users/{email}",
            get(get_user).put(put_user).delete(delete_user),
        )
        .route(
            "/orgs/{domain}/settings/azure",
            get(get_azure).put(put_azure),
        )
        .route(
            "/orgs/{domain}/settings/azure/exemptions",
            get(list_exemptions)
                .put(add_exemptions)
                .delete(clear_exemptions),
        )
        .route(
            "/orgs/{domain}/settings/azure/exemptions/{email}",
            delete(remove_exemption),
        )
        .fallback(|| async { Refusal::new(StatusCode::NOT_FOUND, "No such endpoint") })
        .layer(middleware::from_fn_with_state(sim.clone(), observe))
        .with_state(sim)
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

type Answer = Result<Response, Refusal>;

/// `X-User` and `X-Password`; a header that is not valid text counts as missing.
fn credentials(headers: &HeaderMap) -> (Option<&str>, Option<&str>) {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    (get("x-user"), get("x-password"))
}

fn authorize<'s>(
    st: &'s super::State,
    headers: &HeaderMap,
    domain: Option<&str>,
    access: Access,
) -> Result<&'s Admin, Refusal> {
    let (user, password) = credentials(headers);
    st.authorize(user, password, domain, access)
}

fn parse_json(body: &[u8]) -> Result<Value, Refusal> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Refusal::bad_request("the request body is empty"));
    }
    serde_json::from_slice(body).map_err(|e| Refusal::bad_request(format!("invalid JSON: {e}")))
}

fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

async fn me(State(sim): State<ProofpointSim>, headers: HeaderMap) -> Answer {
    sim.mutate(|st| {
        let a = authorize(st, &headers, None, Access::Lookup)?;
        let kind = if a.orgs.is_some() {
            "organization_admin"
        } else {
            "channel_admin"
        };
        Ok(Json(json!({
            "uid": a.uid,
            "primary_email": a.username,
            "type": kind,
            "read_only": a.read_only,
            "orgs": a.orgs,
        }))
        .into_response())
    })
}

async fn endpoint(
    State(sim): State<ProofpointSim>,
    headers: HeaderMap,
    Path(domain): Path<String>,
) -> Answer {
    sim.mutate(|st| {
        authorize(st, &headers, Some(&domain), Access::Lookup)?;
        let org = st.org(&domain)?;
        let url = format!("https://{}.proofpointessentials.com/api/v1", org.stack);
        Ok(Json(json!({ "domain": org.domain, "stack": org.stack, "url": url })).into_response())
    })
}

async fn list_users(
    State(sim): State<ProofpointSim>,
    headers: HeaderMap,
    Path(domain): Path<String>,
) -> Answer {
    sim.mutate(|st| {
        authorize(st, &headers, Some(&domain), Access::Read)?;
        let users: Vec<&serde_json::Map<String, Value>> = st.org(&domain)?.users.values().collect();
        Ok(Json(json!({ "users": users })).into_response())
    })
}

async fn create_users(
    State(sim): State<ProofpointSim>,
    headers: HeaderMap,
    Path(domain): Path<String>,
    body: Bytes,
) -> Answer {
    sim.mutate(|st| {
        authorize(st, &headers, Some(&domain), Access::Write)?;
        match parse_json(&body)? {
            Value::Array(items) => {
                let (created, errors) = st.create_users(&domain, items);
                // Any success is a 201 with the failures listed; nothing created is a 400.
                let status = if created.is_empty() && !errors.is_empty() {
                    StatusCode::BAD_REQUEST
                } else {
                    StatusCode::CREATED
                };
                Ok((status, Json(json!({ "users": created, "errors": errors }))).into_response())
            }
            obj @ Value::Object(_) => {
                let created = st.create_user(&domain, obj)?;
                Ok((StatusCode::CREATED, Json(created)).into_response())
            }
            _ => Err(Refusal::bad_request(
                "the body must be a user object or a list of them",
            )),
        }
    })
}

async fn get_user(
    State(sim): State<ProofpointSim>,
    headers: HeaderMap,
    Path((domain, email)): Path<(String, String)>,
) -> Answer {
    sim.mutate(|st| {
        authorize(st, &headers, Some(&domain), Access::Read)?;
        let user = st
            .org(&domain)?
            .users
            .get(&email.to_ascii_lowercase())
            .ok_or_else(|| Refusal::listed(StatusCode::NOT_FOUND, "User not found", &email))?;
        Ok(Json(user).into_response())
    })
}

async fn put_user(
    State(sim): State<ProofpointSim>,
    headers: HeaderMap,
    Path((domain, email)): Path<(String, String)>,
    body: Bytes,
) -> Answer {
    sim.mutate(|st| {
        authorize(st, &headers, Some(&domain), Access::Write)?;
        st.put_user(&domain, &email, parse_json(&body)?)?;
        Ok(no_content())
    })
}

async fn delete_user(
    State(sim): State<ProofpointSim>,
    headers: HeaderMap,
    Path((domain, email)): Path<(String, String)>,
) -> Answer {
    sim.mutate(|st| {
        authorize(st, &headers, Some(&domain), Access::Write)?;
        st.delete_user(&domain, &email)?;
        Ok(no_content())
    })
}

async fn get_azure(
    State(sim): State<ProofpointSim>,
    headers: HeaderMap,
    Path(domain): Path<String>,
) -> Answer {
    sim.mutate(|st| {
        authorize(st, &headers, Some(&domain), Access::Read)?;
        Ok(Json(&st.org(&domain)?.azure).into_response())
    })
}

async fn put_azure(
    State(sim): State<ProofpointSim>,
    headers: HeaderMap,
    Path(domain): Path<String>,
    body: Bytes,
) -> Answer {
    sim.mutate(|st| {
        authorize(st, &headers, Some(&domain), Access::Write)?;
        st.put_azure(&domain, parse_json(&body)?)?;
        Ok(no_content())
    })
}

async fn list_exemptions(
    State(sim): State<ProofpointSim>,
    headers: HeaderMap,
    Path(domain): Path<String>,
) -> Answer {
    sim.mutate(|st| {
        authorize(st, &headers, Some(&domain), Access::Read)?;
        let list: Vec<Value> = st
            .org(&domain)?
            .exemptions
            .iter()
            .map(|e| json!({ "email": e }))
            .collect();
        Ok(Json(list).into_response())
    })
}

async fn add_exemptions(
    State(sim): State<ProofpointSim>,
    headers: HeaderMap,
    Path(domain): Path<String>,
    body: Bytes,
) -> Answer {
    sim.mutate(|st| {
        authorize(st, &headers, Some(&domain), Access::Write)?;
        st.add_exemptions(&domain, &exemption_addresses(&body)?)?;
        Ok(no_content())
    })
}

async fn clear_exemptions(
    State(sim): State<ProofpointSim>,
    headers: HeaderMap,
    Path(domain): Path<String>,
) -> Answer {
    sim.mutate(|st| {
        authorize(st, &headers, Some(&domain), Access::Write)?;
        st.clear_exemptions(&domain)?;
        Ok(no_content())
    })
}

async fn remove_exemption(
    State(sim): State<ProofpointSim>,
    headers: HeaderMap,
    Path((domain, email)): Path<(String, String)>,
) -> Answer {
    sim.mutate(|st| {
        authorize(st, &headers, Some(&domain), Access::Write)?;
        st.remove_exemption(&domain, &email)?;
        Ok(no_content())
    })
}

/// The addresses in an exemptions PUT. The real body shape is UNDOCUMENTED ("the address(es)
/// to add, comma-separated"), so every plausible reading is accepted: a JSON object with
/// `emails` or `email` (a comma-separated string or a list), a JSON list of strings or of
/// `{email}` objects, a JSON string, or a plain-text comma-separated body.
pub(super) fn exemption_addresses(body: &[u8]) -> Result<Vec<String>, Refusal> {
    fn from_value(v: &Value, out: &mut Vec<String>) -> Result<(), Refusal> {
        match v {
            Value::String(s) => out.extend(split_list(s)),
            Value::Array(items) => {
                for item in items {
                    from_value(item, out)?;
                }
            }
            Value::Object(m) => match m.get("emails").or_else(|| m.get("email")) {
                Some(inner) => from_value(inner, out)?,
                None => return Err(Refusal::bad_request("expected `emails` or `email`")),
            },
            _ => return Err(Refusal::bad_request("expected e-mail addresses")),
        }
        Ok(())
    }
    let mut out = Vec::new();
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => from_value(&v, &mut out)?,
        Err(_) => {
            let text = std::str::from_utf8(body)
                .map_err(|_| Refusal::bad_request("the body is neither JSON nor text"))?;
            out.extend(split_list(text));
        }
    }
    if let Some(bad) = out.iter().find(|e| !looks_like_email(e)) {
        return Err(Refusal::bad_request(format!(
            "not an e-mail address: {bad}"
        )));
    }
    Ok(out)
}

fn split_list(s: &str) -> impl Iterator<Item = String> + '_ {
    s.split([',', ';', '\n'])
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_owned)
}

/// The org and address a path is about, for the request log.
fn path_subjects(path: &str) -> (Option<String>, Option<String>) {
    let rest = path.strip_prefix(PREFIX).unwrap_or(path);
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .to_ascii_lowercase()
    };
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        ["endpoints", d, ..] => (Some(decode(d)), None),
        ["orgs", d, "users", e, ..] | ["orgs", d, "settings", "azure", "exemptions", e, ..] => {
            (Some(decode(d)), Some(decode(e)))
        }
        ["orgs", d, ..] => (Some(decode(d)), None),
        _ => (None, None),
    }
}

/// Applies the fault decision, then records the request when dropped: at the end of the
/// answer, or earlier when the client gives up (recorded as 499).
async fn observe(State(sim): State<ProofpointSim>, req: Request, next: Next) -> Response {
    let path = req
        .extensions()
        .get::<OriginalUri>()
        .map_or_else(|| req.uri().path().to_owned(), |u| u.path().to_owned());
    let (org, email) = path_subjects(&path);
    let user = req
        .headers()
        .get("x-user")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut seen = Seen {
        sim: sim.clone(),
        record: Some(RequestRecord {
            method: req.method().to_string(),
            path,
            org,
            email,
            status: 499,
            user,
            injected: false,
            started: Instant::now(),
            finished: Instant::now(),
            started_at: Utc::now(),
            finished_at: Utc::now(),
        }),
    };
    let decision = sim.fault_state().decide(Instant::now());
    if !decision.delay.is_zero() {
        tokio::time::sleep(decision.delay).await;
    }
    let response = match decision.fail {
        Some(status) => {
            if let Some(r) = seen.record.as_mut() {
                r.injected = true;
            }
            injected(status, decision.retry_after_secs)
        }
        None => next.run(req).await,
    };
    if let Some(r) = seen.record.as_mut() {
        r.status = response.status().as_u16();
    }
    response
}

struct Seen {
    sim: ProofpointSim,
    record: Option<RequestRecord>,
}

impl Drop for Seen {
    fn drop(&mut self) {
        if let Some(mut r) = self.record.take() {
            r.finished = Instant::now();
            r.finished_at = Utc::now();
            tracing::debug!(
                method = %r.method,
                path = %r.path,
                status = r.status,
                injected = r.injected,
                "proofpoint sim request"
            );
            self.sim.state().record_request(r);
        }
    }
}

/// An injected failure: 5xx as an HTML page (as a gateway would answer, exercising lenient
/// parsing), 4xx as a JSON error; 429 with `Retry-After` when configured.
fn injected(status: u16, retry_after_secs: Option<u64>) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let reason = code.canonical_reason().unwrap_or("Error");
    let mut response = if code.is_server_error() {
        let page = format!(
            "<html><head><title>{status} {reason}</title></head><body><h1>{reason}</h1></body></html>"
        );
        (
            code,
            [(header::CONTENT_TYPE, HeaderValue::from_static("text/html"))],
            page,
        )
            .into_response()
    } else {
        Refusal::new(code, reason).into_response()
    };
    if code == StatusCode::TOO_MANY_REQUESTS
        && let Some(secs) = retry_after_secs
    {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exemption_bodies_in_every_plausible_shape() {
        let cases: &[&[u8]] = &[
            br#"{"emails":"a@x.com, b@x.com"}"#,
            br#"{"emails":["a@x.com","b@x.com"]}"#,
            br#"{"email":"a@x.com,b@x.com"}"#,
            br#"["a@x.com",{"email":"b@x.com"}]"#,
            br#""a@x.com,b@x.com""#,
            b"a@x.com,b@x.com\n",
        ];
        for body in cases {
            assert_eq!(
                exemption_addresses(body).unwrap(),
                ["a@x.com", "b@x.com"],
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        for bad in [&b"{\"other\":1}"[..], b"42", b"not-an-address"] {
            assert!(exemption_addresses(bad).is_err());
        }
    }

    #[test]
    fn paths_name_their_org_and_address() {
        assert_eq!(
            path_subjects("/api/v1/orgs/Ex.com/users/a%2Bb%40ex.com"),
            (Some("ex.com".into()), Some("a+b@ex.com".into()))
        );
        assert_eq!(
            path_subjects("/api/v1/orgs/ex.com/settings/azure/exemptions/a@ex.com"),
            (Some("ex.com".into()), Some("a@ex.com".into()))
        );
        assert_eq!(
            path_subjects("/api/v1/orgs/ex.com/users"),
            (Some("ex.com".into()), None)
        );
        assert_eq!(path_subjects("/api/v1/me"), (None, None));
    }
}
