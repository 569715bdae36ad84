use super::*;
use crate::config::GEMMA_3_4B_IT_CONFIG_JSON;

fn guide_options() -> PlanOptions {
    PlanOptions {
        base: BaseFormat::Nf4 { double_quant: true },
        base_dtype: FloatDtype::BF16,
        frozen_tables: FloatDtype::BF16,
        lora: Some(LoraPlan {
            r: 16,
            modules_to_save: vec!["lm_head".into(), "embed_tokens".into()],
            modules_to_save_dtype: FloatDtype::BF16,
            vision: true,
            dropout: true,
            optimizer_offload: false,
        }),
        activations: Some(ActivationPlan {
            batch: 1,
            seq_len: 2048,
            images_per_sample: 1,
            gradient_checkpointing: true,
            activation_dtype: FloatDtype::F32,
            max_binding_bytes: 128 << 20,
            staged_operands: false,
        }),
    }
}

/// Hand-computed figures for gemma-3-4b-it (the shapes of its config.json).
#[test]
fn gemma_3_4b_weights_by_hand() {
    let c = ModelConfig::from_json(GEMMA_3_4B_IT_CONFIG_JSON).unwrap();
    let plan = MemoryPlan::build(&c, &guide_options()).unwrap();
    println!("{}", plan.table());
    // Linear params: text 34 * (2048*2560 + 2*1024*2560 + 2560*2048 + 3*10240*2560)
    // + vision 27 * (4*1152^2 + 2*4304*1152).
    let text_lin: u64 = 34 * (2048 * 2560 + 2 * 1024 * 2560 + 2560 * 2048 + 3 * 10240 * 2560);
    let vis_lin: u64 = 27 * (4 * 1152 * 1152 + 2 * 4304 * 1152);
    let nf4 = &plan.rows[0];
    assert_eq!(nf4.elements, text_lin + vis_lin);
    assert_eq!(nf4.bytes, (text_lin + vis_lin) / 2);
    // LoRA r=16: 876,544 per text layer, 322,048 per vision layer.
    let lora = plan
        .rows
        .iter()
        .find(|r| r.item.starts_with("LoRA"))
        .unwrap();
    assert_eq!(lora.elements, 34 * 876_544 + 27 * 322_048);
    assert_eq!(lora.bytes, lora.elements * 16);
    // The embedding (262208 x 2560) in bf16, and two bf16 trainable copies x 4 (param, grad, m, v).
    let embed = plan
        .rows
        .iter()
        .find(|r| r.item.starts_with("embed_tokens"))
        .unwrap();
    assert_eq!(embed.bytes, 262_208 * 2560 * 2);
    // ... and the 4-byte gradient norm.
    assert_eq!(
        plan.part_total("trainable"),
        lora.bytes + 2 * 262_208 * 2560 * 2 * 4 + 4
    );
}

/// What the README's scaling model uses: the guide's LoRA (r 16, all-linear with the
/// tower) moves 147 MiB per step; its bf16 lm_head copy 1.25 GiB more; the embed_tokens
/// copy only the rows the step's tokens touch.
#[test]
fn gemma_3_4b_allreduce_payload() {
    let c = ModelConfig::from_json(GEMMA_3_4B_IT_CONFIG_JSON).unwrap();
    let lora = guide_options().lora.unwrap();
    let p = allreduce_payload(&c, &lora, 2048).unwrap();
    assert_eq!(p.lora, 4 * (34 * 876_544 + 27 * 322_048));
    assert_eq!(p.lora, 153_991_168);
    assert_eq!(p.lm_head, 262_208 * 2560 * 2);
    assert_eq!(p.embed_tokens, 2048 * 2560 * 2);
    assert_eq!(
        allreduce_payload(&c, &lora, 1 << 30).unwrap().embed_tokens,
        p.lm_head,
        "never more rows than the vocabulary"
    );
    let only = LoraPlan {
        modules_to_save: vec![],
        ..lora
    };
    assert_eq!(allreduce_payload(&c, &only, 2048).unwrap().total(), p.lora);
}

#[test]
fn checkpointing_saves_memory_and_budget_refuses() {
    let c = ModelConfig::from_json(GEMMA_3_4B_IT_CONFIG_JSON).unwrap();
    let mut opts = guide_options();
    let with = MemoryPlan::build(&c, &opts).unwrap();
    opts.activations.as_mut().unwrap().gradient_checkpointing = false;
    let without = MemoryPlan::build(&c, &opts).unwrap();
    // Checkpointing keeps 34 layer inputs instead of every buffer of 34 layers' forward and
    // backward (the image path is not checkpointed: it dominates both).
    let (w, wo) = (
        with.device_part_total("activations"),
        without.device_part_total("activations"),
    );
    assert!(wo > 2 * w, "{wo} vs {w}");
    let limits = DeviceLimits {
        max_buffer_size: 1 << 30,
        max_storage_buffer_binding_size: 1 << 27,
        memory_budget: Some(8 << 30),
    };
    let e = with.check(&limits).unwrap_err().to_string();
    assert!(e.contains("memory budget is 8.00 GiB"), "{e}");
    let roomy = DeviceLimits {
        memory_budget: Some(200 << 30),
        ..limits
    };
    let chunked = with.check(&roomy).unwrap();
    // The 1.34 GB bf16 embedding does not fit one 128 MiB binding: split between rows.
    assert!(
        chunked
            .iter()
            .any(|(n, k)| n.contains("embed_tokens") && *k == 11),
        "{chunked:?}"
    );
    // Weights alone: rows wider than the binding cannot be chunked.
    let tiny = DeviceLimits {
        max_buffer_size: 1024,
        max_storage_buffer_binding_size: 1024,
        memory_budget: None,
    };
    let weights_only = MemoryPlan::build(
        &c,
        &PlanOptions {
            activations: None,
            ..guide_options()
        },
    )
    .unwrap();
    let e = weights_only.check(&tiny).unwrap_err().to_string();
    assert!(e.contains("rows of"), "{e}");
}

