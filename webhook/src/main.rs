use std::io::Read;

use anyhow::Context;
use clap::Parser;
use nvidia_certs::Lifetimes;
use nvidia_certs::store::{self, Target};
use nvidia_contract::logging;
use nvidia_webhook::admission::AppState;
use nvidia_webhook::cli::{Cli, Command};
use nvidia_webhook::server::{ServeOptions, serve, shutdown_signal};
use nvidia_webhook::tls::TlsFiles;
use nvidia_webhook::{manifest, selftest};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let format = cli.log_format;
    logging::init(format);
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{}", logging::fatal_line(format, "nvidia-webhook", &format!("{error:#}")));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let state = AppState::with_limits(args.inject.config()?, args.limits.limits());
            let options = ServeOptions {
                listen: args.listen,
                tls: TlsFiles { cert: args.tls_cert, key: args.tls_key },
                reload_interval: args.tls_reload_interval,
                shutdown_delay: args.shutdown_delay,
                drain_timeout: args.drain_timeout,
            };
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(serve(options, state, shutdown_signal()))?;
        }
        Command::Certs(args) => {
            let target = Target {
                namespace: args.namespace,
                secret: args.secret,
                service: args.service,
                webhook_config: args.webhook_config,
                lifetimes: Lifetimes::default(),
            };
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(async {
                let client = kube::Client::try_default().await.context("connecting to the API server")?;
                if args.watch {
                    store::watch(&client, &target, args.interval).await;
                } else {
                    store::ensure(&client, &target).await?;
                }
                anyhow::Ok(())
            })?;
        }
        Command::Selftest(args) => {
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let verdict = runtime.block_on(async {
                let client = kube::Client::try_default().await.context("connecting to the API server")?;
                selftest::run(client, &args.namespace, &args.resource, &args.image)
                    .await
                    .with_context(|| format!("creating a GPU pod in namespace {} as a dry run", args.namespace))
            })?;
            if !verdict.injected {
                anyhow::bail!("a GPU pod in namespace {}: {}", args.namespace, verdict.detail);
            }
            println!("a GPU pod in namespace {}: {}", args.namespace, verdict.detail);
        }
        Command::Inject(args) => {
            let config = args.inject.config()?;
            let input = if args.file.as_os_str() == "-" {
                let mut text = String::new();
                std::io::stdin().read_to_string(&mut text).context("reading stdin")?;
                text
            } else {
                std::fs::read_to_string(&args.file).with_context(|| format!("reading {}", args.file.display()))?
            };
            let (out, notes) = manifest::inject_text(&input, &config)?;
            for note in notes {
                eprintln!("{note}");
            }
            print!("{out}");
        }
    }
    Ok(())
}
