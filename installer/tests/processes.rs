//! The binary as the DaemonSet and the webhook's init container run it: several installers at
//! once, `kill -9` in the middle of extraction, and `wait` timing out or seeing the marker.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use integration_tests::s3::{Method, S3Server};

fn installer(server: &S3Server, host_root: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_nvidia-installer"));
    command
        .envs(server.env())
        .env("NVIDIA_INSTALLER_HOST_ROOT", host_root)
        .env("NVIDIA_INSTALLER_BUCKET", BUCKET)
        .env("NVIDIA_DRIVER_VERSION", DRIVER)
        .env("GARDENLINUX_VERSION", GARDENLINUX)
        .env("KERNEL_RELEASE", KERNEL)
        .env("NVIDIA_INSTALLER_PART_SIZE", "262144")
        .env("RUST_LOG", "info");
    command
}

#[tokio::test]
async fn concurrent_installers_download_once() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let work = tempfile::tempdir().expect("work");
    let manifest = publish_bundle(&server, work.path(), KERNEL, DRIVER, 4 << 20).await;
    server.log().clear();
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    let children: Vec<_> = (0..3)
        .map(|_| {
            installer(&server, host_dir.path())
                .arg("stage")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    for child in children {
        let output = child.wait_with_output().expect("wait");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    }
    let size = manifest.archive.expect("archive").size;
    let bytes: u64 = server
        .log()
        .matching(&Method::GET, ".tar.zst")
        .iter()
        .filter(|e| !e.path.ends_with(".json"))
        .map(|e| e.bytes_sent)
        .sum();
    assert_eq!(bytes, size, "the archive was downloaded exactly once");
    assert!(layout.current().join("bin/nvidia-smi").is_file());
}

#[tokio::test]
async fn kill_9_during_extraction_leaves_the_old_state_and_the_next_run_recovers() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let work = tempfile::tempdir().expect("work");
    publish_bundle(&server, work.path(), KERNEL, DRIVER, 8 << 20).await;
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    // Slow the transfer so the process is surely in the middle of it.
    server.set_bandwidth_limit(Some(1 << 20));
    let mut child = installer(&server, host_dir.path())
        .arg("stage")
        .env("NVIDIA_INSTALLER_CONCURRENCY", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let started = Instant::now();
    let mut extracting = false;
    while started.elapsed() < Duration::from_secs(30) {
        let staged_files = walk_count(&layout.staging());
        if staged_files >= 3 {
            extracting = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(extracting, "the installer never started extracting");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL)
        .expect("kill");
    let status = child.wait().expect("wait");
    assert!(!status.success());
    assert!(!layout.bundle(KERNEL, DRIVER).exists(), "no half bundle in the cache");
    assert!(std::fs::symlink_metadata(layout.current()).is_err(), "current untouched");
    assert!(walk_count(&layout.staging()) > 0, "the killed run left its staging dir");

    server.set_bandwidth_limit(None);
    let output = installer(&server, host_dir.path()).arg("stage").output().expect("rerun");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stderr).contains("removing staging leftover"));
    assert_eq!(std::fs::read_dir(layout.staging()).expect("staging").count(), 0);
    assert!(layout.current().join("lib/libcuda.so.1").is_file());
}

fn walk_count(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries.flatten().map(|e| if e.path().is_dir() { 1 + walk_count(&e.path()) } else { 1 }).sum()
}

