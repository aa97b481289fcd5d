//! The JSON Schemas in `schemas/`, checked against what the code really writes and what
//! Graph really sends.
//!
//! Messages are built with `flagrelay::message::encode` and validated as the bytes that go on
//! the bus, with optional fields both present and absent, and the schemas' field lists are
//! compared with the serialized keys both ways: a field added to, removed from or made
//! optional in a serde struct without the schema following fails here. `jsonschema` runs
//! without its default features (no HTTP or file retrieval), so every schema must resolve its
//! references offline, and formats (`date-time`, `uri`) are asserted, not just annotated.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use flagrelay::message::{
    self, KEY_ID_HEADER, Message, Origin, SIGNATURE_HEADER, Signer, SubscriptionLifecycle,
    TRACEPARENT_HEADER, TYPE_LIFECYCLE, TYPE_USER_CHANGED, TYPE_USER_OUTCOME, UserChanged,
    UserOutcome,
};
use hmac::{Hmac, Mac};
use jsonschema::Validator;
use secrecy::SecretString;
use serde_json::{Value, json};
use sha2::Sha256;

const BASE: &str = "https://flagrelay.dev/schemas/";
const DRAFT_2020_12: &str = "https://json-schema.org/draft/2020-12/schema";
const ENVELOPE: &str = "cloudevent-envelope.schema.json";
const USER_CHANGED: &str = "user-changed.v1.schema.json";
const LIFECYCLE: &str = "subscription-lifecycle.v1.schema.json";
const USER_OUTCOME: &str = "user-outcome.v1.schema.json";
const MESSAGE_SCHEMAS: [&str; 3] = [USER_CHANGED, LIFECYCLE, USER_OUTCOME];
const GRAPH_CHANGE: &str = "graph-notification.schema.json";
const GRAPH_LIFECYCLE: &str = "graph-lifecycle-notification.schema.json";

const KEY: &str = "schema-test-signing-key";

fn schemas_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas")
}

fn load(name: &str) -> Value {
    let path = schemas_dir().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name} is not JSON: {e}"))
}

fn validator(name: &str) -> Validator {
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&load(name))
        .unwrap_or_else(|e| panic!("{name} does not compile (offline): {e}"))
}

/// Every violation of `doc` against schema `name`, one "path: message" line each.
fn violations(name: &str, doc: &Value) -> Vec<String> {
    validator(name)
        .iter_errors(doc)
        .map(|e| format!("{}: {e}", e.instance_path))
        .collect()
}

/// The one assertion helper: `doc` must (or must not) validate against schema `name`.
fn check(name: &str, doc: &Value, valid: bool, what: &str) {
    let errors = violations(name, doc);
    if valid {
        assert!(
            errors.is_empty(),
            "{what}: expected valid against {name}, got:\n  {}\n{doc:#}",
            errors.join("\n  ")
        );
    } else {
        assert!(
            !errors.is_empty(),
            "{what}: expected {name} to reject it:\n{doc:#}"
        );
    }
}

fn time(s: &str) -> DateTime<Utc> {
    s.parse().expect("test timestamp")
}

fn signer() -> Signer {
    Signer::new("k1", SecretString::from(KEY.to_owned()))
}

/// The parsed body `encode` puts on the bus.
fn encoded(m: &Message) -> Value {
    serde_json::from_slice(&message::encode(m, &signer()).body).expect("body is JSON")
}

/// One message type: its schema, and a sample with every optional field set and one with none.
struct Case {
    schema: &'static str,
    event_type: &'static str,
    full: Message,
    minimal: Message,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            schema: USER_CHANGED,
            event_type: TYPE_USER_CHANGED,
            full: Message::UserChanged(UserChanged {
                tenant_id: "11111111-2222-3333-4444-555555555555".into(),
                user_id: "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee".into(),
                change_type: "updated".into(),
                subscription_id: Some("99999999-8888-7777-6666-555555555555".into()),
                event_time: Some(time("2026-11-23T10:00:00.1234567Z")),
                // Sub-second precision as the receiver really stamps it.
                received_at: Utc::now(),
                origin: Origin::Recheck,
                not_before: Some(time("2026-11-30T10:00:00Z")),
            }),
            minimal: Message::UserChanged(UserChanged {
                tenant_id: "t-1".into(),
                user_id: "u-1".into(),
                change_type: "deleted".into(),
                subscription_id: None,
                event_time: None,
                received_at: time("2026-11-23T10:00:01Z"),
                origin: Origin::Manual,
                not_before: None,
            }),
        },
        Case {
            schema: LIFECYCLE,
            event_type: TYPE_LIFECYCLE,
            full: Message::Lifecycle(SubscriptionLifecycle {
                tenant_id: "t-1".into(),
                subscription_id: "sub-1".into(),
                lifecycle_event: "reauthorizationRequired".into(),
                subscription_expiration: Some(time("2026-12-01T10:00:00+00:00")),
                received_at: Utc::now(),
            }),
            minimal: Message::Lifecycle(SubscriptionLifecycle {
                tenant_id: "t-1".into(),
                subscription_id: "sub-1".into(),
                lifecycle_event: "reauthorizationRequired".into(),
                subscription_expiration: None,
                received_at: time("2026-11-23T10:00:01Z"),
            }),
        },
        Case {
            schema: USER_OUTCOME,
            event_type: TYPE_USER_OUTCOME,
            full: outcome("applied", Some("deactivate"), true),
            minimal: outcome("dead_lettered", None, false),
        },
    ]
}

