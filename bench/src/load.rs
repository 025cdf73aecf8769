//! `ouro-load`: concurrent `GenerateStream` requests against a running server (the
//! embedded `ouro serve` or a deployment's orchestrator). The same prompts run at each
//! concurrency level, one level after another, and within a level each strategy in turn
//! (interleaved, so a drift of the machine's speed touches every strategy alike). A
//! level's aggregate throughput is every token streamed over the level's wall time; each
//! level is set against the same strategy's first, and `auto` against the best other
//! strategy at the same level.

use anyhow::{Context, Result, bail};
use clap::Args;
use orchestrator::cli::StrategyArg;
use proto::v1 as pb;
use proto::v1::ouroboros_client::OuroborosClient;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

#[derive(Args)]
pub struct LoadArgs {
    /// The server's public API.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub endpoint: String,
    /// Prompt file: one JSON string per line. Default: the built-in code prompts.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Requests per level (prompts taken in order, repeated if the file has fewer).
    #[arg(long, default_value_t = 8)]
    pub requests: usize,
    /// Concurrency levels, run in this order: at level C, C streams are open at once
    /// until the level's requests are done.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 8])]
    pub concurrency: Vec<usize>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: u32,
    /// Strategies, run one after another at each level.
    #[arg(long = "strategy", value_enum, value_delimiter = ',', default_values_t = [StrategyArg::Auto])]
    pub strategies: Vec<StrategyArg>,
    /// Each level takes the next `--requests` prompts of the file instead of the same
    /// ones: a server that learns from what it answered (the output trie, the phrase
    /// pool) then meets new prompts at every level. Within a level every strategy runs
    /// the same prompts; put `auto` first to keep it from meeting answers the server
    /// gave moments before on the same prompts.
    #[arg(long)]
    pub new_prompts_per_level: bool,
    /// Runs of each level: within a level the strategies take turns this many times, and
    /// each strategy's figures pool its runs (a VM's speed drifts by 10-30 % from minute to
    /// minute; turns spread that over every strategy alike). With
    /// `--new-prompts-per-level` every run takes new prompts too.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Send each prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Deadline of one request, in seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
    /// Write load.md, load.json and load.png here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The warm-up requests' prompt.
const WARM_UP: &str = "Name three colours.";

/// One request's figures.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sample {
    pub tokens: usize,
    pub ttft_s: f64,
    pub total_s: f64,
    /// What the server did for it, from the last message's statistics.
    pub work: Work,
}

/// What the server reported doing for requests (summed): the rounds' shape, so a
/// level's figures show how a strategy (`auto` above all) decoded under that load.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Work {
    /// Target forwards after prefill (verify rounds).
    pub target_forwards: u64,
    /// Nodes of those rounds' trees, the root included.
    pub tree_nodes: u64,
    pub draft_calls: u64,
    pub drafted_tokens: u64,
}

impl Work {
    fn of(stats: &pb::SpecStats) -> Self {
        Self {
            target_forwards: stats.target_forwards,
            tree_nodes: stats.tree_nodes,
            draft_calls: stats.draft_calls,
            drafted_tokens: stats.drafted_tokens,
        }
    }

    fn add(&mut self, o: &Work) {
        self.target_forwards += o.target_forwards;
        self.tree_nodes += o.tree_nodes;
        self.draft_calls += o.draft_calls;
        self.drafted_tokens += o.drafted_tokens;
    }
}

/// One strategy's figures at one concurrency level.
#[derive(Debug, Clone, Serialize)]
pub struct Level {
    pub strategy: String,
    pub concurrency: usize,
    pub requests: usize,
    pub tokens: usize,
    pub wall_s: f64,
    /// Tokens of all requests over the level's wall time.
    pub aggregate_tok_s: f64,
    /// This level's aggregate over the same strategy's first level's.
    pub vs_first: f64,
    pub mean_ttft_s: f64,
    /// A request's own tokens over its own time, averaged.
    pub mean_request_tok_s: f64,
    /// Request latency (first byte sent to last token received), median and 99th
    /// percentile (nearest rank).
    pub p50_latency_s: f64,
    pub p99_latency_s: f64,
    /// The requests' work, summed.
    pub work: Work,
    /// Aggregate tok/s of each run pooled here (one without `--repeat`).
    pub runs_tok_s: Vec<f64>,
}

