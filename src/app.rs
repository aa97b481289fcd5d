//! Wiring: builds the queue, API clients, policy and metrics from a [`Config`], and runs the
//! receiver, the worker, or both until the shutdown token is cancelled.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::graph::GraphApi;
use crate::graph::client::GraphClient;
use crate::history::{HistorySink, HistoryWriter};
use crate::identity::OrgDomains;
use crate::policy::{MirrorPolicy, Policy, RulePolicy, SharedPolicy};
use crate::proofpoint::ProofpointApi;
use crate::proofpoint::client::ProofpointClient;
use crate::queue::Queue;
use crate::queue::embedded::EmbeddedQueue;
use crate::queue::rabbitmq::RabbitQueue;
use crate::receiver::{self, ReceiverSettings, ReceiverState};
use crate::store::Store;
use crate::telemetry::Metrics;
use crate::worker::outcome::RetryPolicy;
use crate::worker::{Org, Worker, WorkerDeps, WorkerSettings};

/// A configured flagrelay process: every part built, nothing running yet.
#[derive(Debug, Clone)]
pub struct App {
    pub config: Arc<Config>,
    pub queue: Arc<dyn Queue>,
    pub graph: Arc<dyn GraphApi>,
    pub proofpoint: Arc<dyn ProofpointApi>,
    pub policy: Arc<SharedPolicy>,
    pub metrics: Arc<Metrics>,
    /// The state store, opened on first use (`serve` never needs it).
    store: Arc<tokio::sync::OnceCell<Arc<dyn Store>>>,
    /// Where the admin listener listens, once bound (`admin.listen` may ask for port 0).
    admin_addr: Arc<OnceLock<SocketAddr>>,
}

/// The part a long-running process plays: decides what its admin probe checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `serve`: receiver only; ready when the broker is.
    Serve,
    /// `work`: worker (and leader candidate); needs the broker, Graph and Proofpoint.
    Work,
    /// `run`: both in one process.
    Run,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Serve => "serve",
            Role::Work => "work",
            Role::Run => "run",
        }
    }
}

/// Which queue backend a command may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueChoice {
    /// `serve` and `work`: RabbitMQ is required (separate processes must share a queue).
    RabbitOnly,
    /// `run` and `demo`: RabbitMQ when `amqp.url` is set, else the embedded queue.
    RabbitOrEmbedded,
}

impl App {
    /// Build every part from the configuration.
    pub fn from_config(config: Config, choice: QueueChoice) -> anyhow::Result<Self> {
        let settings = config.amqp.queue_settings();
        let queue: Arc<dyn Queue> = match (&config.amqp.url, choice) {
            (Some(url), _) => Arc::new(RabbitQueue::new(url.clone(), settings)),
            (None, QueueChoice::RabbitOrEmbedded) => Arc::new(EmbeddedQueue::new(settings)),
            (None, QueueChoice::RabbitOnly) => anyhow::bail!(
                "invalid configuration value for `amqp.url`: required for this command \
                 (set it in the file or FLAGRELAY_AMQP__URL); only `run` and `demo` can use the embedded queue"
            ),
        };
        let graph = Arc::new(GraphClient::new(&config.graph).context("building the Graph client")?);
        let proofpoint = Arc::new(
            ProofpointClient::from_config(&config.proofpoint)
                .context("building the Proofpoint client")?,
        );
        Self::with_parts(config, queue, graph, proofpoint)
    }

    /// Assemble from ready-made parts (tests and the demo choose their own backends).
    pub fn with_parts(
        config: Config,
        queue: Arc<dyn Queue>,
        graph: Arc<dyn GraphApi>,
        proofpoint: Arc<dyn ProofpointApi>,
    ) -> anyhow::Result<Self> {
        let policy = Arc::new(SharedPolicy::new(load_policy(&config)?));
        Ok(Self {
            config: Arc::new(config),
            queue,
            graph,
            proofpoint,
            policy,
            metrics: Arc::new(Metrics::default()),
            store: Arc::default(),
            admin_addr: Arc::default(),
        })
    }

    /// Use `store` instead of the one the configuration names (tests, benchmarks).
    pub fn with_store(self, store: Arc<dyn Store>) -> Self {
        let cell = tokio::sync::OnceCell::new();
        let _ = cell.set(store);
        Self {
            store: Arc::new(cell),
            ..self
        }
    }

