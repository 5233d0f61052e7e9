//! A bucket that pushes back, as S3 does when a new node pool stages the same bundle at once: the
//! loopback server takes N requests per second and answers the rest `503 SlowDown`.

use std::sync::Arc;
use std::time::Duration;

use integration_tests::fleet::{self, Pool};
use integration_tests::s3::{RequestRate, S3Server};

const BUCKET: &str = "fleet-drivers";

fn pool(stagers: usize) -> Pool {
    Pool {
        stagers,
        part_size: 64 * 1024,
        concurrency: 8,
        start_jitter: Duration::from_secs(2),
        backoff: Duration::from_millis(100),
        patience: Duration::from_secs(300),
    }
}

/// 200 stagers, a bucket that takes 150 requests per second: every stager gets the bundle, none
/// gives up on throttling, and each is refused a bounded number of times (full jitter and halving
/// its requests in flight keep it from hammering).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_stagers_all_succeed_against_a_throttling_bucket() {
    let work = tempfile::tempdir().expect("tempdir");
    let server = S3Server::start();
    let size = fleet::publish(&server, BUCKET, work.path(), 192 * 1024).await;
    assert!(size > 3 * 64 * 1024, "the bundle takes several ranged GETs ({size} bytes)");
    server.log().clear();
    server.set_request_rate(Some(RequestRate::new(150.0, 15.0, None)));

    let pool = pool(200);
    let outcomes = fleet::stage_all(&server, BUCKET, &work.path().join("nodes"), &pool).await;

    let failed: Vec<_> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    assert!(failed.is_empty(), "{} stagers failed, first: {:?}", failed.len(), failed.first());
    let counts = fleet::per_stager(&server, pool.stagers);
    let refused: usize = counts.iter().map(|(_, refused)| refused).sum();
    let sent: usize = counts.iter().map(|(sent, _)| sent).sum();
    let worst = counts.iter().map(|(_, refused)| *refused).max().unwrap_or(0);
    eprintln!("{sent} requests, {refused} refused with 503 SlowDown, at most {worst} for one stager");
    assert!(refused > 0, "the bucket throttled (else this test proves nothing)");
    assert_eq!(sent, server.log().len(), "every request carries its stager's name in the User-Agent (app/<node>)");
    // Each stager needs 11 requests. Backing off on a shared level that falls only after several
    // successes settles at about one refusal per few successes; stagers retrying in step would
    // be refused about once per success or more.
    assert!(worst <= 20, "a stager was refused {worst} times: {counts:?}");
    assert!(refused <= 8 * pool.stagers, "{refused} refusals for {} stagers", pool.stagers);
    for outcome in &outcomes {
        assert_eq!(
            outcome.stats.throttled as usize,
            counts[outcome.name[5..].parse::<usize>().expect("index")].1,
            "{}: the stager saw each refusal the server sent",
            outcome.name
        );
    }
    for i in [0, 99, 199] {
        let host = work.path().join("nodes").join(fleet::stager_name(i));
        let current = host.join("opt/nvidia-installer/current");
        assert!(current.join("manifest.json").is_file(), "{} has its bundle", current.display());
    }
}

/// Throttling is not failure: a bucket that refuses everything for a while is waited out even
/// with a single attempt allowed for failures, and `Retry-After` is honoured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_is_waited_out_and_retry_after_is_honoured() {
    let work = tempfile::tempdir().expect("tempdir");
    let server = Arc::new(S3Server::start());
    fleet::publish(&server, BUCKET, work.path(), 64 * 1024).await;
    server.log().clear();
    // No tokens: everything is refused, asking for two seconds.
    server.set_request_rate(Some(RequestRate::new(0.0, 0.0, Some(2))));
    let lift = {
        let server = Arc::clone(&server);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            server.set_request_rate(None);
        })
    };
    let pool = Pool { start_jitter: Duration::ZERO, ..pool(1) };
    let outcomes = fleet::stage_all(&server, BUCKET, &work.path().join("nodes"), &pool).await;
    lift.await.expect("lift");
    assert!(outcomes[0].result.is_ok(), "{:?}", outcomes[0].result);
    let entries = server.log().entries();
    let refused: Vec<_> = entries.iter().filter(|e| e.status == Some(503)).collect();
    assert!(refused.len() >= 2, "refused {} times", refused.len());
    // After each refusal the stager's next request came no sooner than Retry-After asked.
    for pair in entries.windows(2) {
        if pair[0].status == Some(503) {
            let gap = pair[1].received.duration_since(pair[0].received);
            assert!(gap >= Duration::from_secs(2), "retried after {gap:?} although Retry-After said 2 s");
        }
    }
    assert!(entries.iter().any(|e| e.status == Some(206) || e.status == Some(200)));
}

/// A stager still throttled at its deadline fails, saying so, with the bucket and key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn still_throttled_at_the_deadline_fails_naming_the_bucket() {
    let work = tempfile::tempdir().expect("tempdir");
    let server = S3Server::start();
    fleet::publish(&server, BUCKET, work.path(), 64 * 1024).await;
    server.set_request_rate(Some(RequestRate::new(0.0, 0.0, None)));
    let pool = Pool { start_jitter: Duration::ZERO, patience: Duration::from_secs(2), ..pool(1) };
    let outcomes = fleet::stage_all(&server, BUCKET, &work.path().join("nodes"), &pool).await;
    let error = outcomes[0].result.as_ref().expect_err("gives up at the deadline");
    assert!(error.contains("still throttled at the deadline"), "{error}");
    assert!(error.contains(BUCKET), "{error}");
    assert!(outcomes[0].stats.throttled >= 2, "{:?}", outcomes[0].stats);
}
