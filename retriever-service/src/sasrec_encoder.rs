//! SASRec's forward pass for serving, over contiguous f32 buffers (the training graph is
//! `sasrec.rs`; the names of the tensors are the same).
//!
//! There is no recurrence to carry between requests: a user's state is the last block's output
//! at the latest event of the window, which depends on every event in it. So a history is always
//! encoded whole, and the retriever's state cache keeps the result per window. Only the last
//! block's output at the latest event is scored, so the last block computes keys and values for
//! every event but the query, attention and feed-forward for that one row.

use crate::config::LruRecConfig;
use crate::encoder::{norm, take, Ffn, Norm};
use crate::error::Result;
use crate::kernels::{layer_norm, linear, matmul_strided, Strided};
use candle_core::Tensor;
use std::collections::HashMap;

struct Projection {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl Projection {
    fn new(tensors: &HashMap<String, Tensor>, prefix: &str, d: usize) -> Result<Self> {
        Ok(Self { weight: take(tensors, &format!("{prefix}.weight"), d * d)?, bias: take(tensors, &format!("{prefix}.bias"), d)? })
    }

    /// (rows × D) → (rows × D).
    fn apply(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let d = self.bias.len();
        let mut out = vec![0.0; rows * d];
        linear(x, rows, &self.weight, &self.bias, d, d, &mut out);
        out
    }
}

struct Layer {
    query: Projection,
    key: Projection,
    value: Projection,
    output: Projection,
    attention_norm: Norm,
    ffn: Ffn,
}

/// SASRec's position embedding and blocks (the item embedding and its layer norm are the
/// [`crate::Encoder`]'s, shared with LRURec).
pub(crate) struct SasEncoder {
    positions: Vec<f32>,
    layers: Vec<Layer>,
}

impl SasEncoder {
    /// Reads the position embedding and the blocks.
    pub(crate) fn new(config: &LruRecConfig, tensors: &HashMap<String, Tensor>) -> Result<Self> {
        let d = config.embed_dim;
        let mut layers = Vec::with_capacity(config.num_blocks);
        for i in 0..config.num_blocks {
            let p = format!("blocks.{i}.attention");
            layers.push(Layer {
                query: Projection::new(tensors, &format!("{p}.query"), d)?,
                key: Projection::new(tensors, &format!("{p}.key"), d)?,
                value: Projection::new(tensors, &format!("{p}.value"), d)?,
                output: Projection::new(tensors, &format!("{p}.output"), d)?,
                attention_norm: norm(tensors, &format!("{p}.layer_norm"), d)?,
                ffn: Ffn::new(tensors, &format!("blocks.{i}.ffn"), config)?,
            });
        }
        Ok(Self { positions: take(tensors, "embedding.position.weight", config.max_len * d)?, layers })
    }

    /// The last block's output for `events` (1 ≤ n ≤ max_len, checked by the caller): every
    /// row when `all_rows` ((n × D)), else only the latest event's (D).
    pub(crate) fn run(&self, cfg: &LruRecConfig, embedding: &[f32], embed_norm: &Norm, events: &[u32], all_rows: bool) -> Vec<f32> {
        let (d, heads, eps) = (cfg.embed_dim, cfg.num_heads, cfg.layer_norm_eps as f32);
        let head_dim = d / heads;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let n = events.len();
        let mut x = Vec::with_capacity(n * d);
        for (t, &item) in events.iter().enumerate() {
            let (e, p) = (&embedding[item as usize * d..][..d], &self.positions[t * d..][..d]);
            x.extend(e.iter().zip(p).map(|(a, b)| a + b));
        }
        layer_norm(&mut x, &embed_norm.weight, &embed_norm.bias, eps);

        let mut scores = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            let first_row = if l + 1 == self.layers.len() && !all_rows { n - 1 } else { 0 };
            let rows = n - first_row;
            let keys = layer.key.apply(&x, n);
            let values = layer.value.apply(&x, n);
            let mut queries = layer.query.apply(&x[first_row * d..], rows);
            queries.iter_mut().for_each(|q| *q *= scale);

            let mut context = vec![0.0; rows * d];
            scores.resize(rows * n, 0.0);
            for h in 0..heads {
                let q = Strided { data: &queries, offset: h * head_dim, row_stride: d, col_stride: 1 };
                let k_t = Strided { data: &keys, offset: h * head_dim, row_stride: 1, col_stride: d };
                matmul_strided(rows, n, head_dim, q, k_t, &mut scores, 0, n);
                for (r, row) in scores.chunks_exact_mut(n).enumerate() {
                    // Row r is event first_row + r: it attends to itself and the events before.
                    let (seen, future) = row.split_at_mut(first_row + r + 1);
                    let max = seen.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0.0;
                    for s in seen.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    seen.iter_mut().for_each(|s| *s /= sum);
                    future.fill(0.0);
                }
                let p = Strided { data: &scores, offset: 0, row_stride: n, col_stride: 1 };
                let v = Strided { data: &values, offset: h * head_dim, row_stride: d, col_stride: 1 };
                matmul_strided(rows, head_dim, n, p, v, &mut context, h * head_dim, d);
            }
            let mut y = layer.output.apply(&context, rows);
            for (yv, xv) in y.iter_mut().zip(&x[first_row * d..]) {
                *yv += xv;
            }
            layer_norm(&mut y, &layer.attention_norm.weight, &layer.attention_norm.bias, eps);
            x = layer.ffn.apply(&y, rows, eps);
        }
        x
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{LruRecConfig, ModelKind};
    use crate::train::params::BuildFromParams;
    use crate::train::sasrec::SasRec;
    use crate::state_cache::{Outcome, StateCache};
    use crate::Encoder;
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};

