//! `ouro`: the command-line entry to Ouroboros serving. `generate` runs one request (in
//! this process or on a server); `serve` serves the public API. The benchmarks are the
//! `ouro-bench` binary (crate `bench`), so this one links no plotting.

mod generate_cmd;
mod serve_cmd;

use anyhow::Result;
use clap::{Parser, Subcommand};
pub use orchestrator::cli::{DecodeArgs, ModelArgs, StrategyArg};

#[derive(Parser)]
#[command(
    name = "ouro",
    version,
    about = "Ouroboros speculative decoding, in process or distributed"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation of one prompt, with the models in this process or on a
    /// running orchestrator (--endpoint).
    Generate(Box<generate_cmd::GenerateArgs>),
    /// Serve the public gRPC API, with the models in this process or on remote services.
    Serve(Box<serve_cmd::ServeArgs>),
}

fn main() -> Result<()> {
    // Before any thread starts: the models' CPU workers fit the CPUs this process has.
    engine::device::size_cpu_pools();
    match Cli::parse().command {
        Command::Generate(a) => {
            telemetry::init_logging();
            generate_cmd::run(*a)
        }
        // The server sets up logging and span export inside its runtime.
        Command::Serve(a) => serve_cmd::run(*a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_flag_has_its_own_environment_variable() {
        assert_eq!(
            serving::args::env_gaps(&Cli::command()),
            Vec::<String>::new()
        );
    }
}
