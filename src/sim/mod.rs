//! Simulators
pub mod graph;
pub mod proofpoint;
