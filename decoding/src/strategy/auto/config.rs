//! Every tuning constant of `auto` in one place. The defaults are what was tuned on this
//! project's CPU recordings (HumanEval's first prompts); `AutoTuner::with_config` takes
//! others. Structural sizes (how many buckets a calibration keeps) stay constants beside
//! the code that indexes them.

use super::policy::SEGMENT_TOKENS;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoConfig {
    /// Committed tokens after which a policy's segment ends and is scored.
    pub segment_tokens: usize,
    /// Whatever the scores say, at least one segment in this many runs the drafting
    /// policy: only its segments score the policies side by side, so the evidence stays
    /// fresh when the workload changes.
    pub audit_every: usize,
    /// Past this many scored segments the policy scores count half, so the choice follows
    /// the workload.
    pub policy_memory: f64,
    /// Weight of an acceptance prior, in observations.
    pub prior_weight: f64,
    /// No guess is counted as a sure thing.
    pub max_acceptance: f64,
    /// Past this many observations an acceptance bucket halves its counts.
    pub memory: f64,
    /// Drafting must promise this much more than the zero-cost tree: its estimate is the
    /// less certain one, and a draft round that disappoints costs most.
    pub draft_margin: f64,
    /// Until the draft's first position has been tried this often, drafting is judged as
    /// if its tokens were accepted at least `optimistic_draft` of the time. Without that,
    /// a prior below the draft's real acceptance keeps `auto` from ever drafting, and so
    /// from ever learning better; with it, a draft that cannot pay even then is never
    /// tried, and one that disappoints costs a few rounds per process.
    pub explore_tries: f64,
    pub optimistic_draft: f64,
    /// The highest confidence floor `auto` asks of a draft: above it nearly every round
    /// would stop after one token, whatever the draft's confidence.
    pub max_draft_stop: f64,
    /// Rounds of a kind after which its realized rate is trusted as much as its predicted
    /// one, and rounds after which old ones count half.
    pub reality_prior: f64,
    pub reality_memory: f64,
    /// Per round of the other kind, what a kind's realized record keeps of its weight
    /// (half after about 70 rounds).
    pub reality_fade: f64,
    /// Plain greedy steps (one-node rounds) measure how fast the target runs now against
    /// the profile, which was timed once, at start-up: the prior's weight in steps, what
    /// the record keeps per round of another kind (half after about 230), and below how
    /// many steps' weight a round whose plan has guesses is verified plainly instead, so
    /// that a workload where every round has guesses still measures plain steps.
    pub plain_prior: f64,
    pub plain_fade: f64,
    pub plain_probe_below: f64,
    /// Under load, how much more than their price a round's guesses must promise, at a
    /// full forward: the margin grows with the trees per forward `B` as
    /// `1 + (load_margin - 1) (1 - 1/B)` (1 alone). Under load a row's price is a live
    /// fit over noisy forwards, and what a session's tree costs the others besides its
    /// rows (its lookups between forwards on cores the forward shares, trees of uneven
    /// size in one batch) is not priced at all; measured at 8 streams on this CPU, the
    /// nodes the price kept were at break-even. 1.2 was chosen on HumanEval 9-40 at 8
    /// streams, embedded (auto over greedy: 1.0 gave 0.96x, 1.2 1.01x, no guesses at all
    /// 0.98x).
    pub load_margin: f64,
    /// Drafting with lookahead (the draft's Jacobi window and pool phrases, as Ouroboros
    /// drafts) gives the same tokens as plain drafting in fewer, wider forwards: until it
    /// has been tried `explore_tries` times it is judged as if each forward gave at least
    /// this many tokens, then by what its calls gave. It is used where a drafted token
    /// costs less that way, by `draft_margin`, with a step's extra rows priced as the
    /// draft's catch-up rows: where rows are nearly free (GPUs), not on this CPU.
    pub lookahead_yield_prior: f64,
    /// Most trie nodes a round considers before keeping the ones that pay.
    pub trie_nodes: usize,
}

impl Default for AutoConfig {
    fn default() -> Self {
        Self {
            segment_tokens: SEGMENT_TOKENS,
            audit_every: 4,
            policy_memory: 96.0,
            prior_weight: 4.0,
            max_acceptance: 0.98,
            memory: 2000.0,
            draft_margin: 1.05,
            explore_tries: 12.0,
            optimistic_draft: 0.9,
            max_draft_stop: 0.9,
            reality_prior: 8.0,
            reality_memory: 400.0,
            reality_fade: 0.99,
            plain_prior: 2.0,
            plain_fade: 0.997,
            plain_probe_below: 8.0,
            load_margin: 1.2,
            lookahead_yield_prior: 2.0,
            trie_nodes: 48,
        }
    }
}
