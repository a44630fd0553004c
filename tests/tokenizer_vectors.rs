//! Every tokenizer family against llama.cpp's own test vectors (test-tokenizer-0: each string
//! encoded without BOS/EOS must give exactly these ids), and decoding back: the ids give the string
//! again, whole and streamed one id at a time.
//!
//! Six families are in ../shared/fixtures/tokenizer-vectors. Seven more come from llama.cpp's
//! `models/` folder as the llama-cpp-python 0.3.36 source package vendors it (MIT), fetched from PyPI
//! on first use (sha256-checked) into ~/.cache/highrise/tokenizer-vectors (or
//! $HIGHRISE_MORE_VECTORS); skipped, saying why, when it cannot be fetched.

use std::path::{Path, PathBuf};
use std::process::Command;

use highrise::engine::TextStream;
use highrise::model::Tokenizer;

const SHARED: [&str; 6] = ["phi-3", "qwen2", "deepseek-llm", "deepseek-coder", "falcon", "mpt"];
const MORE: [&str; 7] = ["llama-spm", "llama-bpe", "gpt-2", "starcoder", "refact", "command-r", "qwen35"];

const SDIST: &str = "https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-0.3.36.tar.gz";
const SDIST_SHA256: &str = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e";

fn shared() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/tokenizer-vectors");
    dir.is_dir().then_some(dir)
}

/// llama.cpp's vectors folder: fetched once (curl, sha256-checked, only the vocab files kept).
fn more() -> Result<PathBuf, String> {
    let dir = std::env::var_os("HIGHRISE_MORE_VECTORS").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
        home.join(".cache/highrise/tokenizer-vectors")
    });
    if MORE.iter().all(|f| dir.join(format!("ggml-vocab-{f}.gguf.out")).is_file()) {
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let tarball = dir.join(format!("llama-cpp-python-{}.tar.gz", std::process::id()));
    let run = |cmd: &mut Command| -> Result<(), String> {
        let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
        match out.status.success() {
            true => Ok(()),
            false => Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim())),
        }
    };
    let fetched = (|| {
        run(Command::new("curl").args(["-sSfL", "--max-time", "300", "-o"]).arg(&tarball).arg(SDIST))?;
        let sum = highrise::model::fetch::sha256_file(&tarball).map_err(|e| e.to_string())?;
        if sum != SDIST_SHA256 {
            return Err(format!("llama-cpp-python 0.3.36: sha256 {sum}, expected {SDIST_SHA256}"));
        }
        run(Command::new("tar")
            .arg("-xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(&dir)
            .args(["--strip-components=4", "--wildcards", "llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-*"]))
    })();
    let _ = std::fs::remove_file(&tarball);
    fetched.map(|_| dir)
}

/// (string, ids) pairs of one family's `.inp` and `.out` files.
fn cases(dir: &Path, family: &str) -> Vec<(String, Vec<u32>)> {
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

/// Every string of `families` in `dir`: encoded to llama.cpp's ids, decoded back whole and streamed.
/// Returns how many were checked; panics listing every difference.
fn check(dir: &Path, families: &[&str]) -> usize {
    let mut failures = Vec::new();
    let mut checked = 0;
    for family in families {
        let tok = Tokenizer::open(&dir.join(format!("ggml-vocab-{family}.gguf"))).unwrap();
        for (text, want) in cases(dir, family) {
            let got = tok.encode(&text, false).unwrap();
            if got != want {
                failures.push(format!("{family} {text:?}:\n  ours      {got:?}\n  llama.cpp {want:?}"));
            }
            let whole = tok.decode(&want).unwrap();
            let mut stream = TextStream::new(&[]);
            let mut streamed = String::new();
            for &id in &want {
                streamed += &stream.push(&tok, id).unwrap().0;
            }
            streamed += &stream.finish();
            if whole != text || streamed != text {
                failures.push(format!("{family} {text:?}: decoded {whole:?}, streamed {streamed:?}"));
            }
            checked += 1;
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    checked
}

#[test]
fn six_families_from_the_shared_fixtures() {
    let Some(dir) = shared() else {
        println!("skipped: no tokenizer vectors at ../shared/fixtures/tokenizer-vectors");
        return;
    };
    let n = check(&dir, &SHARED);
    println!("{n} strings of {} families encode and decode as llama.cpp's vectors say", SHARED.len());
}

#[test]
fn seven_more_families_from_llama_cpp() {
    let dir = match more() {
        Ok(d) => d,
        Err(e) => {
            println!("skipped: llama.cpp's tokenizer vectors could not be fetched ({e})");
            return;
        }
    };
    let n = check(&dir, &MORE);
    println!("{n} strings of {} families encode and decode as llama.cpp's vectors say", MORE.len());
}
