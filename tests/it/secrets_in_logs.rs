//! Secrets never reach the logs, at any level: the real binary's commands run at
//! `log.filter = "trace"` with distinctive credentials (random Graph secret, client state,
//! Proofpoint password and signing key from the sandbox; a RabbitMQ user of the test's own),
//! and everything they print is searched for each secret, as text and as the byte lists
//! that wire-frame dumps use.

use std::process::Stdio;
use std::time::Duration;

use flagrelay::sim::sandbox::Sandbox;
use secrecy::ExposeSecret;
use tokio::io::AsyncReadExt;

use crate::process::{config_file, wait_ready};
use crate::support::{ORG, TENANT, eventually, unique_prefix};

/// A RabbitMQ user that exists for one test (`rabbitmqctl`, as CI runs the broker locally).
struct BrokerUser {
    name: String,
    password: String,
}

impl BrokerUser {
    fn create(test: &str) -> Self {
        let name = unique_prefix(test);
        let password = format!("amqp-{}", uuid::Uuid::new_v4().simple());
        rabbitmqctl(&["add_user", &name, &password]);
        rabbitmqctl(&["set_permissions", "-p", "/", &name, ".*", ".*", ".*"]);
        Self { name, password }
    }

    fn url(&self) -> String {
        format!("amqp://{}:{}@127.0.0.1:5672/%2f", self.name, self.password)
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        rabbitmqctl(&["delete_user", &self.name]);
    }
}

fn rabbitmqctl(args: &[&str]) {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .env(
            "PATH",
            format!(
                "{}:/usr/sbin:/sbin",
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .output()
        .expect("rabbitmqctl runs (the tests use the local broker)");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {out:?}");
}

/// Every form a secret could take in a log line: itself, and its bytes as Debug prints them.
fn forms(secret: &str) -> Vec<String> {
    let bytes: Vec<String> = secret.bytes().map(|b| b.to_string()).collect();
    vec![secret.to_owned(), bytes.join(", "), bytes.join(",")]
}

fn assert_clean(what: &str, output: &str, secrets: &[(&str, String)]) {
    assert!(
        !output.is_empty(),
        "{what} printed nothing: is the filter applied?"
    );
    for (name, secret) in secrets {
        for form in forms(secret) {
            assert!(
                !output.contains(&form),
                "{what} printed the {name} ({} bytes of output)",
                output.len()
            );
        }
    }
}

#[tokio::test]
async fn no_command_prints_a_secret_even_at_trace() {
    let sandbox = Sandbox::start(TENANT, ORG).await.unwrap();
    let broker = BrokerUser::create("secrets");
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let listen = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let extra = format!(
        "[amqp]\nurl = \"{}\"\nprefix = \"{}\"\n[log]\nfilter = \"trace\"\n",
        broker.url(),
        unique_prefix("secrets")
    );
    let path = sandbox.dir.join("flagrelay.toml");
    std::fs::write(&path, config_file(&sandbox, &listen, &admin, &extra)).unwrap();
    let c = &sandbox.config;
    let secrets = [
        (
            "graph client secret",
            c.graph.client_secret().expose_secret().to_owned(),
        ),
        (
            "client state",
            c.graph.client_state().expose_secret().to_owned(),
        ),
        (
            "proofpoint password",
            c.proofpoint
                .password
                .as_ref()
                .unwrap()
                .expose_secret()
                .to_owned(),
        ),
        (
            "signing key",
            c.signing.key.as_ref().unwrap().expose_secret().to_owned(),
        ),
        ("amqp password", broker.password.clone()),
    ];
    let command = |args: &[&str]| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_flagrelay"));
        cmd.arg("--config")
            .arg(&path)
            .args(args)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    };

    // `run`: receiver and worker on the broker, a real user flip through Graph and Proofpoint.
    let mut child = command(&["run"]).spawn().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let drain = tokio::spawn(async move {
        let mut all = Vec::new();
        let _ = stderr.read_to_end(&mut all).await;
        all
    });
    wait_ready(&format!("http://{listen}/healthz")).await;
    let u = sandbox.seed_user("trace", true, "end_user");
    let graph = flagrelay::graph::client::GraphClient::new(&c.graph).unwrap();
    sandbox
        .subscribe(&graph, &format!("http://{listen}"))
        .await
        .unwrap();
    sandbox.set_enabled(&u, false);
    assert!(
        eventually(Duration::from_secs(30), || sandbox.is_active(&u)
            == Some(false))
        .await,
        "the flip went through the real process"
    );
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    let run_log = String::from_utf8_lossy(&drain.await.unwrap()).into_owned();
    assert!(run_log.contains("TRACE"), "the trace filter was in effect");
    assert_clean("run", &run_log, &secrets);

    // The operator commands, each at trace too.
    for args in [
        &["check-config"][..],
        &["breaker", "status"],
        &["history", "--since", "1d"],
        &["identity", "show"],
        &["dlq", "list"],
        &["subscriptions", "list"],
    ] {
        let out = command(args).output().await.unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_clean(&args.join(" "), &text, &secrets);
    }
}
