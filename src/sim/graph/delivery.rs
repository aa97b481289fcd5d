//! Outbound calls from the simulated Graph to subscribers: the validation handshake on
//! subscription creation, and change-notification delivery with the fault settings applied
//! (delay, jitter, drops, duplicates, reordering, batching, retries with backoff).
//!
//! Notifications are built at change time (so `eventTime` and `sequenceNumber` are the
//! change's), queued, and released by one dispatcher task; every POST then runs in its own
//! task. Tasks hold only a weak reference to the simulator, so dropping the last
//! [`GraphSim`] handle stops delivery.

use std::sync::Weak;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use rand::Rng;
use rand::seq::SliceRandom;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use url::Url;

use super::{Change, GraphSim, GraphSimFaults, Inner, SimError, SimSubscription, State};

/// Records kept for observation; the oldest are discarded beyond this (long `sim` runs).
pub(super) const MAX_RECORDS: usize = 10_000;

/// One notification item on its way to one subscriber.
#[derive(Debug, Clone)]
pub(super) struct Outgoing {
    url: String,
    tenant_id: String,
    subscription_id: String,
    user_id: String,
    change_type: &'static str,
    sequence_number: u64,
    item: Value,
}

/// What one delivery attempt came to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeliveryOutcome {
    /// The subscriber answered with this status (2xx counts as delivered).
    Status { status: u16 },
    /// Timeout or transport failure.
    Error { error: String },
    /// Lost on purpose (`drop_probability`); never attempted.
    Dropped,
}

/// One delivery attempt of one notification item (or its deliberate loss).
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryRecord {
    pub tenant_id: String,
    pub subscription_id: String,
    /// The user the notification is about (`resourceData.id`); empty for lifecycle events.
    pub user_id: String,
    /// `updated` / `deleted`, or the lifecycle event (`reauthorizationRequired`).
    pub change_type: String,
    pub sequence_number: u64,
    /// 1 for the first attempt; 0 for a dropped notification.
    pub attempt: u32,
    pub outcome: DeliveryOutcome,
    /// No further attempt follows (delivered, given up, or dropped).
    pub final_attempt: bool,
    /// This copy was an injected duplicate.
    pub duplicate: bool,
    /// Items in the POST this item travelled in.
    pub batch_len: usize,
    #[serde(skip)]
    pub instant: Instant,
    pub at: DateTime<Utc>,
}

impl DeliveryRecord {
    /// The subscriber accepted this attempt (2xx).
    pub fn delivered(&self) -> bool {
        matches!(self.outcome, DeliveryOutcome::Status { status } if (200..300).contains(&status))
    }
}

/// Graph's timestamp style: UTC, 7 fractional digits, `Z`.
pub(super) fn graph_time(t: DateTime<Utc>) -> String {
    format!(
        "{}.{:07}Z",
        t.format("%Y-%m-%dT%H:%M:%S"),
        t.timestamp_subsec_nanos() / 100
    )
}

/// Does this subscription cover a change of this user?
fn covers(sub: &SimSubscription, user_id: &str, change: Change) -> bool {
    let wanted = match change {
        Change::Updated => "updated",
        Change::Deleted => "deleted",
    };
    let types_ok = sub
        .subscription
        .change_type
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(wanted));
    let resource = sub.subscription.resource.trim_start_matches('/');
    let resource_ok = match resource.split_once('/') {
        None => resource.eq_ignore_ascii_case("users"),
        Some((coll, id)) => coll.eq_ignore_ascii_case("users") && id.eq_ignore_ascii_case(user_id),
    };
    types_ok && resource_ok
}

