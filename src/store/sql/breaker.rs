//! The breaker's transactions: count and decide one deactivation, report, release. Each takes
//! the `global` scope row first (see [`super`]), so every process sees one sequence of
//! deactivations; the decision itself is the pure [`judge`].

use chrono::{DateTime, Utc};

use super::{Pool, SqlStore, ms, on_pool, opt_time, time};
use crate::ids::{TenantId, UserId};
use crate::policy::breaker::{BreakerConfig, Counts, Trip, Verdict, judge};
use crate::store::{
    BreakerAnswer, BreakerReport, Deactivation, Held, Release, ScopeStatus, StoreError,
};

pub const GLOBAL: &str = "global";
const DAY_MS: i64 = 24 * 3600 * 1000;

/// A scope row as read: its trip (JSON) and last release.
type ScopeRow = (String, Option<String>, Option<i64>);

/// The scope rows, parsed; a trip that cannot be read is an error (never "untripped").
#[derive(Debug, Default)]
struct Scopes {
    global: (Option<Trip>, Option<i64>),
    org: (Option<Trip>, Option<i64>),
}

impl Scopes {
    fn parse(rows: Vec<ScopeRow>, org: &str) -> Result<Self, StoreError> {
        let mut s = Scopes::default();
        for (scope, trip, released) in rows {
            let parsed = parse_trip(trip.as_deref())?;
            if scope == GLOBAL {
                s.global = (parsed, released);
            } else if scope == org {
                s.org = (parsed, released);
            }
        }
        Ok(s)
    }

    /// The trip in force, the broadest first.
    fn trip(&self) -> Option<Trip> {
        self.global.0.clone().or_else(|| self.org.0.clone())
    }
}

pub(super) fn parse_trip(json: Option<&str>) -> Result<Option<Trip>, StoreError> {
    json.map(|j| {
        serde_json::from_str(j).map_err(|e| StoreError::Corrupt {
            what: "breaker trip",
            detail: e.to_string(),
        })
    })
    .transpose()
}

/// Where each count starts: the window (or day) back from `now`, or the last release.
fn since(now: i64, span_ms: i64, released: Option<i64>) -> i64 {
    (now - span_ms).max(released.unwrap_or(i64::MIN))
}

fn span_ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// What the transaction ends with: the answer, or a store value that cannot be trusted.
type Decided = Result<BreakerAnswer, StoreError>;

