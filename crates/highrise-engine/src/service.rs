//! The engine as an async service: a thread of its own runs the batching loop; callers submit
//! requests from any thread or task and read each request's events from a stream. Dropping a stream
//! (a client that went away) cancels its request and frees its blocks at once.

use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use highrise_model::{Error, Llama, Result, Tokenizer};
use tokio::sync::{mpsc, oneshot};

use crate::engine::{Engine, EngineConfig, Event, Request, RequestId};

/// Work run on the engine thread between steps, with the model (a capture pass, say).
pub type Job = Box<dyn FnOnce(&Llama) + Send>;

enum Command {
    Submit(Request, mpsc::UnboundedSender<Event>, oneshot::Sender<Result<RequestId>>),
    Cancel(RequestId),
    Run(Job),
    Shutdown,
}

/// What the engine is doing, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub running: usize,
    pub waiting: usize,
    pub blocks_free: usize,
    pub blocks_total: usize,
    pub block_size: usize,
    pub preemptions: u64,
    pub tokens_generated: u64,
}

/// A handle to the engine thread. Cheap to share behind an `Arc`.
pub struct EngineService {
    commands: Mutex<Sender<Command>>,
    stats: Arc<Mutex<Stats>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// The events of one request, in order; the last one carries `finish`.
pub struct RequestStream {
    pub id: RequestId,
    events: mpsc::UnboundedReceiver<Event>,
    commands: Sender<Command>,
    finished: bool,
}

impl RequestStream {
    /// The next event, or `None` once the request has finished (or was cancelled).
    pub async fn next(&mut self) -> Option<Event> {
        let e = self.events.recv().await;
        self.finished |= e.as_ref().is_none_or(|e| e.finish.is_some());
        e
    }

    /// `next` for callers outside an async runtime.
    pub fn blocking_next(&mut self) -> Option<Event> {
        let e = self.events.blocking_recv();
        self.finished |= e.as_ref().is_none_or(|e| e.finish.is_some());
        e
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.commands.send(Command::Cancel(self.id));
        }
    }
}

impl EngineService {
    /// Starts the engine thread.
    pub fn start(model: Arc<Llama>, tokenizer: Arc<Tokenizer>, config: EngineConfig) -> Result<EngineService> {
        Self::start_with(move || Ok((model, tokenizer, config))).map(|(service, _, _)| service)
    }

