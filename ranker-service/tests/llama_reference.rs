//! Our forward pass against candle's `quantized_llama` on the shipped GGUF.
//!
//! Why the reference is rebuilt: `quantized_llama` multiplies Q4_1 weights with a quantized
//! matmul that also rounds the activations to Q8_1, while our default path dequantizes the
//! weights to f32 and multiplies in f32. Comparing those would measure quantization noise, not
//! our code. So the f32 comparison feeds the reference a copy of the GGUF whose tensors are
//! dequantized to F32 (for which `QMatMul` does a plain f32 matmul): both sides then compute
//! with the same weights and precision, and the tolerance can be tight. Our quantized path is
//! compared with the reference on the original file (both use the same Q4_1 x Q8_1 kernel).

mod common;

use std::fs::File;
use std::io::Cursor;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use ranker_service::{GgufFile, Llama, LoadOptions, Positions, TokenBatch, WeightPrecision};

use common::{max_abs_diff, model, pseudo_random_ids, require_model};

/// `quantized_llama` over a copy of the shipped GGUF with every tensor stored as F32.
fn f32_reference() -> ModelWeights {
    let dev = Device::Cpu;
    let mut f = File::open(require_model()).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let mut names: Vec<String> = ct.tensor_infos.keys().cloned().collect();
    names.sort();
    let tensors: Vec<(String, QTensor)> = names
        .into_iter()
        .map(|n| {
            let t = ct
                .tensor(&mut f, &n, &dev)
                .unwrap()
                .dequantize(&dev)
                .unwrap();
            (n, QTensor::quantize(&t, GgmlDType::F32).unwrap())
        })
        .collect();
    let md: Vec<(&str, &gguf_file::Value)> =
        ct.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut buf = Cursor::new(Vec::new());
    gguf_file::write(&mut buf, &md, &ts).unwrap();
    drop(tensors);
    buf.set_position(0);
    let ct = gguf_file::Content::read(&mut buf).unwrap();
    ModelWeights::from_gguf(ct, &mut buf, &dev).unwrap()
}

fn reference_last_logits(reference: &mut ModelWeights, ids: &[u32]) -> Vec<f32> {
    let input = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    reference.clear_kv_cache();
    let logits = reference.forward(&input, 0).unwrap();
    logits.squeeze(0).unwrap().to_vec1().unwrap()
}

fn our_last_logits(model: &Llama, ids: &[u32]) -> Vec<f32> {
    let batch = TokenBatch::left_padded(&[ids], model.device()).unwrap();
    let out = model.forward(&batch, None, None, Positions::Last).unwrap();
    let logits = model.full_logits(&out.last_hidden().unwrap()).unwrap();
    logits.squeeze(0).unwrap().to_vec1().unwrap()
}

#[test]
fn f32_logits_match_quantized_llama_on_dequantized_weights() {
    let model = model();
    let mut reference = f32_reference();
    for (n, seed) in [(7, 1), (150, 2)] {
        let ids = pseudo_random_ids(n, seed);
        let ours = our_last_logits(model, &ids);
        let theirs = reference_last_logits(&mut reference, &ids);
        let diff = max_abs_diff(&ours, &theirs);
        let scale = theirs.iter().fold(0f32, |m, x| m.max(x.abs()));
        eprintln!("len {n}: max |logit| {scale:.2}, max abs diff {diff:.2e}");
        assert!(diff <= 0.01, "len {n}: max abs diff {diff} > 0.01");
    }
}

/// Our quantized path (unpermuted, fused Q4_1 rows) against the reference on the original file.
///
/// For one or two tokens the two are bit-identical: same weights, same Q4_1 x Q8_1 kernel.
/// Longer sequences are held to a looser bound: both sides re-quantize every activation to
/// Q8_1, so the ~1e-5 f32 summation-order differences of attention (see the f32 test) flip
/// some roundings by a whole quantization step, and the logits drift by ~0.5 at 12 tokens.
/// That is still below the quantization noise itself (Q4_1 vs f32: ~0.8 on the same inputs)
/// and far below what a layout bug (wrong RoPE pairing, misplaced fused rows) produces.
#[test]
fn quantized_path_matches_quantized_llama() {
    let mut gguf = GgufFile::open(require_model()).unwrap();
    let opts = LoadOptions {
        precision: WeightPrecision::Quantized,
        ..LoadOptions::default()
    };
    let ours_model = Llama::from_gguf(&mut gguf, &opts).unwrap();
    let mut f = File::open(require_model()).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let mut reference = ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).unwrap();
    // The reference's output head is a Q4_1 matmul (tied to token_embd); ours is a dense head
    // over dequantized rows. Apply the reference's head to our hidden state so the test
    // compares the decoder blocks, not the two heads' rounding.
    let head =
        QMatMul::from_qtensor(gguf.tensor("token_embd.weight", &Device::Cpu).unwrap()).unwrap();
    for (n, tolerance) in [(1, 0.01), (2, 0.01), (12, 1.0)] {
        let ids = pseudo_random_ids(n, 3);
        let batch = TokenBatch::left_padded(&[&ids], ours_model.device()).unwrap();
        let hidden = ours_model
            .forward(&batch, None, None, Positions::Last)
            .unwrap()
            .last_hidden()
            .unwrap();
        let ours: Vec<f32> = head
            .forward(&hidden)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let theirs = reference_last_logits(&mut reference, &ids);
        let diff = max_abs_diff(&ours, &theirs);
        eprintln!("quantized, len {n}: max abs diff {diff:.2e}");
        assert!(
            diff <= tolerance,
            "len {n}: max abs diff {diff} > {tolerance}"
        );
    }
}
