//! `ouro-bench`: every strategy over the same prompts in one run, interleaved prompt by
//! prompt so machine drift cancels, with a check that greedy strategies agree token for
//! token with plain greedy decoding. Every strategy keeps pools and trie of its own, warmed
//! only by its own earlier prompts.

use crate::cost_model::CostTable;
use crate::report::{Report, Row};
use crate::sweep;
use anyhow::{Context, Result, bail};
use clap::Args;
use decoding::{Flow, ModelCall, Strategy};
use engine::LanguageModel;
use orchestrator::cli::{DecodeArgs, ModelArgs, StrategyArg};
use orchestrator::embedded::{self, Embedded};
use orchestrator::pipeline::{Pipeline, Runner};
use orchestrator::remote::{RemoteDraft, RemoteTarget};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct BenchArgs {
    /// Prompt file: one JSON string per line. Default: a few built-in code prompts.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Skip this many prompts first (for slices such as problems 41-56: --skip 40).
    #[arg(long, default_value_t = 0)]
    skip: usize,
    /// At most this many prompts.
    #[arg(long)]
    limit: Option<usize>,
    /// Strategies to compare (greedy always runs: it is the reference).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [StrategyArg::Speculative, StrategyArg::Lookahead, StrategyArg::Trie, StrategyArg::Ouroboros, StrategyArg::Auto])]
    strategies: Vec<StrategyArg>,
    /// Also run Ouroboros with an empty pool and trie for every prompt (cold start).
    #[arg(long)]
    cold: bool,
    /// Also run Ouroboros without trie continuations (trie budget 0).
    #[arg(long)]
    without_trie: bool,
    /// Send each prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Only write the prompts as the run would send them (after the chat template, with
    /// --chat) to this file, one JSON string per line, and exit: other runners (the
    /// llama.cpp peer script) then get exactly the same text.
    #[arg(long, value_name = "FILE")]
    dump_prompts: Option<PathBuf>,
    /// Write bench.md (table), bench.json (all figures) and speedup.png (chart) here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only draw speedup.png again from this bench.json (written by an earlier --out run).
    #[arg(long)]
    redraw: Option<PathBuf>,
    /// Sweep a speculation parameter (gamma, level, window, guess, topk, trie_budget,
    /// draft_stop in hundredths): one
    /// row per value for each compared strategy that uses it, the others at their flags
    /// (marked * where the value is the flag's). Repeat for more: --sweep gamma=2,4,6
    /// --sweep topk=1,2,3.
    #[arg(long, value_name = "PARAM=V1,V2,...")]
    sweep: Vec<sweep::Axis>,
    /// Smoke run: at most two prompts, at most 24 new tokens each.
    #[arg(long)]
    quick: bool,
    /// Also run greedy and the selected speculative/auto rows over a target service and
    /// a draft service started as processes on loopback (the binaries next to `ouro-bench`).
    #[arg(long)]
    distributed: bool,
    /// With --distributed: this machine as two one-core boxes, the target service pinned
    /// to CPU 0 and the draft service to CPU 1 (taskset); the bench's loop floats.
    #[arg(long, requires = "distributed")]
    pin: bool,
    /// With --distributed: also the distributed speculative and Ouroboros rows with
    /// overlapped drafting (the draft drafts the next round while the target verifies).
    #[arg(long, requires = "distributed")]
    overlap_rows: bool,
    /// Price every model call of the run with this cost table (JSON: costs by context and
    /// rows, see `results/cost-models/`) and report projected speeds beside the measured
    /// ones; auto plans with the table instead of timing this machine.
    #[arg(long, value_name = "FILE", conflicts_with = "measure_cost_model")]
    cost_model: Option<PathBuf>,
    /// After the run, time this machine's cost table (at contexts of 64 and 512 tokens)
    /// through the run's own backends, write it here, and price the run with it.
    #[arg(long, value_name = "FILE")]
    measure_cost_model: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    decode: DecodeArgs,
}

