//! A team of threads that stay awake between ops.
//!
//! Decoding one token runs a few hundred ops of tens of microseconds each. A pool whose idle workers
//! go to sleep (rayon's do after some tens of microseconds without work) has to wake them for every
//! op, and on a virtual machine the wake-up of an idle CPU takes about as long as the op: the calling
//! thread ends up doing most of the work alone. The team's helpers instead spin on an epoch counter
//! for a while after each job (`SPIN`), so a job posted during a decode loop is picked up within a
//! fraction of a microsecond; after `SPIN` without work they park, and cost nothing while idle.
//!
//! A job is `n` items; the caller and the helpers claim items one at a time from a shared counter, so
//! a helper that starts late (or is descheduled) just takes fewer. Once the caller runs out of items
//! it withdraws the job and waits only for the helpers that joined it: a helper the OS has not
//! scheduled yet (another process on the same cores, more threads than cores) holds nobody up, it
//! finds the job gone when it runs. Waiting threads yield the core when others want it, so a
//! machine shared with other work slows the team down in proportion, not by a scheduler time slice
//! per op (three engines on two cores decoded 17x slower in all before). A panic in an item is
//! carried to the caller and resumed there.

use std::any::Any;
use std::ops::Range;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle helper spins before it parks.
const SPIN: Duration = Duration::from_millis(5);

/// One posted job: `n` items of `f`, claimed through `next`.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    n: usize,
    next: AtomicUsize,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

impl Job<'_> {
    /// Claims and runs items until none are left; a panic stops this thread's share and is kept.
    fn work(&self) {
        let run = || loop {
            let i = self.next.fetch_add(1, Relaxed);
            if i >= self.n {
                break;
            }
            (self.f)(i);
        };
        if let Err(p) = catch_unwind(AssertUnwindSafe(run)) {
            // Let the others stop claiming; keep the first panic.
            self.next.store(self.n, Relaxed);
            self.panic.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(p);
        }
    }
}

struct Shared {
    /// Bumped once per job; helpers wait for it to change.
    epoch: AtomicUsize,
    /// The current job (a `Job` on the caller's stack), null once the caller has withdrawn it.
    job: AtomicPtr<()>,
    /// Helpers that joined a job and have not left it: counted before they read `job`, so the caller,
    /// which withdraws the job before it waits for this to reach 0, never returns under one.
    active: AtomicUsize,
    stop: AtomicBool,
    /// Parked helpers, changed under `park`'s lock.
    parked: AtomicUsize,
    park: Mutex<()>,
    wake: Condvar,
}

pub struct Team {
    shared: Arc<Shared>,
    helpers: Vec<JoinHandle<()>>,
    /// Serializes callers: one job at a time.
    calling: Mutex<()>,
}

impl Team {
    /// A team of `threads` in all: the calling thread of each job plus `threads - 1` helpers.
    pub fn new(threads: usize, name: &str) -> std::io::Result<Team> {
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            active: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            parked: AtomicUsize::new(0),
            park: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut team = Team { shared, helpers: Vec::new(), calling: Mutex::new(()) };
        for i in 1..threads.max(1) {
            let shared = team.shared.clone();
            let handle = std::thread::Builder::new().name(format!("{name}-{i}")).spawn(move || helper(&shared))?;
            team.helpers.push(handle);
        }
        Ok(team)
    }

    /// Threads that work on a job: the caller and the helpers.
    pub fn threads(&self) -> usize {
        self.helpers.len() + 1
    }

    /// Runs `f(i)` for every `i` in `0..n`, spread over the team; returns when all are done. Called
    /// from inside a job, it runs inline.
    pub fn for_each(&self, n: usize, f: impl Fn(usize) + Sync) {
        if n <= 1 || self.helpers.is_empty() || IN_JOB.get() {
            (0..n).for_each(f);
            return;
        }
        IN_JOB.set(true);
        let _in_job = ResetOnDrop;
        let _calling = self.calling.lock().unwrap_or_else(|e| e.into_inner());
        let job = Job { f: &f, n, next: AtomicUsize::new(0), panic: Mutex::new(None) };
        let s = &*self.shared;
        s.job.store(&job as *const Job as *mut (), SeqCst);
        s.epoch.fetch_add(1, SeqCst);
        if s.parked.load(SeqCst) > 0 {
            let _lock = s.park.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        job.work();
        // The job lives on this stack: withdraw it, then wait for the helpers that joined it (they
        // are on their last items). One that has not joined yet will find it gone.
        s.job.store(std::ptr::null_mut(), SeqCst);
        let mut spins = 0u32;
        while s.active.load(SeqCst) != 0 {
            pause(&mut spins);
        }
        if let Some(p) = job.panic.into_inner().unwrap_or_else(|e| e.into_inner()) {
            resume_unwind(p);
        }
    }
}

thread_local! {
    /// Whether this thread is working on a job (a nested `for_each` then runs inline).
    static IN_JOB: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

struct ResetOnDrop;

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        IN_JOB.set(false);
    }
}

