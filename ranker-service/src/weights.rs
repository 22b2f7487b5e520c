//! Loading Llama weights (GGUF or HF safetensors) into the layout our forward pass uses:
//! HF row order for the query/key projections, fused QKV and gate/up projections.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};

use crate::config::LlamaConfig;
use crate::error::{RankerError, Result};
use crate::gguf::GgufFile;

/// How quantized GGUF weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightPrecision {
    /// Dequantize every weight to f32 at load. The CPU default: candle has no SIMD kernel for
    /// Q4_1, so the quantized matmul is ~25x slower than f32 on this model.
    #[default]
    F32,
    /// Keep quantized tensors as stored and multiply with candle's `QMatMul` (activations are
    /// quantized to Q8 on the fly). Uses ~5x less memory; slower on CPU.
    Quantized,
    /// Projections in bf16 with f32 sums ([`crate::bf16_gemm`]: AMX where present, else
    /// AVX-512 BF16), packed at load after the adapter is merged; refuses to start on a CPU
    /// without AVX-512 BF16. Embeddings, norms and attention stay f32.
    Bf16,
    /// `bf16` where the CPU has AVX-512 BF16 (and the device is the CPU), else `f32`.
    Auto,
}

/// A projection `y = x W^T`, with `W` of shape `(out, in)`.
#[derive(Debug, Clone)]
pub enum Linear {
    /// A dense weight of shape `(out, in)` in the model dtype.
    Dense(Tensor),
    /// A quantized weight multiplied by candle's quantized matmul.
    Quantized(QMatMul),
    /// Several projections of the same input whose outputs are concatenated; used when the
    /// parts of a fused projection are stored in different quantized formats.
    Concat(Vec<Linear>),
    /// A bf16 weight packed for the CPU's bf16 kernels (inference only: no backward).
    Bf16(Arc<crate::bf16_gemm::PackedBf16>),
}

impl Linear {
    /// Applies the projection to a 2D input `(n, in)`, returning `(n, out)`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(w) => x.matmul(&w.t()?),
            Self::Quantized(q) => q.forward(x),
            Self::Bf16(w) => {
                let (rows, _) = x.dims2()?;
                let x = x.contiguous()?;
                let y = crate::cpu_kernels::with_f32(&x, |data| w.matmul(data, rows))
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                Tensor::from_vec(y, (rows, w.out_features()), x.device())
            }
            Self::Concat(parts) => {
                let ys = parts
                    .iter()
                    .map(|p| p.forward(x))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&ys, D::Minus1)
            }
        }
    }

    /// The weight as a dense `(out, in)` tensor of `dtype`.
    pub fn to_dense(&self, dtype: DType) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(w) => w.to_dtype(dtype),
            Self::Quantized(QMatMul::QTensor(q)) => q.dequantize(&q.device())?.to_dtype(dtype),
            Self::Quantized(QMatMul::Tensor(w)) | Self::Quantized(QMatMul::TensorF16(w)) => {
                w.to_dtype(dtype)
            }
            Self::Bf16(w) => Tensor::from_vec(w.unpack(), (w.out_features(), w.in_features()), &Device::Cpu)?.to_dtype(dtype),
            Self::Concat(parts) => {
                let ws = parts
                    .iter()
                    .map(|p| p.to_dense(dtype))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&ws, 0)
            }
        }
    }

    /// True when the weight is held as a dense tensor (LoRA can be merged into it).
    pub fn is_dense(&self) -> bool {
        matches!(self, Self::Dense(_))
    }
}

/// A weight as read from a file, before it is converted to a [`Linear`].
enum RawWeight {
    Quant(QTensor),
    Dense(Tensor),
}

impl RawWeight {
    fn dims(&self) -> Vec<usize> {
        match self {
            Self::Quant(q) => q.shape().dims().to_vec(),
            Self::Dense(t) => t.dims().to_vec(),
        }
    }

    fn to_dense(&self, device: &Device, dtype: DType) -> Result<Tensor> {
        Ok(match self {
            Self::Quant(q) => q.dequantize(device)?.to_dtype(dtype)?,
            Self::Dense(t) => t.to_device(device)?.to_dtype(dtype)?,
        })
    }

    /// True for block-quantized storage (not plain F32/F16/BF16).
    fn is_block_quantized(&self) -> bool {
        matches!(self, Self::Quant(q) if !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16))
    }
}

