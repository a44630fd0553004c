//! The `highrise` command line, run as a user would, on the default model.

mod common;

use std::process::{Command, Output};

use common::*;

fn highrise(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_highrise")).args(args).output().expect("run highrise")
}

fn stdout_ok(args: &[&str]) -> String {
    let out = highrise(args);
    assert!(out.status.success(), "highrise {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn generate_json_matches_the_reference_greedy_ids() {
    let Some((_, model, reference)) = fixtures_and_model("cli generate") else { return };
    let c = &reference["cases"]["chat"];
    let want = ids(&c["greedy"]);
    let out = stdout_ok(&[
        "generate", "--model", model.to_str().unwrap(), "--prompt", c["prompt"].as_str().unwrap(), "--json",
        "--max-tokens", "32",
    ]);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(ids(&j["prompt_ids"]), ids(&c["input_ids"]), "special tokens in the prompt are recognized, no BOS added");
    assert_eq!(ids(&j["ids"]), want, "greedy ids (stopping at EOS)");
    assert_eq!(j["text"], "The capital of France is Paris.");
    assert_eq!(j["finish_reason"], "stop");
    assert!(j["timings"]["decode_tokens_per_second"].as_f64().unwrap() > 0.0);
}

#[test]
fn chat_answers_through_the_template() {
    let Some((_, model, _)) = fixtures_and_model("cli chat") else { return };
    let out = stdout_ok(&["chat", "--model", model.to_str().unwrap(), "What is the capital of France?"]);
    assert_eq!(out.trim(), "The capital of France is Paris.");
}

#[test]
fn tokenize_json_prints_the_ids() {
    let Some((_, model, reference)) = fixtures_and_model("cli tokenize") else { return };
    let case = &reference["tokenizer"][5];
    let out = stdout_ok(&["tokenize", "--json", "--model", model.to_str().unwrap(), case["text"].as_str().unwrap()]);
    let got: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(ids(&got), ids(&case["ids"]));
}

#[test]
fn tokenize_takes_any_architectures_vocabulary() {
    // A vocab-only GGUF of Phi-3 (SentencePiece; an architecture this build does not run).
    let vocab = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/tokenizer-vectors/ggml-vocab-phi-3.gguf");
    if !vocab.is_file() {
        println!("skipped: cli tokenize of another family: no {}", vocab.display());
        return;
    }
    let out = stdout_ok(&["tokenize", "--json", "--model", vocab.to_str().unwrap(), "Hello world"]);
    assert_eq!(out.trim(), "[15043,3186]");
}

#[test]
fn logits_writes_every_position_as_npy() {
    let Some((fx, model, reference)) = fixtures_and_model("cli logits") else { return };
    let out = std::env::temp_dir().join(format!("highrise-cli-logits-{}.npy", std::process::id()));
    let prompt = reference["cases"]["story"]["prompt"].as_str().unwrap();
    stdout_ok(&["logits", "--model", model.to_str().unwrap(), "--prompt", prompt, "--out", out.to_str().unwrap()]);
    let (dims, got) = highrise::model::npy::read_f32(&out).unwrap();
    let (want_dims, want) = highrise::model::npy::read_f32(&fx.join("story_logits.npy")).unwrap();
    assert_eq!(dims, want_dims);
    let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst <= 1e-3, "logits differ from HF by {worst}");
    std::fs::remove_file(out).ok();
}

#[test]
fn backends_lists_cpu_as_usable() {
    let out = stdout_ok(&["backends", "--json"]);
    let cpu: serde_json::Value =
        out.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).find(|j| j["name"] == "cpu").unwrap();
    assert_eq!(cpu["usable"], true, "{out}");
    assert!(out.contains("\"cuda\""), "cuda is listed even when absent: {out}");
}

