//! The activation rows of the plan: the buffers live at a step's peak, by what holds them.

use super::*;

/// The activation rows and buffers of one micro-batch on `Gemma3Gpu`.
///
/// The engine returns a buffer to its pool only when nothing references it, and a `Recorder`
/// references every buffer it bound until it is flushed. `Gemma3Gpu::accumulate` flushes after
/// each image's patch embedding, SigLIP layers and post_layernorm (the tower runs one image at
/// a time), after each text layer's forward and backward, after the projector and after the
/// loss, so the peak is what is kept (layer caches, or with gradient checkpointing only layer
/// inputs) plus the largest single phase's working set: one image's in the tower. The rows are
/// the buffers live at that peak, by what holds them ([`Timeline`]).
pub(super) fn activation_rows(
    config: &ModelConfig,
    act: &ActivationPlan,
    lora: Option<&LoraPlan>,
) -> Result<(Vec<PlanRow>, Vec<Buffer>)> {
    let t = config.text();
    let (b, s) = (act.batch as u64, act.seq_len as u64);
    let tokens = b * s;
    let hd = t.head_dim() as u64;
    let r = lora.map_or(0, |l| l.r as u64);
    let dropout = lora.is_some_and(|l| l.dropout);
    let text = TextShape {
        tokens,
        hidden: t.hidden_size as u64,
        q: t.num_attention_heads as u64 * hd,
        kv: t.num_key_value_heads as u64 * hd,
        inter: t.intermediate_size as u64,
        heads: t.num_attention_heads as u64,
        kv_heads: t.num_key_value_heads as u64,
        r,
        dropout,
    };
    let layers = t.num_hidden_layers as u64;
    let h = text.hidden;
    let embed_copy = lora.is_some_and(|l| l.modules_to_save.iter().any(|m| m == "embed_tokens"));

    // Per-batch inputs: ids, positions, one mask per kind of attention window, RoPE tables per
    // (base, scaling), pixels (the labels, the loss totals and the embedding-gradient ids come
    // later, in their phases).
    let mut inputs = Vec::new();
    alloc(&mut inputs, "input ids", tokens, 1);
    alloc(&mut inputs, "positions", tokens, 1);
    let mut windows = Vec::new();
    let mut ropes = Vec::new();
    for l in 0..t.num_hidden_layers {
        let w = t.is_sliding(l);
        if !windows.contains(&w) {
            windows.push(w);
            alloc(&mut inputs, "text attention mask", mask_words(b, s), 1);
        }
        let rope = t.rope(l);
        let key = (rope.theta.to_bits(), rope.linear_factor.to_bits());
        if !ropes.contains(&key) {
            ropes.push(key);
            alloc(&mut inputs, "RoPE cos table", s, hd / 2);
            alloc(&mut inputs, "RoPE sin table", s, hd / 2);
        }
    }
    let vision = vision_shape(config, act, lora);
    if let Some(v) = &vision {
        // One image's pixels: channels · size² = patches · patch_dim values.
        alloc(
            &mut inputs,
            "pixel values",
            v.images,
            v.patches * v.patch_dim,
        );
    }
    let head_trained = lora.is_some_and(|l| l.modules_to_save.iter().any(|m| m == "lm_head"));
    let bf16_tables = lora.is_some_and(|l| l.modules_to_save_dtype == FloatDtype::BF16);
    let ce = cross_entropy_scratch(
        tokens,
        t.vocab_size as u64,
        h,
        act.max_binding_bytes,
        head_trained,
        bf16_tables,
    )?;
    let ckpt = act.gradient_checkpointing;
    let one = |name: &str, rows: u64, cols: u64| -> Vec<Alloc> {
        let mut l = Vec::new();
        alloc(&mut l, name, rows, cols);
        l
    };
    let placeholders = |n: u64| -> Vec<Alloc> {
        let mut l = Vec::new();
        matmul_placeholders(&mut l, n);
        l
    };

    // `Gemma3Gpu::accumulate`, phase by phase (each ends with a `Recorder::flush`).
    let mut tl = Timeline::default();
    tl.add(
        "inputs: token ids, positions, attention masks, RoPE tables, pixels",
        &inputs,
    );
    let text_inputs = if ckpt {
        "checkpointed text layer inputs (embeddings, layer outputs)"
    } else {
        "text layer inputs (embeddings, layer outputs)"
    };
    let mut x = tl.add(text_inputs, &one("text embeddings", tokens, h));

    // The image path (`Gemma3Gpu::embed`): SigLIP one image at a time, flushed after each
    // image's patch embedding, layer and post_layernorm, then the projector over every image.
    struct ImageKept {
        tower: TowerKept,
        projector: Vec<usize>,
    }
    let mut image = None;
    if let Some(v) = &vision {
        let kept = if ckpt {
            "image path kept for the backward (checkpointed SigLIP layer inputs, projector)"
        } else {
            "image path kept for the backward (SigLIP layer activations, projector)"
        };
        let (output, tower) = tower_forward(&mut tl, v, ckpt, kept);
        let rows = v.images * v.tokens_per_image;
        let hv = v.hidden;
        let mut projector = tl.add(kept, &one("projector pooled", rows, hv));
        tl.temps(&one("projector normed", rows, hv));
        projector.extend(tl.add(kept, &one("projector rstd", rows, 1)));
        tl.temps(&one("projector features", rows, v.text_hidden));
        tl.temps(&placeholders(1));
        if tower.is_none() {
            tl.release(&projector);
        }
        // `Gemma3Gpu::embed` drops the tower's output once the features are merged.
        tl.release(&output);
        tl.flush("the projector");
        image = tower.map(|tower| ImageKept { tower, projector });
    }

    // Text layers: each keeps its activations (or, checkpointed, only its input).
    let text_kept = "text layer activations kept for the backward";
    let (layer_cache, mut layer_temps) = text_layer_forward(&text);
    let layer_out = layer_temps.pop().expect("a layer has an output");
    // Under `bf16` each layer input is rounded through a bf16 copy, which a checkpointed step
    // keeps instead of the f32 input (dropped once the layer's forward is recorded).
    let mut bf16_input = Vec::new();
    alloc_bf16(&mut bf16_input, "text layer input", tokens, h);
    let mut saved = Vec::new();
    for l in 0..layers {
        let rounded = bf16_tables.then(|| tl.add(text_inputs, &bf16_input));
        let k = tl.add(text_kept, &layer_cache);
        tl.temps(&layer_temps);
        let o = tl.add(text_inputs, std::slice::from_ref(&layer_out));
        if ckpt {
            tl.release(&k);
        }
        tl.flush(&format!("text layer {l}'s forward"));
        match rounded {
            Some(r) if ckpt => {
                tl.release(&x);
                saved.push((r, k));
            }
            Some(r) => {
                tl.release(&r);
                saved.push((x, k));
            }
            None => saved.push((x, k)),
        }
        x = o;
    }

    // The loss: final norm, the fused lm_head + cross-entropy, the norm's backward.
    let mut loss_locals = Vec::new();
    alloc(&mut loss_locals, "final norm out", tokens, h);
    alloc(&mut loss_locals, "final norm rstd", tokens, 1);
    alloc(&mut loss_locals, "labels", tokens, 1);
    alloc(&mut loss_locals, "d final norm out", tokens, h);
    tl.temps(&loss_locals);
    tl.add("loss totals", &one("loss totals", 4, 1));
    let ce_group = format!(
        "fused lm_head + cross-entropy scratch ({} logits per token at a time)",
        ce[0].cols
    );
    let ce_ids = tl.add(&ce_group, &ce);
    tl.release(&ce_ids);
    let d_group = "hidden-state gradient";
    let mut d = tl.add(d_group, &one("d hidden states", tokens, h));
    tl.release(&x);
    tl.flush("the loss (final norm, fused lm_head + cross-entropy)");

    for l in (0..layers).rev() {
        let (input, k) = saved.pop().expect("one entry per layer");
        if ckpt {
            if bf16_tables {
                tl.temps(&one("text layer input widened from bf16", tokens, h));
            }
            tl.temps(&layer_cache);
            tl.temps(&layer_temps);
            tl.temps(std::slice::from_ref(&layer_out));
        }
        let mut back = text_layer_backward(&text);
        let dx = back.pop().expect("the input gradient");
        tl.temps(&back);
        let next = tl.add(d_group, &[dx]);
        tl.release(&d);
        tl.release(&input);
        tl.release(&k);
        tl.flush(&format!(
            "text layer {l}'s backward{}",
            if ckpt { " (forward recomputed)" } else { "" }
        ));
        d = next;
    }

    // The image features' gradient through the projector, then the tower image by image, layer
    // by layer.
    if let (Some(v), Some(img)) = (&vision, image) {
        let hv = v.hidden;
        let rows = v.images * v.tokens_per_image;
        tl.temps(&one("image features gradient", rows, v.text_hidden));
        tl.temps(&one("projector d normed", rows, hv));
        tl.temps(&placeholders(1));
        tl.temps(&one("projector d pooled", rows, hv));
        let d_vision = tl.add(
            "image path gradient",
            &one("projector d vision output", v.images * v.patches, hv),
        );
        tl.release(&img.projector);
        tl.flush("the projector's backward");
        tower_backward(&mut tl, v, ckpt, img.tower, &d_vision);
    }
    if embed_copy && bf16_tables {
        // ids grouped by row on the host (`embedding_scatter_add_bf16`): unique ids, their
        // offsets and the token positions; at most `tokens` each (an upper bound).
        tl.temps(&one("embedding-gradient unique ids", tokens, 1));
        tl.temps(&one("embedding-gradient id offsets", tokens + 1, 1));
        tl.temps(&one("embedding-gradient positions", tokens, 1));
    } else if embed_copy {
        tl.temps(&one("embedding-gradient ids", tokens, 1));
    }
    tl.flush("the embedding gradient");

    let rows = tl
        .at_peak
        .iter()
        .map(|(group, list)| activation_row(format!("{group} ({} buffers)", list.len()), list))
        .collect::<Vec<_>>();
    let mut rows = rows;
    if let Some(first) = rows.first_mut() {
        first.item = format!("[peak in {}] {}", tl.peak_phase, first.item);
    }
    let mut seen = std::collections::HashSet::new();
    let mut buffers: Vec<Buffer> = Vec::new();
    for a in &tl.seen {
        if seen.insert((a.name.clone(), a.rows, a.cols)) {
            buffers.push(Buffer {
                name: format!("{} [{}, {}] f32", a.name, a.rows, a.cols),
                bytes: a.bytes(),
                row_bytes: a.cols * 4,
                chunkable: false,
            });
        }
    }
    Ok((rows, buffers))
}
