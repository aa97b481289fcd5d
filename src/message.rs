//! The queue wire format: every message on the bus is a signed CloudEvents 1.0 envelope.
//!
//! This module is the only place that knows the bytes travelling on the bus. The JSON
//! Schemas in `schemas/` describe exactly what [`encode`] writes; a test validates real
//! serialized messages against them. Message types carry a version suffix (`.v1`); a new
//! incompatible shape gets a new type string, and a worker that does not know a type
//! dead-letters it instead of guessing.
//!
//! Two more things travel with every message and are owned here: the W3C trace context
//! (`traceparent`, [`trace`]), written both as an AMQP header and as the CloudEvents
//! distributed-tracing extension attribute, and — for outcome events — the routing key by
//! decision ([`UserOutcome::routing_key`]), the one place that computes it.

pub mod trace;

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// AMQP `content-type` of every message (CloudEvents structured mode).
pub const CONTENT_TYPE: &str = "application/cloudevents+json";
/// AMQP header carrying the lowercase hex HMAC-SHA256 of the body.
pub const SIGNATURE_HEADER: &str = "x-flagrelay-signature";
/// AMQP header naming the key that produced [`SIGNATURE_HEADER`].
pub const KEY_ID_HEADER: &str = "x-flagrelay-key-id";
/// AMQP header (and CloudEvents extension attribute) carrying the W3C trace context. Not
/// signed as a header (the copy in the envelope is); used for tracing only, never to decide.
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// CloudEvents `source` of messages created by the receiver.
pub const SOURCE_RECEIVER: &str = "urn:flagrelay:receiver";
/// CloudEvents `source` of outcome events created by workers.
pub const SOURCE_WORKER: &str = "urn:flagrelay:worker";

pub const TYPE_USER_CHANGED: &str = "io.flagrelay.graph.user.changed.v1";
pub const TYPE_LIFECYCLE: &str = "io.flagrelay.graph.subscription.lifecycle.v1";
pub const TYPE_USER_OUTCOME: &str = "io.flagrelay.user.outcome.v1";

pub use trace::TraceContext;

/// Where a user-changed message came from. Processing is the same for all of them; the origin
/// is kept for logs and latency accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// A Graph change notification received by the webhook.
    Notification,
    /// An operator or a test re-queued the user by hand.
    Manual,
    /// flagrelay scheduled a re-evaluation (end of a grace period, a date passing).
    Recheck,
    /// The delta-query backstop saw the user change.
    Delta,
    /// The drift sweep found Proofpoint differing from the policy's decision.
    Sweep,
}

/// "Something about this user changed; go and look." Deliberately carries no user state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserChanged {
    /// Lower-cased on decoding, whatever the publisher wrote.
    pub tenant_id: crate::ids::TenantId,
    /// The object id (lower-cased); a UPN is resolved and re-queued under the object id.
    pub user_id: crate::ids::UserId,
    /// Graph `changeType` (`updated` or `deleted`); informational only.
    pub change_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscription_id: Option<String>,
    /// Graph's `resourceData.eventTime`, when it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_time: Option<DateTime<Utc>>,
    /// When flagrelay received it; the start of the end-to-end latency.
    pub received_at: DateTime<Utc>,
    pub origin: Origin,
    /// Rechecks only: not to be evaluated before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<DateTime<Utc>>,
}

/// A Graph lifecycle notification (`reauthorizationRequired` for users).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionLifecycle {
    pub tenant_id: crate::ids::TenantId,
    pub subscription_id: String,
    pub lifecycle_event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscription_expiration: Option<DateTime<Utc>>,
    pub received_at: DateTime<Utc>,
}

/// What a worker did about one user: published for other systems (ticketing, SIEM, billing).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserOutcome {
    pub tenant_id: String,
    pub user_id: String,
    /// The Proofpoint address that was looked at, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// `applied`, `no_change`, `skipped`, `held` (blast-radius breaker), `identity_conflict`
    /// (the address is not this object's to write) or `dead_lettered`.
    pub result: String,
    /// The policy's action (`activate`, `deactivate`, `ignore`, `keep_mail_flowing`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Why: the rule or guard that decided, or the reason it was skipped.
    pub reason: String,
    /// Proofpoint `is_active` before, when read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub was_active: Option<bool>,
    /// Proofpoint `is_active` after (in dry-run: what it would be), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_active: Option<bool>,
    pub dry_run: bool,
    /// Id of the message that caused this evaluation.
    pub cause_id: String,
    /// Milliseconds from the cause's receipt to this outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// The policy rule (or guard, e.g. `guard:admin`) that decided, once the policy ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// On Proofpoint's Azure-sync exemption list before, when read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub was_exempt: Option<bool>,
    /// On the exemption list after (in dry-run: what it would be), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_exempt: Option<bool>,
    /// `identity_conflict` only: the other Graph objects involved (e.g. the one that holds
    /// the address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflicting_object_ids: Option<Vec<String>>,
}

