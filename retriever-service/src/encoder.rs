//! The serving encoder: the model's forward pass over contiguous f32 buffers, turning a history
//! (or, for LRURec, one more event) into a [`UserState`].
//!
//! LRURec runs the plain step-by-step recurrence. Work is done layer by layer over all new
//! events: the position-wise parts (projections, layer norms, feed-forward) become small matrix
//! products, and the recurrence between them runs one event at a time,
//! h_t = λ h_{t-1} + γ (B x_t), exactly as the state is carried between requests. In the last
//! layer only the latest event's output is needed, so its output projection and feed-forward run
//! for one row. SASRec has no recurrence: its state is the last block's output after the whole
//! window, computed by [`crate::sasrec_encoder`], and a new event means encoding the window
//! again ([`Encoder::is_recurrent`]).

use crate::config::{LruRecConfig, ModelKind};
use crate::error::{Result, RetrieverError};
use crate::kernels::{gelu_erf, layer_norm, linear};
use crate::sasrec_encoder::SasEncoder;
use crate::state::UserState;
use candle_core::Tensor;
use std::collections::HashMap;

/// Gain and bias of a layer norm.
pub(crate) struct Norm {
    pub(crate) weight: Vec<f32>,
    pub(crate) bias: Vec<f32>,
}

/// A position-wise feed-forward network: LN(W2 GELU(W1 y + b1) + b2 + y).
pub(crate) struct Ffn {
    w1: Vec<f32>,
    b1: Vec<f32>,
    w2: Vec<f32>,
    b2: Vec<f32>,
    norm: Norm,
}

impl Ffn {
    /// Reads `{prefix}.w_1`, `.w_2` and `.layer_norm` (names as in `ffn.rs`).
    pub(crate) fn new(tensors: &HashMap<String, Tensor>, prefix: &str, config: &LruRecConfig) -> Result<Self> {
        let (d, f) = (config.embed_dim, config.ffn_dim);
        Ok(Self {
            w1: take(tensors, &format!("{prefix}.w_1.weight"), f * d)?,
            b1: take(tensors, &format!("{prefix}.w_1.bias"), f)?,
            w2: take(tensors, &format!("{prefix}.w_2.weight"), d * f)?,
            b2: take(tensors, &format!("{prefix}.w_2.bias"), d)?,
            norm: norm(tensors, &format!("{prefix}.layer_norm"), d)?,
        })
    }

    /// Applies the network to `rows` rows of `y` (rows × D).
    pub(crate) fn apply(&self, y: &[f32], rows: usize, eps: f32) -> Vec<f32> {
        let (f, d) = (self.b1.len(), self.b2.len());
        let mut inner = vec![0.0; rows * f];
        linear(y, rows, &self.w1, &self.b1, f, d, &mut inner);
        gelu_erf(&mut inner);
        let mut z = vec![0.0; rows * d];
        linear(&inner, rows, &self.w2, &self.b2, d, f, &mut z);
        for (zv, yv) in z.iter_mut().zip(y) {
            *zv += yv;
        }
        layer_norm(&mut z, &self.norm.weight, &self.norm.bias, eps);
        z
    }
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
    ffn: Ffn,
}

/// The layers after the item embedding, per model family.
enum Body {
    LruRec(Vec<Layer>),
    SasRec(SasEncoder),
    /// Equal-weight members (see [`Encoder::ensemble`]); each reads its own embedding.
    Ensemble(Vec<Encoder>),
}

/// Model weights laid out for the per-request path.
pub struct Encoder {
    config: LruRecConfig,
    embedding: Vec<f32>,
    embed_norm: Norm,
    body: Body,
    output_bias: Vec<f32>,
}

/// The tensor `name` as a flat vector, checked to hold `len` values.
pub(crate) fn take(tensors: &HashMap<String, Tensor>, name: &str, len: usize) -> Result<Vec<f32>> {
    let bad = |reason: String| RetrieverError::Checkpoint { path: "model.safetensors".into(), reason };
    let t = tensors.get(name).ok_or_else(|| bad(format!("missing tensor {name}")))?;
    if t.elem_count() != len {
        return Err(bad(format!("tensor {name} has shape {:?}, the config implies {len} values", t.dims())));
    }
    Ok(t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?)
}

