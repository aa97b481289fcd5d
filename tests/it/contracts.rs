//! The contracts other systems rely on, checked against the code that keeps them.
//!
//! * `schemas/asyncapi.yaml` and `schemas/openapi.yaml` parse, and every `$ref` resolves.
//! * The AsyncAPI channels are exactly the exchanges, queues, bindings and routing keys the
//!   RabbitMQ backend declares and publishes with (`RabbitQueue::describe`, the list
//!   `declare` itself walks) — expanded for real settings, never a copy kept here.
//! * Real messages captured from a real run (real RabbitMQ, both simulators) validate against
//!   the schemas the AsyncAPI document names for the channel they were seen on, headers too.
//! * A `traceparent` sent to the webhook comes out in the outcome event.
//! * Every OpenAPI path and method of the receiver is answered by the receiver's router with
//!   a documented status.
//! * A foreign consumer — Python with pika, the CloudEvents SDK and jsonschema — reads the
//!   outcome event of a real flip (`tests/foreign/consume_outcomes.py`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use flagrelay::message::{
    Announcement, Signer, TRACEPARENT_HEADER, TYPE_LIFECYCLE, TYPE_USER_CHANGED, TYPE_USER_OUTCOME,
    TraceContext,
};
use flagrelay::queue::QueueSettings;
use flagrelay::queue::embedded::EmbeddedQueue;
use flagrelay::queue::rabbitmq::RabbitQueue;
use flagrelay::receiver::{self, ReceiverSettings, ReceiverState};
use flagrelay::telemetry::Metrics;
use jsonschema::Validator;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::support::{self, Options, TENANT, TestApp};

const SCHEMA_BASE: &str = "https://flagrelay.dev/schemas/";
const WAIT: Duration = Duration::from_secs(20);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// A YAML document as JSON values (the shape JSON Schema tools see).
fn yaml(path: &str) -> Value {
    serde_saphyr::from_str(&read(path)).unwrap_or_else(|e| panic!("{path} is not YAML: {e}"))
}

fn json_file(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {v}"))
}

fn object<'a>(v: &'a Value, what: &str) -> &'a serde_json::Map<String, Value> {
    v.as_object()
        .unwrap_or_else(|| panic!("{what} is not a mapping: {v}"))
}

/// Every `$ref` in `v`.
fn refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "$ref"
                    && let Some(s) = x.as_str()
                {
                    out.push(s.to_owned());
                }
                refs(x, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}

/// What `reference` (relative to a document in `schemas/`) points to.
fn resolve(doc: &Value, reference: &str) -> Result<Value, String> {
    let (file, fragment) = reference.split_once('#').unwrap_or((reference, ""));
    let target = if file.is_empty() {
        doc.clone()
    } else {
        let path = repo().join("schemas").join(file.trim_start_matches("./"));
        if !path.is_file() {
            return Err(format!("{reference}: no file {}", path.display()));
        }
        json_file(&path)
    };
    target
        .pointer(fragment)
        .cloned()
        .ok_or_else(|| format!("{reference}: nothing at #{fragment}"))
}

/// `v` with every document-local `$ref` replaced by what it points to.
fn inline_local_refs(doc: &Value, v: &Value) -> Value {
    match v {
        Value::Object(m) => match m.get("$ref").and_then(Value::as_str) {
            Some(r) if r.starts_with('#') => inline_local_refs(doc, &resolve(doc, r).unwrap()),
            _ => Value::Object(
                m.iter()
                    .map(|(k, x)| (k.clone(), inline_local_refs(doc, x)))
                    .collect(),
            ),
        },
        Value::Array(a) => Value::Array(a.iter().map(|x| inline_local_refs(doc, x)).collect()),
        other => other.clone(),
    }
}

