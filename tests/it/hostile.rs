//! The hostile-input catalogue. Each kind of bad input, what it gets, and the test that
//! proves it; everything not tested here is tested where its part lives.
//!
//! | input                                   | answer / effect                                   | test |
//! |-----------------------------------------|---------------------------------------------------|------|
//! | malformed JSON, empty body              | `400`, nothing queued                             | `receiver::malformed_requests_get_clear_4xx` |
//! | wrong or missing content type           | `415`                                             | same |
//! | deeply nested body                      | `400` (parser depth limit, no stack overflow)     | same |
//! | oversized body                          | `413` (limit: `receiver.max_body_bytes`)          | same |
//! | huge `value` array                      | `413` (limit: `receiver.max_items`)               | same |
//! | wrong method                            | `405`                                             | same |
//! | client stalling in its headers          | disconnected after `receiver.request_timeout`     | `receiver::a_client_that_stalls_in_its_headers_…` |
//! | client stalling in its body             | `408` after `receiver.request_timeout`            | `receiver::a_client_that_stalls_mid_body_…` |
//! | `validationToken` with markup / too long| `400`, never reflected                            | `receiver::hostile_validation_tokens_are_refused` |
//! | forged `clientState`, unknown tenant    | dropped and counted, batch still `202`            | `receiver::forged_client_state_and_unknown_tenants_…` |
//! | replayed notifications                  | `202` each, Proofpoint written once               | [`replayed_notifications_are_accepted_and_change_proofpoint_once`] |
//! | bad signature on the bus                | dead-lettered `bad_signature`, nothing applied    | `pipeline::a_message_with_a_bad_signature_…`, and below |
//! | missing signature, unknown type or      | dead-lettered with the reason, nothing applied,   | [`poison_messages_on_the_bus_are_dead_lettered_with_their_reason_and_work_goes_on`] |
//! | version, undecodable body on the bus    | the worker goes on                                |      |
//! | policy file with errors                 | start refused (exit 2, line named); on SIGHUP the | `process::a_broken_policy_file_…`, `policy::an_invalid_policy_on_reload_…` |
//! |                                         | old policy stays                                  |      |
//! | any input to the parsers                | never a panic; precise rejection                  | `properties` (proptest) |
//! | user id with path syntax (`Users/..`)   | item dropped as `bad_identifier` at the receiver  | `flagrelay::notification` unit tests |
//! | huge `Retry-After` / `expires_in`       | clamped (10 min / 24 h), no overflow panic        | `flagrelay::retry_after` (proptest), graph client tests |
//! | redirect from Graph (token or API)      | not followed: error, the secret stays home        | graph client `redirects_are_never_followed_…` |
//! | plain `http://` to a non-loopback host  | configuration refused, key named                  | config `plain_http_only_to_loopback_…` |
//! | TOML error on a secret's line           | key, file and line named; value never shown       | config `load_error` tests |
//! | `log.filter = "trace"`                  | no secret in any command's output                 | `secrets_in_logs::no_command_prints_a_secret_even_at_trace` |
//!
//! After every one of these the process keeps serving: each test ends with a valid request
//! or message that still goes through.

use std::time::Duration;

use bytes::Bytes;
use flagrelay::message::{self, Encoded, KEY_ID_HEADER, SIGNATURE_HEADER};
use flagrelay::queue::DeadLetter;
use futures::StreamExt;
use secrecy::ExposeSecret;

use crate::support::{Options, TestApp, change_notification, eventually, processed};

