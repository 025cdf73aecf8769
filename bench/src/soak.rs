//! `ouro-soak`: many clients streaming against a running server for a fixed time while
//! something else injects faults (scripts/soak.sh kills and stops processes). Every
//! completed greedy-family response is held to the plain greedy output of its prompt,
//! taken before the clients start: a response that differs has lost tokens. Some clients
//! leave mid-stream on purpose (one request in `--cancel-every`). Requests are counted as
//! served, refused (a status before any token), failed (any other error), cancelled by
//! their client, or wrong; with latency percentiles per outcome and a minute-by-minute
//! table of what happened while the faults came.

use crate::load::percentile;
use anyhow::{Context, Result, bail};
use clap::Args;
use orchestrator::cli::StrategyArg;
use proto::v1 as pb;
use proto::v1::ouroboros_client::OuroborosClient;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

#[derive(Args)]
pub struct SoakArgs {
    /// The server's public API.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub endpoint: String,
    /// Prompt file: one JSON string per line. Default: the built-in code prompts.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Prompts used (the first ones of the file).
    #[arg(long, default_value_t = 8)]
    pub limit: usize,
    /// Clients streaming at once, each one request after another.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// How long the clients run.
    #[arg(long, default_value_t = 300)]
    pub duration_s: u64,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: u32,
    /// Strategies the clients take in turn (all exact: each completed response must equal
    /// plain greedy).
    #[arg(long = "strategy", value_enum, value_delimiter = ',',
          default_values_t = [StrategyArg::Greedy, StrategyArg::Speculative, StrategyArg::Ouroboros, StrategyArg::Auto])]
    pub strategies: Vec<StrategyArg>,
    /// One request in this many is abandoned by its client after its first message (0:
    /// none).
    #[arg(long, default_value_t = 8)]
    pub cancel_every: usize,
    /// Deadline of one request (sent as grpc-timeout), in seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_s: u64,
    /// Write soak.md and soak.json here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Outcome {
    /// Completed, with exactly the plain greedy tokens.
    Served,
    /// Completed with other tokens than plain greedy gives: tokens lost or changed.
    Wrong,
    /// Refused with a status before any token (the status is kept).
    Refused,
    /// Any other error (after tokens, or not a refusal).
    Failed,
    /// Left by its own client mid-stream, on purpose.
    Cancelled,
}

#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// Seconds from the start of the run.
    pub at_s: f64,
    pub outcome: Outcome,
    /// The status code of a refusal or failure.
    pub status: Option<String>,
    pub tokens: usize,
    pub latency_s: f64,
    pub strategy: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub clients: usize,
    pub duration_s: f64,
    pub counts: BTreeMap<String, usize>,
    pub statuses: BTreeMap<String, usize>,
    pub tokens_served: usize,
    pub served_p50_s: f64,
    pub served_p99_s: f64,
    pub records: Vec<Record>,
}

pub fn run(a: SoakArgs) -> Result<()> {
    if a.clients == 0 || a.limit == 0 || a.strategies.is_empty() {
        bail!("--clients, --limit and --strategy need at least one");
    }
    let prompts: Vec<String> = match &a.prompts {
        Some(p) => crate::prompts::read(p)?,
        None => crate::strategies::BUILTIN_PROMPTS
            .iter()
            .map(|s| s.to_string())
            .collect(),
    };
    let prompts: Vec<String> = prompts.into_iter().take(a.limit).collect();
    if prompts.is_empty() {
        bail!("no prompts");
    }
    let rt = tokio::runtime::Runtime::new()?;
    let report = rt.block_on(soak(&a, &prompts))?;
    let md = markdown(&report);
    print!("{md}");
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir)?;
        let cmd: Vec<String> = std::env::args().collect();
        let head = format!(
            "# Soak: {} clients for {:.0} s\n\n`{}`\n\nMachine: {}\n\n",
            report.clients,
            report.duration_s,
            cmd.join(" "),
            crate::report::machine()
        );
        std::fs::write(dir.join("soak.md"), head + &md)?;
        std::fs::write(
            dir.join("soak.json"),
            serde_json::to_string_pretty(&report)?,
        )?;
    }
    if report.counts.get("Wrong").copied().unwrap_or(0) > 0 {
        bail!("some completed responses differ from plain greedy: tokens were lost");
    }
    Ok(())
}

fn request(
    prompt: &str,
    strategy: StrategyArg,
    n: u32,
    timeout: Duration,
) -> tonic::Request<pb::GenerateRequest> {
    let mut r = tonic::Request::new(pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Prompt(prompt.into())),
        max_new_tokens: Some(n),
        strategy: pb::Strategy::from(strategy) as i32,
        ..Default::default()
    });
    r.set_timeout(timeout);
    r
}