/// What an outcome event announces, one routing key each on `{prefix}.events`:
/// `decision.<name>` (see [`UserOutcome::routing_key`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Announcement {
    /// Proofpoint was changed towards `activate` (made active, or an exemption flagrelay had
    /// added removed so the scheduled sync applies again).
    Activated,
    /// Proofpoint was changed towards `deactivate` (made Not Active).
    Deactivated,
    /// Proofpoint was changed towards `keep_mail_flowing` (made active and/or exempted from
    /// the scheduled sync).
    KeptMailFlowing,
    /// Proofpoint already matched the decision.
    NoChange,
    /// Left alone on purpose (`ignore` rule, guard, deleted user, unknown to Proofpoint, ...).
    Skipped,
    /// A deactivation the blast-radius breaker holds back.
    Held,
    /// A write refused: the address is not this Graph object's (another object holds it, it
    /// lies outside the org's domains, or its binding changed). An operator decides.
    IdentityConflict,
    /// Given up: the cause is in the dead-letter queue.
    DeadLettered,
}

/// First segment of every outcome event's routing key.
pub const DECISION_KEY_PREFIX: &str = "decision";

impl Announcement {
    pub const ALL: [Announcement; 8] = [
        Announcement::Activated,
        Announcement::Deactivated,
        Announcement::KeptMailFlowing,
        Announcement::NoChange,
        Announcement::Skipped,
        Announcement::Held,
        Announcement::IdentityConflict,
        Announcement::DeadLettered,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Announcement::Activated => "activated",
            Announcement::Deactivated => "deactivated",
            Announcement::KeptMailFlowing => "kept_mail_flowing",
            Announcement::NoChange => "no_change",
            Announcement::Skipped => "skipped",
            Announcement::Held => "held",
            Announcement::IdentityConflict => "identity_conflict",
            Announcement::DeadLettered => "dead_lettered",
        }
    }

    /// `decision.<name>`, e.g. `decision.deactivated`.
    pub fn routing_key(self) -> String {
        format!("{DECISION_KEY_PREFIX}.{}", self.as_str())
    }
}

impl UserOutcome {
    /// What this event announces, from `result` and `action`: an `applied` outcome is named
    /// by the action it carried out; every other result names itself.
    pub fn announcement(&self) -> Announcement {
        match (self.result.as_str(), self.action.as_deref()) {
            ("applied", Some("deactivate")) => Announcement::Deactivated,
            ("applied", Some("keep_mail_flowing")) => Announcement::KeptMailFlowing,
            // `activate` — and nothing else writes: `ignore` never changes Proofpoint.
            ("applied", _) => Announcement::Activated,
            ("no_change", _) => Announcement::NoChange,
            ("held", _) => Announcement::Held,
            ("identity_conflict", _) => Announcement::IdentityConflict,
            ("dead_lettered", _) => Announcement::DeadLettered,
            _ => Announcement::Skipped,
        }
    }

    /// The routing key of this event on the `{prefix}.events` topic exchange. The only
    /// place that computes it.
    pub fn routing_key(&self) -> String {
        self.announcement().routing_key()
    }
}

/// Every message type flagrelay puts on the bus.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    UserChanged(UserChanged),
    Lifecycle(SubscriptionLifecycle),
    UserOutcome(UserOutcome),
}

