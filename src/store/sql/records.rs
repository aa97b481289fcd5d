//! Identity bindings, identity conflicts and the decision history.

use super::{Pool, SqlStore, ms, on_pool, time};
use crate::identity::Binding;
use crate::ids::{TenantId, UserId};
use crate::store::{ConflictRecord, HistoryEntry, HistoryQuery, StoreError};

type BindingRow = (String, String, String, i64, String);

fn binding_from(
    (tenant_id, object_id, address, at, how): BindingRow,
) -> Result<Binding, StoreError> {
    Ok(Binding {
        tenant_id,
        object_id,
        address,
        bound_at: time("identity_bindings.bound_at", at)?,
        how,
    })
}

const BINDING_COLUMNS: &str =
    "SELECT tenant_id, object_id, address, bound_at, how FROM identity_bindings";

/// The one binding matching `clause` (two parameters).
pub(super) async fn binding_where(
    store: &SqlStore,
    clause: &str,
    a: &str,
    b: &str,
) -> Result<Option<Binding>, StoreError> {
    let sql = format!("{BINDING_COLUMNS} WHERE {clause}");
    let row: Option<BindingRow> = on_pool!(store, p =>
        sqlx::query_as(&sql).bind(a).bind(b).fetch_optional(p).await)
    .map_err(|e| store.err(e))?;
    row.map(binding_from).transpose()
}