/// The notification items a change produces, one per covering, unexpired subscription.
pub(super) fn notifications_for(
    st: &mut State,
    tenant_id: &str,
    user_id: &str,
    change: Change,
) -> Vec<Outgoing> {
    let faults = st.faults.clone();
    let Some(tenant) = st.tenants.get_mut(&tenant_id.to_ascii_lowercase()) else {
        return Vec::new();
    };
    let now = Utc::now();
    let change_type = match change {
        Change::Updated => "updated",
        Change::Deleted => "deleted",
    };
    let mut out = Vec::new();
    for sub in tenant.subscriptions.values() {
        if sub.subscription.expiration_date_time <= now || !covers(sub, user_id, change) {
            continue;
        }
        let sequence_number = tenant.next_sequence;
        tenant.next_sequence += 1;
        let item = notification_item(
            &faults,
            sub,
            &tenant.id,
            user_id,
            change_type,
            sequence_number,
            now,
        );
        out.push(Outgoing {
            url: sub.subscription.notification_url.clone(),
            tenant_id: tenant.id.clone(),
            subscription_id: sub.subscription.id.clone(),
            user_id: user_id.to_owned(),
            change_type,
            sequence_number,
            item,
        });
    }
    out
}

/// One item of a change notification collection, in Graph's shape (with the lenient
/// variants the fault settings ask for).
fn notification_item(
    faults: &GraphSimFaults,
    sub: &SimSubscription,
    tenant_id: &str,
    user_id: &str,
    change_type: &str,
    sequence_number: u64,
    event_time: DateTime<Utc>,
) -> Value {
    use secrecy::ExposeSecret;

    let resource = if faults.lowercase_resource {
        format!("users/{user_id}")
    } else {
        format!("Users/{user_id}")
    };
    let odata_type = if faults.wrong_odata_type {
        "#Microsoft.Graph.Group"
    } else {
        "#Microsoft.Graph.User"
    };
    let sequence = if faults.sequence_number_as_string {
        json!(sequence_number.to_string())
    } else {
        json!(sequence_number)
    };
    let mut item = json!({
        "subscriptionId": sub.subscription.id,
        "subscriptionExpirationDateTime": sub
            .subscription
            .expiration_date_time
            .to_rfc3339_opts(SecondsFormat::AutoSi, false),
        "changeType": change_type,
        "clientState": sub.client_state.as_ref().map(|s| s.expose_secret().to_owned()),
        "resource": resource,
        "resourceData": {
            "@odata.type": odata_type,
            "@odata.id": format!("Users/{user_id}"),
            "id": user_id,
            "organizationId": tenant_id,
            "eventTime": graph_time(event_time),
            "sequenceNumber": sequence,
        },
    });
    if !faults.omit_tenant_id {
        item["tenantId"] = json!(tenant_id);
    }
    item
}

/// A `reauthorizationRequired` lifecycle notification for one subscription. Lifecycle items
/// carry no `resource`; with `omit_tenant_id` they name the tenant as `organizationId`.
pub(super) fn reauthorization_required(
    st: &mut State,
    tenant_id: &str,
    subscription_id: &str,
) -> Result<Outgoing, SimError> {
    use secrecy::ExposeSecret;

    let omit_tenant_id = st.faults.omit_tenant_id;
    let tenant = st.tenant_mut(tenant_id)?;
    let sub =
        tenant
            .subscriptions
            .get(subscription_id)
            .ok_or_else(|| SimError::UnknownSubscription {
                tenant_id: tenant_id.to_owned(),
                subscription_id: subscription_id.to_owned(),
            })?;
    let url = sub
        .subscription
        .lifecycle_notification_url
        .clone()
        .ok_or_else(|| {
            SimError::Invalid(format!(
                "subscription {subscription_id} has no lifecycleNotificationUrl"
            ))
        })?;
    let event = "reauthorizationRequired";
    let mut item = json!({
        "subscriptionId": sub.subscription.id,
        "subscriptionExpirationDateTime": sub
            .subscription
            .expiration_date_time
            .to_rfc3339_opts(SecondsFormat::AutoSi, false),
        "clientState": sub.client_state.as_ref().map(|s| s.expose_secret().to_owned()),
        "lifecycleEvent": event,
    });
    let key = if omit_tenant_id {
        "organizationId"
    } else {
        "tenantId"
    };
    item[key] = json!(tenant.id);
    Ok(Outgoing {
        url,
        tenant_id: tenant.id.clone(),
        subscription_id: sub.subscription.id.clone(),
        user_id: String::new(),
        change_type: event,
        sequence_number: 0,
        item,
    })
}