/// The weights of one decoder block, in our layout.
#[derive(Debug, Clone)]
pub struct BlockWeights {
    /// RMSNorm scale before attention, `(hidden)`.
    pub attn_norm: Tensor,
    /// Fused query/key/value projection: output columns are `[q | k | v]`, HF head order.
    pub qkv: Linear,
    /// Attention output projection.
    pub o: Linear,
    /// RMSNorm scale before the feed-forward layer, `(hidden)`.
    pub ffn_norm: Tensor,
    /// Fused gate/up projection: output columns are `[gate | up]`.
    pub gate_up: Linear,
    /// Feed-forward down projection.
    pub down: Linear,
}

/// All weights of a Llama model, in our layout.
#[derive(Debug, Clone)]
pub struct LlamaWeights {
    /// Token embedding table `(vocab, hidden)`.
    pub embed: Tensor,
    /// Decoder blocks.
    pub blocks: Vec<BlockWeights>,
    /// Final RMSNorm scale `(hidden)`.
    pub final_norm: Tensor,
    /// Output projection `(vocab, hidden)`, kept dense so that rows of chosen tokens can be
    /// gathered cheaply; shares storage with `embed` when the model ties them.
    pub lm_head: Tensor,
}

/// Where weights come from.
#[derive(Debug, Clone)]
pub enum WeightSource {
    /// A llama.cpp GGUF file (tokenizer in its metadata).
    Gguf(PathBuf),
    /// A directory with HF `config.json` and `*.safetensors` files.
    Safetensors(PathBuf),
}

/// The canonical projections of a decoder block, named as in HF checkpoints.
const PROJ_NAMES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

trait TensorReader {
    /// Reads a tensor by its HF name ("model.layers.3.self_attn.q_proj.weight").
    fn read(&mut self, hf_name: &str) -> Result<RawWeight>;
    fn has(&self, hf_name: &str) -> bool;
}

/// Translates HF tensor names to llama.cpp's GGUF names.
fn gguf_name(hf_name: &str) -> String {
    match hf_name {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf_name.strip_prefix("model.layers.").unwrap_or(hf_name);
    let (idx, tail) = rest.split_once('.').unwrap_or(("", rest));
    let g = match tail {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        other => other,
    };
    format!("blk.{idx}.{g}")
}

struct GgufReader<'a> {
    file: &'a mut GgufFile,
    device: Device,
    cfg: LlamaConfig,
}

impl TensorReader for GgufReader<'_> {
    fn read(&mut self, hf_name: &str) -> Result<RawWeight> {
        let q = self.file.tensor(&gguf_name(hf_name), &self.device)?;
        // llama.cpp's converter permutes the rows of Q and K so that RoPE rotates interleaved
        // pairs (2i, 2i+1); we undo it so every source (GGUF, safetensors, PEFT adapters) shares
        // the HF layout with half-split rotation.
        let heads = if hf_name.ends_with("q_proj.weight") {
            Some(self.cfg.num_heads)
        } else if hf_name.ends_with("k_proj.weight") {
            Some(self.cfg.num_kv_heads)
        } else {
            None
        };
        Ok(RawWeight::Quant(match heads {
            Some(h) => unpermute_rows_quantized(&q, h, self.cfg.head_dim)?,
            None => q,
        }))
    }

    fn has(&self, hf_name: &str) -> bool {
        self.file.has_tensor(&gguf_name(hf_name))
    }
}

/// Row `h*d + s*d/2 + i` of the HF layout is row `h*d + 2i + s` of llama.cpp's layout.
fn unpermuted_row_order(heads: usize, head_dim: usize) -> Vec<usize> {
    let half = head_dim / 2;
    let mut order = Vec::with_capacity(heads * head_dim);
    for h in 0..heads {
        for s in 0..2 {
            for i in 0..half {
                order.push(h * head_dim + 2 * i + s);
            }
        }
    }
    order
}

