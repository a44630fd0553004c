//! `highrise bench`: llama-bench's tests, each beside its ceiling measured in the same run.

use clap::Args;
use serde_json::json;

use super::{load, parse_bytes, AnyResult, ModelArgs};

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt lengths to prefill (repeatable); 0 runs no prefill test, as llama-bench's -p 0.
    #[arg(long = "pp", default_values_t = [512])]
    pub prompt: Vec<usize>,
    /// Numbers of tokens to generate (repeatable); 0 runs no generation test.
    #[arg(long = "tg", default_values_t = [128])]
    pub generate: Vec<usize>,
    /// Tokens of context already in the KV cache when each tg test starts (repeatable), as
    /// llama-bench's -d: decode speed at a long context.
    #[arg(long, short = 'd', default_values_t = [0])]
    pub depth: Vec<usize>,
    /// Repetitions of each test.
    #[arg(long, short, default_value_t = 3)]
    pub reps: usize,
    /// Numbers of sequences to decode together through the engine (repeatable): total tokens/s;
    /// 0 runs none.
    #[arg(long, short = 'c', default_values_t = [1, 8, 32, 64])]
    pub concurrency: Vec<usize>,
    /// KV-cache memory for the concurrent tests, e.g. 512M or 2G.
    #[arg(long, default_value = "512M")]
    pub kv_memory: String,
    /// Also measure generation with every residual-stream tap on (introspection's cost).
    #[arg(long)]
    pub taps: bool,
    /// After each tg test (and each -c test of more than one sequence), time it again op by op
    /// (each op waits for the backend) and print where a decoded token's time goes: per op and
    /// projection shape, calls, time per call, share.
    #[arg(long)]
    pub profile: bool,
    /// Sampling temperature of the concurrent (-c) tests' requests; 0 (the default) is greedy.
    /// A chat request's draw runs the sampling kernel over the vocabulary every step.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Top-p (nucleus) of the concurrent tests' requests where --temperature is above 0.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: &BenchArgs) -> AnyResult<()> {
    let BenchArgs { model: args, prompt: pp, generate: tg, depth: depths, reps, concurrency, kv_memory, taps, profile, temperature, top_p, json } = a;
    let (reps, taps, profile, json) = (*reps, *taps, *profile, *json);
    use highrise::core::profile as op_profile;
    use highrise::engine::bench;
    let kv_bytes = parse_bytes(kv_memory)?;
    let (model, tokenizer) = load(args)?;
    let reps = reps.max(1);
    let mut results = Vec::new();
    // A 0 asks for no such test (llama-bench's -p 0 / -n 0).
    let pp: Vec<usize> = pp.iter().copied().filter(|&n| n > 0).collect();
    let tg: Vec<usize> = tg.iter().copied().filter(|&n| n > 0).collect();
    for &n in &pp {
        results.push(bench::prefill(&model, n, reps)?);
    }
    // (test, rows of the op table) from a separate, op-by-op timed run: waiting after every op
    // slows a GPU down, so the t/s above never include it.
    let mut profiles = Vec::new();
    for (&n, &depth) in tg.iter().flat_map(|n| depths.iter().map(move |d| (n, d))) {
        let graphs_before = model.backend.graph_stats();
        results.push(bench::decode(&model, n, depth, reps, false, true)?);
        if model.backend.graph_stats().launched > graphs_before.launched {
            // The backend ran the steps as graphs: the same steps op by op, for what graphs save.
            results.push(bench::decode(&model, n, depth, reps, false, false)?);
        }
        if taps {
            results.push(bench::decode(&model, n, depth, reps, true, true)?);
        }
        if profile {
            op_profile::take();
            op_profile::enable(true);
            let m = bench::decode(&model, n, depth, 1, false, false);
            op_profile::enable(false);
            profiles.push((m?.test, op_profile::take(), n));
        }
    }
    let sampling = highrise::engine::sampling::SamplingParams {
        temperature: *temperature,
        top_p: *top_p,
        ..Default::default()
    };
    for &c in concurrency.iter().filter(|&&c| c > 0) {
        let m = bench::concurrent(&model, &tokenizer, c, 64, kv_bytes, &sampling)?;
        let test = m.test.clone();
        results.push(m);
        if profile && c > 1 {
            // The same batch op by op (the engine runs no graphs while a profile is on): where a
            // batched step's time goes, its 8-token prompts' prefill included.
            op_profile::take();
            op_profile::enable(true);
            let m = bench::concurrent(&model, &tokenizer, c, 64, kv_bytes, &sampling);
            op_profile::enable(false);
            let tokens = m?.tokens;
            profiles.push((test, op_profile::take(), tokens));
        }
    }
    // The ceilings, measured in this run: memory (host memory read by all cores for the CPU
    // backend; the device's own copy bandwidth otherwise) and this model's matrix rate.
    let host = model.backend.name() == "cpu";
    let (memory_bw, copy_bw) = if host {
        (bench::read_bandwidth(), bench::copy_bandwidth())
    } else {
        let copy = bench::device_copy_bandwidth(&model.backend, 1 << 30, 5)?;
        (copy, copy)
    };
    let matmul = bench::matmul_rate(&model, pp.iter().copied().max().unwrap_or(512).max(1))?;
    let ceilings = bench::Ceilings { memory: memory_bw, matmul };
    let weight_bytes = model.weight_bytes_per_token();
    // Batch-1 decode at no depth reads every weight once per token.
    let decode_ceiling = bench::Test::Decode { n: 1, depth: 0 }.ceiling(&model, &ceilings);
    let info = model.backend.info();
    let graphs = model.backend.graph_stats();
    let model_name = args.model.as_ref().map_or("SmolLM2-135M-Instruct Q4_1 (default)".to_string(), |p| p.display().to_string());
    let mut weights = format!("{}{}", model.layers[0].wq.dtype(), if model.q8_activations { ", q8 activations" } else { "" });
    if model.kv_dtype != model.dtype {
        weights += &format!(", {} KV", model.kv_dtype);
    }
    if json {
        println!(
            "{}",
            json!({
                "model": model_name, "backend": info.name, "device": info.device, "weights": weights,
                "weight_bytes_per_token": weight_bytes, "read_bandwidth_bytes_per_second": memory_bw,
                "copy_bandwidth_bytes_per_second": copy_bw, "matmul_flops_per_second": matmul,
                "decode_ceiling_tokens_per_second": decode_ceiling,
                "graphs": {"captured": graphs.captured, "launched": graphs.launched, "op_by_op": graphs.eager},
                "results": results.iter().map(|m| json!({
                    "test": m.test, "tokens_per_second": m.mean(), "stddev": m.stddev(), "reps": m.tokens_per_sec,
                    "ceiling_tokens_per_second": m.kind.ceiling(&model, &ceilings),
                })).collect::<Vec<_>>(),
                "profiles": profiles.iter().map(|(test, rows, tokens)| json!({
                    "test": test, "tokens": tokens,
                    "ops": rows.iter().map(|r| json!({"op": r.op, "calls": r.calls, "seconds": r.total.as_secs_f64()})).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })
        );
        return Ok(());
    }
    println!("| model | backend | weights | test | t/s | ceiling t/s | of ceiling |");
    println!("| --- | --- | --- | --- | ---: | ---: | ---: |");
    for m in &results {
        let ceiling = m.kind.ceiling(&model, &ceilings);
        println!(
            "| {model_name} | {} ({}) | {weights} | {} | {:.2} ± {:.2} | {ceiling:.0} | {:.0}% |",
            info.name,
            info.device,
            m.test,
            m.mean(),
            m.stddev(),
            100.0 * m.mean() / ceiling
        );
    }
    let memory = if host {
        format!("memory read {:.1} GB/s (copy {:.1} GB/s, read + write)", memory_bw / 1e9, copy_bw / 1e9)
    } else {
        format!("device memory {:.0} GB/s (copy of 1 GiB, read + write)", memory_bw / 1e9)
    };
    println!(
        "\nceilings: {memory}; {:.1} MB of weights per token, so batch-1 decode <= {:.0} t/s; \
         this model's MLP projection {}, so pp <= matmul rate / flops per token",
        weight_bytes as f64 / 1e6,
        decode_ceiling,
        if matmul >= 1e12 { format!("{:.1} TFLOP/s", matmul / 1e12) } else { format!("{:.1} GFLOP/s", matmul / 1e9) }
    );
    println!(
        "(decode ceilings count the weights once per step and each sequence's K/V at its context; \
         prefill's, 2 flops per weight and token plus attention's)"
    );
    if graphs.launched + graphs.eager > 0 {
        println!(
            "graphs: decode steps ran as {} graph launches ({} graphs captured), {} steps op by op (HIGHRISE_GRAPHS=0 turns graphs off)",
            graphs.launched, graphs.captured, graphs.eager
        );
    }
    for (test, rows, tokens) in &profiles {
        let all: f64 = rows.iter().map(|r| r.total.as_secs_f64()).sum();
        // The same test as timed above, at full speed (as graphs where the backend runs them).
        let base = test.trim_end_matches(" (no graphs)");
        let timed = results.iter().find(|m| m.test == base).map_or(String::new(), |m| {
            let how = if graphs.launched > 0 { "as graphs" } else { "as timed above" };
            format!("; {how}: {:.2} ms per token", 1e3 / m.mean())
        });
        println!("\nwhere a token's time goes ({base}, ops timed one by one: {:.2} ms per token{timed})", all * 1e3 / *tokens as f64);
        println!("| op | calls | us per call | ms per token | share |");
        println!("| --- | ---: | ---: | ---: | ---: |");
        for r in rows {
            let secs = r.total.as_secs_f64();
            println!(
                "| {} | {} | {:.1} | {:.3} | {:.1}% |",
                r.op,
                r.calls,
                secs * 1e6 / r.calls.max(1) as f64,
                secs * 1e3 / *tokens as f64,
                100.0 * secs / all.max(f64::MIN_POSITIVE)
            );
        }
    }
    Ok(())
}
