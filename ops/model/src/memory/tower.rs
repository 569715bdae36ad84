//! The attention mask, the fused cross-entropy's scratch, and the SigLIP tower's peak.

use super::*;

/// u32 words of one uploaded attention mask, as the kernel sizes it.
pub(super) fn mask_words(batch: u64, seq: u64) -> u64 {
    mask_word_count(batch as usize, seq as usize) as u64
}

/// The fused lm_head + cross-entropy's own scratch (`gpu::kernels::cross_entropy`): a
/// `[tokens, block]` logits block over one vocabulary chunk at a time and `[tokens, 8]` row
/// state. The block is as wide as the binding and `LOGITS_SCRATCH_BYTES` allow, at most `MAX_VOCAB_BLOCK`; the kernel
/// refuses a token count for which not even 8 columns fit. The widths come from the kernel's
/// own sizing functions (`logits_block`, `bf16_dw_rows`).
/// `bf16_dw`: the trained lm_head copy is bf16, so each block's dW goes through an f32 scratch
/// of `sub` rows of `hidden` (one matmul per sub-block).
pub(super) fn cross_entropy_scratch(
    tokens: u64,
    vocab: u64,
    hidden: u64,
    max_binding: u64,
    d_weight: bool,
    bf16_dw: bool,
) -> Result<Vec<Alloc>> {
    // The kernel's own block width (gpu::kernels::cross_entropy).
    let Some(block) = logits_block(tokens as usize, vocab as usize, max_binding) else {
        bail!(
            "the fused cross-entropy needs at least 8 logits per token in one storage binding: \
             {tokens} tokens per micro-batch need {} bytes, the scratch holds {}; lower \
             max_length or the per-device batch size",
            tokens * 32,
            max_binding.min(LOGITS_SCRATCH_BYTES as u64)
        );
    };
    let block = block as u64;
    let mut l = Vec::new();
    alloc(&mut l, "cross-entropy logits block", tokens, block);
    alloc(&mut l, "cross-entropy row state", tokens, 8);
    // Its products run as matmuls: the logits of every block, recomputed in backward for all
    // but the last, dH per block and (a trained lm_head) dW per block.
    let blocks = vocab.div_ceil(block);
    let mut dw_matmuls = if d_weight { blocks } else { 0 };
    if d_weight && bf16_dw {
        let sub = bf16_dw_rows(hidden as usize, block as usize, max_binding)
            .context("the bf16 lm_head gradient scratch holds no 8 rows")? as u64;
        alloc(&mut l, "cross-entropy bf16 gradient scratch", sub, hidden);
        // every block but the last is `block` wide
        let last = vocab - (blocks - 1) * block;
        dw_matmuls = (blocks - 1) * block.div_ceil(sub) + last.div_ceil(sub);
    }
    matmul_placeholders(&mut l, blocks + (blocks - 1) + blocks + dw_matmuls);
    Ok(l)
}

pub(super) fn is_vision(name: &str) -> bool {
    name.starts_with(VISION)
}

pub(super) fn activation_row(item: String, list: &[Alloc]) -> PlanRow {
    PlanRow {
        part: "activations",
        item,
        dtype: "f32",
        elements: byte_sum(list) / 4,
        bytes: byte_sum(list),
        device_bytes: device_sum(list),
    }
}

/// The tower's shapes for `act`'s micro-batch; none without images or a vision tower.
pub(super) fn vision_shape(
    config: &ModelConfig,
    act: &ActivationPlan,
    lora: Option<&LoraPlan>,
) -> Option<VisionShape> {
    match (config, config.vision()) {
        (ModelConfig::ConditionalGeneration(g), Some(v)) if act.images_per_sample > 0 => {
            Some(VisionShape {
                images: (act.batch * act.images_per_sample) as u64,
                patches: v.num_patches() as u64,
                patch_dim: v.patch_dim() as u64,
                hidden: v.hidden_size as u64,
                inter: v.intermediate_size as u64,
                heads: v.num_attention_heads as u64,
                layers: v.num_hidden_layers as u64,
                tokens_per_image: g.mm_tokens_per_image as u64,
                text_hidden: config.text().hidden_size as u64,
                r: lora.filter(|l| l.vision).map_or(0, |l| l.r as u64),
                dropout: lora.is_some_and(|l| l.dropout),
                bf16: lora.is_some_and(|l| l.modules_to_save_dtype == FloatDtype::BF16),
            })
        }
        _ => None,
    }
}

/// What the tower's forward keeps for its backward (`GpuVisionCache`).
pub(super) struct TowerKept {
    /// Per image: each layer's kept buffers, and its post_layernorm input and stats.
    pub(super) images: Vec<(Vec<Vec<usize>>, Vec<usize>)>,
    pub(super) mask: Vec<usize>,
}

