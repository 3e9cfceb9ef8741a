//! The bounded retry budget for contention: a busy database is waited out for a while, with
//! jittered backoff, and then reported as a temporary failure that is safe to retry.

use std::time::{Duration, Instant};

use crate::error::Error;

/// How long contention is retried inside the library before giving up, unless configured.
pub const DEFAULT_BUSY_BUDGET: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub(crate) struct Retry {
    started: Instant,
    budget: Duration,
    attempt: u32,
}

impl Retry {
    pub(crate) fn new(budget: Duration) -> Self {
        Retry { started: Instant::now(), budget, attempt: 0 }
    }

    /// Turns a busy error into either a pause before the next attempt (`Ok`) or the final
    /// error with the time waited filled in (`Err`). Any other error passes through.
    pub(crate) async fn pause(&mut self, err: Error) -> Result<(), Error> {
        let Error::Busy { source, .. } = err else {
            return Err(err);
        };
        let waited = self.started.elapsed();
        if waited >= self.budget {
            return Err(Error::Busy { waited, source });
        }
        self.attempt += 1;
        let ceiling =
            Duration::from_millis(2u64 << self.attempt.min(7)).min(Duration::from_millis(250));
        let pause = ceiling.mul_f64(0.5 + jitter() / 2.0).min(self.budget - waited);
        tracing::debug!(attempt = self.attempt, ?pause, "database busy, retrying");
        tokio::time::sleep(pause).await;
        Ok(())
    }
}

/// A number in [0, 1) that differs between processes and attempts, so that contending
/// writers do not wake in lockstep.
fn jitter() -> f64 {
    let bits = uuid::Uuid::new_v4().as_u128() as u64;
    (bits >> 11) as f64 / (1u64 << 53) as f64
}