pub(crate) fn norm(tensors: &HashMap<String, Tensor>, prefix: &str, dim: usize) -> Result<Norm> {
    Ok(Norm { weight: take(tensors, &format!("{prefix}.weight"), dim)?, bias: take(tensors, &format!("{prefix}.bias"), dim)? })
}

fn lru_layers(config: &LruRecConfig, tensors: &HashMap<String, Tensor>) -> Result<Vec<Layer>> {
    let (d, h) = (config.embed_dim, config.state_dim);
    let mut layers = Vec::with_capacity(config.num_blocks);
    for i in 0..config.num_blocks {
        let p = format!("blocks.{i}.lru");
        let params_log = take(tensors, &format!("{p}.params_log"), 3 * h)?;
        let (nu_log, rest) = params_log.split_at(h);
        let (theta_log, gamma_log) = rest.split_at(h);
        let modulus: Vec<f64> = nu_log.iter().map(|&v| (-(v as f64).exp()).exp()).collect();
        let theta: Vec<f64> = theta_log.iter().map(|&v| (v as f64).exp()).collect();
        layers.push(Layer {
            lambda_re: modulus.iter().zip(&theta).map(|(m, t)| (m * t.cos()) as f32).collect(),
            lambda_im: modulus.iter().zip(&theta).map(|(m, t)| (m * t.sin()) as f32).collect(),
            gamma: gamma_log.iter().map(|v| v.exp()).collect(),
            in_weight: take(tensors, &format!("{p}.in_proj.weight"), 2 * h * d)?,
            in_bias: take(tensors, &format!("{p}.in_proj.bias"), 2 * h)?,
            out_weight: take(tensors, &format!("{p}.out_proj.weight"), d * 2 * h)?,
            out_bias: take(tensors, &format!("{p}.out_proj.bias"), d)?,
            lru_norm: norm(tensors, &format!("{p}.layer_norm"), d)?,
            ffn: Ffn::new(tensors, &format!("blocks.{i}.ffn"), config)?,
        });
    }
    Ok(layers)
}

impl Encoder {
    /// Builds the encoder from checkpoint tensors (names as in `model.rs` and `sasrec.rs`).
    pub fn new(config: &LruRecConfig, tensors: &HashMap<String, Tensor>) -> Result<Self> {
        config.validate()?;
        let (v, d) = (config.vocab_size(), config.embed_dim);
        let body = match config.kind {
            ModelKind::LruRec => Body::LruRec(lru_layers(config, tensors)?),
            ModelKind::SasRec => Body::SasRec(SasEncoder::new(config, tensors)?),
        };
        Ok(Self {
            config: config.clone(),
            embedding: take(tensors, "embedding.token.weight", v * d)?,
            embed_norm: norm(tensors, "embedding.layer_norm", d)?,
            body,
            output_bias: take(tensors, "output.bias", v)?,
        })
    }

