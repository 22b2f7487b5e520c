use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() {
    let dev = Device::Cpu;
    let n = 623;
    let shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)];
    let ws: Vec<Tensor> = shapes.iter().map(|&(o, i)| Tensor::randn(0f32, 0.02, (o, i), &dev).unwrap()).collect();
    let wts: Vec<Tensor> = ws.iter().map(|w| w.t().unwrap().contiguous().unwrap()).collect();
    let xs: Vec<Tensor> = shapes.iter().map(|&(_, i)| Tensor::randn(0f32, 1.0, (n, i), &dev).unwrap()).collect();
    let flops: f64 = shapes.iter().map(|&(o, i)| 2.0 * (n * o * i) as f64).sum::<f64>() * 30.0;
    for variant in 0..2 {
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            for _ in 0..30 {
                for j in 0..4 {
                    let _y = if variant == 0 { xs[j].matmul(&ws[j].t().unwrap()).unwrap() } else { xs[j].matmul(&wts[j]).unwrap() };
                }
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("variant {variant} ({}): {best:.3}s, {:.1} GFLOP/s, linear-only {:.0} tok/s", if variant == 0 {"x W^T"} else {"x Wt contiguous"}, flops / best / 1e9, n as f64 / best);
    }
}