fn outcome(result: &str, action: Option<&str>, known: bool) -> Message {
    Message::UserOutcome(UserOutcome {
        tenant_id: "t-1".into(),
        user_id: "u-1".into(),
        address: known.then(|| "alice@example.com".into()),
        result: result.into(),
        action: action.map(Into::into),
        reason: "mirror: account disabled".into(),
        was_active: known.then_some(true),
        is_active: known.then_some(false),
        dry_run: !known,
        cause_id: uuid::Uuid::new_v4().to_string(),
        latency_ms: known.then_some(1234),
        rule: known.then(|| "leavers".into()),
        was_exempt: known.then_some(false),
        is_exempt: known.then_some(true),
        conflicting_object_ids: known.then(|| vec![uuid::Uuid::new_v4().to_string()]),
    })
}

/// Every message shape the worker can publish: each result, with and without each action.
fn outcome_variants() -> Vec<Message> {
    let mut all = Vec::new();
    for result in ["applied", "no_change", "skipped", "held", "dead_lettered"] {
        for action in [
            None,
            Some("activate"),
            Some("deactivate"),
            Some("ignore"),
            Some("keep_mail_flowing"),
        ] {
            all.push(outcome(result, action, action.is_some()));
        }
    }
    all
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().expect("an object").keys().cloned().collect()
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .expect("an array")
        .iter()
        .map(|s| s.as_str().expect("a string").to_owned())
        .collect()
}

#[test]
fn every_schema_is_draft_2020_12_with_its_id_and_a_description() {
    let mut found = BTreeSet::new();
    for entry in std::fs::read_dir(schemas_dir()).expect("schemas/ exists") {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if !name.ends_with(".schema.json") {
            continue;
        }
        let schema = load(&name);
        if let Err(e) = jsonschema::meta::validate(&schema) {
            panic!("{name} is not a valid JSON Schema: {e}");
        }
        assert_eq!(schema["$schema"], DRAFT_2020_12, "{name}");
        assert_eq!(schema["$id"], format!("{BASE}{name}"), "{name}");
        assert!(
            schema["description"].as_str().is_some_and(|d| d.len() > 20),
            "{name} needs a description"
        );
        validator(&name);
        found.insert(name);
    }
    // policy.schema.json describes the policy file; its own test is in src/policy/tests.
    let expected: BTreeSet<String> = [
        ENVELOPE,
        GRAPH_CHANGE,
        GRAPH_LIFECYCLE,
        "policy.schema.json",
    ]
    .into_iter()
    .chain(MESSAGE_SCHEMAS)
    .map(str::to_owned)
    .collect();
    assert_eq!(found, expected);
}

#[test]
fn message_schemas_bundle_the_current_envelope_verbatim() {
    let envelope = load(ENVELOPE);
    for name in MESSAGE_SCHEMAS {
        let schema = load(name);
        assert_eq!(
            schema["$defs"]["envelope"], envelope,
            "{name}: $defs/envelope must be a verbatim copy of {ENVELOPE}"
        );
        assert_eq!(schema["allOf"][0]["$ref"], format!("{BASE}{ENVELOPE}"));
    }
}

