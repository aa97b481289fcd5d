//! A fleet of real `flagrelay` processes for the breaker tests: one receiver (`serve`) and
//! any number of workers (`work`), sharing one RabbitMQ prefix and one state store, pointed
//! at a sandbox's simulators by one configuration file. Every process is SIGKILLed on drop.

use std::path::PathBuf;
use std::time::Duration;

use flagrelay::sim::proofpoint::WriteTarget;
use flagrelay::sim::sandbox::{Sandbox, SeededUser};
use futures::StreamExt;
use secrecy::ExposeSecret;

use crate::support::{ORG, ORG_B, TENANT, TENANT_B, amqp_url, eventually_async, unique_prefix};

/// Mirror `accountEnabled` behind a breaker of `per_org` deactivations per org and
/// `global` over all orgs (both per hour; day limits and the share rule out of the way).
pub fn mirror_policy(per_org: u32, global: u32) -> String {
    format!(
        r#"
[breaker]
max_deactivations = {per_org}
max_share = 1.0
window = "1h"
max_per_day = 100000

[breaker.global]
max_deactivations = {global}
window = "1h"
max_per_day = 100000

[[rule]]
name = "enabled"
when = {{ account_enabled = true }}
action = "activate"

[[rule]]
name = "default"
action = "deactivate"
"#
    )
}

/// Where the fleet keeps its state.
#[derive(Debug, Clone)]
pub enum StateStore {
    /// PostgreSQL at this URL (`[state] url`).
    Postgres(String),
    /// The sandbox's SQLite file (`worker.state_dir`), shared by the processes.
    Sqlite,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One `flagrelay` child process.
pub struct Proc {
    pub child: tokio::process::Child,
    /// `http://127.0.0.1:PORT` of its admin listener.
    pub admin: String,
}

impl Proc {
    pub fn signal(&self, signal: &str) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args([signal, &pid.to_string()])
                .status();
        }
    }

    /// SIGKILL, and wait until it is gone.
    pub async fn kill(mut self) {
        self.signal("-KILL");
        let _ = self.child.wait().await;
    }

    /// The admin listener's `/readyz`: status and body (`None` while it does not answer).
    pub async fn readyz(&self) -> Option<(u16, String)> {
        let r = reqwest::get(format!("{}/readyz", self.admin)).await.ok()?;
        let status = r.status().as_u16();
        Some((status, r.text().await.ok()?))
    }

    /// The value of a metric without labels (0 when absent or unreadable).
    pub async fn metric(&self, name: &str) -> f64 {
        let Ok(r) = reqwest::get(format!("{}/metrics", self.admin)).await else {
            return 0.0;
        };
        let text = r.text().await.unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Wait until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        let ready = eventually_async(Duration::from_secs(60), || async {
            self.readyz().await.is_some_and(|(s, _)| s == 200)
        })
        .await;
        assert!(ready, "{} never became ready", self.admin);
    }
}

/// The processes of one test and what they share.
pub struct Fleet {
    pub sandbox: Sandbox,
    pub prefix: String,
    pub config: PathBuf,
    /// `http://127.0.0.1:PORT` of the receiver.
    pub receiver_url: String,
    pub receiver: Option<Proc>,
    pub workers: Vec<Proc>,
    /// The store URL the processes use (environment override), if PostgreSQL.
    state_url: Option<String>,
}

impl Fleet {
    /// A sandbox with [`TENANT`] → [`ORG`] (and [`TENANT_B`] → [`ORG_B`] when `two_orgs`),
    /// the policy, and a configuration file; the receiver running and ready.
    pub async fn start(test: &str, policy: &str, store: StateStore, two_orgs: bool) -> Fleet {
        crate::support::require_broker().await;
        let mut sandbox = Sandbox::start(TENANT, ORG).await.unwrap();
        if two_orgs {
            sandbox.add_tenant(TENANT_B, ORG_B).unwrap();
        }
        sandbox.use_policy(policy).unwrap();
        let prefix = unique_prefix(test);
        let listen = format!("127.0.0.1:{}", free_port());
        let config = sandbox.dir.join("flagrelay.toml");
        let state_url = match store {
            StateStore::Postgres(url) => Some(url),
            StateStore::Sqlite => None,
        };
        std::fs::write(&config, config_file(&sandbox, &listen, &prefix)).unwrap();
        let mut fleet = Fleet {
            sandbox,
            prefix,
            config,
            receiver_url: format!("http://{listen}"),
            receiver: None,
            workers: Vec::new(),
            state_url,
        };
        let receiver = fleet.spawn("serve");
        receiver.wait_ready().await;
        fleet.receiver = Some(receiver);
        fleet
    }

