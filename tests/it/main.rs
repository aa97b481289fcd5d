//! flagrelay's integration tests: one test crate, shared helpers in [`support`].
//!
//! Tests that need RabbitMQ use `FLAGRELAY_TEST_AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`) and a unique name prefix each, so they run in
//! parallel. Without a broker they fail loudly, saying how to start one.

mod support;

mod admin;
mod contracts;
mod deployment;
mod faults;
mod fleet;
mod history;
mod hostile;
mod identity;
mod ids;
mod image;
mod outages;
mod pg_node;
mod pipeline;
mod policy;
mod process;
mod properties;
mod queue_conformance;
mod rabbit_node;
mod receiver;
mod reconcile;
mod schemas;
mod secrets_in_logs;
mod store_conformance;
mod store_import;