#[test]
fn encoded_messages_validate_against_the_schema_they_name() {
    let mut messages: Vec<Message> = cases()
        .into_iter()
        .flat_map(|c| [c.full, c.minimal])
        .collect();
    messages.extend(outcome_variants());
    for m in &messages {
        let doc = encoded(m);
        let named = doc["dataschema"]
            .as_str()
            .and_then(|s| s.strip_prefix(BASE))
            .unwrap_or_else(|| panic!("dataschema is not under {BASE}: {doc}"));
        let expected = cases()
            .into_iter()
            .find(|c| c.event_type == m.event_type())
            .expect("every type has a case")
            .schema;
        assert_eq!(named, expected, "{} names the wrong schema", m.event_type());
        check(named, &doc, true, m.event_type());
        check(ENVELOPE, &doc, true, m.event_type());
        for other in MESSAGE_SCHEMAS.into_iter().filter(|s| *s != named) {
            check(
                other,
                &doc,
                false,
                &format!("{} as {other}", m.event_type()),
            );
        }
    }
}

/// The schemas must list exactly what serde writes: every property appears in the full sample,
/// and the required list is exactly what the minimal sample still carries.
#[test]
fn schemas_list_exactly_the_fields_the_code_writes() {
    let envelope = load(ENVELOPE);
    for case in cases() {
        let schema = load(case.schema);
        let data = &schema["$defs"]["data"];
        let full = encoded(&case.full);
        let minimal = encoded(&case.minimal);

        assert_eq!(keys(&full), keys(&envelope["properties"]), "envelope keys");
        // Every attribute is required but the tracing extension, which messages written
        // before it existed lack (flagrelay itself always writes it now).
        let mut required = keys(&full);
        assert!(
            required.remove(TRACEPARENT_HEADER),
            "encode writes traceparent"
        );
        assert_eq!(
            required,
            strings(&envelope["required"]),
            "envelope required"
        );
        assert_eq!(
            keys(&minimal),
            keys(&full),
            "envelope keys of the minimal sample"
        );
        assert_eq!(
            keys(&full["data"]),
            keys(&data["properties"]),
            "{}: properties vs. fields of the full sample",
            case.schema
        );
        assert_eq!(
            keys(&minimal["data"]),
            strings(&data["required"]),
            "{}: required vs. fields of the minimal sample",
            case.schema
        );
        assert_eq!(data["additionalProperties"], false, "{}", case.schema);
        assert_eq!(schema["properties"]["type"]["const"], case.event_type);
        assert_eq!(schema["properties"]["source"]["const"], full["source"]);
    }
}

/// What `schemas/README.md` tells consumers: body signed as-is, lowercase hex HMAC-SHA256 in
/// `x-flagrelay-signature`, key id beside it, CloudEvents id = AMQP message_id.
#[test]
fn signature_headers_are_what_the_readme_documents() {
    for case in cases() {
        let enc = message::encode(&case.full, &signer());
        let header_names: BTreeSet<&str> = enc.headers.keys().map(String::as_str).collect();
        assert_eq!(
            header_names,
            BTreeSet::from([KEY_ID_HEADER, SIGNATURE_HEADER, TRACEPARENT_HEADER])
        );
        assert_eq!(enc.headers[KEY_ID_HEADER], "k1");

        let mut mac = Hmac::<Sha256>::new_from_slice(KEY.as_bytes()).unwrap();
        mac.update(&enc.body);
        let expected = hex::encode(mac.finalize().into_bytes());
        assert_eq!(enc.headers[SIGNATURE_HEADER], expected);
        assert!(
            expected
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
                && expected.len() == 64
        );

        let doc: Value = serde_json::from_slice(&enc.body).unwrap();
        assert_eq!(doc["id"], enc.id.as_str());
        // The trace context: the same W3C value in the header and the envelope extension.
        assert_eq!(doc["traceparent"], enc.headers[TRACEPARENT_HEADER].as_str());
        assert!(message::TraceContext::parse(&enc.headers[TRACEPARENT_HEADER]).is_some());
    }
}

type Edit = fn(&mut Value);

