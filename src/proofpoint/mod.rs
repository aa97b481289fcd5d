//! The Proofpoint Essentials seam: the [`ProofpointApi`] trait, the user model (which keeps
//! every field it does not know, so a read-modify-write PUT never drops data), and errors
//! classified for retry. [`client::ProofpointClient`] is the HTTP implementation.

pub mod client;

use std::time::Duration;

use async_trait::async_trait;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use url::Url;

/// Proofpoint user types that automation must never deactivate.
pub const ADMIN_TYPES: &[&str] = &[
    "organization_admin",
    "channel_admin",
    "strategic_partner_admin",
    "oem_partner_admin",
];
/// Shared mailboxes converted by admins: free, and left alone.
pub const FUNCTIONAL_ACCOUNT: &str = "functional_account";

/// A Proofpoint Essentials user. Only the fields flagrelay reasons about are typed; all
/// others are carried in `other` and written back untouched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PpUser {
    pub primary_email: String,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub user_type: Option<String>,
    #[serde(default)]
    pub is_active: bool,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

impl PpUser {
    pub fn is_admin(&self) -> bool {
        self.user_type
            .as_deref()
            .is_some_and(|t| ADMIN_TYPES.contains(&t))
    }

    pub fn is_functional(&self) -> bool {
        self.user_type.as_deref() == Some(FUNCTIONAL_ACCOUNT)
    }
}

/// Where and as whom to reach one Proofpoint organization.
#[derive(Clone)]
pub struct OrgAccess {
    /// The org's primary domain, as used in `/orgs/{domain}/...`.
    pub domain: String,
    /// `https://{stack}.proofpointessentials.com/api/v1`, or a simulator.
    pub base_url: Url,
    /// Admin e-mail sent as `X-User`.
    pub username: String,
    /// Sent as `X-Password`; never logged.
    pub password: SecretString,
}

impl std::fmt::Debug for OrgAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrgAccess")
            .field("domain", &self.domain)
            .field("base_url", &self.base_url.as_str())
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Errors talking to Proofpoint, classified by what the caller should do about them.
#[derive(Debug, thiserror::Error)]
pub enum PpError {
    /// 429: back off (Proofpoint sends no `Retry-After`; honoured if it ever does).
    #[error("proofpoint throttled the request (retry after {retry_after:?})")]
    Throttled { retry_after: Option<Duration> },
    #[error("proofpoint server error {status}: {body}")]
    Server { status: u16, body: String },
    #[error("proofpoint request timed out")]
    Timeout,
    #[error("proofpoint unreachable: {0}")]
    Transport(#[source] reqwest::Error),
    /// 401/403: wrong credentials or no rights on the org; an operator must act.
    #[error("proofpoint refused the credentials for org {org} (status {status})")]
    Unauthorized { org: String, status: u16 },
    /// Any other 4xx, or an answer we cannot parse (raw body kept for the log).
    #[error("proofpoint rejected the request (status {status}): {body}")]
    Rejected { status: u16, body: String },
}

impl PpError {
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Throttled { .. } | Self::Server { .. } | Self::Timeout | Self::Transport(_)
        )
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Throttled { retry_after } => *retry_after,
            _ => None,
        }
    }
}

/// The Proofpoint Essentials operations flagrelay needs.
#[async_trait]
pub trait ProofpointApi: Send + Sync + std::fmt::Debug {
    /// `GET /orgs/{domain}/users/{email}`; `Ok(None)` on 404.
    async fn get_user(&self, org: &OrgAccess, email: &str) -> Result<Option<PpUser>, PpError>;
    /// `PUT /orgs/{domain}/users/{email}` with the whole object.
    async fn put_user(&self, org: &OrgAccess, user: &PpUser) -> Result<(), PpError>;
    /// `GET /orgs/{domain}/users`: the whole org in one call.
    async fn list_users(&self, org: &OrgAccess) -> Result<Vec<PpUser>, PpError>;
    /// How many users the org has (the breaker's denominator), from the same call. The
    /// client counts without keeping the users: a large org would otherwise cost the worker
    /// hundreds of MB at every count.
    async fn count_users(&self, org: &OrgAccess) -> Result<usize, PpError> {
        Ok(self.list_users(org).await?.len())
    }
    /// `GET /orgs/{domain}/settings/azure/exemptions`: lower-cased addresses.
    async fn exemptions(&self, org: &OrgAccess) -> Result<Vec<String>, PpError>;
    /// `PUT /orgs/{domain}/settings/azure/exemptions` with one address.
    async fn add_exemption(&self, org: &OrgAccess, email: &str) -> Result<(), PpError>;
    /// `DELETE /orgs/{domain}/settings/azure/exemptions/{email}`.
    async fn remove_exemption(&self, org: &OrgAccess, email: &str) -> Result<(), PpError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_survive_a_round_trip() {
        let raw = serde_json::json!({
            "uid": 7, "primary_email": "a@example.com", "type": "end_user", "is_active": true,
            "alias_emails": ["b@example.com"], "odin_settings": {"x": 1}, "future_field": "kept"
        });
        let u: PpUser = serde_json::from_value(raw.clone()).unwrap();
        assert_eq!(serde_json::to_value(&u).unwrap(), raw);
    }

    #[test]
    fn debug_of_org_access_hides_the_password() {
        let o = OrgAccess {
            domain: "example.com".into(),
            base_url: "http://127.0.0.1:1/api/v1".parse().unwrap(),
            username: "admin@example.com".into(),
            password: SecretString::from("hunter2-very-secret".to_owned()),
        };
        assert!(!format!("{o:?}").contains("hunter2"));
    }
}
