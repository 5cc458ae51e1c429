//! The `herald` binary: parse the command line and run it.

use clap::Parser;
use herald::cli::{Cli, Command};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .init();
            let config = args.into_config()?;
            let app = herald::app::App::bind(config).await?;
            let token = CancellationToken::new();
            let signals = tokio::spawn(herald::shutdown::on_signal(token.clone()));
            let result = app.run(token.clone()).await;
            token.cancel();
            signals.await??;
            result?;
        }
        Command::Publish(args) => herald::cli::publish(args).await?,
        Command::Subscribe(args) => herald::cli::subscribe(args).await?,
        Command::Bench(args) => {
            let report = herald::bench::run(*args).await?;
            print!(
                "{}",
                herald::bench::report::markdown(std::slice::from_ref(&report))
            );
            if report.lost > 0 || report.connect_failures > 0 {
                eprintln!(
                    "herald bench: {} lost, {} connections failed {:?}",
                    report.lost, report.connect_failures, report.connect_errors
                );
            }
        }
        Command::BenchReport { dir } => print!("{}", herald::bench::report::summarize(&dir)?),
        Command::BenchWorker { spec } => herald::bench::worker(&spec).await?,
    }
    Ok(())
}