#[test]
fn both_documents_parse_and_every_ref_resolves() {
    for (file, key, version) in [
        ("schemas/asyncapi.yaml", "asyncapi", "3.0.0"),
        ("schemas/openapi.yaml", "openapi", "3.1.0"),
    ] {
        let doc = yaml(file);
        assert_eq!(doc[key], version, "{file}");
        assert!(doc["info"]["title"].is_string(), "{file} has a title");
        assert_eq!(
            doc["info"]["version"],
            env!("CARGO_PKG_VERSION"),
            "{file} documents this release"
        );
        let mut all = Vec::new();
        refs(&doc, &mut all);
        assert!(
            !all.is_empty(),
            "{file} references its parts and the schemas"
        );
        for r in &all {
            let target = resolve(&doc, r).unwrap_or_else(|e| panic!("{file}: {e}"));
            let (path, _) = r.split_once('#').unwrap_or((r, ""));
            if !path.is_empty() {
                // External references are flagrelay's own JSON Schemas, by their file name.
                let name = path.trim_start_matches("./");
                assert_eq!(target["$id"], format!("{SCHEMA_BASE}{name}"), "{file}: {r}");
            }
        }
    }
}

/// Values of the document's channel parameters for a deployment with `settings`.
fn parameter_values(doc: &Value, settings: &QueueSettings) -> BTreeMap<String, Vec<String>> {
    let mut tiers: Vec<u128> = settings.retry_tiers.iter().map(|t| t.as_millis()).collect();
    tiers.sort_unstable();
    tiers.dedup();
    let decisions = doc["components"]["parameters"]["decision"]["enum"]
        .as_array()
        .expect("the decision parameter is an enum")
        .iter()
        .map(|v| str_of(v, "a decision").to_owned())
        .collect();
    BTreeMap::from([
        ("prefix".to_owned(), vec![settings.prefix.clone()]),
        (
            "shard".to_owned(),
            (0..settings.shards).map(|s| s.to_string()).collect(),
        ),
        (
            "tierMs".to_owned(),
            tiers.iter().map(u128::to_string).collect(),
        ),
        ("decision".to_owned(), decisions),
    ])
}

/// Expand `{name}` placeholders jointly across `templates`, one row per combination.
fn expand(templates: &[&str], values: &BTreeMap<String, Vec<String>>) -> Vec<Vec<String>> {
    let mut names = BTreeSet::new();
    for t in templates {
        for part in t.split('{').skip(1) {
            let name = part.split_once('}').expect("placeholder closed").0;
            names.insert(name.to_owned());
        }
    }
    let mut rows = vec![
        templates
            .iter()
            .map(|t| (*t).to_owned())
            .collect::<Vec<_>>(),
    ];
    for name in names {
        let vals = values
            .get(&name)
            .unwrap_or_else(|| panic!("{templates:?}: undocumented parameter {{{name}}}"));
        let placeholder = format!("{{{name}}}");
        rows = rows
            .into_iter()
            .flat_map(|row| {
                vals.iter()
                    .map(|v| row.iter().map(|t| t.replace(&placeholder, v)).collect())
                    .collect::<Vec<Vec<String>>>()
            })
            .collect();
    }
    rows
}

/// The topology as the AsyncAPI document tells it, for one deployment's settings.
#[derive(Debug, Default, PartialEq)]
struct Told {
    /// (name, type)
    exchanges: BTreeSet<(String, String)>,
    queues: BTreeSet<String>,
    /// (queue, exchange, pattern)
    bindings: BTreeSet<(String, String, String)>,
    /// (exchange, routing key) of every `send` operation; `""` is the default exchange.
    publishes: BTreeSet<(String, String)>,
    /// (exchange, routing key) → channel id, for every routing-key channel.
    channel_of: BTreeMap<(String, String), String>,
}

