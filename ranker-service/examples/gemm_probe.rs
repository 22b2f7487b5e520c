//! GFLOP/s of the `gemm` crate (what the native training step and candle's CPU matmul use) on
//! the training step's products (rows = prompt tokens), both right-operand layouts, for the
//! side-by-side with OpenBLAS and MKL in `bench/peers/gemm_peer.py`:
//!
//! and, where the CPU has AVX-512 BF16, the ranker's bf16 kernel (`bf16_gemm`, weights packed
//! at load, the input rounded per call, included in the time):
//!
//!   cargo run --release --locked -p ranker-service --example gemm_probe -- 2   # threads
use ranker_service::bf16_gemm::{self, Bf16Kernel, PackedBf16};
use std::time::Instant;

/// Seconds per call of `f`, timed over about a second after one warm-up call.
fn time(mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    let mut it = 0;
    while t.elapsed().as_secs_f64() < 1.0 {
        f();
        it += 1;
    }
    t.elapsed().as_secs_f64() / it as f64
}

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().unwrap();
    for (m, k, n) in [(623, 576, 1536), (623, 1536, 576), (623, 576, 576), (623, 576, 192), (623, 192, 576)] {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut c = vec![0f32; m * n];
        let mut line = format!("({m}, {k}, {n})");
        // rhs row-major (k, n): cs 1, rs n; rhs transposed (W (n, k) row-major): rs 1, cs k.
        for (name, rhs_cs, rhs_rs) in [("rowmajor", 1isize, n as isize), ("transposed", k as isize, 1isize)] {
            let run = |c: &mut Vec<f32>| unsafe {
                gemm::gemm(m, n, k, c.as_mut_ptr(), 1, n as isize, false, a.as_ptr(), 1, k as isize, b.as_ptr(), rhs_cs, rhs_rs, 0.0, 1.0, false, false, false, gemm::Parallelism::Rayon(threads))
            };
            let dt = time(|| run(&mut c));
            line += &format!(" gemm-{name} {:.0}", 2.0 * (m * k * n) as f64 / dt / 1e9);
        }
        if bf16_gemm::supported() {
            // The weight (n, k) as a projection stores it; the product is a · Wᵀ.
            let packed = PackedBf16::pack(&b, n, k);
            for kernel in [Bf16Kernel::Avx512, Bf16Kernel::Amx] {
                if kernel == Bf16Kernel::Amx && !bf16_gemm::amx_ready() {
                    continue;
                }
                let dt = time(|| {
                    std::hint::black_box(packed.matmul_with(kernel, &a, m));
                });
                line += &format!(" {} {:.0}", kernel.name(), 2.0 * (m * k * n) as f64 / dt / 1e9);
            }
        }
        println!("{line}");
    }
}
