//! Reading what the policy needs about one user — and nothing more: group membership,
//! mailbox purpose, the leave date and the exemption list cost extra calls and permissions,
//! so each is read only when [`Needs`] asks for it. The Proofpoint address is chosen here, by
//! [`choose_address`]: the first address of the user inside the org's domains.

use chrono::{DateTime, Utc};

use crate::graph::{GraphApi, GraphError, GraphUser, Group};
use crate::identity::{IdentityConflict, OrgDomains, choose_address};
use crate::ids::UserKey;
use crate::policy::{Facts, Needs};
use crate::proofpoint::{OrgAccess, PpError, PpUser, ProofpointApi};

/// Everything read about one user for one evaluation.
#[derive(Debug, Clone)]
pub struct Gathered {
    pub user: GraphUser,
    /// The address Proofpoint knows the user by.
    pub address: String,
    pub proofpoint: PpUser,
    pub groups: Option<Vec<Group>>,
    /// `Some("")`: read, and the user has no mailbox.
    pub mailbox_purpose: Option<String>,
    /// On the sync-exemption list (`None`: not read).
    pub exempt: Option<bool>,
    /// Whether `employeeLeaveDateTime` was selected (else the policy treats it as unknown).
    pub leave_date_fetched: bool,
}

/// Why there is nothing to evaluate, or the read failed.
#[derive(Debug, thiserror::Error)]
pub enum GatherError {
    #[error("Graph answers 404: the user is deleted")]
    Deleted,
    /// No address of the user may be written for this org (none in its domains, or none).
    #[error(transparent)]
    Identity(IdentityConflict),
    #[error("Proofpoint has no user {0}")]
    UnknownToProofpoint(String),
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Proofpoint(#[from] PpError),
}

/// Read the user from Graph and Proofpoint, plus what `needs` asks for. `exemption_added`
/// forces reading the exemption list: an exemption flagrelay added must be found again even
/// when today's policy no longer mentions exemptions, or it could never be removed.
pub async fn gather(
    graph: &dyn GraphApi,
    proofpoint: &dyn ProofpointApi,
    org: &OrgAccess,
    domains: &OrgDomains,
    key: &UserKey,
    needs: &Needs,
    exemption_added: bool,
) -> Result<Gathered, GatherError> {
    let tenant_id = key.tenant.as_str();
    let user = graph
        .get_user(tenant_id, key.user.as_str(), &needs.user_select())
        .await?
        .ok_or(GatherError::Deleted)?;
    let address = choose_address(&user, domains)
        .map_err(GatherError::Identity)?
        .address;
    // The two Proofpoint reads do not depend on each other: one round trip, not two.
    let pp_user = async {
        proofpoint
            .get_user(org, &address)
            .await?
            .ok_or_else(|| GatherError::UnknownToProofpoint(address.clone()))
    };
    let exempt = async {
        Ok::<_, GatherError>(if needs.exemptions || exemption_added {
            Some(on_list(&proofpoint.exemptions(org).await?, &address))
        } else {
            None
        })
    };
    let (pp_user, exempt) = futures::try_join!(pp_user, exempt)?;
    Ok(complete(graph, tenant_id, user, address, pp_user, needs, exempt).await?)
}

/// Whether `address` is on an exemption list.
pub fn on_list(exemptions: &[String], address: &str) -> bool {
    exemptions.iter().any(|e| e.eq_ignore_ascii_case(address))
}

/// The rest of the facts for a user already read (one by one, or from bulk listings as the
/// drift sweep does): group membership and mailbox purpose, when the policy needs them.
pub async fn complete(
    graph: &dyn GraphApi,
    tenant_id: &str,
    user: GraphUser,
    address: String,
    proofpoint: PpUser,
    needs: &Needs,
    exempt: Option<bool>,
) -> Result<Gathered, GraphError> {
    // Use the id Graph returned: the caller may have named the user by UPN. Both reads are
    // independent: one round trip, not two.
    let groups = async {
        if needs.groups {
            graph.member_of(tenant_id, &user.id).await
        } else {
            Ok(None)
        }
    };
    // No mailbox (404) is a fact of its own: "" (see `Facts::with_mailbox_purpose`).
    let mailbox_purpose = async {
        Ok(if needs.mailbox_purpose {
            Some(
                graph
                    .mailbox_purpose(tenant_id, &user.id)
                    .await?
                    .unwrap_or_default(),
            )
        } else {
            None
        })
    };
    let (groups, mailbox_purpose) = futures::try_join!(groups, mailbox_purpose)?;
    Ok(Gathered {
        user,
        address,
        proofpoint,
        groups,
        mailbox_purpose,
        exempt,
        leave_date_fetched: needs.leave_date,
    })
}

impl Gathered {
    /// The policy's view of what was read.
    pub fn facts(&self, disabled_since: Option<DateTime<Utc>>) -> Facts<'_> {
        let mut facts = Facts::new(&self.user, &self.proofpoint);
        if let Some(g) = self.groups.as_deref() {
            facts = facts.with_groups(g);
        }
        if let Some(p) = self.mailbox_purpose.as_deref() {
            facts = facts.with_mailbox_purpose(p);
        }
        if self.leave_date_fetched {
            facts = facts.with_leave_date_fetched();
        }
        if let Some(e) = self.exempt {
            facts = facts.with_exemption(e);
        }
        if let Some(since) = disabled_since {
            facts = facts.with_disabled_since(since);
        }
        facts
    }
}
