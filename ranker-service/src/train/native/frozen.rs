//! A frozen projection weight and the two products training needs of it: forwards `x · Wᵀ`,
//! backwards the input's gradient `dy · W` (never the weight's). In f32 through `gemm`, or, where
//! the CPU has AMX, in bf16 with f32 sums through [`crate::bf16_gemm`] (`W` and `Wᵀ` packed once,
//! when the step is built). The LoRA pairs, their gradients and the optimizer stay f32.

use super::gemm::{matmul, Mat};
use crate::bf16_gemm::{Bf16Kernel, PackedBf16};

/// Which arithmetic the frozen products use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrozenPrecision {
    /// f32 (`gemm`): every CPU.
    F32,
    /// bf16 operands, f32 sums: AMX or AVX-512 BF16.
    Bf16(Bf16Kernel),
}

impl FrozenPrecision {
    /// bf16 where the CPU has AMX (where the products run several times faster), else f32.
    /// On CPUs with AVX-512 BF16 but no AMX, `vdpbf16ps` does no more multiply-adds per cycle
    /// than f32 FMAs (BENCHMARKS.md "bf16 projections"), so it would only cost precision.
    pub fn auto() -> Self {
        match Bf16Kernel::detect() {
            Some(Bf16Kernel::Amx) => Self::Bf16(Bf16Kernel::Amx),
            _ => Self::F32,
        }
    }
}

/// A frozen `(out, in)` weight.
pub(super) struct Frozen {
    /// Row-major f32 `(out, in)`.
    pub(super) w: Vec<f32>,
    out: usize,
    inp: usize,
    /// `(kernel, W packed as (out, in), Wᵀ packed as (in, out))`.
    bf16: Option<(Bf16Kernel, PackedBf16, PackedBf16)>,
}

impl Frozen {
    pub(super) fn new(w: Vec<f32>, out: usize, inp: usize, precision: FrozenPrecision) -> Self {
        assert_eq!(w.len(), out * inp, "frozen weight is not (out, in)");
        let bf16 = match precision {
            FrozenPrecision::F32 => None,
            FrozenPrecision::Bf16(kernel) => {
                let mut t = vec![0f32; w.len()];
                for o in 0..out {
                    for i in 0..inp {
                        t[i * out + o] = w[o * inp + i];
                    }
                }
                Some((kernel, PackedBf16::pack(&w, out, inp), PackedBf16::pack(&t, inp, out)))
            }
        };
        Self { w, out, inp, bf16 }
    }

    /// `dst (rows, out) [+]= x (rows, in) · Wᵀ`.
    pub(super) fn forward(&self, rows: usize, x: &[f32], dst: &mut [f32], accumulate: bool) {
        match &self.bf16 {
            Some((kernel, w, _)) => store(dst, &w.matmul_with(*kernel, &x[..rows * self.inp], rows), accumulate),
            None => matmul(rows, self.out, self.inp, dst, self.out, accumulate, Mat::rows(x, self.inp), Mat::t(&self.w, self.inp), 1.0),
        }
    }

    /// `dst (rows, in) [+]= dy (rows, out) · W`.
    pub(super) fn backward(&self, rows: usize, dy: &[f32], dst: &mut [f32], accumulate: bool) {
        match &self.bf16 {
            Some((kernel, _, wt)) => store(dst, &wt.matmul_with(*kernel, &dy[..rows * self.out], rows), accumulate),
            None => matmul(rows, self.inp, self.out, dst, self.inp, accumulate, Mat::rows(dy, self.out), Mat::rows(&self.w, self.inp), 1.0),
        }
    }
}

fn store(dst: &mut [f32], y: &[f32], accumulate: bool) {
    let dst = &mut dst[..y.len()];
    if accumulate {
        dst.iter_mut().zip(y).for_each(|(d, v)| *d += v);
    } else {
        dst.copy_from_slice(y);
    }
}
