//! `GET /v1.0/users/delta` of the simulator and the per-tenant change log behind it.
//!
//! Every user change gets the next version of the tenant's log, with the properties it
//! touched (creation touches all); removals are logged with Graph's reason (`deleted` for a
//! hard delete, `changed` for a soft delete). A round of pages is computed once, when it
//! starts, and served in slices of [`GraphSimSettings::delta_page_size`]: the first round
//! (no token) lists every current user, a delta link's round lists the users changed since
//! the token's version (only when a `$select`ed property changed) and `@removed` items. The
//! last page carries a delta link for the log's version when the round started, so changes
//! made while a client pages show up in its next round.
//!
//! Tokens are opaque random ids mapped to state (`$deltatoken` → version and `$select`;
//! `$skiptoken` → round and offset). Both outlive their use (a link may be called again) and
//! die after [`GraphSimSettings::delta_token_lifetime`] or
//! [`super::GraphSim::expire_delta_tokens`]; an unknown token gets Graph's
//! `syncStateNotFound` with [`GraphSimSettings::delta_token_expired_status`].
//!
//! Simplifications: without `$select` any change counts (Graph tracks its default property
//! set); changed users come with all selected properties (Graph promises "at least the
//! changed ones"); `$filter` is not supported; the change log is never pruned.
//!
//! [`GraphSimSettings::delta_page_size`]: super::GraphSimSettings::delta_page_size
//! [`GraphSimSettings::delta_token_lifetime`]: super::GraphSimSettings::delta_token_lifetime
//! [`GraphSimSettings::delta_token_expired_status`]: super::GraphSimSettings::delta_token_expired_status

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use rand::Rng;
use serde_json::{Value, json};

use super::api::{ApiError, Caller, api_base, gate_with, query_option, render_user};
use super::permissions::{READ_LIFECYCLE_INFO, READ_USERS};
use super::{GraphSim, Tenant};
use crate::graph::GraphUser;

/// `@removed.reason` of a hard delete.
pub(super) const HARD_DELETE: &str = "deleted";
/// `@removed.reason` of a soft delete (the user moved to deleted items).
pub(super) const SOFT_DELETE: &str = "changed";

pub(super) fn routes() -> Router<GraphSim> {
    Router::new().route("/v1.0/users/delta", get(users_delta))
}

/// One tenant's change log and the sync state handed out for it.
#[derive(Default)]
pub(super) struct DeltaLog {
    /// The version of the latest change (0: none yet).
    version: u64,
    changes: Vec<ChangeRecord>,
    /// By `$deltatoken`.
    tokens: HashMap<String, SyncState>,
    /// By round id (the part of `$skiptoken` before the `.`).
    rounds: HashMap<String, Round>,
}

struct ChangeRecord {
    version: u64,
    user_key: String,
    user_id: String,
    what: What,
}

enum What {
    /// The lower-cased names of the properties that changed; `None`: all (creation).
    Updated(Option<BTreeSet<String>>),
    Removed(&'static str),
}

/// What a `$deltatoken` stands for.
struct SyncState {
    version: u64,
    select: Option<String>,
    issued: Instant,
}

/// A round of delta pages, computed when it started.
struct Round {
    items: Vec<Value>,
    /// The log's version when the round started: its delta link continues from there.
    version: u64,
    select: Option<String>,
    issued: Instant,
}

impl DeltaLog {
    /// Log a creation (`before` = `None`) or an update; an update that changed nothing is
    /// not a change.
    pub(super) fn record_update(
        &mut self,
        key: &str,
        id: &str,
        before: Option<&GraphUser>,
        after: &GraphUser,
    ) {
        let touched = match before {
            None => None,
            Some(before) => {
                let changed = changed_properties(before, after);
                if changed.is_empty() {
                    return;
                }
                Some(changed)
            }
        };
        self.push(key, id, What::Updated(touched));
    }

    pub(super) fn record_removal(&mut self, key: &str, id: &str, reason: &'static str) {
        self.push(key, id, What::Removed(reason));
    }

    pub(super) fn expire_all(&mut self) {
        self.tokens.clear();
        self.rounds.clear();
    }

    fn push(&mut self, key: &str, id: &str, what: What) {
        self.version += 1;
        self.changes.push(ChangeRecord {
            version: self.version,
            user_key: key.to_owned(),
            user_id: id.to_owned(),
            what,
        });
    }

