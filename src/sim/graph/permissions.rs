//! Application permissions in the simulator: what each app registration is granted, the
//! JWT-shaped access tokens that carry them (`roles`), and the checks the API routes make.
//!
//! As in Entra, a token carries the permissions granted *when it was issued*: changing an
//! app's permissions affects new tokens only, and Graph authorizes by the token's `roles`.
//! Tokens are not signed (the signature part is random bytes); the simulator still
//! recognises tokens by the whole string, as before.

use axum::http::StatusCode;
use chrono::Utc;
use rand::RngCore;
use serde_json::json;

use super::api::{ApiError, Caller};
use super::{App, GraphSim, SimError};

/// What [`GraphSim::add_app`] grants: reading users (and subscribing to them).
pub const DEFAULT_PERMISSIONS: &[&str] = &["User.Read.All"];

/// Any of these lets an app read users, subscribe to them (and, in Graph, run user delta).
pub(super) const READ_USERS: &[&str] = &[
    "User.Read.All",
    "User.ReadWrite.All",
    "Directory.Read.All",
    "Directory.ReadWrite.All",
];

/// Any of these lets an app read groups: `transitiveMemberOf` then names them.
pub(super) const READ_GROUPS: &[&str] = &[
    "GroupMember.Read.All",
    "GroupMember.ReadWrite.All",
    "Group.Read.All",
    "Group.ReadWrite.All",
    "Directory.Read.All",
    "Directory.ReadWrite.All",
];

/// Any of these lets an app list a user's memberships (`transitiveMemberOf`); without one
/// of [`READ_GROUPS`] the groups come without names.
pub(super) const READ_MEMBERSHIPS: &[&str] = &[
    "User.Read.All",
    "User.ReadWrite.All",
    "GroupMember.Read.All",
    "GroupMember.ReadWrite.All",
    "Group.Read.All",
    "Group.ReadWrite.All",
    "Directory.Read.All",
    "Directory.ReadWrite.All",
];

/// Any of these lets an app read `mailboxSettings` (an Exchange permission: the directory
/// permissions do not cover it).
pub(super) const READ_MAILBOX_SETTINGS: &[&str] =
    &["MailboxSettings.Read", "MailboxSettings.ReadWrite"];

/// Needed, on top of reading users, to see `employeeLeaveDateTime`.
pub(super) const READ_LIFECYCLE_INFO: &[&str] = &[
    "User-LifeCycleInfo.Read.All",
    "User-LifeCycleInfo.ReadWrite.All",
];

impl Caller {
    /// Whether the caller's token carries any of `permissions` (exact names, as in tokens).
    pub fn has_any(&self, permissions: &[&str]) -> bool {
        self.roles.iter().any(|r| permissions.contains(&r.as_str()))
    }

    /// Graph's answer for a directory read the token's roles do not cover.
    pub fn require(&self, permissions: &[&str]) -> Result<(), ApiError> {
        if self.has_any(permissions) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "Authorization_RequestDenied",
                "Insufficient privileges to complete the operation.",
            ))
        }
    }
}

impl GraphSim {
    /// Replace the application permissions granted to an app registration (in every
    /// tenant). Tokens already issued keep the permissions they were issued with.
    pub fn set_app_permissions(
        &self,
        client_id: &str,
        permissions: &[&str],
    ) -> Result<(), SimError> {
        if let Some(p) = permissions
            .iter()
            .find(|p| p.trim().is_empty() || p.contains(char::is_whitespace))
        {
            return Err(SimError::Invalid(format!("{p:?} is not a permission name")));
        }
        let mut st = self.state();
        let app = st
            .apps
            .get_mut(&client_id.to_ascii_lowercase())
            .ok_or_else(|| SimError::UnknownApp(client_id.to_owned()))?;
        app.roles = dedup(permissions);
        Ok(())
    }

    /// The application permissions currently granted to an app registration.
    pub fn app_permissions(&self, client_id: &str) -> Result<Vec<String>, SimError> {
        self.state()
            .apps
            .get(&client_id.to_ascii_lowercase())
            .map(|a| a.roles.clone())
            .ok_or_else(|| SimError::UnknownApp(client_id.to_owned()))
    }
}

impl App {
    pub(super) fn with_default_permissions(secret: &str) -> Self {
        Self {
            secret: secret.into(),
            roles: dedup(DEFAULT_PERMISSIONS),
        }
    }
}

fn dedup(permissions: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(permissions.len());
    for p in permissions {
        if !out.iter().any(|o| o == p) {
            out.push((*p).to_owned());
        }
    }
    out
}

/// What goes into an app-only token.
pub(super) struct TokenClaims<'a> {
    pub tenant_id: &'a str,
    pub app_id: &'a str,
    /// The app's service principal in the tenant (`oid`, also subscriptions' `creatorId`).
    pub service_principal_id: &'a str,
    /// The resource the scope named, e.g. `https://graph.microsoft.com`.
    pub audience: &'a str,
    pub roles: &'a [String],
    pub lifetime_secs: u64,
}

/// A JWT-shaped app-only access token in Entra's v1 shape: `header.payload.signature`,
/// each base64url. `roles` is left out when empty, as Entra does.
pub(super) fn mint_token(c: &TokenClaims<'_>) -> String {
    let now = Utc::now().timestamp();
    let header = json!({"typ": "JWT", "alg": "RS256", "kid": "graph-sim-unsigned"});
    let mut payload = json!({
        "aud": c.audience,
        "iss": format!("https://sts.windows.net/{}/", c.tenant_id),
        "iat": now,
        "nbf": now,
        "exp": now.saturating_add(i64::try_from(c.lifetime_secs).unwrap_or(i64::MAX)),
        "appid": c.app_id,
        "appidacr": "1",
        "idtyp": "app",
        "oid": c.service_principal_id,
        "sub": c.service_principal_id,
        "tid": c.tenant_id,
        // Makes every token unique, so that lookup by the whole string stays unambiguous.
        "uti": base64url(&random_bytes::<16>()),
        "ver": "1.0",
    });
    if !c.roles.is_empty() {
        payload["roles"] = json!(c.roles);
    }
    format!(
        "{}.{}.{}",
        base64url(header.to_string().as_bytes()),
        base64url(payload.to_string().as_bytes()),
        base64url(&random_bytes::<64>()),
    )
}

/// An opaque token, for [`super::GraphSimSettings::opaque_tokens`].
pub(super) fn opaque_token() -> String {
    format!(
        "simtok.{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

/// Base64url without padding (RFC 4648 §5), as in JWTs.
pub(crate) fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        // 1, 2 or 3 bytes make 2, 3 or 4 characters.
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}
