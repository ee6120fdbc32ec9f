//! What one round of one system measured: named figures and notes.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::workload::Outcome;

#[derive(Debug, Clone, Serialize)]
pub struct Round {
    pub system: String,
    pub round: usize,
    pub metrics: BTreeMap<String, f64>,
    pub notes: Vec<String>,
}

impl Round {
    pub fn new(system: &str, round: usize) -> Round {
        Round { system: system.to_owned(), round, metrics: BTreeMap::new(), notes: Vec::new() }
    }

    pub fn set(&mut self, key: &str, value: f64) {
        self.metrics.insert(key.to_owned(), value);
    }

    pub fn note(&mut self, text: impl Into<String>) {
        let text = text.into();
        eprintln!("    [{} r{}] {text}", self.system, self.round);
        self.notes.push(text);
    }

    /// Records p50, p99, sample count and errors of a latency phase under `key`.
    pub fn latencies(&mut self, key: &str, outcome: &Outcome) {
        self.set(&format!("{key}_p50_ms"), outcome.samples.percentile_ms(50.0));
        self.set(&format!("{key}_p99_ms"), outcome.samples.percentile_ms(99.0));
        self.set(&format!("{key}_n"), outcome.samples.len() as f64);
        self.set(&format!("{key}_errors"), outcome.errors as f64);
        if let Some(err) = &outcome.first_error {
            self.note(format!("{key}: {} errors, first: {err}", outcome.errors));
        }
    }

    pub fn get(&self, key: &str) -> f64 {
        self.metrics.get(key).copied().unwrap_or(f64::NAN)
    }
}

/// Bytes to MiB.
pub fn mib(bytes: f64) -> f64 {
    bytes / (1u64 << 20) as f64
}

/// Bytes to GiB.
pub fn gib(bytes: f64) -> f64 {
    bytes / (1u64 << 30) as f64
}
