use clap::Parser;
use nvidia_installer::cli::{Cli, Command};
use nvidia_installer::commands;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    nvidia_contract::logging::init(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            let error = format!("starting the async runtime: {error}");
            eprintln!("{}", nvidia_contract::logging::fatal_line(cli.log_format, "nvidia-installer", &error));
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match &cli.command {
            Command::Install(args) => commands::install(args).await,
            Command::Stage(args) => commands::stage(args).await,
            Command::Wait(args) => commands::wait(args).await,
            Command::Status(args) => commands::status(args).await,
            Command::Gc(args) => commands::gc(args).await,
            Command::Pack(args) => commands::pack(args),
            Command::Publish(args) => commands::publish(args).await,
            Command::Compile(args) => commands::compile(args),
            Command::DevServe(args) => commands::dev_serve(args.clone()).await,
            Command::Modulus(args) => commands::modulus(args).await,
            Command::UpgradeController(args) => commands::upgrade_controller(args).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            let line = nvidia_contract::logging::fatal_line(cli.log_format, "nvidia-installer", &format!("{error:#}"));
            eprintln!("{line}");
            std::process::ExitCode::from(error.exit_code())
        }
    }
}