    /// Starts the engine thread and builds the model on it with `load` (which also picks the engine
    /// config, knowing the model). Prefer this: a backend made on the thread that runs it can
    /// compute on that thread directly (the CPU backend's pool adopts its creating thread) instead
    /// of handing every op to another. Returns the model and tokenizer too, for the caller's own use.
    #[allow(clippy::type_complexity)]
    pub fn start_with<F>(load: F) -> Result<(EngineService, Arc<Llama>, Arc<Tokenizer>)>
    where
        F: FnOnce() -> Result<(Arc<Llama>, Arc<Tokenizer>, EngineConfig)> + Send + 'static,
    {
        let (tx, rx) = channel();
        let stats = Arc::new(Mutex::new(Stats::default()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("highrise-engine".into())
            .spawn(move || {
                let (model, tokenizer, config) = match load() {
                    Ok(loaded) => loaded,
                    Err(e) => return drop(ready_tx.send(Err(e))),
                };
                match Engine::new(&model, &tokenizer, config) {
                    Ok(engine) => {
                        *thread_stats.lock().expect("stats lock") = Stats {
                            blocks_free: engine.free_blocks(),
                            blocks_total: engine.num_blocks(),
                            block_size: engine.block_size(),
                            ..Stats::default()
                        };
                        let _ = ready_tx.send(Ok((model.clone(), tokenizer.clone())));
                        run(engine, rx, thread_stats);
                    }
                    Err(e) => drop(ready_tx.send(Err(e))),
                }
            })
            .map_err(|e| Error::Input(format!("cannot start the engine thread: {e}")))?;
        let (model, tokenizer) =
            ready_rx.recv().map_err(|_| Error::Input("the engine thread died while starting".into()))??;
        let service = EngineService { commands: Mutex::new(tx), stats, thread: Mutex::new(Some(thread)) };
        Ok((service, model, tokenizer))
    }

    fn sender(&self) -> Sender<Command> {
        self.commands.lock().expect("commands lock").clone()
    }

    /// Queues a request; its events arrive on the returned stream. Refused requests (that could never
    /// fit, or have invalid settings) are an error here.
    pub async fn submit(&self, req: Request) -> Result<RequestStream> {
        let (events_tx, events) = mpsc::unbounded_channel();
        let (reply_tx, reply) = oneshot::channel();
        let commands = self.sender();
        commands
            .send(Command::Submit(req, events_tx, reply_tx))
            .map_err(|_| Error::Input("the engine has stopped".into()))?;
        let id = reply.await.map_err(|_| Error::Input("the engine has stopped".into()))??;
        Ok(RequestStream { id, events, commands, finished: false })
    }

    /// Runs `job` on the engine thread between two steps and returns its result: model work that
    /// should not compete with the batch for the backend (a capture pass, for instance).
    pub async fn run<T: Send + 'static>(&self, job: impl FnOnce(&Llama) -> T + Send + 'static) -> Result<T> {
        let (reply_tx, reply) = oneshot::channel();
        let job: Job = Box::new(move |model| drop(reply_tx.send(job(model))));
        self.sender().send(Command::Run(job)).map_err(|_| Error::Input("the engine has stopped".into()))?;
        reply.await.map_err(|_| Error::Input("the engine has stopped".into()))
    }

    /// Stops a request and frees its blocks.
    pub fn cancel(&self, id: RequestId) {
        let _ = self.sender().send(Command::Cancel(id));
    }

    pub fn stats(&self) -> Stats {
        *self.stats.lock().expect("stats lock")
    }

    /// Cancels whatever runs and stops the engine thread.
    pub fn shutdown(&self) {
        let _ = self.sender().send(Command::Shutdown);
        if let Some(t) = self.thread.lock().expect("thread lock").take() {
            let _ = t.join();
        }
    }
}

impl Drop for EngineService {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The engine thread: apply commands, step while there is work, route events, keep stats.
fn run(mut engine: Engine, commands: Receiver<Command>, stats: Arc<Mutex<Stats>>) {
    let mut streams: Vec<(RequestId, mpsc::UnboundedSender<Event>)> = Vec::new();
    let mut generated = 0u64;
    let publish = |engine: &Engine, generated: u64| {
        *stats.lock().expect("stats lock") = Stats {
            running: engine.num_running(),
            waiting: engine.num_waiting(),
            blocks_free: engine.free_blocks(),
            blocks_total: engine.num_blocks(),
            block_size: engine.block_size(),
            preemptions: engine.preemptions,
            tokens_generated: generated,
        };
    };
    loop {
        // Wait for work when idle; otherwise take what has arrived and keep stepping.
        let first = if engine.is_idle() {
            match commands.recv() {
                Ok(c) => Some(c),
                Err(_) => return,
            }
        } else {
            None
        };
        let mut pending: Vec<Command> = first.into_iter().collect();
        loop {
            match commands.try_recv() {
                Ok(c) => pending.push(c),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    if engine.is_idle() {
                        return;
                    }
                    break;
                }
            }
        }
        for c in pending {
            match c {
                Command::Submit(req, tx, reply) => {
                    let r = engine.submit(req);
                    if let Ok(id) = r {
                        streams.push((id, tx));
                    }
                    let _ = reply.send(r);
                }
                Command::Cancel(id) => {
                    engine.cancel(id);
                    streams.retain(|(s, _)| *s != id);
                }
                Command::Run(job) => job(engine.model()),
                Command::Shutdown => {
                    for (id, _) in streams.drain(..) {
                        engine.cancel(id);
                    }
                    return;
                }
            }
        }
        if !engine.is_idle() {
            match engine.step() {
                Ok(events) => {
                    // Finished requests give their blocks back and the stats are published before
                    // any event goes out: a client that has seen its last token sees the engine
                    // without it.
                    generated += events.len() as u64;
                    for e in events.iter().filter(|e| e.finish.is_some()) {
                        let _ = engine.take_finished(e.id);
                    }
                    publish(&engine, generated);
                    for e in events {
                        let Some(i) = streams.iter().position(|(id, _)| *id == e.id) else { continue };
                        let done = e.finish.is_some();
                        // A receiver that is gone means its client left: cancel the request.
                        if streams[i].1.send(e).is_err() && !done {
                            engine.cancel(streams[i].0);
                        }
                        if done || streams[i].1.is_closed() {
                            streams.remove(i);
                        }
                    }
                }
                Err(err) => {
                    // A failed step ends every running request with the error; the engine itself
                    // carries on for new requests.
                    for (id, tx) in streams.drain(..) {
                        let _ = tx.send(Event {
                            id,
                            token: None,
                            logprob: None,
                            top_logprobs: Vec::new(),
                            text: String::new(),
                            finish: Some(crate::generate::FinishReason::Stop),
                            error: Some(err.to_string()),
                        });
                        engine.cancel(id);
                    }
                }
            }
        }
        publish(&engine, generated);
    }
}
