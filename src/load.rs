//! Loading a model as every front end takes it (the CLI's flags, the Python package's arguments):
//! a file, a HF directory, `random:SHAPE`, or the default model fetched on first use; the weight
//! format and activation dtype by name. One place, so both say the same about bad input.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use highrise_core::{Backend, DType};
use highrise_model::{fetch, Error, Llama, LoadOptions, ModelConfig, Result, Source, Tokenizer, WeightFormat};

/// What to load and how, by name.
#[derive(Clone, Debug)]
pub struct ModelSpec {
    /// A GGUF file, a HF directory, `random:SHAPE`, or `None` for the default model.
    pub model: Option<PathBuf>,
    /// `auto` (the file's own format where the backend computes with it), f32, f16, bf16 or q8_0.
    pub weights: String,
    /// Activations and KV cache: f32, f16 or bf16.
    pub dtype: String,
    /// A KV cache in another dtype than the activations.
    pub kv_dtype: Option<String>,
    pub q8_activations: bool,
    /// Q4_0/Q4_1 weights laid out 8 rows at a time (the CPU backend's faster layout).
    pub repack: bool,
}

impl Default for ModelSpec {
    fn default() -> Self {
        ModelSpec { model: None, weights: "auto".into(), dtype: "f32".into(), kv_dtype: None, q8_activations: false, repack: true }
    }
}

/// A float dtype by name; `what` names the setting in the error.
pub fn parse_dtype(s: &str, what: &str) -> Result<DType> {
    DType::parse(s).filter(|d| d.is_float()).ok_or_else(|| Error::Input(format!("{what} {s:?}: expected f32, f16 or bf16")))
}

/// `random:SHAPE` -> SHAPE.
fn random_shape(model: Option<&Path>) -> Option<&str> {
    model.and_then(Path::to_str).and_then(|s| s.strip_prefix("random:"))
}

/// The model path: the one given, or the default model (fetched on first use, `say` telling how).
pub fn model_path(given: Option<&Path>, say: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    match given {
        Some(p) => Ok(p.to_path_buf()),
        None => fetch::default_model(say),
    }
}

impl ModelSpec {
    /// The same spec with the default model fetched now when none is named, so that a front end
    /// knows the file (and reports a failed fetch) before it loads.
    pub fn resolve(mut self, say: &mut dyn FnMut(&str)) -> Result<ModelSpec> {
        self.model = Some(model_path(self.model.as_deref(), say)?);
        Ok(self)
    }

    /// Loads the model onto `backend` (made by the caller: a plugin by name, or one linked in),
    /// calling `progress(layers_done, layers)` as weights load. A `random:SHAPE` model gets random
    /// weights and a tokenizer whose token i is written `<i>`.
    pub fn load(
        &self,
        backend: Arc<dyn Backend>,
        say: &mut dyn FnMut(&str),
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<(Llama, Tokenizer)> {
        let dtype = parse_dtype(&self.dtype, "dtype")?;
        let kv_dtype = self.kv_dtype.as_deref().map(|d| parse_dtype(d, "kv_dtype")).transpose()?;
        if let Some(shape) = random_shape(self.model.as_deref()) {
            let config = ModelConfig::shape(shape).ok_or_else(|| {
                Error::Input(format!("model random:{shape}: no such shape (one of {})", ModelConfig::SHAPES.join(", ")))
            })?;
            say(&format!("making random {dtype} weights of {shape}'s shape on {}", backend.info().device));
            let mut model = Llama::random(config, backend, dtype, 0)?;
            if let Some(kv) = kv_dtype {
                model.kv_dtype = kv;
            }
            let tokenizer = Tokenizer::numbered(model.config.vocab_size)?;
            return Ok((model, tokenizer));
        }
        let weights = match self.weights.as_str() {
            "auto" => WeightFormat::Auto,
            "q8_0" => WeightFormat::Convert(DType::Q8_0),
            other => WeightFormat::Convert(
                DType::parse(other)
                    .filter(|d| d.is_float())
                    .ok_or_else(|| Error::Input(format!("weights {other:?}: expected auto, f32, f16, bf16 or q8_0")))?,
            ),
        };
        let opts = LoadOptions { weights, activations: dtype, q8_activations: self.q8_activations, kv_dtype, repack: self.repack };
        let source = Source::open(&model_path(self.model.as_deref(), say)?)?;
        let tokenizer = source.tokenizer()?;
        let model = Llama::load_with_progress(&source, backend, opts, progress)?;
        Ok((model, tokenizer))
    }
}
