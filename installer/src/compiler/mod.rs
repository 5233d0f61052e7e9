//! The compiler instance: [`compile`] builds a bundle from a driver source and kernel headers;
//! [`fifo`] carries compile requests from the `modulus` container to the privileged `dev`
//! container over named pipes; [`download`] fetches a driver source over HTTPS; [`publish`]
//! uploads the bundle to the bucket.

pub mod compile;
pub mod download;
pub mod fifo;
pub mod publish;
