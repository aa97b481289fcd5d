//! The Microsoft Graph seam: the [`GraphApi`] trait, the user model flagrelay reads, and the
//! error type that knows what is worth retrying. [`client::GraphClient`] is the HTTP
//! implementation (app-only tokens by client credentials, cached per tenant).

pub mod client;
mod paging;
mod token;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Properties the worker selects on `GET /users/{id}`. `accountEnabled` and `proxyAddresses`
/// only come back when selected.
pub const USER_SELECT: &[&str] = &[
    "id",
    "accountEnabled",
    "userPrincipalName",
    "mail",
    "proxyAddresses",
    "userType",
    "department",
    "companyName",
    "employeeType",
    "employeeLeaveDateTime",
    "onPremisesExtensionAttributes",
];

/// Properties [`GraphApi::users_with_address`] selects for each holder: enough to tell who
/// it is, whether it can sign in, and which of its properties carries the address.
pub const ADDRESS_HOLDER_SELECT: &[&str] = &[
    "id",
    "accountEnabled",
    "mail",
    "userPrincipalName",
    "proxyAddresses",
];

/// A Graph user as flagrelay reads it. Absent properties (not selected, or unset) are `None`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GraphUser {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_principal_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_addresses: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub department: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub company_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub employee_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub employee_leave_date_time: Option<DateTime<Utc>>,
    /// `extensionAttribute1`..`extensionAttribute15`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_premises_extension_attributes: Option<BTreeMap<String, Option<String>>>,
}

impl GraphUser {
    /// The primary SMTP address: the `proxyAddresses` entry with the upper-case `SMTP:` prefix.
    pub fn primary_smtp(&self) -> Option<&str> {
        self.proxy_addresses
            .as_ref()?
            .iter()
            .find_map(|p| p.strip_prefix("SMTP:"))
    }
}

/// A group a user belongs to, directly or through nested groups
/// (`GET /users/{id}/transitiveMemberOf/microsoft.graph.group?$select=id,displayName`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub id: String,
    /// `None` when the group has no name, or when the app may read users but not groups
    /// (only `User.Read.All`): Graph then returns each group with its id alone ("limited
    /// information"). Match groups by id to be independent of that.
    #[serde(rename = "displayName")]
    pub display_name: Option<String>,
}

/// A subscription to create (`POST /subscriptions`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewSubscription {
    pub change_type: String,
    pub notification_url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle_notification_url: Option<String>,
    pub resource: String,
    pub expiration_date_time: DateTime<Utc>,
    /// Never logged: `Debug` of this struct is only used in tests; the client redacts it.
    pub client_state: String,
}

/// A subscription as Graph returns it (never with `clientState`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subscription {
    pub id: String,
    pub resource: String,
    pub change_type: String,
    pub notification_url: String,
    #[serde(default)]
    pub lifecycle_notification_url: Option<String>,
    pub expiration_date_time: DateTime<Utc>,
}

/// One page of a users delta query (`GET /users/delta`).
#[derive(Debug, Clone, PartialEq)]
pub struct DeltaPage {
    /// Users created or changed (in a selected property) since the last round; on the first
    /// round, every user. Graph may repeat a user (on one page or across pages): process
    /// idempotently.
    pub users: Vec<GraphUser>,
    /// Users that left the directory since the last round.
    pub removed: Vec<RemovedUser>,
    /// Where to go next: another page of this round, or the link for the next round.
    pub next: DeltaNext,
}

impl DeltaPage {
    /// The link to store for the next round, when this is the round's last page.
    pub fn delta_link(&self) -> Option<&str> {
        match &self.next {
            DeltaNext::DeltaLink(link) => Some(link),
            DeltaNext::NextLink(_) => None,
        }
    }
}

/// A delta item carrying `@removed`: `{"id":"...","@removed":{"reason":"changed"|"deleted"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedUser {
    pub id: String,
    /// `"changed"`: soft delete (restorable for 30 days); `"deleted"`: hard delete. Kept as
    /// Graph sent it (Graph may add values).
    pub reason: String,
}

