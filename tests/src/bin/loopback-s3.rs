//! The tests' S3 server as a process of its own, for tests written outside Rust (the container
//! tests in `tests/containers/`): HTTPS with SigV4 on 127.0.0.1, its own credentials and CA.
//!
//! ```sh
//! loopback-s3 --bucket nvidia-drivers
//! ```
//!
//! Prints one JSON line on stdout (`endpoint`, `port`, `caFile`, `accessKeyId`, `secretAccessKey`,
//! `region`, `bucket`) once it serves, then serves until its standard input closes. The request
//! log goes to standard error, one line per request, when it ends.

use std::io::Read as _;
use std::process::ExitCode;

use integration_tests::s3::S3Server;
use serde_json::json;

const USAGE: &str = "usage: loopback-s3 [--bucket NAME]...

Serves S3 over HTTPS on 127.0.0.1 until standard input closes; prints how to reach it as one JSON line.";

fn main() -> ExitCode {
    let mut buckets = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--bucket", Some(bucket)) => buckets.push(bucket),
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let server = S3Server::start();
    for bucket in &buckets {
        server.create_bucket(bucket);
    }
    let reach = json!({
        "endpoint": server.endpoint(),
        "port": server.addr().port(),
        "caFile": server.ca_file(),
        "accessKeyId": server.access_key(),
        "secretAccessKey": server.secret_key(),
        "region": server.region(),
        "bucket": buckets.first(),
    });
    println!("{reach}");
    // Serve until the parent closes our standard input (or goes away).
    let mut sink = Vec::new();
    if let Err(error) = std::io::stdin().read_to_end(&mut sink) {
        eprintln!("loopback-s3: reading standard input: {error}");
    }
    for entry in server.log().entries() {
        eprintln!("{entry:?}");
    }
    ExitCode::SUCCESS
}