    /// An equal-weight ensemble of `members` (at least one; the same catalog; none itself an
    /// ensemble), scoring each item with the mean of the members' scores.
    ///
    /// The members' log-softmax outputs differ from their raw scores by a per-user constant, so
    /// the mean raw score ranks items exactly as the mean log-probability does. And a sum of
    /// dot products is one dot product of concatenations: the ensemble's query vector is the
    /// members' query vectors side by side (each scaled by 1/K), its item embedding the members'
    /// embeddings side by side, its bias the mean bias. Scoring, top-k and the int8 pass then run
    /// unchanged on the wider vectors; only encoding runs once per member.
    ///
    /// The ensemble's [`Encoder::config`] is the first member's, except `embed_dim` (the width of
    /// the concatenated query) and `max_len` (the longest member window; each member reads the
    /// last `max_len` events of its own).
    pub fn ensemble(members: Vec<Encoder>) -> Result<Self> {
        let bad = |reason: String| Err(RetrieverError::Config(format!("ensemble: {reason}")));
        let Some(first) = members.first() else { return bad("no member".into()) };
        let num_items = first.config.num_items;
        if let Some(m) = members.iter().find(|m| m.config.num_items != num_items) {
            return bad(format!("members disagree on the catalog size ({num_items} and {} items)", m.config.num_items));
        }
        if members.iter().any(|m| matches!(m.body, Body::Ensemble(_))) {
            return bad("a member is itself an ensemble".into());
        }
        let scale = 1.0 / members.len() as f32;
        let width: usize = members.iter().map(|m| m.config.embed_dim).sum();
        let vocab = first.config.vocab_size();
        let mut embedding = Vec::with_capacity(vocab * width);
        for item in 0..vocab {
            for m in &members {
                let d = m.config.embed_dim;
                embedding.extend_from_slice(&m.embedding[item * d..(item + 1) * d]);
            }
        }
        let output_bias = (0..vocab).map(|item| members.iter().map(|m| m.output_bias[item]).sum::<f32>() * scale).collect();
        let config = LruRecConfig {
            embed_dim: width,
            max_len: members.iter().map(|m| m.config.max_len).max().unwrap_or(first.config.max_len),
            ..first.config.clone()
        };
        Ok(Self { config, embedding, embed_norm: Norm { weight: Vec::new(), bias: Vec::new() }, body: Body::Ensemble(members), output_bias })
    }

    /// The members of an ensemble (empty for a single model).
    pub fn members(&self) -> &[Encoder] {
        match &self.body {
            Body::Ensemble(members) => members,
            _ => &[],
        }
    }

