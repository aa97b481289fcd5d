//! The facts a rule can name (`account_enabled`, `member_of`, ...) and how each is read from
//! [`Facts`]: a value, *absent* (fetched, not set) or *unavailable* (not fetched).

use chrono::{DateTime, Utc};

use super::{Facts, Group, Needs};

/// A fact a condition can test. Names are the TOML keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fact {
    AccountEnabled,
    UserPrincipalName,
    UpnDomain,
    Mail,
    MailDomain,
    /// SMTP proxy addresses (`smtp:`/`SMTP:` entries), prefix removed.
    ProxyAddresses,
    ProxyDomains,
    UserType,
    Department,
    CompanyName,
    EmployeeType,
    EmployeeLeaveDateTime,
    /// `onPremisesExtensionAttributes.extensionAttribute1..15`.
    ExtensionAttribute(u8),
    MemberOf,
    MailboxPurpose,
    ProofpointType,
    ProofpointActive,
    ProofpointExempt,
}

/// The shape of a fact's value, which decides the matchers that apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Bool,
    Text,
    /// Several strings; a matcher holds when any element matches.
    List,
    /// Groups; a string matches a group's id or its display name.
    Groups,
    Time,
}

/// A fact's value for one user.
#[derive(Debug, Clone)]
pub(crate) enum Value<'a> {
    /// Not fetched: conditions on it are unknown. Says what was missing.
    Unavailable(&'static str),
    /// Fetched, but the user has no value.
    Absent,
    Bool(bool),
    Text(&'a str),
    List(Vec<&'a str>),
    Groups(&'a [Group]),
    Time(DateTime<Utc>),
}

const SIMPLE: &[(&str, Fact)] = &[
    ("account_enabled", Fact::AccountEnabled),
    ("user_principal_name", Fact::UserPrincipalName),
    ("upn_domain", Fact::UpnDomain),
    ("mail", Fact::Mail),
    ("mail_domain", Fact::MailDomain),
    ("proxy_addresses", Fact::ProxyAddresses),
    ("proxy_domains", Fact::ProxyDomains),
    ("user_type", Fact::UserType),
    ("department", Fact::Department),
    ("company_name", Fact::CompanyName),
    ("employee_type", Fact::EmployeeType),
    ("employee_leave_date_time", Fact::EmployeeLeaveDateTime),
    ("member_of", Fact::MemberOf),
    ("mailbox_purpose", Fact::MailboxPurpose),
    ("proofpoint_type", Fact::ProofpointType),
    ("proofpoint_active", Fact::ProofpointActive),
    ("proofpoint_exempt", Fact::ProofpointExempt),
];

const EXTENSION_PREFIX: &str = "extension_attribute";

/// Values Graph documents for `userType`.
const USER_TYPES: &[&str] = &["Member", "Guest"];
/// Values Graph documents for `mailboxSettings.userPurpose`.
const MAILBOX_PURPOSES: &[&str] = &["user", "linked", "shared", "room", "equipment", "others"];
/// Proofpoint Essentials user types.
const PROOFPOINT_TYPES: &[&str] = &[
    "end_user",
    "silent_user",
    "functional_account",
    "organization_admin",
    "channel_admin",
    "strategic_partner_admin",
    "oem_partner_admin",
];

impl Fact {
    pub(crate) fn parse(name: &str) -> Option<Fact> {
        if let Some(n) = name.strip_prefix(EXTENSION_PREFIX) {
            // Exactly `1`..`15`: no sign, no leading zero.
            return n
                .parse::<u8>()
                .ok()
                .filter(|i| (1..=15).contains(i) && i.to_string() == n)
                .map(Fact::ExtensionAttribute);
        }
        SIMPLE.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
    }

    /// Every fact name, for suggestions and the schema test.
    pub(crate) fn all_names() -> Vec<String> {
        let mut names: Vec<String> = SIMPLE.iter().map(|(n, _)| (*n).to_owned()).collect();
        names.extend((1..=15).map(|i| format!("{EXTENSION_PREFIX}{i}")));
        names
    }

    pub(crate) fn name(self) -> String {
        match self {
            Fact::ExtensionAttribute(i) => format!("{EXTENSION_PREFIX}{i}"),
            f => SIMPLE
                .iter()
                .find(|(_, g)| *g == f)
                .map(|(n, _)| (*n).to_owned())
                .unwrap_or_default(),
        }
    }

    pub(crate) fn kind(self) -> Kind {
        match self {
            Fact::AccountEnabled | Fact::ProofpointActive | Fact::ProofpointExempt => Kind::Bool,
            Fact::ProxyAddresses | Fact::ProxyDomains => Kind::List,
            Fact::MemberOf => Kind::Groups,
            Fact::EmployeeLeaveDateTime => Kind::Time,
            _ => Kind::Text,
        }
    }

    /// The values `equals`/`one_of` may name, when the fact has a closed set.
    pub(crate) fn known_values(self) -> Option<&'static [&'static str]> {
        match self {
            Fact::UserType => Some(USER_TYPES),
            Fact::MailboxPurpose => Some(MAILBOX_PURPOSES),
            Fact::ProofpointType => Some(PROOFPOINT_TYPES),
            _ => None,
        }
    }

    /// What the worker must fetch for this fact to be available.
    pub(crate) fn needs(self) -> Needs {
        Needs {
            groups: self == Fact::MemberOf,
            mailbox_purpose: self == Fact::MailboxPurpose,
            leave_date: self == Fact::EmployeeLeaveDateTime,
            exemptions: self == Fact::ProofpointExempt,
        }
    }

    /// Read this fact for one user.
    pub(crate) fn value<'a>(self, facts: &Facts<'a>) -> Value<'a> {
        let u = facts.user;
        let text = |v: Option<&'a String>| v.map_or(Value::Absent, |s| Value::Text(s.as_str()));
        let domain = |v: Option<&'a String>| {
            v.and_then(|s| domain_of(s))
                .map_or(Value::Absent, Value::Text)
        };
        match self {
            Fact::AccountEnabled => match u.account_enabled {
                Some(b) => Value::Bool(b),
                None => Value::Unavailable("Graph did not return accountEnabled"),
            },
            Fact::UserPrincipalName => text(u.user_principal_name.as_ref()),
            Fact::UpnDomain => domain(u.user_principal_name.as_ref()),
            Fact::Mail => text(u.mail.as_ref()),
            Fact::MailDomain => domain(u.mail.as_ref()),
            Fact::ProxyAddresses => {
                Value::List(smtp_addresses(u.proxy_addresses.as_deref()).collect())
            }
            Fact::ProxyDomains => {
                let mut d: Vec<&str> = smtp_addresses(u.proxy_addresses.as_deref())
                    .filter_map(domain_of)
                    .collect();
                d.dedup_by(|a, b| a.eq_ignore_ascii_case(b));
                Value::List(d)
            }
            Fact::UserType => text(u.user_type.as_ref()),
            Fact::Department => text(u.department.as_ref()),
            Fact::CompanyName => text(u.company_name.as_ref()),
            Fact::EmployeeType => text(u.employee_type.as_ref()),
            Fact::EmployeeLeaveDateTime if !facts.leave_date_fetched => {
                Value::Unavailable("employeeLeaveDateTime not fetched")
            }
            Fact::EmployeeLeaveDateTime => u
                .employee_leave_date_time
                .map_or(Value::Absent, Value::Time),
            Fact::ExtensionAttribute(i) => {
                let key = format!("extensionAttribute{i}");
                let found = u.on_premises_extension_attributes.as_ref().and_then(|m| {
                    m.get(&key).or_else(|| {
                        m.iter()
                            .find(|(k, _)| k.eq_ignore_ascii_case(&key))
                            .map(|(_, v)| v)
                    })
                });
                text(found.and_then(Option::as_ref))
            }
            Fact::MemberOf => facts.groups.map_or(
                Value::Unavailable("group membership not fetched"),
                Value::Groups,
            ),
            // `Some("")`: fetched, and the user has no mailbox (a known absence).
            Fact::MailboxPurpose => match facts.mailbox_purpose {
                None => Value::Unavailable("mailbox settings not fetched"),
                Some("") => Value::Absent,
                Some(p) => Value::Text(p),
            },
            Fact::ProofpointType => text(facts.proofpoint.user_type.as_ref()),
            Fact::ProofpointActive => Value::Bool(facts.proofpoint.is_active),
            Fact::ProofpointExempt => facts.exempt.map_or(
                Value::Unavailable("exemption list not fetched"),
                Value::Bool,
            ),
        }
    }
}

fn domain_of(address: &str) -> Option<&str> {
    address
        .rsplit_once('@')
        .map(|(_, d)| d.trim())
        .filter(|d| !d.is_empty())
}

fn smtp_addresses(proxies: Option<&[String]>) -> impl Iterator<Item = &str> {
    proxies.unwrap_or_default().iter().filter_map(|p| {
        let (scheme, addr) = p.split_once(':')?;
        scheme.eq_ignore_ascii_case("smtp").then_some(addr)
    })
}

/// The known name closest to `name`, when it is a plausible typo.
pub(crate) fn suggest<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}