impl Level {
    fn new(strategy: &str, concurrency: usize, samples: &[Sample], wall_s: f64) -> Self {
        let tokens: usize = samples.iter().map(|s| s.tokens).sum();
        let n = samples.len().max(1) as f64;
        let mut latency: Vec<f64> = samples.iter().map(|s| s.total_s).collect();
        latency.sort_by(f64::total_cmp);
        Self {
            strategy: strategy.to_string(),
            concurrency,
            requests: samples.len(),
            tokens,
            wall_s,
            aggregate_tok_s: tokens as f64 / wall_s.max(1e-9),
            vs_first: 1.0,
            mean_ttft_s: samples.iter().map(|s| s.ttft_s).sum::<f64>() / n,
            mean_request_tok_s: samples
                .iter()
                .map(|s| s.tokens as f64 / s.total_s.max(1e-9))
                .sum::<f64>()
                / n,
            p50_latency_s: percentile(&latency, 50.0),
            p99_latency_s: percentile(&latency, 99.0),
            work: samples.iter().fold(Work::default(), |mut w, s| {
                w.add(&s.work);
                w
            }),
            runs_tok_s: vec![tokens as f64 / wall_s.max(1e-9)],
        }
    }
}

/// The nearest-rank percentile of sorted values (0 for none).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A strategy's name as the command line spells it.
fn name(s: StrategyArg) -> String {
    clap::ValueEnum::to_possible_value(&s)
        .map(|v| v.get_name().to_string())
        .unwrap_or_else(|| format!("{s:?}"))
}

pub fn run(a: LoadArgs) -> Result<()> {
    if a.requests == 0 || a.repeat == 0 || a.concurrency.is_empty() || a.concurrency.contains(&0) {
        bail!("--requests, --repeat and every --concurrency level must be at least 1");
    }
    if a.strategies.is_empty() {
        bail!("--strategy needs at least one strategy");
    }
    let prompts = match &a.prompts {
        Some(p) => crate::prompts::read(p)?,
        None => crate::strategies::BUILTIN_PROMPTS
            .iter()
            .map(|s| s.to_string())
            .collect(),
    };
    if prompts.is_empty() {
        bail!("no prompts");
    }
    let per_level = if a.new_prompts_per_level {
        a.concurrency.len() * a.repeat
    } else {
        1
    };
    if per_level * a.requests > prompts.len() {
        eprintln!(
            "warning: {} prompts for {} requests: some prompts repeat",
            prompts.len(),
            per_level * a.requests
        );
    }
    let prompts: Vec<String> = prompts
        .iter()
        .cycle()
        .take(per_level * a.requests)
        .cloned()
        .collect();
    let rt = tokio::runtime::Runtime::new()?;
    let levels = rt.block_on(run_levels(&a, &prompts))?;
    let table = format!(
        "{}\n{}\nWhat the server did, per committed token:\n\n{}",
        table(&levels),
        summary(&levels),
        work_table(&levels)
    );
    print!("{table}");
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir)?;
        let cmd: Vec<String> = std::env::args().collect();
        let md = format!(
            "# Concurrent load\n\n`{}`\n\nMachine: {}\n\n{table}",
            cmd.join(" "),
            crate::report::machine()
        );
        std::fs::write(dir.join("load.md"), md)?;
        std::fs::write(
            dir.join("load.json"),
            serde_json::to_string_pretty(&levels)?,
        )?;
        if let Err(e) = chart(&levels, &crate::report::machine(), &dir.join("load.png")) {
            eprintln!("warning: no chart ({e:#})");
        }
    }
    Ok(())
}

async fn run_levels(a: &LoadArgs, prompts: &[String]) -> Result<Vec<Level>> {
    let channel = Endpoint::from_shared(a.endpoint.clone())?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(a.timeout_s))
        .connect()
        .await
        .with_context(|| format!("connecting to {}", a.endpoint))?;
    let client = OuroborosClient::new(channel);
    // One short request per strategy first, so no level pays for the server's
    // first-call set-up; on a text of its own, so no level's prompt is answered early.
    for &s in &a.strategies {
        one(client.clone(), request(a, s, WARM_UP, 4)).await?;
    }
    let mut levels: Vec<Level> = Vec::new();
    for (i, &c) in a.concurrency.iter().enumerate() {
        // Per strategy: every run's samples and wall time.
        let mut runs: Vec<Vec<(Vec<Sample>, f64)>> = vec![Vec::new(); a.strategies.len()];
        for r in 0..a.repeat {
            let slice = level_prompts(prompts, a.requests, i * a.repeat + r);
            for (k, &strategy) in a.strategies.iter().enumerate() {
                eprintln!(
                    "concurrency {c}, {}, run {} of {}: {} requests ...",
                    name(strategy),
                    r + 1,
                    a.repeat,
                    slice.len()
                );
                let reqs: Arc<Vec<pb::GenerateRequest>> = Arc::new(
                    slice
                        .iter()
                        .map(|p| request(a, strategy, p, a.max_new_tokens))
                        .collect(),
                );
                let started = Instant::now();
                let samples = run_level(&client, reqs, c).await?;
                runs[k].push((samples, started.elapsed().as_secs_f64()));
            }
        }
        for (&strategy, runs) in a.strategies.iter().zip(&runs) {
            let label = name(strategy);
            let mut level = pooled(&label, c, runs);
            if let Some(first) = levels.iter().find(|l| l.strategy == label) {
                level.vs_first = level.aggregate_tok_s / first.aggregate_tok_s.max(1e-9);
            }
            levels.push(level);
        }
    }
    Ok(levels)
}

