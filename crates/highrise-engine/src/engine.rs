//! Continuous batching over the paged KV cache. Requests join the running batch at any step; each
//! step gives every running sequence its next tokens (one when decoding, a chunk of prompt when
//! prefilling) under a per-step token budget, runs them as one batch, and samples where a sequence
//! has reached its end. When the cache is full the newest sequence is preempted: its blocks are
//! freed and it waits to be recomputed, keeping what it generated and its sampler's state, so no
//! request fails because memory filled. Requests that could never fit are refused at submission.

use std::collections::VecDeque;
use std::time::Instant;

use highrise_core::ops::{PagedSeq, SampleParams};
use highrise_model::{Batch, Error, Hooks, KvCache, Llama, Logits, Patch, Result, Steer, Tokenizer};

use crate::blocks::{BlockAllocator, BlockKey};
use crate::request::{eos_ids, FinishReason, GenerateParams, Generation};
use crate::text::TextStream;
use crate::sampling::{forward_and_choose, graph_key, top_log_softmax, Sampled, Sampler};

pub type RequestId = u64;

#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: GenerateParams,
    /// Report each token's log-probability in its event.
    pub logprobs: bool,
    /// Also report this many of the most likely tokens at each step, with their log-probabilities
    /// under the model's own distribution (log-softmax of the logits, before any sampling setting).
    pub top_logprobs: usize,
}

/// What a step produced for one request: a token (and the text it completes), or the end.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub id: RequestId,
    pub token: Option<u32>,
    pub logprob: Option<f32>,
    /// The most likely tokens at this step and their log-probabilities, most likely first (empty
    /// unless the request asked for them).
    pub top_logprobs: Vec<(u32, f32)>,
    /// Text now safe to show (may be empty while a character or stop string is incomplete).
    pub text: String,
    pub finish: Option<FinishReason>,
    /// Why the request ended early, when a step failed (then `finish` is set too).
    pub error: Option<String>,
}

/// What `Engine::warm_up` did: its steps (none where it had nothing to do), the largest batch size
/// among them, and the time they took.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WarmUp {
    pub steps: usize,
    pub max_batch: usize,
    pub secs: f64,
}

#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    pub num_blocks: usize,
    pub block_size: usize,
    /// Most tokens one step runs (decodes count one each; prompts are cut into chunks to fit).
    pub max_batch_tokens: usize,
    /// Most sequences in the running batch.
    pub max_running: usize,
}

impl EngineConfig {
    /// A cache of as many blocks as `kv_bytes` of memory holds for this model.
    pub fn with_kv_memory(model: &Llama, kv_bytes: usize) -> EngineConfig {
        let block_size = crate::blocks::BLOCK_SIZE;
        EngineConfig {
            num_blocks: (kv_bytes / model.kv_block_bytes(block_size)).max(1),
            block_size,
            max_batch_tokens: 512,
            max_running: 64,
        }
    }
}

struct Seq {
    id: RequestId,
    prompt: Vec<u32>,
    output: Vec<u32>,
    logprobs: Vec<f32>,
    want_logprobs: bool,
    top_logprobs: usize,
    params: GenerateParams,
    sampler: Sampler,
    text: TextStream,
    blocks: Vec<u32>,
    /// Tokens whose keys and values are in the cache.
    computed: usize,
    /// Full prompt blocks already filed for sharing.
    registered: usize,
    /// What its K/V depend on besides its tokens (its steering), for the keys of shared blocks.
    salt: BlockKey,
    started: Instant,
}

impl Seq {
    /// Every token of the sequence so far: what the cache must hold before the next sample.
    fn len(&self) -> usize {
        self.prompt.len() + self.output.len()
    }

    fn token(&self, i: usize) -> u32 {
        if i < self.prompt.len() {
            self.prompt[i]
        } else {
            self.output[i - self.prompt.len()]
        }
    }
}

