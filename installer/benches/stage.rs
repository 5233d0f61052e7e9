//! Staging benchmark: a ~400 MB bundle of incompressible driver bytes from the loopback S3 server,
//! through a per-connection bandwidth cap (default 85 MB/s, S3's per-connection figure), staged by
//! the real `nvidia-installer stage` process. In the same run:
//! - the baseline of the original system: one GET to a file, then sha256, then extract;
//! - the limit: the largest of the capped transfer at the same concurrency (GETs to nowhere),
//!   the slowest stage alone (decompression, hashing, writing the files), and the stages' CPU
//!   time divided by the cores. The transfer's CPU time includes the loopback server's (it runs in
//!   this process, on the same cores); hashing is what the stage verifies: the archive and the
//!   unpacked files;
//! - peak RSS of the staging process, and a cache hit.
//!
//! The stage, the transfer alone and the writing alone move with the machine (a shared virtual
//! disk, loopback TLS on two cores): they run in 5 alternating rounds and the medians are compared.
//!
//! Run: `cargo bench -p nvidia-installer --bench stage` (`-- --quick` for a 100 MB bundle;
//! `NVIDIA_BENCH_MBPS=0` for no cap).

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt;
use integration_tests::s3::{Options, S3Server};
use nvidia_installer::bundle::pack::{self, BundleInfo};
use nvidia_installer::s3::BundleKeys;
use sha2::Digest;