/// One strategy's runs at a level as one [`Level`]: every sample, the runs' wall times
/// summed, and each run's own aggregate tok/s.
fn pooled(strategy: &str, c: usize, runs: &[(Vec<Sample>, f64)]) -> Level {
    let samples: Vec<Sample> = runs.iter().flat_map(|(s, _)| s.iter().copied()).collect();
    let wall: f64 = runs.iter().map(|(_, w)| w).sum();
    let mut level = Level::new(strategy, c, &samples, wall);
    level.runs_tok_s = runs
        .iter()
        .map(|(s, w)| s.iter().map(|x| x.tokens).sum::<usize>() as f64 / w.max(1e-9))
        .collect();
    level
}

/// Level `i`'s requests: `prompts` holds one level's, or every level's one after another.
fn level_prompts(prompts: &[String], requests: usize, i: usize) -> &[String] {
    match prompts.len() > requests {
        true => {
            &prompts[(i * requests).min(prompts.len())..((i + 1) * requests).min(prompts.len())]
        }
        false => prompts,
    }
}

/// Runs every request with `c` streams open at once; each request's figures.
async fn run_level(
    client: &OuroborosClient<Channel>,
    reqs: Arc<Vec<pb::GenerateRequest>>,
    c: usize,
) -> Result<Vec<Sample>> {
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..c.min(reqs.len()))
        .map(|_| {
            let (client, next, reqs) = (client.clone(), next.clone(), reqs.clone());
            tokio::spawn(async move {
                let mut samples = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(r) = reqs.get(i) else {
                        return Ok::<_, anyhow::Error>(samples);
                    };
                    samples.push(one(client.clone(), r.clone()).await?);
                }
            })
        })
        .collect();
    let mut samples = Vec::new();
    for w in workers {
        samples.extend(w.await??);
    }
    Ok(samples)
}

fn request(
    a: &LoadArgs,
    strategy: StrategyArg,
    prompt: &str,
    max_new_tokens: u32,
) -> pb::GenerateRequest {
    let input = if a.chat {
        pb::generate_request::Input::Chat(pb::ChatMessages {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: prompt.into(),
            }],
        })
    } else {
        pb::generate_request::Input::Prompt(prompt.into())
    };
    pb::GenerateRequest {
        input: Some(input),
        max_new_tokens: Some(max_new_tokens),
        strategy: pb::Strategy::from(strategy) as i32,
        ..Default::default()
    }
}

/// Streams one request to its end.
async fn one(mut client: OuroborosClient<Channel>, r: pb::GenerateRequest) -> Result<Sample> {
    let started = Instant::now();
    let mut stream = client.generate_stream(r).await?.into_inner();
    let (mut tokens, mut ttft, mut work) = (0, None, Work::default());
    while let Some(m) = stream.message().await? {
        if !m.token_ids.is_empty() && ttft.is_none() {
            ttft = Some(started.elapsed().as_secs_f64());
        }
        tokens += m.token_ids.len();
        if let Some(stats) = &m.stats {
            work = Work::of(stats);
        }
    }
    let total_s = started.elapsed().as_secs_f64();
    Ok(Sample {
        tokens,
        ttft_s: ttft.unwrap_or(total_s),
        total_s,
        work,
    })
}

