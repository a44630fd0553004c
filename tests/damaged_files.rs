//! Hand-made damaged files, in the style of llama.cpp's test-gguf: every header field, counts,
//! offsets, alignment, value types, strings, arrays (nested too), tensor tables and tokenizer
//! arrays of a GGUF built here, and safetensors index maps that point outside their directory. Each
//! is refused with an error naming the file and what was wrong, never a panic, in memory bounded by
//! the file's size: this binary counts every allocation, and the peak of each case is checked.
//! Then seeded random byte damage to a valid file, the same way.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use highrise::model::gguf::{Array, Gguf, Value};
use highrise::model::{Source, Tokenizer};

/// The system allocator, counting the bytes live and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The tests of this binary take turns: the counts are the whole process's.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Bytes allocated at the peak of `f`, above what was live before it.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let out = f();
    (out, PEAK.load(Ordering::SeqCst).saturating_sub(base))
}

/// A GGUF (version 3) writer for the cases: metadata entries as (key, type, value bytes) and
/// tensors as (name, dims innermost first, ggml type, offset), data padded to `align`.
#[derive(Clone)]
struct G {
    version: u32,
    kv: Vec<(String, u32, Vec<u8>)>,
    tensors: Vec<(String, Vec<u64>, u32, u64)>,
    data: Vec<u8>,
    n_kv: Option<u64>,
    n_tensors: Option<u64>,
}

fn s(v: &str) -> Vec<u8> {
    let mut b = (v.len() as u64).to_le_bytes().to_vec();
    b.extend(v.as_bytes());
    b
}

/// An array value: element type, count, elements.
fn arr(ety: u32, n: u64, elems: &[u8]) -> Vec<u8> {
    let mut b = ety.to_le_bytes().to_vec();
    b.extend(n.to_le_bytes());
    b.extend(elems);
    b
}

fn strings(items: &[&str]) -> Vec<u8> {
    arr(8, items.len() as u64, &items.iter().flat_map(|x| s(x)).collect::<Vec<u8>>())
}

