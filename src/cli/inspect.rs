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
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn run_logits(a: &LogitsArgs) -> AnyResult<()> {
    cmd_logits(&a.prompt, &a.out, &a.model)
}

pub fn run_inspect(a: &InspectArgs) -> AnyResult<()> {
    cmd_inspect(&a.prompt, &a.out, &a.layers, a.top_k, &a.model)
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
    let chosen: Vec<usize> = if layers.is_empty() { (0..n).collect() } else { layers.to_vec() };
    if let Some(l) = chosen.iter().find(|&&l| l >= n) {
        return Err(format!("--layers: layer {l} does not exist (the model has {n})").into());
    }
    let mut sites = Site::STREAM.to_vec();
    sites.push(Site::FinalNorm);
    let pass = inspect(&model, &ids, &sites, &chosen, true, Some(top_k))?;
    let hooks = &pass.hooks;
    std::fs::create_dir_all(out)?;
    let (t, h) = (ids.len(), c.hidden_size);
    for site in Site::STREAM {
        let data: Vec<f32> = chosen.iter().flat_map(|&l| hooks.get(site, l).unwrap_or_default().to_vec()).collect();
        npy::write_f32(&out.join(format!("{}.npy", site.name())), &[chosen.len(), t, h], &data)?;
    }
    npy::write_f32(&out.join("final_norm.npy"), &[t, h], hooks.get(Site::FinalNorm, n).unwrap_or_default())?;
    let hq = c.num_attention_heads;
    let probs: Vec<f32> = pass.attn_probs.concat();
    npy::write_f32(&out.join("attn_probs.npy"), &[chosen.len(), hq, t, t], &probs)?;
    let text = figures::load_font();
    let attn_dir = out.join("attention");
    std::fs::create_dir_all(&attn_dir)?;
    for (per_layer, &l) in pass.attn_probs.iter().zip(&chosen) {
        figures::attention(&attn_dir.join(format!("layer_{l:02}.png")), l, per_layer, hq, t, text)?;
    }
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
    figures::logit_lens(&out.join("logit_lens.png"), &chosen, &input, &cells, text)?;
    let lens = json!({"prompt_ids": ids, "prompt_tokens": input, "layers": lens});
    std::fs::write(out.join("logit_lens.json"), serde_json::to_string_pretty(&lens)?)?;
    eprintln!(
        "wrote {}: resid_pre/attn_out/mlp_out/resid_post.npy [{}, {t}, {h}], final_norm.npy, attn_probs.npy, \
         logit_lens.json; pictures logit_lens.png, resid_norm.png, attention/layer_*.png{}",
        out.display(),
        chosen.len(),
        if text { "" } else { " (no font found: drawn without labels)" }
    );
    Ok(())
}
