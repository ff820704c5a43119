//! Limits on how fast one party may ask: a token bucket (a chat server's requests per
//! connection).

use std::time::{Duration, Instant};

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

#[cfg(test)]
mod tests {
    use super::*;

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
