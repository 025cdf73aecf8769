//! The all-in-one mode: target, draft and tokenizer in this process, behind the same
//! backend traits the distributed mode uses. The target runs in the serving crate's
//! runtime, the one the target service runs: concurrent requests share batched forwards,
//! and sessions are admitted against the same limits and expire after the same TTL.

use crate::chat::ChatTemplate;
use crate::pipeline::Pipeline;
use crate::progress::Progress;
use crate::vocabulary;
use anyhow::{Context, Result, bail};
use candle_core::Device;
use decoding::{DecodeParams, Generation, PhrasePool, PoolConfig};
use engine::chat_template::ChatTemplateSource;
use engine::tp::TpModel;
use engine::{LanguageModel, LoadOptions, Transformer};
use serving::{DraftConfig, DraftRuntime, TargetConfig, TargetRuntime};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokenizers::Tokenizer;

/// Default model files, as `scripts/fetch-models.sh` names them.
pub const DEFAULT_TARGET: &str = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf";
pub const DEFAULT_DRAFT: &str = "qwen2.5-coder-0.5b-instruct.gguf";

pub fn models_dir() -> PathBuf {
    engine::models::models_dir()
}

/// The in-process pipeline: target, its lookahead host, the draft and the pools.
pub type LocalPipeline<T> = Pipeline<TargetRuntime<T>, DraftRuntime<Transformer>, DraftRuntime<T>>;

/// The runtimes' limits in this process: sessions, KV budget, TTL and batching for the
/// target (as the target service takes them); the draft's sessions follow the target's.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    pub target: TargetConfig,
}

impl Limits {
    fn draft(&self) -> DraftConfig {
        DraftConfig {
            max_sessions: self.target.max_sessions,
            session_ttl: self.target.session_ttl,
            ..DraftConfig::default()
        }
    }
}

/// Loaded models and the pools they share across requests.
pub struct Embedded<T: LanguageModel + 'static> {
    pub pipeline: Arc<LocalPipeline<T>>,
    pub tokenizer: Tokenizer,
    pub chat: Arc<ChatTemplate>,
    pub eos: Vec<u32>,
    target: Arc<T>,
    draft: Option<Arc<Transformer>>,
    limits: Limits,
}

pub struct ModelPaths {
    pub target: PathBuf,
    /// Load the target's weights as dense f16 (see `LoadOptions::dequantize_f16`).
    pub target_f16: bool,
    pub draft: Option<PathBuf>,
    /// See `LoadOptions::head_vocab`.
    pub draft_head_vocab: Option<usize>,
    /// Re-encode the draft's matrices in these blocks at load (`q4k`, `q6k`, `q8_0`);
    /// see `LoadOptions::requantize`.
    pub draft_requantize: Option<String>,
    /// A tokenizer.json, model folder or GGUF file; None: the target's own.
    pub tokenizer: Option<PathBuf>,
    /// A Jinja file that replaces the model's own chat template.
    pub chat_template: Option<PathBuf>,
    /// `cpu`, `cuda` or `cuda:N` (see `engine::device::devices`).
    pub device: String,
}

impl ModelPaths {
    /// The devices of `ranks` target ranks (the draft goes on the first).
    pub fn devices(&self, ranks: usize) -> Result<Vec<Device>> {
        Ok(engine::device::devices(&self.device, ranks)?)
    }
}

pub fn pool_for(phrase_len: usize) -> Arc<PhrasePool> {
    Arc::new(PhrasePool::new(PoolConfig {
        phrase_len,
        ..PoolConfig::default()
    }))
}

fn check_file(p: &Path, what: &str) -> Result<()> {
    if !p.exists() {
        bail!(
            "{what} {} does not exist (scripts/fetch-models.sh fetches the default pair)",
            p.display()
        );
    }
    Ok(())
}