/// How each strategy decoded at each level: per committed token, the target's forwards
/// (1 is plain decoding) and the draft's calls and drafted tokens; the trees' nodes per
/// forward.
pub fn work_table(levels: &[Level]) -> String {
    let mut t = String::from(
        "| strategy | concurrency | forwards / token | nodes / forward | draft calls / token | drafted / token |\n\
         |---|---|---|---|---|---|\n",
    );
    for l in levels {
        let w = &l.work;
        let per_token = |x: u64| x as f64 / (l.tokens.max(1)) as f64;
        t.push_str(&format!(
            "| {} | {} | {:.3} | {:.2} | {:.3} | {:.3} |\n",
            l.strategy,
            l.concurrency,
            per_token(w.target_forwards),
            w.tree_nodes as f64 / w.target_forwards.max(1) as f64,
            per_token(w.draft_calls),
            per_token(w.drafted_tokens),
        ));
    }
    t
}

pub fn table(levels: &[Level]) -> String {
    let mut t = String::from(
        "| strategy | concurrency | requests | tokens | wall s | aggregate tok/s | vs first | mean TTFT s | mean tok/s per request | p50 latency s | p99 latency s |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for l in levels {
        t.push_str(&format!(
            "| {} | {} | {} | {} | {:.1} | {:.2} | {:.2}x | {:.2} | {:.2} | {:.2} | {:.2} |\n",
            l.strategy,
            l.concurrency,
            l.requests,
            l.tokens,
            l.wall_s,
            l.aggregate_tok_s,
            l.vs_first,
            l.mean_ttft_s,
            l.mean_request_tok_s,
            l.p50_latency_s,
            l.p99_latency_s
        ));
    }
    t
}

/// Aggregate tok/s by level, a column per strategy, and where `auto` ran beside others,
/// auto over the best of them at that level.
pub fn summary(levels: &[Level]) -> String {
    let mut strategies: Vec<&str> = Vec::new();
    let mut concurrency: Vec<usize> = Vec::new();
    for l in levels {
        if !strategies.contains(&l.strategy.as_str()) {
            strategies.push(&l.strategy);
        }
        if !concurrency.contains(&l.concurrency) {
            concurrency.push(l.concurrency);
        }
    }
    let versus = strategies.contains(&"auto") && strategies.len() > 1;
    let repeated = versus && levels.iter().any(|l| l.runs_tok_s.len() > 1);
    let mut t = format!("| concurrency | {} |", strategies.join(" | "));
    if versus {
        t.push_str(" auto / best other |");
    }
    if repeated {
        t.push_str(" the same, run by run |");
    }
    t.push('\n');
    t.push_str(&"|---".repeat(1 + strategies.len() + usize::from(versus) + usize::from(repeated)));
    t.push_str("|\n");
    let level = |s: &str, c: usize| {
        levels
            .iter()
            .find(|l| l.strategy == s && l.concurrency == c)
    };
    let rate = |s: &str, c: usize| level(s, c).map(|l| l.aggregate_tok_s);
    // The best of the strategies other than auto at level `c`, by `of`.
    let best_other = |c: usize, of: &dyn Fn(&Level) -> Option<f64>| {
        strategies
            .iter()
            .filter(|&&s| s != "auto")
            .filter_map(|s| level(s, c).and_then(of))
            .fold(0.0f64, f64::max)
    };
    for &c in &concurrency {
        t.push_str(&format!("| {c} |"));
        for s in &strategies {
            match rate(s, c) {
                Some(r) => t.push_str(&format!(" {r:.2} |")),
                None => t.push_str(" - |"),
            }
        }
        if versus {
            let best = best_other(c, &|l| Some(l.aggregate_tok_s));
            match rate("auto", c) {
                Some(a) if best > 0.0 => t.push_str(&format!(" {:.2}x |", a / best)),
                _ => t.push_str(" - |"),
            }
        }
        if repeated {
            // Each run's auto against the best other strategy of the same run.
            let runs = level("auto", c).map_or(&[][..], |l| &l.runs_tok_s[..]);
            let ratios: Vec<String> = runs
                .iter()
                .enumerate()
                .filter_map(|(r, a)| {
                    let best = best_other(c, &|l| l.runs_tok_s.get(r).copied());
                    (best > 0.0).then(|| format!("{:.2}", a / best))
                })
                .collect();
            t.push_str(&format!(" {} |", ratios.join(", ")));
        }
        t.push('\n');
    }
    t
}

