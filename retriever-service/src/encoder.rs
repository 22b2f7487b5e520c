//! The serving encoder: LRURec's forward pass as the plain step-by-step recurrence over
//! contiguous f32 buffers, turning a history (or one more event) into a [`UserState`].
//!
//! Work is done layer by layer over all new events: the position-wise parts (projections, layer
//! norms, feed-forward) become small matrix products, and the recurrence between them runs one
//! event at a time, h_t = λ h_{t-1} + γ (B x_t), exactly as the state is carried between requests.
//! In the last layer only the latest event's output is needed, so its output projection and
//! feed-forward run for one row.

use crate::config::LruRecConfig;
use crate::error::{Result, RetrieverError};
use crate::kernels::{gelu_erf, layer_norm, linear};
use crate::state::UserState;
use candle_core::Tensor;
use std::collections::HashMap;

struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

struct Layer {
    lambda_re: Vec<f32>,
    lambda_im: Vec<f32>,
    gamma: Vec<f32>,
    in_weight: Vec<f32>,
    in_bias: Vec<f32>,
    out_weight: Vec<f32>,
    out_bias: Vec<f32>,
    lru_norm: Norm,
    w1: Vec<f32>,
    b1: Vec<f32>,
    w2: Vec<f32>,
    b2: Vec<f32>,
    ffn_norm: Norm,
}

/// LRURec weights laid out for the per-request path.
pub struct Encoder {
    config: LruRecConfig,
    embedding: Vec<f32>,
    embed_norm: Norm,
    layers: Vec<Layer>,
    output_bias: Vec<f32>,
}

/// The tensor `name` as a flat vector, checked to hold `len` values.
fn take(tensors: &HashMap<String, Tensor>, name: &str, len: usize) -> Result<Vec<f32>> {
    let bad = |reason: String| RetrieverError::Checkpoint { path: "model.safetensors".into(), reason };
    let t = tensors.get(name).ok_or_else(|| bad(format!("missing tensor {name}")))?;
    if t.elem_count() != len {
        return Err(bad(format!("tensor {name} has shape {:?}, the config implies {len} values", t.dims())));
    }
    Ok(t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?)
}

fn norm(tensors: &HashMap<String, Tensor>, prefix: &str, dim: usize) -> Result<Norm> {
    Ok(Norm { weight: take(tensors, &format!("{prefix}.weight"), dim)?, bias: take(tensors, &format!("{prefix}.bias"), dim)? })
}

