//! Introspection against HuggingFace's own activations (../shared/fixtures/smollm2): the residual
//! stream at every layer, the final norm, attention patterns recomputed from captured Q and K; the
//! logit lens; steering and activation patching; captures of a sequence inside a batch.

mod common;

use std::sync::OnceLock;

use common::*;
use highrise::core::ops::PagedSeq;
use highrise::core::DType;
use highrise::model::introspect::{attention_probs, logit_lens};
use highrise::model::npy;
use highrise::model::{Batch, Hooks, Llama, LoadOptions, Logits, Patch, Site, Source, Steer, WeightFormat};

/// f32 weights, as the fixtures were made.
fn model(path: &std::path::Path) -> &'static Llama {
    static M: OnceLock<Llama> = OnceLock::new();
    M.get_or_init(|| {
        let source = Source::open(path).unwrap();
        Llama::load(&source, cpu(), LoadOptions { weights: WeightFormat::Convert(DType::F32), ..Default::default() }).unwrap()
    })
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

#[test]
fn residual_stream_and_attention_patterns_match_hf() {
    let Some((fx, path, reference)) = fixtures_and_model("introspection") else { return };
    let m = model(&path);
    let (layers, h) = (m.config.num_hidden_layers, m.config.hidden_size);
    let (hq, hkv, d) = (m.config.num_attention_heads, m.config.kv_heads(), m.config.head_dim());
    for name in ["story", "chat"] {
        let prompt = ids(&reference["cases"][name]["input_ids"]);
        let t = prompt.len();
        let mut sites: Vec<Site> = Site::STREAM.to_vec();
        sites.extend([Site::Q, Site::K, Site::FinalNorm]);
        let mut hooks = Hooks::capture_all(&sites);
        m.prefill_hooked(&prompt, Logits::Last, Some(&mut hooks)).unwrap();
        // The largest magnitude each (position, dim) of the stream reaches in any layer.
        let mut peak = vec![0f32; t * h];
        for site in Site::STREAM {
            let (_, want) = npy::read_f32(&fx.join(format!("{name}_{}.npy", site.name()))).unwrap();
            for (i, w) in want.iter().enumerate() {
                peak[i % (t * h)] = peak[i % (t * h)].max(w.abs());
            }
        }
        for site in Site::STREAM {
            let (dims, want) = npy::read_f32(&fx.join(format!("{name}_{}.npy", site.name()))).unwrap();
            assert_eq!(dims, vec![layers, t, h]);
            let got: Vec<f32> = (0..layers).flat_map(|l| hooks.get(site, l).unwrap().to_vec()).collect();
            // 1e-3 absolute, as the fixtures README asks, where the stream is small. Where it is large
            // that cannot hold for any f32 implementation that sums in another order: SmolLM2's stream
            // carries "massive activations" up to ~22000 (f32 spacing 2e-3) and the last layers' MLP
            // outputs reach hundreds, and the rounding of those large sums stays in the stream after
            // it shrinks again. There the bound is 1e-5 of the largest magnitude that element (this
            // position and dim) reaches in any layer.
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let tol = 1e-3f32.max(1e-5 * peak[i % (t * h)]);
                assert!(
                    (g - w).abs() <= tol,
                    "{name} {} layer {} position {} dim {}: ours {g}, HF {w}",
                    site.name(),
                    i / (t * h),
                    i / h % t,
                    i % h
                );
            }
            let small = got.iter().zip(&want).filter(|(_, w)| w.abs() < 100.0).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
            println!("{name} {}: max diff {:.2e} overall, {small:.2e} where |value| < 100", site.name(), max_diff(&got, &want));
        }
        let (_, want) = npy::read_f32(&fx.join(format!("{name}_final_norm.npy"))).unwrap();
        let worst = max_diff(hooks.get(Site::FinalNorm, layers).unwrap(), &want);
        assert!(worst <= 1e-3, "{name} final norm differs by {worst}");
        let (dims, want) = npy::read_f32(&fx.join(format!("{name}_attn_probs.npy"))).unwrap();
        assert_eq!(dims, vec![layers, hq, t, t]);
        let got: Vec<f32> = (0..layers)
            .flat_map(|l| attention_probs(hooks.get(Site::Q, l).unwrap(), hooks.get(Site::K, l).unwrap(), [hq, hkv, d], m.config.scores(l)))
            .collect();
        let worst = max_diff(&got, &want);
        println!("{name} attn_probs: max diff {worst:.2e}");
        assert!(worst <= 1e-4, "{name} attention probabilities differ from HF by {worst}");
    }
}

