//! The `$filter` subset the simulator answers on `GET /v1.0/users`: exactly what
//! flagrelay's address lookup sends, and nothing more.
//!
//! Grammar (keywords and property names case-insensitive, as Graph's are; `eq` and `or`
//! between whitespace, as OData requires):
//!
//! ```text
//! filter  = clause *( RWS "or" RWS clause )
//! clause  = ( "mail" / "userPrincipalName" ) RWS "eq" RWS string
//!         / "proxyAddresses/any(" var ":" var RWS "eq" RWS string ")"   ; one variable twice
//! string  = "'" *( any char but "'" / "''" ) "'"                        ; OData quote doubling
//! ```
//!
//! Comparison is case-insensitive on the whole value (for `proxyAddresses`, prefix
//! included), as Graph compares directory strings. Anything else is refused, never guessed:
//! malformed syntax as Graph's `400 BadRequest` ("Invalid filter clause"), well-formed but
//! unmodelled filters (other properties, operators, `and`, functions, parentheses) as
//! `400 Request_UnsupportedQuery`. Real Graph accepts much of the latter (e.g.
//! `startswith(mail,'a')`); the simulator is stricter on purpose, never more lenient.

use std::collections::{BTreeSet, HashMap};

use axum::http::StatusCode;

use super::api::ApiError;
use crate::graph::GraphUser;

/// One equality clause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Clause {
    Mail(String),
    UserPrincipalName(String),
    /// `proxyAddresses/any(x:x eq '…')`: the whole entry, prefix included.
    ProxyAddress(String),
}

/// A parsed filter: the user matches when any clause does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct UserFilter {
    pub clauses: Vec<Clause>,
}

impl UserFilter {
    pub fn parse(text: &str) -> Result<Self, ApiError> {
        let mut cur = Cursor { text, pos: 0 };
        cur.whitespace();
        let mut clauses = vec![cur.clause()?];
        loop {
            let spaced = cur.whitespace();
            if cur.at_end() {
                break;
            }
            if !spaced {
                return Err(cur.syntax());
            }
            if !cur.keyword("or") {
                return Err(cur.unsupported_or_syntax());
            }
            if !cur.whitespace() {
                return Err(cur.syntax());
            }
            clauses.push(cur.clause()?);
        }
        Ok(Self { clauses })
    }

    pub fn matches(&self, user: &GraphUser) -> bool {
        self.clauses.iter().any(|clause| match clause {
            Clause::Mail(v) => user.mail.as_deref().is_some_and(|m| same(m, v)),
            Clause::UserPrincipalName(v) => user
                .user_principal_name
                .as_deref()
                .is_some_and(|u| same(u, v)),
            Clause::ProxyAddress(v) => user.proxy_addresses.iter().flatten().any(|p| same(p, v)),
        })
    }
}

/// Graph's string equality here ignores case. Without allocating in the common (ASCII)
/// case: a lookup scans the whole tenant under the simulator's lock.
/// Lower-cased `mail`, `userPrincipalName` and whole `proxyAddresses` entries → the keys of
/// the users holding them: a filter looks its values up here instead of scanning the
/// tenant under the simulator's lock (real Graph answers these filters from an index too).
/// The candidates are then checked with [`UserFilter::matches`], so the answer is the scan's.
#[derive(Debug, Default)]
pub(super) struct AddressIndex(HashMap<String, BTreeSet<String>>);

impl AddressIndex {
    fn terms(user: &GraphUser) -> impl Iterator<Item = String> + '_ {
        user.mail
            .iter()
            .chain(user.user_principal_name.iter())
            .chain(user.proxy_addresses.iter().flatten())
            .map(|t| t.to_lowercase())
    }

    /// `key`'s user changed from `before` to `after` (`None`: absent).
    pub fn replace(&mut self, key: &str, before: Option<&GraphUser>, after: Option<&GraphUser>) {
        for term in before.into_iter().flat_map(Self::terms) {
            if let Some(keys) = self.0.get_mut(&term) {
                keys.remove(key);
                if keys.is_empty() {
                    self.0.remove(&term);
                }
            }
        }
        for term in after.into_iter().flat_map(Self::terms) {
            self.0.entry(term).or_default().insert(key.to_owned());
        }
    }

    /// The keys of every user that may match `filter`, in key order (as a scan finds them).
    pub fn candidates(&self, filter: &UserFilter) -> BTreeSet<String> {
        filter
            .clauses
            .iter()
            .map(|c| match c {
                Clause::Mail(v) | Clause::UserPrincipalName(v) | Clause::ProxyAddress(v) => v,
            })
            .filter_map(|v| self.0.get(&v.to_lowercase()))
            .flatten()
            .cloned()
            .collect()
    }
}

