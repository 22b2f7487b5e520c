//! Key/value cache: the attention state of already-processed tokens, so a request can start
//! from a shared prefix (the fixed instruction, a returning user's history) and only run its
//! own suffix.

use candle_core::{Tensor, D};

use crate::error::{RankerError, Result};

/// Cached keys and values of one decoder block, each `(batch, kv_heads, len, head_dim)`.
#[derive(Debug, Clone)]
pub(crate) struct LayerKv {
    pub(crate) k: Tensor,
    pub(crate) v: Tensor,
}

/// Attention state of a batch of token sequences, for every decoder block.
///
/// Rows may hold padding (from left-padded batches or from [`KvCache::stack`]); `valid` says
/// which cached positions are real tokens, and padding is masked out of attention. A cache is
/// immutable: [`crate::Llama::forward`] returns a new one that extends its input, so one cached
/// prefix can serve many requests at once.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub(crate) layers: Vec<LayerKv>,
    /// Per row, whether each cached position is a real token (false: padding).
    pub(crate) valid: Vec<Vec<bool>>,
}

impl KvCache {
    /// Number of cached positions (including padding) per row.
    pub fn len(&self) -> usize {
        self.valid.first().map_or(0, Vec::len)
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of rows.
    pub fn batch_size(&self) -> usize {
        self.valid.len()
    }

    /// Number of real (non-padding) tokens in each row; the next token's RoPE position.
    pub fn token_counts(&self) -> Vec<usize> {
        self.valid
            .iter()
            .map(|row| row.iter().filter(|v| **v).count())
            .collect()
    }

    /// Bytes held by the key/value tensors (for byte-bounded cache eviction).
    pub fn size_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| (l.k.elem_count() + l.v.elem_count()) * l.k.dtype().size_in_bytes())
            .sum()
    }

    /// One row as a batch-1 cache with its leading padding dropped. The tensors are copied so
    /// the result does not keep the whole batch's storage alive.
    pub fn row(&self, i: usize) -> Result<KvCache> {
        let n = self.token_counts().get(i).copied().unwrap_or(0);
        self.row_prefix(i, n)
    }

    /// The first `tokens` real tokens of row `i` as a batch-1 cache (e.g. a user's
    /// prefix + history state, cut from a forward pass that also ran the candidates).
    pub fn row_prefix(&self, i: usize, tokens: usize) -> Result<KvCache> {
        let valid = self.valid.get(i).ok_or_else(|| {
            RankerError::InvalidModel(format!("cache row {i} out of {}", self.batch_size()))
        })?;
        let start = valid.iter().position(|v| *v).unwrap_or(valid.len());
        let mut seen = 0;
        let mut end = start;
        while seen < tokens {
            if end == valid.len() {
                return Err(RankerError::InvalidModel(format!(
                    "cache row {i} holds fewer than {tokens} tokens"
                )));
            }
            seen += usize::from(valid[end]);
            end += 1;
        }
        let len = end - start;
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(LayerKv {
                    k: l.k.narrow(0, i, 1)?.narrow(2, start, len)?.copy()?,
                    v: l.v.narrow(0, i, 1)?.narrow(2, start, len)?.copy()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
            valid: vec![valid[start..end].to_vec()],
        })
    }

    /// Repeats a batch-1 cache `n` times, e.g. the shared instruction prefix for a batch.
    pub fn repeat(&self, n: usize) -> Result<KvCache> {
        if self.batch_size() != 1 {
            return Err(RankerError::InvalidModel(
                "only a batch-1 cache can be repeated".into(),
            ));
        }
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(LayerKv {
                    k: l.k.repeat((n, 1, 1, 1))?,
                    v: l.v.repeat((n, 1, 1, 1))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
            valid: vec![self.valid[0].clone(); n],
        })
    }

    /// Stacks caches (of any batch sizes and lengths) into one batch, left-padding shorter
    /// rows; the padding is masked out of attention.
    pub fn stack(caches: &[&KvCache]) -> Result<KvCache> {
        let first = caches
            .first()
            .ok_or_else(|| RankerError::InvalidModel("stack of no caches".into()))?;
        let max_len = caches.iter().map(|c| c.len()).max().unwrap_or(0);
        let num_layers = first.layers.len();
        if caches.iter().any(|c| c.layers.len() != num_layers) {
            return Err(RankerError::InvalidModel(
                "caches from different models".into(),
            ));
        }
        let mut valid = Vec::new();
        for c in caches {
            for row in &c.valid {
                let mut r = vec![false; max_len - row.len()];
                r.extend_from_slice(row);
                valid.push(r);
            }
        }
        let pad = |t: &Tensor| -> Result<Tensor> {
            let missing = max_len - t.dim(2)?;
            Ok(if missing == 0 {
                t.clone()
            } else {
                let (b, h, _, d) = t.dims4()?;
                let zeros = Tensor::zeros((b, h, missing, d), t.dtype(), t.device())?;
                Tensor::cat(&[&zeros, t], D::Minus2)?
            })
        };
        let mut layers = Vec::with_capacity(num_layers);
        for li in 0..num_layers {
            let ks = caches
                .iter()
                .map(|c| pad(&c.layers[li].k))
                .collect::<Result<Vec<_>>>()?;
            let vs = caches
                .iter()
                .map(|c| pad(&c.layers[li].v))
                .collect::<Result<Vec<_>>>()?;
            layers.push(LayerKv {
                k: Tensor::cat(&ks, 0)?,
                v: Tensor::cat(&vs, 0)?,
            });
        }
        Ok(KvCache { layers, valid })
    }
}
