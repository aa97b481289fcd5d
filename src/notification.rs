//! Lenient parsing of Microsoft Graph change and lifecycle notification collections.
//!
//! Graph's payloads vary in practice (see `shared/reference/graph-users.md`): `tenantId` may
//! be missing (use `resourceData.organizationId`), `sequenceNumber` comes as a string or a
//! number, `resource` casing varies, `@odata.type` has been seen wrong. So: the collection must
//! be JSON of the form `{"value": [...]}`, and each item is parsed on its own; an item that
//! cannot be understood is reported, the others still count. Unknown fields are ignored.

use chrono::{DateTime, Utc};
use serde::Deserialize;

/// Longest identifier (tenant, user, subscription) accepted; Graph's are 36-char GUIDs.
const MAX_ID_LEN: usize = 128;

/// The whole request could not be understood: answer 400.
#[derive(Debug, thiserror::Error)]
pub enum CollectionError {
    #[error("body is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("body has no `value` array")]
    NoValue,
}

/// One item could not be understood: it is dropped and counted; the batch goes on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ItemError {
    #[error("item is not an object of the expected shape")]
    Malformed,
    #[error("item carries no tenant id (tenantId or resourceData.organizationId)")]
    MissingTenant,
    #[error("item names no user (resourceData.id or resource Users/<id>)")]
    MissingUser,
    #[error("item is about {0:?}, not a user")]
    NotAUser(String),
    #[error("item carries an identifier that is not plausible")]
    BadIdentifier,
    #[error("item has no lifecycleEvent")]
    MissingLifecycleEvent,
}

/// A change notification for one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeNotification {
    pub subscription_id: Option<String>,
    pub change_type: String,
    /// Never logged; compared in constant time by the receiver.
    pub client_state: Option<String>,
    pub tenant_id: String,
    pub user_id: String,
    pub event_time: Option<DateTime<Utc>>,
    pub sequence_number: Option<String>,
}

/// A lifecycle notification (`reauthorizationRequired` for users).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleNotification {
    pub subscription_id: String,
    pub lifecycle_event: String,
    pub client_state: Option<String>,
    pub tenant_id: String,
    pub subscription_expiration: Option<DateTime<Utc>>,
}

