//! Whose mailbox (README "Whose mailbox", invariant 28), end to end through the real
//! RabbitMQ, the state store (SQLite in the sandbox's temporary directory) and both
//! simulators:
//!
//! * a mail takeover (a disabled object without a mailbox whose `mail` names an enabled
//!   colleague's address) writes nothing to the colleague, whether the colleague's address
//!   was bound already or not: `identity_conflict` naming both objects (outcome event, the
//!   store's conflicts, the metric);
//! * an address outside the org's domains is refused, and written once the domain is in the
//!   tenant's `accepted_domains`;
//! * a rename is held until `flagrelay identity accept` (the real binary), then written to
//!   the new address;
//! * the first write binds the address; later writes do not ask Graph who holds it again.

use std::time::Duration;

use flagrelay::graph::GraphUser;
use flagrelay::ids::{TenantId, UserId};
use flagrelay::message::{self, Message, UserOutcome};
use flagrelay::sim::sandbox::SeededUser;
use flagrelay::telemetry::Metrics;
use secrecy::ExposeSecret;

use crate::support::{
    ORG, Options, TENANT, TestApp, amqp_url, eventually, eventually_async, processed,
};

const WAIT: Duration = Duration::from_secs(30);

/// An exclusive queue bound to a test deployment's exchange `exchange` with `pattern`:
/// copies of what flagrelay publishes there, decoded (signature checked).
pub(crate) struct Capture {
    _conn: lapin::Connection,
    channel: lapin::Channel,
    queue: String,
    verifier: message::Verifier,
    got: Vec<Captured>,
}

/// One message captured, with the routing key it was published with.
#[derive(Debug, Clone)]
pub(crate) struct Captured {
    pub routing_key: String,
    pub message: Message,
}

impl Capture {
    pub(crate) async fn start(t: &TestApp, exchange: &str, pattern: &str) -> Capture {
        let conn = lapin::Connection::connect(&amqp_url(), Default::default())
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
        let exchange = format!("{}.{exchange}", t.amqp_prefix());
        // The app declares its topology at start; wait until the exchange exists.
        let mut bound = false;
        for _ in 0..100 {
            let ch = conn.create_channel().await.expect("channel");
            if ch
                .queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    pattern.into(),
                    Default::default(),
                    Default::default(),
                )
                .await
                .is_ok()
            {
                bound = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(bound, "could not bind to {exchange}");
        Capture {
            _conn: conn,
            channel,
            queue,
            verifier: t.app.config.signing.verifier(),
            got: Vec::new(),
        }
    }

    /// Take what has arrived so far into [`Capture::all`].
    pub(crate) async fn drain(&mut self) {
        loop {
            let got = self
                .channel
                .basic_get(
                    self.queue.as_str().into(),
                    lapin::options::BasicGetOptions { no_ack: true },
                )
                .await
                .expect("basic.get");
            let Some(m) = got else { return };
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
            let decoded = message::decode(&d.data, &headers, &self.verifier)
                .expect("flagrelay publishes only signed, decodable messages");
            self.got.push(Captured {
                routing_key: d.routing_key.to_string(),
                message: decoded.message,
            });
        }
    }

    /// Collect until `done` holds for some captured message, or `timeout` passes.
    pub(crate) async fn wait_for(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&Captured) -> bool,
    ) -> Option<Captured> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            self.drain().await;
            if let Some(c) = self.got.iter().find(|c| done(c)) {
                return Some(c.clone());
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) fn all(&self) -> &[Captured] {
        &self.got
    }
}

/// The outcome event of an identity conflict for `object_id`, once published.
async fn conflict_event(capture: &mut Capture, object_id: &str) -> UserOutcome {
    let found = capture
        .wait_for(WAIT, |c| {
            matches!(&c.message, Message::UserOutcome(o)
                if o.result == "identity_conflict" && o.user_id.eq_ignore_ascii_case(object_id))
        })
        .await
        .unwrap_or_else(|| panic!("no identity_conflict outcome event for {object_id}"));
    assert_eq!(found.routing_key, "decision.identity_conflict");
    match found.message {
        Message::UserOutcome(o) => o,
        _ => unreachable!(),
    }
}

