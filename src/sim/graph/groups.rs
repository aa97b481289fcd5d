//! Groups in the simulator: per tenant, with users and groups as members (nesting), and
//! `GET /v1.0/users/{id}/transitiveMemberOf[/microsoft.graph.group]` computed from them.
//!
//! As in Graph, membership changes do not notify users subscriptions: nothing here calls
//! `notify`. Cycles are refused when a member is added (the walk is cycle-safe regardless).
//!
//! Permissions, as documented for Graph: any of `User.Read.All`, `GroupMember.Read.All`,
//! `Group.Read.All`, `Directory.Read.All` (or their ReadWrite forms) may list a user's
//! memberships, else 403 `Authorization_RequestDenied`. An app that may read users but not
//! groups gets each group with `id` only and `displayName: null` ("limited information").
//!
//! Paging: `$top` (1..=999, default 100) capped by
//! [`super::GraphSimSettings::member_of_page_size`]; `@odata.nextLink` carries the query
//! and a `$skiptoken`. `$count=true` adds `@odata.count`.
//!
//! The cast form is held to Graph's documentation literally: it is an "advanced query" and
//! needs `ConsistencyLevel: eventual` and `$count=true`, else 400 `Request_UnsupportedQuery`.
//! (Whether Graph enforces that on this path is unclear; a client that passes here works
//! either way.)

use std::collections::{BTreeMap, BTreeSet};

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::api::{
    ApiError, api_base, eventual_consistency, find_user, gate_with, query_option, user_not_found,
};
use super::paging::{Paging, next_query};
use super::permissions::{READ_GROUPS, READ_MEMBERSHIPS};
use super::{GraphSim, SimError, Tenant};
use crate::graph::Group;

/// A group as the simulator stores it.
pub(super) struct GroupRecord {
    /// As first given (ids compare case-insensitively).
    pub id: String,
    pub display_name: String,
    /// Direct members: lower-cased ids of users and groups.
    pub members: BTreeSet<String>,
}

/// A group and its direct members, as [`GraphSim::groups`] and `/_sim` report it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimGroup {
    pub id: String,
    #[serde(rename = "displayName")]
    pub display_name: String,
    /// Ids of the direct members (users and groups), as the objects spell them.
    pub members: Vec<String>,
}

pub(super) fn routes() -> Router<GraphSim> {
    Router::new()
        .route(
            "/v1.0/users/{id}/transitiveMemberOf",
            get(transitive_member_of),
        )
        .route(
            "/v1.0/users/{id}/transitiveMemberOf/microsoft.graph.group",
            get(transitive_member_of),
        )
}

/// Keys of every group `member_key` belongs to, directly or through nested groups.
fn transitive_keys(groups: &BTreeMap<String, GroupRecord>, member_key: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut frontier = vec![member_key.to_owned()];
    while let Some(member) = frontier.pop() {
        for (key, group) in groups {
            if group.members.contains(&member) && found.insert(key.clone()) {
                frontier.push(key.clone());
            }
        }
    }
    found
}

impl Tenant {
    fn group_mut(&mut self, group_id: &str) -> Result<&mut GroupRecord, SimError> {
        let tenant_id = self.id.clone();
        self.groups
            .get_mut(&group_id.to_ascii_lowercase())
            .ok_or_else(|| SimError::UnknownGroup {
                tenant_id,
                group_id: group_id.to_owned(),
            })
    }

    /// The id of a user or group as the object spells it.
    fn object_id(&self, key: &str) -> String {
        self.users
            .get(key)
            .map(|u| u.id.clone())
            .or_else(|| self.groups.get(key).map(|g| g.id.clone()))
            .unwrap_or_else(|| key.to_owned())
    }
}

impl GraphSim {
    /// Create a group, or rename it if it exists (members are kept). No notification.
    pub fn add_group(
        &self,
        tenant_id: &str,
        group_id: &str,
        display_name: &str,
    ) -> Result<(), SimError> {
        if group_id.trim().is_empty() || display_name.trim().is_empty() {
            return Err(SimError::Invalid(
                "a group needs a non-empty id and displayName".into(),
            ));
        }
        let mut st = self.state();
        let tenant = st.tenant_mut(tenant_id)?;
        let key = group_id.to_ascii_lowercase();
        if tenant.users.contains_key(&key) {
            return Err(SimError::Invalid(format!(
                "{group_id} is already a user's id (directory object ids are unique)"
            )));
        }
        tenant
            .groups
            .entry(key)
            .and_modify(|g| g.display_name = display_name.to_owned())
            .or_insert_with(|| GroupRecord {
                id: group_id.to_owned(),
                display_name: display_name.to_owned(),
                members: BTreeSet::new(),
            });
        Ok(())
    }

    /// Make a user or a group a direct member of a group (idempotent). Refused when it
    /// would make a group a member of itself, directly or through nesting. As in Graph,
    /// no user notification follows.
    pub fn add_member(
        &self,
        tenant_id: &str,
        group_id: &str,
        member_id: &str,
    ) -> Result<(), SimError> {
        let mut st = self.state();
        let tenant = st.tenant_mut(tenant_id)?;
        let group_key = group_id.to_ascii_lowercase();
        let member_key = member_id.to_ascii_lowercase();
        tenant.group_mut(group_id)?;
        if tenant.groups.contains_key(&member_key) {
            if member_key == group_key
                || transitive_keys(&tenant.groups, &group_key).contains(&member_key)
            {
                return Err(SimError::Invalid(format!(
                    "adding group {member_id} to {group_id} would make a membership cycle"
                )));
            }
        } else if !tenant.users.contains_key(&member_key) {
            return Err(SimError::UnknownMember {
                tenant_id: tenant_id.to_owned(),
                member_id: member_id.to_owned(),
            });
        }
        tenant.group_mut(group_id)?.members.insert(member_key);
        Ok(())
    }

