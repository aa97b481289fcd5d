//! The command line: parses arguments, loads configuration, starts telemetry and the async
//! runtime, and calls into the library. Exit codes: 0 ok, 1 failure, 2 bad configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::app::{App, QueueChoice};
use crate::config::{Config, ConfigError, LogConfig};
use crate::{demo, shutdown, sim, telemetry};

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
    runtime.block_on(dispatch(cli))
}

fn load(path: Option<&std::path::Path>) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e: ConfigError| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })
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
        Command::Sim(args) => {
            telemetry::init(&LogConfig::default());
            sim::run_standalone(args).await
        }
        Command::CheckConfig => match load(cli.config.as_deref()) {
            Ok(cfg) => {
                println!("configuration is valid:\n{cfg:#?}");
                Ok(())
            }
            Err(code) => return code,
        },
        Command::Serve | Command::Work { .. } | Command::Run { .. } => {
            let mut cfg = match load(cli.config.as_deref()) {
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

/// Parse a humantime duration for clap.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}