fn same(a: &str, b: &str) -> bool {
    if a.is_ascii() && b.is_ascii() {
        a.eq_ignore_ascii_case(b)
    } else {
        a.to_lowercase() == b.to_lowercase()
    }
}

/// A position in the filter text.
struct Cursor<'a> {
    text: &'a str,
    pos: usize,
}

impl Cursor<'_> {
    fn rest(&self) -> &str {
        &self.text[self.pos..]
    }

    fn at_end(&self) -> bool {
        self.pos >= self.text.len()
    }

    /// Skip whitespace; whether there was any.
    fn whitespace(&mut self) -> bool {
        let skipped = self.rest().len() - self.rest().trim_start().len();
        self.pos += skipped;
        skipped > 0
    }

    /// An identifier: a letter or `_`, then letters, digits and `_`.
    fn identifier(&mut self) -> Option<&str> {
        let rest = self.rest();
        let first = rest.chars().next()?;
        if !(first.is_ascii_alphabetic() || first == '_') {
            return None;
        }
        let len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let start = self.pos;
        self.pos += len;
        Some(&self.text[start..self.pos])
    }

    /// `word` (case-insensitively) as a whole identifier; nothing consumed otherwise.
    fn keyword(&mut self, word: &str) -> bool {
        let start = self.pos;
        match self.identifier() {
            Some(id) if id.eq_ignore_ascii_case(word) => true,
            _ => {
                self.pos = start;
                false
            }
        }
    }

    fn punct(&mut self, c: char) -> bool {
        let found = self.rest().starts_with(c);
        if found {
            self.pos += c.len_utf8();
        }
        found
    }

    fn clause(&mut self) -> Result<Clause, ApiError> {
        let start = self.pos;
        let Some(name) = self.identifier().map(str::to_owned) else {
            return Err(self.unsupported_or_syntax());
        };
        if name.eq_ignore_ascii_case("proxyAddresses") {
            return self.proxy_clause();
        }
        let make: fn(String) -> Clause = if name.eq_ignore_ascii_case("mail") {
            Clause::Mail
        } else if name.eq_ignore_ascii_case("userPrincipalName") {
            Clause::UserPrincipalName
        } else {
            self.pos = start;
            return Err(unsupported(&name));
        };
        self.eq_string(&name).map(make)
    }

    /// `RWS eq RWS 'string'` after a property (or a lambda variable) named `name`.
    fn eq_string(&mut self, name: &str) -> Result<String, ApiError> {
        if !(self.whitespace() && self.keyword("eq")) {
            return Err(unsupported(name));
        }
        if !self.whitespace() {
            return Err(self.syntax());
        }
        self.string()
    }

    /// After `proxyAddresses`: `/any(x:x eq 'string')`.
    fn proxy_clause(&mut self) -> Result<Clause, ApiError> {
        if !(self.punct('/') && self.keyword("any") && self.punct('(')) {
            return Err(unsupported("proxyAddresses"));
        }
        self.whitespace();
        let Some(var) = self.identifier().map(str::to_owned) else {
            return Err(self.syntax());
        };
        self.whitespace();
        if !self.punct(':') {
            return Err(self.syntax());
        }
        self.whitespace();
        if self.identifier() != Some(var.as_str()) {
            return Err(unsupported("proxyAddresses"));
        }
        let value = self.eq_string("proxyAddresses")?;
        self.whitespace();
        if !self.punct(')') {
            return Err(self.unsupported_or_syntax());
        }
        Ok(Clause::ProxyAddress(value))
    }

    /// `'…'` with `''` standing for one quote.
    fn string(&mut self) -> Result<String, ApiError> {
        if !self.punct('\'') {
            return Err(self.unsupported_or_syntax());
        }
        let mut value = String::new();
        loop {
            let Some(c) = self.rest().chars().next() else {
                return Err(self.syntax());
            };
            self.pos += c.len_utf8();
            if c != '\'' {
                value.push(c);
            } else if self.punct('\'') {
                value.push('\'');
            } else {
                return Ok(value);
            }
        }
    }

    /// Graph's answer for what follows here: an identifier (a property, operator or
    /// function) or a parenthesis is a filter the simulator does not model; anything else
    /// is a syntax error.
    fn unsupported_or_syntax(&mut self) -> ApiError {
        if self.rest().starts_with('(') {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "Request_UnsupportedQuery",
                "Unsupported Query.",
            );
        }
        let start = self.pos;
        match self.identifier().map(str::to_owned) {
            Some(word) => {
                self.pos = start;
                unsupported(&word)
            }
            None => self.syntax(),
        }
    }

    fn syntax(&self) -> ApiError {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!(
                "Invalid filter clause: syntax error at position {} in '{}'.",
                self.pos, self.text
            ),
        )
    }
}