const QUICK_PROMPTS: usize = 2;
const QUICK_TOKENS: usize = 24;

pub const BUILTIN_PROMPTS: &[&str] = &[
    "def is_palindrome(s: str) -> bool:\n    \"\"\"Return True if s reads the same forwards and backwards, ignoring case and spaces.\"\"\"\n",
    "def merge_sorted(a: list, b: list) -> list:\n    \"\"\"Merge two sorted lists into one sorted list.\"\"\"\n",
    "class Stack:\n    \"\"\"A last-in first-out stack with push, pop, peek and len.\"\"\"\n",
    "def word_counts(text: str) -> dict:\n    \"\"\"Count how often each lower-cased word occurs in text.\"\"\"\n",
];

/// One row of the comparison: a strategy and how its caches are treated.
struct Variant {
    name: String,
    strategy: Strategy,
    /// Empty pool and trie before every prompt.
    cold: bool,
    trie_off: bool,
    /// Over the loopback services instead of in this process.
    distributed: bool,
    /// Overlapped drafting on (whatever --overlap says for the other rows).
    overlap: bool,
    /// A sweep row: one parameter changed from its flag.
    point: Option<sweep::Point>,
}

impl Variant {
    fn new(name: &str, strategy: Strategy) -> Self {
        Self {
            name: name.into(),
            strategy,
            cold: false,
            trie_off: false,
            distributed: false,
            overlap: false,
            point: None,
        }
    }

    fn params(&self, decode: &DecodeArgs, eos: &[u32]) -> decoding::DecodeParams {
        let mut p = decode.params(self.strategy, eos);
        if self.trie_off {
            p.trie_budget = 0;
        }
        if let Some(point) = &self.point {
            point.apply(&mut p);
        }
        p.overlap |= self.overlap;
        p
    }
}

/// Target and draft services started for the distributed rows; stopped on drop.
struct Services {
    children: Vec<Child>,
    target: String,
    draft: String,
}

impl Drop for Services {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Services {
    /// `pin`: the target on CPU 0, the draft on CPU 1.
    fn start(paths: &embedded::ModelPaths, pin: bool) -> Result<Self> {
        if pin && std::thread::available_parallelism().map_or(0, |n| n.get()) < 2 {
            bail!("--pin needs two CPUs (the target's and the draft's)");
        }
        let draft = paths
            .draft
            .as_deref()
            .context("--distributed needs a draft model")?;
        let dir = std::env::current_exe()?
            .parent()
            .context("the ouro-bench binary has no folder")?
            .to_path_buf();
        let mut services = Services {
            children: Vec::new(),
            target: String::new(),
            draft: String::new(),
        };
        for (bin, model) in [
            ("target-service", &paths.target),
            ("draft-service", &draft.to_path_buf()),
        ] {
            let exe = dir.join(bin);
            if !exe.exists() {
                bail!(
                    "{} not found (cargo build --release builds it beside ouro-bench)",
                    exe.display()
                );
            }
            let port = free_port()?;
            let mut cmd = match pin {
                true => {
                    let mut c = Command::new("taskset");
                    let cpu = if bin == "target-service" { "0" } else { "1" };
                    c.args(["-c", cpu]).arg(&exe);
                    c
                }
                false => Command::new(&exe),
            };
            cmd.arg("--model")
                .arg(model)
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"));
            if bin == "target-service" && paths.target_f16 {
                cmd.arg("--f16");
            }
            if let (true, Some(n)) = (bin == "draft-service", paths.draft_head_vocab) {
                cmd.arg("--head-vocab").arg(n.to_string());
            }
            if let (true, Some(b)) = (bin == "draft-service", &paths.draft_requantize) {
                cmd.arg("--requantize").arg(b);
            }
            let child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {}", exe.display()))?;
            services.children.push(child);
            let url = format!("http://127.0.0.1:{port}");
            if bin == "target-service" {
                services.target = url;
            } else {
                services.draft = url;
            }
        }
        Ok(services)
    }