pub struct Engine<'m> {
    model: &'m Llama,
    tokenizer: &'m Tokenizer,
    config: EngineConfig,
    cache: KvCache,
    blocks: BlockAllocator,
    eos: Vec<u32>,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    finished: Vec<(RequestId, Generation)>,
    next_id: RequestId,
    /// Sequences preempted so far (their blocks freed, to be recomputed).
    pub preemptions: u64,
    /// Sample on the host even when the backend could choose (`Backend::argmax`): set from
    /// `HIGHRISE_HOST_SAMPLING=1`, or by `set_host_sampling`, to compare the two.
    host_sampling: bool,
    /// Run decode steps as graphs where the backend can (`Backend::graph_begin`): on unless
    /// `HIGHRISE_GRAPHS=0`, or an op-by-op profile is on; `set_graphs` to compare.
    graphs: bool,
    /// A block kept out of the allocator for the rows that pad a graph step up to the backend's
    /// batch size for it (`Backend::graph_batch`): they write their keys and values there and
    /// attend to them alone. None where the backend pads nothing (or the cache has one block).
    pad_block: Option<u32>,
}

impl<'m> Engine<'m> {
    pub fn model(&self) -> &'m Llama {
        self.model
    }

    pub fn new(model: &'m Llama, tokenizer: &'m Tokenizer, config: EngineConfig) -> Result<Engine<'m>> {
        if config.max_batch_tokens == 0 || config.max_running == 0 || config.block_size == 0 {
            return Err(Error::Input(format!("engine config {config:?} must have no zeros")));
        }
        let mut cache = model.new_kv_cache(config.num_blocks, config.block_size)?;
        // Write the whole cache once: its memory is committed now, as the size it was given says,
        // rather than page by page as blocks are first used (which reads as growth under load).
        for t in cache.k.iter_mut().chain(cache.v.iter_mut()) {
            t.fill(0.0)?;
        }
        let mut blocks = BlockAllocator::new(config.num_blocks, config.block_size);
        // Whether the backend pads any batch this engine may run (one sequence alone: none of CUDA's).
        let pads = (1..=config.max_running.min(8)).any(|n| model.backend.graph_batch(n) > n);
        let pad_block = if pads && config.num_blocks > 1 { blocks.alloc() } else { None };
        Ok(Engine {
            cache,
            blocks,
            pad_block,
            eos: eos_ids(model, tokenizer),
            model,
            tokenizer,
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
            finished: Vec::new(),
            next_id: 0,
            preemptions: 0,
            host_sampling: std::env::var("HIGHRISE_HOST_SAMPLING").is_ok_and(|v| v == "1"),
            graphs: crate::sampling::graphs_enabled(),
        })
    }

    /// Whether decode steps run as graphs where the backend can (see `graphs`).
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs = on;
    }

    /// Whether every token is sampled on the host from downloaded logits (see `host_sampling`).
    pub fn set_host_sampling(&mut self, on: bool) {
        self.host_sampling = on;
    }

    /// Queues a request. Refused, with the reason, if it could never fit: longer than the model's
    /// context, or than the whole cache.
    pub fn submit(&mut self, req: Request) -> Result<RequestId> {
        req.params.sampling.validate().map_err(|e| Error::Input(e.to_string()))?;
        let need = req.prompt.len() + req.params.max_tokens;
        let ctx = self.model.config.context_len();
        if req.prompt.is_empty() {
            return Err(Error::Input("the prompt is empty".into()));
        }
        // A request's first token comes from its prompt's pass, so none would be one anyway.
        if req.params.max_tokens == 0 {
            return Err(Error::Input("max_tokens is 0: a request generates at least one token".into()));
        }
        if let Some(t) = req.prompt.iter().find(|&&t| t as usize >= self.model.config.vocab_size) {
            return Err(Error::Input(format!("token id {t} is outside the vocabulary of {}", self.model.config.vocab_size)));
        }
        if need > ctx {
            return Err(Error::Input(format!(
                "the prompt ({} tokens) plus max_tokens ({}) is {need} tokens, beyond the model's context of {ctx}",
                req.prompt.len(),
                req.params.max_tokens
            )));
        }
        // Interventions are checked here, one request at a time: in a step, one would fail the batch.
        let c = &self.model.config;
        req.params.steer.iter().try_for_each(|s| s.check(c)).map_err(|e| Error::Input(e.to_string()))?;
        for p in &req.params.patch {
            p.check(c).map_err(|e| Error::Input(e.to_string()))?;
            if p.position >= need {
                return Err(Error::Input(format!(
                    "patch of {} at position {}: the request's prompt and completion are {need} tokens at most",
                    p.site.name(),
                    p.position
                )));
            }
        }
        let capacity = self.num_blocks() * self.config.block_size;
        if need > capacity {
            return Err(Error::Input(format!(
                "the request needs {need} tokens of KV cache, but the whole cache holds {capacity}"
            )));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.waiting.push_back(Seq {
            id,
            sampler: Sampler::new(req.params.sampling.clone()),
            text: TextStream::new(&req.params.stop),
            prompt: req.prompt,
            output: Vec::new(),
            logprobs: Vec::new(),
            want_logprobs: req.logprobs,
            top_logprobs: req.top_logprobs,
            salt: intervention_salt(&req.params.steer, &req.params.patch),
            params: req.params,
            blocks: Vec::new(),
            computed: 0,
            registered: 0,
            started: Instant::now(),
        });
        Ok(id)
    }

    /// Stops a request at once and frees its blocks. Returns whether it was still live.
    pub fn cancel(&mut self, id: RequestId) -> bool {
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            let s = self.running.remove(i);
            self.blocks.release(&s.blocks);
            return true;
        }
        if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            let s = self.waiting.remove(i).expect("index from position");
            self.blocks.release(&s.blocks);
            return true;
        }
        false
    }

    pub fn free_blocks(&self) -> usize {
        self.blocks.num_free()
    }

    /// Blocks the requests may use (the cache's, less the one graph steps' padding writes to).
    pub fn num_blocks(&self) -> usize {
        self.blocks.num_blocks() - self.pad_block.is_some() as usize
    }

    pub fn block_size(&self) -> usize {
        self.config.block_size
    }

    /// The requests in the running batch.
    pub fn running_ids(&self) -> Vec<RequestId> {
        self.running.iter().map(|s| s.id).collect()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// The result of a finished request (once).
    pub fn take_finished(&mut self, id: RequestId) -> Option<Generation> {
        let i = self.finished.iter().position(|(f, _)| *f == id)?;
        Some(self.finished.remove(i).1)
    }

    /// Runs one batch. Returns the events it produced (at most one token per sequence).
    pub fn step(&mut self) -> Result<Vec<Event>> {
        self.admit();
        let bs = self.config.block_size;
        let mut budget = self.config.max_batch_tokens;
        // (index into running, tokens this step), oldest first.
        let mut plan: Vec<(usize, usize)> = Vec::new();
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let s = &self.running[i];
            let n = (s.len() - s.computed).min(budget);
            let need_blocks = (s.computed + n).div_ceil(bs);
            if !self.reserve(i, need_blocks) {
                // `reserve` preempted this sequence itself (it was the newest): nothing to run for it.
                continue;
            }
            plan.push((i, n));
            budget -= n;
            i += 1;
        }
        if plan.is_empty() {
            return Ok(Vec::new());
        }
        let (mut tokens, mut positions, mut slots, mut seqs, mut table) = (vec![], vec![], vec![], vec![], vec![]);
        for &(i, n) in &plan {
            let s = &self.running[i];
            for p in s.computed..s.computed + n {
                tokens.push(s.token(p));
                positions.push(p as u32);
                slots.push(s.blocks[p / bs] * bs as u32 + (p % bs) as u32);
            }
            seqs.push(PagedSeq { q_len: n as u32, context_len: (s.computed + n) as u32, blocks_start: table.len() as u32 });
            table.extend_from_slice(&s.blocks);
        }
        // Steering and patching are per request: each vector applies to the batch rows of the request
        // that asked, each patch to the row of its position, in the step that computes it.
        let mut hooks = Hooks::default();
        let mut row = 0;
        for &(i, n) in &plan {
            let s = &self.running[i];
            for st in &s.params.steer {
                hooks.steer.push(Steer { positions: Some((row..row + n).collect()), ..st.clone() });
            }
            for p in s.params.patch.iter().filter(|p| (s.computed..s.computed + n).contains(&p.position)) {
                hooks.patch.push(Patch { position: row + p.position - s.computed, ..p.clone() });
            }
            row += n;
        }
        let hooks = (!hooks.steer.is_empty() || !hooks.patch.is_empty()).then_some(&mut hooks);
        // When no sequence that samples this step has penalties or biases to apply to its logits (nor
        // wants alternatives), the backend chooses: the argmax if all are greedy, else a draw by each
        // one's settings. An id and a log-probability per row come back, not the logits.
        let samples = |s: &Seq, n: usize| s.computed + n >= s.len();
        let mut sampling = plan.iter().map(|&(i, n)| (&self.running[i], n)).filter(|&(s, n)| samples(s, n));
        let on_backend = !self.host_sampling && sampling.all(|(s, _)| !s.sampler.penalizes() && s.top_logprobs == 0);
        let greedy = plan.iter().all(|&(i, n)| !samples(&self.running[i], n) || self.running[i].sampler.is_plain_greedy());
        // A decode step with nothing to steer runs as a graph where the backend can: the same shape
        // step after step (prompt chunks vary too much to be worth it). It is padded up to the batch
        // size of the backend's graph for it, so that one graph serves a range of batch sizes as
        // requests come and go: rows of token 0 at position 0 that write to and attend to the pad
        // block alone, their choices dropped. Padded with graphs off too: a step's numbers do not
        // depend on whether it ran as a graph (a GEMM of other rows may take another algorithm).
        let decode = on_backend && hooks.is_none() && seqs.iter().all(|s| s.q_len == 1);
        let graph = decode && self.graphs;
        if let Some(pad) = self.pad_block.filter(|_| decode) {
            let rows = self.graph_rows(seqs.len());
            if rows > seqs.len() {
                let blocks_start = table.len() as u32;
                table.push(pad);
                tokens.resize(rows, 0);
                positions.resize(rows, 0);
                slots.resize(rows, pad * bs as u32);
                seqs.resize(rows, PagedSeq { q_len: 1, context_len: 1, blocks_start });
            }
        }
        let batch = Batch { tokens: &tokens, positions: &positions, slots: &slots, seqs: &seqs, block_table: &table };
        let (model, cache) = (self.model, &mut self.cache);
        let (logits, chosen) = if on_backend {
            // A row that does not sample this step (mid-prompt, padding) takes the argmax, unused.
            let argmax = SampleParams { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, uniform: 0.0 };
            let draws: Option<Vec<SampleParams>> = (!greedy).then(|| {
                let mut draws: Vec<SampleParams> = plan
                    .iter()
                    .map(|&(i, n)| if samples(&self.running[i], n) { self.running[i].sampler.draw() } else { argmax })
                    .collect();
                draws.resize(seqs.len(), argmax);
                draws
            });
            let key = graph.then(|| graph_key(seqs.len(), !greedy));
            let forward = || model.forward_hooked(&batch, cache, Logits::Last, hooks);
            (Vec::new(), forward_and_choose(&*model.backend, key, draws.as_deref(), forward)?)
        } else {
            (model.forward_hooked(&batch, cache, Logits::Last, hooks)?.to_f32()?, Vec::new())
        };
        let v = self.model.config.vocab_size;
        let mut events = Vec::new();
        let mut done = Vec::new();
        for (row, &(i, n)) in plan.iter().enumerate() {
            let s = &mut self.running[i];
            s.computed += n;
            // File the prompt's newly complete blocks for sharing.
            let full = s.computed.min(s.prompt.len()) / bs;
            if full > s.registered {
                self.blocks.register_prefix(&s.salt, &s.prompt[..full * bs], &s.blocks, s.registered);
                s.registered = full;
            }
            if s.computed < s.len() {
                continue; // mid-prompt: nothing to sample yet
            }
            let (sampled, top_logprobs) = match chosen.get(row) {
                Some(&(token, logprob)) => (Sampled { token, logprob }, Vec::new()),
                None => {
                    let row_logits = &logits[row * v..(row + 1) * v];
                    let top = if s.top_logprobs > 0 { top_log_softmax(row_logits, s.top_logprobs) } else { Vec::new() };
                    (s.sampler.sample(row_logits, &s.prompt, &s.output), top)
                }
            };
            s.output.push(sampled.token);
            s.logprobs.push(sampled.logprob);
            let mut finish = None;
            let mut text = String::new();
            if !s.params.ignore_eos && self.eos.contains(&sampled.token) {
                finish = Some(FinishReason::Stop);
            } else {
                let (piece, stopped) = s.text.push(self.tokenizer, sampled.token)?;
                text = piece;
                if stopped {
                    finish = Some(FinishReason::Stop);
                } else if s.output.len() >= s.params.max_tokens {
                    finish = Some(FinishReason::Length);
                }
            }
            if finish.is_some() {
                text.push_str(&s.text.finish());
                done.push(i);
            }
            events.push(Event {
                id: s.id,
                token: Some(sampled.token),
                logprob: s.want_logprobs.then_some(sampled.logprob),
                top_logprobs,
                text,
                finish,
                error: None,
            });
        }
        done.sort_unstable_by(|a, b| b.cmp(a));
        for i in done {
            let s = self.running.remove(i);
            self.blocks.release(&s.blocks);
            let finish = events.iter().find(|e| e.id == s.id).and_then(|e| e.finish).unwrap_or(FinishReason::Length);
            self.finished.push((s.id, Generation {
                prompt_ids: s.prompt,
                text: s.text.text().to_string(),
                ids: s.output,
                logprobs: s.logprobs,
                finish_reason: finish,
                prefill_secs: 0.0,
                decode_secs: s.started.elapsed().as_secs_f64(),
            }));
        }
        Ok(events)
    }

    /// The rows a decode step of `sequences` runs as: the backend's graph batch size for it
    /// (`Backend::graph_batch`). A bucket is a little above the batch (CUDA's: at most 31 rows
    /// more); an answer far beyond it (a plugin's mistake) pads nothing rather than running a huge
    /// batch.
    fn graph_rows(&self, sequences: usize) -> usize {
        let rows = self.model.backend.graph_batch(sequences);
        if rows > sequences && rows <= 2 * sequences + 32 {
            rows
        } else {
            sequences
        }
    }

    /// Captures the graph of a decode step at every batch size this engine may run, greedy and
    /// sampled, before any request comes (vLLM captures its graphs at start-up too): a server's
    /// first step at each batch size then replays a graph instead of recording, timing cuBLASLt's
    /// algorithms for the new row count and capturing, tens of milliseconds on a GPU in the middle
    /// of its requests' tokens. The steps run rows of padding alone (token 0 at position 1 of the
    /// block kept for padding, so that they read the cache as a decode step does: rows whose keys
    /// are all new attend to them alone), the largest batch first, which sizes the backend's
    /// workspace for the rest; their block table is as long as the whole cache, which sizes the
    /// buffer the graphs read their tables from for any table a full cache makes (a buffer that
    /// grows drops every graph). Runs nothing where graphs are off, the backend pads no batch (it
    /// keeps no graphs per batch size), or sampling is on the host. `progress(done, total)` after
    /// each step.
    pub fn warm_up(&mut self, mut progress: impl FnMut(usize, usize)) -> Result<WarmUp> {
        let started = Instant::now();
        let Some(pad) = self.pad_block.filter(|_| self.graphs && !self.host_sampling) else { return Ok(WarmUp::default()) };
        let mut sizes: Vec<usize> = (1..=self.config.max_running).map(|n| self.graph_rows(n)).collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        sizes.dedup();
        // The largest sampled step twice: its first run grows the workspace and metadata buffers
        // (dropping its own graph), the second keeps it.
        let steps: Vec<(usize, bool)> = std::iter::once((sizes[0], true)).chain(sizes.iter().flat_map(|&n| [(n, true), (n, false)])).collect();
        let table = vec![pad; self.blocks.num_blocks()];
        let bs = self.config.block_size as u32;
        for (i, &(rows, draws)) in steps.iter().enumerate() {
            // Key 1 is in the pad block whatever the block size: every entry of the table is it.
            let (tokens, positions, slots) = (vec![0; rows], vec![1; rows], vec![pad * bs + 1 % bs; rows]);
            let seqs = vec![PagedSeq { q_len: 1, context_len: 2, blocks_start: 0 }; rows];
            let batch = Batch { tokens: &tokens, positions: &positions, slots: &slots, seqs: &seqs, block_table: &table };
            let draw = SampleParams { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, uniform: 0.5 };
            let draws = draws.then(|| vec![draw; rows]);
            let (model, cache) = (self.model, &mut self.cache);
            let forward = || model.forward_hooked(&batch, cache, Logits::Last, None);
            forward_and_choose(&*model.backend, Some(graph_key(rows, draws.is_some())), draws.as_deref(), forward)?;
            progress(i + 1, steps.len());
        }
        Ok(WarmUp { steps: steps.len(), max_batch: sizes[0], secs: started.elapsed().as_secs_f64() })
    }

    /// Steps until every request has finished; returns their results by id.
    pub fn run_to_completion(&mut self) -> Result<Vec<(RequestId, Generation)>> {
        while !self.is_idle() {
            self.step()?;
        }
        Ok(std::mem::take(&mut self.finished))
    }

    /// Moves waiting requests into the running batch while there is room, sharing the full blocks
    /// of any prompt prefix already in the cache. Room means a slot in the batch and free blocks
    /// for every token the sequence has so far plus the next: a preempted sequence is not taken back
    /// until it can run again (re-admitted at once, it was preempted again at the next step, round
    /// after round: the audit saw 95 preemptions for three requests). Admission stays in order: the
    /// first waiting sequence that does not fit stops it.
    fn admit(&mut self) {
        let bs = self.config.block_size;
        while self.running.len() < self.config.max_running {
            let Some(mut s) = self.waiting.pop_front() else { break };
            if s.blocks.is_empty() {
                // Share whole blocks before the block of the last token to compute, which must be
                // computed (for its logits) into a block of this sequence's own.
                let shareable = (s.len() - 1) / bs;
                s.blocks = self.blocks.share_prefix(&s.salt, &s.prompt[..shareable.min(s.prompt.len() / bs) * bs]);
                let need = (s.len() + 1).div_ceil(bs).saturating_sub(s.blocks.len());
                if need > self.blocks.num_free() && !self.running.is_empty() {
                    self.blocks.release(&s.blocks);
                    s.blocks.clear();
                    self.waiting.push_front(s);
                    break;
                }
                s.computed = s.blocks.len() * bs;
                s.registered = s.blocks.len();
            }
            self.running.push(s);
        }
    }

    /// Makes sequence `i` hold `need` blocks, preempting the newest sequences while the cache is
    /// full. Returns false if sequence `i` itself had to be preempted.
    fn reserve(&mut self, i: usize, need: usize) -> bool {
        while self.running[i].blocks.len() < need {
            match self.blocks.alloc() {
                Some(b) => self.running[i].blocks.push(b),
                None => {
                    let newest = self.running.len() - 1;
                    self.preempt(newest);
                    if newest == i {
                        return false;
                    }
                }
            }
        }
        true
    }

    /// Frees a running sequence's blocks and sends it back to the front of the queue; it keeps its
    /// output and sampler, and will recompute its cache when admitted again.
    fn preempt(&mut self, i: usize) {
        let mut s = self.running.remove(i);
        self.blocks.release(&s.blocks);
        s.blocks.clear();
        s.computed = 0;
        s.registered = 0;
        self.preemptions += 1;
        self.waiting.push_front(s);
    }
}