async fn soak(a: &SoakArgs, prompts: &[String]) -> Result<Report> {
    let channel = Endpoint::from_shared(a.endpoint.clone())?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .with_context(|| format!("connecting to {}", a.endpoint))?;
    let client = OuroborosClient::new(channel);
    let timeout = Duration::from_secs(a.timeout_s);
    // Plain greedy of every prompt, before any fault.
    let mut reference = Vec::new();
    for p in prompts {
        let r = client
            .clone()
            .generate(request(p, StrategyArg::Greedy, a.max_new_tokens, timeout))
            .await
            .context("the reference greedy run")?;
        reference.push(r.into_inner().token_ids);
    }
    eprintln!(
        "references of {} prompts taken; {} clients for {} s",
        prompts.len(),
        a.clients,
        a.duration_s
    );
    let reference = Arc::new(reference);
    let prompts = Arc::new(prompts.to_vec());
    let strategies = Arc::new(a.strategies.clone());
    let records = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let end = started + Duration::from_secs(a.duration_s);
    let (n, cancel_every) = (a.max_new_tokens, a.cancel_every);
    let clients: Vec<_> = (0..a.clients)
        .map(|c| {
            let (client, reference, prompts, strategies, records) = (
                client.clone(),
                reference.clone(),
                prompts.clone(),
                strategies.clone(),
                records.clone(),
            );
            tokio::spawn(async move {
                let mut k = 0usize;
                while Instant::now() < end {
                    let i = (c + k) % prompts.len();
                    let strategy = strategies[(c + k) % strategies.len()];
                    let cancel = cancel_every > 0 && (c * 7 + k).is_multiple_of(cancel_every);
                    let t0 = Instant::now();
                    let r = request(&prompts[i], strategy, n, timeout);
                    let (outcome, status, tokens) =
                        one(client.clone(), r, &reference[i], cancel).await;
                    let record = Record {
                        at_s: t0.duration_since(started).as_secs_f64(),
                        outcome,
                        status,
                        tokens,
                        latency_s: t0.elapsed().as_secs_f64(),
                        strategy: format!("{strategy:?}").to_lowercase(),
                    };
                    records
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(record);
                    // A refused client backs off a little instead of spinning.
                    if matches!(outcome, Outcome::Refused | Outcome::Failed) {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    k += 1;
                }
            })
        })
        .collect();
    for c in clients {
        c.await?;
    }
    let duration_s = started.elapsed().as_secs_f64();
    let mut records = std::mem::take(&mut *records.lock().unwrap_or_else(|p| p.into_inner()));
    records.sort_by(|x, y| x.at_s.total_cmp(&y.at_s));
    let mut counts = BTreeMap::new();
    let mut statuses = BTreeMap::new();
    for r in &records {
        *counts.entry(format!("{:?}", r.outcome)).or_insert(0) += 1;
        if let Some(s) = &r.status {
            *statuses.entry(format!("{:?} {s}", r.outcome)).or_insert(0) += 1;
        }
    }
    let mut served: Vec<f64> = records
        .iter()
        .filter(|r| r.outcome == Outcome::Served)
        .map(|r| r.latency_s)
        .collect();
    served.sort_by(f64::total_cmp);
    Ok(Report {
        clients: a.clients,
        duration_s,
        counts,
        statuses,
        tokens_served: records
            .iter()
            .filter(|r| r.outcome == Outcome::Served)
            .map(|r| r.tokens)
            .sum(),
        served_p50_s: percentile(&served, 50.0),
        served_p99_s: percentile(&served, 99.0),
        records,
    })
}

/// Streams one request; how it ended, its status, and the tokens it got.
async fn one(
    mut client: OuroborosClient<Channel>,
    r: tonic::Request<pb::GenerateRequest>,
    reference: &[u32],
    cancel: bool,
) -> (Outcome, Option<String>, usize) {
    let status = |s: &tonic::Status| Some(format!("{:?}", s.code()));
    let mut stream = match client.generate_stream(r).await {
        Ok(s) => s.into_inner(),
        Err(s) => return (refusal(&s), status(&s), 0),
    };
    let mut tokens: Vec<u32> = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(m)) => {
                tokens.extend(&m.token_ids);
                if cancel && !tokens.is_empty() {
                    // Dropping the stream resets it: the server sees its client leave.
                    return (Outcome::Cancelled, None, tokens.len());
                }
            }
            Ok(None) if tokens == reference => return (Outcome::Served, None, tokens.len()),
            Ok(None) => return (Outcome::Wrong, None, tokens.len()),
            Err(s) if tokens.is_empty() => return (refusal(&s), status(&s), 0),
            Err(s) => return (Outcome::Failed, status(&s), tokens.len()),
        }
    }
}

/// A status before any token: a refusal where the server said it cannot take the
/// request now, a failure otherwise.
fn refusal(s: &tonic::Status) -> Outcome {
    use tonic::Code::*;
    match s.code() {
        ResourceExhausted | Unavailable => Outcome::Refused,
        _ => Outcome::Failed,
    }
}

pub fn markdown(r: &Report) -> String {
    let count = |k: &str| r.counts.get(k).copied().unwrap_or(0);
    let mut t = format!(
        "| requests | served | wrong (tokens lost) | refused | failed | cancelled by client | tokens served | served p50 s | served p99 s |\n\
         |---|---|---|---|---|---|---|---|---|\n\
         | {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.2} |\n\n",
        r.records.len(),
        count("Served"),
        count("Wrong"),
        count("Refused"),
        count("Failed"),
        count("Cancelled"),
        r.tokens_served,
        r.served_p50_s,
        r.served_p99_s,
    );
    if !r.statuses.is_empty() {
        t.push_str("| outcome and status | requests |\n|---|---|\n");
        for (k, v) in &r.statuses {
            t.push_str(&format!("| {k} | {v} |\n"));
        }
        t.push('\n');
    }
    // Minute by minute (by when requests started).
    t.push_str(
        "| minute | served | refused | failed | cancelled | wrong |\n|---|---|---|---|---|---|\n",
    );
    let minutes = (r.duration_s / 60.0).ceil().max(1.0) as usize;
    for m in 0..minutes {
        let of = |o: Outcome| {
            r.records
                .iter()
                .filter(|x| x.outcome == o && (x.at_s / 60.0) as usize == m)
                .count()
        };
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            m + 1,
            of(Outcome::Served),
            of(Outcome::Refused),
            of(Outcome::Failed),
            of(Outcome::Cancelled),
            of(Outcome::Wrong)
        ));
    }
    t
}