    /// A pipeline over the services, with caches of its own; waits while they load.
    async fn pipeline(&self, phrase_len: usize) -> Result<RemotePipeline> {
        let target = retry(|| RemoteTarget::connect(&self.target)).await?;
        let draft = retry(|| RemoteDraft::connect(&self.draft)).await?;
        Ok(Pipeline {
            target: Arc::new(target),
            draft: Some(Arc::new(draft)),
            lookahead: None,
            pool: embedded::pool_for(phrase_len),
            lookahead_pool: embedded::pool_for(phrase_len),
            trie: Default::default(),
            tuner: Default::default(),
            blocking: false,
        })
    }
}

type RemotePipeline = Pipeline<RemoteTarget, RemoteDraft, RemoteDraft>;

/// Connects, retrying while a service is still loading its model (up to five minutes).
async fn retry<T, F, Fut>(connect: F) -> Result<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        match connect().await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

fn load_prompts(a: &BenchArgs) -> Result<Vec<String>> {
    let mut prompts = match &a.prompts {
        None => BUILTIN_PROMPTS.iter().map(|s| s.to_string()).collect(),
        Some(p) => crate::prompts::read(p)?,
    };
    prompts.drain(..a.skip.min(prompts.len()));
    let quick = a.quick.then_some(QUICK_PROMPTS);
    if let Some(n) = [a.limit, quick].into_iter().flatten().min() {
        prompts.truncate(n);
    }
    Ok(prompts)
}

pub fn run(mut a: BenchArgs) -> Result<()> {
    if let Some(json) = &a.redraw {
        let png = crate::report::redraw(json)?;
        eprintln!("wrote {}", png.display());
        return Ok(());
    }
    if a.quick {
        a.decode.max_new_tokens = a.decode.max_new_tokens.min(QUICK_TOKENS);
    }
    let paths = a.model.paths();
    let phrase_len = a.decode.phrase_len();
    if a.model.tp > 1 {
        run_with(
            &embedded::load_tp(&paths, a.model.tp, phrase_len, &Default::default())?,
            &a,
        )
    } else {
        run_with(
            &embedded::load_single(&paths, phrase_len, &Default::default())?,
            &a,
        )
    }
}

/// New tokens each runner decodes before the timed runs.
const WARM_UP_TOKENS: usize = 8;

fn run_with<T: LanguageModel + 'static>(e: &Embedded<T>, a: &BenchArgs) -> Result<()> {
    let prompts = load_prompts(a)?;
    // The prompts as the run sends them (through the chat template with --chat).
    let sent = match a.chat {
        true => prompts
            .iter()
            .map(|p| e.chat_prompt(p))
            .collect::<Result<Vec<_>>>()?,
        false => prompts.clone(),
    };
    if let Some(path) = &a.dump_prompts {
        let mut text = String::new();
        for p in &sent {
            text.push_str(&serde_json::to_string(p)?);
            text.push('\n');
        }
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {} prompts to {}", prompts.len(), path.display());
        return Ok(());
    }
    let encoded = sent
        .iter()
        .map(|text| e.encode(text))
        .collect::<Result<Vec<_>>>()?;
    let plan = plan(a, &e.eos)?;
    let mut rows: Vec<Row> = plan.iter().map(|v| Row::new(&v.name)).collect();
    // Each row's requests' model calls, to price once the table is known.
    let mut calls: Vec<Vec<Vec<decoding::ModelCall>>> = vec![Vec::new(); plan.len()];
    let rt = tokio::runtime::Runtime::new()?;
    let services = match a.distributed {
        true => Some(Services::start(&a.model.paths(), a.pin)?),
        false => None,
    };
    let phrase_len = a.decode.phrase_len();
    if let Some(svc) = &services {
        // Wait until both have loaded: nothing is timed while they compete for the CPU.
        rt.block_on(svc.pipeline(phrase_len))?;
    }
    let mut table = match &a.cost_model {
        Some(path) => Some(CostTable::read(path)?),
        None => None,
    };
    // auto plans with the table at the prompts' mean length, where there is one.
    let mut profile = match &table {
        Some(t) => {
            let mean = encoded.iter().map(Vec::len).sum::<usize>() / encoded.len().max(1);
            let p = t.profile_at(mean, TABLE_PROFILE_ROWS)?;
            eprintln!(
                "auto plans with the cost table at context {mean}: {}",
                p.describe()
            );
            Some(p)
        }
        None => None,
    };
    let mut remote_profile = None;
    let mut runners: Vec<Arc<dyn Runner>> = Vec::new();
    for v in &plan {
        let auto = v.strategy == Strategy::Auto;
        let runner: Arc<dyn Runner> = match &services {
            Some(svc) if v.distributed => {
                let p = rt.block_on(svc.pipeline(phrase_len))?;
                if auto && let Some(t) = &table {
                    let c = profile.clone().expect("the table's profile");
                    let _ = p.tuner.set(priced_tuner(c, t));
                } else if auto {
                    // Measured over the network, as a deployment measures it.
                    let c = rt.block_on(p.measure_costs_here(
                        &orchestrator::embedded::profile_options(),
                        Default::default(),
                    ))?;
                    eprintln!("distributed cost profile: {}", c.describe());
                    remote_profile = Some(c.describe());
                }
                Arc::new(p)
            }
            _ => {
                let level = v.params(&a.decode, &e.eos).lookahead.level;
                let p = e.isolated_pipeline(orchestrator::cli::phrase_len_for(level));
                if auto {
                    if profile.is_none() {
                        profile = Some(e.measure_costs()?);
                    }
                    // Same hardware figures, acceptance counts of its own.
                    let c = profile.clone().expect("measured above");
                    let tuner = match &table {
                        Some(t) => priced_tuner(c, t),
                        None => decoding::AutoTuner::new(c),
                    };
                    let _ = p.tuner.set(tuner);
                }
                Arc::new(p)
            }
        };
        runners.push(runner);
    }
    // candle packs quantized weights for its fast kernels on first use, a second or more
    // per model: without a warm-up the first prompt's first row of each model pays it.
    // Each runner decodes a few tokens of the first prompt, then forgets them.
    if let Some(prompt) = encoded.first() {
        let warm = Instant::now();
        for (v, runner) in plan.iter().zip(&runners) {
            let mut params = v.params(&a.decode, &e.eos);
            params.max_new_tokens = params.max_new_tokens.min(WARM_UP_TOKENS);
            let sink = Box::new(|_: &[u32], _: &[decoding::TokenSource]| Flow::Continue);
            rt.block_on(runner.run(prompt.clone(), params, sink))?;
            runner.clear_caches();
        }
        eprintln!(
            "warm-up: {:.1} s (not counted)",
            warm.elapsed().as_secs_f64()
        );
    }
    let started = Instant::now();
    let progress = orchestrator::progress::Progress::new("benchmark runs");
    let runs = encoded.len() * plan.len();
    progress.set(0, runs);
    for (i, prompt) in encoded.iter().enumerate() {
        let mut reference: Option<Vec<u32>> = None;
        for (j, ((v, row), runner)) in plan.iter().zip(&mut rows).zip(&runners).enumerate() {
            if v.cold {
                runner.clear_caches();
            }
            let params = v.params(&a.decode, &e.eos);
            let sink = Box::new(|_: &[u32], _: &[decoding::TokenSource]| Flow::Continue);
            let g = rt.block_on(runner.run(prompt.clone(), params.clone(), sink))?;
            row.add(&g.stats, g.tokens.len());
            if a.cost_model.is_some() || a.measure_cost_model.is_some() {
                calls[j].push(g.stats.calls.clone());
            }
            match &reference {
                None => reference = Some(g.tokens.clone()),
                Some(r) if params.sampling.is_greedy() && *r != g.tokens => {
                    let at = r
                        .iter()
                        .zip(&g.tokens)
                        .position(|(x, y)| x != y)
                        .unwrap_or(r.len().min(g.tokens.len()));
                    let gap = match (r.get(at), g.tokens.get(at)) {
                        (Some(&want), Some(&got)) => {
                            match e.logit_gap(prompt, &r[..at], want, got) {
                                Ok((d, top)) => format!(
                                    "; teacher-forced logit of greedy's token minus this one: {d:.4} (top-2 gap {top:.4})"
                                ),
                                Err(err) => format!("; logit gap unavailable: {err}"),
                            }
                        }
                        _ => String::new(),
                    };
                    eprintln!(
                        "prompt {}: {} differs from greedy at generated token {at}{gap}",
                        i + 1,
                        row.name
                    );
                    row.mismatched_prompts += 1;
                }
                _ => {}
            }
            progress.println(&format!(
                "prompt {}/{} {:<18} {:>4} tokens {:>7.2} tok/s  accepted length {:.2}",
                i + 1,
                prompts.len(),
                row.name,
                g.tokens.len(),
                g.tokens.len() as f64 / g.stats.total_s.max(1e-9),
                g.stats.mean_accepted_length()
            ));
            let done = i * plan.len() + (j + 1);
            progress.set(done, runs);
        }
    }
    progress.finish();
    let seconds = started.elapsed().as_secs_f64();
    if let Some(path) = &a.measure_cost_model {
        // Measured now, warm and in the same minutes as the run it prices.
        let t = measure_table(e, &calls)?;
        t.write(path)?;
        eprintln!("wrote this machine's cost table to {}", path.display());
        table = Some(t);
    }
    if let Some(t) = &table {
        for (row, requests) in rows.iter_mut().zip(&calls) {
            row.projected_s = requests.iter().map(|c| t.price(c)).sum();
        }
    }
    let base = rows[0].tokens as f64 / rows[0].seconds.max(1e-9);
    let projected_base = match rows[0].projected_s {
        s if s > 0.0 => rows[0].tokens as f64 / s,
        _ => 0.0,
    };
    for r in &mut rows {
        r.finish(base, projected_base);
    }
    print!("{}", crate::report::table(&rows));
    let projection = table
        .as_ref()
        .and_then(|t| crate::report::projection(&rows, &t.source));
    if let Some(p) = &projection {
        print!("\n{p}");
    }
    // Bounds from another machine's table would mix its costs with these measurements.
    let bounds = profile
        .as_ref()
        .filter(|_| a.cost_model.is_none())
        .and_then(|p| crate::report::drafting_bounds(&rows, p));
    if let Some(b) = &bounds {
        print!("\n{b}");
    }
    eprintln!("{} prompts in {seconds:.0} s", prompts.len());
    if let Some(dir) = &a.out {
        let paths = a.model.paths();
        let report = Report {
            command: std::env::args().collect::<Vec<_>>().join(" "),
            machine: crate::report::machine(),
            target: match paths.target_f16 {
                true => format!("{} (dequantized to f16 at load)", file_name(&paths.target)),
                false => file_name(&paths.target),
            },
            draft: match paths.draft.as_deref() {
                None => "none".into(),
                Some(d) => {
                    let mut notes = Vec::new();
                    if let Some(b) = &paths.draft_requantize {
                        notes.push(format!("requantized to {b} at load"));
                    }
                    if let Some(n) = paths.draft_head_vocab {
                        notes.push(format!("head over the first {n} tokens"));
                    }
                    match notes.is_empty() {
                        true => file_name(d),
                        false => format!("{} ({})", file_name(d), notes.join(", ")),
                    }
                }
            },
            prompts: prompts.len(),
            max_new_tokens: a.decode.max_new_tokens,
            cost_profile: {
                let here = profile.as_ref().map(|p| p.describe());
                match remote_profile {
                    Some(r) => Some(format!(
                        "{}; over the loopback services: {r}",
                        here.unwrap_or_default()
                    )),
                    None => here,
                }
            },
            drafting_bounds: bounds,
            projection,
            seconds,
            rows: &rows,
        };
        report.write(dir)?;
        eprintln!(
            "wrote bench.md, bench.json and speedup.png to {}",
            dir.display()
        );
    }
    Ok(())
}

