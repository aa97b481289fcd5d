//! The simulated Proofpoint Essentials data (orgs, users, exemptions, admins) and the rules
//! the real service applies to it: authorization, validation, PUT semantics, license capping.
//! No IO here; the HTTP layer in `api.rs` only translates requests into these calls.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use super::{PutMode, RequestRecord, SimCounters, WriteRecord, WriteTarget};

/// Records kept in memory; older ones are dropped so a long-running `flagrelay sim` stays small.
const MAX_RECORDS: usize = 10_000;

/// Valid values of a user's `type`.
pub(super) const USER_TYPES: &[&str] = &[
    "end_user",
    "silent_user",
    "functional_account",
    "organization_admin",
    "channel_admin",
    "strategic_partner_admin",
    "oem_partner_admin",
];

/// A refusal: the status and JSON body the simulator answers with.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Refusal {
    pub status: StatusCode,
    pub body: Value,
}

impl Refusal {
    /// The single-error shape (`{status, error_message}`), used for most refusals.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            body: json!({ "status": status.as_u16(), "error_message": message.into() }),
        }
    }

    /// The batch shape (`{errors: [{status, error_message, identifier}]}`).
    pub fn listed(status: StatusCode, message: impl Into<String>, identifier: &str) -> Self {
        Self {
            status,
            body: json!({ "errors": [item_error(status, message, identifier)] }),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

fn item_error(status: StatusCode, message: impl Into<String>, identifier: &str) -> Value {
    json!({ "status": status.as_u16(), "error_message": message.into(), "identifier": identifier })
}

/// What a request wants to do with an org, for the authorization check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    /// Credentials only (`/me`, `/endpoints/{domain}`).
    Lookup,
    Read,
    Write,
}

/// An administrator account. The password is compared, never printed.
pub(super) struct Admin {
    pub username: String,
    pub password: secrecy::SecretString,
    /// `None`: partner admin over every org; `Some`: organization admin of these domains.
    pub orgs: Option<BTreeSet<String>>,
    pub read_only: bool,
    pub uid: u64,
}

/// One organization.
#[derive(Debug, Clone)]
pub(super) struct Org {
    pub domain: String,
    pub stack: String,
    /// Keyed by lower-cased primary e-mail; values are the stored JSON objects, kept verbatim.
    pub users: BTreeMap<String, Map<String, Value>>,
    /// Lower-cased addresses exempt from the scheduled Azure sync.
    pub exemptions: BTreeSet<String>,
    pub azure: Map<String, Value>,
    /// Most active, billable users allowed; `None` = no capping.
    pub license_cap: Option<usize>,
}

impl Org {
    fn new(domain: &str, now: DateTime<Utc>) -> Self {
        let azure = json!({
            "sync_frequency": 24,
            "last_successful_sync": (now - chrono::Duration::hours(1)).to_rfc3339(),
            "secret_expiry": (now + chrono::Duration::days(180)).to_rfc3339(),
            "add_users": true,
            "update_users": true,
            "remove_deleted_users": false,
        });
        Self {
            domain: domain.to_owned(),
            stack: "us1".into(),
            users: BTreeMap::new(),
            exemptions: BTreeSet::new(),
            azure: azure.as_object().cloned().unwrap_or_default(),
            license_cap: None,
        }
    }

    /// Active users that consume a license (functional accounts and non-billable users are free).
    fn licensed_active(&self, except: &str) -> usize {
        self.users
            .iter()
            .filter(|(k, u)| k.as_str() != except && consumes_license(u))
            .count()
    }

    /// Refuse turning `key` active when the cap is reached (UNDOCUMENTED error shape; this is
    /// the batch shape, answered with 400).
    fn check_license(
        &self,
        key: &str,
        before: Option<&Map<String, Value>>,
        after: &Map<String, Value>,
    ) -> Result<(), Refusal> {
        let (Some(cap), true) = (self.license_cap, consumes_license(after)) else {
            return Ok(());
        };
        if before.is_some_and(consumes_license) {
            return Ok(());
        }
        let used = self.licensed_active(key);
        if used >= cap {
            return Err(Refusal::listed(
                StatusCode::BAD_REQUEST,
                format!("License limit reached: {used} of {cap} licenses in use"),
                key,
            ));
        }
        Ok(())
    }

    /// Proofpoint allows only one non-billable user per org.
    fn check_billable(&self, key: &str, after: &Map<String, Value>) -> Result<(), Refusal> {
        if after.get("is_billable") != Some(&Value::Bool(false)) {
            return Ok(());
        }
        let other = self
            .users
            .iter()
            .any(|(k, u)| k.as_str() != key && u.get("is_billable") == Some(&Value::Bool(false)));
        if other {
            return Err(Refusal::bad_request(
                "Only one non-billable user is allowed per organization",
            ));
        }
        Ok(())
    }
}

fn consumes_license(u: &Map<String, Value>) -> bool {
    u.get("is_active") == Some(&Value::Bool(true))
        && u.get("is_billable") != Some(&Value::Bool(false))
        && u.get("type").and_then(Value::as_str) != Some("functional_account")
}

/// Everything the simulator holds, behind one lock.
pub(super) struct State {
    pub orgs: BTreeMap<String, Org>,
    pub admins: BTreeMap<String, Admin>,
    pub put_mode: PutMode,
    pub next_uid: u64,
    pub log: VecDeque<RequestRecord>,
    pub writes: VecDeque<WriteRecord>,
    pub counters: SimCounters,
}

impl Default for State {
    fn default() -> Self {
        Self {
            orgs: BTreeMap::new(),
            admins: BTreeMap::new(),
            put_mode: PutMode::default(),
            next_uid: 1000,
            log: VecDeque::new(),
            writes: VecDeque::new(),
            counters: SimCounters::default(),
        }
    }
}

impl State {
    pub fn add_org(&mut self, domain: &str) {
        let key = domain.to_ascii_lowercase();
        self.orgs
            .entry(key)
            .or_insert_with(|| Org::new(domain, Utc::now()));
    }

    pub fn org(&self, domain: &str) -> Result<&Org, Refusal> {
        self.orgs
            .get(&domain.to_ascii_lowercase())
            .ok_or_else(|| Refusal::new(StatusCode::NOT_FOUND, "Organization not found"))
    }

    pub fn org_mut(&mut self, domain: &str) -> Result<&mut Org, Refusal> {
        self.orgs
            .get_mut(&domain.to_ascii_lowercase())
            .ok_or_else(|| Refusal::new(StatusCode::NOT_FOUND, "Organization not found"))
    }

    pub fn uid(&mut self) -> u64 {
        self.next_uid += 1;
        self.next_uid
    }

    /// 401 for missing/wrong credentials, 403 without rights on the org (or a read-only
    /// account writing), 404 for an org that does not exist. Returns the admin.
    pub fn authorize(
        &self,
        user: Option<&str>,
        password: Option<&str>,
        domain: Option<&str>,
        access: Access,
    ) -> Result<&Admin, Refusal> {
        use secrecy::ExposeSecret;
        use subtle::ConstantTimeEq;
        let unauthorized = || Refusal::new(StatusCode::UNAUTHORIZED, "Authentication failed");
        let (Some(user), Some(password)) = (user, password) else {
            return Err(unauthorized());
        };
        let admin = self
            .admins
            .get(&user.to_ascii_lowercase())
            .filter(|a| {
                bool::from(
                    a.password
                        .expose_secret()
                        .as_bytes()
                        .ct_eq(password.as_bytes()),
                )
            })
            .ok_or_else(unauthorized)?;
        if let Some(domain) = domain {
            let domain = domain.to_ascii_lowercase();
            let forbidden = |m: &str| Refusal::new(StatusCode::FORBIDDEN, m);
            if access != Access::Lookup && admin.orgs.as_ref().is_some_and(|o| !o.contains(&domain))
            {
                return Err(forbidden("You do not have access to this organization"));
            }
            self.org(&domain)?;
            if access == Access::Write && admin.read_only {
                return Err(forbidden("Read-only administrators cannot make changes"));
            }
        }
        Ok(admin)
    }

    /// `POST /orgs/{domain}/users` with one object.
    pub fn create_user(&mut self, domain: &str, body: Value) -> Result<Value, Refusal> {
        let mut obj = into_object(body)?;
        validate_user(&obj)?;
        let email = primary_email(&obj)?;
        let key = email.to_ascii_lowercase();
        obj.remove("send_welcome_email");
        let uid = self.uid();
        fill_defaults(&mut obj, uid);
        let org = self.org_mut(domain)?;
        if org.users.contains_key(&key) {
            return Err(Refusal::listed(
                StatusCode::CONFLICT,
                "User already exists",
                &email,
            ));
        }
        org.check_license(&key, None, &obj)?;
        org.check_billable(&key, &obj)?;
        org.users.insert(key, obj.clone());
        let after = Value::Object(obj);
        self.record_write(
            "POST",
            domain,
            WriteTarget::User,
            Some(&email),
            None,
            Some(after.clone()),
        );
        Ok(after)
    }

    /// `POST /orgs/{domain}/users` with a list: per-item errors, like Proofpoint's batches.
    pub fn create_users(&mut self, domain: &str, items: Vec<Value>) -> (Vec<Value>, Vec<Value>) {
        let (mut created, mut errors) = (Vec::new(), Vec::new());
        for item in items {
            let identifier = item
                .get("primary_email")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            match self.create_user(domain, item) {
                Ok(u) => created.push(u),
                Err(r) => errors.push(item_error(
                    r.status,
                    error_message(&r.body).unwrap_or("invalid user"),
                    &identifier,
                )),
            }
        }
        (created, errors)
    }

    /// `PUT /orgs/{domain}/users/{email}`: replace or merge (see [`PutMode`]).
    pub fn put_user(&mut self, domain: &str, email: &str, body: Value) -> Result<(), Refusal> {
        let key = email.to_ascii_lowercase();
        let mode = self.put_mode;
        let org = self.org_mut(domain)?;
        let before = org
            .users
            .get(&key)
            .cloned()
            .ok_or_else(|| Refusal::listed(StatusCode::NOT_FOUND, "User not found", email))?;
        let mut obj = into_object(body)?;
        match obj.get("primary_email") {
            Some(Value::String(pe)) if !pe.eq_ignore_ascii_case(email) => {
                return Err(Refusal::bad_request(
                    "primary_email in the body does not match the address in the path",
                ));
            }
            Some(_) => {}
            None => {
                let stored = before.get("primary_email").cloned();
                obj.insert(
                    "primary_email".into(),
                    stored.unwrap_or_else(|| email.into()),
                );
            }
        }
        validate_user(&obj)?;
        if let (Some(new), Some(old)) = (obj.get("uid"), before.get("uid"))
            && new != old
        {
            return Err(Refusal::bad_request("uid cannot be changed"));
        }
        obj.remove("send_welcome_email");
        let after = match mode {
            PutMode::Replace => obj,
            PutMode::Merge => {
                let mut merged = before.clone();
                merged.extend(obj);
                merged
            }
        };
        org.check_license(&key, Some(&before), &after)?;
        org.check_billable(&key, &after)?;
        org.users.insert(key, after.clone());
        self.record_write(
            "PUT",
            domain,
            WriteTarget::User,
            Some(email),
            Some(Value::Object(before)),
            Some(Value::Object(after)),
        );
        Ok(())
    }

    pub fn delete_user(&mut self, domain: &str, email: &str) -> Result<(), Refusal> {
        let before = self
            .org_mut(domain)?
            .users
            .remove(&email.to_ascii_lowercase())
            .ok_or_else(|| Refusal::listed(StatusCode::NOT_FOUND, "User not found", email))?;
        self.record_write(
            "DELETE",
            domain,
            WriteTarget::User,
            Some(email),
            Some(Value::Object(before)),
            None,
        );
        Ok(())
    }

    /// Test and control-route back door: store a user as given (defaults filled when new),
    /// without license checks.
    pub fn upsert_user(&mut self, domain: &str, body: Value) -> Result<Value, Refusal> {
        let mut obj = into_object(body)?;
        validate_user(&obj)?;
        let email = primary_email(&obj)?;
        let key = email.to_ascii_lowercase();
        let existing_uid = self
            .org(domain)?
            .users
            .get(&key)
            .and_then(|u| u.get("uid").cloned());
        match existing_uid {
            Some(uid) => {
                obj.entry("uid").or_insert(uid);
            }
            None => {
                let uid = self.uid();
                fill_defaults(&mut obj, uid);
            }
        }
        let org = self.org_mut(domain)?;
        let before = org.users.insert(key, obj.clone());
        let after = Value::Object(obj);
        self.record_write(
            "UPSERT",
            domain,
            WriteTarget::User,
            Some(&email),
            before.map(Value::Object),
            Some(after.clone()),
        );
        Ok(after)
    }

    pub fn add_exemptions(&mut self, domain: &str, emails: &[String]) -> Result<(), Refusal> {
        if emails.is_empty() {
            return Err(Refusal::bad_request("no e-mail addresses given"));
        }
        if let Some(bad) = emails.iter().find(|e| !looks_like_email(e)) {
            return Err(Refusal::bad_request(format!(
                "not an e-mail address: {bad}"
            )));
        }
        let org = self.org_mut(domain)?;
        let added: Vec<String> = emails
            .iter()
            .map(|e| e.to_ascii_lowercase())
            .filter(|e| org.exemptions.insert(e.clone()))
            .collect();
        for e in added {
            let after = json!({ "email": e });
            self.record_write(
                "PUT",
                domain,
                WriteTarget::Exemption,
                Some(&e),
                None,
                Some(after),
            );
        }
        Ok(())
    }

    pub fn remove_exemption(&mut self, domain: &str, email: &str) -> Result<(), Refusal> {
        let key = email.to_ascii_lowercase();
        if !self.org_mut(domain)?.exemptions.remove(&key) {
            return Err(Refusal::new(StatusCode::NOT_FOUND, "Exemption not found"));
        }
        let before = json!({ "email": key });
        self.record_write(
            "DELETE",
            domain,
            WriteTarget::Exemption,
            Some(&key),
            Some(before),
            None,
        );
        Ok(())
    }

    pub fn clear_exemptions(&mut self, domain: &str) -> Result<(), Refusal> {
        let removed = std::mem::take(&mut self.org_mut(domain)?.exemptions);
        for e in removed {
            let before = json!({ "email": e });
            self.record_write(
                "DELETE",
                domain,
                WriteTarget::Exemption,
                Some(&e),
                Some(before),
                None,
            );
        }
        Ok(())
    }

    /// `PUT /orgs/{domain}/settings/azure`: known fields are type-checked, then merged.
    pub fn put_azure(&mut self, domain: &str, body: Value) -> Result<(), Refusal> {
        let obj = into_object(body)?;
        for (k, v) in &obj {
            let ok = match k.as_str() {
                "sync_frequency" => v.as_u64().is_some_and(|h| h > 0),
                "add_users" | "update_users" | "remove_deleted_users" => v.is_boolean(),
                "last_successful_sync" | "secret_expiry" => v.is_string() || v.is_null(),
                _ => true,
            };
            if !ok {
                return Err(Refusal::bad_request(format!("invalid value for {k}")));
            }
        }
        let org = self.org_mut(domain)?;
        let before = Value::Object(org.azure.clone());
        org.azure.extend(obj);
        let after = Value::Object(org.azure.clone());
        self.record_write(
            "PUT",
            domain,
            WriteTarget::AzureSettings,
            None,
            Some(before),
            Some(after),
        );
        Ok(())
    }

    pub fn record_write(
        &mut self,
        method: &str,
        domain: &str,
        target: WriteTarget,
        email: Option<&str>,
        before: Option<Value>,
        after: Option<Value>,
    ) {
        self.counters.writes += 1;
        push_bounded(
            &mut self.writes,
            WriteRecord {
                at: Utc::now(),
                at_instant: std::time::Instant::now(),
                method: method.to_owned(),
                domain: domain.to_ascii_lowercase(),
                target,
                email: email.map(str::to_ascii_lowercase),
                before,
                after,
            },
        );
    }

    pub fn record_request(&mut self, record: RequestRecord) {
        let c = &mut self.counters;
        c.requests += 1;
        *c.by_status.entry(record.status).or_default() += 1;
        if record.injected {
            c.injected_failures += 1;
        }
        push_bounded(&mut self.log, record);
    }
}

fn push_bounded<T>(q: &mut VecDeque<T>, item: T) {
    if q.len() >= MAX_RECORDS {
        q.pop_front();
    }
    q.push_back(item);
}

/// The first `error_message` in either error shape.
pub(super) fn error_message(body: &Value) -> Option<&str> {
    body.get("error_message")
        .or_else(|| body.pointer("/errors/0/error_message"))
        .and_then(Value::as_str)
}

fn into_object(body: Value) -> Result<Map<String, Value>, Refusal> {
    match body {
        Value::Object(m) => Ok(m),
        _ => Err(Refusal::bad_request("the body must be a JSON object")),
    }
}

fn primary_email(obj: &Map<String, Value>) -> Result<String, Refusal> {
    obj.get("primary_email")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| Refusal::bad_request("primary_email is required"))
}

