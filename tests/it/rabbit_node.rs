//! A private RabbitMQ node for tests that stop and restart the broker itself.
//!
//! Restarting the machine's shared broker would break every other test running in parallel,
//! so a test that needs a real restart gets a node of its own: same installation, its own
//! node name, AMQP port, distribution port and data directory (kept across restarts, so
//! durable queues and persistent messages survive exactly as they would in production).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use secrecy::SecretString;

/// Where Debian's package puts the server script that runs as the calling user (the one in
/// /usr/sbin switches to the `rabbitmq` user when called by root).
const SERVER_SCRIPTS: [&str; 2] = [
    "/usr/lib/rabbitmq/bin/rabbitmq-server",
    "/usr/local/lib/rabbitmq/bin/rabbitmq-server",
];

/// How long a node may take to start on a loaded 2-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(120);

pub struct RabbitNode {
    dir: tempfile::TempDir,
    script: PathBuf,
    name: String,
    port: u16,
    child: Option<tokio::process::Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RabbitNode {
    /// Start a fresh node and wait until it takes AMQP connections. Fails (never skips) when
    /// RabbitMQ is not installed, saying how to install it.
    pub async fn start() -> Self {
        let script = SERVER_SCRIPTS
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .unwrap_or_else(|| {
                panic!(
                    "this test starts a RabbitMQ node of its own and needs the RabbitMQ server \
                     installed (looked for {SERVER_SCRIPTS:?}): `apt-get install rabbitmq-server` \
                     (`.ci/run` does it)"
                )
            });
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        std::fs::write(
            dir.path().join("rabbitmq.conf"),
            format!("listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\n"),
        )
        .unwrap();
        // No plugins: the shared node may already hold the management UI's port.
        std::fs::write(dir.path().join("enabled_plugins"), "[].\n").unwrap();
        let mut node = Self {
            name: format!("flagrelay-test-{port}@localhost"),
            dir,
            script,
            port,
            child: None,
        };
        node.boot().await;
        node
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f` with a short heartbeat.
    pub fn url(&self) -> SecretString {
        SecretString::from(format!(
            "amqp://guest:guest@127.0.0.1:{}/%2f?heartbeat=2",
            self.port
        ))
    }

    async fn boot(&mut self) {
        let d = self.dir.path();
        let mut cmd = tokio::process::Command::new(&self.script);
        cmd.env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .env("HOME", d)
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            // Not the machine's rabbitmq-env.conf, which names the shared node.
            .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_DIST_PORT", free_port().to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        self.child = Some(cmd.spawn().expect("rabbitmq-server starts"));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if amqp_answers(self.port).await {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "the test's RabbitMQ node exited with {status} while starting; logs in {}",
                    d.join("log").display()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the test's RabbitMQ node did not take connections within {START_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stop the node the way an operator or a host shutdown does (SIGTERM: RabbitMQ stops
    /// cleanly, closing every client connection), and wait until it is gone.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
            let _ = tokio::time::timeout(Duration::from_secs(60), child.wait()).await;
            let _ = child.kill().await;
        }
    }

    /// Start the node again on the same data directory and port.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.boot().await;
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Some(pid) = child.id()
        {
            // SIGTERM first so the node's Erlang children go too; kill_on_drop follows.
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
}

/// True when the port answers with an AMQP server (not just any listener).
async fn amqp_answers(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(Ok(mut s)) = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    else {
        return false;
    };
    if s.write_all(b"AMQP\x00\x00\x09\x01").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 8];
    matches!(
        tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await,
        Ok(Ok(n)) if n > 0
    )
}
