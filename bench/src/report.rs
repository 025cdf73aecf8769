//! What `ouro-bench` writes: per-strategy totals, the markdown table, the JSON document
//! and the speedup chart.

use anyhow::{Context, Result};
use decoding::SpecStats;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One strategy's totals over every prompt of a run.
#[derive(Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Row {
    pub name: String,
    pub tokens: u64,
    pub seconds: f64,
    pub target_forwards: u64,
    pub draft_forwards: u64,
    pub drafted: u64,
    pub accepted: u64,
    /// Rounds that drafted a token at each position, and those that had it accepted.
    pub offered_at: Vec<u64>,
    pub accepted_at: Vec<u64>,
    pub tree_nodes: u64,
    pub candidate_tokens: u64,
    pub pool_lookups: u64,
    pub pool_hits: u64,
    pub trie_lookups: u64,
    pub trie_hits: u64,
    pub trie_accepted: u64,
    pub prefill_s: f64,
    pub draft_s: f64,
    pub verify_s: f64,
    pub network_s: f64,
    pub mismatched_prompts: u64,
    /// `auto`: tokens committed under each of its policies (`decoding::Policy::ALL` order).
    pub policy_tokens: [u64; 3],
    /// Overlapped drafting: early calls whose work was used, taken back, and (of those)
    /// stopped at the verdict.
    pub overlap_used: u64,
    pub overlap_discarded: u64,
    pub overlap_cancelled: u64,
    /// Seconds of the model calls as a cost table prices them (`--cost-model`; 0 without).
    pub projected_s: f64,
    /// Filled in when the run ends.
    pub tok_s: f64,
    pub speedup: f64,
    pub tokens_per_forward: f64,
    pub projected_tok_s: f64,
    pub projected_speedup: f64,
}

fn ratio(x: u64, y: u64) -> f64 {
    if y == 0 { 0.0 } else { x as f64 / y as f64 }
}

impl Row {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            ..Self::default()
        }
    }

    pub fn add(&mut self, s: &SpecStats, n: usize) {
        self.tokens += n as u64;
        self.seconds += s.total_s;
        self.target_forwards += s.target_forwards;
        self.draft_forwards += s.draft_forwards;
        self.drafted += s.drafted;
        self.accepted += s.accepted;
        for (mine, theirs) in [
            (&mut self.offered_at, &s.offered_at),
            (&mut self.accepted_at, &s.accepted_at),
        ] {
            if mine.len() < theirs.len() {
                mine.resize(theirs.len(), 0);
            }
            for (m, t) in mine.iter_mut().zip(theirs) {
                *m += t;
            }
        }
        self.tree_nodes += s.tree_nodes;
        self.candidate_tokens += s.candidate_tokens;
        self.pool_lookups += s.pool_lookups;
        self.pool_hits += s.pool_hits;
        self.trie_lookups += s.trie_lookups;
        self.trie_hits += s.trie_hits;
        self.trie_accepted += s.trie_accepted;
        self.prefill_s += s.prefill_s;
        self.draft_s += s.draft_s;
        self.verify_s += s.verify_s;
        self.network_s += s.network_s;
        for (mine, theirs) in self.policy_tokens.iter_mut().zip(s.policy_tokens) {
            *mine += theirs;
        }
        self.overlap_used += s.overlap_used;
        self.overlap_discarded += s.overlap_discarded;
        self.overlap_cancelled += s.overlap_cancelled;
    }

    /// "40 used, 12 taken back (9 stopped at the verdict)" for rows with overlapped calls.
    fn overlap_calls(&self) -> Option<String> {
        (self.overlap_used + self.overlap_discarded > 0).then(|| {
            format!(
                "{} used, {} taken back ({} stopped at the verdict)",
                self.overlap_used, self.overlap_discarded, self.overlap_cancelled
            )
        })
    }

    /// "mixed 10 %, drafting 85 %, zero-cost 5 %" for rows that ran `auto`'s policies.
    fn policy_shares(&self) -> Option<String> {
        let total: u64 = self.policy_tokens.iter().sum();
        (total > 0).then(|| {
            decoding::Policy::ALL
                .iter()
                .zip(self.policy_tokens)
                .map(|(p, n)| format!("{} {:.0} %", p.name(), 100.0 * ratio(n, total)))
                .collect::<Vec<_>>()
                .join(", ")
        })
    }

    /// Derived figures, against the reference row's speeds (measured and projected).
    pub fn finish(&mut self, greedy_tok_s: f64, greedy_projected_tok_s: f64) {
        self.tok_s = self.tokens as f64 / self.seconds.max(1e-9);
        self.speedup = self.tok_s / greedy_tok_s.max(1e-9);
        self.tokens_per_forward = ratio(self.tokens, self.target_forwards);
        if self.projected_s > 0.0 {
            self.projected_tok_s = self.tokens as f64 / self.projected_s;
            self.projected_speedup = self.projected_tok_s / greedy_projected_tok_s.max(1e-9);
        }
    }

    /// Time outside drafting, verifying and the prefill: the loop, lookups, bookkeeping.
    fn orchestrator_s(&self) -> f64 {
        (self.seconds - self.prefill_s - self.draft_s - self.verify_s).max(0.0)
    }

    fn acceptance_by_position(&self, first: usize) -> String {
        let parts: Vec<String> = self
            .accepted_at
            .iter()
            .zip(&self.offered_at)
            .take(first)
            .map(|(&a, &o)| format!("{:.0}", 100.0 * ratio(a, o)))
            .collect();
        if parts.is_empty() {
            "-".into()
        } else {
            parts.join("/")
        }
    }
}