#[tokio::test]
async fn replayed_notifications_are_accepted_and_change_proofpoint_once() {
    let t = TestApp::start(
        "replay",
        Options {
            subscribe: false,
            ..Options::default()
        },
    )
    .await;
    let u = t.sandbox.seed_user("replayed", true, "end_user");
    t.sandbox.set_enabled(&u, false);
    let client_state = t.app.config.graph.client_state().expose_secret();
    let body = serde_json::json!({"value": [change_notification(client_state, &u.id, 1)]});
    let client = reqwest::Client::new();
    let endpoint = format!("{}/graph/notifications", t.url);
    // The same delivery 20 times, some at once, as a replaying attacker or a retrying Graph.
    let statuses: Vec<u16> = futures::stream::iter(0..20)
        .map(|_| async {
            client
                .post(&endpoint)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
        .buffer_unordered(5)
        .collect()
        .await;
    assert!(statuses.iter().all(|s| *s == 202), "{statuses:?}");
    assert!(
        eventually(Duration::from_secs(15), || processed(&t) >= 20).await,
        "every copy was evaluated (or coalesced) to the end"
    );
    let writes = t
        .sandbox
        .proofpoint
        .writes()
        .into_iter()
        .filter(|w| w.method == "PUT" && w.email.as_deref() == Some(u.address.as_str()))
        .count();
    assert_eq!(t.sandbox.is_active(&u), Some(false));
    assert_eq!(writes, 1, "replays converge; Proofpoint is written once");
    t.stop().await;
}

#[tokio::test]
async fn poison_messages_on_the_bus_are_dead_lettered_with_their_reason_and_work_goes_on() {
    let t = TestApp::start(
        "poison",
        Options {
            subscribe: false,
            ..Options::default()
        },
    )
    .await;
    let victim = t.sandbox.seed_user("victim", true, "end_user");
    // Blocked in Graph: any poison message that got evaluated would deactivate the victim.
    t.sandbox.set_enabled(&victim, false);
    let signer = t.app.config.signing.signer();
    let valid = message::encode(&crate::support::manual_change(&victim.id), &signer);
    let envelope: serde_json::Value = serde_json::from_slice(&valid.body).unwrap();
    // A body signed with our own key (what a compromised or buggy publisher could send).
    let signed = |id: &str, body: Vec<u8>| {
        let mut headers = valid.headers.clone();
        headers.insert(SIGNATURE_HEADER.into(), signer.sign(&body));
        headers.insert(KEY_ID_HEADER.into(), signer.key_id().into());
        Encoded {
            id: id.into(),
            body: Bytes::from(body),
            headers,
            ..valid.clone()
        }
    };
    let with = |field: &str, value: &str| {
        let mut e = envelope.clone();
        e[field] = value.into();
        serde_json::to_vec(&e).unwrap()
    };
    let unsigned = Encoded {
        id: "poison-unsigned".into(),
        headers: Default::default(),
        ..valid.clone()
    };
    let poison = [
        (unsigned, "bad_signature"),
        (
            signed(
                "poison-type",
                with("type", "io.flagrelay.graph.user.changed.v9"),
            ),
            "unknown_message_type",
        ),
        (
            signed("poison-version", with("specversion", "0.3")),
            "unknown_message_type",
        ),
        (
            signed("poison-garbage", b"\x00\xffnot json at all".to_vec()),
            "undecodable",
        ),
    ];
    for (message, _) in &poison {
        t.app.queue.publish(message).await.unwrap();
    }
    let mut letters: Vec<DeadLetter> = Vec::new();
    for _ in 0..150 {
        letters.extend(t.app.queue.take_dead_letters(10).await.unwrap());
        if letters.len() >= poison.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (message, reason) in &poison {
        let letter = letters
            .iter()
            .find(|l| l.message_id.as_deref() == Some(message.id.as_str()))
            .unwrap_or_else(|| panic!("{} was dead-lettered", message.id));
        assert_eq!(letter.reason(), Some(*reason), "{}", message.id);
    }
    assert_eq!(
        t.sandbox.is_active(&victim),
        Some(true),
        "no poison message was acted on"
    );
    // The worker goes on: the genuine message is applied.
    t.app.queue.publish(&valid).await.unwrap();
    assert!(
        eventually(Duration::from_secs(15), || t.sandbox.is_active(&victim)
            == Some(false))
        .await,
        "a valid message after the poison is applied"
    );
    t.stop().await;
}