/// Activations are bound whole: one larger than the binding is refused upfront, naming
/// the buffer, its size, the limit and what to lower. By hand: the text MLP's
/// [tokens, 10240] f32 passes 128 MiB above 3276 tokens (134,217,728 / 40,960).
#[test]
fn activation_over_one_binding_is_refused() {
    let c = ModelConfig::from_json(GEMMA_3_4B_IT_CONFIG_JSON).unwrap();
    let lavapipe = DeviceLimits {
        max_buffer_size: 1 << 30,
        max_storage_buffer_binding_size: 128 << 20,
        memory_budget: None,
    };
    let plan_for = |batch: usize, seq_len: usize, images: usize| {
        let mut o = guide_options();
        let a = o.activations.as_mut().unwrap();
        (a.batch, a.seq_len, a.images_per_sample) = (batch, seq_len, images);
        MemoryPlan::build(&c, &o).unwrap()
    };
    // 3264 tokens: the MLP activations are 127.5 MiB; no other activation is larger.
    plan_for(1, 3264, 1).check(&lavapipe).unwrap();
    let e = plan_for(1, 3300, 1)
        .check(&lavapipe)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("text MLP gate_proj [3300, 10240] f32")
            && e.contains("135168000 bytes")
            && e.contains("(134217728 bytes")
            && e.contains("Lower max_length")
            && e.contains("sequence length 3300"),
        "{e}"
    );
    // SigLIP at 896 px runs one image at a time: its largest buffer, fc1's [4096, 4304]
    // f32 (67.2 MiB), is one image's whatever the batch. Only the tower's output (and its
    // gradient), [images·4096, 1152] f32 at 18 MiB per image, spans the batch: 7 images
    // fit, 8 do not.
    let seven = plan_for(1, 2048, 7);
    seven.check(&lavapipe).unwrap();
    assert!(seven
        .buffers
        .iter()
        .any(|b| b.name == "vision MLP fc1 [4096, 4304] f32"));
    let e = plan_for(1, 2048, 8)
        .check(&lavapipe)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("vision output [32768, 1152] f32") && e.contains("150994944 bytes"),
        "{e}"
    );
    // Artificially low limits: everything but the smallest buffers is refused.
    let tiny = DeviceLimits {
        max_buffer_size: 1024,
        max_storage_buffer_binding_size: 1024,
        memory_budget: None,
    };
    let e = plan_for(1, 16, 0).check(&tiny).unwrap_err().to_string();
    assert!(
        e.contains("one storage binding on this adapter holds at most 1.0 KiB (1024 bytes"),
        "{e}"
    );
}

/// transformers 5.24 + bitsandbytes 0.50.2 `get_memory_footprint(return_buffers=False)` for
/// gemma-3-4b-it in NF4 (tools/memory/bnb_footprint.py: the meta-device rule, validated
/// against a real CPU 4-bit load of a tiny model): 3,170,589,408 bytes.
#[test]
fn matches_transformers_get_memory_footprint() {
    let c = ModelConfig::from_json(GEMMA_3_4B_IT_CONFIG_JSON).unwrap();
    assert_eq!(bnb_parameter_footprint(&c, FloatDtype::BF16), 3_170_589_408);
}

/// Gemma 3 4B: 34 layers, every 6th full attention (5), the others a 1024-token window;
/// 4 KV heads of 256, f32 keys and values: 8 KiB per position and layer.
#[test]
fn kv_cache_of_gemma_3_4b_by_hand() {
    let c = ModelConfig::from_json(GEMMA_3_4B_IT_CONFIG_JSON).unwrap();
    let row = kv_cache_row(&c, 1, 2176, 128 << 20);
    assert_eq!(row.bytes, (5 * 2176 + 29 * 1024) * 2 * 4 * 256 * 4);
    assert_eq!(row.bytes, 332_398_592);
    // batch 2 doubles it; positions past the window grow only the full layers
    assert_eq!(kv_cache_row(&c, 2, 2176, 128 << 20).bytes, 2 * row.bytes);
    assert_eq!(
        kv_cache_row(&c, 1, 2177, 128 << 20).bytes - row.bytes,
        5 * 2 * 4 * 256 * 4
    );
}

#[test]
fn nf4_state_bytes_by_hand() {
    // 2560 x 2560: 3,276,800 packed bytes; 102,400 blocks -> 102,400 u8 + 400 f32 nested + offset + maps.
    assert_eq!(
        nf4_state_bytes(2560 * 2560, true),
        (3_276_800, 102_400 + 1600 + 4 + 64 + 1024)
    );
    assert_eq!(
        nf4_state_bytes(2560 * 2560, false),
        (3_276_800, 409_600 + 64)
    );
}