impl Encoder {
    /// Builds the encoder from checkpoint tensors (names as in `model.rs`).
    pub fn new(config: &LruRecConfig, tensors: &HashMap<String, Tensor>) -> Result<Self> {
        config.validate()?;
        let (v, d, h, f) = (config.vocab_size(), config.embed_dim, config.state_dim, config.ffn_dim);
        let mut layers = Vec::with_capacity(config.num_blocks);
        for i in 0..config.num_blocks {
            let p = format!("blocks.{i}.lru");
            let params_log = take(tensors, &format!("{p}.params_log"), 3 * h)?;
            let (nu_log, rest) = params_log.split_at(h);
            let (theta_log, gamma_log) = rest.split_at(h);
            let modulus: Vec<f64> = nu_log.iter().map(|&v| (-(v as f64).exp()).exp()).collect();
            let theta: Vec<f64> = theta_log.iter().map(|&v| (v as f64).exp()).collect();
            let ffn = format!("blocks.{i}.ffn");
            layers.push(Layer {
                lambda_re: modulus.iter().zip(&theta).map(|(m, t)| (m * t.cos()) as f32).collect(),
                lambda_im: modulus.iter().zip(&theta).map(|(m, t)| (m * t.sin()) as f32).collect(),
                gamma: gamma_log.iter().map(|v| v.exp()).collect(),
                in_weight: take(tensors, &format!("{p}.in_proj.weight"), 2 * h * d)?,
                in_bias: take(tensors, &format!("{p}.in_proj.bias"), 2 * h)?,
                out_weight: take(tensors, &format!("{p}.out_proj.weight"), d * 2 * h)?,
                out_bias: take(tensors, &format!("{p}.out_proj.bias"), d)?,
                lru_norm: norm(tensors, &format!("{p}.layer_norm"), d)?,
                w1: take(tensors, &format!("{ffn}.w_1.weight"), f * d)?,
                b1: take(tensors, &format!("{ffn}.w_1.bias"), f)?,
                w2: take(tensors, &format!("{ffn}.w_2.weight"), d * f)?,
                b2: take(tensors, &format!("{ffn}.w_2.bias"), d)?,
                ffn_norm: norm(tensors, &format!("{ffn}.layer_norm"), d)?,
            });
        }
        Ok(Self {
            config: config.clone(),
            embedding: take(tensors, "embedding.token.weight", v * d)?,
            embed_norm: norm(tensors, "embedding.layer_norm", d)?,
            layers,
            output_bias: take(tensors, "output.bias", v)?,
        })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &LruRecConfig {
        &self.config
    }

    /// Item embedding, (V+1) rows of `embed_dim` values, row 0 = padding.
    pub fn embedding(&self) -> &[f32] {
        &self.embedding
    }

    /// Per-item score bias, V+1 values.
    pub fn output_bias(&self) -> &[f32] {
        &self.output_bias
    }

    /// The state of a user without events.
    pub fn empty_state(&self) -> UserState {
        UserState::empty(self.layers.len(), self.config.state_dim)
    }

    /// The state after `history` (oldest first), from scratch.
    pub fn encode(&self, history: &[u32]) -> Result<UserState> {
        let mut state = self.empty_state();
        self.extend(&mut state, history)?;
        Ok(state)
    }

    /// Absorbs one more event into `state`: O(1) in the length of the history.
    pub fn push(&self, state: &mut UserState, item: u32) -> Result<()> {
        self.extend(state, &[item])
    }

    /// Absorbs `events` (oldest first) into `state`.
    pub fn extend(&self, state: &mut UserState, events: &[u32]) -> Result<()> {
        if !events.is_empty() {
            self.run(state, events, false)?;
        }
        Ok(())
    }

    /// The last block's output after every event of `history` ((len × D), row t = the hidden
    /// state the model scores with after event t), from an empty state. Used to check the
    /// step recurrence against the training graph.
    pub fn hidden_states(&self, history: &[u32]) -> Result<Vec<f32>> {
        let mut state = self.empty_state();
        self.run(&mut state, history, true)
    }

    /// Scores of every item (index 0 included) for `state`'s output: E · out + bias.
    pub fn all_scores(&self, state: &UserState) -> Vec<f32> {
        let mut out = vec![0.0; self.config.vocab_size()];
        if !state.output.is_empty() {
            crate::kernels::scores_into(&state.output, &self.embedding, &self.output_bias, &mut out);
        }
        out
    }

    fn check_items(&self, items: &[u32]) -> Result<()> {
        let num_items = self.config.num_items;
        match items.iter().find(|&&i| i == 0 || i as usize > num_items) {
            Some(&index) => Err(RetrieverError::UnknownItem { index, num_items }),
            None => Ok(()),
        }
    }

    /// Runs `events` through every layer starting from `state`, updates the state, and returns
    /// the last block's output for every event when `all_rows` (else just the latest, also
    /// stored in the state).
    fn run(&self, state: &mut UserState, events: &[u32], all_rows: bool) -> Result<Vec<f32>> {
        self.check_items(events)?;
        let cfg = &self.config;
        let (d, h, f, eps) = (cfg.embed_dim, cfg.state_dim, cfg.ffn_dim, cfg.layer_norm_eps as f32);
        let n = events.len();
        let mut x = Vec::with_capacity(n * d);
        for &item in events {
            x.extend_from_slice(&self.embedding[item as usize * d..(item as usize + 1) * d]);
        }
        layer_norm(&mut x, &self.embed_norm.weight, &self.embed_norm.bias, eps);

        let mut bx = vec![0.0; n * 2 * h];
        for (l, layer) in self.layers.iter().enumerate() {
            let last_layer = l + 1 == self.layers.len();
            // Rows whose block output is needed: all of them, except in the last layer.
            let first_row = if last_layer && !all_rows { n - 1 } else { 0 };
            let rows = n - first_row;

            linear(&x, n, &layer.in_weight, &layer.in_bias, 2 * h, d, &mut bx);
            // The recurrence, in place: row t of `bx` becomes h_t = λ h_{t-1} + γ (B x_t).
            let hidden = &mut state.hidden[l];
            for t in 0..n {
                let (before, rest) = bx.split_at_mut(t * 2 * h);
                let prev: &[f32] = if t == 0 { hidden } else { &before[(t - 1) * 2 * h..] };
                let (prev_re, prev_im) = prev[..2 * h].split_at(h);
                let (b_re, b_im) = rest[..2 * h].split_at_mut(h);
                let lanes = b_re.iter_mut().zip(b_im.iter_mut()).zip(prev_re.iter().zip(prev_im));
                for (((br, bi), (pr, pi)), ((lr, li), g)) in lanes.zip(layer.lambda_re.iter().zip(&layer.lambda_im).zip(&layer.gamma)) {
                    let (xr, xi) = (*br * g, *bi * g);
                    *br = lr * pr - li * pi + xr;
                    *bi = lr * pi + li * pr + xi;
                }
            }
            hidden.copy_from_slice(&bx[(n - 1) * 2 * h..]);
            let states = &bx[first_row * 2 * h..];

            // Block output for the needed rows: LN(Re(C h) + x), then the feed-forward network.
            let mut y = vec![0.0; rows * d];
            linear(states, rows, &layer.out_weight, &layer.out_bias, d, 2 * h, &mut y);
            for (yv, xv) in y.iter_mut().zip(&x[first_row * d..]) {
                *yv += xv;
            }
            layer_norm(&mut y, &layer.lru_norm.weight, &layer.lru_norm.bias, eps);
            let mut inner = vec![0.0; rows * f];
            linear(&y, rows, &layer.w1, &layer.b1, f, d, &mut inner);
            gelu_erf(&mut inner);
            let mut z = vec![0.0; rows * d];
            linear(&inner, rows, &layer.w2, &layer.b2, d, f, &mut z);
            for (zv, yv) in z.iter_mut().zip(&y) {
                *zv += yv;
            }
            layer_norm(&mut z, &layer.ffn_norm.weight, &layer.ffn_norm.bias, eps);
            x = z;
        }
        state.output = x[x.len() - d..].to_vec();
        state.events += n;
        Ok(x)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::LruRec;
    use candle_core::Device;
    use rand::{Rng, SeedableRng};

    /// A small random model; a larger init spread than the paper's makes the parity checks
    /// sensitive (with std 0.02 every layer output is close to its bias).
    pub(crate) fn small_model(seed: u64) -> LruRec {
        let config = LruRecConfig {
            num_items: 50,
            embed_dim: 16,
            state_dim: 24,
            ffn_dim: 32,
            init_std: 0.5,
            dropout: 0.0,
            max_len: 64,
            ..LruRecConfig::default()
        };
        LruRec::init(&config, seed, &Device::Cpu).unwrap()
    }

    /// Max |a - b| between the candle graph's hidden states (left-padded batch) and the encoder's
    /// step recurrence, over every real position.
    pub(crate) fn graph_vs_steps(model: &LruRec, sequences: &[Vec<u32>]) -> f32 {
        let encoder = Encoder::new(&model.config, &model.tensors()).unwrap();
        let d = model.config.embed_dim;
        let len = sequences.iter().map(Vec::len).max().unwrap();
        let mut tokens = vec![0u32; sequences.len() * len];
        for (row, seq) in sequences.iter().enumerate() {
            tokens[row * len + len - seq.len()..(row + 1) * len].copy_from_slice(seq);
        }
        let tokens = Tensor::from_vec(tokens, (sequences.len(), len), &Device::Cpu).unwrap();
        let hidden = model.forward(&tokens, None).unwrap().to_vec3::<f32>().unwrap();
        let mut worst = 0.0f32;
        for (row, seq) in sequences.iter().enumerate() {
            let steps = encoder.hidden_states(seq).unwrap();
            for t in 0..seq.len() {
                let graph = &hidden[row][len - seq.len() + t];
                for k in 0..d {
                    worst = worst.max((graph[k] - steps[t * d + k]).abs());
                }
            }
        }
        worst
    }

    fn random_sequences(rng: &mut impl Rng, lengths: &[usize], num_items: u32) -> Vec<Vec<u32>> {
        lengths.iter().map(|&n| (0..n).map(|_| rng.gen_range(1..=num_items)).collect()).collect()
    }

    #[test]
    fn step_recurrence_matches_the_parallel_scan_on_random_models() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for seed in 0..3 {
            let model = small_model(seed);
            // Different lengths in one batch: left padding must not leak into the recurrence.
            let sequences = random_sequences(&mut rng, &[64, 1, 17, 33], 50);
            let diff = graph_vs_steps(&model, &sequences);
            assert!(diff <= 1e-4, "seed {seed}: max abs diff {diff}");
        }
    }

    #[test]
    fn one_more_event_on_a_saved_state_scores_like_the_whole_history() {
        let model = small_model(5);
        let encoder = Encoder::new(&model.config, &model.tensors()).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let history = &random_sequences(&mut rng, &[40], 50)[0];
        let mut state = encoder.encode(&history[..39]).unwrap();
        encoder.push(&mut state, history[39]).unwrap();
        let full = encoder.encode(history).unwrap();
        assert_eq!(state.events, 40);
        let (a, b) = (encoder.all_scores(&state), encoder.all_scores(&full));
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(diff <= 1e-4, "max abs score diff {diff}");
        // And event by event from nothing.
        let mut stepped = encoder.empty_state();
        for &item in history {
            encoder.push(&mut stepped, item).unwrap();
        }
        let c = encoder.all_scores(&stepped);
        let diff = c.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(diff <= 1e-4, "max abs score diff {diff}");
    }

    #[test]
    fn items_outside_the_catalog_are_rejected() {
        let model = small_model(1);
        let encoder = Encoder::new(&model.config, &model.tensors()).unwrap();
        assert!(matches!(encoder.encode(&[3, 51]), Err(RetrieverError::UnknownItem { index: 51, num_items: 50 })));
        assert!(matches!(encoder.encode(&[0]), Err(RetrieverError::UnknownItem { index: 0, .. })));
        let empty = encoder.encode(&[]).unwrap();
        assert!(empty.is_empty() && encoder.all_scores(&empty).iter().all(|&s| s == 0.0));
    }

    #[test]
    fn checkpoint_tensors_with_wrong_shapes_are_reported_by_name() {
        let model = small_model(1);
        let mut tensors = model.tensors();
        tensors.insert("output.bias".into(), Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap());
        let err = Encoder::new(&model.config, &tensors).err().unwrap().to_string();
        assert!(err.contains("output.bias"), "{err}");
    }
}
