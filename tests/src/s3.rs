//! A real S3 server on loopback: `s3s` with the `s3s-fs` backend in a temp directory, request
//! signing checked, served over HTTPS by its own tokio runtime. In front of it sit fault injection,
//! a request log and an optional per-connection bandwidth cap, so tests see what a client of a
//! real bucket sees.
//!
//! ```no_run
//! use integration_tests::s3::{Fault, Method, S3Server};
//!
//! let server = S3Server::start();
//! server.create_bucket("drivers");
//! server.put_object("drivers", "bundle.tar.zst", b"...".to_vec());
//! server.faults().inject(Method::GET, "bundle.tar.zst", Fault::SlowDown);
//! // Run the binary under test with `server.env()`, then look at `server.log().entries()`.
//! ```

mod client;
mod faults;
mod log;
mod server;
mod store;
mod wire;

pub use self::client::{client, client_config};
pub use self::faults::{Fault, Faults};
pub use self::log::{LogEntry, RequestLog};
pub use self::server::{Options, S3Server};
pub use self::wire::RequestRate;
pub use hyper::{Method, StatusCode};