/// The markdown table of a run.
pub fn table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| strategy | tokens | tok/s | speedup vs greedy | tokens per target forward | \
         tree nodes per forward | draft forwards per round | draft acceptance | acceptance \
         by position (%) | candidate tokens | pool hit rate | trie hit rate | trie tokens | \
         prefill s | draft s | verify s | network s | orchestrator s | mismatched prompts |\n",
    );
    t.push_str(&"|---".repeat(19));
    t.push_str("|\n");
    for r in rows {
        t.push_str(&format!(
            "| {} | {} | {:.2} | {:.2}x | {:.2} | {:.2} | {:.2} | {:.0}% | {} | {} | {:.0}% | \
             {:.0}% | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} |\n",
            r.name,
            r.tokens,
            r.tok_s,
            r.speedup,
            r.tokens_per_forward,
            ratio(r.tree_nodes, r.target_forwards),
            ratio(r.draft_forwards, r.target_forwards),
            100.0 * ratio(r.accepted, r.drafted),
            r.acceptance_by_position(4),
            r.candidate_tokens,
            100.0 * ratio(r.pool_hits, r.pool_lookups),
            100.0 * ratio(r.trie_hits, r.trie_lookups),
            r.trie_accepted,
            r.prefill_s,
            r.draft_s,
            r.verify_s,
            r.network_s,
            r.orchestrator_s(),
            r.mismatched_prompts
        ));
    }
    t
}

/// Longest draft chain [`drafting_bounds`] considers.
const MOST_DRAFTED: usize = 32;