/// Graph's 400 for a filter on something it (here: the simulator) does not support.
fn unsupported(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "Request_UnsupportedQuery",
        format!(
            "Unsupported or invalid query filter clause specified for property '{what}' of resource 'User'."
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parse `text` and render the outcome as one line: the clauses, or the error code.
    fn check(text: &str, want: &str) {
        let got = match UserFilter::parse(text) {
            Ok(f) => f
                .clauses
                .iter()
                .map(|c| match c {
                    Clause::Mail(v) => format!("mail={v}"),
                    Clause::UserPrincipalName(v) => format!("upn={v}"),
                    Clause::ProxyAddress(v) => format!("proxy={v}"),
                })
                .collect::<Vec<_>>()
                .join(" | "),
            Err(e) => format!("{} {}", e.status.as_u16(), e.code),
        };
        assert_eq!(got, want, "{text}");
    }

    fn user(id: &str, mail: &str, proxies: &[&str]) -> GraphUser {
        GraphUser {
            id: id.into(),
            mail: Some(mail.into()),
            user_principal_name: Some(format!("{id}@x.com")),
            proxy_addresses: Some(proxies.iter().map(|p| (*p).to_owned()).collect()),
            ..GraphUser::default()
        }
    }

    /// The index finds what a scan finds, through inserts, changes and removals.
    #[test]
    fn the_address_index_answers_as_a_scan_would() {
        let mut users = std::collections::BTreeMap::new();
        let mut index = AddressIndex::default();
        let put = |users: &mut std::collections::BTreeMap<String, GraphUser>,
                   index: &mut AddressIndex,
                   u: Option<GraphUser>,
                   key: &str| {
            let before = match &u {
                Some(u) => users.insert(key.to_owned(), u.clone()),
                None => users.remove(key),
            };
            index.replace(key, before.as_ref(), u.as_ref());
        };
        put(
            &mut users,
            &mut index,
            Some(user("a", "Shared@X.com", &["SMTP:a@x.com"])),
            "a",
        );
        put(
            &mut users,
            &mut index,
            Some(user("b", "b@x.com", &["smtp:shared@x.com"])),
            "b",
        );
        put(
            &mut users,
            &mut index,
            Some(user("c", "c@x.com", &["SMTP:c@x.com"])),
            "c",
        );
        put(
            &mut users,
            &mut index,
            Some(user("c", "shared@x.com", &[])),
            "c",
        );
        put(&mut users, &mut index, None, "a");
        put(
            &mut users,
            &mut index,
            Some(user("d", "ÄRGER@x.com", &[])),
            "d",
        );
        for text in [
            "mail eq 'shared@x.com' or proxyAddresses/any(p:p eq 'smtp:shared@x.com')",
            "mail eq 'SHARED@x.com'",
            "proxyAddresses/any(p:p eq 'SMTP:c@x.com')",
            "userPrincipalName eq 'A@X.COM' or mail eq 'c@x.com'",
            "mail eq 'ärger@x.com'",
        ] {
            let f = UserFilter::parse(text).unwrap();
            let scan: Vec<&str> = users
                .values()
                .filter(|u| f.matches(u))
                .map(|u| u.id.as_str())
                .collect();
            let indexed: Vec<&str> = index
                .candidates(&f)
                .iter()
                .filter_map(|k| users.get(k))
                .filter(|u| f.matches(u))
                .map(|u| u.id.as_str())
                .collect();
            assert_eq!(indexed, scan, "{text}");
        }
        let f = UserFilter::parse(
            "mail eq 'shared@x.com' or proxyAddresses/any(p:p eq 'smtp:shared@x.com')",
        )
        .unwrap();
        assert_eq!(
            index.candidates(&f).into_iter().collect::<Vec<_>>(),
            ["b", "c"]
        );
    }

    #[test]
    fn the_clients_grammar_parses() {
        check("mail eq 'a@x.com'", "mail=a@x.com");
        check(
            "mail eq 'a@x.com' or userPrincipalName eq 'a@x.com' or proxyAddresses/any(p:p eq 'smtp:a@x.com')",
            "mail=a@x.com | upn=a@x.com | proxy=smtp:a@x.com",
        );
        check(
            "  MAIL  EQ  'A@x.com'  OR  userprincipalname eq ''  ",
            "mail=A@x.com | upn=",
        );
        check(
            "proxyAddresses/any( addr : addr eq 'SMTP:a@x.com' )",
            "proxy=SMTP:a@x.com",
        );
        check("mail eq 'o''brien@x.com'", "mail=o'brien@x.com");
        check("mail eq ''''", "mail='");
        check("mail eq 'a or b eq ''c'''", "mail=a or b eq 'c'");
    }

    #[test]
    fn malformed_filters_are_bad_requests() {
        for text in [
            "",
            "   ",
            "mail eq 'unterminated",
            "mail eq 'o'brien@x.com'",
            "mail eq 'a' or",
            "mail eq 'a' or ",
            "mail eq 'a' 'b'",
            "proxyAddresses/any(:p eq 'a')",
            "proxyAddresses/any(p p eq 'a')",
            "'a' eq mail",
            "mail eq 'a'or userPrincipalName eq 'b'",
            "mail eq'a'",
            "mail eq 5",
        ] {
            check(text, "400 BadRequest");
        }
    }

    #[test]
    fn unmodelled_filters_are_unsupported_queries() {
        for text in [
            "accountEnabled eq true",
            "mail ne 'a'",
            "mail eq 'a' and userPrincipalName eq 'a'",
            "startswith(mail,'a')",
            "endswith(mail,'@x.com')",
            "mail in ('a','b')",
            "mail eq null",
            "(mail eq 'a')",
            "proxyAddresses eq 'a'",
            "proxyAddresses/all(p:p eq 'a')",
            "proxyAddresses/any(p:q eq 'a')",
            "proxyAddresses/any(p:startswith(p,'smtp:'))",
            "proxyAddresses/any(p:p eq 'a' or p eq 'b')",
            "otherMails/any(p:p eq 'a')",
            "NOT(mail eq 'a')",
        ] {
            check(text, "400 Request_UnsupportedQuery");
        }
    }

    #[test]
    fn matching_is_case_insensitive_on_the_whole_value() {
        let user = GraphUser {
            id: "u".into(),
            mail: Some("Alice@Example.com".into()),
            user_principal_name: Some("alice.upn@example.com".into()),
            proxy_addresses: Some(vec![
                "SMTP:Alice@Example.com".into(),
                "smtp:al@example.com".into(),
            ]),
            ..Default::default()
        };
        for (text, hit) in [
            ("mail eq 'alice@example.COM'", true),
            ("mail eq 'alice@example.co'", false),
            ("userPrincipalName eq 'ALICE.UPN@example.com'", true),
            ("proxyAddresses/any(x:x eq 'smtp:alice@example.com')", true),
            ("proxyAddresses/any(x:x eq 'SMTP:AL@example.com')", true),
            ("proxyAddresses/any(x:x eq 'alice@example.com')", false),
            (
                "mail eq 'nobody@x.com' or userPrincipalName eq 'alice.upn@example.com'",
                true,
            ),
        ] {
            assert_eq!(
                UserFilter::parse(text).unwrap().matches(&user),
                hit,
                "{text}"
            );
        }
        assert!(
            !UserFilter::parse("mail eq ''")
                .unwrap()
                .matches(&GraphUser::default())
        );
    }
}