pub(super) async fn attempt(
    store: &SqlStore,
    r: &Deactivation<'_>,
) -> Result<BreakerAnswer, StoreError> {
    let (t, u, org, now) = (r.key.tenant.as_str(), r.key.user.as_str(), r.org, ms(r.now));
    let cfg = r.config;
    let decided: Result<Decided, sqlx::Error> = on_pool!(store, p => async {
        let mut tx = p.begin().await?;
        // The lock every deactivation takes (see the module docs of `sql`).
        sqlx::query("UPDATE breaker_scopes SET seq = seq + 1 WHERE scope = 'global'")
            .execute(&mut *tx).await?;
        sqlx::query("INSERT INTO breaker_scopes (scope, seq) VALUES ($1, 0) ON CONFLICT DO NOTHING")
            .bind(org).execute(&mut *tx).await?;

        let held: Option<(Option<i64>,)> = sqlx::query_as(
            "SELECT approved_at FROM breaker_held WHERE tenant_id = $1 AND user_id = $2",
        )
        .bind(t).bind(u).fetch_optional(&mut *tx).await?;
        if let Some((Some(_),)) = held {
            // Approved by an operator's release: goes through, not counted.
            sqlx::query(RECORD).bind(org).bind(t).bind(u).bind(now).bind(true)
                .execute(&mut *tx).await?;
            sqlx::query("DELETE FROM breaker_held WHERE tenant_id = $1 AND user_id = $2")
                .bind(t).bind(u).execute(&mut *tx).await?;
            tx.commit().await?;
            return Ok(Ok(BreakerAnswer::Allow { approved: true }));
        }

        let rows: Vec<ScopeRow> = sqlx::query_as(
            "SELECT scope, trip, released_at FROM breaker_scopes WHERE scope IN ('global', $1)",
        )
        .bind(org).fetch_all(&mut *tx).await?;
        let scopes = match Scopes::parse(rows, org) {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        if let Some(trip) = scopes.trip() {
            sqlx::query(HOLD).bind(t).bind(u).bind(org).bind(now).execute(&mut *tx).await?;
            tx.commit().await?;
            return Ok(Ok(BreakerAnswer::Held { trip, newly: false }));
        }

        let org_window = since(now, span_ms(cfg.window), scopes.org.1);
        // A user counted already in this window (a retry after a failed write) is not
        // counted twice.
        let already: Option<(i64,)> = sqlx::query_as(
            "SELECT at FROM breaker_deactivations WHERE tenant_id = $1 AND user_id = $2 \
             AND approved = FALSE AND at > $3 LIMIT 1",
        )
        .bind(t).bind(u).bind(org_window).fetch_optional(&mut *tx).await?;
        if already.is_some() {
            tx.commit().await?;
            return Ok(Ok(BreakerAnswer::Allow { approved: false }));
        }

        let bounds = [
            org_window,
            since(now, DAY_MS, scopes.org.1),
            since(now, span_ms(cfg.global.window), scopes.global.1),
            since(now, DAY_MS, scopes.global.1),
        ];
        let (a, b, c, d): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT COUNT(CASE WHEN org = $1 AND at > $2 THEN 1 END), \
                    COUNT(CASE WHEN org = $1 AND at > $3 THEN 1 END), \
                    COUNT(CASE WHEN at > $4 THEN 1 END), \
                    COUNT(CASE WHEN at > $5 THEN 1 END) \
             FROM breaker_deactivations WHERE approved = FALSE AND at > $6",
        )
        .bind(org).bind(bounds[0]).bind(bounds[1]).bind(bounds[2]).bind(bounds[3])
        .bind(bounds.iter().copied().min().unwrap_or(now))
        .fetch_one(&mut *tx).await?;
        let counts = Counts {
            org_in_window: to_usize(a),
            org_in_day: to_usize(b),
            global_in_window: to_usize(c),
            global_in_day: to_usize(d),
        };
        match judge(cfg, org, &counts, r.total_users, r.now) {
            Verdict::Allow => {
                sqlx::query(RECORD).bind(org).bind(t).bind(u).bind(now).bind(false)
                    .execute(&mut *tx).await?;
                tx.commit().await?;
                Ok(Ok(BreakerAnswer::Allow { approved: false }))
            }
            Verdict::Tripped(trip) => {
                let json = serde_json::to_string(&trip).expect("a trip serializes");
                sqlx::query("UPDATE breaker_scopes SET trip = $1 WHERE scope = $2")
                    .bind(json).bind(&trip.scope).execute(&mut *tx).await?;
                sqlx::query(HOLD).bind(t).bind(u).bind(org).bind(now).execute(&mut *tx).await?;
                tx.commit().await?;
                Ok(Ok(BreakerAnswer::Held { trip, newly: true }))
            }
        }
    }.await);
    decided.map_err(|e| store.err(e))?
}

fn to_usize(n: i64) -> usize {
    usize::try_from(n).unwrap_or(0)
}

/// Count one deactivation: org, tenant, user, at, approved.
const RECORD: &str = "INSERT INTO breaker_deactivations (org, tenant_id, user_id, at, approved) \
                      VALUES ($1, $2, $3, $4, $5)";

/// Record the user as held (the first hold's time is kept): tenant, user, org, at.
const HOLD: &str = "INSERT INTO breaker_held (tenant_id, user_id, org, held_at, approved_at) \
                    VALUES ($1, $2, $3, $4, NULL) ON CONFLICT (tenant_id, user_id) DO NOTHING";

type HeldRow = (String, String, String, i64, Option<i64>);

fn held_from(rows: Vec<HeldRow>) -> Result<Vec<Held>, StoreError> {
    rows.into_iter()
        .map(|(t, u, org, held_at, approved)| {
            Ok(Held {
                tenant_id: TenantId::new(&t),
                user_id: UserId::new(&u),
                org,
                held_at: time("breaker_held.held_at", held_at)?,
                approved_at: opt_time("breaker_held.approved_at", approved)?,
            })
        })
        .collect()
}

