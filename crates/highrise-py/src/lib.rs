//! `highrise._highrise`: the engine for Python. The Python package (`python/highrise/`) wraps these
//! few calls into the API people use (`Model`, `ActivationCache`, context managers); everything that
//! computes runs here, on the engine's own thread, with the GIL released.
//!
//! One `Engine` holds a model and an `EngineService` (the continuous-batching thread with its paged
//! KV cache). Generation goes through the service, so requests from several Python threads, or
//! many prompts at once, share batches; capture passes run on the same thread between steps, as the
//! server runs them. Results come back as numpy arrays that own the engine's buffers (no copy).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use highrise::engine::{
    EngineConfig, EngineService, Event, FinishReason, GenerateParams, Request, RequestStream, SamplingParams, ServiceError,
};
use highrise::model::introspect::{attention_probs, logit_lens};
use highrise::model::{Error, Hooks, Llama, Logits, Message, Patch, Site, Source, Steer, Tokenizer};
use highrise::ModelSpec;
use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::exceptions::{PyFileNotFoundError, PyIndexError, PyKeyError, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

pyo3::create_exception!(
    _highrise,
    HighriseError,
    PyRuntimeError,
    "A failure inside the engine or a backend (the process and the model carry on)."
);

/// The Python exception for an engine error: a missing file is FileNotFoundError, bad input or a bad
/// file ValueError, a failure inside the engine or a backend HighriseError. Messages as the CLI's.
fn py_err(e: Error) -> PyErr {
    use highrise::core::Error as Core;
    match e {
        Error::Io { ref source, .. } if source.kind() == std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(e.to_string()),
        Error::Io { .. } => PyOSError::new_err(e.to_string()),
        Error::Format { .. } | Error::Tensor { .. } | Error::Config { .. } | Error::Tokenizer(_) | Error::Input(_) => {
            PyValueError::new_err(e.to_string())
        }
        Error::Backend(Core::Invalid(_) | Core::NotFound { .. } | Core::Plugin { .. } | Core::AbiMismatch { .. }) => {
            PyValueError::new_err(e.to_string())
        }
        Error::Backend(_) => HighriseError::new_err(e.to_string()),
    }
}

fn service_err(e: ServiceError) -> PyErr {
    match e {
        ServiceError::Rejected(m) => PyValueError::new_err(m),
        other => HighriseError::new_err(other.to_string()),
    }
}

/// What `generate` takes, as the CLI's sampling flags and the server's fields.
#[derive(FromPyObject)]
struct SamplingArgs {
    max_tokens: usize,
    temperature: f32,
    top_k: usize,
    top_p: f32,
    min_p: f32,
    repetition_penalty: f32,
    seed: u64,
    stop: Vec<String>,
    ignore_eos: bool,
}

/// One steering vector as Python gives it: (layer, vector, scale, positions or None). Layers and
/// positions below 0 count from the end, as Python's indices (and TransformerLens's) do.
type SteerArg<'py> = (i64, PyReadonlyArray1<'py, f32>, f32, Option<Vec<i64>>);
/// One patch: (layer, position, row, site).
type PatchArg<'py> = (i64, i64, PyReadonlyArray1<'py, f32>, String);

/// `i` as an index into `n` things, Python's way (-1 the last); IndexError naming `what` beyond.
fn index(i: i64, n: usize, what: impl FnOnce(i64) -> String) -> PyResult<usize> {
    let j = if i < 0 { i + n as i64 } else { i };
    match j >= 0 && (j as usize) < n {
        true => Ok(j as usize),
        false => Err(PyIndexError::new_err(what(i))),
    }
}

#[pyclass(frozen, module = "highrise._highrise")]
struct Engine {
    service: EngineService,
    model: Arc<Llama>,
    tokenizer: Arc<Tokenizer>,
    path: String,
    backend: String,
    /// The model's file or folder (None for random weights), opened for `weight` when first asked.
    file: Option<PathBuf>,
    source: std::sync::OnceLock<Source>,
}

impl Engine {
    fn source(&self) -> PyResult<&Source> {
        if let Some(s) = self.source.get() {
            return Ok(s);
        }
        let file = self.file.as_ref().ok_or_else(|| PyValueError::new_err(format!("{}: random weights are kept in no file", self.path)))?;
        let opened = Source::open(file).map_err(py_err)?;
        Ok(self.source.get_or_init(|| opened))
    }

    fn check_layer(&self, layer: i64, what: &str) -> PyResult<usize> {
        let n = self.model.config.num_hidden_layers;
        index(layer, n, |l| format!("{what}: layer {l} does not exist (the model has {n})"))
    }

