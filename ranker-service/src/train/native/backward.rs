//! The backward pass of one block: input gradients through frozen weights, LoRA gradients.

use std::cell::RefCell;
use std::collections::HashMap;

use rayon::prelude::*;

use super::gemm::{gemm_shared, matmul, matmul_acc_local, matmul_local, Mat};
use super::ops::{prob_offsets, query_blocks, rms_norm_backward, rotate, softmax_backward_best, swiglu_backward_best};
use super::{drop_vec, LoraF32, LoraSaved, NativeStep, PairGrad};
use crate::config::LlamaConfig;
use crate::cpu_kernels::SharedMut;
use crate::lora::Projection;

impl NativeStep {
    /// Gradients of the pair `(layer, proj)` (if any) for the output gradient `dy` (columns
    /// `col..col + out`, row stride `dy_rs`); adds the input's gradient through the pair to
    /// `dx` when given.
    #[allow(clippy::too_many_arguments)]
    fn lora_backward(
        saved: &HashMap<Projection, LoraSaved>,
        lora: &LoraF32,
        layer: usize,
        proj: Projection,
        cfg: &LlamaConfig,
        dy: &[f32],
        dy_rs: usize,
        col: usize,
        rows: usize,
        dx: Option<&mut [f32]>,
        grads: &mut HashMap<(usize, Projection), PairGrad>,
    ) {
        let (Some(p), Some(s)) = (lora.get(&(layer, proj)), saved.get(&proj)) else {
            return;
        };
        let (din, dout) = proj.dims(cfg);
        let r = p.r;
        let dy = &dy[col..];
        let mut gb = vec![0f32; dout * r];
        // dB = scale * dy^T u
        matmul(
            dout,
            r,
            rows,
            &mut gb,
            r,
            false,
            Mat::t(dy, dy_rs),
            Mat::rows(&s.u, r),
            p.scale,
        );
        // du = scale * dy B
        let mut du = vec![0f32; rows * r];
        matmul(
            rows,
            r,
            dout,
            &mut du,
            r,
            false,
            Mat::rows(dy, dy_rs),
            Mat::rows(&p.b, r),
            p.scale,
        );
        // dA = du^T z
        let mut ga = vec![0f32; r * din];
        matmul(
            r,
            din,
            rows,
            &mut ga,
            din,
            false,
            Mat::t(&du, r),
            Mat::rows(&s.z, din),
            1.0,
        );
        if let Some(dx) = dx {
            // dx += (du A) * mask
            if s.mask.is_empty() {
                matmul(
                    rows,
                    din,
                    r,
                    dx,
                    din,
                    true,
                    Mat::rows(&du, r),
                    Mat::rows(&p.a, din),
                    1.0,
                );
            } else {
                let mut dz = vec![0f32; rows * din];
                matmul(
                    rows,
                    din,
                    r,
                    &mut dz,
                    din,
                    false,
                    Mat::rows(&du, r),
                    Mat::rows(&p.a, din),
                    1.0,
                );
                dx.iter_mut()
                    .zip(&dz)
                    .zip(&s.mask)
                    .for_each(|((d, z), m)| *d += z * m);
            }
        }
        grads.insert((layer, proj), PairGrad { a: ga, b: gb });
    }