/// `GpuVisionTower::forward` on the timeline, one image at a time: returns its output
/// `[images · patches, hidden]` and, when the tower trains, what it keeps (in group `kept`).
pub(super) fn tower_forward(
    tl: &mut Timeline,
    v: &VisionShape,
    ckpt: bool,
    kept: &str,
) -> (Vec<usize>, Option<TowerKept>) {
    let train = v.r > 0;
    let (p, hv) = (v.patches, v.hidden);
    let one = |name: &str, rows: u64, cols: u64| -> Vec<Alloc> {
        let mut l = Vec::new();
        alloc(&mut l, name, rows, cols);
        l
    };
    let mask = tl.add(kept, &one("vision attention mask", mask_words(1, p), 1));
    let output = tl.add(
        "vision output (every image's rows, the projector's input)",
        &one("vision output", v.images * p, hv),
    );
    let mut per_image = Vec::new();
    for img in 0..v.images {
        let of = format!("image {} of {}", img + 1, v.images);
        tl.temps(&one("vision pixels of one image", 1, p * v.patch_dim));
        tl.temps(&one("vision unfolded patches", p, v.patch_dim));
        let mut vx = tl.add(kept, &one("vision embeddings", p, hv));
        tl.flush(&format!("the patch embedding of {of}"));
        let mut layer_ids = Vec::new();
        let mut bf16_input = Vec::new();
        alloc_bf16(&mut bf16_input, "vision layer input", p, hv);
        for l in 0..v.layers {
            let rounded = v.bf16.then(|| tl.add(kept, &bf16_input));
            let (cache, temps, out) = vision_layer_forward(v);
            let k = tl.add(kept, &cache);
            tl.temps(&temps);
            let o = tl.add(kept, &[out]);
            if let Some(r) = &rounded {
                // kept instead of the f32 input when checkpointed; else dropped with the layer
                if train && ckpt {
                    tl.release(&vx);
                } else {
                    tl.release(r);
                }
            }
            if !train {
                tl.release(&vx);
                tl.release(&k);
            } else if ckpt {
                tl.release(&k);
                layer_ids.push(rounded.unwrap_or_else(|| vx.clone()));
            } else {
                layer_ids.push([vx.clone(), k].concat());
            }
            tl.flush(&format!("SigLIP layer {l}'s forward, {of}"));
            vx = o;
        }
        tl.temps(&one("vision post_layernorm out", p, hv));
        let stats = tl.add(kept, &one("vision post_layernorm stats", p, 2));
        if train {
            per_image.push((layer_ids, [vx, stats].concat()));
        } else {
            tl.release(&vx);
            tl.release(&stats);
        }
        tl.flush(&format!("the post_layernorm of {of}"));
    }
    if !train {
        // The tower keeps nothing: its mask goes when its forward returns.
        tl.free_now(&mask, "the image path's post_layernorm");
        return (output, None);
    }
    (
        output,
        Some(TowerKept {
            images: per_image,
            mask,
        }),
    )
}

/// `GpuVisionTower::backward` on the timeline, image by image and layer by layer (its output
/// gradient already on the device); `at_return` (the caller's buffers that go when it returns)
/// is released with its last flush, as its mask is.
pub(super) fn tower_backward(
    tl: &mut Timeline,
    v: &VisionShape,
    ckpt: bool,
    kept: TowerKept,
    at_return: &[usize],
) {
    let (p, hv) = (v.patches, v.hidden);
    let image_grad = "image path gradient";
    let one = |name: &str| -> Vec<Alloc> {
        let mut l = Vec::new();
        alloc(&mut l, name, p, hv);
        l
    };
    let count = kept.images.len();
    for (n, (mut layers, last)) in kept.images.into_iter().enumerate() {
        let of = format!("image {} of {}", n + 1, v.images);
        tl.temps(&one("vision d output of one image"));
        let mut grad = tl.add(image_grad, &one("vision d post_layernorm input"));
        tl.release(&last);
        tl.flush(&format!("the post_layernorm's backward of {of}"));
        for l in (0..v.layers).rev() {
            let ids = layers.pop().expect("one entry per layer");
            if ckpt {
                if v.bf16 {
                    tl.temps(&one("vision layer input widened from bf16"));
                }
                let (cache, temps, out) = vision_layer_forward(v);
                tl.temps(&cache);
                tl.temps(&temps);
                tl.temps(&[out]);
            }
            let mut back = vision_layer_backward(v, l > 0);
            let dx = (l > 0).then(|| back.pop().expect("the input gradient"));
            tl.temps(&back);
            tl.release(&ids);
            if let Some(dx) = dx {
                let next = tl.add(image_grad, &[dx]);
                tl.release(&grad);
                grad = next;
            } else {
                // The image's backward is done: its gradient goes; after the last image the
                // tower's backward returns, and its mask and the caller's buffers go.
                tl.release(&grad);
                if n + 1 == count {
                    tl.release(&kept.mask);
                    tl.release(at_return);
                }
            }
            tl.flush(&format!(
                "SigLIP layer {l}'s backward{}, {of}",
                if ckpt { " (forward recomputed)" } else { "" }
            ));
        }
    }
}

/// Device bytes the SigLIP tower alone takes at its peak beyond its inputs (pixels and output
/// gradient already on the device): `GpuVisionTower::forward` then `backward` on `act`'s images,
/// the output kept throughout, as the tower allocates them one image at a time. In a whole
/// step the text stack's peak can hide the tower's (it does on the tiny test model), so the
/// tower's own plan is checked against the engine on its own too.
pub fn vision_tower_peak(
    config: &ModelConfig,
    act: &ActivationPlan,
    lora: Option<&LoraPlan>,
) -> Result<u64> {
    let Some(v) = vision_shape(config, act, lora) else {
        bail!("the plan has no images, or the model no vision tower");
    };
    let mut tl = Timeline::default();
    let (_output, kept) = tower_forward(&mut tl, &v, act.gradient_checkpointing, "tower kept");
    if let Some(kept) = kept {
        tower_backward(&mut tl, &v, act.gradient_checkpointing, kept, &[]);
    }
    tl.flush("the tower's return");
    Ok(tl.peak)
}