/// The dispatcher: takes queued items, waits up to `hold_back` to fill a reorder window or
/// batch, then releases them. Ends when the simulator is gone (the channel closes).
pub(super) async fn dispatch(weak: Weak<Inner>, mut rx: mpsc::UnboundedReceiver<Outgoing>) {
    while let Some(first) = rx.recv().await {
        let Some(faults) = GraphSim::from_weak(&weak).map(|s| s.faults()) else {
            break;
        };
        let target = faults.reorder_window.max(faults.batch_size).max(1);
        let mut window = vec![first];
        let deadline = tokio::time::Instant::now() + faults.hold_back;
        while window.len() < target {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(next)) => window.push(next),
                Ok(None) | Err(_) => break,
            }
        }
        let Some(sim) = GraphSim::from_weak(&weak) else {
            break;
        };
        release(&sim, &weak, window, &faults);
    }
}

/// Apply drop / duplicate / reorder / batch decisions and start one task per POST.
fn release(sim: &GraphSim, weak: &Weak<Inner>, window: Vec<Outgoing>, faults: &GraphSimFaults) {
    let mut copies: Vec<(Outgoing, bool)> = Vec::with_capacity(window.len());
    let mut dropped = 0;
    let mut st = sim.state();
    for item in window {
        st.notifications_made += 1;
        if faults.drop_probability > 0.0 && st.rng.random_bool(faults.drop_probability) {
            let rec = record(&item, 0, DeliveryOutcome::Dropped, true, false, 0);
            push_record(&mut st, rec);
            dropped += 1;
            continue;
        }
        let every = faults.duplicate_every > 0
            && st
                .notifications_made
                .is_multiple_of(u64::from(faults.duplicate_every));
        let chance =
            faults.duplicate_probability > 0.0 && st.rng.random_bool(faults.duplicate_probability);
        if every || chance {
            copies.push((item.clone(), true));
        }
        copies.push((item, false));
    }
    if faults.reorder_window > 1 {
        copies.shuffle(&mut st.rng);
    }
    let duplicates = copies.iter().filter(|(_, dup)| *dup).count();
    // Group by notification URL (first-seen order), then cut into batches.
    let mut groups: Vec<(String, Vec<(Outgoing, bool)>)> = Vec::new();
    for copy in copies {
        match groups.iter_mut().find(|(url, _)| *url == copy.0.url) {
            Some((_, items)) => items.push(copy),
            None => groups.push((copy.0.url.clone(), vec![copy])),
        }
    }
    let mut posts = Vec::new();
    for (url, items) in groups {
        let mut items = items.into_iter().peekable();
        while items.peek().is_some() {
            let batch: Vec<_> = items.by_ref().take(faults.batch_size).collect();
            let jitter = random_duration(&mut st.rng, faults.delivery_jitter);
            posts.push((url.clone(), batch, faults.delivery_delay + jitter));
        }
    }
    drop(st);
    sim.inner.pending.send_modify(|n| *n += duplicates);
    sim.finish_pending(dropped);
    for (url, batch, delay) in posts {
        let task = deliver(
            weak.clone(),
            sim.inner.http.clone(),
            url,
            batch,
            delay,
            faults.clone(),
        );
        tokio::spawn(task);
    }
}

fn random_duration(rng: &mut impl Rng, max: Duration) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.random_range(0..=nanos))
}

