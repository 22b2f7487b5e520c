//! The forward pass of one block, keeping what the backward reads.

use std::collections::HashMap;

use rayon::prelude::*;

use super::gemm::{gemm_shared, matmul, matmul_local, Mat};
use super::ops::{prob_offsets, query_blocks, rms_norm, rotate, swiglu_forward_best};
use super::{drop_vec, LoraF32, LoraSaved, NativeStep};
use crate::config::LlamaConfig;
use crate::cpu_kernels::{masked_softmax, SharedMut};
use crate::lora::{LoraDropout, Projection};

impl NativeStep {
    /// Adds `scale * (z A^T) B^T` of the pair `(layer, proj)` (if any) to `y` (columns
    /// `col..col + out` of rows with stride `y_rs`), where `z` is `x` under dropout; keeps `z`,
    /// the mask and `z A^T` for the backward.
    #[allow(clippy::too_many_arguments)]
    fn lora_forward(
        saved: &mut HashMap<Projection, LoraSaved>,
        lora: &LoraF32,
        layer: usize,
        proj: Projection,
        cfg: &LlamaConfig,
        x: &[f32],
        rows: usize,
        y: &mut [f32],
        y_rs: usize,
        col: usize,
        drop: Option<&mut LoraDropout>,
    ) {
        let Some(p) = lora.get(&(layer, proj)) else {
            saved.remove(&proj);
            return;
        };
        let (din, dout) = proj.dims(cfg);
        let s = saved.entry(proj).or_default();
        s.z.clear();
        s.z.extend_from_slice(&x[..rows * din]);
        s.mask.clear();
        if let Some(d) = drop {
            s.mask = d.mask(rows * din);
            s.z.iter_mut().zip(&s.mask).for_each(|(z, m)| *z *= m);
        }
        s.u.resize(rows * p.r, 0.0);
        matmul(
            rows,
            p.r,
            din,
            &mut s.u,
            p.r,
            false,
            Mat::rows(&s.z, din),
            Mat::t(&p.a, din),
            1.0,
        );
        matmul(
            rows,
            dout,
            p.r,
            &mut y[col..],
            y_rs,
            true,
            Mat::rows(&s.u, p.r),
            Mat::t(&p.b, p.r),
            p.scale,
        );
    }