/// Proofpoint `PUT`s of `address` so far (the simulator's request log).
fn puts_to(t: &TestApp, address: &str) -> usize {
    t.sandbox
        .proofpoint
        .request_log()
        .iter()
        .filter(|r| r.method == "PUT" && r.email.as_deref() == Some(address))
        .count()
}

/// Graph "who holds this address" lookups so far: `GET /v1.0/users?$filter=...`.
fn address_lookups(t: &TestApp) -> usize {
    t.sandbox
        .graph
        .request_log()
        .iter()
        .filter(|r| {
            r.method == "GET"
                && r.path.trim_end_matches('/').ends_with("/users")
                && r.query.as_deref().is_some_and(|q| q.contains("filter"))
        })
        .count()
}

/// A disabled directory object with no mailbox (no proxy addresses) whose `mail` is set to
/// `victim`'s address: what taking over a colleague's Proofpoint user through Entra looks like.
fn takeover_object(t: &TestApp, victim: &SeededUser) -> String {
    let id = uuid::Uuid::new_v4().to_string();
    t.sandbox
        .graph
        .upsert_user(
            TENANT,
            GraphUser {
                id: id.clone(),
                account_enabled: Some(false),
                user_principal_name: Some(format!("svc-{}@{ORG}", &id[..8])),
                mail: Some(victim.address.to_uppercase()),
                user_type: Some("Member".into()),
                ..GraphUser::default()
            },
        )
        .unwrap();
    id
}

/// Deactivate and re-activate `u` (two writes), so that its address is bound to it.
async fn bind_by_two_writes(t: &TestApp, u: &SeededUser) {
    let store = t.app.store().await.unwrap();
    let applied = Metrics::get(&t.app.metrics.outcomes_applied_total);
    t.sandbox.set_enabled(u, false);
    assert!(eventually(WAIT, || t.sandbox.is_active(u) == Some(false)).await);
    t.sandbox.set_enabled(u, true);
    assert!(eventually(WAIT, || t.sandbox.is_active(u) == Some(true)).await);
    assert!(
        eventually(WAIT, || Metrics::get(&t.app.metrics.outcomes_applied_total)
            >= applied + 2)
        .await
    );
    let binding = store
        .binding_of_object(&TenantId::new(TENANT), &UserId::new(&u.id))
        .await
        .unwrap()
        .expect("the first write bound the address");
    assert_eq!(binding.address, u.address);
}

/// What every takeover must leave behind: nothing written to the victim, and the conflict
/// told everywhere an operator looks, naming both objects.
async fn assert_takeover_refused(
    t: &TestApp,
    capture: &mut Capture,
    victim: &SeededUser,
    taker: &str,
    puts_before: usize,
) {
    let event = conflict_event(capture, taker).await;
    assert_eq!(event.user_id, taker.to_ascii_lowercase(), "{event:?}");
    assert_eq!(
        event.conflicting_object_ids,
        Some(vec![victim.id.clone()]),
        "the event names the object whose mail would have been cut off: {event:?}"
    );
    assert_eq!(event.address.as_deref(), Some(victim.address.as_str()));
    assert!(
        event.reason.starts_with("address_held_by_other"),
        "{event:?}"
    );
    assert_eq!(
        puts_to(t, &victim.address),
        puts_before,
        "nothing was written to the victim"
    );
    assert_eq!(t.sandbox.is_active(victim), Some(true));
    assert!(
        t.app
            .metrics
            .identity_conflict_count("address_held_by_other")
            >= 1
    );
    let store = t.app.store().await.unwrap();
    let conflicts = store.conflicts().await.unwrap();
    let c = conflicts
        .iter()
        .find(|c| c.object_id == taker)
        .unwrap_or_else(|| panic!("the conflict is listed in the store: {conflicts:?}"));
    assert_eq!(c.reason, "address_held_by_other");
    assert_eq!(c.address, victim.address);
    assert_eq!(c.others, vec![victim.id.clone()]);
    assert!(
        store
            .binding_of_object(&TenantId::new(TENANT), &UserId::new(taker))
            .await
            .unwrap()
            .is_none(),
        "the taker was bound to nothing"
    );
    // The status page's ring shows it too.
    let recent = t.app.metrics.status.snapshot().recent;
    assert!(
        recent
            .iter()
            .any(|d| d.result == "identity_conflict" && d.rule.contains(&victim.id)),
        "{recent:?}"
    );
}

