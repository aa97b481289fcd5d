//! Shared test helpers: the broker URL, unique prefixes, and a loud broker check.

#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};

use secrecy::SecretString;

pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The broker tests talk to.
pub fn amqp_url() -> String {
    std::env::var("FLAGRELAY_TEST_AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.to_owned())
}

pub fn amqp_secret() -> SecretString {
    SecretString::from(amqp_url())
}

/// A name prefix no other test (or test run) uses.
pub fn unique_prefix(test: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "t-{test}-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        uuid::Uuid::new_v4()
            .simple()
            .to_string()
            .get(..6)
            .unwrap_or("x")
    )
}

/// Fail (never skip) when the broker is not reachable, and say how to start one.
pub async fn require_broker() {
    let url = url::Url::parse(&amqp_url()).expect("FLAGRELAY_TEST_AMQP_URL is a URL");
    let host = url.host_str().unwrap_or("127.0.0.1").to_owned();
    let port = url.port().unwrap_or(5672);
    if let Err(e) = tokio::net::TcpStream::connect((host.as_str(), port)).await {
        panic!(
            "RabbitMQ is not reachable at {host}:{port} ({e}). These tests need a real broker: \
             start one with `rabbitmq-server -detached` (then `rabbitmqctl await_startup`), \
             or `docker compose up -d rabbitmq`, or point FLAGRELAY_TEST_AMQP_URL at one."
        );
    }
}

use std::sync::Arc;
use std::time::{Duration, Instant};

use flagrelay::app::App;
use flagrelay::graph::client::GraphClient;
use flagrelay::proofpoint::client::ProofpointClient;
use flagrelay::queue::embedded::EmbeddedQueue;
use flagrelay::queue::rabbitmq::RabbitQueue;
use flagrelay::queue::{Queue, QueueSettings};
use flagrelay::sim::sandbox::Sandbox;
use tokio_util::sync::CancellationToken;

pub const TENANT: &str = "11111111-2222-3333-4444-555555555555";
pub const ORG: &str = "contoso.test";
/// A second customer of the same MSP deployment.
pub const TENANT_B: &str = "bbbbbbbb-2222-3333-4444-555555555555";
pub const ORG_B: &str = "fabrikam.test";

/// Which queue a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Rabbit,
    Embedded,
}

/// Queue settings for tests: short retry tiers so retries are observable quickly.
pub fn test_queue_settings(name: &str) -> QueueSettings {
    let mut s = QueueSettings::with_prefix(unique_prefix(name));
    s.shards = 3;
    s.retry_tiers = vec![
        Duration::from_millis(100),
        Duration::from_millis(300),
        Duration::from_secs(1),
    ];
    s
}

/// A test's queue, with the concrete handle kept for clean-up and inspection.
#[derive(Debug, Clone)]
pub enum TestQueue {
    Rabbit(RabbitQueue),
    Embedded(EmbeddedQueue),
}

impl TestQueue {
    pub async fn new(backend: Backend, name: &str, url: Option<SecretString>) -> Self {
        match backend {
            Backend::Rabbit => {
                require_broker().await;
                Self::Rabbit(RabbitQueue::new(
                    url.unwrap_or_else(amqp_secret),
                    test_queue_settings(name),
                ))
            }
            Backend::Embedded => Self::Embedded(EmbeddedQueue::new(test_queue_settings(name))),
        }
    }

    pub fn shared(&self) -> Arc<dyn Queue> {
        match self {
            Self::Rabbit(q) => Arc::new(q.clone()),
            Self::Embedded(q) => Arc::new(q.clone()),
        }
    }
}

/// flagrelay (receiver + worker) running against a sandbox, on a chosen queue backend.
pub struct TestApp {
    pub sandbox: Sandbox,
    pub app: App,
    /// `http://127.0.0.1:PORT` of the receiver.
    pub url: String,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    queue: TestQueue,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub backend: Backend,
    pub max_attempts: u32,
    /// Create the Graph subscription (through the handshake) at start.
    pub subscribe: bool,
    /// Start the worker (false: receiver only, to inspect the queue).
    pub worker: bool,
    /// Policy file contents (`None`: the built-in mirror policy).
    pub policy: Option<String>,
    /// Also serve [`TENANT_B`] → [`ORG_B`].
    pub second_tenant: bool,
    /// Reach RabbitMQ at this URL instead (e.g. through a [`Proxy`]).
    pub amqp_url: Option<SecretString>,
    /// Set `receiver.public_url` to the test's receiver, so the leader manages the Graph
    /// subscription itself.
    pub public_url: bool,
}

/// Mirror `accountEnabled` with the breaker opened wide (most tests flip many users).
pub use flagrelay::sim::sandbox::MIRROR_OPEN_BREAKER as MIRROR_NO_BREAKER;