    /// A row for the residual stream: its width, every value finite (a NaN would spread through
    /// every later layer and come back as text without a word said).
    fn check_row(&self, row: &[f32], what: &str) -> PyResult<()> {
        self.check_values(row, self.model.config.hidden_size, "the residual stream", what)
    }

    /// `check_row` for a site `of` of width `width`.
    fn check_values(&self, row: &[f32], width: usize, of: &str, what: &str) -> PyResult<()> {
        if row.len() != width {
            return Err(PyValueError::new_err(format!("{what}: {} values, {of} has {width}", row.len())));
        }
        match row.iter().position(|v| !v.is_finite()) {
            Some(i) => Err(PyValueError::new_err(format!("{what}: value {i} is {}, not a finite number", row[i]))),
            None => Ok(()),
        }
    }

    fn steer(&self, s: &SteerArg, tokens: Option<usize>, offset: usize) -> PyResult<Steer> {
        let (layer, vector, scale, positions) = s;
        let layer = self.check_layer(*layer, "steer")?;
        let vector = vector.as_slice()?.to_vec();
        self.check_row(&vector, "steering vector")?;
        if !scale.is_finite() {
            return Err(PyValueError::new_err(format!("steer: scale {scale} is not a finite number")));
        }
        let positions = match (positions, tokens) {
            (Some(ps), Some(t)) => Some(
                ps.iter()
                    .map(|&p| Ok(offset + index(p, t, |p| format!("steer: position {p} is beyond the prompt's {t} tokens"))?))
                    .collect::<PyResult<_>>()?,
            ),
            (None, Some(t)) => Some((offset..offset + t).collect()),
            (_, None) => None,
        };
        Ok(Steer { layer, vector, scale: *scale, positions })
    }

    fn patch(&self, p: &PatchArg, tokens: usize, offset: usize) -> PyResult<Patch> {
        let (layer, position, row, site) = p;
        let site = Site::parse(site).filter(|s| Site::PATCHABLE.contains(s)).ok_or_else(|| {
            PyValueError::new_err(format!("patch: site {site:?} cannot be patched (these can: {})", Site::PATCHABLE.map(Site::name).join(", ")))
        })?;
        let layer = self.check_layer(*layer, "patch")?;
        let position = index(*position, tokens, |p| format!("patch: position {p} is beyond the prompt's {tokens} tokens"))?;
        let values = row.as_slice()?.to_vec();
        let width = site.width(&self.model.config, layer);
        if width == 0 {
            return Err(PyValueError::new_err(format!("patch: layer {layer} of this model has no {}", site.name())));
        }
        let of = if site == Site::ResidPre { "the residual stream" } else { site.name() };
        self.check_values(&values, width, of, "patch row")?;
        Ok(Patch { layer, position: position + offset, values, site })
    }
}

fn array<'py>(py: Python<'py>, values: Vec<f32>, dims: Vec<usize>) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    PyArray1::from_vec(py, values).reshape(dims)
}

#[pymethods]
impl Engine {
    /// Loads a model and starts its engine thread. See `highrise.Model.load`.
    #[staticmethod]
    #[pyo3(signature = (path, backend, dtype, weights, kv_dtype, q8_activations, kv_cache_bytes, threads))]
    #[allow(clippy::too_many_arguments)]
    fn load(
        py: Python<'_>,
        path: Option<PathBuf>,
        backend: String,
        dtype: String,
        weights: String,
        kv_dtype: Option<String>,
        q8_activations: bool,
        kv_cache_bytes: usize,
        threads: Option<usize>,
    ) -> PyResult<Engine> {
        let spec = ModelSpec { model: path, weights, dtype, kv_dtype, q8_activations, repack: true };
        let name = backend.clone();
        let started = py.detach(move || {
            let spec = spec.resolve(&mut |m| eprintln!("{m}"))?;
            let shown = spec.model.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
            let file = spec.model.clone().filter(|p| !p.to_string_lossy().starts_with("random:"));
            let (service, model, tokenizer) = EngineService::start_with(move || {
                // The backend is made on the engine thread, which runs it.
                let backend: Arc<dyn highrise::Backend> = match name.as_str() {
                    "cpu" => Arc::new(highrise_cpu::CpuBackend::new(threads)?),
                    other => highrise::load_backend(other)?,
                };
                let (model, tokenizer) = spec.load(backend, &mut |m| eprintln!("{m}"), &mut |_, _| {})?;
                let config = EngineConfig::with_kv_memory(&model, kv_cache_bytes);
                Ok((Arc::new(model), Arc::new(tokenizer), config))
            })?;
            Ok::<_, Error>((service, model, tokenizer, shown, file))
        });
        let (service, model, tokenizer, path, file) = started.map_err(py_err)?;
        Ok(Engine { service, model, tokenizer, path, backend, file, source: std::sync::OnceLock::new() })
    }

