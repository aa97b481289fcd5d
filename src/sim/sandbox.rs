//! A sandbox: both simulators running, one tenant mapped to one org, and a validated
//! [`Config`] pointing flagrelay at them. Shared by `flagrelay demo` and the integration tests
//! so that both exercise the same set-up a staging user would.

use chrono::Utc;
use rand::Rng;
use secrecy::{ExposeSecret, SecretString};
use tokio::net::TcpListener;

use super::graph::{GraphSim, SimServer as GraphSimServer};
use super::proofpoint::{ProofpointSim, SimServer as ProofpointSimServer};
use crate::config::{Config, TenantConfig};
use crate::graph::{GraphApi, GraphError, GraphUser, NewSubscription, Subscription};
use crate::proofpoint::PpUser;

const CLIENT_ID: &str = "flagrelay-sandbox-app";
const PP_ADMIN: &str = "admin";
/// Mirror `accountEnabled`, with the blast-radius breaker opened wide: for tests and benchmarks
/// that deactivate most of an org on purpose (the breaker has tests of its own).
pub const MIRROR_OPEN_BREAKER: &str = r#"
[breaker]
max_deactivations = 10000000
max_share = 1.0
window = "1h"

[breaker.global]
max_deactivations = 10000000

[[rule]]
name = "enabled"
when = { account_enabled = true }
action = "activate"

[[rule]]
name = "default"
action = "deactivate"
"#;

/// The application permissions flagrelay can use (README, "Entra app registration").
pub const ALL_PERMISSIONS: &[&str] = &[
    "User.Read.All",
    "GroupMember.Read.All",
    "MailboxSettings.Read",
    "User-LifeCycleInfo.Read.All",
];

/// Both simulators plus a configuration that points at them.
#[derive(Debug)]
pub struct Sandbox {
    pub graph: GraphSim,
    pub proofpoint: ProofpointSim,
    pub tenant_id: String,
    pub org: String,
    /// Validated; `amqp.url` unset (choose the queue yourself); `worker.state_dir` is a
    /// fresh directory removed with the sandbox.
    pub config: Config,
    /// Scratch directory (state, policy files), removed on drop.
    pub dir: std::path::PathBuf,
    _graph_server: GraphSimServer,
    _pp_server: ProofpointSimServer,
}

/// A user present in both simulators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeededUser {
    pub id: String,
    pub address: String,
    pub tenant_id: String,
    pub org: String,
}

