//! Offset paging of the simulator's directory lists (`transitiveMemberOf`, `/users`):
//! `$top` (1..=999, default 100, as Graph's directory lists) and a `$skiptoken` that is the
//! offset, carried with the rest of the query in `@odata.nextLink`.

use super::api::{ApiError, query_option};

/// Graph's largest directory page.
pub(super) const MAX_TOP: usize = 999;
/// Graph's page without `$top`.
pub(super) const DEFAULT_TOP: usize = 100;

/// Where a page starts and how many items it may hold (before any service-side cap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Paging {
    pub top: usize,
    pub skip: usize,
}

impl Paging {
    /// `$top` and `$skiptoken` of a request, with Graph's 400 for a page size out of range.
    pub fn from_query(query: Option<&str>) -> Result<Self, ApiError> {
        let top = match query_option(query, "top") {
            None => DEFAULT_TOP,
            Some(t) => t
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=MAX_TOP).contains(n))
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "Invalid page size specified: '{t}'. Must be between 1 and {MAX_TOP} inclusive."
                    ))
                })?,
        };
        let skip = match query_option(query, "skiptoken") {
            None => 0,
            Some(t) => t
                .parse::<usize>()
                .map_err(|_| ApiError::bad_request("Invalid $skiptoken."))?,
        };
        Ok(Self { top, skip })
    }
}

/// The request's query with `$skiptoken` set to `skip`.
pub(super) fn next_query(query: Option<&str>, skip: usize) -> String {
    let mut out = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if !k.trim_start_matches('$').eq_ignore_ascii_case("skiptoken") {
            out.append_pair(&k, &v);
        }
    }
    out.append_pair("$skiptoken", &skip.to_string());
    out.finish()
}
