//! The real binary as a process: start, serve, and stop cleanly on SIGTERM.

use std::time::Duration;

use flagrelay::sim::proofpoint::RequestRecord;
use flagrelay::sim::sandbox::{Sandbox, SeededUser};
use futures::StreamExt;
use secrecy::ExposeSecret;

use crate::support::{ORG, TENANT, change_notification, eventually};

/// A configuration file for the real binary, pointing at `sandbox`, with the admin listener
/// on `admin`; `extra` is appended (more sections, e.g. `[amqp]`).
pub(crate) fn config_file(sandbox: &Sandbox, listen: &str, admin: &str, extra: &str) -> String {
    let c = &sandbox.config;
    let policy = c
        .policy
        .file
        .as_ref()
        .map(|f| format!("[policy]\nfile = \"{}\"\n", f.display()))
        .unwrap_or_default();
    format!(
        r#"
[receiver]
listen = "{listen}"
[graph]
authority_url = "{}"
api_url = "{}"
client_id = "{}"
client_secret = "{}"
client_state = "{}"
[proofpoint]
base_url = "{}"
username = "{}"
password = "{}"
[signing]
key = "{}"
[worker]
state_dir = "{}"
[admin]
listen = "{admin}"
[[tenants]]
id = "{TENANT}"
org_domain = "{ORG}"
{policy}{extra}
"#,
        c.graph.authority_url,
        c.graph.api_url,
        c.graph.client_id,
        c.graph.client_secret().expose_secret(),
        c.graph.client_state().expose_secret(),
        c.proofpoint.base_url,
        c.proofpoint.username,
        c.proofpoint.password.as_ref().unwrap().expose_secret(),
        c.signing.key.as_ref().unwrap().expose_secret(),
        c.worker.state_dir.display(),
    )
}

#[tokio::test]
async fn flagrelay_run_serves_and_stops_cleanly_on_sigterm() {
    let sandbox = Sandbox::start(TENANT, ORG).await.unwrap();
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let listen = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let path = sandbox.dir.join("flagrelay.toml");
    std::fs::write(&path, config_file(&sandbox, &listen, &admin, "")).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_flagrelay"))
        .args(["--config", path.to_str().unwrap(), "run"])
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    wait_ready(&format!("http://{listen}/healthz")).await;
    // A user flip goes through the real process too.
    let u = sandbox.seed_user("proc", true, "end_user");
    let sub = flagrelay::graph::client::GraphClient::new(&sandbox.config.graph).unwrap();
    sandbox
        .subscribe(&sub, &format!("http://{listen}"))
        .await
        .unwrap();
    sandbox.set_enabled(&u, false);
    assert!(
        eventually(Duration::from_secs(15), || sandbox.is_active(&u)
            == Some(false))
        .await
    );
    // Operators read metrics on the admin listener; the public one does not expose them.
    // (The counter moves when the worker settles, a moment after Proofpoint was written.)
    let mut text = String::new();
    for _ in 0..50 {
        let scrape = client
            .get(format!("http://{admin}/metrics"))
            .send()
            .await
            .unwrap();
        assert!(scrape.status().is_success());
        text = scrape.text().await.unwrap();
        if text.lines().any(|l| {
            l.starts_with("flagrelay_outcomes_applied_total ")
                && l != "flagrelay_outcomes_applied_total 0"
        }) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("flagrelay_outcomes_applied_total ")
                && l != "flagrelay_outcomes_applied_total 0"),
        "{text}"
    );
    let public = client
        .get(format!("http://{listen}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(public.status().as_u16(), 404);

    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exits within its shutdown deadline")
        .unwrap();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
}

#[test]
fn an_invalid_configuration_is_refused_with_exit_code_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let valid_but = r#"
[graph]
client_id = "app"
client_secret = "secret-value"
client_state = "client-state-at-least-16"
[proofpoint]
username = "admin@example.com"
password = "pw"
[signing]
key = "0123456789abcdef0123456789abcdef"
[[tenants]]
id = "t1"
org_domain = "example.com"
[amqp]
shards = 0
"#;
    std::fs::write(&path, valid_but).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flagrelay"))
        .args(["--config", path.to_str().unwrap(), "serve"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`amqp.shards`"), "{err}");
}

#[test]
fn a_broken_policy_file_is_refused_at_start_with_exit_code_2_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[rule]]\nname = \"typo\"\nwhen = { acount_enabled = false }\naction = \"deactivate\"\n",
    )
    .unwrap();
    let path = dir.path().join("flagrelay.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[graph]
client_id = "app"
client_secret = "secret-value"
client_state = "client-state-at-least-16"
[proofpoint]
username = "admin@example.com"
password = "pw"
[signing]
key = "0123456789abcdef0123456789abcdef"
[[tenants]]
id = "t1"
org_domain = "example.com"
[policy]
file = "{}"
"#,
            policy.display()
        ),
    )
    .unwrap();
    for command in ["check-config", "run"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_flagrelay"))
            .args(["--config", path.to_str().unwrap(), command])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{command}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("`policy.file`"), "{command}: {err}");
        assert!(err.contains("acount_enabled"), "{command}: {err}");
        assert!(
            err.contains("policy.toml:3:"),
            "{command}: the line is named: {err}"
        );
    }
}

