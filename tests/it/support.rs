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
        uuid::Uuid::new_v4().simple().to_string().get(..6).unwrap_or("x")
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
