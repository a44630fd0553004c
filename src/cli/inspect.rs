//! `highrise logits` and `highrise inspect`: what one forward pass computes, written to files.

use std::path::{Path, PathBuf};

use clap::Args;
use highrise::model::npy;
use serde_json::json;

use super::{load, AnyResult, ModelArgs};
use crate::figures;

#[derive(Args)]
pub struct LogitsArgs {
    #[arg(long, short)]
    pub prompt: String,
    /// The .npy file to write.
    #[arg(long, short)]
    pub out: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
}

#[derive(Args)]
pub struct InspectArgs {
    #[arg(long, short)]
    pub prompt: String,
    /// The folder to write (created if needed).
    #[arg(long, short)]
    pub out: PathBuf,
    /// Layers to capture, e.g. 0,5,29 (default: all).
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<usize>,
    /// Tokens per position in the logit lens.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub top_k: u32,
    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn run_logits(a: &LogitsArgs) -> AnyResult<()> {
    cmd_logits(&a.prompt, &a.out, &a.model)
}

pub fn run_inspect(a: &InspectArgs) -> AnyResult<()> {
    cmd_inspect(&a.prompt, &a.out, &a.layers, a.top_k as usize, &a.model)
}

fn cmd_logits(prompt: &str, out: &Path, args: &ModelArgs) -> AnyResult<()> {
    let (model, tok) = load(args)?;
    let ids = tok.encode(prompt, true)?;
    if ids.is_empty() {
        return Err("the prompt is empty".into());
    }
    let logits = model.prompt_logits(&ids)?;
    npy::write_f32(out, logits.dims(), &logits.to_f32()?)?;
    eprintln!("wrote {} float32 {:?}", out.display(), logits.dims());
    Ok(())
}

/// The most bytes of attention patterns `inspect` writes (attn_probs.npy, [layers, heads, T, T]
/// float32): past it a long prompt asks for fewer layers instead of filling the disk.
const MAX_ATTN_BYTES: u64 = 8 << 30;
/// The logit lens picture shows at most this many positions (the prompt's last ones); past it the
/// picture is wider than viewers show. logit_lens.json has every position.
const LENS_COLUMNS: usize = 200;

/// Refuses attention patterns past `MAX_ATTN_BYTES`, saying what one layer would take.
fn attention_fits(layers: usize, heads: usize, t: usize) -> Result<(), String> {
    let bytes = (layers * heads) as u64 * (t * t) as u64 * 4;
    let gib = |b: f64| b / (1u64 << 30) as f64;
    match bytes > MAX_ATTN_BYTES {
        false => Ok(()),
        true => Err(format!(
            "attn_probs.npy would take {:.1} GiB ({layers} layers x {heads} heads x {t} x {t} tokens, float32), more than the {} GiB \
             inspect writes: name fewer layers with --layers (one takes {:.2} GiB) or give a shorter prompt",
            gib(bytes as f64),
            MAX_ATTN_BYTES >> 30,
            gib(bytes as f64 / layers as f64)
        )),
    }
}

fn cmd_inspect(prompt: &str, out: &Path, layers: &[usize], top_k: usize, args: &ModelArgs) -> AnyResult<()> {
    use highrise::model::introspect::inspect;
    use highrise::model::Site;
    let (model, tok) = load(args)?;
    let ids = tok.encode(prompt, true)?;
    if ids.is_empty() {
        return Err("the prompt is empty".into());
    }
    let c = &model.config;
    let n = c.num_hidden_layers;
    // Each layer once, bottom to top, whatever order they were named in.
    let mut chosen: Vec<usize> = if layers.is_empty() { (0..n).collect() } else { layers.to_vec() };
    chosen.sort_unstable();
    chosen.dedup();
    if let Some(l) = chosen.iter().find(|&&l| l >= n) {
        return Err(format!("--layers: layer {l} does not exist (the model has {n})").into());
    }
    let (t, h, hq) = (ids.len(), c.hidden_size, c.num_attention_heads);
    if t > c.context_len() {
        return Err(format!("the prompt is {t} tokens, beyond the model's context of {}", c.context_len()).into());
    }
    attention_fits(chosen.len(), hq, t)?;
    let mut sites = Site::STREAM.to_vec();
    sites.extend([Site::FinalNorm, Site::Q, Site::K]);
    // A mixture of experts: its router's scores, and so each token's experts.
    let routed: Vec<usize> = chosen.iter().copied().filter(|&l| c.moe_layer(l)).collect();
    if !routed.is_empty() {
        sites.push(Site::Router);
    }
    // Attention patterns are made one layer at a time below: all of them at once would hold
    // layers x heads x T x T in memory.
    let pass = inspect(&model, &ids, &sites, &chosen, false, Some(top_k), vec![], vec![])?;
    let hooks = &pass.hooks;
    std::fs::create_dir_all(out)?;
    for site in Site::STREAM {
        let mut w = npy::NpyWriter::create(&out.join(format!("{}.npy", site.name())), &[chosen.len(), t, h])?;
        for &l in &chosen {
            w.write(hooks.get(site, l).unwrap_or_default())?;
        }
        w.finish()?;
    }
    npy::write_f32(&out.join("final_norm.npy"), &[t, h], hooks.get(Site::FinalNorm, n).unwrap_or_default())?;
    let text = figures::load_font();
    let attn_dir = out.join("attention");
    std::fs::create_dir_all(&attn_dir)?;
    // Pictures of layers an earlier run captured would be taken for this run's.
    for entry in std::fs::read_dir(&attn_dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("layer_") && name.ends_with(".png") {
            std::fs::remove_file(entry.path())?;
        }
    }
    let mut probs = npy::NpyWriter::create(&out.join("attn_probs.npy"), &[chosen.len(), hq, t, t])?;
    for &l in &chosen {
        let per_layer = pass.attention_probs(c, l);
        probs.write(&per_layer)?;
        figures::attention(&attn_dir.join(format!("layer_{l:02}.png")), l, &per_layer, hq, t, text)?;
    }
    probs.finish()?;
    let norms: Vec<f32> = chosen
        .iter()
        .map(|&l| {
            let x = hooks.get(Site::ResidPre, l).unwrap_or_default();
            x.chunks(h).map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt()).sum::<f32>() / t as f32
        })
        .collect();
    figures::residual_norms(&out.join("resid_norm.png"), &chosen, &norms, text)?;
    let mut lens = Vec::new();
    let mut cells = Vec::new();
    for (tops, &l) in pass.lens.iter().zip(&chosen) {
        cells.push(
            tops.iter()
                .map(|top| (tok.decode(&top.tokens[..1]).unwrap_or_default(), top.probs[0]))
                .collect::<Vec<_>>(),
        );
        let positions: Vec<serde_json::Value> = tops.iter().map(|top| top.json(&tok)).collect();
        lens.push(json!({"layer": l, "positions": positions}));
    }
    let input = tok.pieces(&ids);
    let from = t.saturating_sub(LENS_COLUMNS);
    let shown: Vec<Vec<_>> = cells.into_iter().map(|row| row[from..].to_vec()).collect();
    figures::logit_lens(&out.join("logit_lens.png"), &chosen, &input[from..], &shown, text)?;
    let lens = json!({"prompt_ids": ids, "prompt_tokens": &input, "layers": lens});
    std::fs::write(out.join("logit_lens.json"), serde_json::to_string_pretty(&lens)?)?;
    if !routed.is_empty() {
        write_routes(out, c, &routed, hooks, t, &input)?;
    }
    eprintln!(
        "wrote {}: resid_pre/attn_out/mlp_out/resid_post.npy [{}, {t}, {h}], final_norm.npy, attn_probs.npy, \
         logit_lens.json{}; pictures logit_lens.png{}, resid_norm.png, attention/layer_*.png{}",
        out.display(),
        chosen.len(),
        match routed.len() {
            0 => String::new(),
            n => format!(", router.npy [{n}, {t}, {}] and experts.json (the mixture layers' routing)", c.experts()),
        },
        if from > 0 { format!(" (the last {LENS_COLUMNS} of {t} positions)") } else { String::new() },
        if text { "" } else { " (no font found: drawn without labels)" }
    );
    Ok(())
}

