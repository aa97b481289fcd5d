//! W3C Trace Context (`traceparent`) for messages on the bus.
//!
//! A trace starts where a change enters flagrelay (the receiver, continuing the caller's
//! trace when an HTTP `traceparent` came with the notification) and follows the message to
//! the worker and into the outcome event, so one trace id ties a Graph notification to the
//! Proofpoint write it caused. Only the `traceparent` form is handled: version `00`, a 16-byte
//! trace id, an 8-byte parent (span) id and one byte of flags, all lowercase hex.

use std::fmt;

/// A parsed `traceparent`: which trace, which span produced it, and the trace flags.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceContext {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    flags: u8,
}

/// Flag bit 0: the producer sampled (records) this trace.
const SAMPLED: u8 = 0x01;

impl TraceContext {
    /// A new trace, sampled, with a random trace id and span id.
    pub fn new_root() -> Self {
        Self {
            trace_id: nonzero(),
            span_id: nonzero(),
            flags: SAMPLED,
        }
    }

    /// The context of a new span in the same trace whose parent is `self`.
    pub fn child(&self) -> Self {
        Self {
            span_id: nonzero(),
            ..*self
        }
    }

    /// Parse a `traceparent` value; `None` when it is not a valid one (W3C Trace Context:
    /// lowercase hex, ids not all zero, version `ff` forbidden; a later version is read by
    /// its version-00 prefix when what follows is separated by `-`).
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        let bytes = value.as_bytes();
        if bytes.len() < 55 {
            return None;
        }
        let version = hex_bytes::<1>(&value[0..2])?[0];
        let exact = bytes.len() == 55;
        let extended = bytes.len() > 55 && bytes[55] == b'-';
        let acceptable = match version {
            0xff => false,
            0 => exact,
            _ => exact || extended,
        };
        if !acceptable {
            return None;
        }
        if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return None;
        }
        let trace_id = hex_bytes::<16>(&value[3..35])?;
        let span_id = hex_bytes::<8>(&value[36..52])?;
        let flags = hex_bytes::<1>(&value[53..55])?[0];
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            flags,
        })
    }

    /// The trace id, 32 lowercase hex characters (what logs and trace back-ends show).
    pub fn trace_id(&self) -> String {
        hex::encode(self.trace_id)
    }

    /// The span id, 16 lowercase hex characters.
    pub fn span_id(&self) -> String {
        hex::encode(self.span_id)
    }

    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }
}

/// The `traceparent` header value (version `00`).
impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.trace_id(),
            self.span_id(),
            self.flags
        )
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceContext({self})")
    }
}

/// Exactly `N` bytes from `2 * N` lowercase hex characters (W3C forbids upper case).
fn hex_bytes<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// Random bytes that are not all zero (an all-zero id is invalid).
fn nonzero<const N: usize>() -> [u8; N] {
    loop {
        let bytes: [u8; N] = rand::random();
        if bytes != [0; N] {
            return bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_prints_the_same_value() {
        let t = TraceContext::parse(VALID).unwrap();
        assert_eq!(t.to_string(), VALID);
        assert_eq!(t.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.span_id(), "00f067aa0ba902b7");
        assert!(t.sampled());
    }

    #[test]
    fn rejects_what_the_specification_rejects() {
        for bad in [
            "",
            "garbage",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", // upper case
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01", // zero trace id
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", // zero span id
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // forbidden version
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x", // 00 has no suffix
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_later_version_is_read_by_its_prefix() {
        let t = TraceContext::parse(&format!("01{}-extra", &VALID[2..])).unwrap();
        assert_eq!(t.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(TraceContext::parse(&format!("01{}x", &VALID[2..])), None);
    }

    #[test]
    fn children_keep_the_trace_and_get_a_new_span() {
        let root = TraceContext::new_root();
        let child = root.child();
        assert_eq!(child.trace_id(), root.trace_id());
        assert_ne!(child.span_id(), root.span_id());
        assert_eq!(TraceContext::parse(&child.to_string()), Some(child));
        assert_ne!(TraceContext::new_root().trace_id(), root.trace_id());
    }
}
