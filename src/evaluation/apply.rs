//! Carrying out a [`Plan`](super::Plan): the IO step. Before the first write the address must
//! be bound to this Graph object (identity check); before a deactivation the shared breaker
//! must allow it. Writes follow the manual fix admins apply today: activate first, then
//! exempt from sync; exemptions are removed only when flagrelay added them. The user's state
//! is saved last, except that "flagrelay added an exemption" is saved *before* the add, so a
//! crash in between can never turn flagrelay's exemption into one it would not remove.

use chrono::{DateTime, Utc};

use super::Evaluation;
use super::gather::Gathered;
use crate::graph::{GraphApi, GraphError};
use crate::identity::{Binding, BindingCheck, IdentityConflict, check_binding, check_holders};
use crate::ids::UserKey;
use crate::policy::breaker::{BreakerConfig, Trip};
use crate::proofpoint::{OrgAccess, PpError, ProofpointApi};
use crate::store::{BreakerAnswer, Deactivation, Store, StoreError};

/// What carrying out a plan talks to.
#[derive(Debug, Clone, Copy)]
pub struct Effects<'a> {
    pub graph: &'a dyn GraphApi,
    pub proofpoint: &'a dyn ProofpointApi,
    pub store: &'a dyn Store,
    pub org: &'a OrgAccess,
    pub breaker: &'a BreakerConfig,
    /// Decide, check and report; write nothing to Proofpoint, count nothing in the shared
    /// breaker, record no binding.
    pub dry_run: bool,
}

/// How carrying out the plan ended (the state is saved in every case).
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// Every write of the plan was made (none for an empty plan), one line each.
    Written { writes: Vec<String> },
    /// The breaker holds the deactivation (nothing written). `newly`: this one tripped it.
    Held { trip: Trip, newly: bool },
    /// The address is not this object's to write (nothing written).
    Refused { conflict: IdentityConflict },
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("proofpoint: {0}")]
    Proofpoint(#[from] PpError),
    #[error("graph: {0}")]
    Graph(#[from] GraphError),
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The directory could not confirm who holds the address yet: try again later.
    #[error("identity: {0}")]
    Unconfirmed(IdentityConflict),
}

/// Carry out `eval.plan` for the user `g` (keyed `key`). `total_users`: the org's size, the
/// breaker's share denominator (only read for a deactivation).
pub async fn apply(
    fx: &Effects<'_>,
    key: &UserKey,
    g: &Gathered,
    eval: &Evaluation,
    total_users: usize,
    now: DateTime<Utc>,
) -> Result<Applied, ApplyError> {
    let plan = &eval.plan;
    let mut state = eval.state.clone();
    let save = |state| async move {
        if state != eval.previous {
            fx.store.put_user(key, &state, now).await?;
        }
        Ok::<_, ApplyError>(())
    };
    if !plan.is_empty()
        && let Some(conflict) = check_identity(fx, key, &g.address, now).await?
    {
        save(state).await?;
        return Ok(Applied::Refused { conflict });
    }
    if plan.deactivates() && !fx.dry_run {
        let ask = Deactivation {
            key,
            org: &fx.org.domain,
            total_users,
            config: fx.breaker,
            now,
        };
        if let BreakerAnswer::Held { trip, newly } = fx.store.attempt_deactivation(&ask).await? {
            save(state).await?;
            return Ok(Applied::Held { trip, newly });
        }
    }
    let writes = plan.describe(g.proofpoint.is_active);
    if fx.dry_run {
        save(state).await?;
        return Ok(Applied::Written { writes });
    }
    if let Some(desired) = plan.set_active {
        // Read-modify-write of the whole object: unknown fields go back as read.
        let mut updated = g.proofpoint.clone();
        updated.is_active = desired;
        fx.proofpoint.put_user(fx.org, &updated).await?;
    }
    if plan.add_exemption {
        state.exemption_added = true;
        fx.store.put_user(key, &state, now).await?;
        fx.proofpoint.add_exemption(fx.org, &g.address).await?;
    } else if plan.remove_exemption {
        fx.proofpoint.remove_exemption(fx.org, &g.address).await?;
        state.exemption_added = false;
    }
    save(state).await?;
    Ok(Applied::Written { writes })
}

/// `None` when `address` is bound to this object (binding it now if neither side is bound
/// and the directory confirms this object alone holds it), else the conflict.
async fn check_identity(
    fx: &Effects<'_>,
    key: &UserKey,
    address: &str,
    now: DateTime<Utc>,
) -> Result<Option<IdentityConflict>, ApplyError> {
    let by_object = fx.store.binding_of_object(&key.tenant, &key.user).await?;
    let by_address = fx.store.binding_of_address(&key.tenant, address).await?;
    match check_binding(
        key.user.as_str(),
        address,
        by_object.as_ref(),
        by_address.as_ref(),
    ) {
        BindingCheck::Bound => Ok(None),
        BindingCheck::Conflict(c) => Ok(Some(c)),
        BindingCheck::New => {
            let holders = fx
                .graph
                .users_with_address(key.tenant.as_str(), address)
                .await?;
            match check_holders(key.user.as_str(), address, &holders) {
                Ok(()) => {
                    if !fx.dry_run {
                        let binding = Binding {
                            tenant_id: key.tenant.to_string(),
                            object_id: key.user.to_string(),
                            address: address.to_owned(),
                            bound_at: now,
                            how: "first_seen".into(),
                        };
                        fx.store.bind(&binding).await?;
                    }
                    Ok(None)
                }
                Err(c) if c.is_transient() => Err(ApplyError::Unconfirmed(c)),
                Err(c) => Ok(Some(c)),
            }
        }
    }
}