impl Default for Options {
    fn default() -> Self {
        Self {
            backend: Backend::Rabbit,
            max_attempts: 5,
            subscribe: true,
            worker: true,
            policy: Some(MIRROR_NO_BREAKER.to_owned()),
            second_tenant: false,
            amqp_url: None,
            public_url: false,
        }
    }
}

impl TestApp {
    pub async fn start(name: &str, opts: Options) -> TestApp {
        Self::start_with(name, opts, |_| {}).await
    }

    /// Like [`TestApp::start`], with a last say on the configuration.
    pub async fn start_with(
        name: &str,
        opts: Options,
        adjust: impl FnOnce(&mut flagrelay::config::Config),
    ) -> TestApp {
        // Logs of the app under test, when RUST_LOG asks for them.
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt().with_test_writer().try_init();
        }
        let mut sandbox = Sandbox::start(TENANT, ORG).await.expect("sandbox starts");
        if let Some(policy) = &opts.policy {
            sandbox.use_policy(policy).expect("policy file written");
        }
        if opts.second_tenant {
            sandbox.add_tenant(TENANT_B, ORG_B).expect("second tenant");
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let mut config = sandbox.config.clone();
        if opts.public_url {
            config.receiver.public_url = Some(url.parse().expect("url"));
        }
        config.worker.max_attempts = opts.max_attempts;
        config.worker.backoff_base = Duration::from_millis(50);
        config.worker.backoff_max = Duration::from_millis(500);
        adjust(&mut config);
        let test_queue = TestQueue::new(opts.backend, name, opts.amqp_url.clone()).await;
        let queue = test_queue.shared();
        let graph = Arc::new(GraphClient::new(&config.graph).expect("graph client"));
        let pp =
            Arc::new(ProofpointClient::from_config(&config.proofpoint).expect("proofpoint client"));
        let app = App::with_parts(config, queue, graph, pp).expect("app builds");
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let app = app.clone();
            let stop = stop.clone();
            async move {
                if opts.worker {
                    app.run(listener, stop).await
                } else {
                    app.serve(listener, stop).await
                }
            }
        });
        let t = TestApp {
            sandbox,
            app,
            url,
            stop,
            task: Some(task),
            queue: test_queue,
        };
        if opts.subscribe {
            t.sandbox
                .subscribe(t.app.graph.as_ref(), &t.url)
                .await
                .expect("subscription created via handshake");
        }
        t
    }

    /// Stop receiver and worker, wait for them, and delete the test's broker topology.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
        }
        if let TestQueue::Rabbit(r) = &self.queue
            && let Err(e) = r.delete_topology().await
        {
            eprintln!("could not delete the test topology: {e}");
        }
    }

    /// `http://127.0.0.1:PORT` of the admin listener (the sandbox binds it to a free port),
    /// once it listens.
    pub async fn admin_url(&self) -> String {
        assert!(
            eventually(Duration::from_secs(10), || self.app.admin_addr().is_some()).await,
            "the admin listener did not start"
        );
        format!("http://{}", self.app.admin_addr().expect("bound"))
    }

    /// The test's unique RabbitMQ name prefix (RabbitMQ backend only).
    pub fn amqp_prefix(&self) -> String {
        match &self.queue {
            TestQueue::Rabbit(q) => q.settings().prefix.clone(),
            TestQueue::Embedded(_) => panic!("the embedded queue has no broker names"),
        }
    }

    /// The embedded queue, when the test runs on it (to read published events).
    pub fn embedded(&self) -> Option<&EmbeddedQueue> {
        match &self.queue {
            TestQueue::Embedded(q) => Some(q),
            TestQueue::Rabbit(_) => None,
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Messages the worker has finished with (any final outcome).
pub fn processed(t: &TestApp) -> u64 {
    use flagrelay::telemetry::Metrics;
    let m = &t.app.metrics;
    [
        &m.outcomes_applied_total,
        &m.outcomes_no_change_total,
        &m.outcomes_skipped_total,
        &m.outcomes_dead_lettered_total,
    ]
    .into_iter()
    .map(Metrics::get)
    .sum()
}

/// Poll `check` until it holds or `timeout` passes; returns whether it held.
pub async fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// [`eventually`] for checks that must await (the state store).
pub async fn eventually_async<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TCP proxy in front of the broker that can cut or freeze its connections.
pub struct Proxy {
    port: u16,
    conns: Arc<std::sync::Mutex<Vec<ProxyConn>>>,
    accept: tokio::task::JoinHandle<()>,
}

struct ProxyConn {
    kill: CancellationToken,
    frozen: Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    pub async fn start() -> Self {
        let url = url::Url::parse(&amqp_url()).unwrap();
        let upstream = format!(
            "{}:{}",
            url.host_str().unwrap_or("127.0.0.1"),
            url.port().unwrap_or(5672)
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns: Arc<std::sync::Mutex<Vec<ProxyConn>>> = Arc::default();
        let registry = conns.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let conn = ProxyConn {
                    kill: CancellationToken::new(),
                    frozen: Arc::default(),
                };
                tokio::spawn(pipe(client, server, conn.kill.clone(), conn.frozen.clone()));
                registry.lock().unwrap().push(conn);
            }
        });
        Self {
            port,
            conns,
            accept,
        }
    }

    /// The broker's URL through the proxy, with a 2 s heartbeat: a consumer on a silent
    /// connection stays the shard's single active consumer until the *broker* notices it
    /// is gone, which takes two to three heartbeat intervals.
    pub fn url(&self) -> SecretString {
        let mut url = url::Url::parse(&amqp_url()).unwrap();
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(self.port)).unwrap();
        url.query_pairs_mut().append_pair("heartbeat", "2");
        SecretString::from(url.to_string())
    }

    /// Close every current connection, as a broker crash or a network cut would.
    pub fn kill_all(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            c.kill.cancel();
        }
    }

    /// Stop forwarding on every current connection but keep the sockets open: a peer
    /// that went silent (the case where lapin's streams neither end nor fail).
    pub fn freeze_all(&self) {
        for c in self.conns.lock().unwrap().iter() {
            c.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.kill_all();
    }
}

