//! Who holds an address: `GET /users?$filter=...` for [`GraphApi::users_with_address`].
//!
//! The filter ORs four equality clauses on the address:
//! `mail eq '…' or userPrincipalName eq '…' or proxyAddresses/any(p:p eq 'smtp:…') or
//! proxyAddresses/any(p:p eq 'SMTP:…')`. Graph documents `eq` on `mail`,
//! `userPrincipalName` and `proxyAddresses` (with `any`) as supported *by default*, and
//! `or` across properties without advanced query parameters; its string comparisons are
//! case-insensitive in practice, but since that is not documented for the proxy prefix
//! both spellings are asked for.
//!
//! No `ConsistencyLevel: eventual` / `$count=true`: the filter does not need them, and
//! Graph documents that a default query sent with them is answered from the eventually
//! consistent index. A security check wants the freshest answer it can get.
//!
//! [`GraphApi::users_with_address`]: crate::graph::GraphApi::users_with_address

use super::GraphClient;
use crate::graph::{ADDRESS_HOLDER_SELECT, GraphError, GraphUser};

/// `$top`: Graph's largest users page; holders of one address fit on one page.
const PAGE_SIZE: usize = 999;

impl GraphClient {
    /// [`crate::graph::GraphApi::users_with_address`]: every page, same-origin nextLinks
    /// only, statuses mapped and the tenant's `Retry-After` honoured by `get_pages`.
    pub(super) async fn holders_of(
        &self,
        tenant_id: &str,
        address: &str,
    ) -> Result<Vec<GraphUser>, GraphError> {
        let address = address.trim();
        if address.is_empty() {
            return Err(GraphError::Rejected {
                status: 400,
                body: "refused locally: an empty address matches nothing".into(),
            });
        }
        let mut url = Self::url_with(&self.api_url, &["users"]);
        url.set_query(Some(&format!(
            "$filter={}&{}&$top={PAGE_SIZE}",
            query_value(&address_filter(address)),
            Self::select_query(ADDRESS_HOLDER_SELECT),
        )));
        self.get_pages(tenant_id, "users_with_address", url, &[])
            .await
    }
}

/// The `$filter` expression matching every user holding `address`.
pub(super) fn address_filter(address: &str) -> String {
    let plain = odata_string(address);
    let secondary = odata_string(&format!("smtp:{address}"));
    let primary = odata_string(&format!("SMTP:{address}"));
    format!(
        "mail eq {plain} or userPrincipalName eq {plain} \
         or proxyAddresses/any(p:p eq {secondary}) or proxyAddresses/any(p:p eq {primary})"
    )
}

/// An OData string literal: single-quoted, a quote inside doubled (`o'brien` → `'o''brien'`).
fn odata_string(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// A query value percent-encoded like `$select`'s names, but with spaces as `%20` rather
/// than `+` (which Graph documents URLs with; a literal `+` stays `%2B`).
fn query_value(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

#[cfg(test)]
mod tests;