#[tokio::test]
async fn a_mail_takeover_of_an_unbound_colleague_writes_nothing_to_the_colleague() {
    let t = TestApp::start("id-takeover", Options::default()).await;
    let mut capture = Capture::start(&t, "events", "decision.#").await;
    let alice = t.sandbox.seed_user("alice", true, "end_user");
    assert!(
        eventually(WAIT, || processed(&t) >= 1).await,
        "seeding processed"
    );
    let store = t.app.store().await.unwrap();
    assert!(
        store
            .binding_of_address(&TenantId::new(TENANT), &alice.address)
            .await
            .unwrap()
            .is_none(),
        "nothing was written yet, so nothing is bound: the directory must answer"
    );
    let puts = puts_to(&t, &alice.address);
    let taker = takeover_object(&t, &alice);
    assert_takeover_refused(&t, &mut capture, &alice, &taker, puts).await;
    assert!(
        address_lookups(&t) >= 1,
        "the directory was asked who holds the address"
    );
    t.stop().await;
}

#[tokio::test]
async fn a_mail_takeover_of_a_bound_address_is_refused_from_the_binding_alone() {
    let t = TestApp::start("id-takeover-bound", Options::default()).await;
    let mut capture = Capture::start(&t, "events", "decision.#").await;
    let alice = t.sandbox.seed_user("alice", true, "end_user");
    bind_by_two_writes(&t, &alice).await;
    let puts = puts_to(&t, &alice.address);
    let lookups = address_lookups(&t);
    let taker = takeover_object(&t, &alice);
    assert_takeover_refused(&t, &mut capture, &alice, &taker, puts).await;
    assert_eq!(
        address_lookups(&t),
        lookups,
        "the recorded binding decided; Graph was not asked"
    );
    t.stop().await;
}

/// A user whose every address is `bob@partner.test`, known to the org's Proofpoint (active),
/// with sign-in blocked in Graph: the mirror policy wants a deactivation.
fn partner_user(t: &TestApp) -> SeededUser {
    let address = "bob@partner.test".to_owned();
    t.sandbox.add_proofpoint_user(ORG, &address);
    let id = uuid::Uuid::new_v4().to_string();
    t.sandbox
        .graph
        .upsert_user(
            TENANT,
            GraphUser {
                id: id.clone(),
                account_enabled: Some(false),
                user_principal_name: Some(address.clone()),
                mail: Some(address.clone()),
                proxy_addresses: Some(vec![format!("SMTP:{address}")]),
                user_type: Some("Member".into()),
                ..GraphUser::default()
            },
        )
        .unwrap();
    SeededUser {
        id,
        address,
        tenant_id: TENANT.into(),
        org: ORG.into(),
    }
}

#[tokio::test]
async fn an_address_outside_the_org_domains_is_refused() {
    let t = TestApp::start("id-outside", Options::default()).await;
    let mut capture = Capture::start(&t, "events", "decision.#").await;
    let bob = partner_user(&t);
    let event = conflict_event(&mut capture, &bob.id).await;
    assert!(event.reason.starts_with("outside_org_domains"), "{event:?}");
    assert!(t.app.metrics.identity_conflict_count("outside_org_domains") >= 1);
    assert_eq!(puts_to(&t, &bob.address), 0, "nothing written");
    assert_eq!(t.sandbox.is_active(&bob), Some(true));
    let conflicts = t.app.store().await.unwrap().conflicts().await.unwrap();
    assert!(
        conflicts
            .iter()
            .any(|c| c.object_id == bob.id.as_str() && c.reason == "outside_org_domains"),
        "{conflicts:?}"
    );
    t.stop().await;
}

