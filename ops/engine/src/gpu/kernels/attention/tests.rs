use super::*;
use crate::gpu::testing::{rel_frobenius, test_gpu, TestRng};
use crate::reference::attention::{attention_backward, attention_forward, image_group_ids};

struct Case {
    dims: AttentionDims,
    causal: bool,
    window: Option<usize>,
    images: bool,
    padding: Option<bool>, // Some(left?)
    scale: f32,
}

fn token_types(rng: &mut TestRng, batch: usize, seq: usize) -> Vec<u32> {
    let mut tt = vec![0u32; batch * seq];
    for b in 0..batch {
        // two images per sample, so grouping per image matters
        let a = rng.below(seq / 3);
        let len_a = 1 + rng.below(seq / 4);
        let c = (a + len_a + rng.below(2)).min(seq - 1);
        let len_c = 1 + rng.below(seq / 4);
        for t in (a..a + len_a).chain(c..c + len_c) {
            if t < seq {
                tt[b * seq + t] = 1;
            }
        }
    }
    tt
}

fn padding(rng: &mut TestRng, batch: usize, seq: usize, left: bool) -> Vec<u32> {
    let mut pad = vec![1u32; batch * seq];
    for b in 1..batch {
        for t in 0..1 + rng.below(seq / 2) {
            pad[b * seq + if left { t } else { seq - 1 - t }] = 0;
        }
    }
    pad
}

fn run(gpu: &Gpu, case: &Case, rng: &mut TestRng, seed: u64) {
    let d = case.dims;
    let tt = case.images.then(|| token_types(rng, d.batch, d.seq));
    let groups = tt
        .as_ref()
        .map(|t| image_group_ids(t, d.batch, d.seq).unwrap());
    let pad = case.padding.map(|left| padding(rng, d.batch, d.seq, left));
    let mask = AttentionMask {
        causal: case.causal,
        sliding_window: case.window,
        image_groups: groups.as_deref(),
        key_padding: pad.as_deref(),
    };
    let (q, k, v) = (
        rng.vec_normal(d.q_len()),
        rng.vec_normal(d.kv_len()),
        rng.vec_normal(d.kv_len()),
    );
    let d_out = rng.vec_normal(d.q_len());
    let (want_out, want_lse) = attention_forward(&q, &k, &v, &d, &mask, case.scale).unwrap();
    let (want_dq, want_dk, want_dv) = attention_backward(
        &q, &k, &v, &want_out, &want_lse, &d_out, &d, &mask, case.scale,
    )
    .unwrap();

    let up = |x: &[f32]| gpu.upload_f32(&[x.len()], x).unwrap();
    let (qg, kg, vg, dog) = (up(&q), up(&k), up(&v), up(&d_out));
    let poisoned = |n: usize| {
        let t = gpu.empty(&[n], DType::F32).unwrap();
        gpu.poison(&t);
        t
    };
    let (out, lse) = (poisoned(d.q_len()), poisoned(d.lse_len()));
    let (dq, dk, dv) = (
        poisoned(d.q_len()),
        poisoned(d.kv_len()),
        poisoned(d.kv_len()),
    );
    let mask_gpu = gpu.attention_mask(&d, &mask).unwrap();
    let mut rec = Recorder::new(gpu);
    gpu.attention_forward(&mut rec, &qg, &kg, &vg, &mask_gpu, case.scale, &out, &lse)
        .unwrap();
    let grads = AttentionGrads {
        q: &qg,
        k: &kg,
        v: &vg,
        out: &out,
        lse: &lse,
        d_out: &dog,
    };
    gpu.attention_backward(&mut rec, &grads, &mask_gpu, case.scale, &dq, &dk, &dv)
        .unwrap();
    rec.submit();

    let what = format!(
        "seed {seed}: {d:?} causal {} window {:?} images {} padding {:?}",
        case.causal, case.window, case.images, case.padding
    );
    let got_lse = gpu.read_f32(&lse).unwrap();
    let (mut finite_got, mut finite_want) = (vec![], vec![]);
    for (g, w) in got_lse.iter().zip(&want_lse) {
        if w.is_infinite() {
            assert_eq!(
                *g,
                f32::INFINITY,
                "{what}: a fully masked row must have lse +inf"
            );
        } else {
            finite_got.push(*g);
            finite_want.push(*w);
        }
    }
    let errs = [
        (
            "out",
            rel_frobenius(&gpu.read_f32(&out).unwrap(), &want_out),
        ),
        ("lse", rel_frobenius(&finite_got, &finite_want)),
        ("dq", rel_frobenius(&gpu.read_f32(&dq).unwrap(), &want_dq)),
        ("dk", rel_frobenius(&gpu.read_f32(&dk).unwrap(), &want_dk)),
        ("dv", rel_frobenius(&gpu.read_f32(&dv).unwrap(), &want_dv)),
    ];
    for (name, err) in errs {
        assert!(err < 2e-5, "{what}: {name} rel error {err}");
    }
}

