//! A node pool staging at once against a bucket that throttles: 200 in-process stagers (each its
//! own host root, S3 client, connections and pacing) stage the same small bundle from the loopback
//! S3 server, which takes N requests per second and answers the rest `503 SlowDown`. In the same
//! run, the same pool against the unthrottled server (what the machine itself allows), and the
//! limit the throttle sets: the requests the pool needs divided by N. Reported: the total time and
//! its ratio to both, requests refused per stager (mean and worst), and every stager's outcome.
//!
//! Run: `cargo bench -p nvidia-installer --bench fleet` (`-- --quick`: 100 stagers, one rate).

use std::time::{Duration, Instant};

use integration_tests::fleet::{self, Pool};
use integration_tests::s3::{RequestRate, S3Server};

const BUCKET: &str = "fleet-bench";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !(args.len() <= 1 || args.iter().any(|a| a == "--bench" || a == "--quick")) {
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let stagers = if quick { 100 } else { 200 };
    let rates: &[f64] = if quick { &[150.0] } else { &[100.0, 200.0, 400.0] };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let work = tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")).expect("work dir");
    let server = S3Server::start();
    let size = runtime.block_on(fleet::publish(&server, BUCKET, work.path(), 448 * 1024));
    let pool = Pool {
        stagers,
        part_size: 64 * 1024,
        concurrency: 8,
        start_jitter: Duration::from_secs(2),
        backoff: Duration::from_millis(200),
        patience: Duration::from_secs(600),
    };
    println!(
        "# fleet staging: {stagers} stagers, {:.0} KiB bundle in {} KiB parts, start jitter {:?}, backoff {:?}",
        size as f64 / 1024.0,
        pool.part_size >> 10,
        pool.start_jitter,
        pool.backoff
    );

    let run = |round: &str, rate: Option<f64>| {
        server.log().clear();
        server.set_request_rate(rate.map(|n| RequestRate::new(n, n / 10.0, None)));
        let nodes = work.path().join(round);
        let started = Instant::now();
        let outcomes = runtime.block_on(fleet::stage_all(&server, BUCKET, &nodes, &pool));
        let elapsed = started.elapsed();
        std::fs::remove_dir_all(&nodes).expect("cleanup");
        let failed = outcomes.iter().filter(|o| o.result.is_err()).count();
        let counts = fleet::per_stager(&server, stagers);
        let sent: usize = counts.iter().map(|c| c.0).sum();
        let refused: usize = counts.iter().map(|c| c.1).sum();
        let worst = counts.iter().map(|c| c.1).max().unwrap_or(0);
        (elapsed, failed, sent, refused, worst)
    };

    let (open, failed, sent, _, _) = run("open", None);
    assert_eq!(failed, 0, "stagers failed against the open server");
    let needed = sent;
    println!(
        "unthrottled: {:.2} s for {needed} requests ({:.0} req/s, {:.1} MB/s of bundles)",
        open.as_secs_f64(),
        needed as f64 / open.as_secs_f64(),
        (size * stagers as u64) as f64 / open.as_secs_f64() / 1e6
    );
    println!(
        "| N req/s | total s | limit s (requests/N) | total/limit | total/unthrottled | refused/stager mean | worst | failed |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &rate in rates {
        let (elapsed, failed, _, refused, worst) = run(&format!("n{rate}"), Some(rate));
        // The bucket lets the first burst through at once.
        let limit = ((needed as f64 - rate / 10.0) / rate).max(open.as_secs_f64());
        println!(
            "| {rate:.0} | {:.2} | {limit:.2} | {:.2} | {:.2} | {:.2} | {worst} | {failed} |",
            elapsed.as_secs_f64(),
            elapsed.as_secs_f64() / limit,
            elapsed.as_secs_f64() / open.as_secs_f64(),
            refused as f64 / stagers as f64,
        );
    }
}
