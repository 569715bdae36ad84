//! Throughput of the NF4 quantizer (the `quantize` op's inner loop) on random weights, to size
//! the 4B model (3.9B Linear parameters): `cargo run --release -p ops --example quantize_bench [M params]`.

use std::time::Instant;

use ops::model::bnb::{QuantStorage, SkipRule};
use ops::model::config::FloatDtype;
use ops::model::quantize::{quantize_linear, QuantizeOptions};
use rand::{RngExt, SeedableRng};
use rayon::prelude::*;

fn main() {
    let millions: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(64);
    // Gemma 3 4B's gate_proj shape, repeated.
    let (rows, cols) = (10240, 2560);
    let per = rows * cols;
    let count = (millions * 1_000_000).div_ceil(per);
    let weights: Vec<Vec<f32>> = (0..count)
        .into_par_iter()
        .map(|i| {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(i as u64);
            (0..per)
                .map(|_| FloatDtype::BF16.round(rng.random::<f32>() - 0.5))
                .collect()
        })
        .collect();
    let opts = QuantizeOptions {
        double_quant: true,
        compute_dtype: FloatDtype::BF16,
        quant_storage: QuantStorage::BF16,
        skip_modules: None,
        skip_rule: SkipRule::Boundary,
        load_dtype: Some(FloatDtype::BF16),
    };
    let t = Instant::now();
    weights.par_iter().for_each(|w| {
        quantize_linear(w, &[rows, cols], FloatDtype::BF16, &opts).unwrap();
    });
    let s = t.elapsed().as_secs_f64();
    let n = (count * per) as f64;
    println!(
        "{} threads: {:.0} M params in {s:.2} s = {:.0} M params/s; the 4B model's 3.88e9 Linear params: ~{:.0} s",
        rayon::current_num_threads(),
        n / 1e6,
        n / 1e6 / s,
        3.88e9 / (n / s)
    );
}
