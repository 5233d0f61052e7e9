//! A node pool staging at once: many in-process stagers, each with its own host root, S3 client
//! (own connections, own TLS sessions) and pacing, against one loopback S3 server, as the nodes of
//! a new pool would reach one bucket. Shared by the throttling test and the fleet benchmark.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nvidia_contract::layout::Layout;
use nvidia_installer::bundle::archive::Limits;
use nvidia_installer::bundle::pack::BundleInfo;
use nvidia_installer::node::stage::{self, StageRequest};
use nvidia_installer::s3::{ThrottleStats, Transfer};

use crate::fixtures::{host_root, publish_sample, s3_options};
use crate::s3::S3Server;

pub const KERNEL: &str = "6.1.0-47-amd64";
pub const DRIVER: &str = "535.261.03";
pub const GARDENLINUX: &str = "1877.3";

/// How the pool stages.
#[derive(Debug, Clone)]
pub struct Pool {
    pub stagers: usize,
    pub part_size: u64,
    pub concurrency: usize,
    pub start_jitter: Duration,
    pub backoff: Duration,
    /// How long each stager retries throttling.
    pub patience: Duration,
}

/// What one stager did.
#[derive(Debug)]
pub struct Outcome {
    pub name: String,
    pub result: Result<(), String>,
    pub stats: ThrottleStats,
    pub elapsed: Duration,
}

/// Pack the sample driver with `lib_bytes` of incompressible library and publish it to `bucket`
/// (created here); returns the archive's size.
pub async fn publish(server: &S3Server, bucket: &str, work: &Path, lib_bytes: usize) -> u64 {
    server.create_bucket(bucket);
    let info = BundleInfo {
        driver_version: DRIVER.to_owned(),
        kernel_release: KERNEL.to_owned(),
        flavor: "open".to_owned(),
        gardenlinux_version: Some(GARDENLINUX.to_owned()),
    };
    publish_sample(server, bucket, work, &info, lib_bytes).await;
    let bundle = work.join("bundle.tar.zst");
    std::fs::metadata(&bundle).expect("bundle").len()
}

/// The name stager `i` gives itself (its `User-Agent` carries `app/<name>`).
pub fn stager_name(i: usize) -> String {
    format!("node-{i:04}")
}

/// Stage on `pool.stagers` host roots under `work` at once; every stager's outcome, in order.
pub async fn stage_all(server: &S3Server, bucket: &str, work: &Path, pool: &Pool) -> Vec<Outcome> {
    let mut tasks = Vec::with_capacity(pool.stagers);
    for i in 0..pool.stagers {
        let host: PathBuf = work.join(stager_name(i));
        host_root(&host, KERNEL).expect("host root");
        let mut s3 = s3_options(server, bucket);
        s3.app_name = Some(stager_name(i));
        let request = StageRequest {
            gardenlinux_version: GARDENLINUX.to_owned(),
            kernel_release: KERNEL.to_owned(),
            driver_version: DRIVER.to_owned(),
            s3,
            transfer: Transfer {
                part_size: pool.part_size,
                backoff: pool.backoff,
                start_jitter: pool.start_jitter,
                ..Transfer::new(pool.concurrency, pool.patience)
            },
            limits: Limits::default(),
            flavors: None,
            trust: None,
        };
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let layout = Layout::new(&host, "/opt/nvidia-installer");
            let result = stage::stage(&layout, &request).await.map(drop).map_err(|e| format!("{e:#}"));
            Outcome {
                name: stager_name(i),
                result,
                stats: request.transfer.throttle.stats(),
                elapsed: started.elapsed(),
            }
        }));
    }
    let mut outcomes = Vec::with_capacity(tasks.len());
    for task in tasks {
        outcomes.push(task.await.expect("stager task"));
    }
    outcomes
}

/// Requests the server logged per stager: (sent, refused with 503).
pub fn per_stager(server: &S3Server, stagers: usize) -> Vec<(usize, usize)> {
    let entries = server.log().entries();
    (0..stagers)
        .map(|i| {
            let tag = format!("app/{}", stager_name(i));
            let mine: Vec<_> =
                entries.iter().filter(|e| e.user_agent.as_deref().is_some_and(|ua| ua.contains(&tag))).collect();
            (mine.len(), mine.iter().filter(|e| e.status == Some(503)).count())
        })
        .collect()
}
