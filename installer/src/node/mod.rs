//! The node agent: what runs on every GPU node.
//!
//! [`stage`] brings a bundle from the bucket into the host [`cache`] (verified, atomic, under the
//! host [`lock`]); [`install`] loads its [`modules`] through the [`kernel`] seam, makes the
//! [`devices`], runs `nvidia-smi`, writes the [`ready`] marker and reports to the Kubernetes
//! [`api`]; `wait` (in [`ready`]) gates GPU pods on that marker; [`status`] and [`gc`] look after
//! the cache.

pub mod api;
pub mod cache;
pub mod devices;
pub mod firmware;
pub mod gc;
pub mod gpus;
pub mod holders;
pub mod install;
pub mod kernel;
pub mod lock;
pub mod metrics;
pub mod modules;
pub mod ready;
pub mod stage;
pub mod status;
