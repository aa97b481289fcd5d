//! The command line: parses arguments, loads configuration, starts telemetry and the async
//! runtime, and calls into the library. Exit codes: 0 ok, 1 failure, 2 bad configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

mod store_commands;
use store_commands::{BreakerCommand, HistoryArgs, IdentityCommand};

use crate::app::{App, QueueChoice};
use crate::config::{Config, ConfigError, LogConfig};
use crate::{demo, explain, shutdown, sim, telemetry};

#[derive(Debug, Parser)]
#[command(
    name = "flagrelay",
    version,
    about = "Converge Proofpoint Essentials to Entra ID sign-in state within seconds, by policy."
)]
pub struct Cli {
    /// TOML configuration file (every key can be overridden by FLAGRELAY_<SECTION>__<KEY>).
    #[arg(long, global = true, env = "FLAGRELAY_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the webhook receiver: answers Graph's handshake and queues notifications on
    /// RabbitMQ (amqp.url required). Never calls Graph or Proofpoint itself.
    Serve,
    /// Run a worker: consumes the queue, reads users from Graph and converges Proofpoint
    /// (amqp.url required). Run several for availability; per-user order is kept.
    Work {
        /// Decide and publish outcome events, but write nothing to Proofpoint.
        #[arg(long)]
        dry_run: bool,
    },
    /// Receiver and worker in one process. Without amqp.url it uses the embedded queue,
    /// which is NOT durable (fine for trials, not for production).
    Run {
        /// Decide and publish outcome events, but write nothing to Proofpoint.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show the whole pipeline working end to end against the built-in simulators: creates
    /// the subscription through a real handshake, flips users, and reports latency.
    Demo(demo::DemoArgs),
    /// Run the Graph and Proofpoint Essentials simulators standalone, so a staging flagrelay
    /// can point at them (see README, "Staging with the simulators").
    Sim(SimArgs),
    /// Validate the configuration and print it with secrets redacted.
    CheckConfig,
    /// Check a policy file, or explain the decision for one user.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Inspect or release the blast-radius breaker (it holds deactivations once tripped);
    /// the state is the fleet's, in the state store.
    #[command(subcommand)]
    Breaker(BreakerCommand),
    /// Every evaluation's result: when, origin, rule, decision, the writes made, before and
    /// after. `history --user alice@contoso.com --since 7d`.
    History(HistoryArgs),
    /// Identity bindings (Graph object ↔ Proofpoint address) and conflicts: show them, or
    /// accept a legitimate change.
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// Drift sweep: evaluate every user and compare with Proofpoint; queue corrections
    /// through the normal pipeline (retries, guards and the breaker apply).
    Reconcile {
        /// Only this tenant (default: all).
        #[arg(long)]
        tenant: Option<String>,
        /// Show what differs; queue nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Inspect and repair the dead-letter queue (needs amqp.url).
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Manage the Graph subscriptions (the leader also does this by itself).
    #[command(subcommand)]
    Subscriptions(SubscriptionsCommand),
    /// Benchmarks that print numbers: receiver vs the HTTP and broker ceilings, end to end on
    /// the simulators, the drift sweep (see BENCHMARKS.md).
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
    /// Probe a process's admin listener (`/healthz`): exit 0 when it answers 2xx, else 1.
    /// The container image's HEALTHCHECK (the image has no curl).
    Healthcheck {
        #[arg(long, default_value = "http://127.0.0.1:9090/healthz")]
        url: url::Url,
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// One line per dead letter: id, reason, attempts, when, type and subject.
    List,
    /// Headers and body of one dead letter.
    Show { id: String },
    /// Put dead letters back through the normal path (attempts start again).
    Redrive {
        /// Every dead letter.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        /// Message ids, as `dlq list` shows them.
        #[arg(required_unless_present = "all")]
        ids: Vec<String>,
    },
    /// Delete every dead letter.
    Purge {
        /// Confirm: dead letters are deleted for good.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum SubscriptionsCommand {
    /// Create, adopt or renew each tenant's subscription (needs receiver.public_url).
    Ensure {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Show id, tenant, resource, expiry and time left of this app's subscriptions.
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Extend each tenant's subscription to the maximum lifetime now.
    Renew {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Delete this deployment's subscription (notifications stop; delta polling goes on).
    Delete {
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file (default: the configured `policy.file`); errors name the line
    /// and the rule.
    Check { file: Option<PathBuf> },
    /// Show every rule tried for one user, why it matched or not, the decision, and the
    /// exact writes the worker would make. Reads the live user from Graph and Proofpoint,
    /// or, with --user-json, works offline.
    Explain {
        /// User object id or UPN (live mode).
        #[arg(long, required_unless_present = "user_json")]
        user: Option<String>,
        /// Tenant id (default: the first configured tenant).
        #[arg(long)]
        tenant: Option<String>,
        /// Offline: a JSON file {"user": {Graph user}, "proofpoint": {Proofpoint user},
        /// "groups"?, "mailbox_purpose"?, "exempt"?, "disabled_since"?}.
        #[arg(long, conflicts_with = "user")]
        user_json: Option<PathBuf>,
        /// Policy file to use (default: the configured one, else the built-in mirror policy).
        #[arg(long)]
        policy: Option<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
pub struct SimArgs {
    /// Where the Graph simulator listens (token endpoint at /{tenant}/oauth2/v2.0/token,
    /// API under /v1.0).
    #[arg(long, default_value = "127.0.0.1:9100")]
    pub graph_listen: SocketAddr,
    /// Where the Proofpoint Essentials simulator listens (API under /api/v1).
    #[arg(long, default_value = "127.0.0.1:9200")]
    pub proofpoint_listen: SocketAddr,
    /// Entra tenant id to create.
    #[arg(long, default_value = "00000000-0000-0000-0000-00000000feed")]
    pub tenant: String,
    /// Proofpoint org domain to create.
    #[arg(long, default_value = "example.com")]
    pub org: String,
    /// App registration accepted by the Graph simulator.
    #[arg(long, default_value = "flagrelay-sim-app")]
    pub client_id: String,
    #[arg(
        long,
        env = "FLAGRELAY_SIM_CLIENT_SECRET",
        default_value = "sim-client-secret"
    )]
    pub client_secret: String,
    /// Proofpoint admin accepted by the simulator.
    #[arg(long, default_value = "admin@example.com")]
    pub proofpoint_user: String,
    #[arg(
        long,
        env = "FLAGRELAY_SIM_PROOFPOINT_PASSWORD",
        default_value = "sim-password"
    )]
    pub proofpoint_password: String,
    /// Seed this many users (user1..userN@org) in both simulators.
    #[arg(long, default_value_t = 10)]
    pub users: usize,
}

/// Entry point used by `main.rs`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(dispatch(cli));
    // Flush exported spans (a no-op without the `otlp` feature).
    crate::otlp::shutdown();
    code
}

fn load(path: Option<&std::path::Path>) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e: ConfigError| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })
}

/// [`load`], and the policy file parsed too: for the commands that decide (a broken policy
/// is a configuration error, exit 2, not something to find out at the first message).
fn load_with_policy(path: Option<&std::path::Path>) -> Result<Config, ExitCode> {
    let cfg = load(path)?;
    if let Err(e) = crate::app::load_policy(&cfg) {
        eprintln!("error: invalid configuration value for `policy.file`: {e:#}");
        return Err(ExitCode::from(2));
    }
    Ok(cfg)
}

async fn dispatch(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Demo(args) => {
            telemetry::init(&LogConfig {
                format: "text".into(),
                filter: "warn".into(),
            });
            return demo::run(args).await;
        }
        Command::Bench(cmd) => {
            telemetry::init(&LogConfig {
                format: "text".into(),
                filter: "warn".into(),
            });
            crate::bench::run(cmd, cli.config.as_deref()).await
        }
        Command::Sim(args) => {
            telemetry::init(&LogConfig::default());
            sim::run_standalone(args).await
        }
        Command::Policy(cmd) => {
            telemetry::init(&LogConfig {
                format: "text".into(),
                filter: "warn".into(),
            });
            return policy_command(cmd, cli.config.as_deref()).await;
        }
        Command::Reconcile { tenant, dry_run } => match load(cli.config.as_deref()) {
            Ok(cfg) => {
                telemetry::init(&LogConfig {
                    filter: "warn".into(),
                    ..cfg.log.clone()
                });
                reconcile_command(cfg, tenant, dry_run).await
            }
            Err(code) => return code,
        },
        Command::Dlq(cmd) => match load(cli.config.as_deref()) {
            Ok(cfg) => dlq_command(cmd, cfg).await,
            Err(code) => return code,
        },
        Command::Subscriptions(cmd) => match load(cli.config.as_deref()) {
            Ok(cfg) => {
                telemetry::init(&cfg.log);
                subscriptions_command(cmd, &cfg).await
            }
            Err(code) => return code,
        },
        Command::Breaker(cmd) => match load_with_policy(cli.config.as_deref()) {
            Ok(cfg) => {
                telemetry::init(&quiet(&cfg.log));
                store_commands::breaker(cmd, &cfg).await
            }
            Err(code) => return code,
        },
        Command::History(args) => match load(cli.config.as_deref()) {
            Ok(cfg) => {
                telemetry::init(&quiet(&cfg.log));
                store_commands::history(args, &cfg).await
            }
            Err(code) => return code,
        },
        Command::Identity(cmd) => match load(cli.config.as_deref()) {
            Ok(cfg) => {
                telemetry::init(&quiet(&cfg.log));
                store_commands::identity(cmd, &cfg).await
            }
            Err(code) => return code,
        },
        Command::Healthcheck { url, timeout } => return healthcheck(url, timeout).await,
        Command::CheckConfig => match load_with_policy(cli.config.as_deref()) {
            Ok(cfg) => {
                println!("configuration is valid:\n{cfg:#?}");
                Ok(())
            }
            Err(code) => return code,
        },
        Command::Serve | Command::Work { .. } | Command::Run { .. } => {
            let mut cfg = match load_with_policy(cli.config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            telemetry::init(&cfg.log);
            if let Command::Work { dry_run: true } | Command::Run { dry_run: true } = cli.command {
                cfg.worker.dry_run = true;
            }
            run_service(cli.command, cfg).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "flagrelay stopped with an error");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn healthcheck(url: url::Url, timeout: std::time::Duration) -> ExitCode {
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build();
    let answer = match client {
        Ok(c) => c.get(url.clone()).send().await,
        Err(e) => Err(e),
    };
    match answer {
        Ok(r) if r.status().is_success() => ExitCode::SUCCESS,
        Ok(r) => {
            eprintln!("unhealthy: {url} answered {}", r.status());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("unhealthy: {url}: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run_service(command: Command, cfg: Config) -> anyhow::Result<()> {
    let choice = match command {
        Command::Run { .. } => QueueChoice::RabbitOrEmbedded,
        _ => QueueChoice::RabbitOnly,
    };
    let listen = cfg.receiver.listen;
    let app = App::from_config(cfg, choice)?;
    let stop = shutdown::on_signals();
    match command {
        Command::Serve => app.serve(bind(listen).await?, stop).await,
        Command::Work { .. } => app.work(stop).await,
        _ => app.run(bind(listen).await?, stop).await,
    }
}

async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "invalid configuration value for `receiver.listen`: cannot listen on {addr}: {e}"
        )
    })
}

/// Operator commands print their own output; only warnings go to the log.
fn quiet(log: &LogConfig) -> LogConfig {
    LogConfig {
        filter: "warn".into(),
        ..log.clone()
    }
}

/// Parse a humantime duration for clap.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

async fn policy_command(cmd: PolicyCommand, config: Option<&std::path::Path>) -> ExitCode {
    let result = match cmd {
        PolicyCommand::Check { file } => {
            let file = match file {
                Some(f) => Ok(f),
                None => load(config)
                    .map_err(|_| ())
                    .and_then(|c| c.policy.file.ok_or(())),
            };
            match file {
                Ok(f) => explain::check(&f).map(|text| println!("{text}")),
                Err(()) => Err(anyhow::anyhow!(
                    "name a policy file, or set `policy.file` in a valid configuration"
                )),
            }
        }
        PolicyCommand::Explain {
            user,
            tenant,
            user_json,
            policy,
        } => explain_command(config, user, tenant, user_json, policy).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn explain_command(
    config: Option<&std::path::Path>,
    user: Option<String>,
    tenant: Option<String>,
    user_json: Option<PathBuf>,
    policy_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let policy: std::sync::Arc<dyn crate::policy::Policy> = match &policy_file {
        Some(f) => std::sync::Arc::new(crate::policy::RulePolicy::load(f)?),
        None if user_json.is_some() && config.is_none() => {
            std::sync::Arc::new(crate::policy::MirrorPolicy)
        }
        None => crate::app::load_policy(&Config::load(config)?)?,
    };
    if let Some(path) = user_json {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let input: explain::OfflineUser =
            serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        print!(
            "{}",
            explain::explain_offline(policy.as_ref(), input, chrono::Utc::now())
        );
        return Ok(());
    }
    let cfg = Config::load(config)?;
    let user = user.expect("clap requires --user without --user-json");
    print!(
        "{}",
        explain::explain_live(&cfg, policy.as_ref(), &user, tenant.as_deref()).await?
    );
    Ok(())
}

async fn subscriptions_command(cmd: SubscriptionsCommand, cfg: &Config) -> anyhow::Result<()> {
    use crate::graph::GraphApi as _;
    use crate::subscriptions::{MAX_LIFETIME, SubscriptionManager};
    let graph = crate::graph::client::GraphClient::new(&cfg.graph)?;
    let manager = SubscriptionManager {
        graph: &graph,
        config: cfg,
        renew_before: cfg.leader.subscription_renew_before,
    };
    let (SubscriptionsCommand::Ensure { tenant }
    | SubscriptionsCommand::List { tenant }
    | SubscriptionsCommand::Renew { tenant }
    | SubscriptionsCommand::Delete { tenant }) = &cmd;
    let tenants: Vec<_> = cfg
        .tenants
        .iter()
        .filter(|t| {
            tenant
                .as_deref()
                .is_none_or(|x| t.id.eq_ignore_ascii_case(x))
        })
        .collect();
    anyhow::ensure!(!tenants.is_empty(), "no configured tenant matches");
    let now = chrono::Utc::now();
    if matches!(cmd, SubscriptionsCommand::List { .. }) {
        println!(
            "{:<38} {:<38} {:<10} {:<22} time left",
            "id", "tenant", "resource", "expires"
        );
    }
    for t in tenants {
        match &cmd {
            SubscriptionsCommand::Ensure { .. } => {
                let (how, s) = manager.ensure(&t.id, now).await?;
                println!(
                    "{}: {how:?} {} (expires {})",
                    t.id, s.id, s.expiration_date_time
                );
            }
            SubscriptionsCommand::List { .. } => {
                for s in graph.list_subscriptions(&t.id).await? {
                    let left = s.expiration_date_time - now;
                    println!(
                        "{:<38} {:<38} {:<10} {:<22} {}d {}h",
                        s.id,
                        t.id,
                        s.resource,
                        s.expiration_date_time.format("%Y-%m-%d %H:%M UTC"),
                        left.num_days(),
                        left.num_hours() % 24
                    );
                }
            }
            SubscriptionsCommand::Renew { .. } => match manager.find(&t.id).await? {
                Some(s) => {
                    let r = graph
                        .renew_subscription(&t.id, &s.id, now + MAX_LIFETIME)
                        .await?;
                    println!(
                        "{}: renewed {} until {}",
                        t.id, r.id, r.expiration_date_time
                    );
                }
                None => println!(
                    "{}: no subscription of this deployment; run `subscriptions ensure`",
                    t.id
                ),
            },
            SubscriptionsCommand::Delete { .. } => match manager.find(&t.id).await? {
                Some(s) => {
                    graph.delete_subscription(&t.id, &s.id).await?;
                    println!("{}: deleted {}", t.id, s.id);
                }
                None => println!("{}: nothing to delete", t.id),
            },
        }
    }
    Ok(())
}

async fn reconcile_command(
    cfg: Config,
    tenant: Option<String>,
    dry_run: bool,
) -> anyhow::Result<()> {
    use std::io::IsTerminal as _;
    if cfg.amqp.url.is_none() && !dry_run {
        anyhow::bail!(
            "invalid configuration value for `amqp.url`: corrections go through the queue; set it, or use --dry-run"
        );
    }
    let app = App::from_config(cfg, QueueChoice::RabbitOrEmbedded)?;
    let tenants: Vec<_> = app
        .config
        .tenants
        .iter()
        .filter(|t| {
            tenant
                .as_deref()
                .is_none_or(|x| t.id.eq_ignore_ascii_case(x))
        })
        .collect();
    anyhow::ensure!(!tenants.is_empty(), "no configured tenant matches");
    for t in tenants {
        let bar = if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_message(format!("sweeping tenant {}", t.id));
            bar
        } else {
            indicatif::ProgressBar::hidden()
        };
        let report = app
            .sweep(t, dry_run, &mut |done, _| {
                bar.set_message(format!("sweeping tenant {}: {done} users read", t.id));
                bar.tick();
            })
            .await?;
        bar.finish_and_clear();
        print!("{}", crate::sweep::render(&t.id, &report, dry_run));
    }
    Ok(())
}

async fn dlq_command(cmd: DlqCommand, cfg: Config) -> anyhow::Result<()> {
    use crate::queue::{ATTEMPT_HEADER, DEAD_LETTERED_AT_HEADER, Redrive};
    let app = App::from_config(cfg, QueueChoice::RabbitOnly)?;
    let q = app.queue.as_ref();
    let envelope =
        |body: &[u8]| serde_json::from_slice::<serde_json::Value>(body).unwrap_or_default();
    match cmd {
        DlqCommand::List => {
            let letters = q.peek_dead_letters(10_000).await?;
            println!(
                "{:<38} {:<24} {:<8} {:<32} {:<45} subject",
                "id", "reason", "attempts", "dead-lettered at", "type"
            );
            for d in &letters {
                let env = envelope(&d.body);
                println!(
                    "{:<38} {:<24} {:<8} {:<32} {:<45} {}",
                    d.message_id.as_deref().unwrap_or("-"),
                    d.reason().unwrap_or("(broker: delivery limit)"),
                    d.headers.get(ATTEMPT_HEADER).map_or("-", String::as_str),
                    d.headers
                        .get(DEAD_LETTERED_AT_HEADER)
                        .map_or("-", String::as_str),
                    env["type"].as_str().unwrap_or("(undecodable)"),
                    env["subject"].as_str().unwrap_or("-"),
                );
            }
            println!("{} dead letter(s)", letters.len());
        }
        DlqCommand::Show { id } => {
            let letters = q.peek_dead_letters(10_000).await?;
            let d = letters
                .iter()
                .find(|d| d.message_id.as_deref() == Some(id.as_str()))
                .ok_or_else(|| anyhow::anyhow!("no dead letter with id {id}"))?;
            for (k, v) in &d.headers {
                println!("{k}: {v}");
            }
            println!();
            match serde_json::from_slice::<serde_json::Value>(&d.body) {
                Ok(v) => println!("{}", serde_json::to_string_pretty(&v)?),
                Err(_) => println!("{}", String::from_utf8_lossy(&d.body)),
            }
        }
        DlqCommand::Redrive { all, ids } => {
            let which = if all { Redrive::All } else { Redrive::Ids(ids) };
            let n = q.redrive_dead_letters(&which).await?;
            println!("redriven: {n}");
        }
        DlqCommand::Purge { yes } => {
            anyhow::ensure!(yes, "purging deletes every dead letter for good: add --yes");
            println!("purged: {}", q.purge_dead_letters().await?);
        }
    }
    Ok(())
}