    /// The state store: PostgreSQL at `state.url`, else SQLite under `worker.state_dir`;
    /// opened (and migrated) on first use, shared by every part of the process.
    pub async fn store(&self) -> anyhow::Result<Arc<dyn Store>> {
        let store = self
            .store
            .get_or_try_init(|| crate::store::open(&self.config))
            .await
            .context("opening the state store")?;
        Ok(store.clone())
    }

    /// Each tenant's org: access and the mail domains flagrelay may write.
    fn orgs(&self) -> Vec<(crate::ids::TenantId, Org)> {
        self.config
            .tenants
            .iter()
            .map(|t| {
                let org = Org {
                    access: self.config.org_access(t),
                    domains: OrgDomains::new(&t.org_domain, &t.accepted_domains),
                };
                (t.id.clone(), org)
            })
            .collect()
    }

    /// Re-read the policy file (SIGHUP). An invalid file is refused and the policy in force
    /// stays; the error names the line and the rule.
    pub fn reload_policy(&self) -> anyhow::Result<()> {
        let policy = load_policy(&self.config)?;
        self.policy.replace(policy);
        tracing::info!(file = ?self.config.policy.file, "policy reloaded");
        Ok(())
    }

    fn receiver_settings(&self) -> ReceiverSettings {
        let r = &self.config.receiver;
        ReceiverSettings {
            max_body_bytes: r.max_body_bytes,
            max_items: r.max_items,
            max_in_flight: r.max_in_flight,
            retry_after: r.retry_after,
            request_timeout: r.request_timeout,
        }
    }

    /// The receiver's router, for serving or for calling directly in tests.
    pub fn receiver_router(&self) -> axum::Router {
        let settings = self.receiver_settings();
        let state = ReceiverState::new(
            self.config.graph.client_state().clone(),
            self.config.tenants.iter().map(|t| t.id.to_string()),
            self.queue.clone(),
            self.config.signing.signer(),
            self.metrics.clone(),
            &settings,
        );
        receiver::router(state, &settings)
    }

    /// A worker over this app's parts, recording its decisions into `history`.
    pub async fn worker(&self, history: HistorySink) -> anyhow::Result<Arc<Worker>> {
        let store = self.store().await?;
        let w = &self.config.worker;
        Ok(Worker::new(
            WorkerDeps {
                queue: self.queue.clone(),
                graph: self.graph.clone(),
                proofpoint: self.proofpoint.clone(),
                policy: self.policy.clone(),
                metrics: self.metrics.clone(),
                store,
                history,
            },
            WorkerSettings {
                concurrency: w.concurrency,
                retry: RetryPolicy {
                    max_attempts: w.max_attempts,
                    backoff_base: w.backoff_base,
                    backoff_max: w.backoff_max,
                },
                dry_run: w.dry_run,
                shutdown_deadline: Duration::from_secs(20),
            },
            self.config.signing.verifier(),
            self.config.signing.signer(),
            self.orgs(),
        ))
    }

    /// The history writer of a worker process (drained at shutdown).
    async fn history(
        &self,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<(HistorySink, HistoryWriter)> {
        Ok(HistorySink::spawn(
            self.store().await?,
            self.metrics.clone(),
            shutdown.clone(),
        ))
    }

    /// Declare the topology; a broker that is down now is not fatal (the backend declares
    /// again when it connects, and the receiver answers 503 meanwhile).
    async fn declare(&self) {
        // (The embedded queue warns that it is not durable when it is created.)
        if let Err(error) = self.queue.declare().await {
            tracing::error!(%error, "could not declare the queue topology now; will retry on reconnect");
        }
    }

    /// Run the receiver on `listener`, and the admin listener, until `shutdown`; in-flight
    /// requests finish first.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        self.start_admin(Role::Serve, shutdown.clone()).await?;
        self.receive(listener, shutdown).await
    }