    /// The model family, as the model version and reports name it: "lrurec", "sasrec", or
    /// "ensemble".
    pub fn family(&self) -> &'static str {
        match (&self.body, self.config.kind) {
            (Body::Ensemble(_), _) => "ensemble",
            (_, ModelKind::LruRec) => "lrurec",
            (_, ModelKind::SasRec) => "sasrec",
        }
    }

    /// The model's hyper-parameters (an ensemble's: see [`Encoder::ensemble`]).
    pub fn config(&self) -> &LruRecConfig {
        &self.config
    }

    /// Whether a state can absorb more events ([`Encoder::extend`]); false for SASRec, whose
    /// state after a longer history has to be encoded from the history, and for an ensemble
    /// with a SASRec member.
    pub fn is_recurrent(&self) -> bool {
        match &self.body {
            Body::LruRec(_) => true,
            Body::SasRec(_) => false,
            // Members with different windows would drift apart from a fresh encoding once the
            // shorter window slides: such an ensemble re-encodes.
            Body::Ensemble(members) => members.iter().all(|m| self.member_absorbs(m)),
        }
    }

    /// Whether a cached state can catch up with a longer window ([`Encoder::catch_up`]) for
    /// less than a fresh encoding: an LRURec model, and an ensemble with at least one member
    /// that absorbs events (its other members re-encode their own, shorter, windows).
    pub fn can_catch_up(&self) -> bool {
        match &self.body {
            Body::Ensemble(members) => members.iter().any(|m| self.member_absorbs(m)),
            _ => self.is_recurrent(),
        }
    }

    /// Whether an ensemble's member can absorb events into its part of the state: recurrent,
    /// and reading the ensemble's whole window (a shorter window would slide first).
    fn member_absorbs(&self, member: &Encoder) -> bool {
        member.is_recurrent() && member.config.max_len == self.config.max_len
    }

    /// Layers of hidden state this model keeps in a [`UserState`] (0 for SASRec).
    fn state_layers(&self) -> usize {
        match &self.body {
            Body::LruRec(layers) => layers.len(),
            Body::SasRec(_) => 0,
            Body::Ensemble(members) => members.iter().map(Encoder::state_layers).sum(),
        }
    }

    /// Advances `state`, the state after `window[..absorbed]`, to the state after `window` (the
    /// events the model reads: the same window grown at its end, not slid). A recurrent model
    /// absorbs the new events; in an ensemble the members that can absorb them do (LRURec's
    /// O(1) per event) and the others encode their own window afresh. Only for models that
    /// [`can_catch_up`](Encoder::can_catch_up).
    pub fn catch_up(&self, state: &mut UserState, window: &[u32], absorbed: usize) -> Result<()> {
        let Body::Ensemble(members) = &self.body else { return self.extend(state, &window[absorbed..]) };
        if !self.can_catch_up() {
            return Err(RetrieverError::Config("no member of this ensemble absorbs events; encode the whole window".into()));
        }
        self.check_items(&window[absorbed..])?;
        self.rebuild_members(members, state, |m, hidden| {
            if self.member_absorbs(m) {
                let mut part = UserState { hidden, output: Vec::new(), events: absorbed };
                m.extend(&mut part, &window[absorbed..])?;
                Ok(part)
            } else {
                m.encode(&window[window.len().saturating_sub(m.config.max_len)..])
            }
        })?;
        state.events = window.len();
        Ok(())
    }

    /// Replaces an ensemble's state member by member: `part(member, its hidden layers from
    /// `state`)` gives the member's new state; its layers and its query (scaled by 1/K, side by
    /// side with the others') make the ensemble's. `state.events` is left to the caller.
    fn rebuild_members(
        &self,
        members: &[Encoder],
        state: &mut UserState,
        mut part: impl FnMut(&Encoder, Vec<Vec<f32>>) -> Result<UserState>,
    ) -> Result<()> {
        let scale = 1.0 / members.len() as f32;
        let mut layers = std::mem::take(&mut state.hidden).into_iter();
        let mut output = Vec::with_capacity(self.config.embed_dim);
        for m in members {
            let own = part(m, layers.by_ref().take(m.state_layers()).collect())?;
            state.hidden.extend(own.hidden);
            output.extend(own.output.iter().map(|x| x * scale));
        }
        state.output = output;
        Ok(())
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
        match &self.body {
            Body::LruRec(layers) => UserState::empty(layers.len(), self.config.state_dim),
            Body::SasRec(_) => UserState::empty(0, 0),
            Body::Ensemble(members) => {
                UserState { hidden: members.iter().flat_map(|m| m.empty_state().hidden).collect(), output: Vec::new(), events: 0 }
            }
        }
    }

    /// The state after `history` (oldest first, at most `max_len` events for SASRec), from
    /// scratch.
    pub fn encode(&self, history: &[u32]) -> Result<UserState> {
        if let Body::Ensemble(members) = &self.body {
            self.check_items(history)?;
            let mut state = UserState { hidden: Vec::new(), output: Vec::new(), events: history.len() };
            self.rebuild_members(members, &mut state, |m, _| m.encode(&history[history.len().saturating_sub(m.config.max_len)..]))?;
            return Ok(state);
        }
        let mut state = self.empty_state();
        if !history.is_empty() {
            self.run(&mut state, history, false)?;
        }
        Ok(state)
    }

    /// Absorbs one more event into `state`: O(1) in the length of the history. LRURec only.
    pub fn push(&self, state: &mut UserState, item: u32) -> Result<()> {
        self.extend(state, &[item])
    }

    /// Absorbs `events` (oldest first) into `state`. LRURec only: a SASRec state cannot absorb
    /// events (an error), encode the longer history instead.
    pub fn extend(&self, state: &mut UserState, events: &[u32]) -> Result<()> {
        if !self.is_recurrent() {
            return Err(RetrieverError::Config("a SASRec state cannot absorb events; encode the whole window".into()));
        }
        if events.is_empty() {
            return Ok(());
        }
        if let Body::Ensemble(members) = &self.body {
            // Every member is recurrent (checked above): each advances its own layers' states.
            self.check_items(events)?;
            let events_before = state.events;
            self.rebuild_members(members, state, |m, hidden| {
                let mut part = UserState { hidden, output: Vec::new(), events: events_before };
                m.extend(&mut part, events)?;
                Ok(part)
            })?;
            state.events += events.len();
            return Ok(());
        }
        self.run(state, events, false)?;
        Ok(())
    }

    /// The last block's output after every event of `history` ((len × D), row t = the hidden
    /// state the model scores with after event t), from an empty state. Used to check the
    /// serving path against the training graph.
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
        let x = match &self.body {
            Body::Ensemble(_) => {
                return Err(RetrieverError::Config("an ensemble has no hidden states of its own; ask its members".into()))
            }
            Body::LruRec(layers) => self.run_lru(layers, state, events, all_rows),
            Body::SasRec(sas) => {
                if events.len() > self.config.max_len {
                    return Err(RetrieverError::Config(format!(
                        "SASRec encodes at most max_len = {} events, got {}",
                        self.config.max_len,
                        events.len()
                    )));
                }
                sas.run(&self.config, &self.embedding, &self.embed_norm, events, all_rows)
            }
        };
        let d = self.config.embed_dim;
        state.output = x[x.len() - d..].to_vec();
        state.events += events.len();
        Ok(x)
    }

    fn run_lru(&self, layers: &[Layer], state: &mut UserState, events: &[u32], all_rows: bool) -> Vec<f32> {
        let cfg = &self.config;
        let (d, h, eps) = (cfg.embed_dim, cfg.state_dim, cfg.layer_norm_eps as f32);
        let n = events.len();
        let mut x = Vec::with_capacity(n * d);
        for &item in events {
            x.extend_from_slice(&self.embedding[item as usize * d..(item as usize + 1) * d]);
        }
        layer_norm(&mut x, &self.embed_norm.weight, &self.embed_norm.bias, eps);

        let mut bx = vec![0.0; n * 2 * h];
        for (l, layer) in layers.iter().enumerate() {
            let last_layer = l + 1 == layers.len();
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
            x = layer.ffn.apply(&y, rows, eps);
        }
        x
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::train::model::LruRec;
    use crate::train::params::BuildFromParams;
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

    pub(crate) fn small_sasrec(seed: u64, num_items: usize) -> Encoder {
        use crate::train::sasrec::SasRec;
        let config = LruRecConfig {
            kind: ModelKind::SasRec,
            num_items,
            embed_dim: 8,
            num_heads: 2,
            ffn_dim: 16,
            init_std: 0.5,
            dropout: 0.0,
            max_len: 10,
            ..LruRecConfig::default()
        };
        let model = SasRec::init(&config, seed, &Device::Cpu).unwrap();
        let tensors = model.params().iter().map(|p| (p.name.clone(), p.var.as_tensor().detach())).collect();
        Encoder::new(&config, &tensors).unwrap()
    }

    pub(crate) fn lru_encoder(seed: u64) -> Encoder {
        let model = small_model(seed);
        Encoder::new(&model.config, &model.tensors()).unwrap()
    }

    #[test]
    fn an_ensemble_scores_every_item_with_the_mean_of_its_members_scores() {
        let members = vec![lru_encoder(1), lru_encoder(2), small_sasrec(3, 50)];
        let history: Vec<u32> = (0..30).map(|i| 1 + (i * 7) % 50).collect();
        // Each member reads its own window: the SASRec member only the last 10 events.
        let each: Vec<Vec<f32>> = members
            .iter()
            .map(|m| m.all_scores(&m.encode(&history[history.len().saturating_sub(m.config().max_len)..]).unwrap()))
            .collect();
        let ensemble = Encoder::ensemble(members).unwrap();
        assert_eq!(ensemble.config().embed_dim, 16 + 16 + 8);
        assert_eq!(ensemble.config().max_len, 64);
        let state = ensemble.encode(&history).unwrap();
        assert_eq!(state.events, 30);
        let scores = ensemble.all_scores(&state);
        for item in 1..=50 {
            let mean = each.iter().map(|s| s[item]).sum::<f32>() / 3.0;
            assert!((scores[item] - mean).abs() < 1e-4, "item {item}: {} vs the members' mean {mean}", scores[item]);
        }
        // A SASRec member has no recurrence: the ensemble re-encodes.
        assert!(!ensemble.is_recurrent());
        let mut s = state.clone();
        assert!(ensemble.push(&mut s, 4).is_err());
        assert!(ensemble.encode(&[]).unwrap().is_empty());
        assert!(matches!(ensemble.encode(&[51]), Err(RetrieverError::UnknownItem { index: 51, .. })));
        assert!(ensemble.hidden_states(&history).is_err());
    }

    #[test]
    fn an_ensemble_of_recurrent_members_absorbs_one_more_event_like_a_fresh_encoding() {
        let ensemble = Encoder::ensemble(vec![lru_encoder(4), lru_encoder(5)]).unwrap();
        assert!(ensemble.is_recurrent());
        let history: Vec<u32> = (0..25).map(|i| 1 + (i * 11) % 50).collect();
        let mut state = ensemble.encode(&history[..24]).unwrap();
        ensemble.push(&mut state, history[24]).unwrap();
        let fresh = ensemble.encode(&history).unwrap();
        assert_eq!(state.events, 25);
        assert_eq!(state.hidden.len(), 4, "two layers per member");
        let (a, b) = (ensemble.all_scores(&state), ensemble.all_scores(&fresh));
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(diff <= 1e-4, "max abs score diff {diff}");
    }

    #[test]
    fn a_mixed_ensemble_catches_up_like_a_fresh_encoding_its_lrurec_member_absorbing_the_events() {
        // LRURec members read the ensemble's whole window (64); the SASRec member its last 10.
        let ensemble = Encoder::ensemble(vec![lru_encoder(6), small_sasrec(7, 50), lru_encoder(8)]).unwrap();
        assert!(!ensemble.is_recurrent() && ensemble.can_catch_up());
        let window: Vec<u32> = (0..40).map(|i| 1 + (i * 13) % 50).collect();
        for absorbed in [1, 33, 39] {
            let mut state = ensemble.encode(&window[..absorbed]).unwrap();
            ensemble.catch_up(&mut state, &window, absorbed).unwrap();
            let fresh = ensemble.encode(&window).unwrap();
            assert_eq!((state.events, state.hidden.len()), (40, 4), "two layers per LRURec member, none for SASRec");
            let (a, b) = (ensemble.all_scores(&state), ensemble.all_scores(&fresh));
            let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            assert!(diff <= 1e-4, "from {absorbed} events: max abs score diff {diff}");
        }
        // The LRURec members' parts did absorb: their layers equal a fresh encoding's.
        let mut state = ensemble.encode(&window[..39]).unwrap();
        ensemble.catch_up(&mut state, &window, 39).unwrap();
        let fresh = ensemble.encode(&window).unwrap();
        for (x, y) in state.hidden.iter().flatten().zip(fresh.hidden.iter().flatten()) {
            assert!((x - y).abs() <= 1e-4);
        }
        // Only SASRec members: nothing absorbs, so no catching up.
        let sasrec_only = Encoder::ensemble(vec![small_sasrec(1, 50), small_sasrec(2, 50)]).unwrap();
        assert!(!sasrec_only.can_catch_up());
        let mut s = sasrec_only.encode(&window[..5]).unwrap();
        assert!(sasrec_only.catch_up(&mut s, &window[..6], 5).is_err());
    }

    #[test]
    fn ensembles_of_other_catalogs_or_of_ensembles_or_of_nothing_are_refused() {
        assert!(Encoder::ensemble(vec![]).is_err());
        let err = Encoder::ensemble(vec![lru_encoder(1), small_sasrec(2, 40)]).err().unwrap().to_string();
        assert!(err.contains("catalog size"), "{err}");
        let inner = Encoder::ensemble(vec![lru_encoder(1)]).unwrap();
        assert!(Encoder::ensemble(vec![inner, lru_encoder(2)]).is_err());
    }
}