#[derive(Deserialize)]
struct Collection {
    value: Option<Vec<serde_json::Value>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawItem {
    subscription_id: Option<String>,
    subscription_expiration_date_time: Option<String>,
    change_type: Option<String>,
    client_state: Option<String>,
    resource: Option<String>,
    resource_data: Option<RawResourceData>,
    tenant_id: Option<String>,
    organization_id: Option<String>,
    lifecycle_event: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawResourceData {
    id: Option<String>,
    organization_id: Option<String>,
    event_time: Option<String>,
    sequence_number: Option<serde_json::Value>,
}

/// Split the body into its items. Errors here mean the whole request is bad (400).
pub fn parse_collection(body: &[u8]) -> Result<Vec<serde_json::Value>, CollectionError> {
    let c: Collection = serde_json::from_slice(body)?;
    c.value.ok_or(CollectionError::NoValue)
}

fn raw(item: &serde_json::Value) -> Result<RawItem, ItemError> {
    RawItem::deserialize(item).map_err(|_| ItemError::Malformed)
}

/// A GUID, a UPN or a tenant domain: letters, digits and `-_.@`, and no path syntax (`.`,
/// `..`, a leading or trailing dot, two dots in a row), which would otherwise travel on to
/// Graph paths and only fail (and alert) at the worker.
fn plausible_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('.')
        && !id.ends_with('.')
        && !id.contains("..")
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
}

fn checked(id: Option<String>, missing: ItemError) -> Result<String, ItemError> {
    let id = id
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .ok_or(missing)?;
    if plausible_id(&id) {
        Ok(id)
    } else {
        Err(ItemError::BadIdentifier)
    }
}

fn parse_time(raw: Option<&str>) -> Option<DateTime<Utc>> {
    raw.and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
}

fn tenant_of(r: &RawItem) -> Result<String, ItemError> {
    let from_data = r
        .resource_data
        .as_ref()
        .and_then(|d| d.organization_id.clone());
    checked(
        r.tenant_id
            .clone()
            .or(r.organization_id.clone())
            .or(from_data),
        ItemError::MissingTenant,
    )
}

/// The user id from `resource` (`Users/<id>` in any casing), when `resourceData.id` is absent.
fn user_from_resource(resource: &str) -> Result<Option<String>, ItemError> {
    let trimmed = resource.trim_start_matches('/');
    match trimmed.split_once('/') {
        Some((kind, id)) if kind.eq_ignore_ascii_case("users") => Ok(Some(id.to_owned())),
        Some((kind, _)) => Err(ItemError::NotAUser(kind.to_owned())),
        None => Ok(None),
    }
}

/// Parse one change-notification item.
pub fn parse_change(item: &serde_json::Value) -> Result<ChangeNotification, ItemError> {
    let r = raw(item)?;
    let tenant_id = tenant_of(&r)?;
    let from_resource = match r.resource.as_deref() {
        Some(res) => user_from_resource(res)?,
        None => None,
    };
    let data = r.resource_data.as_ref();
    let user_id = checked(
        data.and_then(|d| d.id.clone()).or(from_resource),
        ItemError::MissingUser,
    )?;
    let sequence_number = data.and_then(|d| match &d.sequence_number {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        _ => None,
    });
    Ok(ChangeNotification {
        subscription_id: r.subscription_id,
        change_type: r.change_type.unwrap_or_else(|| "updated".into()),
        client_state: r.client_state,
        tenant_id,
        user_id,
        event_time: parse_time(data.and_then(|d| d.event_time.as_deref())),
        sequence_number,
    })
}

/// Parse one lifecycle-notification item.
pub fn parse_lifecycle(item: &serde_json::Value) -> Result<LifecycleNotification, ItemError> {
    let r = raw(item)?;
    let tenant_id = tenant_of(&r)?;
    let lifecycle_event = r
        .lifecycle_event
        .clone()
        .filter(|e| !e.is_empty() && e.len() <= MAX_ID_LEN)
        .ok_or(ItemError::MissingLifecycleEvent)?;
    Ok(LifecycleNotification {
        subscription_id: checked(r.subscription_id.clone(), ItemError::Malformed)?,
        lifecycle_event,
        client_state: r.client_state,
        tenant_id,
        subscription_expiration: parse_time(r.subscription_expiration_date_time.as_deref()),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn documented() -> serde_json::Value {
        json!({
            "subscriptionId": "sub-1", "subscriptionExpirationDateTime": "2026-12-01T10:00:00+00:00",
            "changeType": "updated", "clientState": "s3cret", "resource": "Users/u-1",
            "resourceData": {"@odata.type": "#Microsoft.Graph.User", "@odata.id": "Users/u-1",
                "id": "u-1", "organizationId": "t-1", "eventTime": "2026-11-23T10:00:00.1234567Z",
                "sequenceNumber": "42"},
            "tenantId": "t-1"
        })
    }

    #[test]
    fn parses_the_documented_shape() {
        let n = parse_change(&documented()).unwrap();
        assert_eq!(n.tenant_id, "t-1");
        assert_eq!(n.user_id, "u-1");
        assert_eq!(n.sequence_number.as_deref(), Some("42"));
        assert_eq!(n.client_state.as_deref(), Some("s3cret"));
        assert!(n.event_time.is_some());
    }

    /// Each lenient variant from the fact sheet, checked through one helper.
    #[test]
    fn accepts_the_lenient_variants() {
        fn check(edit: impl Fn(&mut serde_json::Value), tenant: &str, user: &str) {
            let mut item = documented();
            edit(&mut item);
            let n = parse_change(&item).unwrap_or_else(|e| panic!("{item}: {e}"));
            assert_eq!(
                (n.tenant_id.as_str(), n.user_id.as_str()),
                (tenant, user),
                "{item}"
            );
        }
        check(
            |i| {
                i.as_object_mut().unwrap().remove("tenantId");
            },
            "t-1",
            "u-1",
        );
        check(
            |i| i["resourceData"]["sequenceNumber"] = json!(42),
            "t-1",
            "u-1",
        );
        check(|i| i["resource"] = json!("users/u-1"), "t-1", "u-1");
        check(
            |i| i["resourceData"]["@odata.type"] = json!("#Microsoft.Graph.Group"),
            "t-1",
            "u-1",
        );
        check(
            |i| {
                i["resourceData"].as_object_mut().unwrap().remove("id");
            },
            "t-1",
            "u-1",
        );
        check(
            |i| i["unknownField"] = json!({"deep": [1, 2]}),
            "t-1",
            "u-1",
        );
    }

    #[test]
    fn rejects_items_precisely() {
        type Edit = Box<dyn Fn(&mut serde_json::Value)>;
        let cases: Vec<(Edit, ItemError)> = vec![
            (
                Box::new(|i| {
                    i.as_object_mut().unwrap().remove("tenantId");
                    i["resourceData"]
                        .as_object_mut()
                        .unwrap()
                        .remove("organizationId");
                }),
                ItemError::MissingTenant,
            ),
            (
                Box::new(|i| {
                    i["resourceData"].as_object_mut().unwrap().remove("id");
                    i.as_object_mut().unwrap().remove("resource");
                }),
                ItemError::MissingUser,
            ),
            (
                Box::new(|i| i["resource"] = json!("Groups/g-1")),
                ItemError::NotAUser("Groups".into()),
            ),
            (
                Box::new(|i| i["resourceData"]["id"] = json!("../../admin")),
                ItemError::BadIdentifier,
            ),
            (
                Box::new(|i| i["tenantId"] = json!(17)),
                ItemError::Malformed,
            ),
        ];
        for (edit, expected) in cases {
            let mut item = documented();
            edit(&mut item);
            assert_eq!(parse_change(&item), Err(expected), "{item}");
        }
        // Path syntax in an id, by resource or by resourceData.id: refused at the edge.
        for id in ["..", ".", "a..b", ".hidden", "trailing.", "a/b"] {
            let mut item = documented();
            item["resourceData"].as_object_mut().unwrap().remove("id");
            item["resource"] = json!(format!("Users/{id}"));
            assert_eq!(parse_change(&item), Err(ItemError::BadIdentifier), "{id}");
            let mut item = documented();
            item["resourceData"]["id"] = json!(id);
            assert_eq!(parse_change(&item), Err(ItemError::BadIdentifier), "{id}");
        }
        let mut item = documented();
        item["resourceData"]["id"] = json!("alice.smith@contoso.com");
        assert!(parse_change(&item).is_ok(), "dots inside a UPN are fine");
        assert_eq!(
            parse_change(&json!("just a string")),
            Err(ItemError::Malformed)
        );
    }

    #[test]
    fn collection_needs_a_value_array() {
        assert_eq!(
            parse_collection(br#"{"value":[{"a":1}]}"#).unwrap().len(),
            1
        );
        assert!(matches!(
            parse_collection(b"{}"),
            Err(CollectionError::NoValue)
        ));
        assert!(matches!(
            parse_collection(b"{\"value\":"),
            Err(CollectionError::Json(_))
        ));
        let deep = "[".repeat(10_000);
        assert!(matches!(
            parse_collection(deep.as_bytes()),
            Err(CollectionError::Json(_))
        ));
    }

    #[test]
    fn parses_lifecycle_items_with_either_tenant_field() {
        let item = json!({"lifecycleEvent": "reauthorizationRequired", "subscriptionId": "sub-1",
            "subscriptionExpirationDateTime": "2026-12-01T10:00:00+00:00", "clientState": "s",
            "organizationId": "t-1"});
        let l = parse_lifecycle(&item).unwrap();
        assert_eq!(
            (l.tenant_id.as_str(), l.lifecycle_event.as_str()),
            ("t-1", "reauthorizationRequired")
        );
        assert_eq!(
            parse_lifecycle(&json!({"subscriptionId": "s", "tenantId": "t"})),
            Err(ItemError::MissingLifecycleEvent)
        );
    }
}
