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
    pub async fn new(backend: Backend, name: &str) -> Self {
        match backend {
            Backend::Rabbit => {
                require_broker().await;
                Self::Rabbit(RabbitQueue::new(amqp_secret(), test_queue_settings(name)))
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
}

/// Mirror `accountEnabled`, with the breaker opened wide: for tests that deactivate most of
/// a small org on purpose (the breaker has tests of its own).
pub const MIRROR_NO_BREAKER: &str = r#"
[breaker]
max_deactivations = 100000
max_share = 1.0
window = "1h"

[[rule]]
name = "enabled"
when = { account_enabled = true }
action = "activate"

[[rule]]
name = "default"
action = "deactivate"
"#;

impl Default for Options {
    fn default() -> Self {
        Self {
            backend: Backend::Rabbit,
            max_attempts: 5,
            subscribe: true,
            worker: true,
            policy: Some(MIRROR_NO_BREAKER.to_owned()),
            second_tenant: false,
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
        let mut config = sandbox.config.clone();
        config.worker.max_attempts = opts.max_attempts;
        config.worker.backoff_base = Duration::from_millis(50);
        config.worker.backoff_max = Duration::from_millis(500);
        adjust(&mut config);
        let test_queue = TestQueue::new(opts.backend, name).await;
        let queue = test_queue.shared();
        let graph = Arc::new(GraphClient::new(&config.graph).expect("graph client"));
        let pp =
            Arc::new(ProofpointClient::from_config(&config.proofpoint).expect("proofpoint client"));
        let app = App::with_parts(config, queue, graph, pp).expect("app builds");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
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