/// A mutable slice that the items of one job write at disjoint places.
struct Parts<T>(*mut T, usize);

// SAFETY: items only ever touch disjoint ranges (see `Parts::get`), and T itself is Send.
unsafe impl<T: Send> Sync for Parts<T> {}

impl<T> Parts<T> {
    /// # Safety
    /// No two live results may overlap.
    #[allow(clippy::mut_from_ref)]
    unsafe fn get(&self, range: Range<usize>) -> &mut [T] {
        debug_assert!(range.end <= self.1);
        std::slice::from_raw_parts_mut(self.0.add(range.start), range.len())
    }
}

impl Team {
    /// Rows `0..rows` cut into pieces for a job: a few per thread (so a late thread takes fewer),
    /// each of at least `min_rows` rows. Returns the piece length.
    fn piece(&self, rows: usize, min_rows: usize) -> usize {
        rows.div_ceil(self.threads() * 4).max(min_rows).max(1)
    }

    /// `f(first_row, piece)` over `out` cut into pieces of rows of `row_len` elements (the last row
    /// may be shorter, as with `chunks_mut`), at least `min_rows` rows each, spread over the team.
    pub fn rows<T: Send>(&self, out: &mut [T], row_len: usize, min_rows: usize, f: impl Fn(usize, &mut [T]) + Sync) {
        let (len, row_len) = (out.len(), row_len.max(1));
        let rows = len.div_ceil(row_len);
        let piece = self.piece(rows, min_rows);
        let parts = Parts(out.as_mut_ptr(), len);
        self.for_each(rows.div_ceil(piece), |i| {
            let r = i * piece..((i + 1) * piece).min(rows);
            // SAFETY: piece i covers rows r alone.
            f(r.start, unsafe { parts.get(r.start * row_len..(r.end * row_len).min(len)) })
        });
    }

    /// As `rows`, over two outputs cut at the same whole rows (`a` rows of `a_len`, `b` rows of
    /// `b_len`).
    #[allow(clippy::too_many_arguments)]
    pub fn rows2<A: Send, B: Send>(
        &self,
        a: &mut [A],
        a_len: usize,
        b: &mut [B],
        b_len: usize,
        min_rows: usize,
        f: impl Fn(usize, &mut [A], &mut [B]) + Sync,
    ) {
        let rows = (a.len() / a_len.max(1)).min(b.len() / b_len.max(1));
        let piece = self.piece(rows, min_rows);
        let (pa, pb) = (Parts(a.as_mut_ptr(), a.len()), Parts(b.as_mut_ptr(), b.len()));
        self.for_each(rows.div_ceil(piece), |i| {
            let r = i * piece..((i + 1) * piece).min(rows);
            // SAFETY: piece i covers rows r of each output alone.
            let (a, b) = unsafe { (pa.get(r.start * a_len..r.end * a_len), pb.get(r.start * b_len..r.end * b_len)) };
            f(r.start, a, b)
        });
    }

    /// `[f(0), .., f(n - 1)]`, computed over the team.
    pub fn map<R: Send>(&self, n: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
        let mut out: Vec<Option<R>> = (0..n).map(|_| None).collect();
        self.rows(&mut out, 1, 1, |i0, slots| slots.iter_mut().enumerate().for_each(|(j, s)| *s = Some(f(i0 + j))));
        out.into_iter().map(|r| r.expect("every item ran")).collect()
    }
}

fn helper(s: &Shared) {
    IN_JOB.set(true);
    let mut seen = 0;
    loop {
        let idle_since = Instant::now();
        let mut spins = 0u32;
        loop {
            if s.stop.load(Relaxed) {
                return;
            }
            let e = s.epoch.load(Acquire);
            if e != seen {
                seen = e;
                break;
            }
            pause(&mut spins);
            if spins.is_multiple_of(1024) && idle_since.elapsed() > SPIN {
                let mut lock = s.park.lock().unwrap_or_else(|e| e.into_inner());
                s.parked.fetch_add(1, SeqCst);
                while s.epoch.load(SeqCst) == seen && !s.stop.load(SeqCst) {
                    lock = s.wake.wait(lock).unwrap_or_else(|e| e.into_inner());
                }
                s.parked.fetch_sub(1, SeqCst);
            }
        }
        #[cfg(test)]
        while tests::HOLD_HELPERS.load(SeqCst) {
            std::thread::yield_now();
        }
        // Join first, then look: a job still posted now stays alive until this helper leaves (its
        // caller withdraws it before waiting for `active` to reach 0). It may be a later job than
        // the epoch seen, which is as good; or none, the caller having finished without us.
        s.active.fetch_add(1, SeqCst);
        let job = s.job.load(SeqCst) as *const Job;
        if !job.is_null() {
            // SAFETY: see above; the pointer was posted by a caller that is waiting on `active`.
            unsafe { &*job }.work();
        }
        s.active.fetch_sub(1, SeqCst);
    }
}

