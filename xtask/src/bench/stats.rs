//! Summaries of measured durations.

use std::time::Duration;

/// min / median / p99 / max of a sample, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub count: usize,
    pub min: f64,
    pub median: f64,
    pub p99: f64,
    pub max: f64,
}

pub fn summarize(samples: &[Duration]) -> Summary {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() as f64 - 1.0) * q).round() as usize];
    if ms.is_empty() {
        return Summary { count: 0, min: 0.0, median: 0.0, p99: 0.0, max: 0.0 };
    }
    Summary { count: ms.len(), min: ms[0], median: at(0.5), p99: at(0.99), max: ms[ms.len() - 1] }
}

impl Summary {
    /// A markdown table row: `| what | n | min | median | p99 | max |`.
    pub fn row(&self, what: &str) -> String {
        format!(
            "| {what} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
            self.count, self.min, self.median, self.p99, self.max
        )
    }
}
