//! Prints the device memory plan of a model config (default: google/gemma-3-4b-it's, committed at
//! recipes/configs/gemma-3-4b-it.config.json) for the guide's QLoRA setup, next to what
//! transformers + bitsandbytes report for the same NF4 model (`get_memory_footprint`).
//!
//! `cargo run -p ops --example memory_plan -- [config.json] [batch] [seq_len] [images_per_sample]`

use ops::model::config::{FloatDtype, ModelConfig, GEMMA_3_4B_IT_CONFIG_JSON};
use ops::model::memory::{
    bnb_parameter_footprint, ActivationPlan, BaseFormat, LoraPlan, MemoryPlan, PlanOptions,
};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = match args.first() {
        Some(path) => ModelConfig::from_file(std::path::Path::new(path))?,
        None => ModelConfig::from_json(GEMMA_3_4B_IT_CONFIG_JSON)?,
    };
    let num =
        |i: usize, default: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    for checkpointing in [true, false] {
        let opts = PlanOptions {
            base: BaseFormat::Nf4 { double_quant: true },
            base_dtype: FloatDtype::BF16,
            lora: Some(LoraPlan {
                r: 16,
                modules_to_save: vec!["lm_head".into(), "embed_tokens".into()],
                modules_to_save_dtype: FloatDtype::BF16,
                vision: true,
                dropout: true,
            }),
            activations: Some(ActivationPlan {
                batch: num(1, 1),
                seq_len: num(2, 2048),
                images_per_sample: num(3, 1),
                gradient_checkpointing: checkpointing,
                activation_dtype: FloatDtype::F32,
                max_binding_bytes: 128 << 20,
                staged_operands: false,
            }),
        };
        let plan = MemoryPlan::build(&config, &opts)?;
        println!("gradient checkpointing: {checkpointing}");
        println!("{}", plan.table());
    }
    println!(
        "transformers get_memory_footprint(return_buffers=False) of the NF4 model (bf16 others): {} bytes",
        bnb_parameter_footprint(&config, FloatDtype::BF16)
    );
    Ok(())
}
