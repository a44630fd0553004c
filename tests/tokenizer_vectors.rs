//! Every tokenizer family in ../shared/fixtures/tokenizer-vectors against llama.cpp's own test
//! vectors (test-tokenizer-0: each string encoded without BOS/EOS must give exactly these ids), and
//! decoding back: the ids give the string again, and streamed one id at a time, the same text.

use std::path::PathBuf;

use highrise::engine::TextStream;
use highrise::model::Tokenizer;

fn vectors() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/tokenizer-vectors");
    dir.is_dir().then_some(dir)
}

/// (string, ids) pairs of one family's `.inp` and `.out` files.
fn cases(dir: &std::path::Path, family: &str) -> Vec<(String, Vec<u32>)> {
    let inp = std::fs::read_to_string(dir.join(format!("ggml-vocab-{family}.gguf.inp"))).unwrap();
    let out = std::fs::read_to_string(dir.join(format!("ggml-vocab-{family}.gguf.out"))).unwrap();
    let strings: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    let ids: Vec<Vec<u32>> = out.lines().map(|l| l.split_whitespace().map(|x| x.parse().unwrap()).collect()).collect();
    // The .inp file ends with a separator, leaving one empty piece after it.
    assert_eq!(strings.last(), Some(&""), "{family}: .inp should end with a separator");
    let strings = &strings[..strings.len() - 1];
    assert_eq!(strings.len(), ids.len(), "{family}: {} strings, {} id lines", strings.len(), ids.len());
    strings.iter().map(|s| s.to_string()).zip(ids).collect()
}

const FAMILIES: [&str; 6] = ["phi-3", "qwen2", "deepseek-llm", "deepseek-coder", "falcon", "mpt"];

#[test]
fn every_family_encodes_as_llama_cpp() {
    let Some(dir) = vectors() else {
        println!("skipped: no tokenizer vectors at ../shared/fixtures/tokenizer-vectors");
        return;
    };
    let mut failures = Vec::new();
    let mut checked = 0;
    for family in FAMILIES {
        let tok = Tokenizer::open(&dir.join(format!("ggml-vocab-{family}.gguf"))).unwrap();
        for (text, want) in cases(&dir, family) {
            let got = tok.encode(&text, false).unwrap();
            if got != want {
                failures.push(format!("{family} {text:?}:\n  ours      {got:?}\n  llama.cpp {want:?}"));
            }
            checked += 1;
        }
    }
    println!("{checked} strings in {} families checked, {} differ", FAMILIES.len(), failures.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_family_decodes_what_it_encoded_streamed_or_whole() {
    let Some(dir) = vectors() else {
        println!("skipped: no tokenizer vectors at ../shared/fixtures/tokenizer-vectors");
        return;
    };
    let mut failures = Vec::new();
    for family in FAMILIES {
        let tok = Tokenizer::open(&dir.join(format!("ggml-vocab-{family}.gguf"))).unwrap();
        for (text, ids) in cases(&dir, family) {
            let whole = tok.decode(&ids).unwrap();
            let mut stream = TextStream::new(&[]);
            let mut streamed = String::new();
            for &id in &ids {
                streamed += &stream.push(&tok, id).unwrap().0;
            }
            streamed += &stream.finish();
            if whole != text || streamed != text {
                failures.push(format!("{family} {text:?}: decoded {whole:?}, streamed {streamed:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