#[tokio::test]
async fn wait_times_out_with_a_reason_and_returns_when_the_marker_appears() {
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    let wait = |args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_nvidia-installer"));
        command.arg("wait").arg("--host-root").arg(host_dir.path()).args(args);
        command
    };
    let output = wait(&["--timeout", "300ms"]).output().expect("wait");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("gave up after") && stderr.contains("no nvidia-installer has run on this node"),
        "{stderr}"
    );

    let child = wait(&["--timeout", "30s"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let marker = nvidia_installer::node::ready::ReadyMarker {
        driver_version: DRIVER.into(),
        kernel_release: KERNEL.into(),
        sha256: "ab".repeat(32),
        ready_at: nvidia_installer::node::ready::now_rfc3339(),
        boot_id: layout.boot_id(),
        bundle: format!("cache/{KERNEL}/{DRIVER}"),
        signed_by: None,
    };
    nvidia_installer::node::ready::write_marker(&layout, &marker).expect("marker");
    let output = child.wait_with_output().expect("wait");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains(DRIVER));

    // A pinned version that is not the one ready is refused, with both versions named.
    let output = wait(&["--timeout", "200ms", "--driver-version", "550.163.01"]).output().expect("wait pinned");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("550.163.01") && stderr.contains(DRIVER), "{stderr}");

    // After a reboot the marker is stale.
    std::fs::write(host_dir.path().join("proc/sys/kernel/random/boot_id"), "00000000-1111-2222-3333-444444444444\n")
        .expect("boot");
    let output = wait(&["--timeout", "200ms"]).output().expect("wait after reboot");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("restarted"));
}

/// A full disk: the host's `/opt` is a 12 MiB tmpfs (mounted in a mount namespace of the test's
/// own, where both runs and the look at the result happen). A small bundle stages; a larger one
/// fails naming the file it could not write, publishes nothing, leaves no staging behind, and the
/// bundle in use stays current.
#[tokio::test]
#[ignore = "needs unshare(1) and tmpfs mounts (root, or unprivileged user namespaces)"]
async fn a_full_disk_fails_naming_the_file_and_publishes_nothing() {
    const BIG: &str = "550.54.14";
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let work = tempfile::tempdir().expect("work");
    publish_bundle(&server, work.path(), KERNEL, DRIVER, 1 << 20).await;
    publish_bundle(&server, work.path(), KERNEL, BIG, 24 << 20).await;
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    std::fs::create_dir_all(host_dir.path().join("opt")).expect("opt");
    let script = r#"
        mount -t tmpfs -o size=12m tmpfs "$HOST/opt" || exit 90
        "$BIN" stage 2>"$WORK/small.log"; echo "small=$?"
        NVIDIA_DRIVER_VERSION="$BIG" "$BIN" stage 2>"$WORK/big.log"; echo "big=$?"
        echo "current=$(readlink "$HOST/opt/nvidia-installer/current")"
        find "$HOST/opt/nvidia-installer" -mindepth 1 -maxdepth 3 | sed "s|^$HOST||" | sort
    "#;
    let output = Command::new("unshare")
        .args(["--mount", "--map-root-user", "sh", "-c", script])
        .envs(installer(&server, host_dir.path()).get_envs().filter_map(|(k, v)| Some((k, v?))))
        .env("HOST", host_dir.path())
        .env("WORK", work.path())
        .env("BIN", env!("CARGO_BIN_EXE_nvidia-installer"))
        .env("BIG", BIG)
        .output()
        .expect("unshare");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let big_log = std::fs::read_to_string(work.path().join("big.log")).unwrap_or_default();
    let context = format!("{stdout}\n{}\nbig run:\n{big_log}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{context}");
    assert!(stdout.contains("small=0"), "{context}");
    assert!(!stdout.contains("big=0"), "the big bundle cannot fit: {context}");
    assert_eq!(big_log.matches("No space left on device").count(), 1, "said once: {context}");
    assert!(big_log.contains("/opt/nvidia-installer/staging/"), "the error names the file: {context}");
    let small = format!("/opt/nvidia-installer/cache/{KERNEL}/{DRIVER}");
    assert!(stdout.contains(&format!("current=cache/{KERNEL}/{DRIVER}")), "{context}");
    let tree: Vec<&str> = stdout.lines().filter(|l| l.starts_with('/')).collect();
    assert!(tree.contains(&small.as_str()), "{context}");
    assert!(!tree.iter().any(|l| l.contains(BIG)), "nothing of the big bundle stays: {context}");
    assert!(!tree.iter().any(|l| l.starts_with("/opt/nvidia-installer/staging/")), "no staging left: {context}");
    // Outside the namespace the host root is untouched: the tmpfs was never mounted here.
    assert!(!layout.current().exists());
}