    /// A small random SASRec; a large init spread makes the parity checks sensitive.
    fn small_sasrec(seed: u64, heads: usize, blocks: usize) -> SasRec {
        let config = LruRecConfig {
            kind: ModelKind::SasRec,
            num_items: 40,
            embed_dim: 16,
            num_heads: heads,
            num_blocks: blocks,
            ffn_dim: 24,
            init_std: 0.5,
            dropout: 0.0,
            max_len: 32,
            ..LruRecConfig::default()
        };
        SasRec::init(&config, seed, &Device::Cpu).unwrap()
    }

    fn encoder_of(model: &SasRec) -> Encoder {
        let tensors = model.params().iter().map(|p| (p.name.clone(), p.var.as_tensor().detach())).collect();
        Encoder::new(&model.config, &tensors).unwrap()
    }

    /// The graph's hidden states for left-padded `sequences`, row by row, real positions only.
    fn graph_rows(model: &SasRec, sequences: &[Vec<u32>]) -> Vec<Vec<f32>> {
        let len = sequences.iter().map(Vec::len).max().unwrap();
        let mut tokens = vec![0u32; sequences.len() * len];
        for (row, seq) in sequences.iter().enumerate() {
            tokens[row * len + len - seq.len()..(row + 1) * len].copy_from_slice(seq);
        }
        let tokens = Tensor::from_vec(tokens, (sequences.len(), len), &Device::Cpu).unwrap();
        let hidden = model.forward(&tokens, None).unwrap().to_vec3::<f32>().unwrap();
        sequences.iter().enumerate().map(|(row, seq)| hidden[row][len - seq.len()..].concat()).collect()
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    fn random_sequences(rng: &mut impl Rng, lengths: &[usize]) -> Vec<Vec<u32>> {
        lengths.iter().map(|&n| (0..n).map(|_| rng.gen_range(1..=40)).collect()).collect()
    }

    #[test]
    fn serving_encoder_matches_the_training_graph_with_padding_and_heads() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for (seed, heads) in [(0, 1), (1, 2), (2, 4)] {
            let model = small_sasrec(seed, heads, 2);
            let encoder = encoder_of(&model);
            // Different lengths in one batch: padding must not leak into any real position.
            let sequences = random_sequences(&mut rng, &[32, 1, 9, 20]);
            for (seq, graph) in sequences.iter().zip(graph_rows(&model, &sequences)) {
                let steps = encoder.hidden_states(seq).unwrap();
                let diff = max_abs_diff(&graph, &steps);
                assert!(diff <= 1e-4, "heads {heads}, length {}: max abs diff {diff}", seq.len());
                // The state scored at serving time is the last row.
                let state = encoder.encode(seq).unwrap();
                assert!(max_abs_diff(&state.output, &steps[steps.len() - 16..]) <= 1e-5);
                assert_eq!(state.events, seq.len());
            }
        }
    }

    #[test]
    fn each_training_position_is_what_serving_computes_for_that_prefix() {
        let model = small_sasrec(5, 2, 2);
        let encoder = encoder_of(&model);
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let sequences = random_sequences(&mut rng, &[20, 7]);
        for (seq, rows) in sequences.iter().zip(graph_rows(&model, &sequences)) {
            for t in 0..seq.len() {
                let served = encoder.encode(&seq[..=t]).unwrap();
                let diff = max_abs_diff(&served.output, &rows[t * 16..(t + 1) * 16]);
                assert!(diff <= 1e-4, "prefix of {} events: {diff}", t + 1);
            }
        }
    }

    #[test]
    fn a_later_event_never_changes_an_earlier_output() {
        let model = small_sasrec(4, 2, 2);
        let encoder = encoder_of(&model);
        let (a, mut b) = (vec![5u32, 9, 13, 2, 7, 30], vec![5u32, 9, 13, 2, 7, 30]);
        b[4] = 11;
        let rows = graph_rows(&model, &[a.clone(), b.clone()]);
        let d = 16;
        assert_eq!(rows[0][..4 * d], rows[1][..4 * d], "positions before the change are identical");
        assert!(max_abs_diff(&rows[0][4 * d..], &rows[1][4 * d..]) > 1e-3, "the changed event and after do change");
        let (ea, eb) = (encoder.hidden_states(&a).unwrap(), encoder.hidden_states(&b).unwrap());
        assert_eq!(ea[..4 * d], eb[..4 * d]);
    }