/// Rows of the profile auto gets from a cost table.
const TABLE_PROFILE_ROWS: usize = 64;

/// Contexts at which `--measure-cost-model` times this machine when the run made no
/// verify calls to take them from.
const TABLE_CONTEXTS: [usize; 2] = [64, 512];

/// `auto` planning with a cost table's `profile`, and learning its rounds' seconds from
/// the table's prices rather than this machine's wall clock.
fn priced_tuner(profile: decoding::CostProfile, table: &CostTable) -> decoding::AutoTuner {
    decoding::AutoTuner::new(profile).priced_by(Arc::new(table.clone()))
}

/// Where a measured table is timed: the 10th, 50th and 90th percentile of the run's
/// verify contexts (rounded to 16 tokens) and its shortest, median and longest prompts,
/// so that the table is read where the run was, not extrapolated from elsewhere.
fn table_points(calls: &[Vec<Vec<ModelCall>>]) -> (Vec<usize>, Vec<usize>) {
    let mut contexts = Vec::new();
    let mut prompts = Vec::new();
    for call in calls.iter().flatten().flatten() {
        match *call {
            ModelCall::Verify { context, .. } => contexts.push(context as usize),
            ModelCall::Prefill { rows } if rows > 0 => prompts.push(rows as usize),
            _ => {}
        }
    }
    let pick = |mut xs: Vec<usize>, at: &[f64], round: usize| {
        xs.sort_unstable();
        let mut out: Vec<usize> = at
            .iter()
            .filter_map(|&q| {
                let i = ((xs.len() as f64 - 1.0) * q).round() as usize;
                xs.get(i).map(|&x| (x.div_ceil(round) * round).max(round))
            })
            .collect();
        out.dedup();
        out
    };
    let mut contexts = pick(contexts, &[0.1, 0.5, 0.9], 16);
    if contexts.is_empty() {
        contexts = TABLE_CONTEXTS.to_vec();
    }
    (contexts, pick(prompts, &[0.0, 0.5, 1.0], 1))
}