/// Stop ids: the file's own plus the chat end markers the tokenizer knows.
pub fn stop_ids(target: &Path, tok: &Tokenizer) -> Result<Vec<u32>> {
    let mut eos = Vec::new();
    if target.is_file() {
        let f = engine::gguf::GgufFile::open(target, &Device::Cpu)?;
        eos = f.eos_ids();
    }
    for marker in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"] {
        if let Some(id) = tok.token_to_id(marker)
            && !eos.contains(&id)
        {
            eos.push(id);
        }
    }
    Ok(eos)
}

/// The tokenizer (the one given, else the target's own), checked against the target's and
/// the draft's vocabularies.
pub fn load_tokenizer(paths: &ModelPaths) -> Result<Tokenizer> {
    let (tokenizer, vocabulary) = vocabulary::open(paths.tokenizer.as_deref(), &paths.target)?;
    // The target's own tokenizer is its vocabulary: only another one is checked against it.
    let mut models = Vec::new();
    if paths.tokenizer.as_ref().is_some_and(|t| *t != paths.target) {
        models.push(("target", paths.target.as_path()));
    }
    if let Some(d) = &paths.draft {
        check_file(d, "draft model")?;
        models.push(("draft", d.as_path()));
    }
    vocabulary::check_models(&vocabulary, &models)?;
    Ok(tokenizer)
}

/// The chat template: the `--chat-template` file, else the model's own (from the GGUF
/// metadata or the Hugging Face folder), else one beside the tokenizer, else ChatML.
/// `model` is None where the model is remote; `remote` is then what its service reported.
pub fn load_chat_template(
    paths: &ModelPaths,
    model: Option<&Path>,
    remote: Option<ChatTemplateSource>,
) -> Result<ChatTemplate> {
    let beside_tokenizer = || -> Result<Option<(ChatTemplateSource, String)>> {
        let Some(dir) = paths.tokenizer.as_deref().and_then(Path::parent) else {
            return Ok(None);
        };
        let found = engine::chat_template::from_folder(dir)?;
        Ok(found.map(|s| (s, dir.display().to_string())))
    };
    let own = match model {
        Some(m) => engine::chat_template::of_model(m)?.map(|s| (s, m.display().to_string())),
        None => remote.map(|s| (s, "the target service".to_string())),
    };
    let own = match own {
        Some(o) => Some(o),
        None => beside_tokenizer()?,
    };
    let template = match (&paths.chat_template, own) {
        (Some(file), own) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading the chat template {}", file.display()))?;
            let special = own.map(|(s, _)| s).unwrap_or_default();
            let source = ChatTemplateSource {
                template: text,
                ..special
            };
            ChatTemplate::new(source, file.display().to_string()).map_err(anyhow::Error::msg)?
        }
        (None, Some((source, origin))) => {
            ChatTemplate::new(source, origin).map_err(anyhow::Error::msg)?
        }
        (None, None) => ChatTemplate::chatml(),
    };
    tracing::info!(from = template.origin(), "chat template");
    Ok(template)
}

pub fn load_draft(paths: &ModelPaths) -> Result<Option<Arc<Transformer>>> {
    let Some(d) = &paths.draft else {
        return Ok(None);
    };
    check_file(d, "draft model")?;
    let progress = Progress::new(format!("loading the draft {}", file_name(d)));
    let opts = LoadOptions {
        progress: progress.hook(),
        head_vocab: paths.draft_head_vocab,
        requantize: paths
            .draft_requantize
            .as_deref()
            .map(engine::block_type)
            .transpose()?,
        ..LoadOptions::default()
    };
    let device = paths.devices(1)?.remove(0);
    let m = engine::load_model(d, &opts, &device)
        .with_context(|| format!("loading draft {}", d.display()));
    progress.finish();
    Ok(Some(Arc::new(m?)))
}

/// The default profile, timed with a progress bar (or log lines).
pub fn profile_options() -> decoding::ProfileOptions {
    let progress = Progress::new("measuring the cost profile for the auto strategy");
    decoding::ProfileOptions {
        progress: progress.hook(),
        ..Default::default()
    }
}