/// A conflict the directory itself resolves leaves the operator's list: a bound mailbox is
/// renamed (held as `address_changed`), then the rename is undone; the next evaluation
/// writes to the bound address again (no new binding is made, so only the worker's own
/// bookkeeping can clear it) and nothing is left waiting for a decision.
#[tokio::test]
async fn a_conflict_the_directory_resolves_leaves_the_operators_list() {
    let t = TestApp::start("id-resolved", Options::default()).await;
    let mut capture = Capture::start(&t, "events", "decision.#").await;
    let alice = t.sandbox.seed_user("alice", true, "end_user");
    bind_by_two_writes(&t, &alice).await;
    let renamed = format!("alice.smith@{ORG}");
    t.sandbox.add_proofpoint_user(ORG, &renamed);
    // Renamed, and sign-in blocked in the same change: a write, held for the new address.
    t.sandbox
        .graph
        .update_user(TENANT, &alice.id, |u| {
            u.mail = Some(renamed.clone());
            u.proxy_addresses = Some(vec![format!("SMTP:{renamed}")]);
            u.account_enabled = Some(false);
        })
        .unwrap();
    let event = conflict_event(&mut capture, &alice.id).await;
    assert!(event.reason.starts_with("address_changed"), "{event:?}");
    let store = t.app.store().await.unwrap();
    assert_eq!(
        store.conflicts().await.unwrap().len(),
        1,
        "listed while it waits"
    );
    // The rename is undone: the deactivation goes to the bound address.
    t.sandbox
        .graph
        .update_user(TENANT, &alice.id, |u| {
            u.mail = Some(alice.address.clone());
            u.proxy_addresses = Some(vec![format!("SMTP:{}", alice.address)]);
        })
        .unwrap();
    assert!(
        eventually(WAIT, || t.sandbox.is_active(&alice) == Some(false)).await,
        "written to the bound address once the rename is undone"
    );
    assert!(
        eventually_async(WAIT, || async {
            store.conflicts().await.unwrap().is_empty()
        })
        .await,
        "the settled conflict left the list: {:?}",
        store.conflicts().await.unwrap()
    );
    t.stop().await;
}

#[tokio::test]
async fn an_address_in_an_accepted_domain_is_written() {
    let t = TestApp::start_with("id-accepted", Options::default(), |c| {
        c.tenants[0].accepted_domains = vec!["partner.test".into()];
    })
    .await;
    let bob = partner_user(&t);
    assert!(
        eventually(WAIT, || t.sandbox.is_active(&bob) == Some(false)).await,
        "deactivated: partner.test is one of the tenant's accepted domains"
    );
    assert_eq!(
        t.app.metrics.identity_conflict_count("outside_org_domains"),
        0
    );
    let binding = t
        .app
        .store()
        .await
        .unwrap()
        .binding_of_object(&TenantId::new(TENANT), &UserId::new(&bob.id))
        .await
        .unwrap()
        .expect("bound at the first write");
    assert_eq!(binding.address, bob.address);
    t.stop().await;
}

/// A configuration file for the real binary's store commands: the sandbox's state store and
/// tenant (the rest only has to be valid).
pub(crate) fn cli_config(t: &TestApp) -> std::path::PathBuf {
    let c = &t.app.config;
    let path = t.sandbox.dir.join("flagrelay-cli.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[graph]
client_id = "{}"
client_secret = "{}"
client_state = "{}"
[proofpoint]
username = "{}"
password = "{}"
[signing]
key = "{}"
[worker]
state_dir = "{}"
[[tenants]]
id = "{TENANT}"
org_domain = "{ORG}"
"#,
            c.graph.client_id,
            c.graph.client_secret().expose_secret(),
            c.graph.client_state().expose_secret(),
            c.proofpoint.username,
            c.proofpoint.password.as_ref().unwrap().expose_secret(),
            c.signing.key.as_ref().unwrap().expose_secret(),
            c.worker.state_dir.display(),
        ),
    )
    .unwrap();
    path
}