#[test]
fn logit_lens_at_the_last_layer_is_the_models_own_logits() {
    let Some((_, path, reference)) = fixtures_and_model("logit lens") else { return };
    let m = model(&path);
    let prompt = ids(&reference["cases"]["story"]["input_ids"]);
    let mut hooks = Hooks::capture_all(&[Site::ResidPost]);
    let logits = m.prefill_hooked(&prompt, Logits::All, Some(&mut hooks)).unwrap().to_f32().unwrap();
    let last = m.config.num_hidden_layers - 1;
    let lens = logit_lens(m, hooks.get(Site::ResidPost, last).unwrap(), 5).unwrap();
    let v = m.config.vocab_size;
    for (pos, top) in lens.iter().enumerate() {
        assert_eq!(top.tokens[0], highrise::engine::sampling::argmax(&logits[pos * v..(pos + 1) * v]), "position {pos}");
        assert!(top.probs.windows(2).all(|w| w[0] >= w[1]));
    }
    let want = ids(&reference["cases"]["story"]["last_top5"]);
    assert_eq!(lens.last().unwrap().tokens, want, "the lens's top 5 after the prompt are HF's");
}

#[test]
fn steering_and_patching() {
    let Some((_, path, reference)) = fixtures_and_model("steering") else { return };
    let m = model(&path);
    let h = m.config.hidden_size;
    let a = ids(&reference["cases"]["story"]["input_ids"]);
    let plain = m.prompt_logits(&a).unwrap().to_f32().unwrap();
    let run = |tokens: &[u32], hooks: &mut Hooks| m.prefill_hooked(tokens, Logits::All, Some(hooks)).unwrap().to_f32().unwrap();

    // A zero vector changes nothing; a large one changes the prediction.
    let zero = Steer { layer: 5, vector: vec![0.0; h], scale: 10.0, positions: None };
    assert_eq!(run(&a, &mut Hooks { steer: vec![zero], ..Default::default() }), plain);
    let mut rng = Rng::new("steering");
    let big: Vec<f32> = (0..h).map(|_| rng.uniform() as f32).collect();
    let steered = run(&a, &mut Hooks { steer: vec![Steer { layer: 5, vector: big, scale: 50.0, positions: None }], ..Default::default() });
    let v = m.config.vocab_size;
    let last = |l: &[f32]| highrise::engine::sampling::argmax(&l[l.len() - v..]);
    assert_ne!(last(&steered), last(&plain), "a large steering vector changes the next token");

    // Patching a run with its own activations changes nothing.
    let mut saved = Hooks::capture_all(&[Site::ResidPre]);
    run(&a, &mut saved);
    let own: Vec<Patch> = (0..a.len())
        .map(|p| Patch { layer: 7, position: p, values: saved.get(Site::ResidPre, 7).unwrap()[p * h..(p + 1) * h].to_vec(), site: Site::ResidPre })
        .collect();
    assert_eq!(run(&a, &mut Hooks { patch: own, ..Default::default() }), plain);

    // Patching every position at layer 0 with another prompt's stream reproduces that prompt.
    let mut b = a.clone();
    b[2] = 1838; // a different token, same length
    let mut other = Hooks::capture_all(&[Site::ResidPre]);
    let b_logits = run(&b, &mut other);
    let from_b: Vec<Patch> = (0..b.len())
        .map(|p| Patch { layer: 0, position: p, values: other.get(Site::ResidPre, 0).unwrap()[p * h..(p + 1) * h].to_vec(), site: Site::ResidPre })
        .collect();
    let patched = run(&a, &mut Hooks { patch: from_b, ..Default::default() });
    assert!(max_diff(&patched, &b_logits) <= 1e-5, "patched run reproduces the other prompt's logits");
    assert!(max_diff(&patched, &plain) > 1e-2, "and differs from its own");
}

