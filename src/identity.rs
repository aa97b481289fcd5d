//! Whose address is it? The pure rules deciding which address a Graph user is written to
//! Proofpoint under, and whether that address may be trusted to mean this directory object.
//!
//! Entra does not verify `mail`: any directory object can carry another user's address there.
//! Taking it on trust once made flagrelay deactivate the wrong person in Proofpoint (a
//! disabled object whose `mail` was set to a colleague's address). So before a write the
//! caller checks three things, all decided here:
//! 1. [`choose_address`]: the address comes from the most trustworthy property that lies in
//!    the organization's own domains ([`OrgDomains`]);
//! 2. [`check_binding`]: it agrees with the binding object id ↔ address recorded earlier
//!    ([`Binding`]; a rename needs an operator's acceptance);
//! 3. [`check_holders`]: Graph says exactly this object holds it ([`crate::graph::GraphApi::users_with_address`]).
//!
//! No IO and no clock: the caller reads Graph and the store, passes the facts in, and records
//! `bound_at` itself. Addresses are compared ASCII-case-insensitively (as Proofpoint and
//! Entra compare them); object ids too (GUIDs).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::graph::GraphUser;

/// Which user property an address was taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AddressSource {
    /// The `proxyAddresses` entry with the upper-case `SMTP:` prefix.
    PrimarySmtp,
    /// The `mail` property.
    Mail,
    /// The `userPrincipalName`.
    UserPrincipalName,
}

impl AddressSource {
    /// The serde name, for logs and outcome events.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::PrimarySmtp => "primary_smtp",
            Self::Mail => "mail",
            Self::UserPrincipalName => "user_principal_name",
        }
    }
}

impl std::fmt::Display for AddressSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The addresses a user could be known by in Proofpoint, most trustworthy first:
///
/// 1. the **primary SMTP proxy address** (`SMTP:` upper-case): Exchange Online keeps it
///    unique across the directory and it is where the mailbox actually receives mail;
/// 2. **`mail`**: usually the same, but it can be set on objects without a mailbox and Entra
///    does not verify it, so it can name someone else's address;
/// 3. the **UPN**: a sign-in name, unique, but not necessarily an address mail goes to.
///
/// Each is trimmed and lower-cased; values that are not plausible addresses (exactly one
/// `@`, a non-empty local part and domain, no whitespace or control characters) are left
/// out, and an address already listed keeps its first (more trustworthy) source.
pub fn candidates(user: &GraphUser) -> Vec<(AddressSource, String)> {
    let sources = [
        (AddressSource::PrimarySmtp, user.primary_smtp()),
        (AddressSource::Mail, user.mail.as_deref()),
        (
            AddressSource::UserPrincipalName,
            user.user_principal_name.as_deref(),
        ),
    ];
    let mut out: Vec<(AddressSource, String)> = Vec::new();
    for (source, raw) in sources {
        let Some(address) = raw.and_then(normalize) else {
            continue;
        };
        if !out.iter().any(|(_, seen)| *seen == address) {
            out.push((source, address));
        }
    }
    out
}

/// `raw` trimmed and lower-cased, when it is a plausible address.
fn normalize(raw: &str) -> Option<String> {
    let address = raw.trim().to_ascii_lowercase();
    split_address(&address).is_some().then_some(address)
}

/// `(local, domain)` of an address with exactly one `@`, both parts non-empty, and no
/// whitespace or control characters (which no SMTP address we write can contain).
fn split_address(address: &str) -> Option<(&str, &str)> {
    if address.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return None;
    }
    let (local, domain) = address.split_once('@')?;
    (!local.is_empty() && !domain.is_empty() && !domain.contains('@')).then_some((local, domain))
}

/// The domains an organization's Proofpoint users may have addresses in: the Proofpoint
/// org's domain plus the tenant's other accepted domains. An address counts as inside only
/// when the part after its `@` equals one of them exactly (case-insensitively): a
/// subdomain is not inside, because a subdomain can be delegated to someone else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgDomains {
    /// Lower-cased, de-duplicated, the org domain first.
    domains: Vec<String>,
}