/// How each drafting row's decoding compares with what chains of drafted tokens can do
/// on the measured cost profile: the ceiling (every drafted token accepted) and the
/// estimate at the row's own acceptance. Decoding only: greedy's verify seconds against
/// the row's draft and verify seconds (the draft's own prefill, in its first call, counts
/// in those), prefills aside. `rows[0]` is greedy; `None` without a draft or rows.
pub fn drafting_bounds(rows: &[Row], profile: &decoding::CostProfile) -> Option<String> {
    let greedy = rows.first()?;
    let drafting: Vec<&Row> = rows.iter().filter(|r| r.drafted > 0).collect();
    if drafting.is_empty() {
        return None;
    }
    let ceiling = profile.best_chain(1.0, MOST_DRAFTED)?;
    // The prefill is the same for every strategy: only the rest can go faster.
    let decoding = (greedy.seconds - greedy.prefill_s).max(0.0);
    let whole = greedy.seconds / (greedy.prefill_s + decoding / ceiling.speedup).max(1e-9);
    let mut m = format!(
        "Drafting on this hardware (the cost profile above; decoding only, prefills aside): \
         a round that drafts gamma tokens, one draft forward each, and verifies them in one \
         target forward decodes at most {:.2}x as fast as greedy here (gamma {}), even with \
         every drafted token accepted; with greedy's prefill time in this run ({:.1} s of \
         {:.1} s) the whole run at most {:.2}x, before the draft's own prefill.\n\n\
         | strategy | draft acceptance | decoding speedup, measured | chain estimate at that \
         acceptance |\n|---|---|---|---|\n",
        ceiling.speedup, ceiling.gamma, greedy.prefill_s, greedy.seconds, whole
    );
    for r in drafting {
        let acceptance = ratio(r.accepted, r.drafted);
        let estimate = profile.best_chain(acceptance, MOST_DRAFTED)?;
        m.push_str(&format!(
            "| {} | {:.0}% | {:.2}x | {:.2}x (gamma {}) |\n",
            r.name,
            100.0 * acceptance,
            greedy.verify_s / (r.draft_s + r.verify_s).max(1e-9),
            estimate.speedup,
            estimate.gamma
        ));
    }
    Some(m)
}

/// The processor, as the kernel names it, and the cores this process may use.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores, {}", std::env::consts::ARCH)
}

/// Everything about a run that a results file needs.
#[derive(Serialize)]
pub struct Report<'a> {
    pub command: String,
    pub machine: String,
    pub target: String,
    pub draft: String,
    pub prompts: usize,
    pub max_new_tokens: usize,
    pub cost_profile: Option<String>,
    /// [`drafting_bounds`], where the run measured a cost profile.
    pub drafting_bounds: Option<String>,
    /// [`projection`], where the run was priced with a cost table.
    pub projection: Option<String>,
    pub seconds: f64,
    pub rows: &'a [Row],
}

impl Report<'_> {
    pub fn markdown(&self) -> String {
        let mut m = format!(
            "# ouro-bench\n\nCommand: `{}`\n\nMachine: {}. Target: {}. Draft: {}.\n\n\
             {} prompts, up to {} new tokens each, strategies interleaved prompt by prompt; \
             {:.0} s in all.\n\n",
            self.command,
            self.machine,
            self.target,
            self.draft,
            self.prompts,
            self.max_new_tokens,
            self.seconds
        );
        if let Some(p) = &self.cost_profile {
            m.push_str(&format!("Cost profile (auto): {p}.\n\n"));
        }
        m.push_str(&table(self.rows));
        if let Some(b) = &self.drafting_bounds {
            m.push('\n');
            m.push_str(b);
        }
        if let Some(p) = &self.projection {
            m.push('\n');
            m.push_str(p);
        }
        let shares: Vec<String> = self
            .rows
            .iter()
            .filter_map(|r| Some(format!("- {}: {}\n", r.name, r.policy_shares()?)))
            .collect();
        if !shares.is_empty() {
            m.push_str("\nTokens committed under each of auto's policies:\n\n");
            m.push_str(&shares.concat());
        }
        let overlapped: Vec<String> = self
            .rows
            .iter()
            .filter_map(|r| Some(format!("- {}: {}\n", r.name, r.overlap_calls()?)))
            .collect();
        if !overlapped.is_empty() {
            m.push_str("\nDraft calls made while the target verified (overlap):\n\n");
            m.push_str(&overlapped.concat());
        }
        m.push_str("\n![speedup over greedy](speedup.png)\n");
        m
    }

    /// Writes bench.md, bench.json and speedup.png into `dir`. The chart needs a system
    /// font; without one it is left out with a warning.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let md = dir.join("bench.md");
        std::fs::write(&md, self.markdown())
            .with_context(|| format!("writing {}", md.display()))?;
        let json = dir.join("bench.json");
        std::fs::write(&json, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", json.display()))?;
        let png = dir.join("speedup.png");
        if let Err(e) = chart(self.rows, &self.machine, &png) {
            eprintln!("warning: no chart ({e:#})");
        }
        Ok(())
    }
}