    #[test]
    fn one_event_through_one_block_is_a_hand_computation() {
        // With a single event, attention has one key: its weight is 1 and the context is the
        // value. So the block is FFN(LN(x + Wo (Wv x + bv) + bo)), x = LN(E[item] + P[0]).
        let model = small_sasrec(6, 2, 1);
        let t = |name: &str| {
            let p = model.params().iter().find(|p| p.name == name).unwrap();
            p.var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let d = 16;
        let (f, item) = (24, 7usize);
        let ln = |v: &[f32], w: &[f32], b: &[f32]| -> Vec<f32> {
            let mean = v.iter().sum::<f32>() / d as f32;
            let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / d as f32;
            (0..d).map(|k| (v[k] - mean) / (var + 1e-5).sqrt() * w[k] + b[k]).collect()
        };
        let lin = |x: &[f32], w: &[f32], b: &[f32], out: usize| -> Vec<f32> {
            (0..out).map(|o| (0..x.len()).map(|k| w[o * x.len() + k] * x[k]).sum::<f32>() + b[o]).collect()
        };
        let emb = t("embedding.token.weight");
        let pos = t("embedding.position.weight");
        let x0: Vec<f32> = (0..d).map(|k| emb[item * d + k] + pos[k]).collect();
        let x = ln(&x0, &t("embedding.layer_norm.weight"), &t("embedding.layer_norm.bias"));
        let v = lin(&x, &t("blocks.0.attention.value.weight"), &t("blocks.0.attention.value.bias"), d);
        let o = lin(&v, &t("blocks.0.attention.output.weight"), &t("blocks.0.attention.output.bias"), d);
        let y0: Vec<f32> = (0..d).map(|k| x[k] + o[k]).collect();
        let y = ln(&y0, &t("blocks.0.attention.layer_norm.weight"), &t("blocks.0.attention.layer_norm.bias"));
        let gelu = |z: f32| 0.5 * z * (1.0 + candle_core::cpu::erf::erf_f32(z / std::f32::consts::SQRT_2));
        let inner: Vec<f32> = lin(&y, &t("blocks.0.ffn.w_1.weight"), &t("blocks.0.ffn.w_1.bias"), f).into_iter().map(gelu).collect();
        let z = lin(&inner, &t("blocks.0.ffn.w_2.weight"), &t("blocks.0.ffn.w_2.bias"), d);
        let z0: Vec<f32> = (0..d).map(|k| y[k] + z[k]).collect();
        let want = ln(&z0, &t("blocks.0.ffn.layer_norm.weight"), &t("blocks.0.ffn.layer_norm.bias"));

        let graph = &graph_rows(&model, &[vec![item as u32]])[0];
        assert!(max_abs_diff(graph, &want) <= 1e-4, "graph vs hand: {}", max_abs_diff(graph, &want));
        let served = encoder_of(&model).encode(&[item as u32]).unwrap();
        assert!(max_abs_diff(&served.output, &want) <= 1e-4, "encoder vs hand");
    }

    #[test]
    fn every_parameter_gets_a_gradient() {
        let model = small_sasrec(8, 2, 2);
        let tokens = Tensor::new(&[[0u32, 0, 3, 4, 5], [1, 2, 3, 4, 5]], &Device::Cpu).unwrap();
        let hidden = model.forward(&tokens, None).unwrap();
        let loss = model.scores(&hidden.flatten_to(1).unwrap()).unwrap().sqr().unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        for p in model.params() {
            let g = grads.get(p.var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {}", p.name));
            let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 0.0 && norm.is_finite(), "{}: gradient norm {norm}", p.name);
        }
    }

    #[test]
    fn the_state_cache_serves_only_the_same_window_and_equals_encoding() {
        let encoder = encoder_of(&small_sasrec(9, 2, 2));
        assert!(!encoder.is_recurrent());
        let cache = StateCache::new(1 << 20);
        let history: Vec<u32> = (1..=12).collect();
        let (state, outcome) = cache.state(&encoder, &history).unwrap();
        assert_eq!((outcome, &state), (Outcome::Miss, &encoder.encode(&history).unwrap()));
        let (again, outcome) = cache.state(&encoder, &history).unwrap();
        assert_eq!((outcome, again), (Outcome::Hit, state.clone()));
        // One new event: no recurrence to resume, so the new window is encoded whole.
        let mut longer = history.clone();
        longer.push(20);
        let (state, outcome) = cache.state(&encoder, &longer).unwrap();
        assert_eq!((outcome, state), (Outcome::Miss, encoder.encode(&longer).unwrap()));
        let mut stale = encoder.encode(&history).unwrap();
        assert!(encoder.push(&mut stale, 20).is_err(), "a SASRec state cannot absorb events");
        assert!(encoder.encode(&[1u32; 33]).is_err(), "longer than max_len");
    }
}
