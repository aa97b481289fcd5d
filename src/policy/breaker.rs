//! The blast-radius breaker: limits that stop automated deactivations when too many happen too
//! fast — a misconfigured policy, a Graph outage that returns users disabled, or a mass change in
//! Entra should cost a few mailboxes, not the whole organization's mail.
//!
//! # Limits
//! [`BreakerConfig`] (the `[breaker]` section of the policy file) limits deactivations
//! - per Proofpoint organization: `max_deactivations` and `max_share` of its known users within
//!   `window` ([`BreakerConfig::limit`]), and `max_per_day` within a rolling 24 h ([`DAY`]);
//! - over all organizations of the deployment together ([`GlobalLimits`],
//!   `[breaker.global]`): `max_deactivations` within its `window`, `max_per_day` within 24 h.
//!
//! # Judging a deactivation
//! [`judge`] is pure (no clock, no IO): the caller counts the deactivations already made over
//! the spans [`windows`] and [`DAY`] name (an instant at or before [`window_start`] has left the
//! span), inside the same transaction that will record the new one, and passes those
//! [`Counts`]. [`Verdict::Allow`]: record it and go ahead. [`Verdict::Tripped`]: do not write,
//! record the user as held, save the [`Trip`] and alert. A trip holds until an operator
//! releases its [`Scope`]; time alone never closes it. The counting, the trip and the held
//! users live in the state store (`store::sql::breaker`), shared by every process.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The rolling span every `max_per_day` counts over.
pub const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// Limits, from the `[breaker]` section of the policy file.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BreakerConfig {
    /// At most this many deactivations per organization per window.
    pub max_deactivations: u32,
    /// And at most this fraction of the organization's known users per window (at least one
    /// deactivation is always allowed, so tiny organizations are not locked out).
    pub max_share: f64,
    /// The sliding window both per-organization window limits count over.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// At most this many deactivations per organization within a rolling 24 h, so that a
    /// steady trickle just under the window limit still stops within a day.
    pub max_per_day: u32,
    /// Limits over all organizations together: one bad policy or Graph outage hits every org
    /// at once, and per-org limits alone would let N orgs lose N times as much.
    pub global: GlobalLimits,
}

/// The deployment-wide limits, from `[breaker.global]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GlobalLimits {
    /// At most this many deactivations over all organizations per window.
    pub max_deactivations: u32,
    /// The sliding window `max_deactivations` counts over.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// At most this many over all organizations within a rolling 24 h.
    pub max_per_day: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            max_deactivations: 25,
            max_share: 0.10,
            window: Duration::from_secs(3600),
            max_per_day: 100,
            global: GlobalLimits::default(),
        }
    }
}

impl Default for GlobalLimits {
    fn default() -> Self {
        Self {
            max_deactivations: 100,
            window: Duration::from_secs(3600),
            max_per_day: 400,
        }
    }
}

impl BreakerConfig {
    /// Deactivations allowed per window for an organization of `total_users`:
    /// `min(max_deactivations, max(1, floor(max_share × total_users)))`.
    pub fn limit(&self, total_users: usize) -> usize {
        let share = (self.max_share * total_users as f64).floor() as usize;
        (self.max_deactivations as usize).min(share.max(1))
    }
}

/// The spans the store counts over: `(organization window, global window)`. Both day limits
/// count over [`DAY`].
pub fn windows(config: &BreakerConfig) -> (Duration, Duration) {
    (config.window, config.global.window)
}

/// Deactivations at or before this instant have left a span of `window` ending at `now`:
/// count those strictly after it.
pub fn window_start(now: DateTime<Utc>, window: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(window)
        .ok()
        .and_then(|w| now.checked_sub_signed(w))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// How many deactivations were already counted, as the store sees them inside its transaction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// This organization's, within the organization window.
    pub org_in_window: usize,
    /// This organization's, within the last 24 h.
    pub org_in_day: usize,
    /// All organizations', within the global window.
    pub global_in_window: usize,
    /// All organizations', within the last 24 h.
    pub global_in_day: usize,
}

/// What a limit counts over, and what an operator releases. As text (Display, serde, and
/// [`Trip::scope`]): `"global"` or the organization's domain (a domain has a dot, so it never
/// reads as `global`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", from = "String")]
pub enum Scope {
    /// All organizations of the deployment together.
    Global,
    /// One Proofpoint organization, by domain.
    Org(String),
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Global => f.write_str("global"),
            Scope::Org(domain) => f.write_str(domain),
        }
    }
}

impl From<Scope> for String {
    fn from(scope: Scope) -> Self {
        scope.to_string()
    }
}

impl From<String> for Scope {
    fn from(s: String) -> Self {
        if s == "global" {
            Scope::Global
        } else {
            Scope::Org(s)
        }
    }
}

/// Which span of a scope's limits was reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKind {
    /// The sliding window (`window`, `max_deactivations`, and `max_share` for an org).
    /// The default for trips saved before limits had kinds: those were all window trips.
    #[default]
    Window,
    /// The rolling 24 h (`max_per_day`).
    Day,
}

impl fmt::Display for LimitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LimitKind::Window => "window",
            LimitKind::Day => "day",
        })
    }
}

