//! Mailboxes in the simulator: a `userPurpose` per user who has one (kept beside the user,
//! not in [`crate::graph::GraphUser`]), and `GET /v1.0/users/{id}/mailboxSettings`.
//!
//! Answers, as Exchange Online gives them through Graph:
//! - no `MailboxSettings.Read` (or `.ReadWrite`) in the token: 403 `ErrorAccessDenied`;
//! - no such user: 404 `ErrorInvalidUser`;
//! - a user without a mailbox (the default here; in Graph: no Exchange licence, a guest, a
//!   mailbox still on-premises): 404 `MailboxNotEnabledForRESTAPI`;
//! - otherwise 200 with the settings, `$select` honoured loosely (unknown names ignored).
//!
//! Changing a mailbox's purpose notifies nobody: it is an Exchange setting, not a directory
//! property. (Converting to a shared mailbox often comes with `accountEnabled=false`, which
//! does notify: do that with [`GraphSim::set_account_enabled`].)

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Map, Value, json};

use super::api::{ApiError, api_base, find_user, gate, query_option};
use super::permissions::READ_MAILBOX_SETTINGS;
use super::{GraphSim, SimError};

/// The values Graph documents for `userPurpose` (plus its forward-compatibility marker).
pub const USER_PURPOSES: &[&str] = &[
    "user",
    "linked",
    "shared",
    "room",
    "equipment",
    "others",
    "unknownFutureValue",
];

pub(super) fn routes() -> Router<GraphSim> {
    Router::new().route("/v1.0/users/{id}/mailboxSettings", get(mailbox_settings))
}

impl GraphSim {
    /// Give a user a mailbox of this purpose (one of [`USER_PURPOSES`]), or take it away
    /// (`None`). No notification.
    pub fn set_mailbox_purpose(
        &self,
        tenant_id: &str,
        user_id: &str,
        purpose: Option<&str>,
    ) -> Result<(), SimError> {
        let purpose = purpose
            .map(|p| {
                USER_PURPOSES
                    .iter()
                    .find(|known| known.eq_ignore_ascii_case(p))
                    .ok_or_else(|| {
                        SimError::Invalid(format!(
                            "unknown userPurpose {p:?}; known: {}",
                            USER_PURPOSES.join(", ")
                        ))
                    })
            })
            .transpose()?;
        let mut st = self.state();
        let tenant = st.tenant_mut(tenant_id)?;
        let key = user_id.to_ascii_lowercase();
        if !tenant.users.contains_key(&key) {
            return Err(SimError::UnknownUser {
                tenant_id: tenant_id.to_owned(),
                user_id: user_id.to_owned(),
            });
        }
        match purpose {
            Some(p) => tenant.mailboxes.insert(key, (*p).to_owned()),
            None => tenant.mailboxes.remove(&key),
        };
        Ok(())
    }

    /// The user's mailbox purpose; `None` for no mailbox (or no such user).
    pub fn mailbox_purpose(&self, tenant_id: &str, user_id: &str) -> Option<String> {
        let st = self.state();
        st.tenants
            .get(&tenant_id.to_ascii_lowercase())?
            .mailboxes
            .get(&user_id.to_ascii_lowercase())
            .cloned()
    }
}

/// `GET /v1.0/users/{id | userPrincipalName}/mailboxSettings`.
async fn mailbox_settings(
    State(sim): State<GraphSim>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let caller = match gate(&sim, &headers).await {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let result = (|| {
        if !caller.has_any(READ_MAILBOX_SETTINGS) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "ErrorAccessDenied",
                "Access is denied. Check credentials and try again.",
            ));
        }
        let purpose = {
            let st = sim.state();
            let tenant = st.tenants.get(&caller.tenant_key);
            let Some((tenant, user)) = tenant.and_then(|t| find_user(t, &id).map(|u| (t, u)))
            else {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "ErrorInvalidUser",
                    format!("The requested user '{id}' is invalid."),
                ));
            };
            tenant.mailboxes.get(&user.id.to_ascii_lowercase()).cloned()
        };
        let Some(purpose) = purpose else {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "MailboxNotEnabledForRESTAPI",
                "The mailbox is either inactive, soft-deleted, or is hosted on-premise.",
            ));
        };
        let select = query_option(query.as_deref(), "select");
        let body = render(&purpose, &id, select.as_deref(), &api_base(&headers));
        Ok((StatusCode::OK, axum::Json(Value::Object(body))).into_response())
    })();
    caller.respond(result)
}

/// The settings, fixed apart from `userPurpose`, narrowed by `$select` when given.
fn render(purpose: &str, id: &str, select: Option<&str>, base: &str) -> Map<String, Value> {
    let full = json!({
        "archiveFolder": null,
        "timeZone": "UTC",
        "dateFormat": "yyyy-MM-dd",
        "timeFormat": "HH:mm",
        "delegateMeetingMessageDeliveryOptions": "sendToDelegateOnly",
        "language": {"locale": "en-US", "displayName": "English (United States)"},
        "userPurpose": purpose,
    });
    let mut out = Map::new();
    let select = select.map(str::trim).filter(|s| !s.is_empty());
    let context = match select {
        Some(s) => format!("{base}/$metadata#users('{id}')/mailboxSettings({s})"),
        None => format!("{base}/$metadata#users('{id}')/mailboxSettings"),
    };
    out.insert("@odata.context".into(), Value::String(context));
    if let Value::Object(full) = full {
        for (k, v) in full {
            let wanted = select.is_none_or(|list| {
                list.split(',')
                    .map(str::trim)
                    .any(|n| n.eq_ignore_ascii_case(&k))
            });
            if wanted {
                out.insert(k, v);
            }
        }
    }
    out
}