#[test]
fn captures_in_a_batch_of_eight_equal_alone() {
    let Some((_, path, reference)) = fixtures_and_model("batched captures") else { return };
    let m = model(&path);
    let target = ids(&reference["cases"]["story"]["input_ids"]);
    let mut alone = Hooks::capture_all(&Site::STREAM);
    m.prefill_hooked(&target, Logits::Last, Some(&mut alone)).unwrap();
    // Eight sequences in one batch, the target fourth; the others are shifted copies of the chat prompt.
    let chat = ids(&reference["cases"]["chat"]["input_ids"]);
    let seqs_tokens: Vec<Vec<u32>> = (0..8).map(|i| if i == 3 { target.clone() } else { chat[i..i + 5 + i].to_vec() }).collect();
    let (mut tokens, mut positions, mut slots, mut seqs, mut table) = (vec![], vec![], vec![], vec![], vec![]);
    let bs = 16;
    let mut block = 0u32;
    for s in &seqs_tokens {
        let n = s.len();
        let blocks: Vec<u32> = (0..n.div_ceil(bs) as u32).map(|b| block + b).collect();
        seqs.push(PagedSeq { q_len: n as u32, context_len: n as u32, blocks_start: table.len() as u32 });
        for p in 0..n {
            tokens.push(s[p]);
            positions.push(p as u32);
            slots.push(blocks[p / bs] * bs as u32 + (p % bs) as u32);
        }
        block += blocks.len() as u32;
        table.extend(blocks);
    }
    let mut cache = m.new_kv_cache(block as usize, bs).unwrap();
    let mut batched = Hooks::capture_all(&Site::STREAM);
    let batch = Batch { tokens: &tokens, positions: &positions, slots: &slots, seqs: &seqs, block_table: &table };
    m.forward_hooked(&batch, &mut cache, Logits::Last, Some(&mut batched)).unwrap();
    let h = m.config.hidden_size;
    let start: usize = seqs_tokens[..3].iter().map(|s| s.len()).sum();
    for site in Site::STREAM {
        for l in 0..m.config.num_hidden_layers {
            let rows = &batched.get(site, l).unwrap()[start * h..(start + target.len()) * h];
            let worst = max_diff(rows, alone.get(site, l).unwrap());
            assert!(worst <= 1e-5, "{} layer {l}: batch vs alone differ by {worst}", site.name());
        }
    }
}

#[test]
fn kv_stream_view_follows_the_block_table() {
    let Some((_, path, reference)) = fixtures_and_model("kv view") else { return };
    let m = model(&path);
    let prompt = ids(&reference["cases"]["chat"]["input_ids"]);
    let n = prompt.len();
    let bs = 16;
    let mut cache = m.new_kv_cache(n.div_ceil(bs) + 2, bs).unwrap();
    // Blocks out of order, so the view must follow the table.
    let table: Vec<u32> = (0..n.div_ceil(bs) as u32).map(|b| b * 2 % (cache.num_blocks as u32)).rev().collect();
    let positions: Vec<u32> = (0..n as u32).collect();
    let slots: Vec<u32> = (0..n).map(|p| table[p / bs] * bs as u32 + (p % bs) as u32).collect();
    let seqs = [PagedSeq { q_len: n as u32, context_len: n as u32, blocks_start: 0 }];
    let batch = Batch { tokens: &prompt, positions: &positions, slots: &slots, seqs: &seqs, block_table: &table };
    let mut hooks = Hooks::capture_all(&[Site::K, Site::V]);
    m.forward_hooked(&batch, &mut cache, Logits::Last, Some(&mut hooks)).unwrap();
    for l in [0, 13, 29] {
        let (k, v) = cache.sequence_view(l, &table, n).unwrap();
        assert_eq!(k, hooks.get(Site::K, l).unwrap(), "layer {l}: K through the table");
        assert_eq!(v, hooks.get(Site::V, l).unwrap(), "layer {l}: V through the table");
    }
    assert!(cache.sequence_view(30, &table, n).is_err());
}

/// Captures taken on the backend and read after the pass (`Hooks::defer`) equal captures read as the
/// pass reaches them, step after step of decoding (on the CPU: no graphs, the same copies).
#[test]
fn deferred_captures_equal_captures_read_at_once() {
    assert_eq!(common::deferred_captures_in_graphs_match(&common::cpu()), 0, "the cpu backend runs no graphs");
}