impl G {
    /// A valid vocab-only file of a small byte-level BPE vocabulary, and one f32 tensor.
    fn valid() -> G {
        let u32v = |x: u32| x.to_le_bytes().to_vec();
        G {
            version: 3,
            kv: vec![
                ("general.architecture".into(), 8, s("llama")),
                ("general.alignment".into(), 4, u32v(32)),
                ("tokenizer.ggml.model".into(), 8, s("gpt2")),
                ("tokenizer.ggml.tokens".into(), 9, strings(&["a", "b", "ab", "\u{120}"])),
                ("tokenizer.ggml.merges".into(), 9, strings(&["a b"])),
                ("tokenizer.ggml.token_type".into(), 9, arr(5, 4, &[1i32, 1, 1, 1].iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())),
            ],
            tensors: vec![("t".into(), vec![8, 2], 0, 0)],
            data: vec![0; 64],
            n_kv: None,
            n_tensors: None,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(self.version.to_le_bytes());
        b.extend(self.n_tensors.unwrap_or(self.tensors.len() as u64).to_le_bytes());
        b.extend(self.n_kv.unwrap_or(self.kv.len() as u64).to_le_bytes());
        for (k, ty, v) in &self.kv {
            b.extend(s(k));
            b.extend(ty.to_le_bytes());
            b.extend(v);
        }
        for (name, dims, ty, off) in &self.tensors {
            b.extend(s(name));
            b.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(ty.to_le_bytes());
            b.extend(off.to_le_bytes());
        }
        b.resize(b.len().next_multiple_of(32), 0);
        b.extend(&self.data);
        b
    }

    fn set(mut self, key: &str, ty: u32, v: Vec<u8>) -> G {
        match self.kv.iter_mut().find(|(k, _, _)| k == key) {
            Some(e) => *e = (key.into(), ty, v),
            None => self.kv.push((key.into(), ty, v)),
        }
        self
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("highrise-damaged-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Opens `bytes` as a GGUF and builds its tokenizer: the error's text, or None if both worked.
fn open(name: &str, bytes: &[u8]) -> (Option<String>, usize) {
    let path = scratch(name);
    std::fs::write(&path, bytes).unwrap();
    let (r, peak) = peak_of(|| Gguf::open(&path).and_then(|g| Tokenizer::from_gguf(&g).map(|_| g)));
    let _ = std::fs::remove_file(&path);
    (r.err().map(|e| e.to_string()), peak)
}

#[test]
fn damaged_gguf_files_are_refused_by_name_in_bounded_memory() {
    let _turn = one_at_a_time();
    let (ok, _) = open("valid.gguf", &G::valid().bytes());
    assert_eq!(ok, None, "the undamaged file loads");
    let u64v = |x: u64| x.to_le_bytes().to_vec();
    let u32v = |x: u32| x.to_le_bytes().to_vec();
    let mut cases: Vec<(&str, Vec<u8>, &str)> = Vec::new();
    let mut add = |name: &'static str, g: G, want: &'static str| cases.push((name, g.bytes(), want));
    add("version 1", G { version: 1, ..G::valid() }, "GGUF version 1 is not supported");
    add("version 4", G { version: 4, ..G::valid() }, "GGUF version 4 is not supported");
    add("tensor count", G { n_tensors: Some(u64::MAX), ..G::valid() }, "header claims");
    add("metadata count", G { n_kv: Some(1 << 40), ..G::valid() }, "header claims");
    add("metadata count one past", G { n_kv: Some(7), ..G::valid() }, "");
    add("unknown value type", G::valid().set("x", 13, u32v(1)), "unknown value type 13");
    add("string length", G::valid().set("x", 8, u64v(u64::MAX - 3)), "truncated");
    add("string not utf-8", G::valid().set("x", 8, [u64v(2), vec![0xff, 0xfe]].concat()), "not UTF-8");
    add("array count", G::valid().set("x", 9, arr(0, 1 << 60, &[])), "array of 1152921504606846976 items");
    add("array of strings count", G::valid().set("x", 9, arr(8, 1 << 30, &[])), "needs at least 8589934592 bytes");
    add("array of unknown type", G::valid().set("x", 9, arr(77, 1, &[0; 8])), "array of unknown value type 77");
    add("arrays nested too deep", G::valid().set("x", 9, arr(9, 1, &arr(9, 1, &arr(9, 1, &arr(4, 0, &[]))))), "nested deeper");
    add("alignment 0", G::valid().set("general.alignment", 4, u32v(0)), "general.alignment 0 is not a power of two");
    add("alignment 48", G::valid().set("general.alignment", 4, u32v(48)), "general.alignment 48 is not a power of two");
    let mut g = G::valid();
    g.kv.push(("general.alignment".into(), 4, u32v(32)));
    add("key twice", g, "metadata general.alignment appears twice");
    let t = |dims: Vec<u64>, ty: u32, off: u64| G { tensors: vec![("t".into(), dims, ty, off)], ..G::valid() };
    add("rank 0", t(vec![], 0, 0), "0 dimensions");
    add("rank 5", t(vec![1; 5], 0, 0), "5 dimensions");
    add("dims overflow", t(vec![u64::MAX, 4], 0, 0), "does not fit");
    add("unknown ggml type", t(vec![32, 2], 6, 0), "quantization type Q5_0 is not supported");
    add("unassigned ggml type", t(vec![32, 2], 400, 0), "quantization type type 400 is not supported");
    add("data past the end", t(vec![8, 2], 0, 1 << 40), "lies past the end of the file");
    add("misaligned offset", t(vec![8, 2], 0, 4), "not a multiple of the file's alignment 32");
    add("quantized row not whole blocks", t(vec![20, 2], 8, 0), "does not fit q8_0 blocks");
    let mut g = G::valid();
    g.tensors.push(("t".into(), vec![8], 0, 0));
    add("tensor twice", g, "tensor t: appears twice");
    add("tokens not strings", G::valid().set("tokenizer.ggml.tokens", 9, arr(4, 1, &u32v(5))), "tokenizer.ggml.tokens: is not an array of strings");
    add(
        "token types longer than the vocabulary",
        G::valid().set("tokenizer.ggml.token_type", 9, arr(5, 6, &[1i32; 6].iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())),
        "tokenizer.ggml.token_type: has 6 entries but tokenizer.ggml.tokens has 4",
    );
    add("token types negative", G::valid().set("tokenizer.ggml.token_type", 9, arr(5, 1, &(-1i32).to_le_bytes())), "not an array of token types");
    add("merge of one token", G::valid().set("tokenizer.ggml.merges", 9, strings(&["ab"])), "is not two tokens");
    add("tokenizer model", G::valid().set("tokenizer.ggml.model", 8, s("wordpiece")), "tokenizer.ggml.model: \"wordpiece\" is not supported");
    // A key whose length runs past the end.
    let mut key_len = b"GGUF".to_vec();
    key_len.extend([u32v(3), u64v(0), u64v(1), u64v(u64::MAX)].concat());
    cases.push(("key length", key_len, "metadata key 0"));
    // Truncations at every length of the valid file's header.
    let whole = G::valid().bytes();
    for cut in (0..whole.len() - 64).step_by(7) {
        cases.push(("truncated", whole[..cut].to_vec(), ""));
    }
    let mut refused = 0;
    for (name, bytes, want) in &cases {
        let (err, peak) = open("case.gguf", bytes);
        let err = err.unwrap_or_else(|| panic!("{name}: a damaged file loaded"));
        assert!(err.contains("case.gguf"), "{name}: the error names the file: {err}");
        assert!(err.contains(want), "{name}: expected {want:?} in {err:?}");
        // Metadata kept compactly, counts checked before allocating: a few times the file at most,
        // beyond a fixed allowance (the tokenizer's regex and tables).
        assert!(peak <= (4 << 20) + 4 * bytes.len(), "{name}: {peak} bytes at the peak for a file of {}", bytes.len());
        refused += 1;
    }
    println!("{refused} damaged GGUF files refused, each by name, within 4 MiB + 4x the file");
}

/// The audit's case: an 8 MiB file holding one array of 8 million u8 values took 271 MB at its
/// peak (32-byte values). Kept as bytes, it takes about its own size; nested arrays load.
#[test]
fn large_and_nested_arrays_take_about_their_size_in_the_file() {
    let _turn = one_at_a_time();
    let n = 8 << 20;
    let g = G::valid().set("big", 9, arr(0, n as u64, &vec![7u8; n]));
    let nested = arr(9, 2, &[arr(4, 2, &[1u32, 2].iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()), arr(8, 1, &s("x"))].concat());
    let g = g.set("nested", 9, nested);
    let path = scratch("big.gguf");
    std::fs::write(&path, g.bytes()).unwrap();
    let (gguf, peak) = peak_of(|| Gguf::open(&path).unwrap());
    println!("an array of {n} u8 values: {:.1} MB at the peak", peak as f64 / 1e6);
    assert!(peak < 2 * n, "{peak} bytes for an array of {n} bytes");
    assert_eq!(gguf.get("big").and_then(Value::as_array).map(Array::len), Some(n));
    match gguf.get("nested") {
        Some(Value::Array(Array::Array(inner))) => {
            assert_eq!(inner[0], Array::U32(vec![1, 2]));
            assert_eq!(inner[1].strings(), Some(&["x".to_string()][..]));
        }
        other => panic!("nested array read as {other:?}"),
    }
    let _ = std::fs::remove_file(&path);
}

/// Seeded random damage (bytes overwritten, the file cut) to the valid file: never a panic, and
/// bounded memory, whatever the result.
#[test]
fn random_byte_damage_never_panics() {
    let _turn = one_at_a_time();
    let whole = G::valid().bytes();
    let mut state = 0x9e37_79b9_u64;
    let mut next = |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    let mut refused = 0;
    let cases = 20_000;
    for _ in 0..cases {
        let mut b = whole.clone();
        for _ in 0..1 + next(4) {
            let at = next(b.len());
            b[at] = match next(3) {
                0 => 0xff,
                1 => 0,
                _ => next(256) as u8,
            };
        }
        if next(4) == 0 {
            b.truncate(next(b.len()));
        }
        let (err, peak) = open("random.gguf", &b);
        refused += err.is_some() as usize;
        assert!(peak <= (4 << 20) + 4 * b.len(), "{peak} bytes at the peak for a file of {}: {err:?}", b.len());
    }
    println!("random damage: {refused} of {cases} files refused, the rest still valid; no panic");
}

/// A safetensors index whose weight_map names a file outside the model's directory is refused
/// before anything is opened.
#[test]
fn safetensors_index_paths_stay_in_the_directory() {
    let _turn = one_at_a_time();
    for (i, name) in ["../outside.safetensors", "/etc/passwd", "sub/dir.safetensors", ""].iter().enumerate() {
        let dir = scratch(&format!("hf-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            r#"{"vocab_size": 8, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}"#,
        )
        .unwrap();
        let index = serde_json::json!({"weight_map": {"model.embed_tokens.weight": name}});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
        let err = Source::open(&dir).err().map(|e| e.to_string()).unwrap_or_else(|| panic!("{name:?} was opened"));
        assert!(err.contains("weight_map.model.embed_tokens.weight") && err.contains("is not a file name"), "{name:?}: {err}");
    }
}

/// Seeded random damage to a small valid HF directory's safetensors file and config.json: never a
/// panic; every refusal names the file.
#[test]
fn random_safetensors_and_config_damage_never_panics() {
    let _turn = one_at_a_time();
    let dir = scratch("hf-random");
    std::fs::create_dir_all(&dir).unwrap();
    let config = r#"{"vocab_size": 8, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "rms_norm_eps": 1e-5}"#;
    let data: Vec<u8> = (0..8 * 8 * 4).map(|i| (i % 251) as u8).collect();
    let views = [("model.embed_tokens.weight", safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![8, 8], &data).unwrap())];
    let st = safetensors::serialize(views, None).unwrap();
    let mut state = 0x2545_f491_u64;
    let mut next = |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n.max(1) as u64) as usize
    };
    let (mut refused, cases) = (0, 4000);
    for case in 0..cases {
        let (mut c, mut t) = (config.as_bytes().to_vec(), st.clone());
        let target = if case % 2 == 0 { &mut c } else { &mut t };
        for _ in 0..1 + next(3) {
            let at = next(target.len().min(if case % 2 == 0 { usize::MAX } else { 120 }));
            let pool = b"0123456789{}[],:\"-e.ZF\xff";
            target[at] = pool[next(pool.len())];
        }
        std::fs::write(dir.join("config.json"), &c).unwrap();
        std::fs::write(dir.join("model.safetensors"), &t).unwrap();
        if let Err(e) = Source::open(&dir) {
            let e = e.to_string();
            assert!(e.contains("config.json") || e.contains("model.safetensors"), "the error names the file: {e}");
            refused += 1;
        }
    }
    println!("random damage to an HF directory: {refused} of {cases} refused by name, the rest still valid; no panic");
}

#[test]
fn unsupported_tokenizers_are_refused_naming_the_key_and_value() {
    use highrise::model::Tokenizer;
    let refused = |g: G, name: &str| -> String {
        let path = scratch(name);
        std::fs::write(&path, g.bytes()).unwrap();
        let e = Tokenizer::open(&path).err().map(|e| e.to_string()).expect("refused");
        let _ = std::fs::remove_file(&path);
        e
    };
    let e = refused(G::valid().set("tokenizer.ggml.model", 8, s("bert")), "bert.gguf");
    assert!(e.contains("tokenizer.ggml.model") && e.contains("\"bert\" is not supported"), "{e}");
    let e = refused(G::valid().set("tokenizer.ggml.pre", 8, s("klingon")), "pre.gguf");
    assert!(e.contains("tokenizer.ggml.pre") && e.contains("\"klingon\"") && e.contains("deepseek-coder"), "{e}");
    // SentencePiece needs its scores.
    let e = refused(G::valid().set("tokenizer.ggml.model", 8, s("llama")), "spm.gguf");
    assert!(e.contains("tokenizer.ggml.scores"), "{e}");
    // Any architecture's vocabulary loads for tokenizing.
    let path = scratch("gpt2-arch.gguf");
    std::fs::write(&path, G::valid().set("general.architecture", 8, s("gpt2")).bytes()).unwrap();
    assert_eq!(Tokenizer::open(&path).unwrap().encode("ab", false).unwrap(), vec![2]);
    let _ = std::fs::remove_file(&path);
}