thread_local! {
    /// Set by a test to run the general kernels where the subgroup kernels would run.
    pub(super) static GENERAL_KERNELS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The text-mask sweep with the subgroup kernels reading storage buffers (the fallback when
/// staging is impossible), where the default stages Q, K, V and dO in textures. The wide-head
/// sweep is left out: the two variants differ only in their binding sections, and the
/// head_dim-256 kernels cost minutes of compile with an empty Mesa cache (as on CI).
#[test]
fn unstaged_subgroup_kernels_match_the_reference() {
    if !subgroup_kernels_fit(test_gpu()) {
        eprintln!("no subgroup kernels on this adapter");
        return;
    }
    crate::gpu::staging::without_staging(text_masks_match_the_reference);
}

thread_local! {
    /// Set by a test to sum over lanes through workgroup memory where subgroups would.
    pub(super) static NO_SUBGROUPS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Both test sweeps with the general kernels summing over lanes through workgroup memory:
/// what adapters without subgroups (or with subgroups narrower than 8 lanes) run.
#[test]
fn general_kernels_without_subgroups_match_the_reference() {
    GENERAL_KERNELS.with(|f| f.set(true));
    NO_SUBGROUPS.with(|f| f.set(true));
    text_masks_match_the_reference();
    vision_and_wide_heads_match_the_reference();
    NO_SUBGROUPS.with(|f| f.set(false));
    GENERAL_KERNELS.with(|f| f.set(false));
}

/// Both test sweeps with the general kernels, where the default runs the subgroup ones.
#[test]
fn general_kernels_match_the_reference() {
    if !subgroup_kernels_fit(test_gpu()) {
        eprintln!("the default tests already run the general kernels here");
        return;
    }
    GENERAL_KERNELS.with(|f| f.set(true));
    text_masks_match_the_reference();
    vision_and_wide_heads_match_the_reference();
    GENERAL_KERNELS.with(|f| f.set(false));
}

#[test]
fn text_masks_match_the_reference() {
    let gpu = test_gpu();
    let seed = TestRng::fresh_seed();
    let mut rng = TestRng::new(seed);
    // seq and head_dim deliberately not multiples of the 8-row blocks or the 8 lanes' vec4s
    let dims = AttentionDims {
        batch: 3,
        seq: 19,
        q_heads: 4,
        kv_heads: 2,
        head_dim: 20,
    };
    let cases = [
        Case {
            dims,
            causal: true,
            window: None,
            images: false,
            padding: None,
            scale: 0.3,
        },
        Case {
            dims,
            causal: true,
            window: Some(5),
            images: false,
            padding: None,
            scale: 0.3,
        },
        Case {
            dims,
            causal: true,
            window: None,
            images: true,
            padding: Some(false),
            scale: 0.25,
        },
        Case {
            dims,
            causal: true,
            window: Some(4),
            images: true,
            padding: Some(true),
            scale: 0.25,
        },
    ];
    // 4 and 3 q heads per kv head: the subgroup kernels pair heads of a group (several
    // pairs per kv head), or take one head per workgroup when the group is odd
    let grouped = |q_heads| Case {
        dims: AttentionDims {
            batch: 2,
            seq: 21,
            q_heads,
            kv_heads: 1,
            head_dim: 36,
        },
        causal: true,
        window: Some(7),
        images: true,
        padding: Some(false),
        scale: 0.2,
    };
    for case in cases.iter().chain(&[grouped(4), grouped(3)]) {
        run(gpu, case, &mut rng, seed);
    }
}

#[test]
fn vision_and_wide_heads_match_the_reference() {
    let gpu = test_gpu();
    let seed = TestRng::fresh_seed();
    let mut rng = TestRng::new(seed);
    let cases = [
        // SigLIP: full attention, head_dim 72
        Case {
            dims: AttentionDims {
                batch: 2,
                seq: 13,
                q_heads: 3,
                kv_heads: 3,
                head_dim: 72,
            },
            causal: false,
            window: None,
            images: false,
            padding: None,
            scale: 72f32.powf(-0.5),
        },
        Case {
            dims: AttentionDims {
                batch: 2,
                seq: 10,
                q_heads: 2,
                kv_heads: 2,
                head_dim: 12,
            },
            causal: false,
            window: None,
            images: false,
            padding: Some(false),
            scale: 0.5,
        },
        // Gemma 3: head_dim 256, 2 q heads per kv head
        Case {
            dims: AttentionDims {
                batch: 1,
                seq: 11,
                q_heads: 4,
                kv_heads: 2,
                head_dim: 256,
            },
            causal: true,
            window: Some(6),
            images: true,
            padding: None,
            scale: 0.0625,
        },
    ];
    for case in &cases {
        run(gpu, case, &mut rng, seed);
    }
}

#[test]
fn ranges_cover_every_visible_pair() {
    let seed = TestRng::fresh_seed();
    let mut rng = TestRng::new(seed);
    let dims = AttentionDims {
        batch: 2,
        seq: 37,
        q_heads: 1,
        kv_heads: 1,
        head_dim: 4,
    };
    let tt = token_types(&mut rng, 2, 37);
    let groups = image_group_ids(&tt, 2, 37).unwrap();
    for (causal, window) in [(true, None), (true, Some(3)), (false, None)] {
        let mask = AttentionMask {
            causal,
            sliding_window: window,
            image_groups: Some(&groups),
            key_padding: None,
        };
        let (words, q_blocks, k_blocks, q_off, k_off) = mask_words(&dims, &mask).unwrap();
        assert_eq!(
            words.len(),
            mask_word_count(2, 37),
            "the memory plan's mask size"
        );
        for b in 0..2 {
            for q in 0..37 {
                for kv in 0..37 {
                    if mask.allows(37, b, q, kv) {
                        let qr = &words[q_off + (b * q_blocks + q / ROWS) * 2..][..2];
                        let kr = &words[k_off + (b * k_blocks + kv / ROWS) * 2..][..2];
                        assert!(
                            qr[0] as usize <= kv && kv < qr[1] as usize,
                            "seed {seed}: key {kv} outside {qr:?} of query {q}"
                        );
                        assert!(
                            kr[0] as usize <= q && q < kr[1] as usize,
                            "seed {seed}: query {q} outside {kr:?} of key {kv}"
                        );
                    }
                }
            }
        }
    }
}

/// Right padding longer than the sliding window leaves padded queries with no visible key:
/// after the fix-up those rows hold the mean of V as transformers' eager attention gives.
#[test]
fn eager_masked_rows_match_the_reference() {
    use crate::reference::attention::eager_fully_masked_rows;
    let gpu = test_gpu();
    let seed = TestRng::fresh_seed();
    let mut rng = TestRng::new(seed);
    let dims = AttentionDims {
        batch: 2,
        seq: 19,
        q_heads: 4,
        kv_heads: 2,
        head_dim: 12,
    };
    let mut pad = vec![1u32; dims.batch * dims.seq];
    for t in 9 + rng.below(3)..dims.seq {
        pad[dims.seq + t] = 0;
    }
    let mask = AttentionMask {
        causal: true,
        sliding_window: Some(4),
        image_groups: None,
        key_padding: Some(&pad),
    };
    let (q, k, v) = (
        rng.vec_normal(dims.q_len()),
        rng.vec_normal(dims.kv_len()),
        rng.vec_normal(dims.kv_len()),
    );
    let (mut want, lse) = attention_forward(&q, &k, &v, &dims, &mask, 0.3).unwrap();
    assert!(
        lse.iter().any(|l| l.is_infinite()),
        "some row is fully masked"
    );
    eager_fully_masked_rows(&mut want, &v, &lse, &dims);
    let m = gpu.attention_mask(&dims, &mask).unwrap();
    let up = |x: &[f32]| gpu.upload_f32(&[x.len()], x).unwrap();
    let (qg, kg, vg) = (up(&q), up(&k), up(&v));
    let out = gpu.empty(&[dims.q_len()], DType::F32).unwrap();
    let lse_g = gpu.empty(&[dims.lse_len()], DType::F32).unwrap();
    gpu.poison(&out);
    let mut rec = Recorder::new(gpu);
    gpu.attention_forward(&mut rec, &qg, &kg, &vg, &m, 0.3, &out, &lse_g)
        .unwrap();
    gpu.attention_eager_masked_rows(&mut rec, &vg, &lse_g, &m, &out)
        .unwrap();
    rec.submit_and_wait().unwrap();
    let e = rel_frobenius(&gpu.read_f32(&out).unwrap(), &want);
    assert!(e < 1e-5, "rel err {e} (seed {seed})");
}
