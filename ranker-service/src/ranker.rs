//! The ranker's scoring entry point: model + prompt + verbalizer + prefix cache.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::DType;
use serde::{Deserialize, Serialize};

use crate::error::{RankerError, Result};
use crate::gguf::GgufFile;
use crate::kv_cache::KvCache;
use crate::lora::LoraAdapter;
use crate::llama::{Kernels, Llama, LoadOptions, Positions, TokenBatch, TokenHead};
use crate::prompt::{PromptRenderer, PromptTemplate, TokenizedPrompt};
use crate::tokenizer::Tokenizer;
use crate::verbalizer::Verbalizer;
use crate::weights::WeightPrecision;

/// Configuration of the ranker's model core.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankerModelConfig {
    /// A GGUF file, or an HF directory with `config.json`, `*.safetensors`, `tokenizer.json`.
    pub model: PathBuf,
    /// An explicit `tokenizer.json`; default: the GGUF metadata or the HF directory's file.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// How quantized GGUF weights are held.
    #[serde(default)]
    pub precision: WeightPrecision,
    /// The prompt template.
    #[serde(default)]
    pub template: PromptTemplate,
}

/// A request rendered, tokenized and checked against the model's context.
#[derive(Debug, Clone)]
pub struct PreparedRequest {
    /// The prompt's ids and part boundaries.
    pub prompt: TokenizedPrompt,
    /// Number of candidates (the first this-many letters are scored).
    pub num_candidates: usize,
}

/// One row of a scoring batch.
#[derive(Debug, Clone, Copy)]
pub struct ScoreInput<'a> {
    /// The request.
    pub request: &'a PreparedRequest,
    /// This user's cached prefix + history state, from [`Scores::history_cache`] of an earlier
    /// request with the same history; the pass then runs only the candidate part.
    pub history_cache: Option<&'a KvCache>,
    /// Whether to cut this row's prefix + history state out of the pass for later reuse.
    pub want_history_cache: bool,
}

/// Scores of one request.
#[derive(Debug, Clone)]
pub struct Scores {
    /// Raw logit of each candidate's letter token, in candidate order.
    pub logits: Vec<f32>,
    /// Softmax of `logits` over the candidates.
    pub probabilities: Vec<f32>,
    /// Prefix + history attention state, when asked for and the prompt is splittable.
    pub history_cache: Option<KvCache>,
    /// Tokens this pass actually ran for the request (after cached parts).
    pub tokens_run: usize,
}

/// Scores candidates with one forward pass per batch: the logits of the candidates' letter
/// tokens at the prompt's last position.
#[derive(Debug, Clone)]
pub struct Ranker {
    model: Llama,
    renderer: PromptRenderer,
    verbalizer: Verbalizer,
    head: TokenHead,
    /// The fixed instruction prefix, run once at construction.
    prefix_cache: KvCache,
    /// Longest prompt [`Ranker::prepare`] accepts.
    max_prompt_tokens: usize,
    /// The LoRA adapter applied over the base weights in every pass.
    adapter: Option<Arc<LoraAdapter>>,
}

impl Ranker {
    /// Loads model and tokenizer as configured and prepares the verbalizer and prefix cache.
    pub fn load(config: &RankerModelConfig, opts: &LoadOptions) -> Result<Self> {
        Self::load_with_adapter(config, None, opts)
    }