impl RemovedUser {
    /// Soft delete (`reason` = `changed`): the user may come back.
    pub fn is_soft_delete(&self) -> bool {
        self.reason.eq_ignore_ascii_case("changed")
    }
}

/// The link a delta page ends with. Both are whole URLs, to be called as they are with
/// [`GraphApi::users_delta_next`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeltaNext {
    /// `@odata.nextLink`: more pages of this round follow.
    NextLink(String),
    /// `@odata.deltaLink`: the round is complete; store this and call it later for changes.
    DeltaLink(String),
}

impl DeltaNext {
    pub fn link(&self) -> &str {
        match self {
            Self::NextLink(link) | Self::DeltaLink(link) => link,
        }
    }
}

/// Errors talking to Graph, classified by what the caller should do about them. `Clone`:
/// a batch that fails as a whole fails each of its reads with the same error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GraphError {
    /// 429 or 503: wait (`Retry-After` when Graph sent one) and try again.
    #[error("graph throttled the request (status {status}, retry after {retry_after:?})")]
    Throttled {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// Other 5xx: transient.
    #[error("graph server error {status}: {body}")]
    Server { status: u16, body: String },
    #[error("graph request timed out")]
    Timeout,
    #[error("graph unreachable: {0}")]
    Transport(#[source] std::sync::Arc<reqwest::Error>),
    /// The token endpoint refused our credentials, or Graph answered 401/403: an operator
    /// must fix the app registration; retrying will not help.
    #[error("graph refused authorization (status {status}): {body}")]
    Unauthorized { status: u16, body: String },
    /// The delta (or skip) token in a delta link is expired or unknown to Graph (`410 Gone`,
    /// or a 4xx with error code `syncStateNotFound` / `resyncRequired`). Retrying the same
    /// link will not help: start a full resync with [`GraphApi::users_delta_start`].
    #[error("graph delta token expired (status {status}); a full resync is needed: {body}")]
    DeltaTokenExpired { status: u16, body: String },
    /// Any other 4xx, or an answer we cannot parse.
    #[error("graph rejected the request (status {status}): {body}")]
    Rejected { status: u16, body: String },
}

impl GraphError {
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Throttled { .. } | Self::Server { .. } | Self::Timeout | Self::Transport(_)
        )
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Throttled { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// The Graph operations flagrelay needs.
#[async_trait]
pub trait GraphApi: Send + Sync + std::fmt::Debug {
    /// `GET /users/{id}?$select=...`; `Ok(None)` when Graph answers 404 (deleted user).
    async fn get_user(
        &self,
        tenant_id: &str,
        user_id: &str,
        select: &[&str],
    ) -> Result<Option<GraphUser>, GraphError>;

    /// `POST /subscriptions`. Graph performs the validation handshake before answering.
    async fn create_subscription(
        &self,
        tenant_id: &str,
        sub: &NewSubscription,
    ) -> Result<Subscription, GraphError>;

    /// `GET /subscriptions` (all pages).
    async fn list_subscriptions(&self, tenant_id: &str) -> Result<Vec<Subscription>, GraphError>;

    /// The groups the user is a member of, directly or through nested groups
    /// (`GET /users/{id}/transitiveMemberOf/microsoft.graph.group`, all pages).
    /// `Ok(None)` when Graph answers 404 (the user is gone).
    ///
    /// Application permission: `User.Read.All` is enough to list the groups, but then each
    /// comes with its id only ([`Group::display_name`] is `None`); `GroupMember.Read.All`
    /// (or `Group.Read.All`, `Directory.Read.All`) adds the names. With none of these Graph
    /// answers 403, i.e. [`GraphError::Unauthorized`].
    async fn member_of(
        &self,
        tenant_id: &str,
        user_id: &str,
    ) -> Result<Option<Vec<Group>>, GraphError>;

    /// The user's mailbox type, `userPurpose` of `GET /users/{id}/mailboxSettings`:
    /// `user`, `linked`, `shared`, `room`, `equipment` or `others` (Graph may add values).
    ///
    /// `Ok(None)` when Graph answers 404, which it does both for a user that does not exist
    /// and for a user without an Exchange Online mailbox (no licence, guest, or a mailbox
    /// still on-premises in a hybrid setup: `MailboxNotEnabledForRESTAPI`); the two read the
    /// same. Without `MailboxSettings.Read` Graph answers 403 `ErrorAccessDenied`, i.e.
    /// [`GraphError::Unauthorized`] (an Exchange application access policy that excludes
    /// the mailbox looks the same).
    async fn mailbox_purpose(
        &self,
        tenant_id: &str,
        user_id: &str,
    ) -> Result<Option<String>, GraphError>;

    /// The application permissions (`roles` claim) of the app-only token used for this
    /// tenant: the cached one, or a fresh one if none is cached. Reflects what Graph will
    /// authorize the next requests with: permission changes show up once a new token is
    /// issued. `Ok(None)` when the token is not a readable JWT or carries no `roles` claim
    /// (Entra leaves the claim out when no application permission is granted): unknown,
    /// for reporting only.
    async fn granted_permissions(&self, tenant_id: &str)
    -> Result<Option<Vec<String>>, GraphError>;

    /// `GET /users/delta?$select=...`: the first page of a full sync. Follow
    /// [`DeltaPage::next`] with [`GraphApi::users_delta_next`] until a page carries a
    /// [`DeltaNext::DeltaLink`]; store that for the next round. `$select` narrows tracking:
    /// later rounds only report users whose selected properties changed.
    async fn users_delta_start(
        &self,
        tenant_id: &str,
        select: &[&str],
    ) -> Result<DeltaPage, GraphError>;

    /// GET a `@odata.nextLink` or `@odata.deltaLink` exactly as Graph gave it. A link off
    /// the configured API origin is refused ([`GraphError::Rejected`]) without sending the
    /// token anywhere. [`GraphError::DeltaTokenExpired`] means: start over with
    /// [`GraphApi::users_delta_start`].
    async fn users_delta_next(&self, tenant_id: &str, link: &str) -> Result<DeltaPage, GraphError>;

    /// Every user of the tenant whose `mail`, `userPrincipalName` or any `proxyAddresses`
    /// entry (its `smtp:`/`SMTP:` prefix aside) equals `address`, case-insensitively: who
    /// else could a write under this address reach? `GET /users?$filter=...` (all pages),
    /// each user with [`ADDRESS_HOLDER_SELECT`].
    ///
    /// The answer is Graph's, not filtered again: every object Graph names counts as a
    /// holder, so a check built on it fails closed. Only users are searched (not groups or
    /// contacts, which can carry addresses too). An empty address is refused locally
    /// ([`GraphError::Rejected`] with status 400). Needs `User.Read.All`.
    async fn users_with_address(
        &self,
        tenant_id: &str,
        address: &str,
    ) -> Result<Vec<GraphUser>, GraphError>;

    /// `PATCH /subscriptions/{id}` with a new `expirationDateTime`. An unknown (expired and
    /// removed) subscription is [`GraphError::Rejected`] with status 404: create it again.
    async fn renew_subscription(
        &self,
        tenant_id: &str,
        subscription_id: &str,
        expiration: DateTime<Utc>,
    ) -> Result<Subscription, GraphError>;

    /// `DELETE /subscriptions/{id}`. Already gone (404) counts as deleted.
    async fn delete_subscription(
        &self,
        tenant_id: &str,
        subscription_id: &str,
    ) -> Result<(), GraphError>;

    /// `POST /subscriptions/{id}/reauthorize` (answer to `reauthorizationRequired`; does not
    /// extend the expiry).
    async fn reauthorize_subscription(
        &self,
        tenant_id: &str,
        subscription_id: &str,
    ) -> Result<(), GraphError>;
}
