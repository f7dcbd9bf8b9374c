//! The `switchyard` program: the inter-process bus daemon, a send/listen client, a demo and the benchmark.

use clap::{Parser, Subcommand};

mod bench;
mod bus;
mod client;
mod demo;

/// Switchyard: messaging middleware for state machines.
#[derive(Parser)]
#[command(name = "switchyard", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the inter-process bus daemon.
    Bus(bus::BusArgs),
    /// Send one event to a machine, a type or a topic.
    Send(client::SendArgs),
    /// Print the events published on topics matching a pattern.
    Listen(client::ListenArgs),
    /// Start a small hybrid deployment and show which location and transport carried each exchange.
    Demo(demo::DemoArgs),
    /// Measure every enabled transport beside the raw library underneath it.
    Bench(bench::BenchArgs),
}

/// What a subcommand returns; errors are printed as one line.
pub type CliResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("switchyard: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Bus(a) => bus::run(a).await,
            Command::Send(a) => client::send(a).await,
            Command::Listen(a) => client::listen(a).await,
            Command::Demo(a) => demo::run(a).await,
            Command::Bench(a) => bench::run(a).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchyard: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
