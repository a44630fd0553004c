//! The small commands: `tokenize`, `convert`, `backends` (and `fetch`, in main).

use std::path::{Path, PathBuf};

use clap::Args;
use highrise::model::{Source, Tokenizer};

use serde_json::json;

use super::{model_path, progress_bar, AnyResult};

#[derive(Args)]
pub struct TokenizeArgs {
    pub text: String,
    /// Print the ids as a JSON list.
    #[arg(long)]
    pub json: bool,
    /// A GGUF file or HF directory (default: the default model).
    #[arg(long, short)]
    pub model: Option<PathBuf>,
}

#[derive(Args)]
pub struct ConvertArgs {
    /// The GGUF file.
    pub input: PathBuf,
    /// The directory to write.
    pub output: PathBuf,
}

#[derive(Args)]
pub struct BackendsArgs {
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run_tokenize(a: TokenizeArgs) -> AnyResult<()> {
    cmd_tokenize(&a.text, a.json, a.model)
}

pub fn run_convert(a: &ConvertArgs) -> AnyResult<()> {
    cmd_convert(&a.input, &a.output)
}

pub fn run_backends(a: &BackendsArgs) -> AnyResult<()> {
    cmd_backends(a.json)
}

fn cmd_tokenize(text: &str, json: bool, model: Option<PathBuf>) -> AnyResult<()> {
    // The tokenizer alone: any GGUF whose vocabulary is supported, whatever its architecture.
    let tok = Tokenizer::open(&model_path(model.as_deref())?)?;
    let ids = tok.encode(text, false)?;
    if json {
        println!("{}", serde_json::to_string(&ids)?);
    } else {
        for id in ids {
            println!("{id}\t{:?}", tok.decode(&[id])?);
        }
    }
    Ok(())
}

fn cmd_convert(input: &Path, output: &Path) -> AnyResult<()> {
    let source = Source::open(input)?;
    let bar = progress_bar(source.tensor_names().len(), "converting tensors");
    highrise::model::convert::to_hf_dir(&source, output, &mut |done, _| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    eprintln!("wrote {} (model.safetensors, config.json, tokenizer.json, tokenizer_config.json)", output.display());
    Ok(())
}

pub fn run_models(a: &BackendsArgs) -> AnyResult<()> {
    use highrise::model::config::FAMILIES;
    let pre_tokenizers = highrise::model::tokenizer::pre_tokenizer_names();
    if a.json {
        let families: Vec<_> = FAMILIES.iter().map(|(name, what)| json!({"family": name, "models": what})).collect();
        println!(
            "{}",
            json!({"families": families, "tokenizers": {"gpt2": pre_tokenizers, "llama": ["sentencepiece"]}})
        );
        return Ok(());
    }
    println!("families (model_type / general.architecture), each checked against HF transformers' logits:");
    let width = FAMILIES.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    for (name, what) in FAMILIES {
        println!("  {name:<width$} {what}");
    }
    println!("tokenizers (tokenizer.ggml.model); llama-spm, llama-bpe, gpt-2, starcoder, refact, command-r, qwen2,");
    println!("qwen35, deepseek-llm, deepseek-coder, falcon, mpt and phi-3 checked against llama.cpp's test vectors:");
    println!("  llama    SentencePiece: scores, byte fallback, the \u{2581} space marker (U+2581)");
    println!("  gpt2     byte-level BPE, with the pre-tokenizer tokenizer.ggml.pre names:");
    for line in pre_tokenizers.chunks(8) {
        println!("           {}", line.join(", "));
    }
    Ok(())
}

fn cmd_backends(json: bool) -> AnyResult<()> {
    use highrise::core::plugin::{backend_file_name, discover, Plugin};
    for (name, path) in discover() {
        let (usable, detail) = match &path {
            None => (false, format!("not built: no {} found", backend_file_name(&name))),
            Some(p) => match Plugin::open(p).and_then(|pl| {
                pl.probe()?;
                pl.create()
            }) {
                Ok(b) => (true, b.info().device),
                Err(e) => (false, e.to_string()),
            },
        };
        let path = path.map(|p| p.display().to_string());
        if json {
            println!("{}", json!({"name": name, "usable": usable, "detail": detail, "path": path}));
        } else {
            println!("{name:<6} {:<9} {detail}", if usable { "usable" } else { "unusable" });
            if let Some(p) = path {
                println!("{:<16} {p}", "");
            }
        }
    }
    Ok(())
}
