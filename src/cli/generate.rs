//! `highrise generate` and `highrise chat`: text from the model, streamed as it comes.

use std::io::IsTerminal;
use std::path::Path;

use clap::Args;
use highrise::engine::{generate, Generation};
use highrise::model::{npy, Llama, Message};
use serde_json::json;

use super::{load, print_stream, AnyResult, ModelArgs, SamplingArgs};

#[derive(Args)]
pub struct GenerateArgs {
    /// The text to continue.
    #[arg(long, short)]
    pub prompt: String,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print one JSON object: prompt_ids, ids, text, finish_reason, timings.
    #[arg(long)]
    pub json: bool,
    /// Steer: add SCALE times the vector in VECTOR.npy (float32 [hidden]) to the residual stream
    /// entering LAYER, at every token (repeatable). Format LAYER:VECTOR.npy:SCALE.
    #[arg(long, value_name = "LAYER:VECTOR.npy:SCALE")]
    pub steer: Vec<String>,
}

#[derive(Args)]
pub struct ChatArgs {
    /// The user's message.
    pub message: Option<String>,
    /// A system prompt (otherwise the template's default, if it has one).
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

pub fn run_generate(a: &GenerateArgs) -> AnyResult<()> {
    cmd_generate(&a.prompt, &a.model, &a.sampling, a.json, &a.steer)
}

pub fn run_chat(a: ChatArgs) -> AnyResult<()> {
    cmd_chat(a.message, a.system, &a.model, &a.sampling)
}

/// "LAYER:VECTOR.npy:SCALE" as a steering vector, checked against the model.
fn parse_steer(spec: &str, model: &Llama) -> AnyResult<highrise::model::Steer> {
    let bad = |why: &str| format!("--steer {spec:?}: {why} (expected LAYER:VECTOR.npy:SCALE)");
    let (layer, rest) = spec.split_once(':').ok_or_else(|| bad("no layer"))?;
    let (path, scale) = rest.rsplit_once(':').ok_or_else(|| bad("no scale"))?;
    let layer: usize = layer.parse().map_err(|_| bad("the layer is not a number"))?;
    let scale: f32 = scale.parse().map_err(|_| bad("the scale is not a number"))?;
    let n = model.config.num_hidden_layers;
    if layer >= n {
        return Err(bad(&format!("the model has {n} layers")).into());
    }
    let (dims, vector) = npy::read_f32(Path::new(path))?;
    if vector.len() != model.config.hidden_size {
        return Err(bad(&format!("{path} holds {dims:?}, the residual stream is {}", model.config.hidden_size)).into());
    }
    Ok(highrise::model::Steer { layer, vector, scale, positions: None })
}

fn cmd_generate(prompt: &str, args: &ModelArgs, sampling: &SamplingArgs, json: bool, steer: &[String]) -> AnyResult<()> {
    let (model, tok) = load(args)?;
    let ids = tok.encode(prompt, true)?;
    let mut params = sampling.params();
    params.steer = steer.iter().map(|s| parse_steer(s, &model)).collect::<AnyResult<_>>()?;
    let mut sink = |piece: &str| {
        if !json {
            print_stream(piece)
        }
    };
    let g = generate(&model, &tok, &ids, &params, &mut sink)?;
    if json {
        println!("{}", generation_json(&g));
    } else {
        println!();
        report_speed(&g);
    }
    Ok(())
}

fn generation_json(g: &Generation) -> serde_json::Value {
    json!({
        "prompt_ids": g.prompt_ids,
        "ids": g.ids,
        "text": g.text,
        "finish_reason": g.finish_reason,
        "timings": {
            "prefill_tokens": g.prompt_ids.len(),
            "prefill_seconds": g.prefill_secs,
            "prefill_tokens_per_second": g.prefill_tokens_per_sec(),
            "decode_tokens": g.ids.len().saturating_sub(1),
            "decode_seconds": g.decode_secs,
            "decode_tokens_per_second": g.decode_tokens_per_sec(),
        },
    })
}

fn report_speed(g: &Generation) {
    eprintln!(
        "[prefill {} tokens at {:.1} tok/s, decode {} tokens at {:.1} tok/s]",
        g.prompt_ids.len(),
        g.prefill_tokens_per_sec(),
        g.ids.len().saturating_sub(1),
        g.decode_tokens_per_sec()
    );
}

fn cmd_chat(message: Option<String>, system: Option<String>, args: &ModelArgs, sampling: &SamplingArgs) -> AnyResult<()> {
    let (model, tok) = load(args)?;
    let mut history: Vec<Message> = system.iter().map(|s| Message::new("system", s)).collect();
    let turn = |history: &mut Vec<Message>, user: &str| -> AnyResult<()> {
        history.push(Message::new("user", user));
        let text = tok.apply_chat_template(history, true)?;
        let ids = tok.encode(&text, false)?;
        let g = generate(&model, &tok, &ids, &sampling.params(), &mut print_stream)?;
        println!();
        history.push(Message::new("assistant", &g.text));
        Ok(())
    };
    if let Some(m) = message {
        return turn(&mut history, &m);
    }
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("chatting with {} layers of {}; an empty line or Ctrl-D ends", model.config.num_hidden_layers, model.config.model_type);
    }
    loop {
        if interactive {
            eprint!("> ");
        }
        let mut line = String::new();
        if std::io::stdin().read_line(&mut line)? == 0 || line.trim().is_empty() {
            return Ok(());
        }
        turn(&mut history, line.trim_end())?;
    }
}