/// Reorders whole rows of a (possibly block-quantized) matrix. Quantization blocks run along a
/// row, so rows can be moved as opaque byte ranges without requantizing.
fn unpermute_rows_quantized(q: &QTensor, heads: usize, head_dim: usize) -> Result<QTensor> {
    let (rows, cols) = q.shape().dims2()?;
    if rows != heads * head_dim {
        return Err(RankerError::InvalidModel(format!(
            "projection has {rows} rows, expected {heads} heads x {head_dim}"
        )));
    }
    let dtype = q.dtype();
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    let mut out = Vec::with_capacity(data.len());
    for src in unpermuted_row_order(heads, head_dim) {
        out.extend_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
    }
    let storage = QStorage::from_data(Cow::Owned(out), &q.device(), dtype)?;
    Ok(QTensor::new(storage, (rows, cols))?)
}

/// Concatenates block-quantized matrices of one dtype along the rows, byte by byte.
fn concat_rows_quantized(parts: &[&QTensor]) -> Result<QTensor> {
    let dtype = parts[0].dtype();
    let cols = parts[0].shape().dims2()?.1;
    let mut rows = 0;
    let mut out = Vec::new();
    for p in parts {
        let (r, c) = p.shape().dims2()?;
        if c != cols || p.dtype() != dtype {
            return Err(RankerError::InvalidModel(
                "cannot fuse mismatched quantized weights".into(),
            ));
        }
        rows += r;
        out.extend_from_slice(&p.data()?);
    }
    let storage = QStorage::from_data(Cow::Owned(out), &parts[0].device(), dtype)?;
    Ok(QTensor::new(storage, (rows, cols))?)
}

struct SafetensorsReader {
    tensors: HashMap<String, Tensor>,
}

impl TensorReader for SafetensorsReader {
    fn read(&mut self, hf_name: &str) -> Result<RawWeight> {
        self.tensors
            .remove(hf_name)
            .map(RawWeight::Dense)
            .ok_or_else(|| {
                RankerError::InvalidModel(format!("safetensors: tensor {hf_name} missing"))
            })
    }

    fn has(&self, hf_name: &str) -> bool {
        self.tensors.contains_key(hf_name)
    }
}

/// Builds one projection from its parts (fused along the output rows).
fn build_linear(
    parts: Vec<RawWeight>,
    precision: WeightPrecision,
    device: &Device,
    dtype: DType,
) -> Result<Linear> {
    let keep_quantized =
        precision == WeightPrecision::Quantized && parts.iter().all(RawWeight::is_block_quantized);
    if !keep_quantized {
        let ws = parts
            .iter()
            .map(|p| p.to_dense(device, dtype))
            .collect::<Result<Vec<_>>>()?;
        let w = if ws.len() == 1 {
            ws.into_iter().next().expect("one part")
        } else {
            Tensor::cat(&ws, 0)?
        };
        return Ok(Linear::Dense(w.contiguous()?));
    }
    let qs: Vec<&QTensor> = parts
        .iter()
        .map(|p| match p {
            RawWeight::Quant(q) => q,
            RawWeight::Dense(_) => unreachable!("checked above"),
        })
        .collect();
    let same_dtype = qs.iter().all(|q| q.dtype() == qs[0].dtype());
    let to_qmatmul = |q: QTensor| Linear::Quantized(QMatMul::QTensor(Arc::new(q)));
    Ok(if same_dtype {
        to_qmatmul(concat_rows_quantized(&qs)?)
    } else {
        Linear::Concat(
            qs.iter()
                .map(|q| Ok(to_qmatmul(concat_rows_quantized(&[q])?)))
                .collect::<Result<Vec<_>>>()?,
        )
    })
}

