//! Support for the workspace's integration tests and benchmarks: real servers on loopback.

pub mod fixtures;
pub mod fleet;
pub mod kernel;
pub mod kube;
pub mod s3;
mod support;
