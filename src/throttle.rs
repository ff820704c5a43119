//! Limits on how fast something may happen: a token bucket (a chat server's requests per
//! connection), and log lines that could repeat in a loop (at most one a second, with a count
//! of those left out).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// A token bucket: at most `rate` requests per second on average, in bursts of up to `rate`.
#[derive(Debug)]
pub struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket for `rate` requests per second.
    pub fn new(rate: u32) -> Bucket {
        Bucket {
            rate: f64::from(rate.max(1)),
            tokens: f64::from(rate.max(1)),
            last: Instant::now(),
        }
    }

    /// Takes one token; returns how long to wait first if none is left (the token is taken
    /// either way).
    pub fn take(&mut self) -> Option<Duration> {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.rate);
        self.last = now;
        self.tokens -= 1.0;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

/// A log line that may repeat in a loop (an accept that keeps failing, a peer link that keeps
/// breaking): written at most once per period, saying how many were left out since.
#[derive(Debug)]
pub struct Quiet {
    period: Duration,
    last: Mutex<Option<Instant>>,
    left_out: AtomicU64,
}

impl Quiet {
    /// At most one line per `period`.
    pub const fn new(period: Duration) -> Quiet {
        Quiet {
            period,
            last: Mutex::new(None),
            left_out: AtomicU64::new(0),
        }
    }

    /// The line to write now, if one may be: `message`, with the count of those left out.
    pub fn line(&self, message: &str) -> Option<String> {
        let now = Instant::now();
        let mut last = self.last.lock();
        if last.is_some_and(|t| now.duration_since(t) < self.period) {
            self.left_out.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(match self.left_out.swap(0, Ordering::Relaxed) {
            0 => message.to_string(),
            n => format!("{message} ({n} more like it not logged)"),
        })
    }

    /// Logs `message` as a warning, unless one was logged within the period.
    pub fn warn(&self, message: &str) {
        if let Some(line) = self.line(message) {
            log::warn!("{line}");
        }
    }

    /// Logs `message` as an error, unless one was logged within the period.
    pub fn error(&self, message: &str) {
        if let Some(line) = self.line(message) {
            log::error!("{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeating_line_is_written_once_a_period_with_a_count() {
        let q = Quiet::new(Duration::from_millis(200));
        assert_eq!(q.line("accept failed").as_deref(), Some("accept failed"));
        for _ in 0..1000 {
            assert_eq!(q.line("accept failed"), None);
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(
            q.line("accept failed").as_deref(),
            Some("accept failed (1000 more like it not logged)")
        );
    }

    #[test]
    fn a_bucket_allows_its_rate_and_makes_the_rest_wait() {
        let mut b = Bucket::new(10);
        for _ in 0..10 {
            assert_eq!(b.take(), None);
        }
        let wait = b.take().expect("the eleventh waits");
        assert!(wait > Duration::from_millis(50) && wait <= Duration::from_millis(100));
    }
}