fn file_name(p: &Path) -> String {
    p.file_name().map_or_else(
        || p.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

fn target_options(paths: &ModelPaths, progress: &Arc<Progress>) -> LoadOptions {
    LoadOptions {
        dequantize_f16: paths.target_f16,
        progress: progress.hook(),
        ..LoadOptions::default()
    }
}

pub fn load_single(
    paths: &ModelPaths,
    phrase_len: usize,
    limits: &Limits,
) -> Result<Embedded<Transformer>> {
    check_file(&paths.target, "target model")?;
    let tokenizer = load_tokenizer(paths)?;
    let progress = Progress::new(format!("loading the target {}", file_name(&paths.target)));
    let device = paths.devices(1)?.remove(0);
    let m = engine::load_model(&paths.target, &target_options(paths, &progress), &device)
        .with_context(|| format!("loading target {}", paths.target.display()));
    progress.finish();
    let m = m?;
    assemble(Arc::new(m), tokenizer, paths, phrase_len, limits)
}

pub fn load_tp(
    paths: &ModelPaths,
    world: usize,
    phrase_len: usize,
    limits: &Limits,
) -> Result<Embedded<TpModel>> {
    check_file(&paths.target, "target model")?;
    let tokenizer = load_tokenizer(paths)?;
    let progress = Progress::new(format!("loading the target {}", file_name(&paths.target)));
    let devices = paths.devices(world)?;
    let m = TpModel::load_on(&paths.target, &target_options(paths, &progress), &devices)
        .with_context(|| {
            format!(
                "loading target {} over {world} ranks",
                paths.target.display()
            )
        })?;
    assemble(Arc::new(m), tokenizer, paths, phrase_len, limits)
}

fn assemble<T: LanguageModel + 'static>(
    target: Arc<T>,
    tokenizer: Tokenizer,
    paths: &ModelPaths,
    phrase_len: usize,
    limits: &Limits,
) -> Result<Embedded<T>> {
    let chat = Arc::new(load_chat_template(paths, Some(&paths.target), None)?);
    let eos = stop_ids(&paths.target, &tokenizer)?;
    let draft = load_draft(paths)?;
    // The strings were checked (where the files carry them); the embedding tables must
    // also have a row for every id (Qwen pairs pad theirs differently).
    let entries = tokenizer.get_vocab_size(true);
    let rows = [
        Some(("target", target.info())),
        draft.as_ref().map(|d| ("draft", d.info())),
    ];
    for (role, info) in rows.into_iter().flatten() {
        if info.vocab_size < entries {
            bail!(
                "the {role} model {} has {} embedding rows, fewer than the tokenizer's {entries} entries",
                info.name,
                info.vocab_size
            );
        }
    }
    let pipeline = fresh_pipeline(&target, draft.as_ref(), phrase_len, limits);
    Ok(Embedded {
        pipeline: Arc::new(pipeline),
        tokenizer,
        chat,
        eos,
        target,
        draft,
        limits: limits.clone(),
    })
}

/// Runtimes over loaded models, with empty pools and trie of their own.
pub fn fresh_pipeline<T: LanguageModel + 'static>(
    target: &Arc<T>,
    draft: Option<&Arc<Transformer>>,
    phrase_len: usize,
    limits: &Limits,
) -> LocalPipeline<T> {
    let pool = pool_for(phrase_len);
    let lookahead_pool = pool_for(phrase_len);
    Pipeline {
        target: Arc::new(TargetRuntime::new(target.clone(), limits.target.clone())),
        draft: draft.map(|d| {
            Arc::new(DraftRuntime::sharing(
                d.clone(),
                pool.clone(),
                limits.draft(),
            ))
        }),
        lookahead: Some(Arc::new(DraftRuntime::sharing(
            target.clone(),
            lookahead_pool.clone(),
            limits.draft(),
        ))),
        pool,
        lookahead_pool,
        trie: Default::default(),
        tuner: Default::default(),
        // The draft runtimes compute inside their futures.
        blocking: true,
    }
}

