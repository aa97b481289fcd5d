//! Reading what the token endpoint hands out: the client-credentials answer, when to
//! refresh a token, and the `roles` claim of a JWT access token (read, never verified: see
//! [`super::client`]). No IO.

use std::time::Duration;

use serde::Deserialize;

/// Refresh a cached token this long before it expires (at most; see [`refresh_margin`]).
const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);

/// How long before expiry a token is refreshed: 5 minutes, or a tenth of its lifetime.
pub(super) fn refresh_margin(lifetime: Duration) -> Duration {
    REFRESH_MARGIN.min(lifetime / 10)
}

/// The token endpoint's answer. Not `Debug`: it holds the token.
#[derive(Deserialize)]
pub(super) struct TokenAnswer {
    pub token_type: String,
    pub expires_in: ExpiresIn,
    pub access_token: String,
}

/// `expires_in` is a number from the v2 endpoint; older endpoints sent a string.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum ExpiresIn {
    Number(u64),
    Text(String),
}

impl ExpiresIn {
    pub fn seconds(&self) -> Option<u64> {
        match self {
            Self::Number(n) => Some(*n),
            Self::Text(s) => s.trim().parse().ok(),
        }
    }
}

/// The `roles` claim of a JWT access token, read without verifying the signature (see the
/// module docs). `None` unless the token is a three-part JWS whose payload is a JSON object
/// with `roles` as an array of strings; an encrypted (five-part) or opaque token is `None`.
pub(super) fn roles_in_token(token: &str) -> Option<Vec<String>> {
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    #[derive(Deserialize)]
    struct Claims {
        roles: Option<Vec<String>>,
    }
    let claims: Claims = serde_json::from_slice(&base64url_decode(payload)?).ok()?;
    claims.roles
}

/// Base64url without padding (RFC 4648 §5, as JWTs use it); trailing `=` is tolerated.
/// Crate-visible so that the Graph simulator's tests can read the tokens it mints.
pub(crate) fn base64url_decode(input: &str) -> Option<Vec<u8>> {
    let input = input.trim_end_matches('=');
    // One leftover character carries 6 bits: not a whole byte, so not base64.
    if input.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(input.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for b in input.bytes() {
        let sextet = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(sextet);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}