/// POST one batch, retrying non-2xx answers and failures with exponential backoff.
async fn deliver(
    weak: Weak<Inner>,
    http: reqwest::Client,
    url: String,
    batch: Vec<(Outgoing, bool)>,
    delay: Duration,
    faults: GraphSimFaults,
) {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let body = json!({ "value": batch.iter().map(|(o, _)| &o.item).collect::<Vec<_>>() });
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        let sent = http
            .post(&url)
            .timeout(faults.delivery_timeout)
            .json(&body)
            .send()
            .await;
        let outcome = match sent {
            Ok(resp) => DeliveryOutcome::Status {
                status: resp.status().as_u16(),
            },
            Err(e) if e.is_timeout() => DeliveryOutcome::Error {
                error: format!("timed out after {:?}", faults.delivery_timeout),
            },
            Err(e) => DeliveryOutcome::Error {
                error: e.without_url().to_string(),
            },
        };
        let delivered =
            matches!(outcome, DeliveryOutcome::Status { status } if (200..300).contains(&status));
        let last = delivered || attempt >= faults.max_attempts;
        let Some(sim) = GraphSim::from_weak(&weak) else {
            return;
        };
        tracing::debug!(
            url = %url,
            attempt,
            items = batch.len(),
            outcome = ?outcome,
            final_attempt = last,
            "graph sim delivered a notification"
        );
        {
            let mut st = sim.state();
            for (item, duplicate) in &batch {
                let rec = record(
                    item,
                    attempt,
                    outcome.clone(),
                    last,
                    *duplicate,
                    batch.len(),
                );
                push_record(&mut st, rec);
            }
        }
        if last {
            sim.finish_pending(batch.len());
            return;
        }
        drop(sim);
        let factor = 2u32.saturating_pow(attempt - 1);
        tokio::time::sleep(faults.retry_base_delay.saturating_mul(factor)).await;
    }
}

fn record(
    item: &Outgoing,
    attempt: u32,
    outcome: DeliveryOutcome,
    final_attempt: bool,
    duplicate: bool,
    batch_len: usize,
) -> DeliveryRecord {
    DeliveryRecord {
        tenant_id: item.tenant_id.clone(),
        subscription_id: item.subscription_id.clone(),
        user_id: item.user_id.clone(),
        change_type: item.change_type.to_owned(),
        sequence_number: item.sequence_number,
        attempt,
        outcome,
        final_attempt,
        duplicate,
        batch_len,
        instant: Instant::now(),
        at: Utc::now(),
    }
}

fn push_record(st: &mut State, rec: DeliveryRecord) {
    if st.deliveries.len() >= MAX_RECORDS {
        st.deliveries.drain(..MAX_RECORDS / 10);
    }
    st.deliveries.push(rec);
}

/// Graph's validation handshake: POST `url?validationToken=<token>` with no body and expect
/// `200`, `text/plain`, the decoded token as the body, within `timeout`. The token looks like
/// Graph's (spaces and colons included) so that receivers must decode it properly.
pub(super) async fn handshake(
    http: &reqwest::Client,
    url: &Url,
    timeout: Duration,
) -> Result<(), String> {
    let token = format!(
        "Validation: Testing client application reachability for subscription Request-Id: {}",
        uuid::Uuid::new_v4()
    );
    let mut target = url.clone();
    target
        .query_pairs_mut()
        .append_pair("validationToken", &token);
    let resp = http
        .post(target)
        .timeout(timeout)
        .header(reqwest::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .send()
        .await
        .map_err(|e| {
            if e.is_timeout() {
                format!("the endpoint did not answer within {timeout:?}")
            } else {
                format!("the endpoint could not be reached: {}", e.without_url())
            }
        })?;
    let status = resp.status();
    if status != reqwest::StatusCode::OK {
        return Err(format!("the endpoint answered {status}, expected 200 OK"));
    }
    let content_type = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if !content_type.starts_with("text/plain") {
        return Err(format!(
            "the answer's Content-Type was {content_type:?}, expected text/plain"
        ));
    }
    let body = resp
        .text()
        .await
        .map_err(|e| format!("the answer could not be read: {}", e.without_url()))?;
    if body != token {
        return Err("the answer did not echo the validation token".into());
    }
    Ok(())
}
