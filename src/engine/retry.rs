//! The retry policy: a small `Copy` value with a pure `delay(attempt)`, and the
//! decision whether (and when) to send again. No clock is read here.

use std::time::Duration;

use crate::workflow::RetrySettings;

/// Exponential backoff within a retry window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay after the first attempt.
    pub initial_backoff: Duration,
    /// Upper bound of one delay.
    pub max_backoff: Duration,
    /// How long after the first attempt a retry may still start.
    pub max_duration: Duration,
}

impl RetryPolicy {
    /// Flow's contract: retry for up to 24 h, starting at 1 s, doubling, capped at 1 h.
    pub const DEFAULT: RetryPolicy = RetryPolicy {
        initial_backoff: RetrySettings::DEFAULT.initial_backoff,
        max_backoff: RetrySettings::DEFAULT.max_backoff,
        max_duration: RetrySettings::DEFAULT.max_duration,
    };

    /// The delay after attempt `attempt` (1-based) failed: `initial * 2^(attempt-1)`, capped.
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }

    /// `delay(attempt)` shortened by up to a fifth, `jitter` in `[0, 1)` choosing how much,
    /// so many actions failing together do not retry in lockstep.
    pub fn jittered(&self, attempt: u32, jitter: f64) -> Duration {
        let d = self.delay(attempt);
        d.saturating_sub(d.mul_f64(jitter.clamp(0.0, 1.0) / 5.0))
    }

    /// Decides what follows a retryable attempt.
    ///
    /// `elapsed` is the time from the first attempt's start to now; `retry_after`
    /// is a server's `Retry-After`, which replaces the computed delay.
    pub fn next(
        &self,
        attempt: u32,
        elapsed: Duration,
        retry_after: Option<Duration>,
        jitter: f64,
    ) -> Next {
        let (delay, from_server) = match retry_after {
            Some(d) => (d, true),
            None => (self.jittered(attempt, jitter), false),
        };
        if elapsed.saturating_add(delay) > self.max_duration {
            return if from_server && elapsed < self.max_duration {
                Next::RetryAfterPastWindow(delay)
            } else {
                Next::WindowExhausted
            };
        }
        Next::RetryIn(delay)
    }
}

impl From<RetrySettings> for RetryPolicy {
    fn from(s: RetrySettings) -> Self {
        RetryPolicy {
            initial_backoff: s.initial_backoff,
            max_backoff: s.max_backoff,
            max_duration: s.max_duration,
        }
    }
}

/// What follows a retryable attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Send again after this delay.
    RetryIn(Duration),
    /// The next attempt would start after the retry window: give up.
    WindowExhausted,
    /// The server's `Retry-After` points past the window: give up now.
    RetryAfterPastWindow(Duration),
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: RetryPolicy = RetryPolicy {
        initial_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(10),
        max_duration: Duration::from_secs(60),
    };

    #[test]
    fn delay_doubles_and_caps() {
        let d: Vec<u64> = (1..=6).map(|a| P.delay(a).as_secs()).collect();
        assert_eq!(d, vec![1, 2, 4, 8, 10, 10]);
        assert_eq!(
            P.delay(200),
            Duration::from_secs(10),
            "no overflow on huge attempts"
        );
    }

    #[test]
    fn jitter_only_shortens_by_up_to_a_fifth() {
        assert_eq!(P.jittered(3, 0.0), Duration::from_secs(4));
        let shortest = P.jittered(3, 0.999_999);
        assert!(
            shortest > Duration::from_millis(3200) && shortest < Duration::from_millis(3201),
            "{shortest:?}"
        );
    }

    #[test]
    fn gives_up_when_the_next_attempt_falls_after_the_window() {
        assert_eq!(
            P.next(1, Duration::from_secs(0), None, 0.0),
            Next::RetryIn(Duration::from_secs(1))
        );
        assert_eq!(
            P.next(5, Duration::from_secs(50), None, 0.0),
            Next::RetryIn(Duration::from_secs(10))
        );
        assert_eq!(
            P.next(6, Duration::from_secs(51), None, 0.0),
            Next::WindowExhausted
        );
    }

    #[test]
    fn retry_after_replaces_the_delay_or_fails_at_once() {
        let ra = Some(Duration::from_secs(30));
        assert_eq!(
            P.next(1, Duration::from_secs(0), ra, 0.0),
            Next::RetryIn(Duration::from_secs(30))
        );
        assert_eq!(
            P.next(1, Duration::from_secs(40), ra, 0.0),
            Next::RetryAfterPastWindow(Duration::from_secs(30))
        );
    }

    #[test]
    fn zero_window_never_retries() {
        let p = RetryPolicy {
            max_duration: Duration::ZERO,
            ..P
        };
        assert_eq!(p.next(1, Duration::ZERO, None, 0.0), Next::WindowExhausted);
    }

    #[test]
    fn default_is_flows_24_hours() {
        assert_eq!(
            RetryPolicy::DEFAULT.max_duration,
            Duration::from_secs(86_400)
        );
    }
}
