//! Paged Graph answers as data: OData collection pages, users delta pages, and the rule
//! that a link Graph hands back may only be followed on the configured API origin. No IO:
//! [`super::client::GraphClient`] does the requests.

use serde::Deserialize;
use serde_json::Value;
use url::Url;

use super::{DeltaNext, DeltaPage, GraphError, GraphUser, RemovedUser};

/// One page of an OData collection.
#[derive(Deserialize)]
pub(super) struct Page<T> {
    #[serde(default = "Vec::new")]
    pub value: Vec<T>,
    #[serde(rename = "@odata.nextLink")]
    pub next_link: Option<String>,
}

/// One page of `GET /users/delta`, before its items are told apart.
#[derive(Deserialize)]
pub(super) struct DeltaWire {
    #[serde(default = "Vec::new")]
    value: Vec<Value>,
    #[serde(rename = "@odata.nextLink")]
    next_link: Option<String>,
    #[serde(rename = "@odata.deltaLink")]
    delta_link: Option<String>,
}

/// A link Graph handed back (`@odata.nextLink`, `@odata.deltaLink`), refused unless it
/// points at the configured API origin: the bearer token must never be sent anywhere else.
pub(super) fn same_origin(api_url: &Url, link: &str) -> Result<Url, GraphError> {
    let url = Url::parse(link).map_err(|_| GraphError::Rejected {
        status: 200,
        body: format!("unparseable link {link:?}"),
    })?;
    if url.origin() != api_url.origin() {
        return Err(GraphError::Rejected {
            status: 200,
            body: format!("link {link:?} leaves the Graph API origin"),
        });
    }
    Ok(url)
}

/// Split a delta page into users and `@removed` items. A page with neither link cannot be
/// continued and is [`GraphError::Rejected`]; with both (never seen), more pages win.
pub(super) fn delta_page(wire: DeltaWire) -> Result<DeltaPage, GraphError> {
    let unexpected = |what: String| GraphError::Rejected {
        status: 200,
        body: format!("unexpected delta answer: {what}"),
    };
    let next = match (wire.next_link, wire.delta_link) {
        (Some(link), _) => DeltaNext::NextLink(link),
        (None, Some(link)) => DeltaNext::DeltaLink(link),
        (None, None) => return Err(unexpected("no @odata.nextLink or @odata.deltaLink".into())),
    };
    let mut users = Vec::new();
    let mut removed = Vec::new();
    for item in wire.value {
        match item.get("@removed") {
            Some(marker) => {
                let id = item.get("id").and_then(Value::as_str);
                let id = id.ok_or_else(|| unexpected("@removed item without an id".into()))?;
                // Graph always sends a reason; without one, only "gone" is known, which
                // reads safest as a hard delete.
                let reason = marker.get("reason").and_then(Value::as_str);
                removed.push(RemovedUser {
                    id: id.to_owned(),
                    reason: reason.unwrap_or("deleted").to_owned(),
                });
            }
            None => users.push(
                serde_json::from_value::<GraphUser>(item)
                    .map_err(|e| unexpected(format!("user item ({e})")))?,
            ),
        }
    }
    Ok(DeltaPage {
        users,
        removed,
        next,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(v: Value) -> Result<DeltaPage, GraphError> {
        delta_page(serde_json::from_value(v).unwrap())
    }

    #[test]
    fn delta_items_split_into_users_and_removed() {
        let page = parse(json!({
            "@odata.context": "x",
            "value": [
                {"id": "a", "accountEnabled": true, "unknownProperty": 1},
                {"id": "b", "@removed": {"reason": "changed"}},
                {"id": "c", "@removed": {"reason": "deleted"}},
                {"id": "d", "@removed": {}},
            ],
            "@odata.deltaLink": "https://graph.microsoft.com/v1.0/users/delta?$deltatoken=t",
        }))
        .unwrap();
        assert_eq!(page.users.len(), 1);
        assert_eq!(page.users[0].account_enabled, Some(true));
        let reasons: Vec<_> = page
            .removed
            .iter()
            .map(|r| (r.id.as_str(), r.reason.as_str(), r.is_soft_delete()))
            .collect();
        assert_eq!(
            reasons,
            [
                ("b", "changed", true),
                ("c", "deleted", false),
                ("d", "deleted", false)
            ]
        );
        assert_eq!(
            page.delta_link(),
            Some("https://graph.microsoft.com/v1.0/users/delta?$deltatoken=t")
        );
    }

    #[test]
    fn delta_pages_need_a_link_and_removed_items_an_id() {
        assert!(parse(json!({"value": []})).is_err());
        assert!(parse(json!({"value": [{"@removed": {}}], "@odata.nextLink": "x"})).is_err());
        let page = parse(json!({"value": [], "@odata.nextLink": "n", "@odata.deltaLink": "d"}));
        assert_eq!(page.unwrap().next, DeltaNext::NextLink("n".into()));
    }
}