    /// Start `flagrelay <role>` with its own admin port.
    pub fn spawn(&self, role: &str) -> Proc {
        let admin = format!("127.0.0.1:{}", free_port());
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_flagrelay"));
        cmd.args(["--config", self.config.to_str().unwrap(), role])
            .env("RUST_LOG", "error")
            .env("FLAGRELAY_ADMIN__LISTEN", &admin)
            .kill_on_drop(true);
        if let Some(url) = &self.state_url {
            cmd.env("FLAGRELAY_STATE__URL", url);
        }
        Proc {
            child: cmd.spawn().unwrap(),
            admin: format!("http://{admin}"),
        }
    }

    /// Start one more worker and wait until it is ready (and, a moment later, consuming).
    pub async fn add_worker(&mut self) {
        let w = self.spawn("work");
        w.wait_ready().await;
        // Ready means connected; give it a moment to register its shard consumers.
        tokio::time::sleep(Duration::from_secs(2)).await;
        self.workers.push(w);
    }

    /// `flagrelay breaker status --json` against the fleet's store (retried a few times: on
    /// a loaded machine a connection can take longer than the workers' acquire timeout).
    pub async fn breaker_status(&self) -> serde_json::Value {
        let mut failure = String::new();
        for _ in 0..5 {
            let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_flagrelay"));
            cmd.args([
                "--config",
                self.config.to_str().unwrap(),
                "breaker",
                "status",
                "--json",
            ])
            .env("RUST_LOG", "error")
            .env("FLAGRELAY_STATE__ACQUIRE_TIMEOUT", "10s");
            if let Some(url) = &self.state_url {
                cmd.env("FLAGRELAY_STATE__URL", url);
            }
            let out = cmd.output().await.unwrap();
            if out.status.success() {
                return serde_json::from_slice(&out.stdout)
                    .expect("breaker status --json prints JSON");
            }
            failure = String::from_utf8_lossy(&out.stderr).into_owned();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        panic!("breaker status failed: {failure}");
    }

    /// `count` users of `org` (in its tenant), active in Proofpoint and enabled in Graph.
    pub fn seed(&self, tenant: &str, org: &str, name: &str, count: usize) -> Vec<SeededUser> {
        (0..count)
            .map(|i| {
                self.sandbox
                    .seed_user_in(tenant, org, &format!("{name}{i:03}"), true, "end_user")
            })
            .collect()
    }

    /// Block sign-in for `users` in Graph and notify the receiver of each (every
    /// notification answered 202 eventually).
    pub async fn disable(&self, users: &[SeededUser]) {
        for u in users {
            self.sandbox.set_enabled(u, false);
        }
        self.notify(users).await;
    }

    /// One notification per user, as Graph posts them; retried while the receiver says
    /// 503. Returns how many posts were answered 503.
    pub async fn notify(&self, users: &[SeededUser]) -> usize {
        let client = reqwest::Client::new();
        let endpoint = format!("{}/graph/notifications", self.receiver_url);
        let state = self.sandbox.config.graph.client_state().expose_secret();
        let refused = std::sync::atomic::AtomicUsize::new(0);
        futures::stream::iter(users.iter().enumerate())
            .for_each_concurrent(16, |(n, u)| {
                let body = serde_json::json!({"value": [notification(state, u, n)]});
                let (client, endpoint, refused) = (&client, &endpoint, &refused);
                async move {
                    for _ in 0..300 {
                        let status = client.post(endpoint).json(&body).send().await;
                        match status.map(|r| r.status().as_u16()) {
                            Ok(202) => return,
                            Ok(503) | Err(_) => {
                                refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            Ok(other) => panic!("the receiver answered {other}"),
                        }
                    }
                    panic!("a notification was never accepted");
                }
            })
            .await;
        refused.into_inner()
    }

    /// Deactivating user PUTs the Proofpoint simulator accepted (active → not active), in
    /// `org` or every org.
    pub fn deactivations(&self, org: Option<&str>) -> usize {
        self.sandbox
            .proofpoint
            .writes()
            .iter()
            .filter(|w| {
                w.method == "PUT"
                    && w.target == WriteTarget::User
                    && org.is_none_or(|o| w.domain == o)
                    && active(&w.before) != Some(false)
                    && active(&w.after) == Some(false)
            })
            .count()
    }

    /// How many of `users` are not active in Proofpoint now.
    pub fn inactive(&self, users: &[SeededUser]) -> usize {
        users
            .iter()
            .filter(|u| self.sandbox.is_active(u) == Some(false))
            .count()
    }

    /// SIGKILL every worker.
    pub async fn kill_workers(&mut self) {
        for w in self.workers.drain(..) {
            w.kill().await;
        }
    }

    /// Kill everything and delete the test's broker topology.
    pub async fn stop(mut self) {
        self.kill_workers().await;
        if let Some(r) = self.receiver.take() {
            r.kill().await;
        }
        let mut settings = flagrelay::queue::QueueSettings::with_prefix(self.prefix.clone());
        settings.shards = SHARDS;
        let q =
            flagrelay::queue::rabbitmq::RabbitQueue::new(crate::support::amqp_secret(), settings);
        if let Err(e) = q.delete_topology().await {
            eprintln!("could not delete the test topology: {e}");
        }
    }
}

fn active(v: &Option<serde_json::Value>) -> Option<bool> {
    v.as_ref()?.get("is_active")?.as_bool()
}

/// Users held by the breaker in a `breaker status --json` report (in `org`, or all).
pub fn held(report: &serde_json::Value, org: Option<&str>) -> usize {
    report["held"]
        .as_array()
        .map(|h| {
            h.iter()
                .filter(|h| org.is_none_or(|o| h["org"] == o))
                .count()
        })
        .unwrap_or(0)
}

/// The trip of `scope` (`global` or an org) in a `breaker status --json` report.
pub fn trip<'a>(report: &'a serde_json::Value, scope: &str) -> Option<&'a serde_json::Value> {
    report["scopes"]
        .as_array()?
        .iter()
        .find(|s| s["scope"] == scope)
        .map(|s| &s["trip"])
        .filter(|t| !t.is_null())
}