/// `kill -9` of `stage` at 50 seeded random points spread over the download, the extraction and
/// the switch of `current` (reproducible: the seed and the points are printed). After every kill:
/// `current` is the old bundle or the new one and the bundle it names is complete, nothing
/// partial sits in the cache, no ready marker appeared; after the next run: no staging
/// leftovers, no half-made link, `current` is the new bundle.
#[tokio::test]
async fn kill_9_at_50_random_points_never_leaves_a_partial_state() {
    const OLD: &str = "535.247.01";
    const SEED: u64 = 0x6e76_6964_6961;
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let work = tempfile::tempdir().expect("work");
    publish_bundle(&server, work.path(), KERNEL, OLD, 256 << 10).await;
    publish_bundle(&server, work.path(), KERNEL, DRIVER, 2 << 20).await;
    let host_dir = tempfile::tempdir().expect("host");
    let layout = host(host_dir.path());
    let stage = |driver: &str| {
        let mut command = installer(&server, host_dir.path());
        command.arg("stage").env("NVIDIA_DRIVER_VERSION", driver).stdout(Stdio::null()).stderr(Stdio::piped());
        command
    };
    let run = |driver: &str| {
        let output = stage(driver).output().expect("stage");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    };
    // About 8 MiB/s: the download takes a good part of the run, so kills land in every phase.
    server.set_bandwidth_limit(Some(8 << 20));
    run(OLD);
    let old = layout.bundle(KERNEL, OLD);
    let new = layout.bundle(KERNEL, DRIVER);
    let reset = || {
        let _ = std::fs::remove_dir_all(&new);
        let link = layout.root().join(".reset");
        std::os::unix::fs::symlink(nvidia_contract::Layout::bundle_relative(KERNEL, OLD), &link).expect("link");
        std::fs::rename(&link, layout.current()).expect("switch back");
    };
    let started = Instant::now();
    run(DRIVER);
    let full = started.elapsed();
    reset();

    let mut rng = fastrand::Rng::with_seed(SEED);
    let (mut before_extraction, mut extracting, mut published_not_switched, mut switched) = (0, 0, 0, 0);
    let mut points = Vec::new();
    for _ in 0..50 {
        let at = full.mul_f64(rng.f64() * 1.1);
        points.push(at.as_millis());
        let mut child = stage(DRIVER).spawn().expect("spawn");
        std::thread::sleep(at);
        let _ =
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait();

        let current = std::fs::read_link(layout.current()).expect("current is a link");
        let current = layout.root().join(current);
        assert!(current == old || current == new, "current names {}", current.display());
        nvidia_installer::node::cache::cached(&current)
            .unwrap_or_else(|reason| panic!("current names a partial bundle: {reason}"));
        for bundle in [&old, &new] {
            if bundle.exists() {
                nvidia_installer::node::cache::cached(bundle)
                    .unwrap_or_else(|reason| panic!("partial bundle {} in the cache: {reason}", bundle.display()));
            }
        }
        assert!(std::fs::symlink_metadata(layout.ready()).is_err(), "a ready marker appeared");
        match (new.exists(), current == new) {
            (false, _) if walk_count(&layout.staging()) == 0 => before_extraction += 1,
            (false, _) => extracting += 1,
            (true, false) => published_not_switched += 1,
            (true, true) => switched += 1,
        }

        run(DRIVER);
        assert_eq!(std::fs::read_dir(layout.staging()).map(|d| d.count()).unwrap_or(0), 0, "staging leftovers");
        let stray: Vec<_> = std::fs::read_dir(layout.root())
            .expect("root")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".current.tmp"))
            .collect();
        assert!(stray.is_empty(), "half-made links: {stray:?}");
        assert_eq!(layout.root().join(std::fs::read_link(layout.current()).expect("current")), new);
        reset();
    }
    println!(
        "kill -9 at 50 points (seed {SEED:#x}, a full stage took {} ms; points in ms: {points:?}): \
         {before_extraction} before extraction began, {extracting} during download and extraction, \
         {published_not_switched} after publishing and before the switch, {switched} after the switch; \
         0 partial states, 0 leftovers after the next run",
        full.as_millis()
    );
    assert!(extracting > 0 && switched > 0, "the points did not spread over the phases");
}
