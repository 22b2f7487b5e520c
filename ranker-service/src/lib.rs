//! The LlamaRec ranker: a Llama-family LLM that scores candidate items by the logits of their
//! index letters after one forward pass over a rendered prompt, and the gRPC service around it.
//!
//! Model core, one job per module:
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
//! - [`peft`]: LoRA adapters in PEFT's file layout (load and save).
//!
//! Service (the transport knows nothing about tensors, the model nothing about gRPC):
//! - [`service_config`]: the `[ranker]` configuration section.
//! - [`queue`]: admission, dynamic batching and the dedicated model thread.
//! - [`backend`]: batches on the model with the per-user [`history_cache`].
//! - [`service`]: the `llamarec.v1.Ranker` gRPC service and its error mapping.
//! - [`model_version`]: the served model's name, content hash and label.
//! - [`reload`]: hot reload of the adapter over the shared base weights (the Reload RPC, SIGHUP).
//! - [`server`]: loading, warm-up, health and serving.
//! - [`metrics`]: Prometheus metric names and the exporter.

pub mod backend;
pub mod bf16_gemm;
pub mod config;
mod cpu_kernels;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod history_cache;
pub mod kv_cache;
pub mod llama;
pub mod lora;
pub mod metrics;
pub mod model_version;
pub mod peft;
pub mod prompt;
pub mod queue;
pub mod ranker;
pub mod reload;
pub mod sample;
pub mod server;
pub mod service;
pub mod service_config;
pub mod tokenizer;
pub mod train;
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