fn told(doc: &Value, settings: &QueueSettings) -> Told {
    let values = parameter_values(doc, settings);
    let mut t = Told::default();
    let mut routes_of: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for (id, channel) in object(&doc["channels"], "channels") {
        let amqp = &channel["bindings"]["amqp"];
        let address = str_of(&channel["address"], "address");
        match str_of(&amqp["is"], "bindings.amqp.is") {
            "routingKey" => {
                let exchange = str_of(&amqp["exchange"]["name"], "exchange.name");
                let kind = str_of(&amqp["exchange"]["type"], "exchange.type");
                for row in expand(&[address, exchange], &values) {
                    let [key, exchange]: [String; 2] = row.try_into().unwrap();
                    t.exchanges.insert((exchange.clone(), kind.to_owned()));
                    t.channel_of
                        .insert((exchange.clone(), key.clone()), id.clone());
                    routes_of
                        .entry(id.clone())
                        .or_default()
                        .push((exchange, key));
                }
            }
            "queue" => {
                let name = str_of(&amqp["queue"]["name"], "queue.name");
                assert_eq!(
                    address, name,
                    "{id}: a queue channel's address is the queue"
                );
                for row in expand(&[name], &values) {
                    t.queues.insert(row[0].clone());
                    routes_of
                        .entry(id.clone())
                        .or_default()
                        .push((String::new(), row[0].clone()));
                }
                if let Some(bound) = channel.get("x-bound-to") {
                    let exchange = str_of(&bound["exchange"], "x-bound-to.exchange");
                    let pattern = str_of(&bound["pattern"], "x-bound-to.pattern");
                    for row in expand(&[name, exchange, pattern], &values) {
                        let [q, e, p]: [String; 3] = row.try_into().unwrap();
                        t.bindings.insert((q, e, p));
                    }
                }
            }
            other => panic!("{id}: unknown channel kind {other}"),
        }
    }
    for (id, op) in object(&doc["operations"], "operations") {
        if op["action"] != "send" {
            continue;
        }
        let channel = str_of(&op["channel"]["$ref"], "operation channel")
            .strip_prefix("#/channels/")
            .unwrap_or_else(|| panic!("{id}: channel ref"));
        t.publishes.extend(routes_of[channel].iter().cloned());
    }
    t
}

/// The same, from the code: what `RabbitQueue::describe` says `declare` declares.
fn declared(settings: &QueueSettings) -> Told {
    let d = RabbitQueue::describe(settings);
    Told {
        exchanges: d
            .exchanges
            .iter()
            .map(|e| (e.name.clone(), e.kind.as_str().to_owned()))
            .collect(),
        queues: d.queues.iter().map(|q| q.name.clone()).collect(),
        bindings: d
            .queues
            .iter()
            .filter_map(|q| {
                let b = q.binding.as_ref()?;
                Some((q.name.clone(), b.exchange.clone(), b.routing_key.clone()))
            })
            .collect(),
        publishes: d
            .publishes
            .iter()
            .map(|r| (r.exchange.clone(), r.routing_key.clone()))
            .collect(),
        channel_of: BTreeMap::new(),
    }
}

#[test]
fn asyncapi_describes_exactly_the_topology_the_code_declares() {
    let doc = yaml("schemas/asyncapi.yaml");
    let defaults = flagrelay::config::Config::default().amqp.queue_settings();
    let mut small = support::test_queue_settings("asyncapi");
    small.shards = 2;
    for settings in [defaults, small] {
        let told = told(&doc, &settings);
        let code = declared(&settings);
        let what = format!("prefix {}, {} shards", settings.prefix, settings.shards);
        assert_eq!(told.exchanges, code.exchanges, "exchanges ({what})");
        assert_eq!(told.queues, code.queues, "queues ({what})");
        assert_eq!(told.bindings, code.bindings, "bindings ({what})");
        assert_eq!(told.publishes, code.publishes, "routing keys ({what})");
    }
}

