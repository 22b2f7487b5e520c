//! Plain-Rust f32 kernels for the per-request path: no tensor bookkeeping, contiguous row-major
//! buffers, SIMD through `gemm` (runtime CPU dispatch) or through a multiversioned dot product.

/// `out[r][o] = Σ_k x[r][k] · w[o][k] + bias[o]` for `rows` rows: x is (rows × in_dim),
/// w is (out_dim × in_dim) as stored in PyTorch-style linear layers, out is (rows × out_dim).
pub fn linear(x: &[f32], rows: usize, w: &[f32], bias: &[f32], out_dim: usize, in_dim: usize, out: &mut [f32]) {
    assert_eq!(x.len(), rows * in_dim);
    assert_eq!(w.len(), out_dim * in_dim);
    assert_eq!(bias.len(), out_dim);
    assert_eq!(out.len(), rows * out_dim);
    if rows == 0 {
        return;
    }
    // SAFETY: the asserts above guarantee that every strided access below stays inside the
    // three slices: dst (rows × out_dim, row stride out_dim), lhs (rows × in_dim, row stride
    // in_dim) and rhs = wᵀ (in_dim × out_dim, read through w with column stride in_dim).
    unsafe {
        gemm::gemm(
            rows,
            out_dim,
            in_dim,
            out.as_mut_ptr(),
            1,
            out_dim as isize,
            false,
            x.as_ptr(),
            1,
            in_dim as isize,
            w.as_ptr(),
            in_dim as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    for row in out.chunks_exact_mut(out_dim) {
        for (o, b) in row.iter_mut().zip(bias) {
            *o += b;
        }
    }
}

/// A strided view of a row-major matrix inside a slice: element (r, c) is
/// `data[offset + r * row_stride + c * col_stride]`.
#[derive(Clone, Copy)]
pub struct Strided<'a> {
    /// The backing buffer.
    pub data: &'a [f32],
    /// Index of element (0, 0).
    pub offset: usize,
    /// Distance between rows.
    pub row_stride: usize,
    /// Distance between columns.
    pub col_stride: usize,
}

impl Strided<'_> {
    /// Panics unless every element of a (rows × cols) matrix lies inside `data`.
    fn check(&self, rows: usize, cols: usize) {
        if rows > 0 && cols > 0 {
            let last = self.offset + (rows - 1) * self.row_stride + (cols - 1) * self.col_stride;
            assert!(last < self.data.len(), "strided matrix ({rows} × {cols}) reaches {last}, buffer {}", self.data.len());
        }
    }
}

/// `out[o + r·out_row_stride + c] = Σ_k a(r, k) · b(k, c)` for an (m × k) `a` and a (k × n)
/// `b`, both strided views; `out`'s rows are contiguous. Used for the per-head attention
/// products, whose heads are interleaved column blocks of one buffer.
#[allow(clippy::too_many_arguments)]
pub fn matmul_strided(m: usize, n: usize, k: usize, a: Strided<'_>, b: Strided<'_>, out: &mut [f32], out_offset: usize, out_row_stride: usize) {
    a.check(m, k);
    b.check(k, n);
    if m == 0 || n == 0 {
        return;
    }
    assert!(out_offset + (m - 1) * out_row_stride + n <= out.len(), "output ({m} × {n}) outside its buffer");
    if k == 0 {
        for r in 0..m {
            out[out_offset + r * out_row_stride..][..n].fill(0.0);
        }
        return;
    }
    // SAFETY: the checks above bound every element gemm reads (a: m × k, b: k × n, through
    // their strides and offsets) and writes (out: m rows of n contiguous values from
    // `out_offset`, row stride `out_row_stride`) to the three slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr().add(out_offset),
            1,
            out_row_stride as isize,
            false,
            a.data.as_ptr().add(a.offset),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr().add(b.offset),
            b.col_stride as isize,
            b.row_stride as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Normalises each `dim`-wide row of `x` in place to zero mean and unit variance, then applies
/// gain `w` and bias `b` (population variance, as PyTorch's LayerNorm).
pub fn layer_norm(x: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
    let dim = w.len();
    for row in x.chunks_exact_mut(dim) {
        let mean = row.iter().sum::<f32>() / dim as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / dim as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, g), beta) in row.iter_mut().zip(w).zip(b) {
            *v = (*v - mean) * inv * g + beta;
        }
    }
}

/// Exact GELU, x · Φ(x), the same formula as the training graph's `gelu_erf`.
pub fn gelu_erf(x: &mut [f32]) {
    for v in x {
        *v = 0.5 * *v * (1.0 + candle_core::cpu::erf::erf_f32(*v * std::f32::consts::FRAC_1_SQRT_2));
    }
}