    /// One block backwards: `dout` is the gradient of its output rows `q_from..t`; returns
    /// the gradient of its input `(t, hidden)` (empty for block 0, which nothing upstream
    /// needs).
    pub(super) fn block_backward(
        &self,
        layer: usize,
        dout: &[f32],
        t: usize,
        lora: &LoraF32,
        grads: &mut HashMap<(usize, Projection), PairGrad>,
    ) -> Vec<f32> {
        let cfg = &self.cfg;
        let w = &self.blocks[layer];
        let s = &self.saved[layer];
        let (h, hd, nh, nkv) = (
            cfg.hidden_size,
            cfg.head_dim,
            cfg.num_heads,
            cfg.num_kv_heads,
        );
        let (qd, kvd, inter) = (nh * hd, nkv * hd, cfg.intermediate_size);
        let width = qd + 2 * kvd;
        let q_from = s.q_from;
        let rows_out = t - q_from;

        // Feed-forward backwards.
        let mut dact = vec![0f32; rows_out * inter];
        w.down.backward(rows_out, dout, &mut dact, false);
        Self::lora_backward(
            &s.lora,
            lora,
            layer,
            Projection::DownProj,
            cfg,
            dout,
            h,
            0,
            rows_out,
            Some(&mut dact),
            grads,
        );
        let mut dgu = vec![0f32; rows_out * 2 * inter];
        dgu.par_chunks_mut(2 * inter)
            .zip(s.gate_up.par_chunks(2 * inter))
            .zip(dact.par_chunks(inter))
            .for_each(|((d, gu), da)| swiglu_backward_best(d, gu, da));
        drop_vec(dact);
        let mut dh2 = vec![0f32; rows_out * h];
        w.gate_up.backward(rows_out, &dgu, &mut dh2, false);
        for (proj, col) in [(Projection::GateProj, 0), (Projection::UpProj, inter)] {
            Self::lora_backward(
                &s.lora,
                lora,
                layer,
                proj,
                cfg,
                &dgu,
                2 * inter,
                col,
                rows_out,
                Some(&mut dh2),
                grads,
            );
        }
        drop_vec(dgu);
        let mut dmid = dout.to_vec();
        rms_norm_backward(&s.x_mid, &s.rstd2, &w.ffn_norm, &dh2, &mut dmid, true);
        drop_vec(dh2);

        // Output projection backwards.
        let mut dattn = vec![0f32; rows_out * qd];
        w.o.backward(rows_out, &dmid, &mut dattn, false);
        Self::lora_backward(
            &s.lora,
            lora,
            layer,
            Projection::OProj,
            cfg,
            &dmid,
            h,
            0,
            rows_out,
            Some(&mut dattn),
            grads,
        );

        // Attention backwards, one task per head (each with its own key/value gradients).
        let blocks = query_blocks(q_from, t);
        let (offsets, per_head) = prob_offsets(&blocks);
        let scale = 1.0 / (hd as f32).sqrt();
        let group = nh / nkv;
        let mut dq = vec![0f32; rows_out * qd];
        let mut dkv_heads = vec![0f32; nh * 2 * t * hd];
        {
            let dq_ptr = SharedMut(dq.as_mut_ptr());
            let (q, k, v, probs, attn) = (&s.q, &s.k, &s.v, &s.probs, &s.attn);
            let dattn = &dattn;
            dkv_heads
                .par_chunks_mut(2 * t * hd)
                .enumerate()
                .for_each(|(head, dkv)| {
                    let (dk, dv) = dkv.split_at_mut(t * hd);
                    let j = head / group;
                    let kh = &k[j * t * hd..][..t * hd];
                    let vh = &v[j * t * hd..][..t * hd];
                    for (bi, &(start, end)) in blocks.iter().enumerate() {
                        let n = end - start;
                        let r0 = start - q_from;
                        let p = &probs[head * per_head + offsets[bi]..][..n * end];
                        let d_o = &dattn[r0 * qd + head * hd..];
                        let o = &attn[r0 * qd + head * hd..];
                        // dV += P^T dO
                        matmul_acc_local(
                            end,
                            hd,
                            n,
                            dv,
                            hd,
                            Mat::t(p, end),
                            Mat::rows(d_o, qd),
                            1.0,
                        );
                        DS.with(|cell| {
                            let mut ds = cell.borrow_mut();
                            ds.resize(n * end, 0.0);
                            // dP = dO V^T, then dS = P (dP - rowsum(dO o O)).
                            matmul_local(
                                n,
                                end,
                                hd,
                                &mut ds,
                                end,
                                Mat::rows(d_o, qd),
                                Mat::t(vh, hd),
                                1.0,
                            );
                            for r in 0..n {
                                let dot: f32 = d_o[r * qd..][..hd]
                                    .iter()
                                    .zip(&o[r * qd..][..hd])
                                    .map(|(a, b)| a * b)
                                    .sum();
                                let lim = start + r + 1;
                                softmax_backward_best(
                                    &mut ds[r * end..][..lim],
                                    &p[r * end..][..lim],
                                    dot,
                                );
                                ds[r * end + lim..(r + 1) * end].fill(0.0);
                            }
                            // dQ = scale dS K; dK += scale dS^T Q.
                            // SAFETY: rows r0..r0+n, columns head*hd..(head+1)*hd of dq are
                            // this task's alone and inside the buffer.
                            unsafe {
                                gemm_shared(
                                    n,
                                    hd,
                                    end,
                                    dq_ptr.ptr().add(r0 * qd + head * hd),
                                    qd,
                                    false,
                                    Mat::rows(&ds, end),
                                    Mat::rows(kh, hd),
                                    scale,
                                );
                            }
                            let qb = &q[start * qd + head * hd..];
                            matmul_acc_local(
                                end,
                                hd,
                                n,
                                dk,
                                hd,
                                Mat::t(&ds, end),
                                Mat::rows(qb, qd),
                                scale,
                            );
                        });
                    }
                });
        }
        drop_vec(dattn);

        // Un-rotate and assemble d[q | k | v] `(t, width)`.
        let half = hd / 2;
        let (cos, sin) = (&self.cos, &self.sin);
        let mut dqkv = vec![0f32; t * width];
        dqkv.par_chunks_mut(width).enumerate().for_each(|(row, d)| {
            let (c, sn) = (&cos[row * half..][..half], &sin[row * half..][..half]);
            if row >= q_from {
                d[..qd].copy_from_slice(&dq[(row - q_from) * qd..][..qd]);
                for head in d[..qd].chunks_exact_mut(hd) {
                    rotate(head, c, sn, -1.0);
                }
            }
            for j in 0..nkv {
                for head in j * group..(j + 1) * group {
                    let src = &dkv_heads[head * 2 * t * hd..];
                    let (dk, dv) = (&src[row * hd..][..hd], &src[(t + row) * hd..][..hd]);
                    let kdst = &mut d[qd + j * hd..][..hd];
                    kdst.iter_mut().zip(dk).for_each(|(a, b)| *a += b);
                    let vdst = &mut d[qd + kvd + j * hd..][..hd];
                    vdst.iter_mut().zip(dv).for_each(|(a, b)| *a += b);
                }
                rotate(&mut d[qd + j * hd..][..hd], c, sn, -1.0);
            }
        });
        drop_vec(dq);
        drop_vec(dkv_heads);

        let need_dx = layer > 0;
        let mut dh1 = if need_dx {
            vec![0f32; t * h]
        } else {
            Vec::new()
        };
        if need_dx {
            w.qkv.backward(t, &dqkv, &mut dh1, false);
        }
        for (proj, col) in [
            (Projection::QProj, 0),
            (Projection::KProj, qd),
            (Projection::VProj, qd + kvd),
        ] {
            let dx = need_dx.then_some(dh1.as_mut_slice());
            Self::lora_backward(
                &s.lora, lora, layer, proj, cfg, &dqkv, width, col, t, dx, grads,
            );
        }
        if !need_dx {
            return Vec::new();
        }
        let mut dx = vec![0f32; t * h];
        rms_norm_backward(&s.x_in, &s.rstd1, &w.attn_norm, &dh1, &mut dx, false);
        dx[q_from * h..]
            .iter_mut()
            .zip(&dmid)
            .for_each(|(d, m)| *d += m);
        dx
    }
}

thread_local! {
    /// Per-thread scratch for one query block's score gradients.
    static DS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}
