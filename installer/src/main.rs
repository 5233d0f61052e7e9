use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use nvidia_installer::cli::{Cli, Command, LogFormat, stage_request};
use nvidia_installer::fifo::{self, Pipes};
use nvidia_installer::install::{self, InstallRequest};
use nvidia_installer::kernel::HostKernel;
use nvidia_installer::manifest::ArchiveEntry;
use nvidia_installer::node::Reporter;
use nvidia_installer::pack::{self, BundleInfo};
use nvidia_installer::{compile, gc, publish, ready, s3, stage, status};
use tracing_subscriber::EnvFilter;

/// A work directory beside the output (same filesystem, kept small by removing it afterwards).
fn tempfile_dir(output: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    let parent = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let dir = parent.join(format!(".nvidia-build-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match cli.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("nvidia-installer: starting the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("nvidia-installer: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Stage(args) => {
            let request = stage_request(&args)?;
            let staged = stage::stage(&args.host.layout(), &request).await?;
            if let Some(ready) = &staged.held_back_by {
                println!(
                    "staged {} beside driver {ready}, which stays current until the node is drained and rebooted",
                    staged.bundle.display()
                );
            } else {
                println!("staged {}", staged.bundle.display());
            }
        }
        Command::Install(args) => {
            let stage = stage_request(&args.stage)?;
            let compile = args.compile_request(&stage)?;
            let request = InstallRequest { stage, modules: args.modules.clone(), compile };
            let layout = args.stage.host.layout();
            if args.dry_run {
                let plan = install::dry_run(&layout, &request).await?;
                println!("staged {}", plan.staged.bundle.display());
                println!("dry run: install would now perform, in this order (nothing below was done):");
                print!("{plan}");
                return Ok(());
            }
            let reporter = Reporter::for_node(args.node_name.as_deref()).await?;
            let kernel = HostKernel { host_root: args.stage.host.host_root.clone() };
            let marker = install::install(&layout, &request, &kernel, &reporter).await?;
            println!("NVIDIA driver {} ready for kernel {}", marker.driver_version, marker.kernel_release);
        }
        Command::Wait(args) => {
            let marker = ready::wait(&args.host.layout(), args.driver_version.as_deref(), args.timeout).await?;
            println!(
                "NVIDIA driver {} is ready (kernel {}, since {})",
                marker.driver_version, marker.kernel_release, marker.ready_at
            );
        }
        Command::Status(args) => {
            let layout = args.host.layout();
            let mut last = String::new();
            loop {
                let state = status::status(&layout, args.driver_version.as_deref());
                let text = serde_json::to_string_pretty(&state).context("encoding the status")?;
                if text != last {
                    println!("{text}");
                    last = text;
                }
                if !args.watch {
                    break;
                }
                tokio::time::sleep(args.interval.max(Duration::from_millis(100))).await;
            }
        }
        Command::Pack(args) => {
            let info = BundleInfo {
                driver_version: args.driver_version,
                kernel_release: args.kernel_release,
                flavor: args.flavor,
                gardenlinux_version: args.gardenlinux_version,
            };
            let manifest = pack::describe(&args.dir, &info)?;
            let packed = pack::pack(&args.dir, &manifest, &args.output, args.level)?;
            let archive = packed.archive.unwrap_or(ArchiveEntry { sha256: String::new(), size: 0 });
            println!(
                "packed {} ({} files, {} bytes, sha256 {})",
                args.output.display(),
                packed.files.len(),
                archive.size,
                archive.sha256
            );
        }
        Command::Publish(args) => {
            let client = s3::client(&args.s3.options()).await?;
            let published = publish::publish(
                &client,
                &args.s3.bucket,
                &args.bundle,
                &args.gardenlinux_version,
                args.force,
                &args.s3.transfer(),
            )
            .await?;
            println!("published s3://{}/{} and {}", args.s3.bucket, published.archive_key, published.manifest_key);
        }
        Command::Compile(args) => {
            let request = args.request();
            let work = tempfile_dir(&request.output)?;
            let compiled = compile::compile(&request, &work)?;
            println!("built {} (build log {})", compiled.output.display(), compiled.log.display());
        }
        Command::DevServe(args) => {
            let pipes = Pipes::new(&args.cmd_dir);
            tokio::task::spawn_blocking(move || fifo::serve(&pipes, &args.work_dir)).await.context("dev-serve")??;
        }
        Command::Modulus(args) => {
            let request = args.compile.request();
            let pipes = Pipes::new(&args.cmd_dir);
            let (dev_wait, timeout) = (args.dev_wait, args.timeout);
            let sent = request.clone();
            let answer = tokio::task::spawn_blocking(move || fifo::request(&pipes, &sent, dev_wait, timeout))
                .await
                .context("modulus")??;
            if answer.code != 0 {
                anyhow::bail!(
                    "the dev container's build failed (exit code {}):\n{}",
                    answer.code,
                    answer.log.trim_end()
                );
            }
            println!("{}", answer.log.trim_end());
            if args.publish {
                let gardenlinux =
                    request.gardenlinux_version.clone().context("--publish needs --gardenlinux-version")?;
                let bucket = args.bucket.clone().filter(|b| !b.is_empty()).context("--publish needs --bucket")?;
                let options = args.endpoint.options(&bucket);
                let client = s3::client(&options).await?;
                let published =
                    publish::publish(&client, &bucket, &request.output, &gardenlinux, args.force, &Default::default())
                        .await?;
                println!("published s3://{bucket}/{} and {}", published.archive_key, published.manifest_key);
            }
            if args.stay {
                tracing::info!("done; staying idle (the compiler node pool can be scaled down)");
                std::future::pending::<()>().await;
            }
        }
        Command::Gc(args) => {
            for removed in gc::gc(&args.host.layout(), args.keep).await? {
                println!("removed {}", removed.display());
            }
        }
    }
    Ok(())
}