/// One turn of a wait loop: a spin hint, and from the 64th turn on a yield of the core every 64
/// turns, so that a waiting thread gives way to threads that have work (its own team's, when the
/// machine has fewer cores than busy threads) at the cost of a syscall when nobody else is runnable.
#[inline]
fn pause(spins: &mut u32) {
    std::hint::spin_loop();
    *spins = spins.wrapping_add(1);
    if spins.is_multiple_of(64) {
        std::thread::yield_now();
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        {
            let _lock = self.shared.park.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for h in self.helpers.drain(..) {
            let _ = h.join();
        }
    }
}

/// Elementwise ops smaller than this many elements run on the calling thread: waking the pool for
/// them costs more than the work (decode runs hundreds of such ops per token).
pub const PAR_MIN_ELEMS: usize = 1 << 15;

/// The least number of items of `len` elements each a parallel task should take, so that small ops
/// are not split at all.
pub fn min_items(len: usize) -> usize {
    (PAR_MIN_ELEMS / len.max(1)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_runs_once() {
        let team = Team::new(3, "test").unwrap();
        for n in [0, 1, 2, 7, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            team.for_each(n, |i| {
                hits[i].fetch_add(1, Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Relaxed) == 1), "n = {n}");
        }
    }

    #[test]
    fn a_panic_reaches_the_caller_and_the_team_carries_on() {
        let team = Team::new(2, "test").unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| team.for_each(100, |i| assert!(i != 57, "item 57"))));
        assert!(r.is_err());
        let sum = AtomicUsize::new(0);
        team.for_each(100, |i| {
            sum.fetch_add(i, Relaxed);
        });
        assert_eq!(sum.load(Relaxed), 4950);
    }

    #[test]
    fn rows_cover_every_row_once_and_map_keeps_order() {
        let team = Team::new(2, "test").unwrap();
        for (rows, min) in [(0, 1), (1, 1), (5, 1), (100, 7), (1000, 1)] {
            let (mut a, mut b) = (vec![0usize; rows * 3], vec![0usize; rows]);
            team.rows2(&mut a, 3, &mut b, 1, min, |r0, a, b| {
                a.iter_mut().enumerate().for_each(|(i, v)| *v += r0 * 3 + i + 1);
                b.iter_mut().enumerate().for_each(|(i, v)| *v += r0 + i + 1);
            });
            assert!(a.iter().enumerate().all(|(i, &v)| v == i + 1));
            assert!(b.iter().enumerate().all(|(i, &v)| v == i + 1));
        }
        assert_eq!(team.map(100, |i| i * i), (0..100).map(|i| i * i).collect::<Vec<_>>());
    }

    #[test]
    fn a_job_inside_a_job_runs_inline() {
        let team = Team::new(2, "test").unwrap();
        let sum = AtomicUsize::new(0);
        team.for_each(4, |_| {
            team.for_each(4, |j| {
                sum.fetch_add(j, Relaxed);
            })
        });
        assert_eq!(sum.load(Relaxed), 24);
    }

    /// Set, helpers that see a job wait before joining it (as if the OS had not scheduled them).
    pub(super) static HOLD_HELPERS: AtomicBool = AtomicBool::new(false);

    #[test]
    fn a_helper_that_never_runs_holds_nobody_up() {
        let team = Team::new(3, "test").unwrap();
        HOLD_HELPERS.store(true, SeqCst);
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            let caller = scope.spawn(|| {
                let me = std::thread::current().id();
                let mut others = 0;
                for _ in 0..50 {
                    let n = AtomicUsize::new(0);
                    team.for_each(64, |_| {
                        if std::thread::current().id() != me {
                            n.fetch_add(1, Relaxed);
                        }
                    });
                    others += n.load(Relaxed);
                }
                done.send(()).unwrap();
                others
            });
            let on_time = finished.recv_timeout(std::time::Duration::from_secs(60)).is_ok();
            // Let the helpers go either way, so the scope can end.
            HOLD_HELPERS.store(false, SeqCst);
            assert!(on_time, "the caller waited for helpers that never joined");
            assert_eq!(caller.join().unwrap(), 0, "held helpers ran items");
        });
        // Released, the helpers find the jobs gone and serve the next ones.
        let sum = AtomicUsize::new(0);
        team.for_each(100, |i| {
            sum.fetch_add(i, Relaxed);
        });
        assert_eq!(sum.load(Relaxed), 4950);
    }

    #[test]
    fn parked_helpers_wake_for_the_next_job() {
        let team = Team::new(2, "test").unwrap();
        // The helper parks once it has spun SPIN without work; on a busy machine it may be scheduled
        // late, so wait for it (no fixed sleep: this is not a timing test).
        let start = std::time::Instant::now();
        while team.shared.parked.load(SeqCst) != 1 && start.elapsed() < std::time::Duration::from_secs(30) {
            std::thread::sleep(SPIN);
        }
        assert_eq!(team.shared.parked.load(SeqCst), 1, "the idle helper never parked");
        let sum = AtomicUsize::new(0);
        team.for_each(10, |i| {
            sum.fetch_add(i, Relaxed);
        });
        assert_eq!(sum.load(Relaxed), 45);
    }
}