/// `out[i] = rows[i] · query + bias[i]` for the `out.len()` rows of width `query.len()`.
pub fn scores_into(query: &[f32], rows: &[f32], bias: &[f32], out: &mut [f32]) {
    let dim = query.len();
    assert_eq!(rows.len(), out.len() * dim);
    assert_eq!(bias.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function is compiled for.
            unsafe { scores_avx2(query, rows, bias, out) };
            return;
        }
    }
    scores_generic(query, rows, bias, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scores_avx2(query: &[f32], rows: &[f32], bias: &[f32], out: &mut [f32]) {
    // Same code, compiled with 8-wide vectors and fused multiply-add: the default x86-64 target
    // only has SSE2, and the workspace does not set target-cpu.
    scores_generic(query, rows, bias, out)
}

#[inline(always)]
fn scores_generic(query: &[f32], rows: &[f32], bias: &[f32], out: &mut [f32]) {
    let dim = query.len();
    for ((o, row), b) in out.iter_mut().zip(rows.chunks_exact(dim)).zip(bias) {
        *o = dot(query, row) + b;
    }
}

/// Dot product with 16 independent partial sums, which lets the compiler keep them in vector
/// registers (a single running sum would serialise every addition).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let (a_head, a_tail) = a.split_at(a.len() / LANES * LANES);
    let (b_head, b_tail) = b.split_at(a_head.len());
    for (ca, cb) in a_head.chunks_exact(LANES).zip(b_head.chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] += ca[i] * cb[i];
        }
    }
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_matches_naive_product() {
        let (rows, in_dim, out_dim) = (3, 5, 4);
        let x: Vec<f32> = (0..rows * in_dim).map(|i| i as f32 * 0.1 - 0.7).collect();
        let w: Vec<f32> = (0..out_dim * in_dim).map(|i| (i as f32 * 0.37).sin()).collect();
        let bias = [0.5, -1.0, 0.25, 2.0];
        let mut out = vec![0.0; rows * out_dim];
        linear(&x, rows, &w, &bias, out_dim, in_dim, &mut out);
        for r in 0..rows {
            for o in 0..out_dim {
                let want: f32 = (0..in_dim).map(|k| x[r * in_dim + k] * w[o * in_dim + k]).sum::<f32>() + bias[o];
                assert!((out[r * out_dim + o] - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn scores_match_naive_dot_products_for_odd_widths() {
        for dim in [1, 15, 16, 17, 64] {
            let query: Vec<f32> = (0..dim).map(|i| (i as f32).cos()).collect();
            let rows: Vec<f32> = (0..3 * dim).map(|i| (i as f32 * 0.3).sin()).collect();
            let bias = [0.1, 0.2, 0.3];
            let mut out = [0.0; 3];
            scores_into(&query, &rows, &bias, &mut out);
            for i in 0..3 {
                let want: f32 = (0..dim).map(|k| query[k] * rows[i * dim + k]).sum::<f32>() + bias[i];
                assert!((out[i] - want).abs() < 1e-4, "dim {dim}");
            }
        }
    }

    #[test]
    fn layer_norm_and_gelu_known_values() {
        let mut x = [1.0, 2.0, 3.0, 4.0];
        layer_norm(&mut x, &[1.0; 4], &[0.0; 4], 0.0);
        let s = 1.0 / 1.25f32.sqrt();
        for (got, want) in x.iter().zip([-1.5 * s, -0.5 * s, 0.5 * s, 1.5 * s]) {
            assert!((got - want).abs() < 1e-6);
        }
        let mut g = [0.0, 1.0, -1.0];
        gelu_erf(&mut g);
        assert!(g[0].abs() < 1e-7 && (g[1] - 0.841_344_7).abs() < 1e-6 && (g[2] + 0.158_655_3).abs() < 1e-6);
    }

    #[test]
    fn strided_product_matches_naive_on_interleaved_heads() {
        // Two 3-wide heads interleaved in rows of 6: head 1 of A (4 × 3) times head 1 of B seen
        // transposed (3 × 5), written into columns 2..7 of an output with rows of 8.
        let a: Vec<f32> = (0..4 * 6).map(|i| (i as f32 * 0.7).sin()).collect();
        let b: Vec<f32> = (0..5 * 6).map(|i| (i as f32 * 0.3).cos()).collect();
        let mut out = vec![9.0; 4 * 8];
        let av = Strided { data: &a, offset: 3, row_stride: 6, col_stride: 1 };
        let bv = Strided { data: &b, offset: 3, row_stride: 1, col_stride: 6 };
        matmul_strided(4, 5, 3, av, bv, &mut out, 2, 8);
        for r in 0..4 {
            for c in 0..8 {
                let got = out[r * 8 + c];
                if !(2..7).contains(&c) {
                    assert_eq!(got, 9.0, "untouched column {c}");
                    continue;
                }
                let want: f32 = (0..3).map(|k| a[r * 6 + 3 + k] * b[(c - 2) * 6 + 3 + k]).sum();
                assert!((got - want).abs() < 1e-5, "({r}, {c}): {got} vs {want}");
            }
        }
    }
}
