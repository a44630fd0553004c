//! The engine as an async service: a thread of its own runs the batching loop; callers submit
//! requests from any thread or task and read each request's events from a stream. Dropping a stream
//! (a client that went away) cancels its request and frees its blocks at once.
//!
//! The engine survives its own faults: a step that fails or panics ends the requests it was running
//! with the cause and goes on serving the rest; a job that panics fails alone. Should the thread
//! die all the same, `is_running` says so (a server then reports itself unhealthy and exits) and
//! every call answers `ServiceError::Stopped`.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use highrise_model::{Error, Llama, Result, Tokenizer};
use tokio::sync::{mpsc, oneshot};

use crate::engine::{Engine, EngineConfig, Event, Request, RequestId, WarmUp};

/// Work run on the engine thread between steps, with the model (a capture pass, say).
pub type Job = Box<dyn FnOnce(&Llama) + Send>;

/// Why the service did not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The engine thread is gone: nothing will be served again (a server answers 503).
    #[error("the engine has stopped")]
    Stopped,
    /// The request itself was refused: it could never fit, or a setting is out of range (400).
    #[error("{0}")]
    Rejected(String),
    /// The work was taken and failed (a job that panicked, say) (500).
    #[error("{0}")]
    Failed(String),
}

/// Faults put in on purpose, for the tests that show the engine survives them.
#[doc(hidden)]
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// The next step panics inside the engine, as a bug in it would.
    PanicInStep,
    /// The engine thread panics outside any guard and dies.
    KillThread,
}

enum Command {
    Submit(Request, mpsc::UnboundedSender<Event>, oneshot::Sender<Result<RequestId>>),
    Cancel(RequestId),
    Run(Job),
    Fault(Fault),
    Shutdown,
}

/// A panic's message, for the errors that report it.
fn panic_message(p: &(dyn Any + Send)) -> String {
    p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_else(|| "a panic".into())
}