/// `flagrelay --config <cli_config> <args>` (the real binary): stdout, after checking it
/// succeeded.
pub(crate) async fn flagrelay_cli(t: &TestApp, args: &[&str]) -> String {
    let config = cli_config(t);
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_flagrelay"))
        .args(["--config", config.to_str().unwrap()])
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "flagrelay {args:?}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

async fn identity_cli(t: &TestApp, args: &[&str]) -> String {
    flagrelay_cli(t, &[&["identity"], args].concat()).await
}

#[tokio::test]
async fn a_changed_primary_address_is_held_until_an_operator_accepts_it() {
    let t = TestApp::start("id-rename", Options::default()).await;
    let mut capture = Capture::start(&t, "events", "decision.#").await;
    let alice = t.sandbox.seed_user("alice", true, "end_user");
    bind_by_two_writes(&t, &alice).await;
    // The mailbox is renamed: a new primary SMTP address (Proofpoint's user follows), and in
    // the same change sign-in is blocked, so there is something to write.
    let renamed = SeededUser {
        address: format!("alice.smith@{ORG}"),
        ..alice.clone()
    };
    t.sandbox.add_proofpoint_user(ORG, &renamed.address);
    t.sandbox
        .graph
        .update_user(TENANT, &alice.id, |u| {
            u.account_enabled = Some(false);
            u.mail = Some(renamed.address.clone());
            u.user_principal_name = Some(renamed.address.clone());
            u.proxy_addresses = Some(vec![
                format!("SMTP:{}", renamed.address),
                format!("smtp:{}", alice.address),
            ]);
        })
        .unwrap();
    let event = conflict_event(&mut capture, &alice.id).await;
    assert!(event.reason.starts_with("address_changed"), "{event:?}");
    assert_eq!(event.address.as_deref(), Some(renamed.address.as_str()));
    assert!(t.app.metrics.identity_conflict_count("address_changed") >= 1);
    assert_eq!(puts_to(&t, &renamed.address), 0, "held: nothing written");
    assert_eq!(t.sandbox.is_active(&renamed), Some(true));

    let shown = identity_cli(&t, &["show", "--user", &alice.id]).await;
    assert!(shown.contains("1 conflict(s) waiting"), "{shown}");
    assert!(shown.contains("address_changed"), "{shown}");
    let accepted = identity_cli(&t, &["accept", "--user", &alice.id]).await;
    assert!(
        accepted.contains(&format!("bound {} to {}", alice.id, renamed.address)),
        "{accepted}"
    );
    // The wake-up the acceptance stored brings the user back; the write goes to the new
    // address now.
    assert!(
        eventually(WAIT, || t.sandbox.is_active(&renamed) == Some(false)).await,
        "written to the accepted address after `identity accept`"
    );
    let store = t.app.store().await.unwrap();
    let binding = store
        .binding_of_object(&TenantId::new(TENANT), &UserId::new(&alice.id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (binding.address.as_str(), binding.how.as_str()),
        (renamed.address.as_str(), "accepted")
    );
    let shown = identity_cli(&t, &["show", "--user", &alice.id]).await;
    assert!(
        shown.contains("0 conflict(s) waiting"),
        "an accepted conflict is no longer waiting: {shown}"
    );
    t.stop().await;
}

#[tokio::test]
async fn the_first_write_binds_the_address_and_later_writes_do_not_ask_graph_again() {
    let t = TestApp::start("id-bind-once", Options::default()).await;
    let alice = t.sandbox.seed_user("alice", true, "end_user");
    assert!(
        eventually(WAIT, || processed(&t) >= 1).await,
        "seeding processed"
    );
    let store = t.app.store().await.unwrap();
    let before = address_lookups(&t);
    t.sandbox.set_enabled(&alice, false);
    assert!(eventually(WAIT, || t.sandbox.is_active(&alice) == Some(false)).await);
    assert!(
        eventually_async(WAIT, || async {
            store
                .binding_of_address(&TenantId::new(TENANT), &alice.address)
                .await
                .unwrap()
                .is_some()
        })
        .await
    );
    let binding = store
        .binding_of_object(&TenantId::new(TENANT), &UserId::new(&alice.id))
        .await
        .unwrap()
        .expect("bound");
    assert_eq!(
        (binding.address.as_str(), binding.how.as_str()),
        (alice.address.as_str(), "first_seen")
    );
    assert_eq!(
        address_lookups(&t),
        before + 1,
        "asked once, before binding"
    );
    let applied = Metrics::get(&t.app.metrics.outcomes_applied_total);
    t.sandbox.set_enabled(&alice, true);
    assert!(eventually(WAIT, || t.sandbox.is_active(&alice) == Some(true)).await);
    assert!(
        eventually(WAIT, || Metrics::get(&t.app.metrics.outcomes_applied_total)
            > applied)
        .await
    );
    assert_eq!(
        address_lookups(&t),
        before + 1,
        "the second write trusted the binding"
    );
    t.stop().await;
}