    /// Remove a direct member from a group. No notification.
    pub fn remove_member(
        &self,
        tenant_id: &str,
        group_id: &str,
        member_id: &str,
    ) -> Result<(), SimError> {
        let mut st = self.state();
        let tenant = st.tenant_mut(tenant_id)?;
        if tenant
            .group_mut(group_id)?
            .members
            .remove(&member_id.to_ascii_lowercase())
        {
            Ok(())
        } else {
            Err(SimError::NotAMember {
                tenant_id: tenant_id.to_owned(),
                group_id: group_id.to_owned(),
                member_id: member_id.to_owned(),
            })
        }
    }

    /// The tenant's groups with their direct members, ordered by id.
    pub fn groups(&self, tenant_id: &str) -> Result<Vec<SimGroup>, SimError> {
        let mut st = self.state();
        let tenant = st.tenant_mut(tenant_id)?;
        Ok(tenant
            .groups
            .values()
            .map(|g| SimGroup {
                id: g.id.clone(),
                display_name: g.display_name.clone(),
                members: g.members.iter().map(|m| tenant.object_id(m)).collect(),
            })
            .collect())
    }

    /// The groups a user belongs to, directly or through nested groups, ordered by id:
    /// what `transitiveMemberOf` answers to an app that may read groups.
    pub fn transitive_groups(
        &self,
        tenant_id: &str,
        user_id: &str,
    ) -> Result<Vec<Group>, SimError> {
        let mut st = self.state();
        let tenant = st.tenant_mut(tenant_id)?;
        let key = user_id.to_ascii_lowercase();
        if !tenant.users.contains_key(&key) {
            return Err(SimError::UnknownUser {
                tenant_id: tenant_id.to_owned(),
                user_id: user_id.to_owned(),
            });
        }
        Ok(transitive_keys(&tenant.groups, &key)
            .iter()
            .filter_map(|k| tenant.groups.get(k))
            .map(|g| Group {
                id: g.id.clone(),
                display_name: Some(g.display_name.clone()),
            })
            .collect())
    }
}

/// `GET /v1.0/users/{id}/transitiveMemberOf[/microsoft.graph.group]`. Only groups are
/// modelled, so the cast changes nothing.
async fn transitive_member_of(
    State(sim): State<GraphSim>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let caller = match gate_with(&sim, &headers, READ_MEMBERSHIPS).await {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let result = (|| {
        let query = query.as_deref();
        let count = query_option(query, "count").is_some_and(|c| c.eq_ignore_ascii_case("true"));
        let eventual = eventual_consistency(&headers);
        if uri.path().ends_with("/microsoft.graph.group") && !(count && eventual) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "Request_UnsupportedQuery",
                "Unsupported Query. An OData cast needs the ConsistencyLevel: eventual header \
                 and $count=true.",
            ));
        }
        let Paging { top, skip } = Paging::from_query(query)?;
        let select = query_option(query, "select");
        let names_visible = caller.has_any(READ_GROUPS);
        let st = sim.state();
        let page_size = top.min(st.settings.member_of_page_size.max(1));
        let tenant = st.tenants.get(&caller.tenant_key);
        let Some((tenant, user)) = tenant.and_then(|t| find_user(t, &id).map(|u| (t, u))) else {
            return Err(user_not_found(&id));
        };
        let all: Vec<&GroupRecord> = transitive_keys(&tenant.groups, &user.id.to_ascii_lowercase())
            .iter()
            .filter_map(|k| tenant.groups.get(k))
            .collect();
        let base = api_base(&headers);
        let value: Vec<Value> = all
            .iter()
            .skip(skip)
            .take(page_size)
            .map(|g| render_group(g, select.as_deref(), names_visible))
            .collect();
        let context = match select.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
            Some(s) => format!("{base}/$metadata#groups({s})"),
            None => format!("{base}/$metadata#groups"),
        };
        let mut body = json!({"@odata.context": context, "value": value});
        if count {
            body["@odata.count"] = json!(all.len());
        }
        if skip + page_size < all.len() {
            let path = uri.path().strip_prefix("/v1.0").unwrap_or(uri.path());
            body["@odata.nextLink"] = json!(format!(
                "{base}{path}?{}",
                next_query(query, skip + page_size)
            ));
        }
        Ok((StatusCode::OK, axum::Json(body)).into_response())
    })();
    caller.respond(result)
}

/// A group as `transitiveMemberOf` renders it: `@odata.type` and `id` always, the selected
/// properties loosely (`displayName` is the only one modelled; others are `null`), and
/// `displayName: null` when the caller may not read groups.
fn render_group(group: &GroupRecord, select: Option<&str>, names_visible: bool) -> Value {
    let mut out = Map::new();
    out.insert("@odata.type".into(), json!("#microsoft.graph.group"));
    out.insert("id".into(), json!(group.id));
    let display_name = if names_visible {
        json!(group.display_name)
    } else {
        Value::Null
    };
    match select.map(str::trim).filter(|s| !s.is_empty()) {
        None => {
            out.insert("displayName".into(), display_name);
        }
        Some(list) => {
            for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                if name.eq_ignore_ascii_case("displayName") {
                    out.insert("displayName".into(), display_name.clone());
                } else if !name.eq_ignore_ascii_case("id") {
                    out.insert(name.to_owned(), Value::Null);
                }
            }
        }
    }
    Value::Object(out)
}
