//! `ouro-bench`: every strategy over the same prompts in one run, interleaved, with speed,
//! agreement with plain greedy decoding, tables, JSON and a chart.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "ouro-bench",
    version,
    about = "Compare the decoding strategies on a prompt set"
)]
struct Cli {
    #[command(flatten)]
    args: bench::strategies::BenchArgs,
}

fn main() -> anyhow::Result<()> {
    // Before any thread starts: the models' CPU workers fit the CPUs this process has.
    engine::device::size_cpu_pools();
    telemetry::init_logging();
    bench::strategies::run(Cli::parse().args)
}