/// The rows priced with the cost table described by `source`: projected against measured
/// speed, and the projected speedups over greedy.
pub fn projection(rows: &[Row], source: &str) -> Option<String> {
    if rows.iter().all(|r| r.projected_s <= 0.0) {
        return None;
    }
    let mut m = format!(
        "Projected with the cost table ({source}): every model call priced by the table, \
         the orchestrator's own time left out.\n\n\
         | strategy | measured tok/s | projected tok/s | projected / measured | measured speedup | projected speedup |\n\
         |---|---|---|---|---|---|\n"
    );
    for r in rows.iter().filter(|r| r.projected_s > 0.0) {
        m.push_str(&format!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2}x | {:.2}x |\n",
            r.name,
            r.tok_s,
            r.projected_tok_s,
            r.projected_tok_s / r.tok_s.max(1e-9),
            r.speedup,
            r.projected_speedup
        ));
    }
    Some(m)
}

/// Draws `speedup.png` again beside a `bench.json` written earlier.
pub fn redraw(json: &Path) -> Result<std::path::PathBuf> {
    #[derive(Deserialize)]
    struct Saved {
        machine: String,
        rows: Vec<Row>,
    }
    let text =
        std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
    let saved: Saved =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", json.display()))?;
    let png = json.with_file_name("speedup.png");
    chart(&saved.rows, &saved.machine, &png)?;
    Ok(png)
}