impl OrgDomains {
    /// Empty entries are ignored; a leading `@` or a trailing `.` is tolerated.
    pub fn new(org_domain: &str, accepted: &[String]) -> Self {
        let mut domains: Vec<String> = Vec::new();
        for raw in std::iter::once(org_domain).chain(accepted.iter().map(String::as_str)) {
            let domain = raw
                .trim()
                .trim_start_matches('@')
                .trim_end_matches('.')
                .to_ascii_lowercase();
            if !domain.is_empty() && !domains.contains(&domain) {
                domains.push(domain);
            }
        }
        Self { domains }
    }

    /// Whether `address` (any case, surrounding whitespace ignored) is in one of the domains.
    pub fn contains(&self, address: &str) -> bool {
        let address = address.trim().to_ascii_lowercase();
        split_address(&address).is_some_and(|(_, domain)| self.domains.iter().any(|d| d == domain))
    }

    /// The domains, lower-cased, the org domain first.
    pub fn as_slice(&self) -> &[String] {
        &self.domains
    }
}

impl std::fmt::Display for OrgDomains {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.domains.join(", "))
    }
}

/// The address chosen for a user, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chosen {
    pub address: String,
    pub source: AddressSource,
}

/// The first of [`candidates`] inside `domains`. An address outside the organization's
/// domains is never written: Proofpoint holds the org's own users only, and an outside
/// address can only be a mistake or an attempt to reach another org's user.
pub fn choose_address(user: &GraphUser, domains: &OrgDomains) -> Result<Chosen, IdentityConflict> {
    let all = candidates(user);
    if all.is_empty() {
        return Err(IdentityConflict::NoAddress);
    }
    all.iter()
        .find(|(_, address)| domains.contains(address))
        .map(|(source, address)| Chosen {
            address: address.clone(),
            source: *source,
        })
        .ok_or_else(|| IdentityConflict::OutsideDomains {
            candidates: all.into_iter().map(|(_, address)| address).collect(),
            domains: domains.to_string(),
        })
}

/// A recorded identity binding: this directory object is the one Proofpoint user `address`.
/// Recorded the first time flagrelay writes the address for the object, or when an operator
/// accepts a change; from then on, the address may be written for this object only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    pub tenant_id: String,
    /// The Graph object id (`id`), which never changes, unlike every address property.
    pub object_id: String,
    /// Lower-cased.
    pub address: String,
    pub bound_at: DateTime<Utc>,
    /// How the binding came about: [`Binding::FIRST_SEEN`] or [`Binding::ACCEPTED`].
    pub how: String,
}

impl Binding {
    /// Recorded automatically the first time the pair was seen (and checked).
    pub const FIRST_SEEN: &'static str = "first_seen";
    /// Recorded because an operator accepted a new address for the object.
    pub const ACCEPTED: &'static str = "accepted";
}

/// What the recorded bindings say about writing `address` for an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindingCheck {
    /// The object is bound to this address: go ahead.
    Bound,
    /// Neither the object nor the address is bound yet: check the holders, then record.
    New,
    /// The bindings contradict the write: do not write.
    Conflict(IdentityConflict),
}

/// Compare a planned write of `address` for `object_id` with the binding recorded for the
/// object (`by_object`) and the one recorded for the address (`by_address`).
///
/// When both contradict the write (the object was bound to another address *and* this
/// address to another object), [`IdentityConflict::AddressHeldByOther`] wins: it names the
/// other object, the one whose mail would be cut off. When only one binding exists and it
/// names exactly this pair, the write is [`BindingCheck::Bound`]: nothing recorded
/// contradicts it (the caller may repair the missing half).
pub fn check_binding(
    object_id: &str,
    address: &str,
    by_object: Option<&Binding>,
    by_address: Option<&Binding>,
) -> BindingCheck {
    if let Some(held) = by_address.filter(|b| !same_id(&b.object_id, object_id)) {
        return BindingCheck::Conflict(IdentityConflict::AddressHeldByOther {
            address: normalized(address),
            other_object_id: held.object_id.clone(),
            others: vec![held.object_id.clone()],
        });
    }
    if let Some(bound) = by_object.filter(|b| !same_address(&b.address, address)) {
        return BindingCheck::Conflict(IdentityConflict::AddressChanged {
            object_id: object_id.to_owned(),
            from: bound.address.clone(),
            to: normalized(address),
        });
    }
    if by_object.is_none() && by_address.is_none() {
        BindingCheck::New
    } else {
        BindingCheck::Bound
    }
}

