//! `flagrelay policy check` and `flagrelay policy explain`: validate a policy file, and show
//! for one user every rule tried, why it matched or not, the decision, and the exact writes
//! the worker would make (the same [`Plan`] the worker carries out).

use std::path::Path;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::config::Config;
use crate::evaluation::decide;
use crate::evaluation::gather::{Gathered, gather};
use crate::graph::client::GraphClient;
use crate::graph::{GraphApi, GraphUser, Group};
use crate::identity::OrgDomains;
use crate::ids::UserKey;
use crate::policy::{Facts, Policy, RulePolicy};
use crate::proofpoint::PpUser;
use crate::proofpoint::client::ProofpointClient;
use crate::store::UserState;

/// `policy check`: parse and compile the file; print what it needs.
pub fn check(path: &Path) -> anyhow::Result<String> {
    let policy = RulePolicy::load(path)?;
    let needs = policy.needs();
    let mut out = format!(
        "{}: valid, {} rules:",
        path.display(),
        policy.rule_names().count()
    );
    for name in policy.rule_names() {
        out.push_str(&format!("\n  - {name}"));
    }
    let perms = needs.graph_permissions();
    out.push_str(&format!(
        "\nGraph application permissions needed: User.Read.All{}",
        perms.iter().map(|p| format!(", {p}")).collect::<String>()
    ));
    if needs.exemptions {
        out.push_str(
            "\nReads Proofpoint's sync-exemption list (keep_mail_flowing / proofpoint_exempt).",
        );
    }
    let b = policy.breaker();
    out.push_str(&format!(
        "\nBreaker: at most {} deactivations or {:.0} % of the org within {}.",
        b.max_deactivations,
        b.max_share * 100.0,
        humantime::format_duration(b.window)
    ));
    Ok(out)
}

/// The offline input of `policy explain --user-json`: a Graph user and, optionally, what
/// else the worker would have read.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfflineUser {
    pub user: GraphUser,
    pub proofpoint: PpUser,
    #[serde(default)]
    pub groups: Option<Vec<Group>>,
    #[serde(default)]
    pub mailbox_purpose: Option<String>,
    #[serde(default)]
    pub exempt: Option<bool>,
    #[serde(default)]
    pub exemption_added_by_flagrelay: bool,
    #[serde(default)]
    pub disabled_since: Option<DateTime<Utc>>,
}

/// Decide for an offline user and render the explanation.
pub fn explain_offline(policy: &dyn Policy, input: OfflineUser, now: DateTime<Utc>) -> String {
    let added_by_us = input.exemption_added_by_flagrelay;
    let disabled_since = input.disabled_since;
    let g = Gathered {
        address: input.proofpoint.primary_email.clone(),
        user: input.user,
        proofpoint: input.proofpoint,
        groups: input.groups,
        mailbox_purpose: input.mailbox_purpose,
        exempt: input.exempt,
        leave_date_fetched: policy.needs().leave_date,
    };
    let state = UserState {
        disabled_since,
        exemption_added: added_by_us,
        recheck_at: None,
    };
    render(policy, &g, &state, now, &[])
}

/// The explanation of what the worker would decide and write: the same [`decide`].
fn render(
    policy: &dyn Policy,
    g: &Gathered,
    state: &UserState,
    now: DateTime<Utc>,
    notes: &[String],
) -> String {
    let eval = decide(policy, g, state, now);
    let (decision, plan) = (&eval.decision, eval.plan);
    let facts: Facts<'_> = g.facts(eval.state.disabled_since);
    let mut out = String::new();
    for note in notes {
        out.push_str(&format!("note: {note}\n"));
    }
    out.push_str(&decision.render_explanation());
    let address = &g.address;
    out.push_str("\nwrites:\n");
    if plan.is_empty() {
        out.push_str("  none (Proofpoint already matches the decision)\n");
    }
    if let Some(active) = plan.set_active {
        out.push_str(&format!(
            "  PUT /orgs/{{domain}}/users/{address}   the whole user object as read, with is_active: {} → {active}\n",
            facts.proofpoint.is_active
        ));
    }
    if plan.add_exemption {
        out.push_str(&format!("  PUT /orgs/{{domain}}/settings/azure/exemptions   add {address} (recorded as added by flagrelay)\n"));
    }
    if plan.remove_exemption {
        out.push_str(&format!("  DELETE /orgs/{{domain}}/settings/azure/exemptions/{address}   (flagrelay had added it)\n"));
    }
    if !plan.is_empty() {
        out.push_str("  (writes pass the identity check first: the address must be bound to this Graph object)\n");
    }
    if plan.deactivates() {
        out.push_str("  (deactivations pass the blast-radius breaker first)\n");
    }
    if let Some(at) = decision.recheck_at {
        out.push_str(&format!("recheck scheduled for {at}\n"));
    }
    out
}

/// `policy explain --user`: read the live user (Graph) and Proofpoint state, then explain.
pub async fn explain_live(
    config: &Config,
    policy: &dyn Policy,
    user: &str,
    tenant: Option<&str>,
) -> anyhow::Result<String> {
    let tenant = match tenant {
        Some(t) => config
            .tenant(t)
            .with_context(|| format!("tenant {t} is not in the configuration"))?,
        None => config.tenants.first().context("no tenants configured")?,
    };
    let graph = GraphClient::new(&config.graph)?;
    let pp = ProofpointClient::from_config(&config.proofpoint)?;
    let org = config.org_access(tenant);
    let needs = policy.needs();
    let mut notes = Vec::new();
    match graph.granted_permissions(&tenant.id).await {
        Ok(Some(granted)) => {
            for p in ["User.Read.All"]
                .iter()
                .chain(needs.graph_permissions().iter())
            {
                if !granted.iter().any(|g| g == p) {
                    notes.push(format!("the Entra app lacks {p}, which this policy needs: facts that need it are unknown"));
                }
            }
        }
        Ok(None) => notes.push("could not read the app's permissions from its token".into()),
        Err(e) => anyhow::bail!("cannot get a Graph token for tenant {}: {e}", tenant.id),
    }
    // The worker's state: when sign-in was first seen blocked, exemptions it added.
    let store = crate::store::open(config).await?;
    let domains = OrgDomains::new(&tenant.org_domain, &tenant.accepted_domains);
    let named = UserKey::new(tenant.id.clone(), user.into());
    let probe = gather(&graph, &pp, &org, &domains, &named, &needs, false).await;
    let state = match &probe {
        Ok(g) => {
            let key = UserKey::new(tenant.id.clone(), g.user.id.as_str().into());
            store.user(&key).await?.state
        }
        Err(_) => UserState::default(),
    };
    let g = match probe {
        Ok(g) if state.exemption_added && g.exempt.is_none() => {
            let key = UserKey::new(tenant.id.clone(), g.user.id.as_str().into());
            gather(&graph, &pp, &org, &domains, &key, &needs, true).await
        }
        other => other,
    }
    .map_err(|e| {
        let notes: String = notes.iter().map(|n| format!("\nnote: {n}")).collect();
        anyhow::anyhow!("{e}{notes}")
    })?;
    Ok(render(policy, &g, &state, Utc::now(), &notes))
}
