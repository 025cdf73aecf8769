//! The target runtime's limits as command-line flags and environment variables, one
//! definition for the target service and the embedded `ouro serve`.

use crate::target::TargetConfig;
use clap::Args;
use std::time::Duration;

#[derive(Args, Clone, Debug)]
pub struct TargetLimitsArgs {
    /// Most sessions open at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "OURO_TARGET_MAX_SESSIONS", default_value_t = 64)]
    pub max_sessions: usize,
    /// Most tree nodes in one Verify.
    #[arg(long, env = "OURO_TARGET_MAX_TREE_NODES", default_value_t = 128)]
    pub max_tree_nodes: usize,
    /// Most rows in one batched forward.
    #[arg(long, env = "OURO_TARGET_MAX_BATCH_TOKENS", default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// KV memory budget in MiB: new sessions are refused while it is full, and so is
    /// a call that would grow a session's cache past it.
    #[arg(long, env = "OURO_TARGET_KV_BUDGET_MB", default_value_t = 4096)]
    pub kv_budget_mb: usize,
    /// Sessions idle this long are evicted.
    #[arg(long, env = "OURO_TARGET_SESSION_TTL_S", default_value_t = 300)]
    pub session_ttl_s: u64,
    /// Wait up to this long before a forward for the trees of open sessions expected back
    /// within it (those that were away briefly last time), and never more than a tenth of
    /// the last forward (0: batch only what is already queued). A tree that misses a
    /// forward waits for the whole next one.
    #[arg(long, env = "OURO_TARGET_BATCH_WAIT_US", default_value_t = 10_000)]
    pub batch_wait_us: u64,
    /// Prefill new sessions' prompts this many rows per forward, between the open
    /// sessions' trees (smaller: shorter stalls for them; larger: faster opens).
    #[arg(long, env = "OURO_TARGET_PREFILL_CHUNK", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub prefill_chunk: u64,
}

impl TargetLimitsArgs {
    /// The runtime's configuration (tensor parallelism and chat template left default).
    pub fn config(&self) -> TargetConfig {
        TargetConfig {
            max_sessions: self.max_sessions,
            max_tree_nodes: self.max_tree_nodes,
            max_batch_tokens: self.max_batch_tokens,
            kv_budget_bytes: self.kv_budget_mb << 20,
            session_ttl: Duration::from_secs(self.session_ttl_s),
            batch_wait: Duration::from_micros(self.batch_wait_us),
            prefill_chunk: self.prefill_chunk as usize,
            ..TargetConfig::default()
        }
    }
}

/// Flags of `cmd` (and its subcommands) that no environment variable sets, and variables
/// that two flags of one command share: what the binaries' tests hold empty, so that
/// every flag can be set by an `OURO_*` variable (as the Helm chart and containers do).
pub fn env_gaps(cmd: &clap::Command) -> Vec<String> {
    let mut gaps = Vec::new();
    let mut seen = std::collections::HashMap::new();
    for a in cmd.get_arguments() {
        let id = a.get_id().as_str();
        if a.is_positional() || id == "help" || id == "version" {
            continue;
        }
        match a.get_env().and_then(|e| e.to_str()) {
            None => gaps.push(format!("{} --{id}: no variable", cmd.get_name())),
            Some(env) if !env.starts_with("OURO_") => {
                gaps.push(format!("{} --{id}: {env} is not OURO_*", cmd.get_name()))
            }
            Some(env) => {
                if let Some(other) = seen.insert(env.to_string(), id.to_string()) {
                    gaps.push(format!(
                        "{} --{id} and --{other} share {env}",
                        cmd.get_name()
                    ));
                }
            }
        }
    }
    for sub in cmd.get_subcommands() {
        gaps.extend(env_gaps(sub));
    }
    gaps
}