#[test]
fn schemas_reject_drifted_messages() {
    let changed = || encoded(&cases().remove(0).full);
    let outcome = || encoded(&cases().remove(2).full);
    let table: Vec<(&str, Value, &str, Edit)> = vec![
        (USER_CHANGED, changed(), "another type's const", |d| {
            d["type"] = json!(TYPE_LIFECYCLE)
        }),
        (ENVELOPE, changed(), "type without version", |d| {
            d["type"] = json!("io.flagrelay.graph.user.changed")
        }),
        (ENVELOPE, changed(), "specversion 0.3", |d| {
            d["specversion"] = json!("0.3")
        }),
        (ENVELOPE, changed(), "no time", |d| remove(d, "time")),
        (ENVELOPE, changed(), "traceparent not W3C", |d| {
            d["traceparent"] = json!("4bf92f3577b34da6a3ce929d0e0e4736")
        }),
        (ENVELOPE, changed(), "time not a date-time", |d| {
            d["time"] = json!("yesterday")
        }),
        (ENVELOPE, changed(), "datacontenttype", |d| {
            d["datacontenttype"] = json!("text/plain")
        }),
        (USER_CHANGED, changed(), "dataschema of another type", |d| {
            d["dataschema"] = json!(format!("{BASE}{LIFECYCLE}"))
        }),
        (USER_CHANGED, changed(), "source of the worker", |d| {
            d["source"] = json!(message::SOURCE_WORKER)
        }),
        (USER_CHANGED, changed(), "data without received_at", |d| {
            remove(&mut d["data"], "received_at")
        }),
        (USER_CHANGED, changed(), "extra field in data", |d| {
            d["data"]["display_name"] = json!("Alice")
        }),
        (USER_CHANGED, changed(), "unknown origin", |d| {
            d["data"]["origin"] = json!("webhook")
        }),
        (USER_CHANGED, changed(), "event_time not a date-time", |d| {
            d["data"]["event_time"] = json!("2026-11-23 10:00")
        }),
        (USER_CHANGED, changed(), "null instead of absent", |d| {
            d["data"]["subscription_id"] = Value::Null
        }),
        (USER_OUTCOME, outcome(), "result not in the enum", |d| {
            d["data"]["result"] = json!("retrying")
        }),
        (USER_OUTCOME, outcome(), "unknown action", |d| {
            d["data"]["action"] = json!("delete")
        }),
        (USER_OUTCOME, outcome(), "negative latency", |d| {
            d["data"]["latency_ms"] = json!(-1)
        }),
        (USER_OUTCOME, outcome(), "dry_run missing", |d| {
            remove(&mut d["data"], "dry_run")
        }),
        (
            LIFECYCLE,
            encoded(&cases().remove(1).full),
            "extra field",
            |d| d["data"]["client_state"] = json!("s3cret"),
        ),
    ];
    for (schema, mut doc, what, edit) in table {
        check(schema, &doc, true, &format!("{what} (before the edit)"));
        edit(&mut doc);
        check(schema, &doc, false, what);
        if schema == ENVELOPE {
            // The message schemas enforce the envelope through their bundled copy.
            let own = doc["dataschema"]
                .as_str()
                .unwrap()
                .strip_prefix(BASE)
                .unwrap();
            check(own, &doc, false, &format!("{what}, via {own}"));
        }
    }
}

fn remove(v: &mut Value, key: &str) {
    v.as_object_mut().expect("an object").remove(key);
}

/// The example from the Graph fact sheet (`graph-users.md`), placeholders filled in.
fn documented_item() -> Value {
    json!({
        "subscriptionId": "7f105c7d-2dc5-4530-97cd-4e7ae6534c07",
        "subscriptionExpirationDateTime": "2026-12-01T10:00:00+00:00",
        "changeType": "updated",
        "clientState": "secretClientValue",
        "resource": "Users/aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
        "resourceData": {
            "@odata.type": "#Microsoft.Graph.User",
            "@odata.id": "Users/aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
            "id": "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
            "organizationId": "11111111-2222-3333-4444-555555555555",
            "eventTime": "2026-11-23T10:00:00.1234567Z",
            "sequenceNumber": "638678712000000000"
        },
        "tenantId": "11111111-2222-3333-4444-555555555555"
    })
}

fn collection(items: Vec<Value>) -> Value {
    json!({ "value": items })
}

/// Apply `edit` to the documented item and wrap it in a collection.
fn variant(edit: Edit) -> Value {
    let mut item = documented_item();
    edit(&mut item);
    collection(vec![item])
}