/// Check what Graph answered for "who holds `address`" ([`crate::graph::GraphApi::users_with_address`]):
/// exactly this object, and nobody else. Another holder is a conflict even when this object
/// is among the holders (two objects claiming one address is exactly the confusion this
/// guards against); this object missing is [`IdentityConflict::Unconfirmed`].
pub fn check_holders(
    object_id: &str,
    address: &str,
    holders: &[GraphUser],
) -> Result<(), IdentityConflict> {
    let mut others: Vec<String> = Vec::new();
    for holder in holders.iter().filter(|h| !same_id(&h.id, object_id)) {
        if !others.iter().any(|o| same_id(o, &holder.id)) {
            others.push(holder.id.clone());
        }
    }
    if let Some(first) = others.first() {
        return Err(IdentityConflict::AddressHeldByOther {
            address: normalized(address),
            other_object_id: first.clone(),
            others,
        });
    }
    if holders.is_empty() {
        return Err(IdentityConflict::Unconfirmed {
            address: normalized(address),
        });
    }
    Ok(())
}

/// Why an address may not be written for a directory object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityConflict {
    /// None of the user's addresses is in the organization's domains.
    #[error("none of the user's addresses ({}) is in the organization's domains ({domains})", .candidates.join(", "))]
    OutsideDomains {
        candidates: Vec<String>,
        domains: String,
    },
    /// The user has no primary SMTP address, `mail` or UPN that is a plausible address.
    #[error("the user has no usable address (primary SMTP address, mail or UPN)")]
    NoAddress,
    /// The address belongs to another directory object (by a recorded binding, or because
    /// Graph lists another object holding it).
    #[error("address {address} is held by directory object {other_object_id}{}", held_by(.others, .other_object_id))]
    AddressHeldByOther {
        address: String,
        /// The first other object (the one named in the message).
        other_object_id: String,
        /// Every other object holding the address, `other_object_id` first.
        others: Vec<String>,
    },
    /// The object is bound to another address: a rename (or a tampered property) that an
    /// operator must accept before the new address is written.
    #[error(
        "directory object {object_id} is bound to {from}, not {to}; an operator must accept the change"
    )]
    AddressChanged {
        object_id: String,
        from: String,
        to: String,
    },
    /// Graph does not (yet) list this object as holding the address. Usually the directory's
    /// lookup index lagging a recent change (it is eventually consistent): the caller treats
    /// this as transient and retries later ([`IdentityConflict::is_transient`]).
    #[error("Graph does not (yet) confirm that the object holds {address}")]
    Unconfirmed { address: String },
}

/// `" (and also a, b)"` when more objects than the first hold the address.
fn held_by(others: &[String], first: &str) -> String {
    let rest: Vec<&str> = others
        .iter()
        .map(String::as_str)
        .filter(|o| !same_id(o, first))
        .collect();
    if rest.is_empty() {
        String::new()
    } else {
        format!(" (and also {})", rest.join(", "))
    }
}

impl IdentityConflict {
    /// A short machine-readable reason, for metrics, outcome events and the store.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::OutsideDomains { .. } => "outside_org_domains",
            Self::NoAddress => "no_address",
            Self::AddressHeldByOther { .. } => "address_held_by_other",
            Self::AddressChanged { .. } => "address_changed",
            Self::Unconfirmed { .. } => "unconfirmed",
        }
    }

    /// Only [`IdentityConflict::Unconfirmed`] may resolve itself: retry later. Every other
    /// conflict needs a directory fix or an operator.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unconfirmed { .. })
    }

    /// The other directory objects involved (empty unless another object holds the address).
    pub fn other_object_ids(&self) -> Vec<String> {
        match self {
            Self::AddressHeldByOther {
                other_object_id,
                others,
                ..
            } if others.is_empty() => vec![other_object_id.clone()],
            Self::AddressHeldByOther { others, .. } => others.clone(),
            _ => Vec::new(),
        }
    }
}

fn same_id(a: &str, b: &str) -> bool {
    a.trim().eq_ignore_ascii_case(b.trim())
}

fn same_address(a: &str, b: &str) -> bool {
    a.trim().eq_ignore_ascii_case(b.trim())
}

fn normalized(address: &str) -> String {
    address.trim().to_ascii_lowercase()
}

#[cfg(test)]
mod tests;
