//! The real binary as a process: start, serve, and stop cleanly on SIGTERM.

use std::time::Duration;

use flagrelay::sim::sandbox::Sandbox;
use secrecy::ExposeSecret;

use crate::support::{ORG, TENANT, eventually};

fn config_file(sandbox: &Sandbox, listen: &str, admin: &str) -> String {
    let c = &sandbox.config;
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
    std::fs::write(&path, config_file(&sandbox, &listen, &admin)).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_flagrelay"))
        .args(["--config", path.to_str().unwrap(), "run"])
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let healthz = format!("http://{listen}/healthz");
    let mut up = false;
    for _ in 0..100 {
        if client
            .get(&healthz)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "the process serves /healthz");
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
    let scrape = client
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap();
    assert!(scrape.status().is_success());
    let text = scrape.text().await.unwrap();
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