fn load_weights(
    reader: &mut dyn TensorReader,
    cfg: &LlamaConfig,
    precision: WeightPrecision,
    device: &Device,
    dtype: DType,
) -> Result<LlamaWeights> {
    let dense = |r: RawWeight| -> Result<Tensor> { r.to_dense(device, dtype) };
    let embed = dense(reader.read("model.embed_tokens.weight")?)?;
    let expect = |name: &str, dims: &[usize], want: &[usize]| -> Result<()> {
        if dims != want {
            return Err(RankerError::InvalidModel(format!(
                "{name} has shape {dims:?}, expected {want:?}"
            )));
        }
        Ok(())
    };
    expect(
        "embed_tokens",
        embed.dims(),
        &[cfg.vocab_size, cfg.hidden_size],
    )?;
    let mut blocks = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        let mut proj = HashMap::new();
        for name in PROJ_NAMES {
            let sub = if ["gate_proj", "up_proj", "down_proj"].contains(&name) {
                "mlp"
            } else {
                "self_attn"
            };
            let full = format!("{p}.{sub}.{name}.weight");
            let w = reader.read(&full)?;
            let want = match name {
                "q_proj" => [cfg.q_dim(), cfg.hidden_size],
                "k_proj" | "v_proj" => [cfg.kv_dim(), cfg.hidden_size],
                "o_proj" => [cfg.hidden_size, cfg.q_dim()],
                "gate_proj" | "up_proj" => [cfg.intermediate_size, cfg.hidden_size],
                _ => [cfg.hidden_size, cfg.intermediate_size],
            };
            expect(&full, &w.dims(), &want)?;
            proj.insert(name, w);
        }
        let mut take = |n: &str| proj.remove(n).expect("read above");
        let qkv = vec![take("q_proj"), take("k_proj"), take("v_proj")];
        let o = vec![take("o_proj")];
        let gate_up = vec![take("gate_proj"), take("up_proj")];
        let down = vec![take("down_proj")];
        blocks.push(BlockWeights {
            attn_norm: dense(reader.read(&format!("{p}.input_layernorm.weight"))?)?,
            qkv: build_linear(qkv, precision, device, dtype)?,
            o: build_linear(o, precision, device, dtype)?,
            ffn_norm: dense(reader.read(&format!("{p}.post_attention_layernorm.weight"))?)?,
            gate_up: build_linear(gate_up, precision, device, dtype)?,
            down: build_linear(down, precision, device, dtype)?,
        });
    }
    let final_norm = dense(reader.read("model.norm.weight")?)?;
    let lm_head = if reader.has("lm_head.weight") {
        let w = dense(reader.read("lm_head.weight")?)?;
        expect("lm_head", w.dims(), &[cfg.vocab_size, cfg.hidden_size])?;
        w
    } else {
        embed.clone()
    };
    Ok(LlamaWeights {
        embed,
        blocks,
        final_norm,
        lm_head,
    })
}

/// Loads config and weights from a GGUF file.
pub fn load_gguf(
    gguf: &mut GgufFile,
    precision: WeightPrecision,
    device: &Device,
    dtype: DType,
) -> Result<(LlamaConfig, LlamaWeights)> {
    let cfg = LlamaConfig::from_gguf(gguf)?;
    let mut reader = GgufReader {
        file: gguf,
        device: device.clone(),
        cfg: cfg.clone(),
    };
    let weights = load_weights(&mut reader, &cfg, precision, device, dtype)?;
    Ok((cfg, weights))
}

/// Loads config and weights from an HF model directory (`config.json` + `*.safetensors`).
pub fn load_safetensors_dir(
    dir: &Path,
    device: &Device,
    dtype: DType,
) -> Result<(LlamaConfig, LlamaWeights)> {
    let config_path = dir.join("config.json");
    if !config_path.exists() {
        return Err(RankerError::ModelNotFound { path: config_path });
    }
    let cfg = LlamaConfig::from_hf_json(&config_path)?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| RankerError::Io {
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(RankerError::ModelNotFound {
            path: dir.join("model.safetensors"),
        });
    }
    let mut tensors = HashMap::new();
    for f in &files {
        tensors.extend(candle_core::safetensors::load(f, device)?);
    }
    let mut reader = SafetensorsReader { tensors };
    let weights = load_weights(&mut reader, &cfg, WeightPrecision::F32, device, dtype)?;
    Ok((cfg, weights))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermuted_order_matches_llama_cpp_permute_inverse() {
        // llama.cpp: gguf = hf.reshape(H, 2, d/2, in).swapaxes(1, 2); so gguf row h*d + 2i + s
        // holds hf row h*d + s*d/2 + i.
        let (h, d) = (2, 8);
        let order = unpermuted_row_order(h, d);
        for hh in 0..h {
            for i in 0..d / 2 {
                for s in 0..2 {
                    assert_eq!(order[hh * d + s * d / 2 + i], hh * d + 2 * i + s);
                }
            }
        }
    }

    #[test]
    fn gguf_names() {
        assert_eq!(
            gguf_name("model.layers.12.self_attn.k_proj.weight"),
            "blk.12.attn_k.weight"
        );
        assert_eq!(
            gguf_name("model.layers.0.mlp.down_proj.weight"),
            "blk.0.ffn_down.weight"
        );
        assert_eq!(gguf_name("model.norm.weight"), "output_norm.weight");
    }
}
