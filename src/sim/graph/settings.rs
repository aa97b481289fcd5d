//! The simulator's knobs: [`GraphSimFaults`] (delivery faults, notification shape variants,
//! injected API latency, throttling and failures; serde, so `/_sim/faults` can set them) and
//! [`GraphSimSettings`] (how the simulated service itself behaves).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::SimError;

/// Delivery faults and API realism knobs. Settable from Rust ([`super::GraphSim::set_faults`]) and
/// as JSON on `POST /_sim/faults` (durations as humantime strings, e.g. `"50ms"`); fields left
/// out of the JSON take their defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GraphSimFaults {
    /// Fixed delay before a notification's first delivery attempt.
    #[serde(with = "humantime_serde")]
    pub delivery_delay: Duration,
    /// Random extra delay, uniform in `0..=delivery_jitter`, added per POST (reorders too).
    #[serde(with = "humantime_serde")]
    pub delivery_jitter: Duration,
    /// Chance that a notification is delivered twice (as separate POSTs).
    pub duplicate_probability: f64,
    /// Deliver every Nth notification twice (0 = off). Deterministic alternative to the above.
    pub duplicate_every: u32,
    /// Chance that a notification is lost (recorded as [`super::DeliveryOutcome::Dropped`]).
    pub drop_probability: f64,
    /// Hold back up to this many notifications and shuffle them before delivery (0/1 = off).
    pub reorder_window: usize,
    /// Put up to this many notifications (same notification URL) in one POST.
    pub batch_size: usize,
    /// The longest a notification waits for a reorder window or batch to fill.
    #[serde(with = "humantime_serde")]
    pub hold_back: Duration,
    /// Retry delay after the first failed attempt; doubles per attempt. Real Graph retries
    /// with exponential backoff for up to 4 hours; tests want milliseconds.
    #[serde(with = "humantime_serde")]
    pub retry_base_delay: Duration,
    /// Attempts per notification POST, first one included.
    pub max_attempts: u32,
    /// How long one delivery POST may take before it counts as failed.
    #[serde(with = "humantime_serde")]
    pub delivery_timeout: Duration,
    /// Leave out `tenantId` (the receiver must fall back to `resourceData.organizationId`).
    pub omit_tenant_id: bool,
    /// Send `sequenceNumber` as a JSON string instead of a number.
    pub sequence_number_as_string: bool,
    /// Send `resource` as `users/<id>` instead of `Users/<id>`.
    pub lowercase_resource: bool,
    /// Send a wrong `@odata.type` (seen in the field; receivers key on `resourceData.id`).
    pub wrong_odata_type: bool,
    /// Added to every Graph API request (users, groups, mailbox settings, subscriptions; not
    /// the token endpoint).
    #[serde(with = "humantime_serde")]
    pub api_latency: Duration,
    /// The next N API requests get 429 with `Retry-After` (decremented as they are served).
    pub throttle_next: u32,
    /// `Retry-After` seconds sent with injected 429s (`None`: no header).
    pub throttle_retry_after_secs: Option<u64>,
    /// The next N API requests (after throttling) fail with `fail_status`.
    pub fail_next: u32,
    pub fail_status: u16,
    /// Chance that a user on a `/users/delta` page is repeated on the same page (Graph
    /// replays and duplicates delta items; clients must be idempotent).
    pub delta_duplicate_probability: f64,
    /// Re-seed the random generator when these settings are applied.
    pub seed: Option<u64>,
}

impl Default for GraphSimFaults {
    fn default() -> Self {
        Self {
            delivery_delay: Duration::ZERO,
            delivery_jitter: Duration::ZERO,
            duplicate_probability: 0.0,
            duplicate_every: 0,
            drop_probability: 0.0,
            reorder_window: 0,
            batch_size: 1,
            hold_back: Duration::from_millis(200),
            retry_base_delay: Duration::from_secs(1),
            max_attempts: 5,
            delivery_timeout: Duration::from_secs(10),
            omit_tenant_id: false,
            sequence_number_as_string: false,
            lowercase_resource: false,
            wrong_odata_type: false,
            api_latency: Duration::ZERO,
            throttle_next: 0,
            throttle_retry_after_secs: None,
            fail_next: 0,
            fail_status: 500,
            delta_duplicate_probability: 0.0,
            seed: None,
        }
    }
}

impl GraphSimFaults {
    pub(super) fn validate(&self) -> Result<(), SimError> {
        for (name, p) in [
            ("duplicate_probability", self.duplicate_probability),
            ("drop_probability", self.drop_probability),
            (
                "delta_duplicate_probability",
                self.delta_duplicate_probability,
            ),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(SimError::Invalid(format!("{name} must be within 0..=1")));
            }
        }
        if self.batch_size == 0 {
            return Err(SimError::Invalid("batch_size must be at least 1".into()));
        }
        if self.max_attempts == 0 {
            return Err(SimError::Invalid("max_attempts must be at least 1".into()));
        }
        if !(400..=599).contains(&self.fail_status) {
            return Err(SimError::Invalid(
                "fail_status must be within 400..=599".into(),
            ));
        }
        Ok(())
    }
}

/// Settings of the simulated service itself (not faults).
#[derive(Debug, Clone, PartialEq)]
pub struct GraphSimSettings {
    /// `expires_in` of issued tokens.
    pub token_lifetime: Duration,
    /// Page size of `GET /subscriptions` (small values make `@odata.nextLink` testable).
    pub page_size: usize,
    /// The most groups one `transitiveMemberOf` page holds whatever `$top` asks for
    /// (Graph: 999; without `$top` a page holds 100). Small values make paging testable.
    pub member_of_page_size: usize,
    /// Issue opaque access tokens instead of JWT-shaped ones. Microsoft documents access
    /// tokens as opaque to clients; this makes "cannot read the token" testable. Graph still
    /// authorizes by the permissions the token was issued with.
    pub opaque_tokens: bool,
    /// How long the subscriber has to answer a validation request (Graph: 10 s).
    pub handshake_timeout: Duration,
    /// Graph's quota for users subscriptions per app per tenant; over it creation gets 403.
    pub max_subscriptions_per_app_per_tenant: usize,
    /// The most users one `GET /users` page holds whatever `$top` asks for (Graph: 999;
    /// without `$top` a page holds 100). Small values make paging testable.
    pub users_page_size: usize,
    /// Items per `/users/delta` page (small values make `@odata.nextLink` testable).
    pub delta_page_size: usize,
    /// How long delta and skip tokens stay usable (Graph: 7 days for directory objects).
    pub delta_token_lifetime: Duration,
    /// The status of the `syncStateNotFound` answer to an expired or unknown delta token:
    /// 410 (Gone) or a 4xx such as 400. Graph is documented with both; clients must take
    /// either as "resync".
    pub delta_token_expired_status: u16,
}

impl Default for GraphSimSettings {
    fn default() -> Self {
        Self {
            token_lifetime: Duration::from_secs(3599),
            page_size: 100,
            member_of_page_size: 999,
            opaque_tokens: false,
            handshake_timeout: Duration::from_secs(10),
            max_subscriptions_per_app_per_tenant: 100,
            users_page_size: 999,
            delta_page_size: 100,
            delta_token_lifetime: Duration::from_secs(7 * 24 * 3600),
            delta_token_expired_status: 410,
        }
    }
}
