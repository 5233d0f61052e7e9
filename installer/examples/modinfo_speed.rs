//! `modinfo` of a real kernel module, side by side with the floor of the scan it replaced
//! (reading the whole file, before any search):
//!
//! ```sh
//! cargo run --release -p nvidia-installer --example modinfo_speed -- \
//!   .cache/kernels/6.1.0-47-amd64/lib/modules/6.1.0-47-amd64/kernel/drivers/gpu/drm/amd/amdgpu/amdgpu.ko
//! ```

fn main() {
    let Some(path) = std::env::args().nth(1).map(std::path::PathBuf::from) else {
        eprintln!("usage: modinfo_speed MODULE.ko");
        std::process::exit(2);
    };
    let rounds = 50u32;
    let time = |work: &dyn Fn()| {
        work();
        let started = std::time::Instant::now();
        for _ in 0..rounds {
            work();
        }
        started.elapsed() / rounds
    };
    let section = time(&|| {
        std::hint::black_box(nvidia_installer::bundle::modinfo::modinfo(&path).expect("modinfo"));
    });
    let whole = time(&|| {
        std::hint::black_box(std::fs::read(&path).expect("read"));
    });
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    println!(
        "{} ({:.1} MB): .modinfo section read {section:?}; reading the whole file alone {whole:?} ({:.0}x)",
        path.display(),
        size as f64 / 1e6,
        whole.as_secs_f64() / section.as_secs_f64()
    );
}