/// The salt of a request's shared blocks: its steering (each vector's layer, scale and values)
/// changes the keys and values of every token it runs over, and a patch (its site, layer, position
/// and values) those from its position on, so a steered or patched prompt's blocks are shared only
/// with requests steered and patched the same way (neither: the plain salt, as before).
fn intervention_salt(steer: &[Steer], patch: &[Patch]) -> BlockKey {
    let steered = steer.iter().flat_map(|st| {
        let head = [(st.layer as u64).to_le_bytes().to_vec(), st.scale.to_le_bytes().to_vec()];
        head.into_iter().flatten().chain(st.vector.iter().flat_map(|v| v.to_le_bytes()))
    });
    let patched = patch.iter().flat_map(|p| {
        let head = [p.site.name().as_bytes().to_vec(), (p.layer as u64).to_le_bytes().to_vec(), (p.position as u64).to_le_bytes().to_vec()];
        head.into_iter().flatten().chain(p.values.iter().flat_map(|v| v.to_le_bytes()))
    });
    // Steering alone salts as it always did (its blocks stay those of requests before patching).
    let mut bytes: Vec<u8> = steered.collect();
    if !patch.is_empty() {
        bytes.extend(b"patch");
        bytes.extend(patched);
    }
    crate::blocks::salt(&[&bytes])
}