/// This machine's cost table: the auto profile's timings (through the run's own in-process
/// backends) at the contexts the run's verifies had, and the prefill at its prompts'
/// lengths ([`table_points`]).
fn measure_table<T: LanguageModel + 'static>(
    e: &Embedded<T>,
    calls: &[Vec<Vec<ModelCall>>],
) -> Result<CostTable> {
    let (contexts, prompts) = table_points(calls);
    let mut prefill = Vec::new();
    for rows in prompts {
        let per_row = e.measure_prefill_row(rows)?;
        eprintln!(
            "prefill: {:.2} ms per prompt row ({rows} rows)",
            per_row * 1e3
        );
        prefill.push((rows, per_row * rows as f64));
    }
    let prefill_row = match prefill.first() {
        Some(&(rows, s)) => s / rows as f64,
        None => e.measure_prefill_row(TABLE_CONTEXTS[1])?,
    };
    let mut at = Vec::new();
    for context in contexts {
        let opts = decoding::ProfileOptions {
            prompt_len: context,
            ..orchestrator::embedded::profile_options()
        };
        let p = e.measure_costs_with(&opts)?;
        eprintln!("context {context}: {}", p.describe());
        at.push((context, p, prefill_row));
    }
    CostTable::from_profiles(
        format!(
            "measured on {} by `ouro-bench --measure-cost-model` (the auto profile's timings \
             through the in-process backends at the run's verify contexts, prefills at its \
             prompts' lengths)",
            crate::report::machine()
        ),
        &at,
        prefill,
    )
}

