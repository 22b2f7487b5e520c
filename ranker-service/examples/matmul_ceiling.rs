//! The f32 matrix-multiply ceiling of this machine for the model's projection shapes; prints JSON.
//!
//! usage: matmul_ceiling [--tokens N] [--iters N]
//!
//! Also times one large square product (1024³ through `gemm`), the best case for any f32 kernel,
//! as the machine's peak. Run it with `RAYON_NUM_THREADS=1` and `=2`, and as two concurrent
//! single-thread processes, to see how much a second core adds on this VM.
//!
//! Times `x (N, in) @ W^T` for SmolLM2-135M's four projection shapes (fused QKV, O, fused
//! gate/up, down) three ways: candle's `matmul` on the `(out, in)` weight as the model stores
//! it (a transposed view), candle's `matmul` on a pre-transposed contiguous `(in, out)` weight,
//! and the `gemm` crate called directly on the pre-transposed weight. The sum over one layer,
//! times 30 layers, is the prefill time the projections alone would take, i.e. the tokens/s
//! ceiling of any forward pass built on these kernels.

use std::time::Instant;

use candle_core::{Device, Tensor};
use llamarec_common::bench::median;

fn time<F: FnMut()>(iters: usize, mut f: F) -> f64 {
    f();
    median(
        (0..iters)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

/// `out (m, n) = a (m, k) @ b (k, n)`, all row-major and contiguous, through `gemm` directly on
/// `threads` threads.
fn row_major_gemm(
    m: usize,
    n: usize,
    k: usize,
    out: &mut [f32],
    a: &[f32],
    b: &[f32],
    threads: usize,
) {
    assert!(out.len() >= m * n && a.len() >= m * k && b.len() >= k * n);
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the three slices hold the row-major matrices the strides describe (checked above).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

fn main() {
    let (mut tokens, mut iters) = (623usize, 20usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--tokens" => tokens = args.next().unwrap().parse().unwrap(),
            "--iters" => iters = args.next().unwrap().parse().unwrap(),
            other => panic!("unknown argument {other}"),
        }
    }
    let threads = candle_core::utils::get_num_threads();
    // (name, in, out) per layer of SmolLM2-135M: hidden 576, 9 + 2 * 3 heads of 64, FFN 1536.
    let shapes = [
        ("qkv", 576usize, 960usize),
        ("o", 576, 576),
        ("gate_up", 576, 3072),
        ("down", 1536, 576),
    ];
    let dev = Device::Cpu;
    let mut rows = Vec::new();
    let (mut total_view, mut total_t, mut total_gemm, mut flops) = (0.0, 0.0, 0.0, 0.0);
    for (name, k, n) in shapes {
        let x = Tensor::randn(0f32, 1.0, (tokens, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
        let wt = w.t().unwrap().contiguous().unwrap();
        let view = time(iters, || {
            x.matmul(&w.t().unwrap()).unwrap();
        });
        let pre_t = time(iters, || {
            x.matmul(&wt).unwrap();
        });
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let ws = wt.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut out = vec![0f32; tokens * n];
        let direct = time(iters, || {
            row_major_gemm(tokens, n, k, &mut out, &xs, &ws, threads)
        });
        let f = 2.0 * (tokens * k * n) as f64;
        flops += f;
        total_view += view;
        total_t += pre_t;
        total_gemm += direct;
        rows.push(format!(
            "{{\"proj\":\"{name}\",\"in\":{k},\"out\":{n},\"candle_view_ms\":{:.3},\"candle_pretransposed_ms\":{:.3},\"gemm_direct_ms\":{:.3},\"gflops_view\":{:.1},\"gflops_pretransposed\":{:.1},\"gflops_direct\":{:.1}}}",
            view * 1e3,
            pre_t * 1e3,
            direct * 1e3,
            f / view / 1e9,
            f / pre_t / 1e9,
            f / direct / 1e9
        ));
    }
    let square = 1024usize;
    let a = vec![1f32; square * square];
    let mut c = vec![0f32; square * square];
    let square_s = time(iters.min(10), || {
        row_major_gemm(square, square, square, &mut c, &a, &a, threads)
    });
    let square_gflops = 2.0 * (square as f64).powi(3) / square_s / 1e9;
    let layers = 30.0;
    println!(
        "{{\"bench\":\"matmul_ceiling\",\"threads\":{threads},\"tokens\":{tokens},\"projections\":[{}],\
\"square_1024_gflops\":{square_gflops:.1},\"layer_gflop\":{:.3},\"ceiling_tok_s_view\":{:.0},\"ceiling_tok_s_pretransposed\":{:.0},\"ceiling_tok_s_direct\":{:.0}}}",
        rows.join(","),
        flops / 1e9,
        tokens as f64 / (total_view * layers),
        tokens as f64 / (total_t * layers),
        tokens as f64 / (total_gemm * layers),
    );
}