/// Marks the engine stopped when the thread ends, however it ends (unwinding included).
struct Alive(Arc<AtomicBool>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
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
    /// What the engine did before it took requests.
    pub warm_up: WarmUp,
    commands: Mutex<Sender<Command>>,
    stats: Arc<Mutex<Stats>>,
    alive: Arc<AtomicBool>,
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
        let alive = Arc::new(AtomicBool::new(true));
        let guard = Alive(alive.clone());
        let thread = std::thread::Builder::new()
            .name("highrise-engine".into())
            .spawn(move || {
                let _alive = guard;
                let (model, tokenizer, config) = match load() {
                    Ok(loaded) => loaded,
                    Err(e) => return drop(ready_tx.send(Err(e))),
                };
                // Graphs captured before the first request, not in the middle of requests' tokens.
                let warmed = Engine::new(&model, &tokenizer, config).and_then(|mut engine| {
                    let warm_up = engine.warm_up(|_, _| ()).map_err(|e| Error::Input(format!("warming up the decode step's graphs: {e}")))?;
                    Ok((engine, warm_up))
                });
                match warmed {
                    Ok((engine, warm_up)) => {
                        *thread_stats.lock().unwrap_or_else(|p| p.into_inner()) = Stats {
                            blocks_free: engine.free_blocks(),
                            blocks_total: engine.num_blocks(),
                            block_size: engine.block_size(),
                            ..Stats::default()
                        };
                        let _ = ready_tx.send(Ok((model.clone(), tokenizer.clone(), warm_up)));
                        run(engine, rx, thread_stats);
                    }
                    Err(e) => drop(ready_tx.send(Err(e))),
                }
            })
            .map_err(|e| Error::Input(format!("cannot start the engine thread: {e}")))?;
        let (model, tokenizer, warm_up) =
            ready_rx.recv().map_err(|_| Error::Input("the engine thread died while starting".into()))??;
        let service = EngineService { warm_up, commands: Mutex::new(tx), stats, alive, thread: Mutex::new(Some(thread)) };
        Ok((service, model, tokenizer))
    }

    fn sender(&self) -> Sender<Command> {
        self.commands.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether the engine thread is alive and serving.
    pub fn is_running(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// Queues a request; its events arrive on the returned stream. Refused requests (that could never
    /// fit, or have invalid settings) are an error here.
    pub async fn submit(&self, req: Request) -> Result<RequestStream, ServiceError> {
        let (reply, events, commands) = self.send_submit(req)?;
        Self::submitted(reply.await, events, commands)
    }

    /// `submit` for callers outside an async runtime (it blocks until the engine has taken the
    /// request, one step at most).
    pub fn submit_blocking(&self, req: Request) -> Result<RequestStream, ServiceError> {
        let (reply, events, commands) = self.send_submit(req)?;
        Self::submitted(reply.blocking_recv(), events, commands)
    }

    #[allow(clippy::type_complexity)]
    fn send_submit(
        &self,
        req: Request,
    ) -> Result<(oneshot::Receiver<Result<RequestId>>, mpsc::UnboundedReceiver<Event>, Sender<Command>), ServiceError> {
        let (events_tx, events) = mpsc::unbounded_channel();
        let (reply_tx, reply) = oneshot::channel();
        let commands = self.sender();
        commands.send(Command::Submit(req, events_tx, reply_tx)).map_err(|_| ServiceError::Stopped)?;
        Ok((reply, events, commands))
    }

    fn submitted(
        reply: Result<Result<RequestId>, oneshot::error::RecvError>,
        events: mpsc::UnboundedReceiver<Event>,
        commands: Sender<Command>,
    ) -> Result<RequestStream, ServiceError> {
        let id = reply.map_err(|_| ServiceError::Stopped)?.map_err(|e| match e {
            Error::Input(m) => ServiceError::Rejected(m),
            other => ServiceError::Failed(other.to_string()),
        })?;
        Ok(RequestStream { id, events, commands, finished: false })
    }

    /// Runs `job` on the engine thread between two steps and returns its result: model work that
    /// should not compete with the batch for the backend (a capture pass, for instance). A job that
    /// panics fails alone; the engine carries on.
    pub async fn run<T: Send + 'static>(&self, job: impl FnOnce(&Llama) -> T + Send + 'static) -> Result<T, ServiceError> {
        Self::ran(self.send_job(job)?.await)
    }

    /// `run` for callers outside an async runtime.
    pub fn run_blocking<T: Send + 'static>(&self, job: impl FnOnce(&Llama) -> T + Send + 'static) -> Result<T, ServiceError> {
        Self::ran(self.send_job(job)?.blocking_recv())
    }

    #[allow(clippy::type_complexity)]
    fn send_job<T: Send + 'static>(
        &self,
        job: impl FnOnce(&Llama) -> T + Send + 'static,
    ) -> Result<oneshot::Receiver<std::result::Result<T, String>>, ServiceError> {
        let (reply_tx, reply) = oneshot::channel();
        let job: Job = Box::new(move |model| {
            let outcome = catch_unwind(AssertUnwindSafe(|| job(model)));
            drop(reply_tx.send(outcome.map_err(|p| panic_message(&*p))));
        });
        self.sender().send(Command::Run(job)).map_err(|_| ServiceError::Stopped)?;
        Ok(reply)
    }

    fn ran<T>(reply: Result<std::result::Result<T, String>, oneshot::error::RecvError>) -> Result<T, ServiceError> {
        reply.map_err(|_| ServiceError::Stopped)?.map_err(|m| ServiceError::Failed(format!("the job panicked: {m}")))
    }

    /// Puts a fault into the engine thread (tests of its survival).
    #[doc(hidden)]
    pub fn inject_fault(&self, fault: Fault) {
        let _ = self.sender().send(Command::Fault(fault));
    }

    /// Stops a request and frees its blocks.
    pub fn cancel(&self, id: RequestId) {
        let _ = self.sender().send(Command::Cancel(id));
    }

    pub fn stats(&self) -> Stats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Cancels whatever runs and stops the engine thread.
    pub fn shutdown(&self) {
        let _ = self.sender().send(Command::Shutdown);
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
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
    let mut panic_next_step = false;
    let publish = |engine: &Engine, generated: u64| {
        *stats.lock().unwrap_or_else(|p| p.into_inner()) = Stats {
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
                Command::Fault(Fault::PanicInStep) => panic_next_step = true,
                Command::Fault(Fault::KillThread) => panic!("fault injected: the engine thread dies"),
                Command::Shutdown => {
                    for (id, _) in streams.drain(..) {
                        engine.cancel(id);
                    }
                    return;
                }
            }
        }
        if !engine.is_idle() {
            let inject = std::mem::take(&mut panic_next_step);
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                if inject {
                    panic!("fault injected into a step");
                }
                engine.step()
            }))
            .unwrap_or_else(|p| Err(Error::Input(format!("the engine panicked during a step: {}", panic_message(&*p)))));
            match outcome {
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
                    // A step that failed or panicked ends the requests it was running with the
                    // cause (their state may be half-updated); those still waiting, and new ones,
                    // are served as ever.
                    for id in engine.running_ids() {
                        engine.cancel(id);
                        let Some(i) = streams.iter().position(|(s, _)| *s == id) else { continue };
                        let (_, tx) = streams.remove(i);
                        let _ = tx.send(Event {
                            id,
                            token: None,
                            logprob: None,
                            top_logprobs: Vec::new(),
                            text: String::new(),
                            finish: Some(crate::request::FinishReason::Stop),
                            error: Some(err.to_string()),
                        });
                    }
                }
            }
        }
        publish(&engine, generated);
    }
}
