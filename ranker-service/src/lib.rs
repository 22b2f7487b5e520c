//! The LlamaRec ranker's model core: a Llama-family LLM that scores candidate items by the
//! logits of their index letters after one forward pass over a rendered prompt.
//!
//! Modules, one job each:
//! - [`gguf`]: reading GGUF metadata and tensors.
//! - [`config`]: model hyper-parameters.
//! - [`weights`]: loading GGUF / safetensors weights into our layout.
//! - [`llama`]: the forward pass (padding mask, KV cache, hidden states, LoRA, token head).
//! - [`kv_cache`]: cached attention state for shared prefixes.
//! - [`lora`]: LoRA adapters.
//! - [`tokenizer`]: byte-level BPE from GGUF metadata or `tokenizer.json`.
//! - [`prompt`]: prompt templates and their three-part rendering.
//! - [`verbalizer`]: the answer-letter token ids.
//! - [`sample`]: the fixed MovieLens request used by benchmarks and tests.
//! - [`ranker`]: scoring requests (prompt -> one forward pass -> letter logits), prefix cache.

pub mod config;
mod cpu_kernels;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod kv_cache;
pub mod llama;
pub mod lora;
pub mod prompt;
pub mod ranker;
pub mod sample;
pub mod tokenizer;
pub mod verbalizer;
pub mod weights;

pub use config::LlamaConfig;
pub use error::{RankerError, Result};
pub use gguf::GgufFile;
pub use kv_cache::KvCache;
pub use llama::{ForwardOutput, Kernels, Llama, LoadOptions, Positions, TokenBatch, TokenHead};
pub use lora::{LoraAdapter, LoraPair, Projection};
pub use prompt::{PromptRenderer, PromptTemplate, RenderedPrompt, TokenizedPrompt};
pub use ranker::{PreparedRequest, Ranker, RankerModelConfig, ScoreInput, Scores};
pub use tokenizer::Tokenizer;
pub use verbalizer::Verbalizer;
pub use weights::{Linear, WeightPrecision, WeightSource};
