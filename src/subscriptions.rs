//! The subscription manager: one `users` subscription per tenant, pointed at this
//! deployment's public URL, with the configured clientState; adopted when it already exists,
//! created when it is gone, renewed well before it expires. Run by the leader, and by
//! operators through `flagrelay subscriptions ...`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::graph::{GraphApi, GraphError, NewSubscription, Subscription};
use crate::telemetry::Metrics;

/// Graph's maximum lifetime for user subscriptions, less a margin for clock differences.
pub const MAX_LIFETIME: chrono::Duration = chrono::Duration::minutes(41_760 - 60);

/// What `ensure` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ensured {
    /// Ours already, and not due for renewal.
    Adopted,
    Renewed,
    Created,
}

/// Ensures subscriptions for every configured tenant.
#[derive(Debug, Clone)]
pub struct SubscriptionManager<'a> {
    pub graph: &'a dyn GraphApi,
    pub config: &'a Config,
    /// Renew when less than this is left.
    pub renew_before: Duration,
}

impl SubscriptionManager<'_> {
    fn notification_url(&self) -> Option<String> {
        let base = self.config.receiver.public_url.as_ref()?;
        Some(format!(
            "{}/graph/notifications",
            base.as_str().trim_end_matches('/')
        ))
    }

    fn lifecycle_url(&self) -> Option<String> {
        let base = self.config.receiver.public_url.as_ref()?;
        Some(format!(
            "{}/graph/lifecycle",
            base.as_str().trim_end_matches('/')
        ))
    }

    /// This deployment's subscription in `tenant`, if Graph lists one.
    pub async fn find(&self, tenant: &str) -> Result<Option<Subscription>, GraphError> {
        let Some(url) = self.notification_url() else {
            return Ok(None);
        };
        let subs = self.graph.list_subscriptions(tenant).await?;
        Ok(subs
            .into_iter()
            .find(|s| s.resource.eq_ignore_ascii_case("users") && s.notification_url == url))
    }

    /// Adopt, renew or create the tenant's subscription. Needs `receiver.public_url`.
    pub async fn ensure(
        &self,
        tenant: &str,
        now: DateTime<Utc>,
    ) -> Result<(Ensured, Subscription), GraphError> {
        let (Some(notification_url), lifecycle) = (self.notification_url(), self.lifecycle_url())
        else {
            return Err(GraphError::Rejected {
                status: 0,
                body: "receiver.public_url is not configured".into(),
            });
        };
        let renew_margin =
            chrono::Duration::from_std(self.renew_before).unwrap_or(chrono::Duration::days(3));
        if let Some(sub) = self.find(tenant).await? {
            if sub.expiration_date_time - now > renew_margin {
                return Ok((Ensured::Adopted, sub));
            }
            match self
                .graph
                .renew_subscription(tenant, &sub.id, now + MAX_LIFETIME)
                .await
            {
                Ok(renewed) => return Ok((Ensured::Renewed, renewed)),
                // Gone meanwhile (expired and removed): create it again below.
                Err(GraphError::Rejected { status: 404, .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let new = NewSubscription {
            change_type: "updated,deleted".into(),
            notification_url,
            lifecycle_notification_url: lifecycle,
            resource: "users".into(),
            expiration_date_time: now + MAX_LIFETIME,
            client_state: self.config.graph.client_state().expose_secret().to_owned(),
        };
        match self.graph.create_subscription(tenant, &new).await {
            Ok(sub) => Ok((Ensured::Created, sub)),
            // Created by another replica (or by hand) in between: adopt it.
            Err(GraphError::Rejected { status: 409, .. }) => match self.find(tenant).await? {
                Some(sub) => Ok((Ensured::Adopted, sub)),
                None => Err(GraphError::Rejected {
                    status: 409,
                    body: "Graph reports a conflicting subscription that it does not list".into(),
                }),
            },
            Err(e) => Err(e),
        }
    }

    /// Ensure every tenant's subscription every `every` while leading, until `shutdown`;
    /// results are recorded in `metrics` (seconds to expiry, status page).
    pub async fn run(
        &self,
        every: Duration,
        mut leader: watch::Receiver<bool>,
        metrics: &Metrics,
        shutdown: CancellationToken,
    ) {
        if self.notification_url().is_none() {
            tracing::warn!(
                "receiver.public_url is not set: subscriptions are not managed automatically"
            );
            return;
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = leader.wait_for(|l| *l) => if changed.is_err() { return },
            }
            for tenant in &self.config.tenants {
                match self.ensure(&tenant.id, Utc::now()).await {
                    Ok((how, sub)) => {
                        metrics.subscription_ensured(&tenant.id, &sub.id, sub.expiration_date_time);
                        tracing::info!(tenant_id = %tenant.id, subscription_id = %sub.id, expires = %sub.expiration_date_time, action = ?how, "subscription ensured")
                    }
                    Err(e) => {
                        metrics.subscription_failed(&tenant.id, &e.to_string());
                        tracing::error!(tenant_id = %tenant.id, error = %e, "could not ensure the Graph subscription; notifications may stop (the delta backstop still runs)")
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}