    async fn receive(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        self.declare().await;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "receiver listening");
        let timeout = self.config.receiver.request_timeout;
        receiver::serve(
            listener,
            self.receiver_router(),
            timeout,
            timeout + Duration::from_secs(5),
            shutdown,
        )
        .await;
        Ok(())
    }

    /// Run a worker, and the admin listener, until `shutdown`.
    pub async fn work(&self, shutdown: CancellationToken) -> anyhow::Result<()> {
        self.declare().await;
        let (history, writer) = self.history(&shutdown).await?;
        let worker = self.worker(history).await?;
        self.start_admin(Role::Work, shutdown.clone()).await?;
        self.check_permissions().await;
        self.reload_on_sighup(shutdown.clone());
        self.lead(shutdown.clone()).await?;
        let worked = worker.run(shutdown).await.context("worker failed");
        writer.finished().await;
        worked
    }

    /// The admin routes of a process playing `role`, for serving or for calling directly.
    pub fn admin_router(&self, role: Role) -> axum::Router {
        let store = (role != Role::Serve).then(|| self.store.clone());
        crate::admin::router(crate::admin::AdminState {
            metrics: self.metrics.clone(),
            role: role.name(),
            history: crate::admin::history::HistorySource::new(store),
        })
    }

    /// The admin listener's address once it is bound; `None` before, or when `admin.listen`
    /// is "off".
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr.get().copied()
    }

    /// The background checks for a process playing `role`.
    pub fn probe(&self, role: Role) -> crate::admin::probe::Probe {
        let calls_apis = role != Role::Serve;
        let tenants = &self.config.tenants;
        crate::admin::probe::Probe {
            queue: self.queue.clone(),
            graph: calls_apis.then(|| {
                (
                    self.graph.clone(),
                    tenants.iter().map(|t| t.id.to_string()).collect(),
                )
            }),
            proofpoint: calls_apis.then(|| {
                let orgs = tenants.iter().map(|t| self.config.org_access(t)).collect();
                (self.proofpoint.clone(), orgs)
            }),
            // Opened by then for the roles that use it (the worker is built first).
            store: if calls_apis {
                self.store.get().cloned()
            } else {
                None
            },
            policy: self.policy.clone(),
            metrics: self.metrics.clone(),
            every: self.config.admin.check_every,
        }
    }

    /// Start the probe, and the admin listener unless `admin.listen` is "off", until
    /// `shutdown`. The probe runs either way: the receiver's `/readyz` reads its result.
    async fn start_admin(&self, role: Role, shutdown: CancellationToken) -> anyhow::Result<()> {
        tokio::spawn(self.probe(role).run(shutdown.clone()));
        let Some(addr) = self.config.admin.listen else {
            tracing::info!("admin listener off (admin.listen = \"off\")");
            return Ok(());
        };
        let listener = TcpListener::bind(addr).await.with_context(|| {
            format!("invalid configuration value for `admin.listen`: cannot listen on {addr}")
        })?;
        let bound = listener.local_addr()?;
        let _ = self.admin_addr.set(bound);
        let router = self.admin_router(role);
        tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, router)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
            {
                tracing::error!(%error, "admin listener failed");
            }
        });
        tracing::info!(addr = %bound, "admin listener: /healthz /readyz /metrics and the status page at /");
        Ok(())
    }

    /// Take part in leader election; while leading, manage subscriptions, poll delta, queue
    /// due work and sweep.
    pub async fn lead(&self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let store = self.store().await?;
        let lease = self.queue.leader_lease(shutdown.clone());
        let scheduler = crate::scheduler::Scheduler {
            store: store.clone(),
            queue: self.queue.clone(),
            signer: self.config.signing.signer(),
            history_retention: self.config.state.history_retention,
        };
        tokio::spawn(scheduler.run(lease.clone(), shutdown.clone()));
        let reconciler = crate::reconciler::Reconciler {
            graph: self.graph.clone(),
            queue: self.queue.clone(),
            signer: self.config.signing.signer(),
            store,
            tenants: self.config.tenants.clone(),
            select: self.policy.current().needs().user_select(),
            interval: self.config.leader.delta_interval,
        };
        let metrics = self.metrics.clone();
        let mut leading = lease.clone();
        tokio::spawn(async move {
            loop {
                metrics.set_leader(*leading.borrow_and_update());
                if leading.changed().await.is_err() {
                    return;
                }
            }
        });
        tokio::spawn(reconciler.run(lease.clone(), self.metrics.clone(), shutdown.clone()));
        tokio::spawn(
            self.clone()
                .sweep_on_schedule(lease.clone(), shutdown.clone()),
        );
        let app = self.clone();
        tokio::spawn(async move {
            let manager = crate::subscriptions::SubscriptionManager {
                graph: app.graph.as_ref(),
                config: &app.config,
                renew_before: app.config.leader.subscription_renew_before,
            };
            manager
                .run(
                    app.config.leader.subscription_check_every,
                    lease,
                    &app.metrics,
                    shutdown,
                )
                .await;
        });
        Ok(())
    }

    /// Receiver and worker in one process.
    pub async fn run(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let (history, writer) = self.history(&shutdown).await?;
        let worker = self.worker(history).await?;
        self.start_admin(Role::Run, shutdown.clone()).await?;
        self.check_permissions().await;
        self.reload_on_sighup(shutdown.clone());
        self.lead(shutdown.clone()).await?;
        let (served, worked) = tokio::join!(
            self.receive(listener, shutdown.clone()),
            worker.run(shutdown.clone())
        );
        writer.finished().await;
        served?;
        worked.context("worker failed")
    }
}

