//! Faithful simulators of Microsoft Graph ([`graph`]) and Proofpoint Essentials
//! ([`proofpoint`]): documented behaviour, auth, errors, throttling and delivery quirks.
//! Tests, `flagrelay demo` and staging setups (`flagrelay sim`) use them; nothing in the
//! production path depends on them.

pub mod graph;
pub mod proofpoint;
pub mod sandbox;

use crate::cli::SimArgs;
use crate::graph::GraphUser;
use crate::proofpoint::PpUser;

/// `flagrelay sim`: both simulators, seeded, until Ctrl-C / SIGTERM.
pub async fn run_standalone(args: SimArgs) -> anyhow::Result<()> {
    let graph = graph::GraphSim::new();
    graph.add_app(&args.client_id, &args.client_secret);
    graph
        .set_app_permissions(&args.client_id, sandbox::ALL_PERMISSIONS)
        .map_err(|e| anyhow::anyhow!("granting the simulated app its permissions: {e}"))?;
    graph.add_tenant(&args.tenant);
    let pp = proofpoint::ProofpointSim::new();
    pp.add_org(&args.org);
    pp.add_admin(&args.proofpoint_user, &args.proofpoint_password, None);
    for i in 1..=args.users {
        let address = format!("user{i}@{}", args.org);
        let seeded = pp.upsert_user(
            &args.org,
            PpUser {
                primary_email: address.clone(),
                user_type: Some("end_user".into()),
                is_active: true,
                other: serde_json::Map::new(),
            },
        );
        seeded.map_err(|e| anyhow::anyhow!("seeding {address}: {e}"))?;
        let created = graph.upsert_user(
            &args.tenant,
            GraphUser {
                id: format!("00000000-0000-0000-0000-{i:012}"),
                account_enabled: Some(true),
                user_principal_name: Some(address.clone()),
                mail: Some(address),
                user_type: Some("Member".into()),
                ..GraphUser::default()
            },
        );
        created.map_err(|e| anyhow::anyhow!("seeding the Graph simulator: {e}"))?;
    }
    let g = graph
        .spawn(tokio::net::TcpListener::bind(args.graph_listen).await?)
        .await?;
    let p = pp
        .spawn(tokio::net::TcpListener::bind(args.proofpoint_listen).await?)
        .await;
    println!(
        "Graph simulator:       authority_url = {}  api_url = {}",
        g.authority_url(),
        g.api_url()
    );
    println!(
        "                       tenant {}  client_id {}  (secret as given)",
        args.tenant, args.client_id
    );
    println!(
        "                       control API: {}_sim/...",
        g.authority_url()
    );
    println!("Proofpoint simulator:  base_url = {}", p.url());
    println!(
        "                       org {}  admin {}  (password as given)",
        args.org, args.proofpoint_user
    );
    println!("Seeded {} users. Ctrl-C to stop.", args.users);
    crate::shutdown::on_signals().cancelled().await;
    Ok(())
}