impl Sandbox {
    /// Start both simulators on ephemeral ports with fresh random credentials.
    pub async fn start(tenant_id: &str, org: &str) -> anyhow::Result<Self> {
        let client_secret = random_secret();
        let pp_password = random_secret();
        let graph = GraphSim::new();
        graph.add_app(CLIENT_ID, &client_secret);
        // Everything the shipped policy can use, as an admin would grant it.
        graph.set_app_permissions(CLIENT_ID, ALL_PERMISSIONS)?;
        graph.add_tenant(tenant_id);
        let graph_server = graph.spawn(TcpListener::bind("127.0.0.1:0").await?).await?;
        let proofpoint = ProofpointSim::new();
        proofpoint.add_org(org);
        let admin = format!("{PP_ADMIN}@{org}");
        proofpoint.add_admin(&admin, &pp_password, None);
        let pp_server = proofpoint
            .spawn(TcpListener::bind("127.0.0.1:0").await?)
            .await;

        let mut config = Config::default();
        config.graph.authority_url = graph_server.authority_url();
        config.graph.api_url = graph_server.api_url();
        config.graph.client_id = CLIENT_ID.into();
        config.graph.client_secret = Some(SecretString::from(client_secret));
        config.graph.client_state = Some(SecretString::from(random_secret()));
        config.proofpoint.base_url = pp_server.url().clone();
        config.proofpoint.username = admin;
        config.proofpoint.password = Some(SecretString::from(pp_password));
        config.proofpoint.requests_per_second = 500;
        config.signing.key = Some(SecretString::from(random_secret()));
        config.tenants = vec![TenantConfig {
            id: tenant_id.into(),
            org_domain: org.into(),
            ..TenantConfig::default()
        }];
        let dir = std::env::temp_dir().join(format!(
            "flagrelay-sandbox-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir)?;
        config.worker.state_dir = dir.join("state");
        // Any free port: sandboxes run side by side (tests, the demo).
        config.admin.listen = Some(([127, 0, 0, 1], 0).into());
        config.validate()?;
        Ok(Self {
            graph,
            proofpoint,
            tenant_id: tenant_id.into(),
            org: org.into(),
            config,
            dir,
            _graph_server: graph_server,
            _pp_server: pp_server,
        })
    }

    /// Create `name@org` in Proofpoint (active, of `pp_type`) and then in Graph (with the
    /// given sign-in state). A stable id is derived from the name.
    pub fn seed_user(&self, name: &str, account_enabled: bool, pp_type: &str) -> SeededUser {
        self.seed_user_in(&self.tenant_id, &self.org, name, account_enabled, pp_type)
    }

    /// Another tenant mapped to another org (an MSP's second customer), in both simulators
    /// and the configuration; the partner admin reaches it too.
    pub fn add_tenant(&mut self, tenant_id: &str, org: &str) -> anyhow::Result<()> {
        self.graph.add_tenant(tenant_id);
        self.proofpoint.add_org(org);
        self.config.tenants.push(TenantConfig {
            id: tenant_id.into(),
            org_domain: org.into(),
            ..TenantConfig::default()
        });
        self.config.validate()?;
        Ok(())
    }

    /// [`Sandbox::seed_user`] in a tenant added with [`Sandbox::add_tenant`].
    pub fn seed_user_in(
        &self,
        tenant_id: &str,
        org: &str,
        name: &str,
        account_enabled: bool,
        pp_type: &str,
    ) -> SeededUser {
        let address = format!("{name}@{org}");
        let id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, address.as_bytes()).to_string();
        let seeded = self.proofpoint.upsert_user(org, PpUser {
            primary_email: address.clone(),
            user_type: Some(pp_type.into()),
            is_active: true,
            other: serde_json::json!({"firstname": name, "surname": "Sandbox", "alias_emails": [], "odin_settings": {"kept": true}})
                .as_object()
                .cloned()
                .unwrap_or_default(),
        });
        seeded.expect("the sandbox org exists and the user is well-formed");
        let created = self.graph.upsert_user(
            tenant_id,
            GraphUser {
                id: id.clone(),
                account_enabled: Some(account_enabled),
                user_principal_name: Some(address.clone()),
                mail: Some(address.clone()),
                proxy_addresses: Some(vec![format!("SMTP:{address}")]),
                user_type: Some("Member".into()),
                ..GraphUser::default()
            },
        );
        created.expect("the sandbox tenant exists");
        SeededUser {
            id,
            address,
            tenant_id: tenant_id.into(),
            org: org.into(),
        }
    }

    /// An active `end_user` with `address` in `org`'s Proofpoint only (Graph untouched).
    pub fn add_proofpoint_user(&self, org: &str, address: &str) {
        self.proofpoint
            .upsert_user(
                org,
                PpUser {
                    primary_email: address.to_owned(),
                    user_type: Some("end_user".into()),
                    is_active: true,
                    other: Default::default(),
                },
            )
            .expect("the org exists and the user is well-formed");
    }

    /// Mark a seeded user as a leaver (leave date in the past).
    pub fn make_leaver(&self, user: &SeededUser, days_ago: i64) {
        self.graph
            .update_user(&user.tenant_id, &user.id, |u| {
                u.employee_leave_date_time = Some(Utc::now() - chrono::Duration::days(days_ago));
            })
            .expect("the user was seeded");
    }

    /// Block (`false`) or allow (`true`) sign-in for a seeded user in Graph; subscribers are
    /// notified as Graph would.
    pub fn set_enabled(&self, user: &SeededUser, enabled: bool) {
        self.graph
            .set_account_enabled(&user.tenant_id, &user.id, enabled)
            .expect("the user was seeded");
    }

    /// Write `toml` as the sandbox's policy file and point the configuration at it.
    pub fn use_policy(&mut self, toml: &str) -> std::io::Result<()> {
        let path = self.dir.join("policy.toml");
        std::fs::write(&path, toml)?;
        self.config.policy.file = Some(path);
        Ok(())
    }

    /// Whether Proofpoint has the user with `is_active == active` right now.
    pub fn is_active(&self, user: &SeededUser) -> Option<bool> {
        self.proofpoint
            .user(&user.org, &user.address)
            .map(|u| u.is_active)
    }

    /// Subscribe the receiver at `receiver_url` to every configured tenant's users, through
    /// the simulated validation handshake.
    pub async fn subscribe(
        &self,
        graph: &dyn GraphApi,
        receiver_url: &str,
    ) -> Result<Vec<Subscription>, GraphError> {
        let mut subs = Vec::new();
        for tenant in &self.config.tenants {
            let sub = NewSubscription {
                change_type: "updated,deleted".into(),
                notification_url: format!("{receiver_url}/graph/notifications"),
                lifecycle_notification_url: Some(format!("{receiver_url}/graph/lifecycle")),
                resource: "users".into(),
                expiration_date_time: Utc::now() + chrono::Duration::minutes(41_000),
                client_state: self.config.graph.client_state().expose_secret().to_owned(),
            };
            subs.push(graph.create_subscription(&tenant.id, &sub).await?);
        }
        Ok(subs)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn random_secret() -> String {
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(40)
        .map(char::from)
        .collect()
}