    fn prune(&mut self, lifetime: Duration, now: Instant) {
        self.tokens
            .retain(|_, t| now.duration_since(t.issued) < lifetime);
        self.rounds
            .retain(|_, r| now.duration_since(r.issued) < lifetime);
    }

    fn mint(&mut self, version: u64, select: Option<String>) -> String {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let state = SyncState {
            version,
            select,
            issued: Instant::now(),
        };
        self.tokens.insert(token.clone(), state);
        token
    }
}

/// The top-level user properties (lower-cased) whose JSON differs.
fn changed_properties(before: &GraphUser, after: &GraphUser) -> BTreeSet<String> {
    let (Ok(Value::Object(b)), Ok(Value::Object(a))) =
        (serde_json::to_value(before), serde_json::to_value(after))
    else {
        return BTreeSet::new();
    };
    b.keys()
        .chain(a.keys())
        .filter(|k| b.get(*k) != a.get(*k))
        .map(|k| k.to_ascii_lowercase())
        .collect()
}

/// The lower-cased `$select` names; `None`: no `$select` (every change counts).
fn selected(select: Option<&str>) -> Option<BTreeSet<String>> {
    let list = select.map(str::trim).filter(|s| !s.is_empty())?;
    Some(
        list.split(',')
            .map(|n| n.trim().to_ascii_lowercase())
            .filter(|n| !n.is_empty())
            .collect(),
    )
}

/// `GET /v1.0/users/delta` (needs `User.Read.All` or broader, like reading users).
async fn users_delta(
    State(sim): State<GraphSim>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let caller = match gate_with(&sim, &headers, READ_USERS).await {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let result = serve(&sim, &caller, query.as_deref(), &api_base(&headers));
    caller.respond(result)
}

/// Graph's answer to an expired or unknown token.
fn sync_state_not_found(status: u16) -> ApiError {
    ApiError::new(
        StatusCode::from_u16(status).unwrap_or(StatusCode::GONE),
        "syncStateNotFound",
        "The sync state of this delta link is not found or has expired. Start a full \
         synchronization without a delta token.",
    )
}

fn serve(
    sim: &GraphSim,
    caller: &Caller,
    query: Option<&str>,
    base: &str,
) -> Result<Response, ApiError> {
    let lifecycle = caller.has_any(READ_LIFECYCLE_INFO);
    let mut guard = sim.state();
    let st = &mut *guard;
    let settings = st.settings.clone();
    let duplicate_probability = st.faults.delta_duplicate_probability;
    let expired = || sync_state_not_found(settings.delta_token_expired_status);
    let tenant = st.tenants.get_mut(&caller.tenant_key).ok_or_else(expired)?;
    tenant
        .delta
        .prune(settings.delta_token_lifetime, Instant::now());

    let (round_id, offset) = if let Some(skip) = query_option(query, "skiptoken") {
        let (round, offset) = skip.split_once('.').ok_or_else(expired)?;
        let offset: usize = offset.parse().map_err(|_| expired())?;
        if !tenant.delta.rounds.contains_key(round) {
            return Err(expired());
        }
        (round.to_owned(), offset)
    } else {
        let (since, select) = match query_option(query, "deltatoken") {
            None => (None, query_option(query, "select")),
            Some(t) if t == "latest" => {
                let select = query_option(query, "select");
                check_select(select.as_deref())?;
                let version = tenant.delta.version;
                let token = tenant.delta.mint(version, select.clone());
                return Ok(page(
                    base,
                    select.as_deref(),
                    Vec::new(),
                    Link::Delta(&token),
                ));
            }
            Some(t) => {
                let sync = tenant.delta.tokens.get(&t).ok_or_else(expired)?;
                (Some(sync.version), sync.select.clone())
            }
        };
        check_select(select.as_deref())?;
        let items = match since {
            None => tenant
                .users
                .values()
                .map(|u| render_item(u, select.as_deref(), base, lifecycle))
                .collect::<Result<_, _>>()?,
            Some(version) => changes_since(tenant, version, select.as_deref(), base, lifecycle)?,
        };
        let round = Round {
            items,
            version: tenant.delta.version,
            select,
            issued: Instant::now(),
        };
        let id = uuid::Uuid::new_v4().simple().to_string();
        tenant.delta.rounds.insert(id.clone(), round);
        (id, 0)
    };

    let round = &tenant.delta.rounds[&round_id];
    let end = offset
        .saturating_add(settings.delta_page_size.max(1))
        .min(round.items.len());
    let slice = round.items.get(offset..end).unwrap_or_default();
    let mut items = Vec::with_capacity(slice.len());
    for item in slice {
        items.push(item.clone());
        let is_user = item.get("@removed").is_none();
        if is_user && duplicate_probability > 0.0 && st.rng.random_bool(duplicate_probability) {
            items.push(item.clone());
        }
    }
    let select = round.select.clone();
    if end < round.items.len() {
        let skip = format!("{round_id}.{end}");
        return Ok(page(base, select.as_deref(), items, Link::Next(&skip)));
    }
    let version = round.version;
    let token = tenant.delta.mint(version, select.clone());
    Ok(page(base, select.as_deref(), items, Link::Delta(&token)))
}

/// Graph's 400 for an unknown `$select` name, before any state is created.
fn check_select(select: Option<&str>) -> Result<(), ApiError> {
    render_user(&GraphUser::default(), select, "", true).map(drop)
}

/// A user as a delta item: its `$select`ed properties, without `@odata.context`.
pub(super) fn render_item(
    user: &GraphUser,
    select: Option<&str>,
    base: &str,
    lifecycle: bool,
) -> Result<Value, ApiError> {
    let mut map = render_user(user, select, base, lifecycle)?;
    map.remove("@odata.context");
    Ok(Value::Object(map))
}

/// The items of a delta link's round: users with a change to a selected property since
/// `since` (current state), then `@removed` for users gone since; ordered by last change.
fn changes_since(
    tenant: &Tenant,
    since: u64,
    select: Option<&str>,
    base: &str,
    lifecycle: bool,
) -> Result<Vec<Value>, ApiError> {
    struct Seen<'a> {
        last: u64,
        id: &'a str,
        relevant: bool,
        removed: Option<&'static str>,
    }
    let wanted = selected(select);
    let mut seen: HashMap<&str, Seen<'_>> = HashMap::new();
    for c in tenant.delta.changes.iter().filter(|c| c.version > since) {
        let entry = seen.entry(&c.user_key).or_insert(Seen {
            last: 0,
            id: &c.user_id,
            relevant: false,
            removed: None,
        });
        entry.last = c.version;
        entry.id = &c.user_id;
        match &c.what {
            What::Updated(touched) => {
                entry.relevant |= match (touched, &wanted) {
                    (None, _) | (_, None) => true,
                    (Some(t), Some(w)) => !t.is_disjoint(w),
                };
            }
            What::Removed(reason) => entry.removed = Some(reason),
        }
    }
    let mut order: Vec<(&str, Seen<'_>)> = seen.into_iter().collect();
    order.sort_by_key(|(_, s)| s.last);
    let mut items = Vec::new();
    for (key, s) in order {
        match tenant.users.get(key) {
            Some(user) if s.relevant => items.push(render_item(user, select, base, lifecycle)?),
            Some(_) => {}
            None => {
                if let Some(reason) = s.removed {
                    items.push(json!({"id": s.id, "@removed": {"reason": reason}}));
                }
            }
        }
    }
    Ok(items)
}

enum Link<'a> {
    /// A `$skiptoken`.
    Next(&'a str),
    /// A `$deltatoken`.
    Delta(&'a str),
}

fn page(base: &str, select: Option<&str>, items: Vec<Value>, link: Link<'_>) -> Response {
    let context = match select.filter(|s| !s.trim().is_empty()) {
        Some(s) => format!("{base}/$metadata#users({s})"),
        None => format!("{base}/$metadata#users"),
    };
    let mut body = json!({"@odata.context": context, "value": items});
    match link {
        Link::Next(skip) => {
            body["@odata.nextLink"] = json!(format!("{base}/users/delta?$skiptoken={skip}"));
        }
        Link::Delta(token) => {
            body["@odata.deltaLink"] = json!(format!("{base}/users/delta?$deltatoken={token}"));
        }
    }
    (StatusCode::OK, axum::Json(body)).into_response()
}
