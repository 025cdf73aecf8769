//! Pricing a run with a cost table (`ouro-bench --cost-model FILE`). Every model call a
//! request made ([`decoding::ModelCall`]: prefill, verify, draft, lookahead host call) is
//! priced by a table of what calls cost by rows and context, on this machine (measured:
//! `--measure-cost-model FILE`) or on hardware we do not have (a table built from
//! published figures), so each strategy's projected speed stands beside its measured one
//! with the real models' acceptance. `auto` plans with the same table.
//!
//! A table is a list of cost profiles by context length: at each context, seconds of a
//! target call by tree rows (nodes), the target's seconds per prompt row of a prefill,
//! and the draft's seconds per call, per drafted token and per row caught up.
//! Between listed contexts costs are interpolated linearly, beyond them the nearest is
//! used; between listed row counts linearly, beyond the last with its last slope.
//! A draft forward's rows beyond its one (a lookahead step's window and phrases) are
//! priced at the catch-up's rate per row. What is not priced: the orchestrator's own work
//! between calls (lookups, sampling, bookkeeping), which a projection leaves out and a
//! measurement does not. `auto` planning with a table learns its rounds' seconds from the
//! table too (a priced clock, [`decoding::CallClock`]), not from this machine's wall time.

use anyhow::{Context, Result, bail};
use decoding::{CostProfile, DraftCost, ModelCall};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What calls cost, by context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostTable {
    /// What the table describes and where its figures come from.
    pub source: String,
    /// Ascending by context.
    pub contexts: Vec<ContextCosts>,
    /// (prompt rows, seconds) of a target prefill, rows ascending; where empty, a
    /// prefill costs the first context's `prefill_row` per row. A prefill's cost per row
    /// is not constant (on this machine a 256-row prompt cost 1.7x per row what the
    /// run's 130-row prompts did), so a measured table times the run's own lengths.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefill: Vec<(usize, f64)>,
}

/// The costs at one context length.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContextCosts {
    /// Tokens already in the cache.
    pub context: usize,
    /// (rows, seconds) of a target call, rows ascending from 1.
    pub target: Vec<(usize, f64)>,
    /// Seconds per prompt row of a target prefill.
    pub prefill_row: f64,
    /// The draft's costs, where there is a draft.
    pub draft: Option<DraftCosts>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DraftCosts {
    pub per_call: f64,
    pub per_token: f64,
    pub catch_up: f64,
}

impl From<DraftCosts> for DraftCost {
    fn from(d: DraftCosts) -> Self {
        DraftCost {
            per_call: d.per_call,
            per_token: d.per_token,
            catch_up: d.catch_up,
        }
    }
}

impl From<DraftCost> for DraftCosts {
    fn from(d: DraftCost) -> Self {
        DraftCosts {
            per_call: d.per_call,
            per_token: d.per_token,
            catch_up: d.catch_up,
        }
    }
}