pub(super) async fn bind(store: &SqlStore, b: &Binding) -> Result<(), StoreError> {
    let (t, o, a) = (
        TenantId::new(&b.tenant_id),
        UserId::new(&b.object_id),
        b.address.trim().to_ascii_lowercase(),
    );
    on_pool!(store, p => async {
        let mut tx = p.begin().await?;
        // One to one: whatever this object or this address was bound to before is replaced.
        sqlx::query(
            "DELETE FROM identity_bindings WHERE tenant_id = $1 AND (object_id = $2 OR address = $3)",
        )
        .bind(t.as_str()).bind(o.as_str()).bind(&a).execute(&mut *tx).await?;
        sqlx::query(
            "INSERT INTO identity_bindings (tenant_id, object_id, address, bound_at, how) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(t.as_str()).bind(o.as_str()).bind(&a).bind(ms(b.bound_at)).bind(&b.how)
        .execute(&mut *tx).await?;
        sqlx::query("DELETE FROM identity_conflicts WHERE tenant_id = $1 AND object_id = $2")
            .bind(t.as_str()).bind(o.as_str()).execute(&mut *tx).await?;
        tx.commit().await
    }.await)
    .map_err(|e| store.err(e))
}

pub(super) async fn bindings(
    store: &SqlStore,
    filter: Option<&str>,
) -> Result<Vec<Binding>, StoreError> {
    let rows: Vec<BindingRow> = match filter {
        Some(f) => {
            let f = f.trim().to_ascii_lowercase();
            let sql =
                format!("{BINDING_COLUMNS} WHERE object_id = $1 OR address = $1 ORDER BY address");
            on_pool!(store, p => sqlx::query_as(&sql).bind(&f).fetch_all(p).await)
        }
        None => {
            let sql = format!("{BINDING_COLUMNS} ORDER BY tenant_id, address");
            on_pool!(store, p => sqlx::query_as(&sql).fetch_all(p).await)
        }
    }
    .map_err(|e| store.err(e))?;
    rows.into_iter().map(binding_from).collect()
}

pub(super) async fn record_conflict(
    store: &SqlStore,
    c: &ConflictRecord,
) -> Result<(), StoreError> {
    let others = serde_json::to_string(&c.others).expect("strings serialize");
    on_pool!(store, p => sqlx::query(
        "INSERT INTO identity_conflicts (tenant_id, object_id, address, reason, others, detail, seen_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (tenant_id, object_id) DO UPDATE SET \
         address = excluded.address, reason = excluded.reason, others = excluded.others, \
         detail = excluded.detail, seen_at = excluded.seen_at",
    )
    .bind(c.tenant_id.as_str()).bind(c.object_id.as_str()).bind(&c.address).bind(&c.reason)
    .bind(others).bind(&c.detail).bind(ms(c.seen_at))
    .execute(p).await.map(|_| ()))

    .map_err(|e| store.err(e))
}

pub(super) async fn conflicts(store: &SqlStore) -> Result<Vec<ConflictRecord>, StoreError> {
    type Row = (String, String, String, String, String, String, i64);
    let rows: Vec<Row> = on_pool!(store, p => sqlx::query_as(
        "SELECT tenant_id, object_id, address, reason, others, detail, seen_at \
         FROM identity_conflicts ORDER BY seen_at",
    )
    .fetch_all(p).await)
    .map_err(|e| store.err(e))?;
    rows.into_iter()
        .map(|(t, o, address, reason, others, detail, seen)| {
            Ok(ConflictRecord {
                tenant_id: TenantId::new(&t),
                object_id: UserId::new(&o),
                address,
                reason,
                others: serde_json::from_str(&others).map_err(|e| StoreError::Corrupt {
                    what: "identity_conflicts.others",
                    detail: e.to_string(),
                })?,
                detail,
                seen_at: time("identity_conflicts.seen_at", seen)?,
            })
        })
        .collect()
}

#[derive(sqlx::FromRow)]
struct HistoryRow {
    at: i64,
    tenant_id: String,
    user_id: String,
    upn: Option<String>,
    address: Option<String>,
    origin: String,
    result: String,
    action: Option<String>,
    rule: Option<String>,
    reason: String,
    writes: String,
    was_active: Option<bool>,
    is_active: Option<bool>,
    was_exempt: Option<bool>,
    is_exempt: Option<bool>,
    dry_run: bool,
    latency_ms: Option<i64>,
    trace_id: Option<String>,
    worker: String,
}

const HISTORY_COLUMNS: &str = "at, tenant_id, user_id, upn, address, origin, result, action, rule, \
     reason, writes, was_active, is_active, was_exempt, is_exempt, dry_run, latency_ms, trace_id, worker";

impl HistoryRow {
    fn entry(self) -> Result<HistoryEntry, StoreError> {
        Ok(HistoryEntry {
            at: time("history.at", self.at)?,
            tenant_id: TenantId::new(&self.tenant_id),
            user_id: UserId::new(&self.user_id),
            upn: self.upn,
            address: self.address,
            origin: self.origin,
            result: self.result,
            action: self.action,
            rule: self.rule,
            reason: self.reason,
            writes: serde_json::from_str(&self.writes).map_err(|e| StoreError::Corrupt {
                what: "history.writes",
                detail: e.to_string(),
            })?,
            was_active: self.was_active,
            is_active: self.is_active,
            was_exempt: self.was_exempt,
            is_exempt: self.is_exempt,
            dry_run: self.dry_run,
            latency_ms: self.latency_ms,
            trace_id: self.trace_id,
            worker: self.worker,
        })
    }
}

pub(super) async fn record_history(
    store: &SqlStore,
    entries: &[HistoryEntry],
) -> Result<(), StoreError> {
    if entries.is_empty() {
        return Ok(());
    }
    // One multi-row INSERT per chunk (19 parameters a row; both backends allow ~32k).
    for chunk in entries.chunks(500) {
        on_pool!(store, p => {
            let mut q = sqlx::QueryBuilder::new(format!("INSERT INTO history ({HISTORY_COLUMNS}) "));
            q.push_values(chunk, |mut row, e| {
                row.push_bind(ms(e.at))
                    .push_bind(e.tenant_id.as_str().to_owned())
                    .push_bind(e.user_id.as_str().to_owned())
                    .push_bind(e.upn.clone())
                    .push_bind(e.address.clone())
                    .push_bind(e.origin.clone())
                    .push_bind(e.result.clone())
                    .push_bind(e.action.clone())
                    .push_bind(e.rule.clone())
                    .push_bind(e.reason.clone())
                    .push_bind(serde_json::to_string(&e.writes).expect("strings serialize"))
                    .push_bind(e.was_active)
                    .push_bind(e.is_active)
                    .push_bind(e.was_exempt)
                    .push_bind(e.is_exempt)
                    .push_bind(e.dry_run)
                    .push_bind(e.latency_ms)
                    .push_bind(e.trace_id.clone())
                    .push_bind(e.worker.clone());
            });
            q.build().execute(p).await.map(|_| ())
        })
        .map_err(|e| store.err(e))?;
    }
    Ok(())
}

pub(super) async fn history(
    store: &SqlStore,
    query: &HistoryQuery,
) -> Result<Vec<HistoryEntry>, StoreError> {
    let user = query.user.as_deref().map(|u| u.trim().to_ascii_lowercase());
    // By object id, or by UPN / address: each has its own index on (column, at).
    let filter = match &user {
        Some(u) if UserId::new(u).is_object_id() => "user_id = $1 AND at >= $2",
        Some(_) => "(address = $1 OR upn = $1) AND at >= $2",
        None => "$1 = $1 AND at >= $2",
    };
    let sql =
        format!("SELECT {HISTORY_COLUMNS} FROM history WHERE {filter} ORDER BY at DESC LIMIT $3");
    let since = query.since.map(ms).unwrap_or(i64::MIN);
    let limit = i64::try_from(query.limit.max(1)).unwrap_or(i64::MAX);
    let rows: Vec<HistoryRow> = on_pool!(store, p => sqlx::query_as(&sql)
        .bind(user.clone().unwrap_or_default()).bind(since).bind(limit).fetch_all(p).await)
    .map_err(|e| store.err(e))?;
    rows.into_iter().map(HistoryRow::entry).collect()
}