/// The answer to [`judge`] (and [`Breaker::attempt`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Deactivate, and count it.
    Allow,
    /// Do not deactivate; keep the decision queued and alert.
    Tripped(Trip),
}

/// Why and when the breaker tripped. Saved as JSON by the state store; trips saved before
/// `scope` and `limit_kind` existed (and with `in_window` for `counted`) still load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trip {
    pub at: DateTime<Utc>,
    /// `"global"` or the organization's domain ([`Scope`] as text): what an operator releases.
    /// Old trips came from the per-process breaker, which counted all orgs together.
    #[serde(default = "global_scope")]
    pub scope: String,
    #[serde(default)]
    pub limit_kind: LimitKind,
    /// Deactivations already counted in the span when the one over the limit was asked for.
    #[serde(alias = "in_window")]
    pub counted: usize,
    pub limit: usize,
    /// Known users of the organization the refused deactivation was for (also for a global
    /// trip, where it did not set the limit).
    pub total_users: usize,
    pub reason: String,
}

fn global_scope() -> String {
    Scope::Global.to_string()
}

/// Judge one more deactivation in `org`, given what is already counted. Allowed only when it
/// stays within every limit; otherwise tripped by the first limit it would exceed, in the
/// order global day, global window, org day, org window. Broadest first: when several limits
/// are reached at once, the trip names the widest scope and the longest span, so the operator
/// releases the one that really holds deactivations back (releasing only the org while the
/// global limit is full would trip again at once).
pub fn judge(
    config: &BreakerConfig,
    org: &str,
    counts: &Counts,
    total_users: usize,
    now: DateTime<Utc>,
) -> Verdict {
    match limits(config, org, counts, total_users)
        .into_iter()
        .find(Limit::reached)
    {
        None => Verdict::Allow,
        Some(limit) => Verdict::Tripped(limit.trip(now, total_users)),
    }
}

/// The limits in force for the whole deployment, one line per scope (for `breaker status`).
pub fn limits_text(config: &BreakerConfig) -> String {
    let g = &config.global;
    format!(
        "global (all organizations together): at most {} deactivations within {} and {} within \
         24h\nper organization: at most {} deactivations and at most {} of its known users (at \
         least 1) within {}, and {} within 24h",
        g.max_deactivations,
        humantime::format_duration(g.window),
        g.max_per_day,
        config.max_deactivations,
        config.max_share,
        humantime::format_duration(config.window),
        config.max_per_day,
    )
}

/// One limit as it applies to the deactivation being judged.
struct Limit {
    scope: Scope,
    kind: LimitKind,
    span: Duration,
    counted: usize,
    limit: usize,
    /// The settings that produced `limit`, for the reason.
    settings: String,
}

/// Every limit, in the order [`judge`] checks them.
fn limits(config: &BreakerConfig, org: &str, counts: &Counts, total_users: usize) -> [Limit; 4] {
    let g = &config.global;
    let org = Scope::Org(org.to_owned());
    [
        Limit {
            scope: Scope::Global,
            kind: LimitKind::Day,
            span: DAY,
            counted: counts.global_in_day,
            limit: g.max_per_day as usize,
            settings: format!("[breaker.global] max_per_day = {}", g.max_per_day),
        },
        Limit {
            scope: Scope::Global,
            kind: LimitKind::Window,
            span: g.window,
            counted: counts.global_in_window,
            limit: g.max_deactivations as usize,
            settings: format!(
                "[breaker.global] max_deactivations = {}",
                g.max_deactivations
            ),
        },
        Limit {
            scope: org.clone(),
            kind: LimitKind::Day,
            span: DAY,
            counted: counts.org_in_day,
            limit: config.max_per_day as usize,
            settings: format!("[breaker] max_per_day = {}", config.max_per_day),
        },
        org_window(config, org, counts.org_in_window, total_users),
    ]
}

/// The per-organization window limit, share rule included.
fn org_window(config: &BreakerConfig, scope: Scope, counted: usize, total_users: usize) -> Limit {
    Limit {
        scope,
        kind: LimitKind::Window,
        span: config.window,
        counted,
        limit: config.limit(total_users),
        settings: format!(
            "[breaker] max_deactivations = {}, max_share = {} of {total_users} known users, at \
             least 1",
            config.max_deactivations, config.max_share
        ),
    }
}

impl Limit {
    /// One more would exceed it.
    fn reached(&self) -> bool {
        self.counted >= self.limit
    }

    fn trip(self, at: DateTime<Utc>, total_users: usize) -> Trip {
        let who = match &self.scope {
            Scope::Global => "global (all organizations together)".to_owned(),
            Scope::Org(domain) => format!("organization {domain}"),
        };
        let span = match self.kind {
            LimitKind::Day => "24h".to_owned(),
            LimitKind::Window => humantime::format_duration(self.span).to_string(),
        };
        Trip {
            at,
            reason: format!(
                "{who}: {} deactivations within the last {span} already reach the {} limit of {} \
                 ({})",
                self.counted, self.kind, self.limit, self.settings
            ),
            scope: self.scope.to_string(),
            limit_kind: self.kind,
            counted: self.counted,
            limit: self.limit,
            total_users,
        }
    }
}
