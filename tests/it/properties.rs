//! Property tests over the parsers that face the outside: the notification parser, envelope
//! verification, and the policy parser. They must never panic, and reject precisely.

use std::collections::BTreeMap;

use flagrelay::message::{self, DecodeError, Message, Origin, Signer, UserChanged, Verifier};
use flagrelay::notification;
use flagrelay::policy::{PolicyError, RulePolicy};
use proptest::prelude::*;
use secrecy::SecretString;

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        ".{0,40}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("tenantId".to_owned()),
                    Just("resource".to_owned()),
                    Just("resourceData".to_owned()),
                    Just("id".to_owned()),
                    Just("organizationId".to_owned()),
                    Just("clientState".to_owned()),
                    Just("sequenceNumber".to_owned()),
                    Just("lifecycleEvent".to_owned()),
                    Just("subscriptionId".to_owned()),
                    "[a-zA-Z@.]{1,12}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

fn key() -> SecretString {
    SecretString::from("a-signing-key-of-at-least-32-characters".to_owned())
}

fn signed() -> message::Encoded {
    let m = Message::UserChanged(UserChanged {
        tenant_id: "t".into(),
        user_id: "u".into(),
        change_type: "updated".into(),
        subscription_id: None,
        event_time: None,
        received_at: chrono::Utc::now(),
        origin: Origin::Notification,
        not_before: None,
    });
    message::encode(&m, &Signer::new("k1", key()))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn the_notification_parser_never_panics_and_accepts_only_plausible_ids(item in json_value()) {
        if let Ok(n) = notification::parse_change(&item) {
            for id in [&n.tenant_id, &n.user_id] {
                prop_assert!(!id.is_empty() && id.len() <= 128);
                prop_assert!(id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c)), "{id:?}");
            }
        }
        let _ = notification::parse_lifecycle(&item);
        let body = serde_json::to_vec(&serde_json::json!({ "value": [item] })).unwrap();
        prop_assert_eq!(notification::parse_collection(&body).unwrap().len(), 1);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_collection_parser(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = notification::parse_collection(&bytes);
    }

    #[test]
    fn any_flipped_byte_of_a_signed_message_is_rejected(pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let enc = signed();
        let verifier = Verifier::new([("k1".to_owned(), key())]);
        let mut body = enc.body.to_vec();
        let i = pos.index(body.len());
        body[i] ^= 1 << bit;
        prop_assert!(matches!(message::decode(&body, &enc.headers, &verifier), Err(DecodeError::BadSignature)));
    }

    #[test]
    fn arbitrary_envelopes_and_headers_never_panic_and_never_verify(
        body in prop::collection::vec(any::<u8>(), 0..256),
        sig in "[0-9a-f]{0,80}",
        kid in "[a-z0-9]{0,4}",
    ) {
        let verifier = Verifier::new([("k1".to_owned(), key())]);
        let mut headers = BTreeMap::new();
        headers.insert(message::SIGNATURE_HEADER.to_owned(), sig);
        headers.insert(message::KEY_ID_HEADER.to_owned(), kid);
        prop_assert!(message::decode(&body, &headers, &verifier).is_err());
    }

    #[test]
    fn the_policy_parser_never_panics_and_points_inside_the_file(text in "[ -~\n]{0,400}") {
        check_policy(&text)?;
    }

    #[test]
    fn a_damaged_example_policy_is_accepted_or_rejected_at_a_line_inside_it(drop_line in any::<prop::sample::Index>(), junk in "[ -~]{0,20}") {
        let example = include_str!("../../examples/policy.toml");
        let mut lines: Vec<&str> = example.lines().collect();
        let i = drop_line.index(lines.len());
        lines[i] = &junk;
        check_policy(&lines.join("\n"))?;
    }
}

fn check_policy(text: &str) -> Result<(), TestCaseError> {
    match RulePolicy::from_toml_str(text, "p.toml") {
        Ok(p) => prop_assert!(
            p.rule_names().count() >= 1,
            "an accepted policy has its default rule"
        ),
        Err(PolicyError::Invalid { line, .. }) => {
            // A line just past the last one is fine: "the file ends without a default rule".
            prop_assert!(
                line >= 1 && line <= text.lines().count() + 1,
                "line {line} outside the file"
            );
        }
        Err(e) => prop_assert!(false, "unexpected error kind: {e}"),
    }
    Ok(())
}
