//! Criterion micro-benchmarks of the hot paths (CPU only, no IO): what the receiver does to a
//! notification collection before publishing (parse, clientState check, envelope, HMAC
//! signature), what a worker does to a message first (signature verification and decoding),
//! and a policy decision with the shipped example policy.
//!
//! `cargo bench --bench hot_paths` (`-- --quick` for a short run). The numbers are recorded in
//! BENCHMARKS.md.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use flagrelay::graph::{GraphUser, Group};
use flagrelay::message::{self, Message, Origin, Signer, UserChanged, Verifier};
use flagrelay::policy::{Facts, Policy, RulePolicy};
use flagrelay::proofpoint::PpUser;
use flagrelay::queue::QueueSettings;
use flagrelay::queue::embedded::EmbeddedQueue;
use flagrelay::receiver::{ReceiverSettings, ReceiverState};
use flagrelay::telemetry::Metrics;
use secrecy::SecretString;
use serde_json::json;

const TENANT: &str = "8f3c1a52-0b1e-4c2d-9a7e-3f5b6c7d8e9f";
const CLIENT_STATE: &str = "a-client-state-of-realistic-length-0123456789";
const KEY: &str = "a-signing-key-that-is-at-least-32-characters";

fn collection(items: usize) -> Vec<u8> {
    let items: Vec<_> = (0..items)
        .map(|i| {
            let user = format!("0b6f1c2e-7d4a-4f8e-9c3b-{i:012}");
            json!({
                "subscriptionId": "6e0b8a51-1d8f-4a62-9a0e-8b1f0bde4c11",
                "subscriptionExpirationDateTime": "2026-12-20T10:00:00.0000000+00:00",
                "changeType": "updated",
                "clientState": CLIENT_STATE,
                "resource": format!("Users/{user}"),
                "resourceData": {
                    "@odata.type": "#Microsoft.Graph.User",
                    "@odata.id": format!("Users/{user}"),
                    "id": user,
                    "organizationId": TENANT,
                    "eventTime": "2026-11-23T10:00:00.1234567Z",
                    "sequenceNumber": 1
                },
                "tenantId": TENANT
            })
        })
        .collect();
    serde_json::to_vec(&json!({ "value": items })).unwrap()
}

fn receiver(c: &mut Criterion) {
    let settings = ReceiverSettings {
        max_body_bytes: 1 << 20,
        max_items: 1000,
        max_in_flight: 1024,
        retry_after: std::time::Duration::from_secs(10),
        request_timeout: std::time::Duration::from_secs(5),
    };
    let state = ReceiverState::new(
        SecretString::from(CLIENT_STATE),
        [TENANT.to_owned()],
        Arc::new(EmbeddedQueue::new(QueueSettings::with_prefix("bench"))),
        Signer::new("k1", SecretString::from(KEY)),
        Arc::new(Metrics::default()),
        &settings,
    );
    for items in [1, 100] {
        let body = collection(items);
        c.bench_function(
            &format!("receiver: parse+auth+sign, {items} item(s)"),
            |b| {
                b.iter(|| {
                    let encoded = state.prepare_changes(black_box(&body)).unwrap();
                    assert_eq!(encoded.len(), items);
                    encoded
                })
            },
        );
    }
}

fn verify(c: &mut Criterion) {
    let signer = Signer::new("k1", SecretString::from(KEY));
    let verifier = Verifier::new([("k1".to_owned(), SecretString::from(KEY))]);
    let encoded = message::encode(
        &Message::UserChanged(UserChanged {
            tenant_id: TENANT.into(),
            user_id: "0b6f1c2e-7d4a-4f8e-9c3b-000000000001".into(),
            change_type: "updated".into(),
            subscription_id: Some("6e0b8a51-1d8f-4a62-9a0e-8b1f0bde4c11".into()),
            event_time: Some(chrono::Utc::now()),
            received_at: chrono::Utc::now(),
            origin: Origin::Notification,
            not_before: None,
        }),
        &signer,
    );
    c.bench_function("worker: verify+decode an envelope", |b| {
        b.iter(|| message::decode(black_box(&encoded.body), &encoded.headers, &verifier).unwrap())
    });
}

fn policy(c: &mut Criterion) {
    let policy = RulePolicy::from_toml_str(
        include_str!("../examples/policy.toml"),
        "examples/policy.toml",
    )
    .unwrap();
    let user = |enabled: bool| GraphUser {
        id: "0b6f1c2e-7d4a-4f8e-9c3b-000000000001".into(),
        account_enabled: Some(enabled),
        user_principal_name: Some("alice@contoso.example".into()),
        mail: Some("alice@contoso.example".into()),
        proxy_addresses: Some(vec!["SMTP:alice@contoso.example".into()]),
        user_type: Some("Member".into()),
        ..GraphUser::default()
    };
    let pp = PpUser {
        primary_email: "alice@contoso.example".into(),
        user_type: Some("end_user".into()),
        is_active: true,
        other: serde_json::Map::new(),
    };
    let groups: Vec<Group> = (0..20)
        .map(|i| Group {
            id: format!("9a1b2c3d-0000-4000-8000-{i:012}"),
            display_name: Some(format!("team {i}")),
        })
        .collect();
    let now = chrono::Utc::now();
    // Blocked, no leave date, 20 groups, an ordinary mailbox: every rule is tried.
    let (blocked, enabled) = (user(false), user(true));
    for (name, u) in [("blocked (all rules)", &blocked), ("enabled", &enabled)] {
        let facts = Facts::new(u, &pp)
            .with_groups(&groups)
            .with_mailbox_purpose("user")
            .with_leave_date_fetched()
            .with_exemption(false);
        c.bench_function(&format!("policy: examples/policy.toml, {name}"), |b| {
            b.iter(|| policy.decide(black_box(&facts), now))
        });
    }
}

criterion_group!(benches, receiver, verify, policy);
criterion_main!(benches);