impl CostTable {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the cost table {}", path.display()))?;
        let t: CostTable = serde_json::from_str(&text)
            .with_context(|| format!("parsing the cost table {}", path.display()))?;
        t.check()
            .with_context(|| format!("the cost table {}", path.display()))?;
        Ok(t)
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        std::fs::write(path, serde_json::to_string_pretty(self)? + "\n")
            .with_context(|| format!("writing {}", path.display()))
    }

    /// A table of the profiles measured at each context, with the seconds per prompt
    /// row of a prefill there, and the prefill curve (see [`CostTable::prefill`]).
    pub fn from_profiles(
        source: String,
        at: &[(usize, CostProfile, f64)],
        prefill: Vec<(usize, f64)>,
    ) -> Result<Self> {
        let t = CostTable {
            source,
            prefill,
            contexts: at
                .iter()
                .map(|(context, p, prefill_row)| ContextCosts {
                    context: *context,
                    target: p.verify_points().to_vec(),
                    prefill_row: *prefill_row,
                    draft: p.draft().map(Into::into),
                })
                .collect(),
        };
        t.check()?;
        Ok(t)
    }

    fn check(&self) -> Result<()> {
        if self.contexts.is_empty() {
            bail!("no contexts");
        }
        if !self
            .contexts
            .windows(2)
            .all(|w| w[0].context < w[1].context)
        {
            bail!("contexts must ascend");
        }
        if !self.prefill.windows(2).all(|w| w[0].0 < w[1].0)
            || self
                .prefill
                .iter()
                .any(|&(rows, s)| rows == 0 || !(s.is_finite() && s >= 0.0))
        {
            bail!("prefill rows must ascend from 1, its seconds finite and not negative");
        }
        let drafts = self.contexts.iter().filter(|c| c.draft.is_some()).count();
        if drafts != 0 && drafts != self.contexts.len() {
            bail!("draft costs at some contexts but not at others");
        }
        for c in &self.contexts {
            self.profile(c)
                .with_context(|| format!("at context {}", c.context))?;
        }
        Ok(())
    }

    fn profile(&self, c: &ContextCosts) -> Result<CostProfile> {
        if !c.target.windows(2).all(|w| w[0].0 < w[1].0) {
            bail!("target rows must ascend");
        }
        if !(c.prefill_row.is_finite() && c.prefill_row >= 0.0) {
            bail!("prefill_row must be finite and not negative");
        }
        Ok(CostProfile::new(c.target.clone(), c.draft.map(Into::into))?)
    }

    /// The two profiles around `context` and the weight of the second.
    fn around(&self, context: usize) -> (CostProfile, CostProfile, f64) {
        let cs = &self.contexts;
        let i = cs.partition_point(|c| c.context <= context);
        let (a, b) = match i {
            0 => (&cs[0], &cs[0]),
            i if i == cs.len() => (&cs[i - 1], &cs[i - 1]),
            i => (&cs[i - 1], &cs[i]),
        };
        let w = match b.context > a.context {
            true => (context - a.context) as f64 / (b.context - a.context) as f64,
            false => 0.0,
        };
        // Checked when the table was made.
        let p = |c: &ContextCosts| self.profile(c).expect("the table was checked");
        (p(a), p(b), w)
    }

    /// Seconds of a target call of `rows` rows at `context`.
    pub fn target(&self, rows: usize, context: usize) -> f64 {
        let (a, b, w) = self.around(context);
        (1.0 - w) * a.verify_cost(rows) + w * b.verify_cost(rows)
    }

    /// Seconds of a target prefill of `rows` prompt rows: along the prefill curve
    /// (linear between its points, below the first in proportion to it, beyond the last
    /// with its last slope), or at the first context's rate per row without one.
    pub fn prefill(&self, rows: usize) -> f64 {
        let c = &self.prefill;
        let x = rows as f64;
        let Some(&(r0, s0)) = c.first() else {
            return self.contexts[0].prefill_row * x;
        };
        let i = c.partition_point(|&(r, _)| r <= rows);
        if i == 0 || c.len() == 1 {
            return s0 * x / r0 as f64;
        }
        // The segment around `rows`, or the last one beyond it.
        let j = i.min(c.len() - 1);
        let ((ra, sa), (rb, sb)) = (c[j - 1], c[j]);
        sa + (sb - sa) * (x - ra as f64) / (rb - ra) as f64
    }

    /// The draft's costs at `context` (`None` without a draft).
    pub fn draft(&self, context: usize) -> Option<DraftCost> {
        let (a, b, w) = self.around(context);
        let (a, b) = (a.draft()?, b.draft()?);
        let mix = |x: f64, y: f64| (1.0 - w) * x + w * y;
        Some(DraftCost {
            per_call: mix(a.per_call, b.per_call),
            per_token: mix(a.per_token, b.per_token),
            catch_up: mix(a.catch_up, b.catch_up),
        })
    }

    /// The cost profile `auto` plans with at `context`: the table's own costs there, rows
    /// 1 to `most_rows`.
    pub fn profile_at(&self, context: usize, most_rows: usize) -> Result<CostProfile> {
        let rows: Vec<(usize, f64)> = (1..=most_rows.max(1))
            .map(|n| (n, self.target(n, context)))
            .collect();
        Ok(CostProfile::new(rows, self.draft(context))?)
    }

    /// Seconds of a request's calls. A draft call is priced at the context of the verify
    /// that follows it (the one it drafted for), its rows beyond one a forward at the
    /// catch-up's rate; a lookahead host call as `forwards` target calls sharing its rows;
    /// a draft session's opening as the draft catching up on its text.
    pub fn price(&self, calls: &[ModelCall]) -> f64 {
        self.price_from(calls, 0)
    }

    /// [`Self::price`] for calls made after `context` tokens of text (a part of a
    /// request, priced as it goes).
    pub fn price_from(&self, calls: &[ModelCall], context: usize) -> f64 {
        let mut total = 0.0;
        let mut context = context;
        for (i, call) in calls.iter().enumerate() {
            total += match *call {
                ModelCall::Prefill { rows } => {
                    context = rows as usize;
                    self.prefill(rows as usize)
                }
                ModelCall::Verify { rows, context: c } => {
                    context = c as usize;
                    self.target(rows as usize, context)
                }
                ModelCall::Draft {
                    forwards,
                    caught_up,
                    ..
                } => {
                    let at = calls[i..]
                        .iter()
                        .find_map(|c| match c {
                            ModelCall::Verify { context, .. } => Some(*context as usize),
                            _ => None,
                        })
                        .unwrap_or(context);
                    match self.draft(at) {
                        // Rows beyond one a forward and the caught-up ones (a lookahead
                        // step's window and phrases) at the catch-up's rate per row.
                        Some(d) => {
                            let extra = call.extra_draft_rows();
                            d.per_call
                                + d.per_token * forwards as f64
                                + d.catch_up * (caught_up + extra) as f64
                        }
                        None => 0.0,
                    }
                }
                ModelCall::DraftOpen { rows } => {
                    context = rows as usize;
                    match self.draft(context) {
                        Some(d) => d.per_call + d.catch_up * rows as f64,
                        None => 0.0,
                    }
                }
                ModelCall::Lookahead {
                    forwards,
                    rows,
                    context: c,
                    ..
                } => {
                    context = c as usize;
                    let f = forwards.max(1) as usize;
                    let per = (rows as usize).div_ceil(f).max(1);
                    f as f64 * self.target(per, context)
                }
            };
        }
        total
    }
}