fn notification(client_state: &str, u: &SeededUser, seq: usize) -> serde_json::Value {
    serde_json::json!({
        "subscriptionId": "sub-test", "changeType": "updated", "clientState": client_state,
        "resource": format!("Users/{}", u.id),
        "resourceData": {"id": u.id, "organizationId": u.tenant_id, "sequenceNumber": seq},
        "tenantId": u.tenant_id
    })
}

pub const SHARDS: u16 = 4;

/// The configuration every process of the fleet reads; per-process values (admin port,
/// store URL) come from the environment.
fn config_file(sandbox: &Sandbox, listen: &str, prefix: &str) -> String {
    let c = &sandbox.config;
    let tenants: String = c
        .tenants
        .iter()
        .map(|t| {
            format!(
                "[[tenants]]\nid = \"{}\"\norg_domain = \"{}\"\n",
                t.id, t.org_domain
            )
        })
        .collect();
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
requests_per_second = 500
[signing]
key = "{}"
[worker]
state_dir = "{}"
max_attempts = 10000
backoff_base = "50ms"
backoff_max = "1s"
[state]
acquire_timeout = "1s"
[admin]
check_every = "1s"
[amqp]
url = "{}"
prefix = "{prefix}"
shards = {SHARDS}
retry_tiers = ["100ms", "300ms", "1s"]
[leader]
delta_interval = "1h"
subscription_check_every = "1h"
sweep_every = "24h"
[policy]
file = "{}"
{tenants}
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
        amqp_url(),
        c.policy.file.as_ref().unwrap().display(),
    )
}
