//! The one-time import of a JSON state directory (flagrelay before the state store: one file
//! per user under `users/`, one per tenant under `delta/`, and `breaker.json`). It runs at
//! start when `worker.state_dir` holds such files and the store has no record of importing
//! that directory; the files are left untouched.
//!
//! The user files are named by a hash of `tenant/user` and do not name the user, so they are
//! kept by that hash (`legacy_users`) and read when the user has no row of its own; the
//! first write of the user replaces it. A trip in `breaker.json` becomes a trip of the global
//! scope (the old breaker did not know orgs): deactivations stay held until released.

use std::path::Path;

use chrono::Utc;
use serde::Deserialize;

use super::sql::{Pool, SqlStore, on_pool};
use super::{StoreError, UserState};
use crate::ids::TenantId;
use crate::policy::breaker::Trip;

#[derive(Debug, Deserialize)]
struct DeltaFile {
    #[serde(default)]
    tenant_id: Option<String>,
    #[serde(default)]
    delta_link: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct BreakerFile {
    #[serde(default)]
    tripped: Option<Trip>,
    #[serde(default)]
    released_at: Option<chrono::DateTime<Utc>>,
}

/// What an import found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Imported {
    pub users: usize,
    pub delta_links: usize,
    pub trip: bool,
}

/// Import `dir` once (see the module docs). `Ok(None)`: nothing to import, or done before.
pub async fn json_state_dir(store: &SqlStore, dir: &Path) -> Result<Option<Imported>, StoreError> {
    let has_json = ["users", "delta", "breaker.json"]
        .iter()
        .any(|p| dir.join(p).exists());
    if !has_json {
        return Ok(None);
    }
    let marker = format!(
        "json_import:{}",
        std::fs::canonicalize(dir)
            .unwrap_or_else(|_| dir.to_owned())
            .display()
    );
    use super::Store as _;
    if store.meta(&marker).await?.is_some() {
        return Ok(None);
    }
    let failed = |reason: String| StoreError::Import {
        path: dir.display().to_string(),
        reason,
    };
    let users = read_users(dir).map_err(&failed)?;
    let links = read_delta(dir).map_err(&failed)?;
    let trip = read_trip(dir).map_err(&failed)?;
    let imported = Imported {
        users: users.len(),
        delta_links: links.len(),
        trip: trip.is_some(),
    };
    let now = super::sql::ms(Utc::now());
    on_pool!(store, p => async {
        let mut tx = p.begin().await?;
        for (hash, state) in &users {
            let json = serde_json::to_string(state).expect("state serializes");
            sqlx::query("INSERT INTO legacy_users (key_hash, state) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(hash).bind(json).execute(&mut *tx).await?;
        }
        for (tenant, link) in &links {
            sqlx::query(
                "INSERT INTO delta_links (tenant_id, link, saved_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            )
            .bind(tenant.as_str()).bind(link).bind(now).execute(&mut *tx).await?;
        }
        if let Some(trip) = &trip {
            let mut trip = trip.clone();
            trip.scope = super::sql::GLOBAL.into();
            let json = serde_json::to_string(&trip).expect("a trip serializes");
            sqlx::query("UPDATE breaker_scopes SET trip = $1 WHERE scope = 'global' AND trip IS NULL")
                .bind(json).execute(&mut *tx).await?;
        }
        sqlx::query("INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING")
            .bind(&marker).bind(Utc::now().to_rfc3339()).execute(&mut *tx).await?;
        tx.commit().await
    }.await)
    .map_err(|e| store.err(e))?;
    tracing::info!(
        dir = %dir.display(),
        users = imported.users,
        delta_links = imported.delta_links,
        trip = imported.trip,
        "imported the JSON state directory into the state store (the files are left as they were)"
    );
    Ok(Some(imported))
}

/// `users/xx/<hash>.json` → (hash, state).
fn read_users(dir: &Path) -> Result<Vec<(String, UserState)>, String> {
    let mut out = Vec::new();
    for file in json_files(&dir.join("users"), 2)? {
        let Some(hash) = file.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let bytes = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        let state: UserState =
            serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", file.display()))?;
        out.push((hash.to_owned(), state));
    }
    Ok(out)
}

fn read_delta(dir: &Path) -> Result<Vec<(TenantId, String)>, String> {
    let mut out = Vec::new();
    for file in json_files(&dir.join("delta"), 1)? {
        let bytes = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        let d: DeltaFile =
            serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", file.display()))?;
        if let (Some(t), Some(link)) = (d.tenant_id, d.delta_link) {
            out.push((TenantId::new(&t), link));
        }
    }
    Ok(out)
}

/// The trip in force in `breaker.json`. A file that cannot be read stops the import: a
/// corrupt trip must not silently become "untripped".
fn read_trip(dir: &Path) -> Result<Option<Trip>, String> {
    let path = dir.join("breaker.json");
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let file: BreakerFile = serde_json::from_slice(&bytes).map_err(|e| {
        format!(
            "{}: {e} (repair or remove it; it may hold a breaker trip)",
            path.display()
        )
    })?;
    Ok(file
        .tripped
        .filter(|t| file.released_at.is_none_or(|r| r < t.at)))
}

/// `*.json` files `depth` directory levels below `root` (none when it does not exist);
/// temp files (`.name.tmp`) are skipped.
fn json_files(root: &Path, depth: usize) -> Result<Vec<std::path::PathBuf>, String> {
    let mut dirs = vec![root.to_owned()];
    for _ in 1..depth {
        let mut next = Vec::new();
        for d in dirs {
            for entry in read_dir(&d)? {
                if entry.is_dir() {
                    next.push(entry);
                }
            }
        }
        dirs = next;
    }
    let mut files = Vec::new();
    for d in dirs {
        for f in read_dir(&d)? {
            if f.extension().is_some_and(|e| e == "json") && f.is_file() {
                files.push(f);
            }
        }
    }
    Ok(files)
}

fn read_dir(d: &Path) -> Result<Vec<std::path::PathBuf>, String> {
    match std::fs::read_dir(d) {
        Ok(it) => Ok(it.filter_map(|e| e.ok().map(|e| e.path())).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(format!("{}: {e}", d.display())),
    }
}
