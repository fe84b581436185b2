//! The phases of each first delivery, as the daemon logs them (`identity delivered` with one
//! `<phase>_ms` field per phase): captured by a tracing layer, so the benchmark reads the very
//! figures an operator reads in the log.

use std::sync::Mutex;

use tracing::field::{Field, Visit};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;

use crate::bed::{Summary, summarize};

/// The phases in the order the daemon runs them, then the whole.
pub const NAMES: [&str; 9] = [
    "workload_named",
    "stream_open",
    "first_svid",
    "bundle_ready",
    "checks",
    "jwt",
    "files_written",
    "reply",
    "elapsed",
];

/// Every delivery's `<name>_ms` fields (in µs), in the order of [`NAMES`].
static DELIVERIES: Mutex<Vec<[f64; NAMES.len()]>> = Mutex::new(Vec::new());

pub struct Capture;

struct Fields {
    delivered: bool,
    values: [f64; NAMES.len()],
}

impl Visit for Fields {
    fn record_f64(&mut self, field: &Field, value: f64) {
        if let Some(i) = field
            .name()
            .strip_suffix("_ms")
            .and_then(|n| NAMES.iter().position(|x| *x == n))
        {
            self.values[i] = value * 1e3;
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" && format!("{value:?}") == "identity delivered" {
            self.delivered = true;
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut fields = Fields {
            delivered: false,
            values: [f64::NAN; NAMES.len()],
        };
        event.record(&mut fields);
        if fields.delivered {
            lock().push(fields.values);
        }
    }
}

fn lock() -> std::sync::MutexGuard<'static, Vec<[f64; NAMES.len()]>> {
    DELIVERIES.lock().unwrap_or_else(|p| p.into_inner())
}

/// How many deliveries were captured so far.
pub fn mark() -> usize {
    lock().len()
}

/// Per phase, the summary of the deliveries captured since `from` (up to `to`).
pub fn summaries(from: usize, to: usize) -> Vec<(&'static str, Summary)> {
    let all = lock();
    let taken = &all[from.min(all.len())..to.min(all.len())];
    NAMES
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let v: Vec<f64> = taken.iter().map(|d| d[i]).collect();
            (*name, summarize(&v))
        })
        .collect()
}
