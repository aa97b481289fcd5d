//! Durable worker state: what flagrelay must remember about a user between evaluations, and
//! the breaker's trip, kept as small JSON files written atomically (temp file, fsync, rename).
//!
//! Per user: when flagrelay first saw the account disabled (the start of a grace period that
//! is not measured from a leave date), whether flagrelay itself put the user on Proofpoint's
//! sync-exemption list (only such exemptions are ever removed), and the pending recheck.
//! A user's file is written only while its shard is held, so writers never race; workers on
//! several hosts must share the directory (a network volume), see README "Running in
//! production".

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::policy::Trip;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// What flagrelay remembers about one user.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserState {
    /// First time a worker saw the account with sign-in blocked (cleared when re-enabled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_since: Option<DateTime<Utc>>,
    /// flagrelay added this user to the sync-exemption list (so it may remove it again).
    #[serde(default)]
    pub exemption_added: bool,
    /// The recheck currently scheduled; rechecks for other times are stale and dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recheck_at: Option<DateTime<Utc>>,
}

/// The breaker's persisted state: a trip survives restarts until an operator releases it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BreakerFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tripped: Option<Trip>,
    /// Set by `flagrelay breaker release`; a trip older than this is released.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released_at: Option<DateTime<Utc>>,
}

/// A tenant's delta-query position.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct DeltaFile {
    #[serde(default)]
    tenant_id: Option<String>,
    #[serde(default)]
    delta_link: Option<String>,
    #[serde(default)]
    saved_at: Option<DateTime<Utc>>,
}

/// A directory of state files.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    /// Use (and create) `dir`.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StateError> {
        let dir = dir.into();
        std::fs::create_dir_all(dir.join("users")).map_err(|source| StateError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn user_path(&self, tenant_id: &str, user_id: &str) -> PathBuf {
        // Hashed: ids come from the network and must never become path components.
        let key = hex::encode(Sha256::digest(format!(
            "{}/{}",
            tenant_id.to_ascii_lowercase(),
            user_id.to_ascii_lowercase()
        )));
        self.dir
            .join("users")
            .join(&key[..2])
            .join(format!("{key}.json"))
    }

    pub fn user(&self, tenant_id: &str, user_id: &str) -> Result<UserState, StateError> {
        read(&self.user_path(tenant_id, user_id))
    }

    /// Write the user's state; an all-default state removes the file.
    pub fn put_user(
        &self,
        tenant_id: &str,
        user_id: &str,
        state: &UserState,
    ) -> Result<(), StateError> {
        let path = self.user_path(tenant_id, user_id);
        if *state == UserState::default() {
            return match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(StateError::Io { path, source: e })
                }
                _ => Ok(()),
            };
        }
        write_atomic(&path, state)
    }

    fn delta_path(&self, tenant_id: &str) -> PathBuf {
        let key = hex::encode(Sha256::digest(tenant_id.to_ascii_lowercase()));
        self.dir.join("delta").join(format!("{}.json", &key[..32]))
    }

    /// The stored `deltaLink` of a tenant (`None`: never synced).
    pub fn delta_link(&self, tenant_id: &str) -> Result<Option<String>, StateError> {
        Ok(read::<DeltaFile>(&self.delta_path(tenant_id))?.delta_link)
    }

    pub fn put_delta_link(&self, tenant_id: &str, link: &str) -> Result<(), StateError> {
        let file = DeltaFile {
            tenant_id: Some(tenant_id.to_owned()),
            delta_link: Some(link.to_owned()),
            saved_at: Some(Utc::now()),
        };
        write_atomic(&self.delta_path(tenant_id), &file)
    }

    pub fn breaker(&self) -> Result<BreakerFile, StateError> {
        read(&self.dir.join("breaker.json"))
    }

    pub fn put_breaker(&self, b: &BreakerFile) -> Result<(), StateError> {
        write_atomic(&self.dir.join("breaker.json"), b)
    }

    /// The trip in force, if any (a trip older than the last release is over).
    pub fn active_trip(&self) -> Result<Option<Trip>, StateError> {
        let file = self.breaker()?;
        Ok(file
            .tripped
            .filter(|t| file.released_at.is_none_or(|r| r < t.at)))
    }

    /// Operator release: workers see it at their next look at a held deactivation.
    pub fn release_breaker(&self, now: DateTime<Utc>) -> Result<Option<Trip>, StateError> {
        let mut file = self.breaker()?;
        let trip = self.active_trip()?;
        if trip.is_some() {
            file.released_at = Some(now);
            self.put_breaker(&file)?;
        }
        Ok(trip)
    }
}

fn read<T: Default + for<'de> Deserialize<'de>>(path: &Path) -> Result<T, StateError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt {
            path: path.to_owned(),
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(source) => Err(StateError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

fn write_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), StateError> {
    use std::io::Write as _;
    let io = |source| StateError::Io {
        path: path.to_owned(),
        source,
    };
    let parent = path.parent().expect("state paths have a parent");
    std::fs::create_dir_all(parent).map_err(io)?;
    let tmp = parent.join(format!(".{}.tmp", uuid::Uuid::new_v4().simple()));
    let bytes = serde_json::to_vec_pretty(value).expect("state serializes");
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_state_round_trips_and_default_removes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        assert_eq!(
            store.user("t", "../../etc/passwd").unwrap(),
            UserState::default()
        );
        let s = UserState {
            disabled_since: Some(Utc::now()),
            exemption_added: true,
            recheck_at: None,
        };
        store.put_user("T", "U1", &s).unwrap();
        assert_eq!(
            store.user("t", "u1").unwrap(),
            s,
            "ids compare case-insensitively"
        );
        store.put_user("t", "u1", &UserState::default()).unwrap();
        assert!(!store.user_path("t", "u1").exists());
    }

    #[test]
    fn a_corrupt_file_is_an_error_not_a_silent_reset() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("breaker.json"), b"{not json").unwrap();
        assert!(matches!(store.breaker(), Err(StateError::Corrupt { .. })));
    }
}
