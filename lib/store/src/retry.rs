//! Timeouts and retries for calls that leave the process.

use std::future::Future;
use std::time::Duration;

/// Exponential backoff with a per-attempt timeout. Used for idempotent etcd calls: with several
/// endpoints a request can land on a dead member, and the next attempt picks another.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    pub timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            first_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RetryError<E: std::error::Error + 'static> {
    #[error("{what}: timed out after {timeout:?} ({attempts} attempts)")]
    TimedOut { what: String, timeout: Duration, attempts: u32 },
    #[error("{what}: {source}")]
    Failed {
        what: String,
        #[source]
        source: E,
    },
}

impl RetryPolicy {
    /// Runs `op` until it succeeds, `attempts` are used up, or it fails with an error that
    /// `retryable` says is final.
    pub async fn run<T, E, F, Fut>(
        &self,
        what: &str,
        retryable: impl Fn(&E) -> bool,
        mut op: F,
    ) -> Result<T, RetryError<E>>
    where
        E: std::error::Error + 'static,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut backoff = self.first_backoff;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let last = attempt >= self.attempts;
            match tokio::time::timeout(self.timeout, op()).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) if last || !retryable(&e) => {
                    return Err(RetryError::Failed { what: what.to_string(), source: e })
                }
                Ok(Err(e)) => tracing::debug!(what, attempt, error = %e, "retrying"),
                Err(_) if last => {
                    return Err(RetryError::TimedOut {
                        what: what.to_string(),
                        timeout: self.timeout,
                        attempts: attempt,
                    })
                }
                Err(_) => tracing::debug!(what, attempt, "timed out, retrying"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.max_backoff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Debug, thiserror::Error)]
    #[error("boom {0}")]
    struct Boom(u32);

    fn fast() -> RetryPolicy {
        RetryPolicy {
            attempts: 3,
            first_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
            timeout: Duration::from_millis(50),
        }
    }

    #[tokio::test]
    async fn retries_until_success() {
        let calls = AtomicU32::new(0);
        let r = fast()
            .run(
                "op",
                |_: &Boom| true,
                || async {
                    let n = calls.fetch_add(1, Ordering::SeqCst);
                    if n < 2 {
                        Err(Boom(n))
                    } else {
                        Ok(n)
                    }
                },
            )
            .await;
        assert_eq!(r.ok(), Some(2));
    }

    #[tokio::test]
    async fn final_errors_stop_and_timeouts_are_reported() {
        let calls = AtomicU32::new(0);
        let r: Result<(), _> =
            fast().run("op", |_: &Boom| false, || async { Err(Boom(calls.fetch_add(1, Ordering::SeqCst))) }).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(r.map_err(|e| e.to_string()), Err("op: boom 0".to_string()));
        let r: Result<(), RetryError<Boom>> = fast()
            .run(
                "slow",
                |_| true,
                || async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    Ok(())
                },
            )
            .await;
        assert!(matches!(r, Err(RetryError::TimedOut { attempts: 3, .. })));
    }
}