impl<T: LanguageModel + 'static> Embedded<T> {
    /// Where two decodings of `prompt` part after the shared `prefix`: the target's
    /// logits for the next token, teacher-forced in one forward, as (logit of `a` minus
    /// logit of `b`, gap between the best and second-best logits). A tiny gap means the
    /// two runs met a near-tie that different row counts can round either way.
    pub fn logit_gap(&self, prompt: &[u32], prefix: &[u32], a: u32, b: u32) -> Result<(f32, f32)> {
        let text: Vec<u32> = prompt.iter().chain(prefix).copied().collect();
        let positions: Vec<u32> = (0..text.len() as u32).collect();
        let mut cache = self.target.new_cache();
        let out = self.target.forward(
            &mut cache,
            engine::SeqInput::chain(
                &text,
                &positions,
                engine::OutputSpec::last(text.len()).with_logits(),
            ),
        )?;
        let row = out
            .logits
            .and_then(|mut l| l.pop())
            .context("the forward returned no logits")?;
        let at = |t: u32| row.get(t as usize).copied().unwrap_or(f32::NEG_INFINITY);
        let mut sorted = row.clone();
        sorted.sort_unstable_by(|x, y| y.total_cmp(x));
        let top_gap = sorted
            .first()
            .zip(sorted.get(1))
            .map_or(0.0, |(x, y)| x - y);
        Ok((at(a) - at(b), top_gap))
    }

    /// A pipeline on the same models with caches of its own, so that benchmarked
    /// strategies do not warm each other; its pools hold phrases of `phrase_len` tokens.
    pub fn isolated_pipeline(&self, phrase_len: usize) -> LocalPipeline<T> {
        fresh_pipeline(&self.target, self.draft.as_ref(), phrase_len, &self.limits)
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(engine::tokenizer::encode(&self.tokenizer, text)?)
    }

    /// One user turn in the model's chat template.
    pub fn chat_prompt(&self, user: &str) -> Result<String> {
        self.chat
            .render_turns([("user", user)])
            .map_err(anyhow::Error::msg)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(engine::tokenizer::decode(&self.tokenizer, ids, true)?)
    }

    /// Measures what verifies and draft calls cost on this machine (for `auto`), once.
    pub fn measure_costs(&self) -> Result<decoding::CostProfile> {
        let opts = profile_options();
        let p = futures::executor::block_on(
            self.pipeline.measure_costs_here(&opts, Default::default()),
        )
        .context("measuring the cost profile")?;
        eprintln!("cost profile: {}", p.describe());
        Ok(p)
    }

    /// Times a cost profile with `opts` through this pipeline's backends, without keeping
    /// it (a cost table's entry at one context, say).
    pub fn measure_costs_with(
        &self,
        opts: &decoding::ProfileOptions,
    ) -> Result<decoding::CostProfile> {
        let p = &self.pipeline;
        let measured = decoding::auto::measure(&*p.target, p.draft.as_deref(), opts);
        futures::executor::block_on(measured).context("measuring a cost profile")
    }

    /// Seconds per prompt row of a target prefill of `rows` rows (the median of three,
    /// through this pipeline's target backend).
    pub fn measure_prefill_row(&self, rows: usize) -> Result<f64> {
        use decoding::TargetBackend;
        let target = &self.pipeline.target;
        let vocab = target.info().vocab_size;
        let mut times = Vec::new();
        for rep in 0..3 {
            let tokens: Vec<u32> = (0..=rows)
                .map(|i| decoding::auto::profile::filler(i + rep, vocab))
                .collect();
            let t0 = std::time::Instant::now();
            let id = futures::executor::block_on(target.open(&tokens))?;
            times.push(t0.elapsed().as_secs_f64());
            futures::executor::block_on(target.close(id))?;
        }
        times.sort_by(f64::total_cmp);
        Ok(times[1] / rows.max(1) as f64)
    }

    /// Runs one request with the strategy in `params`.
    pub fn run(
        &self,
        prompt: &[u32],
        params: &DecodeParams,
        on_tokens: &mut decoding::TokenSink<'_>,
    ) -> Result<Generation> {
        let fut = self.pipeline.generate(prompt, params, on_tokens);
        Ok(futures::executor::block_on(fut)?)
    }
}