    /// One block forwards on `x` `(t, hidden)`; returns the block's output for rows
    /// `q_from..t`.
    pub(super) fn block_forward(
        &mut self,
        layer: usize,
        x: Vec<f32>,
        t: usize,
        q_from: usize,
        lora: &LoraF32,
        mut drop: Option<&mut LoraDropout>,
    ) -> Vec<f32> {
        let cfg = &self.cfg;
        let w = &self.blocks[layer];
        let s = &mut self.saved[layer];
        let (h, hd, nh, nkv) = (
            cfg.hidden_size,
            cfg.head_dim,
            cfg.num_heads,
            cfg.num_kv_heads,
        );
        let (qd, kvd, inter) = (nh * hd, nkv * hd, cfg.intermediate_size);
        let width = qd + 2 * kvd;
        let eps = cfg.rms_norm_eps as f32;
        let rows_out = t - q_from;
        s.q_from = q_from;

        let mut h1 = vec![0f32; t * h];
        rms_norm(&x, &w.attn_norm, eps, &mut h1, &mut s.rstd1);
        s.x_in = x;
        let mut qkv = vec![0f32; t * width];
        w.qkv.forward(t, &h1, &mut qkv, false);
        for (proj, col) in [
            (Projection::QProj, 0),
            (Projection::KProj, qd),
            (Projection::VProj, qd + kvd),
        ] {
            Self::lora_forward(
                &mut s.lora,
                lora,
                layer,
                proj,
                cfg,
                &h1,
                t,
                &mut qkv,
                width,
                col,
                drop.as_deref_mut(),
            );
        }
        drop_vec(h1);

        // Split, rotate.
        let half = hd / 2;
        s.q.resize(t * qd, 0.0);
        s.k.resize(nkv * t * hd, 0.0);
        s.v.resize(nkv * t * hd, 0.0);
        let (cos, sin) = (&self.cos, &self.sin);
        s.q.par_chunks_mut(qd).enumerate().for_each(|(row, out)| {
            out.copy_from_slice(&qkv[row * width..][..qd]);
            let (c, sn) = (&cos[row * half..][..half], &sin[row * half..][..half]);
            for head in out.chunks_exact_mut(hd) {
                rotate(head, c, sn, 1.0);
            }
        });
        for j in 0..nkv {
            for row in 0..t {
                let src = &qkv[row * width..][..width];
                let dst = (j * t + row) * hd;
                let kk = &mut s.k[dst..dst + hd];
                kk.copy_from_slice(&src[qd + j * hd..][..hd]);
                rotate(
                    kk,
                    &cos[row * half..][..half],
                    &sin[row * half..][..half],
                    1.0,
                );
                s.v[dst..dst + hd].copy_from_slice(&src[qd + kvd + j * hd..][..hd]);
            }
        }
        drop_vec(qkv);

        // Causal attention for queries q_from..t.
        let blocks = query_blocks(q_from, t);
        let (offsets, per_head) = prob_offsets(&blocks);
        s.probs.resize(nh * per_head, 0.0);
        s.attn.resize(rows_out * qd, 0.0);
        let scale = 1.0 / (hd as f32).sqrt();
        let group = nh / nkv;
        {
            let probs = SharedMut(s.probs.as_mut_ptr());
            let attn = SharedMut(s.attn.as_mut_ptr());
            let (q, k, v) = (&s.q, &s.k, &s.v);
            (0..nh * blocks.len()).into_par_iter().for_each(|task| {
                let (head, bi) = (task / blocks.len(), task % blocks.len());
                let (start, end) = blocks[bi];
                let n = end - start;
                let j = head / group;
                // SAFETY: this task alone writes its block of its head's probabilities.
                let p = unsafe {
                    std::slice::from_raw_parts_mut(
                        probs.ptr().add(head * per_head + offsets[bi]),
                        n * end,
                    )
                };
                let qb = &q[start * qd + head * hd..];
                let kh = &k[j * t * hd..][..t * hd];
                let vh = &v[j * t * hd..][..t * hd];
                matmul_local(n, end, hd, p, end, Mat::rows(qb, qd), Mat::t(kh, hd), scale);
                for (r, row) in p.chunks_exact_mut(end).enumerate() {
                    masked_softmax(row, start + r + 1, None, start + r);
                }
                // SAFETY: rows start..end, columns head*hd..(head+1)*hd of the output are this
                // task's alone and inside the buffer.
                unsafe {
                    gemm_shared(
                        n,
                        hd,
                        end,
                        attn.ptr().add((start - q_from) * qd + head * hd),
                        qd,
                        false,
                        Mat::rows(p, end),
                        Mat::rows(vh, hd),
                        1.0,
                    );
                }
            });
        }

        // Output projection and residual.
        let mut x_mid = vec![0f32; rows_out * h];
        w.o.forward(rows_out, &s.attn, &mut x_mid, false);
        Self::lora_forward(
            &mut s.lora,
            lora,
            layer,
            Projection::OProj,
            cfg,
            &s.attn,
            rows_out,
            &mut x_mid,
            h,
            0,
            drop.as_deref_mut(),
        );
        x_mid
            .iter_mut()
            .zip(&s.x_in[q_from * h..])
            .for_each(|(m, x)| *m += x);

        // Feed-forward.
        let mut h2 = vec![0f32; rows_out * h];
        rms_norm(&x_mid, &w.ffn_norm, eps, &mut h2, &mut s.rstd2);
        s.gate_up.resize(rows_out * 2 * inter, 0.0);
        w.gate_up.forward(rows_out, &h2, &mut s.gate_up, false);
        for (proj, col) in [(Projection::GateProj, 0), (Projection::UpProj, inter)] {
            Self::lora_forward(
                &mut s.lora,
                lora,
                layer,
                proj,
                cfg,
                &h2,
                rows_out,
                &mut s.gate_up,
                2 * inter,
                col,
                drop.as_deref_mut(),
            );
        }
        drop_vec(h2);
        let mut act = vec![0f32; rows_out * inter];
        act.par_chunks_mut(inter)
            .zip(s.gate_up.par_chunks(2 * inter))
            .for_each(|(a, gu)| {
                let (g, u) = gu.split_at(inter);
                swiglu_forward_best(a, g, u);
            });
        let mut out = x_mid.clone();
        w.down.forward(rows_out, &act, &mut out, true);
        Self::lora_forward(
            &mut s.lora,
            lora,
            layer,
            Projection::DownProj,
            cfg,
            &act,
            rows_out,
            &mut out,
            h,
            0,
            drop,
        );
        s.x_mid = x_mid;
        out
    }

}
