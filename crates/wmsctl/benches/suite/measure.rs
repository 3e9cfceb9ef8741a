//! Timing: samples and their medians, the A/B order of each round, and child processes timed
//! from spawn to exit with their peak resident memory.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What one side of a comparison is: the product or the hand-written baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Product,
    Baseline,
}

/// The order of the two sides in round `round`: they take turns going first, so that a machine
/// that warms up or slows down during a run favours neither.
pub fn sides(round: usize) -> [Side; 2] {
    if round.is_multiple_of(2) {
        [Side::Product, Side::Baseline]
    } else {
        [Side::Baseline, Side::Product]
    }
}

/// Measured values of one quantity, in the order they were taken.
#[derive(Debug, Clone, Default)]
pub struct Samples(pub Vec<f64>);

impl Samples {
    pub fn push(&mut self, value: f64) {
        self.0.push(value);
    }

    pub fn median(&self) -> f64 {
        self.percentile(50.0)
    }

    /// The nearest-rank percentile; NaN without samples.
    pub fn percentile(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let mut sorted = self.0.clone();
        sorted.sort_by(f64::total_cmp);
        if p == 50.0 && sorted.len().is_multiple_of(2) {
            let mid = sorted.len() / 2;
            return (sorted[mid - 1] + sorted[mid]) / 2.0;
        }
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1]
    }
}

/// How a timed child process ended.
#[derive(Debug)]
pub struct Run {
    pub elapsed: Duration,
    /// The peak resident set size (`VmHWM`), in bytes, from the last look at `/proc/PID/status`
    /// before the process exited; `None` when it was never seen.
    pub peak_rss: Option<u64>,
}

/// Runs `command` with its output discarded and fails the benchmark unless it exits with
/// `expected_code`: a figure of a failing command would be meaningless.
pub fn run(command: &mut Command, expected_code: i32) -> Run {
    run_watched(command, expected_code, None)
}

/// Like [`run`], and looks at the child's peak memory every `interval`.
pub fn run_watched(command: &mut Command, expected_code: i32, interval: Option<Duration>) -> Run {
    command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = command.spawn().unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
    let mut peak_rss = None;
    let stderr = child.stderr.take().expect("stderr is piped");
    // Drained on a thread so that a chatty child never blocks on a full pipe.
    let drain = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut { stderr }, &mut text).ok();
        text
    });
    let status = match interval {
        None => child.wait(),
        Some(interval) => loop {
            if let Some(status) = child.try_wait().transpose() {
                break status;
            }
            peak_rss = vm_hwm(child.id()).or(peak_rss);
            std::thread::sleep(interval);
        },
    };
    let elapsed = started.elapsed();
    let status = status.unwrap_or_else(|e| panic!("waiting for {command:?}: {e}"));
    let stderr = drain.join().unwrap_or_default();
    assert_eq!(
        status.code(),
        Some(expected_code),
        "{command:?} exited with {status}, expected {expected_code}; stderr:\n{stderr}"
    );
    Run { elapsed, peak_rss }
}

/// `VmHWM` of a running process, in bytes.
fn vm_hwm(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status"));
    let status = status.ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
    let kib: u64 = line.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

pub fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