/// The rows of a run: greedy (the reference) first, then the strategies, or the sweep's
/// points, then the cold, no-trie and distributed variants asked for.
fn plan(a: &BenchArgs, eos: &[u32]) -> Result<Vec<Variant>> {
    let mut plan = vec![Variant::new("greedy", Strategy::Greedy)];
    let strategies: Vec<Strategy> = a
        .strategies
        .iter()
        .map(|&s| Strategy::from(s))
        .filter(|&s| s != Strategy::Greedy)
        .collect();
    if !a.sweep.is_empty() {
        if a.cold || a.without_trie || a.distributed {
            bail!(
                "--sweep runs in-process rows only: leave out --cold, --without-trie and --distributed"
            );
        }
        let points = sweep::points(
            &strategies,
            &a.sweep,
            &a.decode.params(Strategy::Greedy, eos),
        );
        if points.is_empty() {
            bail!(
                "none of the compared strategies uses the swept parameters (auto sizes its rounds itself)"
            );
        }
        for point in points {
            let v = Variant {
                point: Some(point.clone()),
                ..Variant::new(&point.name(), point.strategy)
            };
            v.params(&a.decode, eos)
                .validate()
                .map_err(|e| anyhow::anyhow!("--sweep row '{}': {e}", v.name))?;
            plan.push(v);
        }
        return Ok(plan);
    }
    for &s in &strategies {
        plan.push(Variant::new(s.name(), s));
    }
    if a.without_trie {
        plan.push(Variant {
            trie_off: true,
            ..Variant::new("ouroboros (no trie)", Strategy::Ouroboros)
        });
    }
    if a.cold {
        // The paper's cold rows: nothing learnt from earlier prompts.
        for s in [Strategy::Ouroboros, Strategy::Auto] {
            if plan.iter().any(|v| v.strategy == s) {
                plan.push(Variant {
                    cold: true,
                    ..Variant::new(&format!("{} (cold)", s.name()), s)
                });
            }
        }
    }
    if a.distributed {
        let remote: Vec<Strategy> = plan
            .iter()
            .filter(|v| {
                matches!(
                    v.strategy,
                    Strategy::Greedy | Strategy::Speculative | Strategy::Ouroboros | Strategy::Auto
                ) && !v.cold
            })
            .map(|v| v.strategy)
            .collect();
        for s in remote {
            plan.push(Variant {
                distributed: true,
                ..Variant::new(&format!("{} (distributed)", s.name()), s)
            });
            if a.overlap_rows && matches!(s, Strategy::Speculative | Strategy::Ouroboros) {
                plan.push(Variant {
                    distributed: true,
                    overlap: true,
                    ..Variant::new(&format!("{} (distributed, overlap)", s.name()), s)
                });
            }
        }
    }
    Ok(plan)
}

fn file_name(p: &std::path::Path) -> String {
    p.file_name().map_or_else(
        || p.display().to_string(),
        |f| f.to_string_lossy().into_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_measured_table_is_timed_where_the_run_was() {
        let verify = |context| ModelCall::Verify { rows: 1, context };
        let request = |prompt: u32| {
            std::iter::once(ModelCall::Prefill { rows: prompt })
                .chain((0..10).map(|i| verify(prompt + i * 10)))
                .collect::<Vec<_>>()
        };
        // two strategies' rows, two requests each: prompts of 100 and 200 rows
        let calls = vec![
            vec![request(100), request(200)],
            vec![request(100), request(200)],
        ];
        let (contexts, prompts) = table_points(&calls);
        // contexts 100..190 and 200..290, twice each: 10th percentile 120, median 200,
        // 90th 270, rounded up to 16 tokens
        assert_eq!(contexts, vec![128, 208, 272]);
        assert_eq!(prompts, vec![100, 200]);
        // a run without verifies is timed at the fixed contexts
        let (contexts, prompts) = table_points(&[]);
        assert_eq!(contexts, TABLE_CONTEXTS.to_vec());
        assert!(prompts.is_empty());
    }
}