/// Aggregate tok/s against concurrency, one line per strategy.
pub fn chart(levels: &[Level], caption: &str, path: &std::path::Path) -> Result<()> {
    use plotters::prelude::*;
    let draw = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("drawing the chart: {e:?}");
    let most_c = levels.iter().map(|l| l.concurrency).max().unwrap_or(1) as f64;
    let top = levels
        .iter()
        .map(|l| l.aggregate_tok_s)
        .fold(1.0f64, f64::max)
        * 1.15;
    let root = BitMapBackend::new(path, (720, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(draw)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("aggregate tok/s by concurrency ({caption})"),
            ("sans-serif", 17),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0.0..most_c * 1.05, 0.0..top)
        .map_err(draw)?;
    chart
        .configure_mesh()
        .x_desc("concurrent streams")
        .y_desc("tok/s")
        .draw()
        .map_err(draw)?;
    let mut names: Vec<&str> = Vec::new();
    for l in levels {
        if !names.contains(&l.strategy.as_str()) {
            names.push(&l.strategy);
        }
    }
    for (i, s) in names.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        let points: Vec<(f64, f64)> = levels
            .iter()
            .filter(|l| l.strategy == *s)
            .map(|l| (l.concurrency as f64, l.aggregate_tok_s))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))
            .map_err(draw)?
            .label(s.to_string())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour));
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 3, colour.filled())),
            )
            .map_err(draw)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(draw)?;
    root.present().map_err(draw)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn level(strategy: &str, c: usize, tok_s: f64) -> Level {
        let samples = [Sample {
            tokens: 10,
            ttft_s: 0.1,
            total_s: 1.0,
            work: Work::default(),
        }];
        let mut l = Level::new(strategy, c, &samples, 1.0);
        l.aggregate_tok_s = tok_s;
        l
    }

    #[test]
    fn levels_take_their_own_prompts_or_share_them() {
        let p: Vec<String> = (0..6).map(|i| i.to_string()).collect();
        assert_eq!(level_prompts(&p, 2, 1), &p[2..4]);
        assert_eq!(level_prompts(&p, 2, 2), &p[4..6]);
        assert_eq!(level_prompts(&p[..2], 2, 1), &p[..2]);
    }

    #[test]
    fn the_work_table_shows_each_levels_rounds_per_token() {
        let work = Work {
            target_forwards: 5,
            tree_nodes: 15,
            draft_calls: 2,
            drafted_tokens: 8,
        };
        let samples = [Sample {
            tokens: 10,
            ttft_s: 0.1,
            total_s: 1.0,
            work,
        }; 2];
        let l = Level::new("auto", 8, &samples, 1.0);
        assert_eq!(l.work.target_forwards, 10);
        let t = work_table(&[l]);
        assert!(
            t.contains("| auto | 8 | 0.500 | 3.00 | 0.200 | 0.800 |"),
            "{t}"
        );
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&xs, 50.0), 50.0);
        assert_eq!(percentile(&xs, 99.0), 99.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert_eq!(percentile(&[1.0, 2.0, 9.0], 99.0), 9.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn the_summary_sets_auto_against_the_best_other_strategy_per_level() {
        let levels = [
            level("greedy", 1, 20.0),
            level("speculative", 1, 25.0),
            level("auto", 1, 24.0),
            level("greedy", 8, 40.0),
            level("speculative", 8, 16.0),
            level("auto", 8, 39.0),
        ];
        let t = summary(&levels);
        assert!(
            t.contains("| concurrency | greedy | speculative | auto | auto / best other |"),
            "{t}"
        );
        assert!(t.contains("| 1 | 20.00 | 25.00 | 24.00 | 0.96x |"), "{t}");
        assert!(t.contains("| 8 | 40.00 | 16.00 | 39.00 | 0.97x |"), "{t}");
        // without auto, or alone, there is nothing to set it against
        assert!(!summary(&levels[..2]).contains("auto / best"));
        assert!(!t.contains("run by run"), "{t}");
    }

    #[test]
    fn repeated_runs_pool_and_the_summary_sets_each_run_apart() {
        let sample = |tokens| Sample {
            tokens,
            ttft_s: 0.1,
            total_s: 1.0,
            work: Work::default(),
        };
        // auto: 10 tokens in 1 s, then 30 in 1 s; greedy 20 and 20
        let auto = pooled(
            "auto",
            4,
            &[(vec![sample(10)], 1.0), (vec![sample(30)], 1.0)],
        );
        let greedy = pooled(
            "greedy",
            4,
            &[(vec![sample(20)], 1.0), (vec![sample(20)], 1.0)],
        );
        assert_eq!(auto.tokens, 40);
        assert!((auto.aggregate_tok_s - 20.0).abs() < 1e-9);
        assert_eq!(auto.runs_tok_s, vec![10.0, 30.0]);
        let t = summary(&[greedy, auto]);
        assert!(
            t.contains("| 4 | 20.00 | 20.00 | 1.00x | 0.50, 1.50 |"),
            "{t}"
        );
    }
}