const KERNEL: &str = "6.1.0-47-amd64";
const DRIVER: &str = "535.261.03";
const GL: &str = "1877.3";
const BUCKET: &str = "bench-drivers";
const CONCURRENCY: usize = 8;
/// Rounds of (stage, transfer alone, writing alone); medians are reported.
const ROUNDS: usize = 5;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !(args.len() <= 1 || args.iter().any(|a| a == "--bench" || a == "--quick")) {
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let mbps: u64 = std::env::var("NVIDIA_BENCH_MBPS").ok().and_then(|v| v.parse().ok()).unwrap_or(85);
    let total: usize = if quick { 100 << 20 } else { 400 << 20 };
    let work = tempfile::tempdir_in(
        std::env::var("NVIDIA_BENCH_DIR")
            .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target").to_owned()),
    )
    .expect("work dir");
    println!(
        "# staging benchmark: {} MiB bundle, cap {} MB/s per connection, {CONCURRENCY} connections",
        total >> 20,
        mbps
    );

    let dir = bundle_dir(work.path(), total);
    let archive = work.path().join("bundle.tar.zst");
    let info = BundleInfo {
        driver_version: DRIVER.into(),
        kernel_release: KERNEL.into(),
        flavor: "open".into(),
        gardenlinux_version: Some(GL.into()),
    };
    let manifest = pack::describe(&dir, &info).expect("describe");
    let packed = pack::pack(&dir, &manifest, &archive, 3).expect("pack");
    std::fs::remove_dir_all(&dir).expect("cleanup");
    let size = packed.archive.as_ref().expect("archive").size;
    println!("archive: {:.1} MB", size as f64 / 1e6);

    let limit = (mbps > 0).then_some(mbps * 1_000_000);
    let server = S3Server::start_with(Options { bandwidth_limit: limit });
    server.create_bucket(BUCKET);
    let keys = BundleKeys::new(GL, KERNEL, DRIVER).expect("valid names");
    server.put_file(BUCKET, &keys.archive, &archive);
    server.put_object(BUCKET, &keys.manifest, packed.to_json());
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let options = integration_tests::fixtures::s3_options(&server, BUCKET);
    let client = runtime.block_on(nvidia_installer::s3::client(&options)).expect("client");

    // Ours: the real binary, as the DaemonSet runs it; alternating, round by round, with the two
    // stages whose times move with the machine (the transfer and the disk), so that each round
    // compares like with like. Medians are reported.
    // Decompression alone, first: it also tells how many bytes the files take.
    let cpu = cpu_now();
    let started = Instant::now();
    let mut decoder = zstd::stream::read::Decoder::new(std::fs::File::open(&archive).expect("open")).expect("zstd");
    let unpacked = std::io::copy(&mut decoder, &mut std::io::sink()).expect("decode");
    let decompress = (started.elapsed(), cpu_now() - cpu);
    let rounds = if quick { 1 } else { ROUNDS };
    let mut ours_runs = Vec::new();
    let mut transfers = Vec::new();
    let mut write_runs = Vec::new();
    let mut peak_rss_mib = 0.0f64;
    let host = work.path().join("host");
    for round in 0..rounds {
        if round > 0 {
            std::fs::remove_dir_all(&host).expect("cleanup");
        }
        let cpu_before = children_cpu();
        let started = Instant::now();
        let (output, peak_kib) =
            run_measured(stage_command(&server, &host).env("NVIDIA_INSTALLER_CONCURRENCY", CONCURRENCY.to_string()));
        let ours = started.elapsed();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        if std::env::var_os("NVIDIA_BENCH_STAGE_LOG").is_some() {
            eprint!("{}", String::from_utf8_lossy(&output.stderr));
        }
        ours_runs.push((ours, children_cpu() - cpu_before));
        peak_rss_mib = peak_rss_mib.max(peak_kib as f64 / 1024.0);

        let cpu = cpu_now();
        let started = Instant::now();
        runtime.block_on(transfer_only(&client, &keys.archive, size));
        transfers.push((started.elapsed(), cpu_now() - cpu));
        let cpu = cpu_now();
        let started = Instant::now();
        write_files(&work.path().join("writes"), unpacked);
        write_runs.push((started.elapsed(), cpu_now() - cpu));
    }
    let (ours, ours_cpu) = median(&ours_runs);
    let transfer = median(&transfers);
    let writes = median(&write_runs);

    // A cache hit: the bundle is staged and verified.
    let started = Instant::now();
    let output = stage_command(&server, &host).output().expect("stage");
    let cache_hit = started.elapsed();
    assert!(output.status.success());
    std::fs::remove_dir_all(&host).expect("cleanup");

    // Baseline: the original system's sequence.
    let baseline_dir = work.path().join("baseline");
    std::fs::create_dir_all(&baseline_dir).expect("dir");
    let started = Instant::now();
    let file = baseline_dir.join("bundle.tar.zst");
    runtime.block_on(async {
        let out = client.get_object().bucket(BUCKET).key(&keys.archive).send().await.expect("get");
        let mut body = out.body.into_async_read();
        let mut target = tokio::fs::File::create(&file).await.expect("file");
        tokio::io::copy(&mut body, &mut target).await.expect("download");
        target.sync_all().await.expect("sync");
    });
    let digest = hex::encode(sha2::Sha256::digest(std::fs::read(&file).expect("read")));
    assert_eq!(Some(digest.as_str()), packed.archive.as_ref().map(|a| a.sha256.as_str()));
    let decoder = zstd::stream::read::Decoder::new(std::fs::File::open(&file).expect("open")).expect("zstd");
    tar::Archive::new(decoder).unpack(baseline_dir.join("out")).expect("unpack");
    let baseline = started.elapsed();
    std::fs::remove_dir_all(&baseline_dir).expect("cleanup");

    // The limit, stage by stage (the transfer and the writes were measured in the rounds above).
    // Hashing: the archive (read from the page cache) and as many bytes as the files hold.
    let cpu = cpu_now();
    let started = Instant::now();
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut std::fs::File::open(&archive).expect("open"), &mut hasher).expect("hash");
    std::hint::black_box(hasher.finalize());
    let mut hasher = sha2::Sha256::new();
    let block = vec![0xa5u8; 256 * 1024];
    let mut left = unpacked;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        hasher.update(&block[..n]);
        left -= n as u64;
    }
    std::hint::black_box(hasher.finalize());
    let hash = (started.elapsed(), cpu_now() - cpu);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let cpu_bound = Duration::from_secs_f64((transfer.1 + decompress.1 + hash.1 + writes.1).as_secs_f64() / cores);
    let limit = [transfer.0, decompress.0, hash.0, writes.0, cpu_bound].into_iter().max().unwrap_or_default();

    let s = |d: Duration| d.as_secs_f64();
    let all = |runs: &[Duration]| runs.iter().map(|d| format!("{:.2}", d.as_secs_f64())).collect::<Vec<_>>().join(" ");
    println!("rounds: {rounds} (medians below)");
    println!("  stage runs          {}", all(&ours_runs.iter().map(|r| r.0).collect::<Vec<_>>()));
    println!("  transfer-alone runs {}", all(&transfers.iter().map(|r| r.0).collect::<Vec<_>>()));
    println!("  write-alone runs    {}", all(&write_runs.iter().map(|r| r.0).collect::<Vec<_>>()));
    println!(
        "nvidia-installer stage      {:7.2} s   ({:.0} MB/s, CPU {:.2} s)",
        s(ours),
        size as f64 / 1e6 / s(ours),
        s(ours_cpu)
    );
    println!("baseline (GET, sha256, tar) {:7.2} s", s(baseline));
    println!("limit                       {:7.2} s   = max of:", s(limit));
    println!(
        "  transfer alone ({CONCURRENCY} ranged GETs to nowhere) {:.2} s (CPU {:.2} s, the server's included)",
        s(transfer.0),
        s(transfer.1)
    );
    println!("  zstd decompression alone          {:.2} s (CPU {:.2} s)", s(decompress.0), s(decompress.1));
    println!("  sha256 of archive and files alone {:.2} s (CPU {:.2} s)", s(hash.0), s(hash.1));
    println!("  writing the files alone           {:.2} s (CPU {:.2} s)", s(writes.0), s(writes.1));
    println!("  stages' CPU / {cores} cores           {:.2} s", s(cpu_bound));
    println!("speed-up over baseline {:.2}x; time / limit {:.2}", s(baseline) / s(ours), s(ours) / s(limit));
    println!("peak RSS of stage {peak_rss_mib:.1} MiB; cache hit {:.0} ms", cache_hit.as_secs_f64() * 1000.0);
    signature_cost(&archive);
}