async fn pipe(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    kill: CancellationToken,
    frozen: Arc<std::sync::atomic::AtomicBool>,
) {
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    tokio::select! {
        _ = kill.cancelled() => {}
        _ = copy(cr, sw, frozen.clone()) => {}
        _ = copy(sr, cw, frozen) => {}
    }
}

async fn copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.load(std::sync::atomic::Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A `user.changed` message for `user_id` in [`TENANT`], as a manual request would put it on
/// the bus (unsigned yet).
pub fn manual_change(user_id: &str) -> flagrelay::message::Message {
    use flagrelay::message::{Message, Origin, UserChanged};
    Message::UserChanged(UserChanged {
        tenant_id: TENANT.into(),
        user_id: user_id.into(),
        change_type: "updated".into(),
        subscription_id: None,
        event_time: None,
        received_at: chrono::Utc::now(),
        origin: Origin::Manual,
        not_before: None,
    })
}

/// [`manual_change`] signed with a key that is not the deployment's (under the current key
/// id): what something else publishing to the exchange would send.
pub fn forged_change(user_id: &str) -> flagrelay::message::Encoded {
    let attacker = flagrelay::message::Signer::new(
        "k1",
        SecretString::from("an attacker's key, not ours, 32+ chars".to_owned()),
    );
    flagrelay::message::encode(&manual_change(user_id), &attacker)
}

/// One Graph change notification about `user_id` in [`TENANT`], as Graph posts it.
pub fn change_notification(client_state: &str, user_id: &str, seq: usize) -> serde_json::Value {
    serde_json::json!({
        "subscriptionId": "sub-test", "changeType": "updated", "clientState": client_state,
        "resource": format!("Users/{user_id}"),
        "resourceData": {"id": user_id, "organizationId": TENANT, "sequenceNumber": seq},
        "tenantId": TENANT
    })
}

/// The PostgreSQL server tests create their databases on (`FLAGRELAY_TEST_PG_URL`, default
/// `postgres://postgres@127.0.0.1:5432/test`: trust authentication, as on the development
/// machines and in `.ci/run`).
pub fn pg_admin_url() -> String {
    std::env::var("FLAGRELAY_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A database of the test's own on the test server, dropped by [`PgDatabase::drop_now`].
#[derive(Debug)]
pub struct PgDatabase {
    pub name: String,
    /// `postgres://…/<name>`: what `state.url` is set to.
    pub url: String,
}

impl PgDatabase {
    /// Create a fresh, empty database; fails (never skips) when the server does not answer.
    pub async fn create(test: &str) -> Self {
        use sqlx::Connection as _;
        let admin = pg_admin_url();
        let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap_or_else(|e| {
            panic!(
                "PostgreSQL is not reachable at {admin} ({e}). These tests need a real server: \
                 start it with `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` \
                 (`bash .ci/run` installs and starts it), or point FLAGRELAY_TEST_PG_URL at one."
            )
        });
        // PostgreSQL cuts names at 63 bytes: shorten the test's part, never the unique one.
        let short: String = test.chars().take(32).collect();
        let name = unique_prefix(&short).replace('-', "_").to_ascii_lowercase();
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await
            .expect("create the test database");
        let mut url = url::Url::parse(&admin).expect("FLAGRELAY_TEST_PG_URL is a URL");
        url.set_path(&format!("/{name}"));
        Self {
            name,
            url: url.to_string(),
        }
    }

    /// Drop the database (after every pool on it is closed; connections left are cut).
    pub async fn drop_now(self) {
        use sqlx::Connection as _;
        if let Ok(mut conn) = sqlx::PgConnection::connect(&pg_admin_url()).await {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ))
            .execute(&mut conn)
            .await;
        }
    }
}