#[test]
fn asyncapi_decisions_are_the_routing_keys_the_code_computes() {
    let doc = yaml("schemas/asyncapi.yaml");
    let documented: Vec<&str> = doc["components"]["parameters"]["decision"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let code: Vec<&str> = Announcement::ALL.iter().map(|a| a.as_str()).collect();
    assert_eq!(documented, code);
    assert_eq!(doc["channels"]["events"]["address"], "decision.{decision}");
    let messages = object(&doc["channels"]["events"]["messages"], "events messages");
    assert_eq!(
        messages.values().map(|m| &m["$ref"]).collect::<Vec<_>>(),
        vec!["#/components/messages/userOutcome"],
        "only outcome events go to the events exchange"
    );
}

/// A message taken off the broker, with where it was seen.
#[derive(Debug)]
struct Captured {
    exchange: String,
    routing_key: String,
    amqp_type: Option<String>,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl Captured {
    fn envelope(&self) -> Value {
        serde_json::from_slice(&self.body).expect("bodies are JSON")
    }
}

/// An exclusive queue bound to a test deployment's events (`decision.#`) and work (`#`)
/// exchanges: copies of everything flagrelay publishes there.
struct Capture {
    _conn: lapin::Connection,
    channel: lapin::Channel,
    queue: String,
}

impl Capture {
    async fn start(prefix: &str) -> Capture {
        let conn = lapin::Connection::connect(&support::amqp_url(), Default::default())
            .await
            .expect("connect");
        let channel = conn.create_channel().await.expect("channel");
        let declared = channel
            .queue_declare(
                "".into(),
                lapin::options::QueueDeclareOptions {
                    exclusive: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .expect("capture queue");
        let queue = declared.name().as_str().to_owned();
        for (exchange, pattern) in [
            (format!("{prefix}.events"), "decision.#"),
            (format!("{prefix}.work"), "#"),
        ] {
            channel
                .queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    pattern.into(),
                    Default::default(),
                    Default::default(),
                )
                .await
                .expect("bind the capture queue");
        }
        Capture {
            _conn: conn,
            channel,
            queue,
        }
    }

    /// Collect until `done` holds for what was collected, or [`WAIT`] passes.
    async fn until(&self, mut done: impl FnMut(&[Captured]) -> bool) -> Vec<Captured> {
        let deadline = Instant::now() + WAIT;
        let mut all = Vec::new();
        while !done(&all) && Instant::now() < deadline {
            let got = self
                .channel
                .basic_get(
                    self.queue.as_str().into(),
                    lapin::options::BasicGetOptions { no_ack: true },
                )
                .await
                .expect("basic.get");
            let Some(m) = got else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            let d = m.delivery;
            let headers = d
                .properties
                .headers()
                .as_ref()
                .map(|t| {
                    t.inner()
                        .iter()
                        .filter_map(|(k, v)| match v {
                            lapin::types::AMQPValue::LongString(s) => Some((
                                k.to_string(),
                                String::from_utf8_lossy(s.as_bytes()).into_owned(),
                            )),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default();
            all.push(Captured {
                exchange: d.exchange.to_string(),
                routing_key: d.routing_key.to_string(),
                amqp_type: d.properties.kind().as_ref().map(|k| k.to_string()),
                headers,
                body: d.data,
            });
        }
        all
    }
}

fn compile(schema: &Value, what: &str) -> Validator {
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(schema)
        .unwrap_or_else(|e| panic!("{what} does not compile: {e}"))
}

/// Validate a captured message the way the AsyncAPI document says: find the channel it was
/// seen on, the message of that channel whose name is its type, and check body and headers
/// against that message's payload and header schemas.
fn check_against_asyncapi(doc: &Value, told: &Told, m: &Captured) -> String {
    let route = (m.exchange.clone(), m.routing_key.clone());
    let channel = told
        .channel_of
        .get(&route)
        .unwrap_or_else(|| panic!("{route:?} is on no AsyncAPI channel"));
    let envelope = m.envelope();
    let event_type = str_of(&envelope["type"], "type");
    assert_eq!(
        m.amqp_type.as_deref(),
        Some(event_type),
        "AMQP type = CloudEvents type"
    );
    let message = object(&doc["channels"][channel]["messages"], "messages")
        .values()
        .map(|r| resolve(doc, str_of(&r["$ref"], "message ref")).unwrap())
        .find(|msg| msg["name"] == event_type)
        .unwrap_or_else(|| panic!("channel {channel} documents no message {event_type}"));

    let payload_ref = str_of(&message["payload"]["schema"]["$ref"], "payload schema ref");
    let schema = resolve(doc, payload_ref).unwrap();
    let errors: Vec<String> = compile(&schema, payload_ref)
        .iter_errors(&envelope)
        .map(|e| format!("{}: {e}", e.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "{event_type} on {channel} against {payload_ref}:\n  {}\n{envelope:#}",
        errors.join("\n  ")
    );

    let headers_schema = inline_local_refs(doc, &message["headers"]);
    let headers = serde_json::to_value(&m.headers).unwrap();
    let errors: Vec<String> = compile(&headers_schema, "headers")
        .iter_errors(&headers)
        .map(|e| format!("{}: {e}", e.instance_path))
        .collect();
    assert!(errors.is_empty(), "headers of {event_type}: {errors:?}");
    event_type.to_owned()
}

/// The subscription id of the notifications the tests post themselves (the simulator's
/// subscriptions have other ids).
const OUR_SUBSCRIPTION: &str = "7f105c7d-2dc5-4530-97cd-4e7ae6534c07";

fn change_notification(user_id: &str, client_state: &str) -> Value {
    json!({ "value": [{
        "subscriptionId": OUR_SUBSCRIPTION,
        "changeType": "updated",
        "clientState": client_state,
        "resource": format!("Users/{user_id}"),
        "resourceData": {
            "@odata.type": "#Microsoft.Graph.User",
            "id": user_id,
            "organizationId": TENANT,
        },
        "tenantId": TENANT,
    }]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_messages_validate_against_the_schemas_the_asyncapi_points_to() {
    let t = TestApp::start("contracts", Options::default()).await;
    let prefix = t.amqp_prefix();
    let capture = Capture::start(&prefix).await;
    let doc = yaml("schemas/asyncapi.yaml");
    let mut settings = support::test_queue_settings("unused");
    settings.prefix = prefix.clone();
    let told = told(&doc, &settings);

    // A flip through the simulated Graph (change notification → work message → outcome
    // event), and a lifecycle notification straight to the webhook.
    let alice = t.sandbox.seed_user("alice", true, "end_user");
    t.sandbox.set_enabled(&alice, false);
    let client_state = t.app.config.graph.client_state().expose_secret().to_owned();
    let lifecycle = json!({ "value": [{
        "lifecycleEvent": "missed",
        "subscriptionId": "7f105c7d-2dc5-4530-97cd-4e7ae6534c07",
        "clientState": client_state,
        "tenantId": TENANT,
    }]});
    let status = reqwest::Client::new()
        .post(format!("{}/graph/lifecycle", t.url))
        .json(&lifecycle)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 202);

    let deactivated = format!("decision.{}", Announcement::Deactivated.as_str());
    let seen = capture
        .until(|all| {
            let types: BTreeSet<_> = all.iter().filter_map(|m| m.amqp_type.clone()).collect();
            types.contains(TYPE_USER_CHANGED)
                && types.contains(TYPE_LIFECYCLE)
                && all.iter().any(|m| m.routing_key == deactivated)
        })
        .await;
    let mut types = BTreeSet::new();
    for m in &seen {
        types.insert(check_against_asyncapi(&doc, &told, m));
    }
    assert_eq!(
        types,
        BTreeSet::from([TYPE_USER_CHANGED, TYPE_LIFECYCLE, TYPE_USER_OUTCOME].map(String::from)),
        "captured every message type: {seen:#?}"
    );
    let outcome = seen
        .iter()
        .find(|m| m.routing_key == deactivated)
        .unwrap()
        .envelope();
    let data = &outcome["data"];
    assert_eq!(data["user_id"], alice.id.as_str());
    assert_eq!(data["tenant_id"], TENANT);
    assert_eq!(data["result"], "applied");
    assert_eq!(data["action"], "deactivate");
    assert_eq!(
        data["rule"], "default",
        "the MIRROR_NO_BREAKER rule that decided"
    );
    assert_eq!(
        (data["was_active"].clone(), data["is_active"].clone()),
        (json!(true), json!(false))
    );
    assert_eq!(data["dry_run"], false);
    assert!(data["latency_ms"].is_u64());
    t.stop().await;
}

/// POST a change notification for `user_id` to the receiver at `url`, with `traceparent`.
async fn notify(url: &str, user_id: &str, client_state: &str, traceparent: &str) {
    let status = reqwest::Client::new()
        .post(format!("{url}/graph/notifications"))
        .header(TRACEPARENT_HEADER, traceparent)
        .json(&change_notification(user_id, client_state))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traceparent_sent_to_the_webhook_reaches_the_worker_and_the_outcome_event() {
    let t = TestApp::start("traceparent", Options::default()).await;
    let capture = Capture::start(&t.amqp_prefix()).await;
    // Already converged: the evaluation finds nothing to do (or finds it coalesced with the
    // simulator's notification about the new user), and says so.
    let bob = t.sandbox.seed_user("bob", true, "end_user");
    let incoming = TraceContext::new_root();
    let client_state = t.app.config.graph.client_state().expose_secret().to_owned();
    notify(&t.url, &bob.id, &client_state, &incoming.to_string()).await;
    // Ours, not the simulator's notifications about seeding bob: by subscription id.
    let ours = |m: &Captured| {
        m.amqp_type.as_deref() == Some(TYPE_USER_CHANGED)
            && m.envelope()["data"]["subscription_id"] == OUR_SUBSCRIPTION
    };
    let caused_by = |event: &Captured, work: &Captured| {
        event.routing_key.starts_with("decision.")
            && event.envelope()["data"]["cause_id"] == work.envelope()["id"]
    };
    let seen = capture
        .until(|all| {
            all.iter()
                .filter(|w| ours(w))
                .any(|w| all.iter().any(|e| caused_by(e, w)))
        })
        .await;
    let trace_of = |m: &Captured| {
        let header = TraceContext::parse(&m.headers[TRACEPARENT_HEADER]).expect("valid header");
        let envelope = m.envelope();
        let attribute = str_of(&envelope["traceparent"], "traceparent attribute");
        assert_eq!(
            attribute, m.headers[TRACEPARENT_HEADER],
            "header = CloudEvents extension"
        );
        header
    };
    let work = seen.iter().find(|m| ours(m)).expect("our work message");
    let event = seen
        .iter()
        .find(|e| caused_by(e, work))
        .unwrap_or_else(|| panic!("no outcome event for our notification: {seen:#?}"));
    let (queued, announced) = (trace_of(work), trace_of(event));
    assert_eq!(
        queued.trace_id(),
        incoming.trace_id(),
        "the receiver continued the trace"
    );
    assert_ne!(queued.span_id(), incoming.span_id(), "as a span of its own");
    assert_eq!(
        announced.trace_id(),
        incoming.trace_id(),
        "the worker continued it"
    );
    assert_ne!(
        announced.span_id(),
        queued.span_id(),
        "in a span of its own"
    );

    // With a malformed traceparent (or none), a new trace starts.
    notify(&t.url, &bob.id, &client_state, "00-not-a-trace").await;
    let seen = capture.until(|all| all.iter().any(&ours)).await;
    let fresh = seen
        .iter()
        .find(|m| ours(m))
        .expect("our second work message");
    assert_ne!(trace_of(fresh).trace_id(), incoming.trace_id());
    t.stop().await;
}

/// Every path and method of `tag` in the OpenAPI document is answered by `router`, with a
/// status the document lists for it.
async fn check_openapi_paths(tag: &str, router: axum::Router) -> usize {
    let doc = yaml("schemas/openapi.yaml");
    let mut checked = 0;
    for (path, item) in object(&doc["paths"], "paths") {
        for (method, op) in object(item, path) {
            let tags = op["tags"].as_array().expect("every operation is tagged");
            if !tags.iter().any(|t| t == tag) {
                continue;
            }
            let request = Request::builder()
                .method(method.to_uppercase().as_str())
                .uri(path.as_str())
                .body(Body::empty())
                .unwrap();
            let status = router.clone().oneshot(request).await.unwrap().status();
            assert!(
                status != StatusCode::NOT_FOUND && status != StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}: {status}"
            );
            assert!(
                op["responses"].get(status.as_str()).is_some(),
                "{method} {path} answered {status}, which openapi.yaml does not list"
            );
            checked += 1;
        }
    }
    checked
}

fn test_receiver() -> axum::Router {
    let settings = ReceiverSettings {
        max_body_bytes: 1 << 20,
        max_items: 100,
        retry_after: Duration::from_secs(10),
        request_timeout: Duration::from_secs(5),
        max_in_flight: 100,
    };
    let state = ReceiverState::new(
        SecretString::from("openapi-client-state-0123456789".to_owned()),
        [TENANT.to_owned()],
        Arc::new(EmbeddedQueue::new(QueueSettings::with_prefix("openapi"))),
        Signer::new("k1", SecretString::from("openapi-signing-key".to_owned())),
        Arc::new(Metrics::default()),
        &settings,
    );
    receiver::router(state, &settings)
}

#[tokio::test]
async fn openapi_receiver_paths_are_what_the_receiver_answers() {
    let router = test_receiver();
    let checked = check_openapi_paths("receiver", router.clone()).await;
    assert_eq!(
        checked, 4,
        "/graph/notifications, /graph/lifecycle, /healthz, /readyz"
    );

    // The handshake, as documented: the token echoed as text/plain, nosniff.
    let doc = yaml("schemas/openapi.yaml");
    let documented = &doc["components"]["responses"]["Handshake"];
    for path in ["/graph/notifications", "/graph/lifecycle"] {
        let request = Request::post(format!("{path}?validationToken=a%20token%2B1"))
            .body(Body::empty())
            .unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            object(&documented["content"], "content")
                .keys()
                .any(|k| content_type.starts_with(k.as_str())),
            "{path}: {content_type}"
        );
        for header in object(&documented["headers"], "headers").keys() {
            assert!(
                response.headers().contains_key(header.as_str()),
                "{path}: {header}"
            );
        }
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        assert_eq!(&body[..], b"a token+1");
    }
}

/// Fail (never skip) when the foreign consumer's libraries are missing, saying how to
/// install them.
fn require_python_deps() {
    let check = std::process::Command::new("python3")
        .args([
            "-c",
            "import pika, cloudevents.core.bindings.rabbitmq, jsonschema, referencing",
        ])
        .output();
    match check {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "the foreign-consumer test needs Python packages that are not installed ({}). \
             Install them with `pip install -r tests/foreign/requirements.txt` \
             (.ci/run does this).",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => panic!(
            "the foreign-consumer test needs python3 ({e}); install Python 3.10+ and \
             `pip install -r tests/foreign/requirements.txt`"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_consumer_reads_the_outcome_of_a_real_flip() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    require_python_deps();
    let t = TestApp::start("foreign", Options::default()).await;
    let carol = t.sandbox.seed_user("carol", true, "end_user");
    let signing = &t.app.config.signing;
    let mut child = tokio::process::Command::new("python3")
        .arg(repo().join("tests/foreign/consume_outcomes.py"))
        .args(["--url", &support::amqp_url()])
        .args(["--exchange", &format!("{}.events", t.amqp_prefix())])
        .args(["--binding", "decision.deactivated"])
        .args(["--key-id", &signing.key_id])
        .args([
            "--expect-user",
            &carol.id,
            "--expect-decision",
            "deactivated",
        ])
        .args(["--timeout", "30"])
        .env(
            "FLAGRELAY_SIGNING_KEY",
            signing.key.as_ref().unwrap().expose_secret(),
        )
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // Events nobody is bound for are dropped: flip only once the consumer's queue is bound.
    let ready = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("the consumer starts")
        .unwrap()
        .expect("a first line");
    assert!(ready.contains("\"ready\": true"), "{ready}");

    t.sandbox.set_enabled(&carol, false);
    let mut printed = Vec::new();
    let read_all = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            printed.push(serde_json::from_str::<Value>(&line).expect("JSON lines"));
        }
    };
    tokio::time::timeout(Duration::from_secs(40), read_all)
        .await
        .expect("the consumer finishes");
    let status = child.wait().await.unwrap();
    assert!(
        status.success(),
        "consumer exited with {status}: {printed:#?}"
    );
    let got = printed.last().expect("it printed the event");
    assert_eq!(got["routing_key"], "decision.deactivated");
    assert_eq!(got["user_id"], carol.id.as_str());
    assert_eq!(got["tenant_id"], TENANT);
    assert_eq!(got["type"], TYPE_USER_OUTCOME);
    assert_eq!(got["subject"], carol.id.as_str());
    assert_eq!(
        (&got["result"], &got["action"]),
        (&json!("applied"), &json!("deactivate"))
    );
    assert_eq!(
        (&got["was_active"], &got["is_active"]),
        (&json!(true), &json!(false))
    );
    assert!(TraceContext::parse(str_of(&got["traceparent"], "traceparent")).is_some());
    t.stop().await;
}

#[tokio::test]
async fn openapi_admin_paths_are_what_the_admin_listener_answers() {
    let t = crate::support::TestApp::start(
        "openapi-admin",
        crate::support::Options {
            backend: crate::support::Backend::Embedded,
            subscribe: false,
            ..Default::default()
        },
    )
    .await;
    for role in [
        flagrelay::app::Role::Serve,
        flagrelay::app::Role::Work,
        flagrelay::app::Role::Run,
    ] {
        let checked = check_openapi_paths("admin", t.app.admin_router(role)).await;
        assert_eq!(
            checked, 5,
            "{role:?}: /, /healthz, /readyz, /metrics, /history"
        );
    }
    t.stop().await;
}