/// What checking a manifest's signature adds to a stage: the signature file fetched beside the
/// manifest aside (one small GET), the Ed25519 verification of the manifest's bytes.
fn signature_cost(archive: &Path) {
    use base64::Engine as _;
    use ring::signature::KeyPair as _;
    use sha2::Digest as _;
    let manifest = nvidia_installer::bundle::pack::read_inner_manifest(archive).expect("manifest").to_json();
    // A signify secret key (unencrypted) from a fixed seed.
    let seed = [7u8; 32];
    let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed).expect("seed");
    let mut seckey = seed.to_vec();
    seckey.extend_from_slice(pair.public_key().as_ref());
    let mut bytes = b"EdBK\0\0\0\0".to_vec();
    bytes.extend_from_slice(&[0; 16]);
    bytes.extend_from_slice(&sha2::Sha512::digest(&seckey)[..8]);
    bytes.extend_from_slice(&[1; 8]);
    bytes.extend_from_slice(&seckey);
    let key =
        nvidia_installer::bundle::signature::SecretKey::parse(&base64::engine::general_purpose::STANDARD.encode(bytes))
            .expect("key");
    let signature = key.sign(&manifest, "bench");
    let trusted = [key.public()];
    let rounds = 2000;
    let started = Instant::now();
    for _ in 0..rounds {
        nvidia_installer::bundle::signature::verify(&trusted, &signature, &manifest).expect("verifies");
    }
    let each = started.elapsed() / rounds;
    println!(
        "signature check of the manifest ({} bytes): {:.1} us per stage ({rounds} rounds)",
        manifest.len(),
        each.as_secs_f64() * 1e6
    );
}

/// `nvidia-installer stage` as the DaemonSet runs it, against the loopback bucket.
fn stage_command(server: &S3Server, host: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_nvidia-installer"));
    command
        .arg("stage")
        .envs(server.env())
        .env("NVIDIA_INSTALLER_HOST_ROOT", host)
        .env("NVIDIA_INSTALLER_BUCKET", BUCKET)
        .env("NVIDIA_DRIVER_VERSION", DRIVER)
        .env("GARDENLINUX_VERSION", GL)
        .env("KERNEL_RELEASE", KERNEL)
        .env("RUST_LOG", std::env::var("NVIDIA_BENCH_STAGE_LOG").unwrap_or_else(|_| "warn".to_owned()));
    command
}