/// A bar per strategy: its speed relative to greedy in the same run.
pub fn chart(rows: &[Row], caption: &str, path: &Path) -> Result<()> {
    let top = rows.iter().map(|r| r.speedup).fold(1.0f64, f64::max) * 1.15;
    let width = (160 * rows.len() as u32).max(640);
    let root = BitMapBackend::new(path, (width, 420)).into_drawing_area();
    let draw = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("drawing the chart: {e:?}");
    root.fill(&WHITE).map_err(draw)?;
    let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("speedup over greedy ({caption})"),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        // A segmented 0..n has n + 1 slots: one per row is 0..n - 1.
        .build_cartesian_2d((0..rows.len().saturating_sub(1)).into_segmented(), 0.0..top)
        .map_err(draw)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc("x greedy tok/s")
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => names.get(*i).map(|s| s.to_string()).unwrap_or_default(),
            _ => String::new(),
        })
        .draw()
        .map_err(draw)?;
    chart
        .draw_series(rows.iter().enumerate().map(|(i, r)| {
            let colour = if r.speedup >= 1.0 { &BLUE } else { &RED };
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), r.speedup),
                ],
                colour.mix(0.7).filled(),
            );
            bar.set_margin(0, 0, 14, 14);
            bar
        }))
        .map_err(draw)?;
    chart
        .draw_series(rows.iter().enumerate().map(|(i, r)| {
            let style = ("sans-serif", 15)
                .into_font()
                .into_text_style(&root)
                .pos(Pos::new(HPos::Center, VPos::Bottom));
            Text::new(
                format!("{:.2}x", r.speedup),
                (SegmentValue::CenterOf(i), r.speedup + top * 0.01),
                style,
            )
        }))
        .map_err(draw)?;
    root.present().map_err(draw)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_add_up_and_tables_show_them() {
        let mut s = SpecStats::new(decoding::Strategy::Auto);
        s.total_s = 2.0;
        s.target_forwards = 5;
        s.offered_at = vec![4, 2];
        s.accepted_at = vec![3, 1];
        s.drafted = 6;
        s.accepted = 4;
        let mut greedy = Row::new("greedy");
        let mut greedy_stats = SpecStats::new(decoding::Strategy::Greedy);
        greedy_stats.total_s = 4.0;
        greedy_stats.target_forwards = 10;
        greedy.add(&greedy_stats, 10);
        greedy.finish(2.5, 0.0);
        let mut auto = Row::new("auto");
        auto.add(&s, 10);
        auto.add(&s, 10);
        auto.finish(greedy.tok_s, 0.0);
        assert_eq!(auto.offered_at, vec![8, 4]);
        assert!((auto.speedup - 2.0).abs() < 1e-9);
        assert!((auto.tokens_per_forward - 2.0).abs() < 1e-9);
        let t = table(&[greedy, auto]);
        assert!(t.contains("| auto | 20 | 5.00 | 2.00x | 2.00 |"), "{t}");
        assert!(t.contains("| 75/50 |"), "{t}");
    }

    #[test]
    fn drafting_rows_are_set_against_the_chains_the_profile_allows() {
        let draft = decoding::DraftCost {
            per_call: 0.0,
            per_token: 0.2,
            catch_up: 0.05,
        };
        let profile = decoding::CostProfile::new(vec![(1, 1.0), (2, 1.1)], Some(draft)).unwrap();
        let mut greedy = Row::new("greedy");
        (greedy.seconds, greedy.prefill_s, greedy.verify_s) = (12.0, 2.0, 10.0);
        let mut spec_row = Row::new("speculative");
        (spec_row.drafted, spec_row.accepted) = (10, 9);
        (spec_row.draft_s, spec_row.verify_s) = (3.0, 4.0);
        let trie = Row::new("trie");
        let b = drafting_bounds(&[greedy, spec_row, trie], &profile).unwrap();
        // By hand: a verify of n nodes costs 1 + 0.1 (n - 1) (the last slope carries on),
        // a chain of g drafted tokens 0.2 g more. Every token accepted: (g + 1) tokens for
        // 1 + 0.3 g, best at the most drafted (32): 33 / 10.6 = 3.11x.
        assert!(b.contains("at most 3.11x"), "{b}");
        // 90 % accepted: (1 - 0.9^(g+1)) / 0.1 tokens for 1 + 0.3 g, best at g = 5:
        // 4.6856 / 2.5 = 1.87x. The row's own 1.43x: greedy's 10 s of verifies against its 3 s
        // of drafting and 4 s of verifying.
        assert!(
            b.contains("| speculative | 90% | 1.43x | 1.87x (gamma 5) |"),
            "{b}"
        );
        // rows that drafted nothing are not listed; nothing to say without a draft
        assert!(!b.contains("| trie |"), "{b}");
        let no_draft = decoding::CostProfile::new(vec![(1, 1.0)], None).unwrap();
        assert!(drafting_bounds(&[Row::new("greedy")], &no_draft).is_none());
    }

    #[test]
    fn saved_rows_read_back_for_redrawing() {
        let mut row = Row::new("auto");
        row.speedup = 1.25;
        row.offered_at = vec![3];
        let rows = [row];
        let report = Report {
            command: "ouro-bench".into(),
            machine: machine(),
            target: "t".into(),
            draft: "d".into(),
            prompts: 1,
            max_new_tokens: 8,
            cost_profile: None,
            drafting_bounds: None,
            projection: None,
            seconds: 1.0,
            rows: &rows,
        };
        let json = serde_json::to_string(&report).unwrap();
        let back: serde_json::Value = serde_json::from_str(&json).unwrap();
        let again: Vec<Row> = serde_json::from_value(back["rows"].clone()).unwrap();
        assert_eq!(again[0].name, "auto");
        assert_eq!(again[0].speedup, 1.25);
        assert_eq!(again[0].offered_at, vec![3]);
        assert!(report.markdown().contains("| auto |"));
    }
}