/// A mixture's routing at the `routed` layers: `router.npy` [layers, T, E] (the router's scores
/// before the softmax) and `experts.json`, each position's experts and their weights as the forward
/// pass chose them (`highrise::core::ops::route`), heaviest first.
fn write_routes(out: &Path, c: &highrise::model::ModelConfig, routed: &[usize], hooks: &highrise::model::Hooks, t: usize, input: &[String]) -> AnyResult<()> {
    use highrise::model::Site;
    let e = c.experts();
    let mut w = npy::NpyWriter::create(&out.join("router.npy"), &[routed.len(), t, e])?;
    let mut layers = Vec::new();
    for &l in routed {
        let scores = hooks.get(Site::Router, l).unwrap_or_default();
        w.write(scores)?;
        let mut per_token: Vec<Vec<(usize, f32)>> = vec![Vec::new(); t];
        for (expert, (rows, weights)) in highrise::core::ops::route(scores, e, c.experts_per_token(), c.renormalize_experts()).into_iter().enumerate() {
            for (row, weight) in rows.into_iter().zip(weights) {
                per_token[row as usize].push((expert, weight));
            }
        }
        let positions: Vec<serde_json::Value> = per_token
            .into_iter()
            .map(|mut chosen| {
                chosen.sort_by(|a, b| b.1.total_cmp(&a.1));
                json!({"experts": chosen.iter().map(|c| c.0).collect::<Vec<_>>(), "weights": chosen.iter().map(|c| c.1).collect::<Vec<_>>()})
            })
            .collect();
        layers.push(json!({"layer": l, "positions": positions}));
    }
    w.finish()?;
    let routes = json!({"prompt_tokens": input, "experts": e, "experts_per_token": c.experts_per_token(), "layers": layers});
    std::fs::write(out.join("experts.json"), serde_json::to_string_pretty(&routes)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn attention_patterns_past_the_limit_are_refused_naming_the_sizes() {
        // SmolLM2-135M: 30 layers of 9 heads. 4096 tokens fit one layer (0.56 GiB), not all 30.
        assert!(super::attention_fits(1, 9, 4096).is_ok());
        let e = super::attention_fits(30, 9, 4096).unwrap_err();
        assert!(e.contains("16.9 GiB (30 layers x 9 heads x 4096 x 4096 tokens") && e.contains("one takes 0.56 GiB"), "{e}");
    }
}