/// A `flagrelay` child process; SIGKILLed when dropped.
struct Proc(tokio::process::Child);

impl Proc {
    fn spawn(config: &std::path::Path, role: &str) -> Self {
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_flagrelay"))
            .args(["--config", config.to_str().unwrap(), role])
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Self(child)
    }

    fn signal(&self, signal: &str) {
        let pid = self.0.id().expect("still running").to_string();
        let sent = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap();
        assert!(sent.success(), "kill {signal} {pid}");
    }

    /// SIGTERM and wait for a clean exit.
    async fn stop(mut self) {
        self.signal("-TERM");
        let status = tokio::time::timeout(Duration::from_secs(30), self.0.wait())
            .await
            .expect("exits within its shutdown deadline")
            .unwrap();
        assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    }
}

/// Wait until `url` answers 200.
pub(crate) async fn wait_ready(url: &str) {
    let client = reqwest::Client::new();
    let ready = eventually_async(Duration::from_secs(30), || async {
        client
            .get(url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    assert!(ready, "{url} never answered 200");
}

async fn eventually_async<F: Future<Output = bool>>(
    timeout: Duration,
    mut check: impl FnMut() -> F,
) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Post one notification per entry of `users` (as Graph would: one item per request) to the
/// receiver at `base`, retrying 503s.
async fn notify(base: &str, client_state: &str, users: &[&SeededUser]) {
    let client = reqwest::Client::new();
    let endpoint = format!("{base}/graph/notifications");
    futures::stream::iter(users.iter().enumerate())
        .for_each_concurrent(16, |(n, user)| {
            let body =
                serde_json::json!({"value": [change_notification(client_state, &user.id, n)]});
            let (client, endpoint) = (&client, &endpoint);
            async move {
                for _ in 0..100 {
                    let status = client
                        .post(endpoint)
                        .json(&body)
                        .send()
                        .await
                        .unwrap()
                        .status();
                    if status.as_u16() == 202 {
                        return;
                    }
                    assert_eq!(status.as_u16(), 503, "only 202 or 503 are expected");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                panic!("notification never accepted");
            }
        })
        .await;
}

/// Per user, the Proofpoint simulator's record of requests must show one evaluation at a
/// time: no two requests for the user overlap in time, and every write follows its own read
/// (two writes with no read between them are two read-modify-writes interleaved).
fn assert_serialized_per_user(log: &[RequestRecord]) -> usize {
    use std::collections::BTreeMap;
    let mut per_user: BTreeMap<&str, Vec<&RequestRecord>> = BTreeMap::new();
    for r in log {
        if let Some(email) = r.email.as_deref()
            && r.path.contains("/users/")
        {
            per_user.entry(email).or_default().push(r);
        }
    }
    for (user, requests) in &mut per_user {
        requests.sort_by_key(|r| r.started);
        for pair in requests.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            assert!(
                b.started >= a.finished,
                "{user}: {} {} overlapped {} {} (started {:?} before the other finished)",
                b.method,
                b.path,
                a.method,
                a.path,
                a.finished - b.started
            );
            assert!(
                !(a.method == "PUT" && b.method == "PUT"),
                "{user}: two writes with no read between them: interleaved evaluations"
            );
        }
    }
    per_user.len()
}

/// The broker-side names of a test prefix, deleted at the end.
async fn delete_topology(prefix: &str) {
    let mut settings = flagrelay::queue::QueueSettings::with_prefix(prefix.to_owned());
    settings.shards = 4;
    let q = flagrelay::queue::rabbitmq::RabbitQueue::new(crate::support::amqp_secret(), settings);
    if let Err(e) = q.delete_topology().await {
        eprintln!("could not delete the test topology: {e}");
    }
}

#[tokio::test]
async fn a_worker_process_killed_mid_batch_has_its_messages_redelivered_to_another_and_users_are_never_evaluated_concurrently()
 {
    crate::support::require_broker().await;
    let mut sandbox = Sandbox::start(TENANT, ORG).await.unwrap();
    sandbox
        .use_policy(crate::support::MIRROR_NO_BREAKER)
        .unwrap();
    // Every Proofpoint answer takes a while, so the batch is still in flight when the kill
    // comes, and interleaved evaluations would show in the timing records.
    sandbox
        .proofpoint
        .set_latency(Duration::from_millis(15), Duration::from_millis(10));
    let users: Vec<_> = (0..60)
        .map(|i| sandbox.seed_user(&format!("proc{i:02}"), true, "end_user"))
        .collect();
    let prefix = crate::support::unique_prefix("kill");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let base = format!("http://{listen}");
    // Nothing but notifications and redelivery may converge the users: no delta backstop,
    // no sweep, no subscription management.
    let extra = format!(
        r#"
[amqp]
url = "{}"
prefix = "{prefix}"
shards = 4
retry_tiers = ["100ms", "300ms", "1s", "10m"]
[leader]
delta_interval = "1h"
subscription_check_every = "1h"
sweep_every = "24h"
"#,
        crate::support::amqp_url()
    );
    let path = sandbox.dir.join("flagrelay.toml");
    std::fs::write(&path, config_file(&sandbox, &listen, "127.0.0.1:0", &extra)).unwrap();
    let client_state = sandbox
        .config
        .graph
        .client_state()
        .expose_secret()
        .to_owned();

    let receiver = Proc::spawn(&path, "serve");
    wait_ready(&format!("{base}/readyz")).await;
    let first = Proc::spawn(&path, "work");
    // The first worker is consuming once a change goes through.
    sandbox.set_enabled(&users[0], false);
    notify(&base, &client_state, &[&users[0]]).await;
    assert!(
        eventually(Duration::from_secs(30), || sandbox.is_active(&users[0])
            == Some(false))
        .await,
        "the first worker converges a user"
    );
    let second = Proc::spawn(&path, "work");
    // Give the standby time to register its consumers (it takes over either way).
    tokio::time::sleep(Duration::from_secs(2)).await;
    sandbox.proofpoint.clear_records();

    // Block the rest and notify each five times, in a burst.
    for u in &users[1..] {
        sandbox.set_enabled(u, false);
    }
    let burst: Vec<&SeededUser> = (0..5).flat_map(|_| users[1..].iter()).collect();
    notify(&base, &client_state, &burst).await;

    // Kill the active worker once it has applied a few changes: the rest of its batch is
    // unacknowledged and must reach the other worker.
    let active_writes = || {
        sandbox
            .proofpoint
            .writes()
            .iter()
            .filter(|w| w.method == "PUT")
            .count()
    };
    assert!(
        eventually(Duration::from_secs(30), || active_writes() >= 5).await,
        "the active worker applies changes"
    );
    let mut first = first;
    first.signal("-KILL");
    let _ = first.0.wait().await;
    let killed_at = std::time::Instant::now();
    let converged_at_kill = users
        .iter()
        .filter(|u| sandbox.is_active(u) == Some(false))
        .count();
    assert!(
        converged_at_kill < users.len(),
        "the kill came mid-batch ({converged_at_kill} of {} done)",
        users.len()
    );

    assert!(
        eventually(Duration::from_secs(60), || users
            .iter()
            .all(|u| sandbox.is_active(u) == Some(false)))
        .await,
        "every user converged after the kill"
    );
    let after_kill = sandbox
        .proofpoint
        .writes()
        .iter()
        .filter(|w| w.method == "PUT" && w.at_instant > killed_at)
        .count();
    assert!(after_kill > 0, "the surviving worker applied the rest");
    eprintln!(
        "converged when killed: {converged_at_kill}/{}; writes after the kill: {after_kill}",
        users.len()
    );

    let users_seen = assert_serialized_per_user(&sandbox.proofpoint.request_log());
    assert!(users_seen >= users.len() - 1, "the records cover the batch");

    second.stop().await;
    receiver.stop().await;
    delete_topology(&prefix).await;
}

/// A request record as the Proofpoint simulator keeps it, for checking the checker.
fn request(method: &str, started: std::time::Instant, took_ms: u64) -> RequestRecord {
    RequestRecord {
        method: method.into(),
        path: format!("/api/v1/orgs/{ORG}/users/a@{ORG}"),
        org: Some(ORG.into()),
        email: Some(format!("a@{ORG}")),
        status: 200,
        user: None,
        injected: false,
        started,
        finished: started + Duration::from_millis(took_ms),
        started_at: chrono::Utc::now(),
        finished_at: chrono::Utc::now(),
    }
}

#[test]
#[should_panic(expected = "overlapped")]
fn the_serialization_check_catches_overlapping_requests() {
    let t0 = std::time::Instant::now();
    assert_serialized_per_user(&[
        request("GET", t0, 10),
        request("GET", t0 + Duration::from_millis(5), 10),
    ]);
}

#[test]
#[should_panic(expected = "interleaved")]
fn the_serialization_check_catches_interleaved_read_modify_writes() {
    let t0 = std::time::Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    // GET a, GET b, PUT a, PUT b: never overlapping, still two evaluations at once.
    assert_serialized_per_user(&[
        request("GET", at(0), 1),
        request("GET", at(2), 1),
        request("PUT", at(4), 1),
        request("PUT", at(6), 1),
    ]);
}