/// Files of incompressible bytes, sized like a driver's: big libraries, modules, small tools.
fn bundle_dir(root: &Path, total: usize) -> std::path::PathBuf {
    let dir = root.join("driver");
    for sub in ["bin", "lib", "modules"] {
        std::fs::create_dir_all(dir.join(sub)).expect("dir");
    }
    let shares = [
        ("lib/libcuda.so.535.261.03", 30),
        ("lib/libnvidia-ptxjitcompiler.so.535.261.03", 20),
        ("lib/libnvidia-nvvm.so.535.261.03", 20),
        ("modules/nvidia.ko", 15),
        ("lib/libnvidia-ml.so.535.261.03", 5),
        ("modules/nvidia-uvm.ko", 4),
        ("modules/nvidia-modeset.ko", 3),
        ("bin/nvidia-smi", 3),
    ];
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    for (path, share) in shares {
        let mut file = std::io::BufWriter::new(std::fs::File::create(dir.join(path)).expect("file"));
        if path.ends_with(".ko") {
            let name = Path::new(path).file_stem().and_then(|s| s.to_str()).unwrap_or("m").replace('-', "_");
            // An ELF object with its modinfo; the filler below follows it, as a module's code would.
            let vermagic = format!("{KERNEL} SMP preempt mod_unload modversions ");
            file.write_all(&integration_tests::fixtures::elf_module(&[("name", &name), ("vermagic", &vermagic)]))
                .expect("modinfo");
        }
        let mut left = total * share / 100;
        let mut block = vec![0u8; 1 << 20];
        while left > 0 {
            for chunk in block.chunks_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
            }
            let n = left.min(block.len());
            file.write_all(&block[..n]).expect("write");
            left -= n;
        }
        file.flush().expect("flush");
    }
    dir
}

async fn transfer_only(client: &aws_sdk_s3::Client, key: &str, size: u64) {
    // The same ranges as the stage (its default part size).
    let part = nvidia_installer::s3::Transfer::default().part_size;
    let parts: Vec<(u64, u64)> = (0..size.div_ceil(part)).map(|i| (i * part, ((i + 1) * part).min(size) - 1)).collect();
    futures::stream::iter(parts)
        .map(|(first, last)| async move {
            let out = client
                .get_object()
                .bucket(BUCKET)
                .key(key)
                .range(format!("bytes={first}-{last}"))
                .send()
                .await
                .expect("get");
            let mut body = out.body;
            while let Some(chunk) = body.try_next().await.expect("body") {
                std::hint::black_box(chunk.len());
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
}

fn write_files(dir: &Path, total: u64) {
    std::fs::create_dir_all(dir).expect("dir");
    let block = vec![0x5au8; 256 * 1024];
    let mut left = total;
    let mut index = 0;
    while left > 0 {
        let size = left.min(64 << 20);
        let path = dir.join(format!("f{index}"));
        let mut file = std::fs::File::create(&path).expect("file");
        let mut written = 0;
        let mut flushed = 0;
        while written < size {
            let n = (size - written).min(block.len() as u64) as usize;
            file.write_all(&block[..n]).expect("write");
            written += n as u64;
            // As the installer does: hand each 8 MiB to the disk at once, so writing alone is
            // measured at its best.
            if written - flushed >= 8 << 20 {
                let advice = nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED;
                let _ = nix::fcntl::posix_fadvise(&file, flushed as i64, (written - flushed) as i64, advice);
                flushed = written;
            }
        }
        file.sync_all().expect("sync");
        left -= size;
        index += 1;
    }
    std::fs::remove_dir_all(dir).expect("cleanup");
}

/// The median run by wall time (with its CPU time).
fn median(runs: &[(Duration, Duration)]) -> (Duration, Duration) {
    let mut sorted = runs.to_vec();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

fn cpu_now() -> Duration {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).expect("rusage");
    to_duration(usage.user_time()) + to_duration(usage.system_time())
}

fn children_cpu() -> Duration {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN).expect("rusage");
    to_duration(usage.user_time()) + to_duration(usage.system_time())
}

/// Run `command` to its end, with the peak RSS of its process: the kernel's high-water mark
/// (`VmHWM`), read every 2 ms while it runs. (The children's `ru_maxrss` cannot be used: Linux
/// carries the RSS of the memory image replaced at `exec` into it, i.e. this process's own, S3
/// server included.) The stage's RSS falls to ~20 MiB in its final sync, after its peak, so the
/// last reading holds the peak.
fn run_measured(command: &mut Command) -> (std::process::Output, u64) {
    let child =
        command.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().expect("stage");
    let status = format!("/proc/{}/status", child.id());
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0u64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok(text) = std::fs::read_to_string(&status) else { break };
                let hwm = text
                    .lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
                peak = peak.max(hwm.unwrap_or(0));
                std::thread::sleep(Duration::from_millis(2));
            }
            peak
        })
    };
    let output = child.wait_with_output().expect("stage");
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    (output, watcher.join().expect("watcher"))
}

fn to_duration(t: nix::sys::time::TimeVal) -> Duration {
    Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
}
