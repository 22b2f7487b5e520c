use candle_core::Device;
use retriever_service::batch::Batch;
use retriever_service::dropout::DropoutRng;
use retriever_service::model::LruRec;
use retriever_service::optim::{AdamW, AdamWConfig};
use retriever_service::LruRecConfig;
use rand::{Rng, SeedableRng};
use std::time::Instant;

fn main() {
    let dev = Device::Cpu;
    let cfg = LruRecConfig::for_items(1349);
    let model = LruRec::init(&cfg, 1, &dev).unwrap();
    let mut opt = AdamW::new(model.params(), AdamWConfig::default()).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let len: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(201);
    let seqs: Vec<Vec<u32>> = (0..16).map(|i| (0..(if i % 2 == 0 { len } else { 60 })).map(|_| rng.gen_range(1..=1349)).collect()).collect();
    let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
    let mut drop = DropoutRng::new(rand::rngs::StdRng::seed_from_u64(2));
    for _ in 0..3 {
        let t0 = Instant::now();
        let batch = Batch::new(&refs, &dev).unwrap();
        let hidden = model.forward(&batch.tokens, Some(&mut drop)).unwrap();
        let t1 = Instant::now();
        let hidden = hidden.flatten_to(1).unwrap().index_select(&batch.positions, 0).unwrap();
        let loss = candle_nn::loss::cross_entropy(&model.scores(&hidden).unwrap(), &batch.targets).unwrap();
        let _ = loss.to_scalar::<f32>().unwrap();
        let t2 = Instant::now();
        let grads = loss.backward().unwrap();
        let t3 = Instant::now();
        opt.step(model.params(), &grads, Some(5.0)).unwrap();
        let t4 = Instant::now();
        println!("fwd {:?} loss {:?} bwd {:?} opt {:?}", t1 - t0, t2 - t1, t3 - t2, t4 - t3);
    }
}
