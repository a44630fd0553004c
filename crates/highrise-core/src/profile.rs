//! Where a forward pass spends its time, op by op. Enabled (`enable`, or `HIGHRISE_PROFILE=1`),
//! every op the host runs waits for its backend to finish (`Backend::synchronize`) and adds its wall
//! time to a table keyed by the op and what sets its cost (a projection's weight shape and format,
//! else the op's dtype). Off by default: waiting after each op takes a GPU's overlap away.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};
use std::time::Duration;

use crate::ops::Op;

static ON: AtomicBool = AtomicBool::new(false);
static FROM_ENV: Once = Once::new();
static TABLE: Mutex<BTreeMap<String, (u64, Duration)>> = Mutex::new(BTreeMap::new());

/// Whether ops are being timed.
pub fn enabled() -> bool {
    FROM_ENV.call_once(|| {
        if std::env::var("HIGHRISE_PROFILE").is_ok_and(|v| v == "1") {
            ON.store(true, Ordering::Relaxed);
        }
    });
    ON.load(Ordering::Relaxed)
}

/// Starts or stops timing ops.
pub fn enable(on: bool) {
    enabled();
    ON.store(on, Ordering::Relaxed);
}

/// One row of the table: an op (and its shape), how often it ran, for how long in all.
#[derive(Clone, Debug)]
pub struct OpTime {
    pub op: String,
    pub calls: u64,
    pub total: Duration,
}

/// The table so far, longest total first; it starts again empty.
pub fn take() -> Vec<OpTime> {
    let table = std::mem::take(&mut *TABLE.lock().unwrap_or_else(|e| e.into_inner()));
    let mut rows: Vec<OpTime> = table.into_iter().map(|(op, (calls, total))| OpTime { op, calls, total }).collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.total));
    rows
}

pub(crate) fn record(op: &Op, took: Duration) {
    let key = match op {
        Op::Linear(o) => format!("linear {} [{}, {}]", o.weight.dtype, o.weight.dims()[0], o.weight.dims()[1]),
        other => format!("{} {}", other.kind(), other.dtype()),
    };
    let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let row = table.entry(key).or_insert((0, Duration::ZERO));
    row.0 += 1;
    row.1 += took;
}