#[test]
fn bad_model_path_is_a_clear_error() {
    let out = highrise(&["generate", "--model", "/no/such/model.gguf", "--prompt", "hi"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/no/such/model.gguf") && err.starts_with("error:"), "{err}");
}

#[test]
fn help_explains_each_command() {
    let out = stdout_ok(&["--help"]);
    for cmd in ["generate", "chat", "logits", "tokenize", "convert", "backends"] {
        assert!(out.contains(cmd), "--help lists {cmd}: {out}");
    }
    let gen = stdout_ok(&["generate", "--help"]);
    assert!(gen.contains("--temperature") && gen.contains("--json") && gen.contains("Special tokens"), "{gen}");
}

#[test]
fn other_weight_and_activation_dtypes_generate_the_same_opening() {
    let Some((_, model, reference)) = fixtures_and_model("cli dtypes") else { return };
    let c = &reference["cases"]["story"];
    // The first four greedy steps have margins above 0.4: any sound precision keeps them.
    let want = &ids(&c["greedy"])[..4];
    for flags in [&["--dtype", "bf16"][..], &["--dtype", "f16", "--weights", "f16"], &["--weights", "q8_0"], &["--q8-activations"]] {
        let mut args = vec!["generate", "--model", model.to_str().unwrap(), "--prompt", c["prompt"].as_str().unwrap()];
        args.extend_from_slice(&["--json", "--max-tokens", "4"]);
        args.extend_from_slice(flags);
        let j: serde_json::Value = serde_json::from_str(&stdout_ok(&args)).unwrap();
        assert_eq!(ids(&j["ids"]), want, "{flags:?}");
    }
}

/// A mixture of experts' routing from `inspect`: the router's scores at the mixture layers
/// (`router.npy`; Qwen 3 MoE's dense layer 0 has none) and each position's experts, the likeliest
/// by those scores, with weights summing to 1 (renormalized) in `experts.json`.
#[test]
fn inspect_writes_a_mixtures_routing() {
    let out = std::env::temp_dir().join(format!("highrise-inspect-moe-{}", std::process::id()));
    let o = out.to_str().unwrap();
    stdout_ok(&["inspect", "--model", "random:tiny-qwen3-moe", "--prompt", "5 17 300 42 99 7", "--out", o]);
    let (dims, scores) = highrise::model::npy::read_f32(&out.join("router.npy")).unwrap();
    let t = dims[1];
    assert_eq!(dims, vec![1, t, 8]);
    let routes: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("experts.json")).unwrap()).unwrap();
    let layer = &routes["layers"][0];
    assert_eq!((layer["layer"].as_u64(), routes["experts_per_token"].as_u64()), (Some(1), Some(2)));
    for (p, pos) in layer["positions"].as_array().unwrap().iter().enumerate() {
        let row = &scores[p * 8..(p + 1) * 8];
        let mut best: Vec<usize> = (0..8).collect();
        best.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        assert_eq!(ids(&pos["experts"]).iter().map(|&e| e as usize).collect::<Vec<_>>(), best[..2], "position {p}");
        let w: f64 = pos["weights"].as_array().unwrap().iter().map(|w| w.as_f64().unwrap()).sum();
        assert!((w - 1.0).abs() < 1e-5, "position {p}: weights sum to {w}");
    }
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn inspect_writes_the_streams_patterns_and_lens() {
    let Some((fx, model, reference)) = fixtures_and_model("cli inspect") else { return };
    let out = std::env::temp_dir().join(format!("highrise-inspect-{}", std::process::id()));
    let prompt = reference["cases"]["story"]["prompt"].as_str().unwrap();
    let o = out.to_str().unwrap();
    stdout_ok(&["inspect", "--model", model.to_str().unwrap(), "--weights", "f32", "--prompt", prompt, "--out", o]);
    for f in ["resid_pre", "attn_out", "mlp_out", "resid_post"] {
        let (dims, _) = highrise::model::npy::read_f32(&out.join(format!("{f}.npy"))).unwrap();
        assert_eq!(dims, vec![30, 9, 576], "{f}");
    }
    let (dims, got) = highrise::model::npy::read_f32(&out.join("attn_probs.npy")).unwrap();
    let (want_dims, want) = highrise::model::npy::read_f32(&fx.join("story_attn_probs.npy")).unwrap();
    assert_eq!(dims, want_dims);
    let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst <= 1e-4, "attention probabilities differ from HF by {worst}");
    let lens: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("logit_lens.json")).unwrap()).unwrap();
    let last_layer = lens["layers"].as_array().unwrap().last().unwrap();
    let last_pos = last_layer["positions"].as_array().unwrap().last().unwrap();
    assert_eq!(ids(&last_pos["ids"]), ids(&reference["cases"]["story"]["last_top5"]), "the lens's last layer is the model's own top 5");
    let mut pictures = vec![out.join("logit_lens.png"), out.join("resid_norm.png")];
    pictures.extend((0..30).map(|l| out.join(format!("attention/layer_{l:02}.png"))));
    for p in pictures {
        let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(bytes.len() > 500 && bytes.starts_with(b"\x89PNG"), "{} is a PNG picture", p.display());
    }
    // Chosen layers only, each once, bottom to top; the earlier run's other pictures are gone.
    let (_, all) = highrise::model::npy::read_f32(&out.join("resid_post.npy")).unwrap();
    let m = model.to_str().unwrap();
    stdout_ok(&["inspect", "--model", m, "--weights", "f32", "--prompt", prompt, "--out", o, "--layers", "29,0,29"]);
    let (dims, two) = highrise::model::npy::read_f32(&out.join("resid_post.npy")).unwrap();
    assert_eq!(dims, vec![2, 9, 576]);
    let layer = |l: usize| &all[l * 9 * 576..][..9 * 576];
    assert_eq!((&two[..9 * 576], &two[9 * 576..]), (layer(0), layer(29)));
    let lens: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("logit_lens.json")).unwrap()).unwrap();
    let layers: Vec<u64> = lens["layers"].as_array().unwrap().iter().map(|l| l["layer"].as_u64().unwrap()).collect();
    assert_eq!(layers, [0, 29]);
    let mut left: Vec<String> = std::fs::read_dir(out.join("attention")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    left.sort();
    assert_eq!(left, ["layer_00.png", "layer_29.png"]);
    let err = highrise(&["inspect", "--model", m, "--prompt", prompt, "--out", o, "--top-k", "0"]);
    assert!(!err.status.success() && String::from_utf8_lossy(&err.stderr).contains("--top-k"), "a logit lens of no tokens is refused");
    // A long prompt: pictures a viewer can show (attention binned to 256 cells a side, the lens's
    // last 200 positions), the arrays whole.
    let long: String = (0..300).map(|i| format!(" word{i}")).collect();
    let said = highrise(&["inspect", "--model", m, "--prompt", &long, "--out", o, "--layers", "5", "--top-k", "1"]);
    assert!(said.status.success(), "{}", String::from_utf8_lossy(&said.stderr));
    assert!(String::from_utf8_lossy(&said.stderr).contains("(the last 200 of "), "{}", String::from_utf8_lossy(&said.stderr));
    let (dims, _) = highrise::model::npy::read_f32(&out.join("attn_probs.npy")).unwrap();
    let t = dims[2];
    assert!(t > 256 && dims == [1, 9, t, t], "{dims:?}");
    let size = |p: &str| {
        let b = std::fs::read(out.join(p)).unwrap();
        (u32::from_be_bytes(b[16..20].try_into().unwrap()), u32::from_be_bytes(b[20..24].try_into().unwrap()))
    };
    // 5 heads a row of 2 px x 256 cells, 90 px a lens column.
    assert!(size("attention/layer_05.png").0 <= 5 * (512 + 20) + 20, "{:?}", size("attention/layer_05.png"));
    assert!(size("logit_lens.png").0 <= 60 + 90 * 200 + 10, "{:?}", size("logit_lens.png"));
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn generate_steers_with_a_vector_from_npy() {
    let Some((_, model, reference)) = fixtures_and_model("cli steer") else { return };
    let dir = std::env::temp_dir().join(format!("highrise-steer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (zero, big) = (dir.join("zero.npy"), dir.join("big.npy"));
    highrise::model::npy::write_f32(&zero, &[576], &[0.0; 576]).unwrap();
    let v: Vec<f32> = (0..576).map(|i| ((i * 7919) % 97) as f32 / 48.0 - 1.0).collect();
    highrise::model::npy::write_f32(&big, &[576], &v).unwrap();
    let prompt = reference["cases"]["story"]["prompt"].as_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", model.to_str().unwrap(), "--prompt", prompt, "--json", "-n", "8"];
        args.extend_from_slice(extra);
        let j: serde_json::Value = serde_json::from_str(&stdout_ok(&args)).unwrap();
        ids(&j["ids"])
    };
    let plain = run(&[]);
    let zero_spec = format!("4:{}:25", zero.display());
    assert_eq!(run(&["--steer", &zero_spec]), plain, "a zero vector changes nothing");
    let big_spec = format!("4:{}:40", big.display());
    assert_ne!(run(&["--steer", &big_spec]), plain, "a large vector changes the output");
    let bad = highrise(&["generate", "--model", model.to_str().unwrap(), "--prompt", "hi", "--steer", "99:x.npy:1"]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("--steer") && err.contains("30 layers"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The audit's command: two overlapping stop strings made `generate` exit 101 (a panic slicing past
/// the text). It stops at the one reached and prints the text before it.
#[test]
fn overlapping_stop_strings_end_the_text_cleanly() {
    let Some(model) = default_model() else { return println!("skipped: cli stop strings: no default model") };
    let out = stdout_ok(&[
        "generate", "--model", model.to_str().unwrap(), "--prompt", "Once upon a time", "--stop", "e!", "--stop", "he city",
        "--json", "--max-tokens", "64",
    ]);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let text = j["text"].as_str().unwrap();
    assert!(!text.contains("e!") && !text.contains("he city"), "{text:?}");
    println!("finish {} after {text:?}", j["finish_reason"]);
}

#[test]
fn bench_runs_only_the_tests_asked_for() {
    // A 0 asks for no such test, as llama-bench's -p 0 (it used to fail with "empty batch").
    let out = stdout_ok(&["bench", "--model", "random:tiny", "--pp", "0", "--tg", "8", "-c", "0", "-r", "1", "--json"]);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let tests: Vec<&str> = j["results"].as_array().unwrap().iter().map(|r| r["test"].as_str().unwrap()).collect();
    assert_eq!(tests, ["tg8"], "{out}");
    assert!(j["results"][0]["tokens_per_second"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_samples_its_concurrent_requests_when_asked() {
    // --temperature and --top-p reach the -c tests' requests (the sampling kernel, not argmax) and
    // their names.
    let out = stdout_ok(&["bench", "--model", "random:tiny", "--pp", "0", "--tg", "0", "-c", "2", "--temperature", "0.8", "--top-p", "0.9", "-r", "1", "--json"]);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let tests: Vec<&str> = j["results"].as_array().unwrap().iter().map(|r| r["test"].as_str().unwrap()).collect();
    assert_eq!(tests, ["tg64 x2 T=0.8 top-p 0.9"], "{out}");
    assert!(j["results"][0]["tokens_per_second"].as_f64().unwrap() > 0.0);
    // A temperature the engine refuses is an error naming it, not a panic.
    let bad = highrise(&["bench", "--model", "random:tiny", "--pp", "0", "--tg", "0", "-c", "1", "--temperature=-1"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("temperature") && !err.contains("panicked"), "{err}");
}
