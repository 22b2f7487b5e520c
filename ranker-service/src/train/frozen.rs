//! `y = x W^T` for a frozen `W`, whose backward computes only the input's gradient.
//!
//! candle's matmul backward always computes both operands' gradients, so every frozen
//! projection of a training step would also cost a weight-gradient matmul (as many FLOPs as the
//! forward one) plus a weight-sized buffer. LoRA training needs only `dL/dx = dL/dy W`.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

struct FrozenLinear {
    /// `(out, in)`.
    w: Tensor,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("frozen-linear: non-contiguous input".into()))?;
        let dims = layout.shape().dims().to_vec();
        let x = match storage {
            CpuStorage::F32(v) => {
                Tensor::from_slice(&v[start..end], dims.as_slice(), &candle_core::Device::Cpu)?
            }
            CpuStorage::F64(v) => {
                Tensor::from_slice(&v[start..end], dims.as_slice(), &candle_core::Device::Cpu)?
            }
            _ => candle_core::bail!("frozen-linear: f32 or f64 only"),
        };
        let y = x.matmul(&self.w.t()?)?;
        let shape = y.shape().clone();
        let flat = y.flatten_all()?;
        let out = match storage {
            CpuStorage::F32(_) => CpuStorage::F32(flat.to_vec1()?),
            _ => CpuStorage::F64(flat.to_vec1()?),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.matmul(&self.w)?))
    }
}

/// `x W^T` for a 2D `x` `(n, in)` and a frozen dense `w` `(out, in)`, on the CPU; other devices
/// fall back to a plain matmul.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() {
        return x.matmul(&w.t()?);
    }
    x.contiguous()?.apply_op1(FrozenLinear { w: w.detach() })
}