impl Message {
    pub fn event_type(&self) -> &'static str {
        match self {
            Message::UserChanged(_) => TYPE_USER_CHANGED,
            Message::Lifecycle(_) => TYPE_LIFECYCLE,
            Message::UserOutcome(_) => TYPE_USER_OUTCOME,
        }
    }

    fn source(&self) -> &'static str {
        match self {
            Message::UserOutcome(_) => SOURCE_WORKER,
            _ => SOURCE_RECEIVER,
        }
    }

    /// The CloudEvents `subject`: the user object id, or the subscription id for lifecycle events.
    pub fn subject(&self) -> &str {
        match self {
            Message::UserChanged(m) => m.user_id.as_str(),
            Message::Lifecycle(m) => &m.subscription_id,
            Message::UserOutcome(m) => &m.user_id,
        }
    }

    pub fn tenant_id(&self) -> &str {
        match self {
            Message::UserChanged(m) => m.tenant_id.as_str(),
            Message::Lifecycle(m) => m.tenant_id.as_str(),
            Message::UserOutcome(m) => &m.tenant_id,
        }
    }

    /// Routing key on the events exchange: outcome events by decision; other types are never
    /// published there and get an empty key.
    pub fn event_routing_key(&self) -> String {
        match self {
            Message::UserOutcome(o) => o.routing_key(),
            _ => String::new(),
        }
    }

    /// The key that decides the shard: everything about one user (or one subscription) lands
    /// on one shard queue, which has a single active consumer.
    pub fn shard_key(&self) -> String {
        format!("{}/{}", self.tenant_id(), self.subject())
    }

    fn schema(&self) -> &'static str {
        match self {
            Message::UserChanged(_) => "user-changed.v1.schema.json",
            Message::Lifecycle(_) => "subscription-lifecycle.v1.schema.json",
            Message::UserOutcome(_) => "user-outcome.v1.schema.json",
        }
    }

    /// A stable CloudEvents id: a replay of the same Graph notification gets the same id, so
    /// consumers can de-duplicate; anything without an event time gets a fresh one.
    pub fn natural_id(&self) -> String {
        let stable = match self {
            Message::UserChanged(m) => m.event_time.map(|t| {
                format!(
                    "{}|{}|{}|{}|{}",
                    m.tenant_id,
                    m.subscription_id.as_deref().unwrap_or(""),
                    m.user_id,
                    m.change_type,
                    t.to_rfc3339()
                )
            }),
            _ => None,
        };
        match stable {
            Some(s) => {
                let digest = Sha256::digest(s.as_bytes());
                uuid::Builder::from_random_bytes(digest[..16].try_into().expect("16 bytes"))
                    .into_uuid()
                    .to_string()
            }
            None => uuid::Uuid::new_v4().to_string(),
        }
    }
}

/// The CloudEvents 1.0 structured-mode envelope.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope<D> {
    specversion: String,
    id: String,
    source: String,
    #[serde(rename = "type")]
    event_type: String,
    subject: String,
    time: DateTime<Utc>,
    datacontenttype: String,
    dataschema: String,
    /// CloudEvents distributed-tracing extension: the W3C trace context of the producer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    traceparent: Option<String>,
    data: D,
}

/// A message ready for the bus: body plus the headers a broker backend must carry verbatim.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// CloudEvents id; also the AMQP `message_id`.
    pub id: String,
    pub event_type: &'static str,
    /// See [`Message::shard_key`].
    pub shard_key: String,
    /// Outcome events only: the routing key on the events exchange
    /// ([`UserOutcome::routing_key`]). Work messages are routed by shard and leave it empty.
    pub routing_key: String,
    pub body: Bytes,
    /// Signature, key id and [`TRACEPARENT_HEADER`] (and, on retries, the queue layer's
    /// attempt bookkeeping). Backends carry every entry as an AMQP string header.
    pub headers: BTreeMap<String, String>,
}

/// A verified, typed message taken off the bus.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub id: String,
    pub time: DateTime<Utc>,
    pub message: Message,
}

/// Why a message could not be accepted. All of these are permanent: retrying cannot help.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("message has no {SIGNATURE_HEADER} or {KEY_ID_HEADER} header")]
    MissingSignature,
    #[error("message is signed with unknown key id {0:?}")]
    UnknownKey(String),
    #[error("message signature does not verify")]
    BadSignature,
    #[error("message body is not a valid envelope: {0}")]
    Malformed(#[source] serde_json::Error),
    #[error("unsupported CloudEvents specversion {0:?}")]
    UnsupportedVersion(String),
    #[error("unknown message type {0:?}")]
    UnknownType(String),
}

type HmacSha256 = Hmac<Sha256>;