pub(super) fn looks_like_email(s: &str) -> bool {
    let s = s.trim();
    matches!(s.split_once('@'), Some((local, domain)) if !local.is_empty() && domain.contains('.'))
        && !s.contains(char::is_whitespace)
        && !s.contains(',')
}

/// Type checks for the fields Proofpoint defines; unknown fields are accepted and kept.
pub(super) fn validate_user(obj: &Map<String, Value>) -> Result<(), Refusal> {
    let str_list = |v: &Value| v.as_array().is_some_and(|a| a.iter().all(Value::is_string));
    for (k, v) in obj {
        let ok = match k.as_str() {
            "primary_email" => v.as_str().is_some_and(looks_like_email),
            "uid" => v.is_u64(),
            "firstname" | "surname" => v.is_string() || v.is_null(),
            "type" => v.as_str().is_some_and(|t| USER_TYPES.contains(&t)),
            "is_active" | "is_billable" | "read_only_user" | "send_welcome_email" => v.is_boolean(),
            "alias_emails" | "safe_list_senders" | "block_list_senders" => str_list(v),
            "odin_settings" => v.is_object() || v.is_null(),
            _ => true,
        };
        if !ok {
            return Err(Refusal::bad_request(format!("invalid value for {k}")));
        }
    }
    Ok(())
}

/// What Proofpoint returns for fields a create did not set.
fn fill_defaults(obj: &mut Map<String, Value>, uid: u64) {
    let defaults = [
        ("uid", json!(uid)),
        ("firstname", json!("")),
        ("surname", json!("")),
        ("type", json!("end_user")),
        ("is_active", json!(true)),
        ("is_billable", json!(true)),
        ("read_only_user", json!(false)),
        ("alias_emails", json!([])),
        ("safe_list_senders", json!([])),
        ("block_list_senders", json!([])),
    ];
    for (k, v) in defaults {
        obj.entry(k).or_insert(v);
    }
}