    /// The model file's tensor named `name` as HF names it, dequantized to float32 in HF's layout
    /// (a GGUF's q/k rows back in HF's order, fused projections split, Gemma's norms as w).
    fn weight<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let source = self.source()?;
        let t = source.tensor(name).map_err(py_err)?.ok_or_else(|| {
            PyKeyError::new_err(format!("{name}: no such tensor in {} (weight_names() lists them)", source.path().display()))
        })?;
        let mut out = vec![0f32; t.dims.iter().product()];
        let dims = t.dims.clone();
        py.detach(|| highrise::core::quant::dequantize(t.dtype, &t.data, &mut out))
            .map_err(|e| PyValueError::new_err(format!("{name}: {e}")))?;
        array(py, out, dims)
    }

    /// The HF names of the model file's tensors.
    fn weight_names(&self) -> PyResult<Vec<String>> {
        let mut names = self.source()?.tensor_names();
        names.sort();
        Ok(names)
    }

    /// The model's shape and where it runs, TransformerLens's names where they exist.
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = &self.model.config;
        let d = PyDict::new(py);
        d.set_item("path", &self.path)?;
        d.set_item("backend", &self.backend)?;
        d.set_item("device", self.model.backend.info().device)?;
        d.set_item("dtype", self.model.dtype.to_string())?;
        d.set_item("n_layers", c.num_hidden_layers)?;
        d.set_item("d_model", c.hidden_size)?;
        d.set_item("n_heads", c.num_attention_heads)?;
        d.set_item("n_key_value_heads", c.kv_heads())?;
        d.set_item("d_head", c.head_dim())?;
        d.set_item("d_mlp", c.intermediate_size)?;
        // A mixture of experts' (TransformerLens's names; 0 and None for a dense model).
        d.set_item("num_experts", c.experts())?;
        d.set_item("experts_per_token", (c.experts() > 0).then(|| c.experts_per_token()))?;
        d.set_item("d_expert", (c.experts() > 0).then(|| c.expert_intermediate_size()))?;
        // The layout, as TransformerLens's config says it.
        d.set_item("original_architecture", c.architectures.first())?;
        // TransformerLens's "LNPre": a LayerNorm without weight or bias (OLMo 1).
        d.set_item("normalization_type", match (c.layer_norm(), c.norm_weight()) {
            (true, true) => "LN",
            (true, false) => "LNPre",
            (false, _) => "RMS",
        })?;
        let positions = match (c.learned_positions(), c.alibi_bias() > 0.0) {
            (true, _) => "standard",
            (false, true) => "alibi",
            (false, false) => "rotary",
        };
        d.set_item("positional_embedding_type", positions)?;
        d.set_item("rotary_dim", c.rotary_dim())?;
        // GPT-J's and Cohere's RoPE pairs dims 2i and 2i + 1 (captured q and k are in that order).
        d.set_item("rotary_adjacent_pairs", c.adjacent_rope_pairs())?;
        d.set_item("act_fn", c.activation())?;
        d.set_item("gated_mlp", !c.plain_mlp())?;
        d.set_item("parallel_attn_mlp", c.parallel_residual())?;
        d.set_item("d_vocab", c.vocab_size)?;
        d.set_item("n_ctx", c.max_position_embeddings)?;
        // The row of the learned positions' table position 0 reads (OPT's 2; `W_pos` starts there).
        d.set_item("position_offset", c.position_offset())?;
        let stats = self.service.stats();
        d.set_item("kv_cache_tokens", stats.blocks_total * stats.block_size)?;
        Ok(d)
    }

    fn tokenize(&self, text: &str) -> PyResult<Vec<u32>> {
        self.tokenizer.encode(text, true).map_err(py_err)
    }

    fn detokenize(&self, ids: Vec<u32>) -> PyResult<String> {
        self.tokenizer.decode(&ids).map_err(py_err)
    }

    /// Each id's own piece of text.
    fn pieces(&self, ids: Vec<u32>) -> Vec<String> {
        self.tokenizer.pieces(&ids)
    }

    fn apply_chat_template(&self, messages: Vec<(String, String)>, add_generation_prompt: bool) -> PyResult<String> {
        let messages: Vec<Message> = messages.iter().map(|(r, c)| Message::new(r, c)).collect();
        self.tokenizer.apply_chat_template(&messages, add_generation_prompt).map_err(py_err)
    }

    /// Queues one generation and returns its stream of events. Steering applies at every position,
    /// each patch at its position of the prompt.
    #[pyo3(signature = (prompt, sampling, steer, patch))]
    fn submit(&self, py: Python<'_>, prompt: Vec<u32>, sampling: SamplingArgs, steer: Vec<SteerArg>, patch: Vec<PatchArg>) -> PyResult<Stream> {
        let steer = steer.iter().map(|s| self.steer(s, None, 0)).collect::<PyResult<Vec<_>>>()?;
        let patch = patch.iter().map(|p| self.patch(p, prompt.len(), 0)).collect::<PyResult<Vec<_>>>()?;
        let params = GenerateParams {
            max_tokens: sampling.max_tokens,
            sampling: SamplingParams {
                temperature: sampling.temperature,
                top_k: sampling.top_k,
                top_p: sampling.top_p,
                min_p: sampling.min_p,
                repetition_penalty: sampling.repetition_penalty,
                seed: sampling.seed,
                ..Default::default()
            },
            stop: sampling.stop,
            ignore_eos: sampling.ignore_eos,
            steer,
            patch,
        };
        params.sampling.validate().map_err(|e| PyValueError::new_err(e.to_string()))?;
        if prompt.is_empty() {
            return Err(PyValueError::new_err("the prompt is empty"));
        }
        let request = Request { prompt, params, logprobs: true, top_logprobs: 0 };
        let stream = py.detach(|| self.service.submit_blocking(request)).map_err(service_err)?;
        Ok(Stream { inner: Mutex::new(Some(stream)) })
    }

    /// One forward pass over `prompts` as a batch, capturing `sites` at `layers`, with each prompt's
    /// own steering and patches (positions within the prompt). Returns (logits [sum T, V] or None,
    /// {(site, layer): [sum T, width]}), every prompt's rows in order.
    #[pyo3(signature = (prompts, sites, layers, steer, patch, logits))]
    #[allow(clippy::type_complexity)]
    fn run<'py>(
        &self,
        py: Python<'py>,
        prompts: Vec<Vec<u32>>,
        sites: Vec<String>,
        layers: Option<Vec<i64>>,
        steer: Vec<Vec<SteerArg<'py>>>,
        patch: Vec<Vec<PatchArg<'py>>>,
        logits: bool,
    ) -> PyResult<(Option<Bound<'py, PyArrayDyn<f32>>>, Bound<'py, PyDict>)> {
        if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
            return Err(PyValueError::new_err("a prompt is empty"));
        }
        if steer.len() != prompts.len() || patch.len() != prompts.len() {
            return Err(PyValueError::new_err("steer and patch need one list per prompt"));
        }
        let mut hooks = Hooks::default();
        for name in &sites {
            let site = Site::parse(name).ok_or_else(|| {
                PyValueError::new_err(format!("unknown site {name:?} ({})", Site::names()))
            })?;
            hooks.sites.insert(site);
        }
        if let Some(ls) = &layers {
            hooks.layers = Some(ls.iter().map(|&l| self.check_layer(l, "layers")).collect::<PyResult<_>>()?);
        }
        let vocab = self.model.config.vocab_size;
        if let Some(&bad) = prompts.iter().flatten().find(|&&id| id as usize >= vocab) {
            return Err(PyValueError::new_err(format!("token id {bad} is beyond the vocabulary of {vocab}")));
        }
        let mut offset = 0;
        for (i, p) in prompts.iter().enumerate() {
            for s in &steer[i] {
                hooks.steer.push(self.steer(s, Some(p.len()), offset)?);
            }
            for q in &patch[i] {
                hooks.patch.push(self.patch(q, p.len(), offset)?);
            }
            offset += p.len();
        }
        let total = offset;
        let outcome = py.detach(|| {
            self.service.run_blocking(move |model: &Llama| -> highrise::model::Result<_> {
                let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
                let out = model.prefill_batch_hooked(&refs, Logits::All, Some(&mut hooks))?;
                let logits = if logits { Some(out.to_f32()?) } else { None };
                Ok((logits, hooks.captured))
            })
        });
        let (values, captured) = outcome.map_err(service_err)?.map_err(py_err)?;
        let logits = values.map(|v| array(py, v, vec![total, vocab])).transpose()?;
        let caps = PyDict::new(py);
        for ((site, layer), v) in captured {
            let width = v.len() / total;
            caps.set_item((site.name(), layer), array(py, v, vec![total, width])?)?;
        }
        Ok((logits, caps))
    }

    /// Attention probabilities [heads, T, T] recomputed from one prompt's captured Q [T, Hq*D] and K
    /// of `layer` (scored as that layer scores: its soft-cap and sliding window).
    fn attention<'py>(
        &self,
        py: Python<'py>,
        q: PyReadonlyArray2<'py, f32>,
        k: PyReadonlyArray2<'py, f32>,
        layer: usize,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let c = &self.model.config;
        let scores = c.scores(layer);
        let (hq, hkv, d) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        let t = q.shape()[0];
        if q.shape() != [t, hq * d] || k.shape() != [t, hkv * d] {
            return Err(PyValueError::new_err(format!(
                "attention: q {:?} and k {:?}, expected [T, {}] and [T, {}]",
                q.shape(),
                k.shape(),
                hq * d,
                hkv * d
            )));
        }
        let (q, k) = (q.as_slice()?.to_vec(), k.as_slice()?.to_vec());
        let probs = py.detach(move || attention_probs(&q, &k, [hq, hkv, d], scores));
        array(py, probs, vec![hq, t, t])
    }

    /// The logit lens of streams [N, H] (each a row of some layer's resid_post): the top_k ids [N, k]
    /// and probabilities [N, k].
    #[allow(clippy::type_complexity)]
    fn logit_lens<'py>(
        &self,
        py: Python<'py>,
        stream: PyReadonlyArray2<'py, f32>,
        top_k: usize,
    ) -> PyResult<(Bound<'py, PyArrayDyn<u32>>, Bound<'py, PyArrayDyn<f32>>)> {
        let h = self.model.config.hidden_size;
        let n = stream.shape()[0];
        if stream.shape()[1] != h || n == 0 {
            return Err(PyValueError::new_err(format!("logit_lens: a stream of {:?}, expected [N, {h}]", stream.shape())));
        }
        if top_k == 0 || top_k > self.model.config.vocab_size {
            return Err(PyValueError::new_err(format!("top_k = {top_k} is out of range (1 to the vocabulary)")));
        }
        let rows = stream.as_slice()?.to_vec();
        let tops = py
            .detach(|| self.service.run_blocking(move |model: &Llama| logit_lens(model, &rows, top_k)))
            .map_err(service_err)?
            .map_err(py_err)?;
        let ids: Vec<u32> = tops.iter().flat_map(|t| t.tokens.iter().copied()).collect();
        let probs: Vec<f32> = tops.iter().flat_map(|t| t.probs.iter().copied()).collect();
        Ok((PyArray1::from_vec(py, ids).reshape(vec![n, top_k])?, array(py, probs, vec![n, top_k])?))
    }

    /// Stops the engine thread (the model can no longer run). Called by `Model.close`.
    fn close(&self) {
        self.service.shutdown();
    }
}