/// Signs outgoing messages with the current key.
#[derive(Clone)]
pub struct Signer {
    key_id: String,
    key: SecretString,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl Signer {
    pub fn new(key_id: impl Into<String>, key: SecretString) -> Self {
        Self {
            key_id: key_id.into(),
            key,
        }
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn sign(&self, body: &[u8]) -> String {
        let mut mac = HmacSha256::new_from_slice(self.key.expose_secret().as_bytes())
            .expect("HMAC accepts keys of any length");
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    }
}

/// Verifies incoming messages against every configured key (current and previous ones, so
/// keys can be rotated without stopping the bus).
#[derive(Clone, Default)]
pub struct Verifier {
    keys: HashMap<String, SecretString>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ids: Vec<_> = self.keys.keys().collect();
        ids.sort();
        f.debug_struct("Verifier").field("key_ids", &ids).finish()
    }
}

impl Verifier {
    pub fn new(keys: impl IntoIterator<Item = (String, SecretString)>) -> Self {
        Self {
            keys: keys.into_iter().collect(),
        }
    }

    pub fn verify(
        &self,
        body: &[u8],
        headers: &BTreeMap<String, String>,
    ) -> Result<(), DecodeError> {
        let (Some(sig), Some(kid)) = (headers.get(SIGNATURE_HEADER), headers.get(KEY_ID_HEADER))
        else {
            return Err(DecodeError::MissingSignature);
        };
        let key = self
            .keys
            .get(kid)
            .ok_or_else(|| DecodeError::UnknownKey(kid.clone()))?;
        let sig = hex::decode(sig).map_err(|_| DecodeError::BadSignature)?;
        let mut mac = HmacSha256::new_from_slice(key.expose_secret().as_bytes())
            .expect("HMAC accepts keys of any length");
        mac.update(body);
        // verify_slice compares in constant time.
        mac.verify_slice(&sig)
            .map_err(|_| DecodeError::BadSignature)
    }
}

/// Serialize `message` into a signed envelope with the given id and time, in a new trace.
pub fn encode_with(message: &Message, id: String, time: DateTime<Utc>, signer: &Signer) -> Encoded {
    build(message, id, time, &TraceContext::new_root(), signer)
}

/// Serialize `message` with its [`Message::natural_id`] and the current time, in a new trace.
pub fn encode(message: &Message, signer: &Signer) -> Encoded {
    encode_traced(message, signer, &TraceContext::new_root())
}

/// Serialize `message` as part of `trace`: the trace context goes into the envelope
/// (CloudEvents `traceparent` extension) and into the [`TRACEPARENT_HEADER`] header.
pub fn encode_traced(message: &Message, signer: &Signer, trace: &TraceContext) -> Encoded {
    build(message, message.natural_id(), Utc::now(), trace, signer)
}

fn build(
    message: &Message,
    id: String,
    time: DateTime<Utc>,
    trace: &TraceContext,
    signer: &Signer,
) -> Encoded {
    fn envelope<D: Serialize>(
        m: &Message,
        id: &str,
        time: DateTime<Utc>,
        traceparent: &str,
        data: &D,
    ) -> Vec<u8> {
        let env = Envelope {
            specversion: "1.0".into(),
            id: id.to_owned(),
            source: m.source().into(),
            event_type: m.event_type().into(),
            subject: m.subject().to_owned(),
            time,
            datacontenttype: "application/json".into(),
            dataschema: format!("https://flagrelay.dev/schemas/{}", m.schema()),
            traceparent: Some(traceparent.to_owned()),
            data,
        };
        serde_json::to_vec(&env).expect("message types always serialize")
    }
    let traceparent = trace.to_string();
    let tp = traceparent.as_str();
    let body = match message {
        Message::UserChanged(d) => envelope(message, &id, time, tp, d),
        Message::Lifecycle(d) => envelope(message, &id, time, tp, d),
        Message::UserOutcome(d) => envelope(message, &id, time, tp, d),
    };
    let mut headers = BTreeMap::new();
    headers.insert(SIGNATURE_HEADER.to_owned(), signer.sign(&body));
    headers.insert(KEY_ID_HEADER.to_owned(), signer.key_id().to_owned());
    headers.insert(TRACEPARENT_HEADER.to_owned(), traceparent);
    Encoded {
        id,
        event_type: message.event_type(),
        shard_key: message.shard_key(),
        routing_key: message.event_routing_key(),
        body: Bytes::from(body),
        headers,
    }
}

/// The trace context a consumed message carries in its [`TRACEPARENT_HEADER`] header, when
/// that is a valid one.
pub fn trace_of(headers: &BTreeMap<String, String>) -> Option<TraceContext> {
    headers
        .get(TRACEPARENT_HEADER)
        .and_then(|v| TraceContext::parse(v))
}

/// Verify the signature, then parse the envelope into a typed message.
pub fn decode(
    body: &[u8],
    headers: &BTreeMap<String, String>,
    verifier: &Verifier,
) -> Result<Decoded, DecodeError> {
    verifier.verify(body, headers)?;
    let env: Envelope<serde_json::Value> =
        serde_json::from_slice(body).map_err(DecodeError::Malformed)?;
    if env.specversion != "1.0" {
        return Err(DecodeError::UnsupportedVersion(env.specversion));
    }
    let message = match env.event_type.as_str() {
        TYPE_USER_CHANGED => {
            Message::UserChanged(serde_json::from_value(env.data).map_err(DecodeError::Malformed)?)
        }
        TYPE_LIFECYCLE => {
            Message::Lifecycle(serde_json::from_value(env.data).map_err(DecodeError::Malformed)?)
        }
        TYPE_USER_OUTCOME => {
            Message::UserOutcome(serde_json::from_value(env.data).map_err(DecodeError::Malformed)?)
        }
        _ => return Err(DecodeError::UnknownType(env.event_type)),
    };
    Ok(Decoded {
        id: env.id,
        time: env.time,
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(kid: &str, key: &str) -> Signer {
        Signer::new(kid, SecretString::from(key.to_owned()))
    }

    fn sample() -> Message {
        Message::UserChanged(UserChanged {
            tenant_id: "t1".into(),
            user_id: "u1".into(),
            change_type: "updated".into(),
            subscription_id: Some("s1".into()),
            event_time: Some("2026-11-23T10:00:00Z".parse().unwrap()),
            received_at: "2026-11-23T10:00:01Z".parse().unwrap(),
            origin: Origin::Notification,
            not_before: None,
        })
    }

    #[test]
    fn round_trips_through_encode_and_decode() {
        let s = signer("k1", "secret-one");
        let enc = encode(&sample(), &s);
        let v = Verifier::new([("k1".to_owned(), SecretString::from("secret-one".to_owned()))]);
        let dec = decode(&enc.body, &enc.headers, &v).unwrap();
        assert_eq!(dec.message, sample());
        assert_eq!(dec.id, enc.id);
        assert_eq!(enc.shard_key, "t1/u1");
    }

    #[test]
    fn replayed_notification_keeps_its_id_and_fresh_ones_differ() {
        assert_eq!(sample().natural_id(), sample().natural_id());
        let mut other = sample();
        if let Message::UserChanged(m) = &mut other {
            m.event_time = None;
        }
        assert_ne!(other.natural_id(), other.natural_id());
    }

    #[test]
    fn accepts_any_configured_key_for_rotation() {
        let old = signer("old", "old-secret");
        let v = Verifier::new([
            (
                "old".to_owned(),
                SecretString::from("old-secret".to_owned()),
            ),
            (
                "new".to_owned(),
                SecretString::from("new-secret".to_owned()),
            ),
        ]);
        let enc = encode(&sample(), &old);
        assert!(decode(&enc.body, &enc.headers, &v).is_ok());
    }

    #[test]
    fn rejects_tampered_body_wrong_key_and_missing_headers() {
        let s = signer("k1", "secret-one");
        let v = Verifier::new([("k1".to_owned(), SecretString::from("secret-one".to_owned()))]);
        let enc = encode(&sample(), &s);

        let mut body = enc.body.to_vec();
        let pos = body.iter().position(|b| *b == b'u').unwrap();
        body[pos] = b'v';
        assert!(matches!(
            decode(&body, &enc.headers, &v),
            Err(DecodeError::BadSignature)
        ));

        let forged = encode(&sample(), &signer("k1", "attacker"));
        assert!(matches!(
            decode(&forged.body, &forged.headers, &v),
            Err(DecodeError::BadSignature)
        ));

        let unknown = encode(&sample(), &signer("k9", "secret-one"));
        assert!(matches!(
            decode(&unknown.body, &unknown.headers, &v),
            Err(DecodeError::UnknownKey(_))
        ));

        assert!(matches!(
            decode(&enc.body, &BTreeMap::new(), &v),
            Err(DecodeError::MissingSignature)
        ));
    }

    #[test]
    fn rejects_unknown_type_and_version_even_when_signed() {
        let s = signer("k1", "k");
        let v = Verifier::new([("k1".to_owned(), SecretString::from("k".to_owned()))]);
        let mut env: serde_json::Value =
            serde_json::from_slice(&encode(&sample(), &s).body).unwrap();
        env["type"] = "io.flagrelay.user.delete-everything.v9".into();
        let body = serde_json::to_vec(&env).unwrap();
        let mut h = BTreeMap::new();
        h.insert(SIGNATURE_HEADER.into(), s.sign(&body));
        h.insert(KEY_ID_HEADER.into(), "k1".into());
        assert!(matches!(
            decode(&body, &h, &v),
            Err(DecodeError::UnknownType(_))
        ));

        env["type"] = TYPE_USER_CHANGED.into();
        env["specversion"] = "0.3".into();
        let body = serde_json::to_vec(&env).unwrap();
        h.insert(SIGNATURE_HEADER.into(), s.sign(&body));
        assert!(matches!(
            decode(&body, &h, &v),
            Err(DecodeError::UnsupportedVersion(_))
        ));
    }

    fn outcome(result: &str, action: Option<&str>) -> UserOutcome {
        UserOutcome {
            tenant_id: "t1".into(),
            user_id: "u1".into(),
            address: None,
            result: result.into(),
            action: action.map(Into::into),
            reason: "r".into(),
            was_active: None,
            is_active: None,
            dry_run: false,
            cause_id: "c".into(),
            latency_ms: None,
            rule: None,
            was_exempt: None,
            is_exempt: None,
            conflicting_object_ids: None,
        }
    }

    #[test]
    fn outcome_events_are_routed_by_decision() {
        let table = [
            ("applied", Some("activate"), "decision.activated"),
            ("applied", Some("deactivate"), "decision.deactivated"),
            (
                "applied",
                Some("keep_mail_flowing"),
                "decision.kept_mail_flowing",
            ),
            ("no_change", Some("deactivate"), "decision.no_change"),
            ("skipped", Some("ignore"), "decision.skipped"),
            ("skipped", None, "decision.skipped"),
            ("held", Some("deactivate"), "decision.held"),
            ("dead_lettered", None, "decision.dead_lettered"),
        ];
        for (result, action, key) in table {
            let o = outcome(result, action);
            assert_eq!(o.routing_key(), key, "{result} {action:?}");
            let enc = encode(&Message::UserOutcome(o), &signer("k1", "k"));
            assert_eq!(enc.routing_key, key, "the encoded event carries it");
        }
        let keys: std::collections::BTreeSet<_> =
            Announcement::ALL.iter().map(|a| a.routing_key()).collect();
        assert_eq!(keys.len(), Announcement::ALL.len());
        assert!(
            keys.iter()
                .all(|k| k.starts_with("decision.") && !k.contains(['*', '#']))
        );
        // Work messages never go to the events exchange.
        assert_eq!(encode(&sample(), &signer("k1", "k")).routing_key, "");
    }

    #[test]
    fn the_trace_context_travels_in_header_and_envelope() {
        let s = signer("k1", "k");
        let trace = TraceContext::new_root();
        let enc = encode_traced(&sample(), &s, &trace);
        assert_eq!(enc.headers[TRACEPARENT_HEADER], trace.to_string());
        assert_eq!(trace_of(&enc.headers), Some(trace));
        let env: serde_json::Value = serde_json::from_slice(&enc.body).unwrap();
        assert_eq!(env["traceparent"], trace.to_string());
        // Without one (or with garbage), there is none to continue.
        let mut h = enc.headers.clone();
        h.insert(TRACEPARENT_HEADER.into(), "00-nonsense".into());
        assert_eq!(trace_of(&h), None);
        // Plain `encode` starts a new trace each time.
        let a = trace_of(&encode(&sample(), &s).headers).unwrap();
        let b = trace_of(&encode(&sample(), &s).headers).unwrap();
        assert_ne!(a.trace_id(), b.trace_id());
    }

    #[test]
    fn debug_never_shows_keys() {
        let s = signer("k1", "super-secret-value");
        let v = Verifier::new([(
            "k1".to_owned(),
            SecretString::from("super-secret-value".to_owned()),
        )]);
        assert!(!format!("{s:?}{v:?}").contains("super-secret-value"));
    }
}