pub(super) async fn report(
    store: &SqlStore,
    cfg: &BreakerConfig,
    now: DateTime<Utc>,
) -> Result<BreakerReport, StoreError> {
    let now = ms(now);
    let (scopes, counted, held) = on_pool!(store, p => async {
        let scopes: Vec<ScopeRow> = sqlx::query_as(
            "SELECT scope, trip, released_at FROM breaker_scopes ORDER BY scope",
        )
        .fetch_all(p).await?;
        // Bounded by the daily caps: a few hundred rows at most.
        let counted: Vec<(String, i64)> = sqlx::query_as(
            "SELECT org, at FROM breaker_deactivations WHERE approved = FALSE AND at > $1",
        )
        .bind(now - DAY_MS).fetch_all(p).await?;
        let held: Vec<HeldRow> = sqlx::query_as(
            "SELECT tenant_id, user_id, org, held_at, approved_at FROM breaker_held ORDER BY held_at",
        )
        .fetch_all(p).await?;
        Ok::<_, sqlx::Error>((scopes, counted, held))
    }.await)
    .map_err(|e| store.err(e))?;
    let mut out = Vec::new();
    for (scope, trip, released) in scopes {
        let global = scope == GLOBAL;
        let window = span_ms(if global {
            cfg.global.window
        } else {
            cfg.window
        });
        let mine = counted.iter().filter(|(o, _)| global || *o == scope);
        let (w, d) = (since(now, window, released), since(now, DAY_MS, released));
        let (mut in_window, mut in_day) = (0, 0);
        for (_, at) in mine {
            in_window += usize::from(*at > w);
            in_day += usize::from(*at > d);
        }
        out.push(ScopeStatus {
            trip: parse_trip(trip.as_deref())?,
            released_at: opt_time("breaker_scopes.released_at", released)?,
            scope,
            in_window,
            in_day,
        });
    }
    // The global scope first.
    out.sort_by_key(|s| s.scope != GLOBAL);
    Ok(BreakerReport {
        scopes: out,
        held: held_from(held)?,
    })
}

pub(super) async fn release(
    store: &SqlStore,
    org: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Release, StoreError> {
    let now = ms(now);
    let (trips, approved) = on_pool!(store, p => async {
        let mut tx = p.begin().await?;
        sqlx::query("UPDATE breaker_scopes SET seq = seq + 1 WHERE scope = 'global'")
            .execute(&mut *tx).await?;
        let (trips, held): (Vec<(Option<String>,)>, Vec<HeldRow>) = match org {
            Some(org) => {
                let trips = sqlx::query_as("SELECT trip FROM breaker_scopes WHERE scope = $1")
                    .bind(org).fetch_all(&mut *tx).await?;
                sqlx::query("UPDATE breaker_scopes SET trip = NULL, released_at = $1 WHERE scope = $2")
                    .bind(now).bind(org).execute(&mut *tx).await?;
                let held = sqlx::query_as(
                    "UPDATE breaker_held SET approved_at = $1 WHERE approved_at IS NULL AND org = $2 \
                     RETURNING tenant_id, user_id, org, held_at, approved_at",
                )
                .bind(now).bind(org).fetch_all(&mut *tx).await?;
                (trips, held)
            }
            None => {
                let trips = sqlx::query_as("SELECT trip FROM breaker_scopes")
                    .fetch_all(&mut *tx).await?;
                sqlx::query("UPDATE breaker_scopes SET trip = NULL, released_at = $1")
                    .bind(now).execute(&mut *tx).await?;
                let held = sqlx::query_as(
                    "UPDATE breaker_held SET approved_at = $1 WHERE approved_at IS NULL \
                     RETURNING tenant_id, user_id, org, held_at, approved_at",
                )
                .bind(now).fetch_all(&mut *tx).await?;
                (trips, held)
            }
        };
        for (t, u, ..) in &held {
            sqlx::query(
                "INSERT INTO due (tenant_id, user_id, kind, due_at, queued_at) VALUES ($1, $2, 'wake', $3, NULL) \
                 ON CONFLICT (tenant_id, user_id, kind) DO UPDATE SET due_at = excluded.due_at, queued_at = NULL",
            )
            .bind(t.as_str()).bind(u.as_str()).bind(now).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok::<_, sqlx::Error>((trips, held))
    }.await)
    .map_err(|e| store.err(e))?;
    let mut released = Vec::new();
    for (json,) in trips {
        // An unreadable trip is cleared all the same: the operator asked for it.
        if let Ok(Some(trip)) = parse_trip(json.as_deref()) {
            released.push(trip);
        }
    }
    Ok(Release {
        released,
        approved: held_from(approved)?,
    })
}
