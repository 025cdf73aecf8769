//! `ouro-soak`: many clients against a running server for a fixed time, every completed
//! response checked against plain greedy (scripts/soak.sh injects the faults).

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "ouro-soak",
    version,
    about = "Clients streaming for a fixed time; completed responses checked against greedy"
)]
struct Cli {
    #[command(flatten)]
    args: bench::soak::SoakArgs,
}

fn main() -> anyhow::Result<()> {
    telemetry::init_logging();
    bench::soak::run(Cli::parse().args)
}
