//! Typed, normalized identifiers: the Entra tenant id and the Graph user id, lower-cased once
//! where they enter flagrelay (the receiver, the configuration, delta pages, the bus), so the
//! shard key, the per-user lock, coalescing, the state store's keys and the org map all see
//! one spelling of one user.
//!
//! Graph answers ids in whatever casing it stored (tenant ids in notifications have been
//! seen upper-cased), configurations are typed by hand, and a user can be named by its
//! object id or its UPN. Before this module, each spelling was a different key: the same user
//! reached two shards, which broke per-user serialization across processes.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// An Entra tenant id (a GUID), lower-cased and trimmed.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize)]
#[serde(transparent)]
pub struct TenantId(String);

impl TenantId {
    pub fn new(raw: &str) -> Self {
        Self(raw.trim().to_ascii_lowercase())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A Graph user id: the object id (a GUID) or, until it is resolved, a UPN; lower-cased and
/// trimmed (both compare case-insensitively in Entra).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize)]
#[serde(transparent)]
pub struct UserId(String);

impl UserId {
    pub fn new(raw: &str) -> Self {
        Self(raw.trim().to_ascii_lowercase())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is an object id (GUID shape). Anything else (a UPN) must be resolved to
    /// the object id before it keys a shard, a lock or a state row.
    pub fn is_object_id(&self) -> bool {
        uuid::Uuid::try_parse(&self.0).is_ok()
    }
}

/// One user of one tenant: the key of the shard, the per-user lock, coalescing and every
/// per-user row in the state store.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserKey {
    pub tenant: TenantId,
    pub user: UserId,
}

impl UserKey {
    pub fn new(tenant: TenantId, user: UserId) -> Self {
        Self { tenant, user }
    }
}

impl fmt::Display for UserKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tenant, self.user)
    }
}

macro_rules! id_impls {
    ($t:ident) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl From<&str> for $t {
            fn from(raw: &str) -> Self {
                Self::new(raw)
            }
        }

        impl From<String> for $t {
            fn from(raw: String) -> Self {
                Self::new(&raw)
            }
        }

        impl From<&String> for $t {
            fn from(raw: &String) -> Self {
                Self::new(raw)
            }
        }

        /// Read as the normalized string wherever a `&str` is wanted (API paths, labels).
        impl std::ops::Deref for $t {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $t {
            fn eq(&self, other: &str) -> bool {
                self.0.eq_ignore_ascii_case(other.trim())
            }
        }

        impl PartialEq<&str> for $t {
            fn eq(&self, other: &&str) -> bool {
                self.0.eq_ignore_ascii_case(other.trim())
            }
        }

        /// Normalized on the way in: whatever the bus, a file or Graph wrote.
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d).map(|s| Self::new(&s))
            }
        }
    };
}

id_impls!(TenantId);
id_impls!(UserId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_normalized_however_they_arrive() {
        let a = TenantId::new(" 11111111-AAAA-3333-4444-555555555555 ");
        let b: TenantId = serde_json::from_str("\"11111111-aaaa-3333-4444-555555555555\"").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.as_str(), "11111111-aaaa-3333-4444-555555555555");
        let upn = UserId::new("Alice@Contoso.COM");
        assert_eq!(upn.as_str(), "alice@contoso.com");
        assert!(!upn.is_object_id());
        assert!(UserId::new("6F1C2B9A-0000-4000-8000-00000000000A").is_object_id());
        assert_eq!(
            UserKey::new(a, UserId::new("U1")).to_string(),
            "11111111-aaaa-3333-4444-555555555555/u1"
        );
    }
}