/// The events of one generation: (token or None, text, logprob or None, finish reason or None).
#[pyclass(module = "highrise._highrise")]
struct Stream {
    inner: Mutex<Option<RequestStream>>,
}

#[pymethods]
impl Stream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    /// Waits for the next event with the GIL released; Ctrl-C (or any pending signal) cancels the
    /// request and raises.
    #[allow(clippy::type_complexity)]
    fn __next__(&self, py: Python<'_>) -> PyResult<Option<(Option<u32>, String, Option<f32>, Option<&'static str>)>> {
        let Some(mut stream) = self.inner.lock().unwrap_or_else(|p| p.into_inner()).take() else { return Ok(None) };
        let (event, stream): (Option<Event>, RequestStream) = py.detach(move || (stream.blocking_next(), stream));
        if let Err(e) = py.check_signals() {
            return Err(e); // the stream is dropped here, which cancels the request
        }
        let Some(event) = event else { return Ok(None) };
        if let Some(err) = event.error {
            return Err(HighriseError::new_err(err));
        }
        let finish = event.finish.map(|f| match f {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        });
        if finish.is_none() {
            *self.inner.lock().unwrap_or_else(|p| p.into_inner()) = Some(stream);
        }
        Ok(Some((event.token, event.text, event.logprob, finish)))
    }

    /// Stops the generation and frees its cache blocks.
    fn cancel(&self) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

#[pymodule]
fn _highrise(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Engine>()?;
    m.add_class::<Stream>()?;
    m.add("HighriseError", m.py().get_type::<HighriseError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