    /// Like [`Ranker::load`], with a PEFT LoRA adapter directory applied over the base weights.
    /// Off the CPU the forward pass uses candle's generic kernels.
    pub fn load_with_adapter(
        config: &RankerModelConfig,
        adapter: Option<&Path>,
        opts: &LoadOptions,
    ) -> Result<Self> {
        // bf16 packing dequantizes each projection itself, block by block (see
        // `Llama::pack_bf16`), so the file's quantized weights are read as they are.
        let bf16_kernel = match config.precision {
            WeightPrecision::Bf16 | WeightPrecision::Auto if opts.device.is_cpu() && opts.dtype == DType::F32 => {
                crate::bf16_gemm::Bf16Kernel::detect()
            }
            _ => None,
        };
        if config.precision == WeightPrecision::Bf16 && bf16_kernel.is_none() {
            return Err(RankerError::InvalidModel(
                "precision = \"bf16\" needs an f32 model on a CPU with AVX-512 BF16, which this is not; use \"auto\" (bf16 where available) or \"f32\"".into(),
            ));
        }
        let opts = LoadOptions {
            precision: match (config.precision, bf16_kernel) {
                (_, Some(_)) => WeightPrecision::Quantized,
                (WeightPrecision::Auto | WeightPrecision::Bf16, None) => WeightPrecision::F32,
                (p, None) => p,
            },
            ..opts.clone()
        };
        let (model, tokenizer) = if config.model.is_dir() {
            let model = Llama::from_safetensors_dir(&config.model, &opts)?;
            let path = config
                .tokenizer
                .clone()
                .unwrap_or_else(|| config.model.join("tokenizer.json"));
            (model, Tokenizer::from_file(&path)?)
        } else {
            let mut gguf = GgufFile::open(&config.model)?;
            let model = Llama::from_gguf(&mut gguf, &opts)?;
            let tokenizer = match &config.tokenizer {
                Some(p) => Tokenizer::from_file(p)?,
                None => Tokenizer::from_gguf(&gguf)?,
            };
            (model, tokenizer)
        };
        let mut model = model;
        if bf16_kernel.is_some() {
            model.pack_bf16(None)?;
        }
        if !model.device().is_cpu() {
            model.set_kernels(Kernels::Generic);
        }
        let renderer = PromptRenderer::new(config.template.clone(), tokenizer)?;
        let lora = match adapter {
            Some(dir) => Some(Arc::new(crate::peft::load_adapter(dir, model.config(), model.device(), model.dtype())?.0.for_serving(model.config())?)),
            None => None,
        };
        Self::assemble(model, renderer, lora)
    }

    /// Wires a loaded model to a renderer.
    pub fn new(model: Llama, renderer: PromptRenderer) -> Result<Self> {
        Self::assemble(model, renderer, None)
    }

    /// The same base model and prompt with `adapter` instead of this ranker's own (None: the
    /// base alone). The base weights are shared, not copied (their tensors and packed
    /// projections are reference-counted); only the instruction prefix is run again, since its
    /// attention state depends on the adapter.
    pub fn with_adapter(&self, adapter: Option<Arc<LoraAdapter>>) -> Result<Self> {
        let mut ranker = Self::assemble(self.model.clone(), self.renderer.clone(), adapter)?;
        ranker.max_prompt_tokens = self.max_prompt_tokens;
        Ok(ranker)
    }

    /// Reads a PEFT adapter directory, checks that it fits this ranker's base model and
    /// prepares it for serving ([`LoraAdapter::for_serving`]).
    pub fn read_adapter(&self, dir: &Path) -> Result<LoraAdapter> {
        crate::peft::load_adapter(dir, self.model.config(), self.model.device(), self.model.dtype())?.0.for_serving(self.model.config())
    }

    /// The adapter applied over the base weights, if any.
    pub fn adapter(&self) -> Option<&LoraAdapter> {
        self.adapter.as_deref()
    }

    /// The adapter is applied per token, not merged into the weights: the base stays intact, so
    /// a hot reload can put another adapter over the same weights in memory (the cost: a rank-r
    /// product beside each fused projection; BENCHMARKS.md "Adapter applied per token").
    fn assemble(model: Llama, renderer: PromptRenderer, adapter: Option<Arc<LoraAdapter>>) -> Result<Self> {
        let verbalizer = Verbalizer::new(&renderer)?;
        let head = model.token_head(verbalizer.token_ids())?;
        let prefix = TokenBatch::left_padded(&[renderer.prefix_ids()], model.device())?;
        let prefix_cache = model.forward(&prefix, None, adapter.as_deref(), Positions::Last)?.cache;
        let max_prompt_tokens = model.config().max_seq_len;
        Ok(Self {
            model,
            renderer,
            verbalizer,
            head,
            prefix_cache,
            max_prompt_tokens,
            adapter,
        })
    }