#[test]
fn graph_change_notifications_documented_and_lenient_shapes_are_accepted() {
    let table: Vec<(&str, Value)> = vec![
        ("documented", collection(vec![documented_item()])),
        ("no tenantId", variant(|i| remove(i, "tenantId"))),
        (
            "sequenceNumber as a number",
            variant(|i| i["resourceData"]["sequenceNumber"] = json!(638678712000000000_u64)),
        ),
        (
            "lower-case resource",
            variant(|i| i["resource"] = json!("users/aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee")),
        ),
        (
            "wrong @odata.type",
            variant(|i| i["resourceData"]["@odata.type"] = json!("#Microsoft.Graph.Group")),
        ),
        (
            "user only in resource",
            variant(|i| remove(&mut i["resourceData"], "id")),
        ),
        ("deleted", variant(|i| i["changeType"] = json!("deleted"))),
        (
            "unknown fields everywhere",
            variant(|i| {
                i["newField"] = json!({"deep": [1, 2]});
                i["resourceData"]["extra"] = json!(true);
            }),
        ),
        ("empty collection", collection(vec![])),
        (
            "mixed tenants, validationTokens",
            json!({
                "value": [documented_item(), {
                    "subscriptionId": "sub-2", "changeType": "updated", "clientState": "other",
                    "resource": "Users/u-2",
                    "resourceData": {"id": "u-2", "organizationId": "t-2", "sequenceNumber": 7}
                }],
                "validationTokens": ["eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.e30.sig"],
                "unknownCollectionField": 1
            }),
        ),
    ];
    for (what, doc) in table {
        check(GRAPH_CHANGE, &doc, true, what);
    }
}

#[test]
fn graph_change_notifications_flagrelay_cannot_use_are_rejected() {
    let table: Vec<(&str, Value)> = vec![
        ("no value", json!({"values": []})),
        ("value not an array", json!({"value": documented_item()})),
        (
            "no tenant anywhere",
            variant(|i| {
                remove(i, "tenantId");
                remove(&mut i["resourceData"], "organizationId");
            }),
        ),
        (
            "no user anywhere",
            variant(|i| {
                remove(&mut i["resourceData"], "id");
                i["resource"] = json!("Users");
            }),
        ),
        (
            "not a user",
            variant(|i| i["resource"] = json!("Groups/g-1")),
        ),
        (
            "sequenceNumber as a boolean",
            variant(|i| i["resourceData"]["sequenceNumber"] = json!(true)),
        ),
        ("no clientState", variant(|i| remove(i, "clientState"))),
        ("tenantId a number", variant(|i| i["tenantId"] = json!(17))),
        (
            "implausible user id",
            variant(|i| i["resourceData"]["id"] = json!("../../admin")),
        ),
        (
            "eventTime not a date-time",
            variant(|i| i["resourceData"]["eventTime"] = json!("soon")),
        ),
        ("a lifecycle collection", lifecycle_collection(|_| {})),
    ];
    for (what, doc) in table {
        check(GRAPH_CHANGE, &doc, false, what);
    }
}

fn lifecycle_collection(edit: Edit) -> Value {
    let mut item = json!({
        "lifecycleEvent": "reauthorizationRequired",
        "subscriptionId": "7f105c7d-2dc5-4530-97cd-4e7ae6534c07",
        "subscriptionExpirationDateTime": "2026-12-01T10:00:00+00:00",
        "clientState": "secretClientValue",
        "tenantId": "11111111-2222-3333-4444-555555555555"
    });
    edit(&mut item);
    collection(vec![item])
}

#[test]
fn graph_lifecycle_notifications() {
    let accepted: Vec<(&str, Value)> = vec![
        ("documented", lifecycle_collection(|_| {})),
        (
            "organizationId instead of tenantId",
            lifecycle_collection(|i| {
                remove(i, "tenantId");
                i["organizationId"] = json!("11111111-2222-3333-4444-555555555555");
            }),
        ),
        (
            "no expiration",
            lifecycle_collection(|i| remove(i, "subscriptionExpirationDateTime")),
        ),
        (
            "other events and unknown fields",
            lifecycle_collection(|i| {
                i["lifecycleEvent"] = json!("missed");
                i["resource"] = json!("users");
            }),
        ),
        ("validationTokens", {
            let mut c = lifecycle_collection(|_| {});
            c["validationTokens"] = json!(["eyJ0.e30.sig"]);
            c
        }),
    ];
    for (what, doc) in accepted {
        check(GRAPH_LIFECYCLE, &doc, true, what);
    }

    let rejected: Vec<(&str, Value)> = vec![
        (
            "no lifecycleEvent",
            lifecycle_collection(|i| remove(i, "lifecycleEvent")),
        ),
        (
            "no subscriptionId",
            lifecycle_collection(|i| remove(i, "subscriptionId")),
        ),
        ("no tenant", lifecycle_collection(|i| remove(i, "tenantId"))),
        (
            "expiration not a date-time",
            lifecycle_collection(|i| i["subscriptionExpirationDateTime"] = json!("in 3 days")),
        ),
        ("a change notification", collection(vec![documented_item()])),
    ];
    for (what, doc) in rejected {
        check(GRAPH_LIFECYCLE, &doc, false, what);
    }
}