/// `auto` planning with a table learns its rounds' seconds from it.
impl decoding::CallClock for CostTable {
    fn seconds(&self, calls: &[ModelCall], context: usize) -> f64 {
        self.price_from(calls, context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Target: 10 ms + 1 ms per row beyond the first at context 0, twice that at 1000.
    /// Draft: 1 ms per call, 2 ms per token, 0.5 ms per row caught up at both.
    fn table() -> CostTable {
        let draft = Some(DraftCosts {
            per_call: 0.001,
            per_token: 0.002,
            catch_up: 0.0005,
        });
        CostTable {
            source: "hand-built".into(),
            prefill: Vec::new(),
            contexts: vec![
                ContextCosts {
                    context: 0,
                    target: vec![(1, 0.010), (9, 0.018)],
                    prefill_row: 0.0015,
                    draft,
                },
                ContextCosts {
                    context: 1000,
                    target: vec![(1, 0.020), (9, 0.036)],
                    prefill_row: 0.003,
                    draft,
                },
            ],
        }
    }

    #[test]
    fn a_hand_built_run_is_priced_exactly() {
        let t = table();
        t.check().unwrap();
        let calls = [
            // 10 rows of prompt, 1.5 ms each.
            ModelCall::Prefill { rows: 10 },
            // The draft opens on the 11 tokens: 1 + 11 * 0.5 ms.
            ModelCall::DraftOpen { rows: 11 },
            // A draft call of 4 forwards that caught up on 11 rows, priced at the next
            // verify's context (500): 1 + 4 * 2 + 11 * 0.5 ms.
            ModelCall::Draft {
                forwards: 4,
                rows: 15,
                caught_up: 11,
            },
            // 5 nodes at context 500: halfway between 14 ms and 28 ms.
            ModelCall::Verify {
                rows: 5,
                context: 500,
            },
            // Past the last context: its costs. 2 forwards of 6 rows at 2000: 2 * 30 ms.
            ModelCall::Lookahead {
                forwards: 2,
                rows: 12,
                caught_up: 0,
                context: 2000,
            },
        ];
        let want = 0.015 + 0.0065 + (0.001 + 0.008 + 0.0055) + 0.021 + 2.0 * 0.030;
        let got = t.price(&calls);
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        // Priced as auto's clock, a round's part: the verify at its own context.
        use decoding::CallClock;
        let round = &calls[2..4];
        let got = t.seconds(round, 400);
        assert!((got - (0.0145 + 0.021)).abs() < 1e-12, "{got}");
        // A lookahead draft call: 2 forwards of 21 rows, 40 beyond one each, at the
        // catch-up's rate: 1 + 2 * 2 + 40 * 0.5 ms.
        let lookahead = ModelCall::Draft {
            forwards: 2,
            rows: 42,
            caught_up: 0,
        };
        let got = t.seconds(&[lookahead], 400);
        assert!((got - 0.025).abs() < 1e-12, "{got}");
    }

    #[test]
    fn a_prefill_curve_prices_each_prompt_length_along_it() {
        let mut t = table();
        // without a curve: 1.5 ms per row
        assert!((t.prefill(100) - 0.15).abs() < 1e-12);
        t.prefill = vec![(64, 0.2), (256, 1.0)];
        t.check().unwrap();
        let at = |rows| t.prefill(rows);
        assert!((at(64) - 0.2).abs() < 1e-12);
        assert!((at(160) - 0.6).abs() < 1e-12, "halfway");
        assert!(
            (at(32) - 0.1).abs() < 1e-12,
            "below the first, in proportion"
        );
        assert!((at(448) - 1.8).abs() < 1e-12, "beyond the last, its slope");
        t.prefill = vec![(100, 0.5)];
        assert!(
            (t.prefill(300) - 1.5).abs() < 1e-12,
            "one point: in proportion"
        );
        for bad in [
            vec![(0, 0.1)],
            vec![(64, 0.2), (64, 0.3)],
            vec![(8, f64::NAN)],
        ] {
            t.prefill = bad;
            assert!(t.check().is_err(), "{:?}", t.prefill);
        }
        // a table without a curve reads as before
        let json = serde_json::to_string(&table()).unwrap();
        assert!(!json.contains("\"prefill\""), "{json}");
    }

    #[test]
    fn tables_refuse_what_cannot_be_priced() {
        let mut t = table();
        t.contexts.swap(0, 1);
        assert!(t.check().is_err());
        let mut t = table();
        t.contexts[0].target = vec![(2, 0.01)];
        assert!(t.check().is_err(), "no one-row cost");
        let mut t = table();
        t.contexts[0].prefill_row = f64::NAN;
        assert!(t.check().is_err(), "no prefill cost");
        let mut t = table();
        t.contexts[1].draft = None;
        assert!(t.check().is_err(), "a draft at one context only");
        let json = serde_json::to_string(&table()).unwrap();
        let back: CostTable = serde_json::from_str(&json).unwrap();
        assert_eq!(back, table());
    }

    /// A chain of six draft tokens and two pool phrases beside it, planned by an `auto`
    /// tuner on `profile`: the nodes it verifies.
    fn planned_nodes(profile: CostProfile) -> usize {
        use decoding::auto::{AutoTuner, Guess, RoundKind};
        let t = AutoTuner::new(profile);
        let parents = [-1, 0, 1, 2, 3, 4, 5, 0, 7];
        let guesses: Vec<Vec<Guess>> = std::iter::once(Vec::new())
            .chain((0..6).map(|i| vec![Guess::Draft(i)]))
            .chain([vec![Guess::Pool(0)], vec![Guess::Pool(1)]])
            .collect();
        t.plan(true, &parents, &guesses, &[], RoundKind::Drafted)
            .nodes()
    }

    #[test]
    fn auto_builds_wider_trees_where_the_table_makes_rows_cheap() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../results/cost-models/h100-yi34b-yi6b.json");
        let h100 = CostTable::read(&path).unwrap();
        // This machine's kind of table: rows at a third of a step each.
        let cpu = CostTable {
            source: "cpu-like".into(),
            prefill: Vec::new(),
            contexts: vec![ContextCosts {
                context: 64,
                target: vec![(1, 0.045), (16, 0.27)],
                prefill_row: 0.005,
                draft: Some(DraftCosts {
                    per_call: 0.001,
                    per_token: 0.023,
                    catch_up: 0.003,
                }),
            }],
        };
        let wide = planned_nodes(h100.profile_at(200, 64).unwrap());
        let narrow = planned_nodes(cpu.profile_at(200, 64).unwrap());
        assert!(
            wide > narrow,
            "{wide} nodes under the H100 table, {narrow} here"
        );
        assert_eq!(wide, 9, "rows nearly free: every guess is verified");
    }

    #[test]
    fn auto_plans_with_the_table_at_a_context() {
        let p = table().profile_at(500, 16).unwrap();
        assert!((p.verify_cost(1) - 0.015).abs() < 1e-12);
        assert!((p.verify_cost(9) - 0.027).abs() < 1e-12);
        assert!((p.draft().unwrap().per_token - 0.002).abs() < 1e-12);
    }
}
