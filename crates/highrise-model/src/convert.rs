//! `highrise convert`: a GGUF file to a HuggingFace directory (model.safetensors, config.json,
//! tokenizer.json, tokenizer_config.json) that loads back with the same results. Float tensors keep
//! their dtype; quantized ones are dequantized to f32, since safetensors has no block formats.

use std::path::Path;

use highrise_core::quant::dequantize;
use highrise_core::DType;

use crate::{Error, Result, Source};

/// Writes `source` as a HF directory into `out`; `progress(done, total)` after each tensor.
pub fn to_hf_dir(source: &Source, out: &Path, progress: &mut dyn FnMut(usize, usize)) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let names = source.tensor_names();
    let mut tensors: Vec<(String, DType, Vec<usize>, Vec<u8>)> = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let t = source.tensor(name)?.ok_or_else(|| Error::tensor(source.path(), name, "listed but unreadable"))?;
        let (dtype, bytes) = if t.dtype.is_float() {
            (t.dtype, t.data.into_owned())
        } else {
            let mut v = vec![0f32; t.dims.iter().product()];
            dequantize(t.dtype, &t.data, &mut v).map_err(|e| Error::tensor(source.path(), name, e))?;
            (DType::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect())
        };
        tensors.push((name.clone(), dtype, t.dims, bytes));
        progress(i + 1, names.len());
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, dims, bytes)| {
            let st = match dtype {
                DType::F16 => safetensors::Dtype::F16,
                DType::BF16 => safetensors::Dtype::BF16,
                _ => safetensors::Dtype::F32,
            };
            let view = safetensors::tensor::TensorView::new(st, dims.clone(), bytes)
                .map_err(|e| Error::tensor(out, name, e.to_string()))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<_>>()?;
    let st_path = out.join("model.safetensors");
    safetensors::serialize_to_file(views, None, &st_path)
        .map_err(|e| Error::Format { path: st_path.clone(), detail: e.to_string() })?;

    let write = |file: &str, text: &str| {
        let p = out.join(file);
        std::fs::write(&p, text).map_err(|e| Error::io(&p, e))
    };
    let mut config = source.config().clone();
    if tensors.iter().any(|t| t.1 == DType::F32) {
        config.torch_dtype = Some("float32".into());
    }
    write("config.json", &serde_json::to_string_pretty(&config.hf_json()).expect("config serializes"))?;
    let tok = source.tokenizer()?;
    write("tokenizer.json", &tok.json()?)?;
    write("tokenizer_config.json", &serde_json::to_string_pretty(&tok.config_json()).expect("json"))?;
    Ok(())
}
