//! `ouro-load`: aggregate throughput of a running server under concurrent streams.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "ouro-load",
    version,
    about = "Concurrent GenerateStream requests against a running server"
)]
struct Cli {
    #[command(flatten)]
    args: bench::load::LoadArgs,
}

fn main() -> anyhow::Result<()> {
    telemetry::init_logging();
    bench::load::run(Cli::parse().args)
}