impl App {
    /// Report, loudly and at start, Graph permissions the policy needs but the app lacks.
    async fn check_permissions(&self) {
        let needed = self.policy.current().needs().graph_permissions();
        for tenant in &self.config.tenants {
            match self.graph.granted_permissions(&tenant.id).await {
                Ok(Some(granted)) => {
                    for p in ["User.Read.All"].iter().chain(needed.iter()) {
                        if !granted.iter().any(|g| g == p) {
                            tracing::error!(
                                tenant_id = %tenant.id,
                                permission = %p,
                                "the Entra app lacks an application permission the policy needs; \
                                 grant it with admin consent, or evaluations that need it will fail"
                            );
                        }
                    }
                }
                Ok(None) => {
                    tracing::info!(tenant_id = %tenant.id, "could not read the token's permissions; not checked")
                }
                Err(e) => tracing::error!(
                    tenant_id = %tenant.id,
                    error = %e,
                    "could not get a Graph token: check graph.client_id / client_secret and admin consent"
                ),
            }
        }
    }

    /// Re-read the policy file on SIGHUP until `shutdown`.
    fn reload_on_sighup(&self, shutdown: CancellationToken) {
        #[cfg(unix)]
        {
            let app = self.clone();
            tokio::spawn(async move {
                let Ok(mut hup) =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                else {
                    return;
                };
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = hup.recv() => {
                            if let Err(e) = app.reload_policy() {
                                tracing::error!(
                                    error = format!("{e:#}"),
                                    "SIGHUP: the new policy is invalid and was refused; the previous policy stays in force"
                                );
                            }
                        }
                    }
                }
            });
        }
    }
}

impl App {
    /// Drift-sweep one tenant with the policy in force (see [`crate::sweep`]).
    pub async fn sweep(
        &self,
        tenant: &crate::config::TenantConfig,
        dry_run: bool,
        progress: &mut (dyn FnMut(usize, Option<usize>) + Send),
    ) -> anyhow::Result<crate::sweep::SweepReport> {
        let store = self.store().await?;
        let policy = self.policy.current();
        let signer = self.config.signing.signer();
        let sweeper = crate::sweep::Sweeper {
            config: &self.config,
            graph: self.graph.as_ref(),
            proofpoint: self.proofpoint.as_ref(),
            queue: self.queue.as_ref(),
            policy: policy.as_ref(),
            signer: &signer,
            store: store.as_ref(),
        };
        Ok(sweeper.sweep(tenant, dry_run, progress).await?)
    }

    /// The scheduled drift sweep (every `leader.sweep_every`, while leading).
    async fn sweep_on_schedule(
        self,
        mut leader: tokio::sync::watch::Receiver<bool>,
        shutdown: CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.config.leader.sweep_every) => {}
            }
            if !*leader.borrow_and_update() {
                continue;
            }
            for tenant in &self.config.tenants {
                match self
                    .sweep(tenant, self.config.worker.dry_run, &mut |_, _| {})
                    .await
                {
                    Ok(r) => {
                        tracing::info!(tenant_id = %tenant.id, users = r.graph_users, drifts = r.drifts.len(), queued = r.queued, "drift sweep")
                    }
                    Err(e) => {
                        tracing::error!(tenant_id = %tenant.id, error = format!("{e:#}"), "drift sweep failed")
                    }
                }
            }
        }
    }
}

/// The configured policy file, or the built-in mirror policy.
pub fn load_policy(config: &Config) -> anyhow::Result<Arc<dyn Policy>> {
    Ok(match &config.policy.file {
        Some(path) => Arc::new(RulePolicy::load(path)?),
        None => Arc::new(MirrorPolicy),
    })
}
