//! Queue conformance tests (being written).
