//! The operator commands over the state store: `breaker status|release`, `history` and
//! `identity show|accept`. They read and write the store every process shares, so what they
//! show and change holds for the whole fleet at once.

use chrono::Utc;
use clap::Subcommand;

use crate::config::Config;
use crate::identity::Binding;
use crate::ids::{TenantId, UserId, UserKey};
use crate::store::{BreakerReport, HistoryQuery, Store};

#[derive(Debug, Subcommand)]
pub enum BreakerCommand {
    /// Each scope (global, every org): trip, counts in its window and day; the held users.
    Status {
        /// Only this org (its scope, the global one, and its held users).
        #[arg(long)]
        org: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Release the trip of one org (or every trip): the deactivations held at this moment are
    /// approved and proceed within seconds; counting starts afresh.
    Release {
        #[arg(long)]
        org: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    /// Identity bindings (Graph object ↔ address) and the conflicts waiting for an operator.
    Show {
        /// An object id or an address.
        #[arg(long)]
        user: Option<String>,
    },
    /// Confirm a legitimate change: bind the object to the address of its pending conflict
    /// (or to --address), replacing whatever either was bound to, and look at it again.
    Accept {
        /// The Graph object id.
        #[arg(long)]
        user: String,
        /// The address to bind (default: the one its pending conflict names).
        #[arg(long)]
        address: Option<String>,
        /// Tenant id (default: the pending conflict's, or the first configured tenant).
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(Debug, clap::Args)]
pub struct HistoryArgs {
    /// A user: object id, UPN or Proofpoint address (default: everyone).
    #[arg(long)]
    pub user: Option<String>,
    /// How far back: a duration (`7d`, `12h`) or an RFC 3339 time.
    #[arg(long, default_value = "7d")]
    pub since: String,
    /// At most this many decisions, newest first.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    #[arg(long)]
    pub json: bool,
}

pub async fn breaker(cmd: BreakerCommand, cfg: &Config) -> anyhow::Result<()> {
    let store = crate::store::open(cfg).await?;
    let now = Utc::now();
    match cmd {
        BreakerCommand::Status { org, json } => {
            let config = crate::app::load_policy(cfg)?.breaker();
            let mut report = store.breaker_report(&config, now).await?;
            if let Some(org) = &org {
                let org = org.to_ascii_lowercase();
                report
                    .scopes
                    .retain(|s| s.scope == "global" || s.scope == org);
                report.held.retain(|h| h.org == org);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", render_breaker(&report));
            }
        }
        BreakerCommand::Release { org } => {
            let org = org.map(|o| o.to_ascii_lowercase());
            let r = store.release_breaker(org.as_deref(), now).await?;
            if r.released.is_empty() {
                println!("breaker: no trip in force{}", scope_note(org.as_deref()));
            }
            for t in &r.released {
                println!(
                    "released the trip of {} (tripped at {}: {})",
                    t.scope, t.at, t.reason
                );
            }
            println!(
                "{} held deactivation(s) approved; they proceed within seconds; counting starts afresh{}",
                r.approved.len(),
                scope_note(org.as_deref())
            );
        }
    }
    Ok(())
}

fn scope_note(org: Option<&str>) -> String {
    org.map(|o| format!(" (org {o})")).unwrap_or_default()
}

fn render_breaker(report: &BreakerReport) -> String {
    let mut out = String::new();
    for s in &report.scopes {
        match &s.trip {
            Some(t) => out.push_str(&format!(
                "{}: TRIPPED at {} ({}); {} in window, {} today\n",
                s.scope, t.at, t.reason, s.in_window, s.in_day
            )),
            None => out.push_str(&format!(
                "{}: not tripped; {} in window, {} today{}\n",
                s.scope,
                s.in_window,
                s.in_day,
                s.released_at
                    .map(|r| format!(" (released {r})"))
                    .unwrap_or_default()
            )),
        }
    }
    if report.held.is_empty() {
        out.push_str("held deactivations: none\n");
    } else {
        out.push_str(&format!("held deactivations: {}\n", report.held.len()));
        for h in &report.held {
            out.push_str(&format!(
                "  {} {} org {} held since {}{}\n",
                h.tenant_id,
                h.user_id,
                h.org,
                h.held_at,
                if h.approved_at.is_some() {
                    " (approved, proceeding)"
                } else {
                    ""
                }
            ));
        }
    }
    out
}

pub async fn history(args: HistoryArgs, cfg: &Config) -> anyhow::Result<()> {
    let since = crate::history::parse_since(&args.since, Utc::now()).map_err(anyhow::Error::msg)?;
    let store = crate::store::open(cfg).await?;
    let entries = store
        .history(&HistoryQuery {
            user: args.user,
            since: Some(since),
            limit: args.limit,
        })
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
    } else {
        print!("{}", crate::history::render(&entries));
    }
    Ok(())
}

pub async fn identity(cmd: IdentityCommand, cfg: &Config) -> anyhow::Result<()> {
    let store = crate::store::open(cfg).await?;
    match cmd {
        IdentityCommand::Show { user } => {
            let bindings = store.bindings(user.as_deref()).await?;
            println!("{} binding(s)", bindings.len());
            for b in &bindings {
                println!(
                    "  {} {:<36} {:<40} {} since {}",
                    b.tenant_id, b.object_id, b.address, b.how, b.bound_at
                );
            }
            let wanted = user.as_deref().map(str::to_ascii_lowercase);
            let conflicts: Vec<_> = store
                .conflicts()
                .await?
                .into_iter()
                .filter(|c| {
                    wanted.as_deref().is_none_or(|w| {
                        c.object_id == w || c.address == w || c.others.iter().any(|o| o == w)
                    })
                })
                .collect();
            println!("{} conflict(s) waiting for an operator", conflicts.len());
            for c in &conflicts {
                println!(
                    "  {} {} {} [{}] others {:?} seen {}: {}",
                    c.tenant_id, c.object_id, c.address, c.reason, c.others, c.seen_at, c.detail
                );
            }
        }
        IdentityCommand::Accept {
            user,
            address,
            tenant,
        } => accept(store.as_ref(), cfg, &user, address, tenant).await?,
    }
    Ok(())
}

async fn accept(
    store: &dyn Store,
    cfg: &Config,
    user: &str,
    address: Option<String>,
    tenant: Option<String>,
) -> anyhow::Result<()> {
    let object = UserId::new(user);
    anyhow::ensure!(
        object.is_object_id(),
        "--user must be the Graph object id (as `identity show` lists it)"
    );
    let pending = store
        .conflicts()
        .await?
        .into_iter()
        .find(|c| c.object_id == object);
    let tenant = match (tenant, &pending) {
        (Some(t), _) => TenantId::new(&t),
        (None, Some(c)) => c.tenant_id.clone(),
        (None, None) => cfg
            .tenants
            .first()
            .map(|t| t.id.clone())
            .ok_or_else(|| anyhow::anyhow!("no tenants configured"))?,
    };
    let Some(t) = cfg.tenant(tenant.as_str()) else {
        anyhow::bail!("tenant {tenant} is not configured");
    };
    let address = match (address, &pending) {
        (Some(a), _) => a.trim().to_ascii_lowercase(),
        (None, Some(c)) if !c.address.is_empty() => c.address.clone(),
        _ => anyhow::bail!("no pending conflict names an address for {object}: give --address"),
    };
    let domains = crate::identity::OrgDomains::new(&t.org_domain, &t.accepted_domains);
    anyhow::ensure!(
        domains.contains(&address),
        "{address} is outside the org's domains ({domains}): add the domain to `tenants[].accepted_domains` instead"
    );
    let now = Utc::now();
    store
        .bind(&Binding {
            tenant_id: tenant.to_string(),
            object_id: object.to_string(),
            address: address.clone(),
            bound_at: now,
            how: "accepted".into(),
        })
        .await?;
    let key = UserKey::new(tenant, object.clone());
    // Accepted: no longer waiting for an operator (a new conflict is recorded again).
    store.clear_conflict(&key).await?;
    store.wake(&key, now).await?;
    println!("bound {object} to {address}; the user is looked at again within seconds");
    Ok(())
}