    /// Accepts prompts of at most `tokens` (capped at the model's context length), e.g. to
    /// bound the work one request can ask for.
    pub fn set_max_prompt_tokens(&mut self, tokens: usize) {
        self.max_prompt_tokens = tokens.min(self.model.config().max_seq_len);
    }

    /// Longest prompt accepted, in tokens.
    pub fn max_prompt_tokens(&self) -> usize {
        self.max_prompt_tokens
    }

    /// The model.
    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// The prompt renderer (template and tokenizer).
    pub fn renderer(&self) -> &PromptRenderer {
        &self.renderer
    }

    /// The verbalizer.
    pub fn verbalizer(&self) -> &Verbalizer {
        &self.verbalizer
    }

    /// Renders and tokenizes a request and checks it fits the context.
    pub fn prepare<H: AsRef<str>, C: AsRef<str>>(
        &self,
        history: &[H],
        candidates: &[C],
    ) -> Result<PreparedRequest> {
        let rendered = self.renderer.render(history, candidates)?;
        let prompt = self.renderer.tokenize(&rendered)?;
        let max = self.max_prompt_tokens;
        if prompt.ids.len() > max {
            return Err(RankerError::ContextOverflow {
                tokens: prompt.ids.len(),
                max,
            });
        }
        Ok(PreparedRequest {
            prompt,
            num_candidates: candidates.len(),
        })
    }

    /// Scores a batch in one forward pass. Each row starts from the most specific cached state
    /// available: its history cache, else the shared prefix, else nothing (prompts whose parts
    /// do not tokenize independently).
    pub fn score_batch(&self, inputs: &[ScoreInput]) -> Result<Vec<Scores>> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let empty = self.model.empty_cache(1)?;
        let mut starts: Vec<&KvCache> = Vec::with_capacity(inputs.len());
        let mut suffixes: Vec<&[u32]> = Vec::with_capacity(inputs.len());
        for input in inputs {
            let p = &input.request.prompt;
            let (cache, ids) = match (p.splittable, input.history_cache) {
                (true, Some(h)) => (h, p.candidates()),
                (true, None) => (&self.prefix_cache, &p.ids[p.prefix_len..]),
                (false, _) => (&empty, &p.ids[..]),
            };
            if cache.batch_size() != 1 {
                return Err(RankerError::InvalidModel(
                    "history cache must have one row".into(),
                ));
            }
            starts.push(cache);
            suffixes.push(ids);
        }
        let cache = KvCache::stack(&starts)?;
        let batch = TokenBatch::left_padded(&suffixes, self.model.device())?;
        let out = self
            .model
            .forward(&batch, Some(&cache), self.adapter.as_deref(), Positions::Last)?;
        let logits: Vec<Vec<f32>> = self
            .head
            .logits(&out.last_hidden()?)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec2()?;
        inputs
            .iter()
            .zip(logits)
            .enumerate()
            .map(|(row, (input, mut row_logits))| {
                row_logits.truncate(input.request.num_candidates);
                let p = &input.request.prompt;
                let history_cache = if input.want_history_cache && p.splittable {
                    Some(out.cache.row_prefix(row, p.prefix_len + p.history_len)?)
                } else {
                    None
                };
                Ok(Scores {
                    probabilities: softmax(&row_logits),
                    logits: row_logits,
                    history_cache,
                    tokens_run: suffixes[row].len(),
                })
            })
            .collect()
    }

    /// Scores one request from scratch (no history cache).
    pub fn score<H: AsRef<str>, C: AsRef<str>>(
        &self,
        history: &[H],
        candidates: &[C],
    ) -> Result<Scores> {
        let request = self.prepare(history, candidates)?;
        let input = ScoreInput {
            request: &request,
            history_cache: None,
            want_history_cache: false,
        };
        Ok(self.score_batch(&[input])?.remove(0))
    }
}

fn softmax(xs: &[f32]) -> Vec<f32> {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = xs.iter().map(|x| (x - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}
