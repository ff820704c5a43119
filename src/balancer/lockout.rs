//! Lock-outs: failed logins per (name, address) pair and per address, and signups per
//! address.
//!
//! * A login attempt is reserved before its password is hashed, and counts against its limits
//!   while it runs: however many guesses arrive at once, at most the free number of them are
//!   ever hashed before the lock-out starts.
//! * Failures lock out the pair (name, address), not the name: a stranger guessing carol's
//!   password locks out only himself; carol, from an address with no failures, logs in.
//!   Failures per address (over all names) lock out the address, so trying many names from
//!   one place is slow too.
//! * An attempt that finds as many others of its pair or address running as may fail waits
//!   for one of them to end ([`Gate`]), up to a patience, rather than being refused: a user's
//!   ten processes logging in at once all get through, a free slot at a time, and still no
//!   more guesses than the free number are ever hashed at once.
//! * From the free number of failures on, each failure locks out for twice as long as the one
//!   before (1 s, 2 s, 4 s, ... up to five minutes). Strikes are forgotten after ten quiet
//!   minutes.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// Failed (or running) logins for one name from one address that lock it out.
pub const FREE_FAILURES_PER_PAIR: u32 = 5;

/// Failed (or running) logins from one address, over all names, that lock it out.
pub const FREE_FAILURES_PER_ADDRESS: u32 = 20;

/// The longest lock-out.
const MAX_LOCKOUT: Duration = Duration::from_secs(300);

/// Strikes are forgotten after this long without a failure.
const FORGET: Duration = Duration::from_secs(600);

/// Entries kept at most per table before the stale ones are swept.
const SWEEP_AT: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Strikes {
    failures: u32,
    /// Attempts begun and not yet ended.
    running: u32,
    last: Instant,
    locked_until: Instant,
}

/// Why an attempt may not start now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Locked out for this long.
    Locked(Duration),
    /// As many attempts are running as may fail; one ends soon.
    Busy,
}

/// Failures (and running attempts) per key; past `free` failures, each one locks the key out
/// for twice as long as the one before.
#[derive(Debug)]
pub struct Table<K> {
    free: u32,
    strikes: HashMap<K, Strikes>,
}

impl<K: Hash + Eq + Clone> Table<K> {
    /// A table allowing `free` failures before lock-outs.
    pub fn new(free: u32) -> Table<K> {
        Table {
            free,
            strikes: HashMap::new(),
        }
    }

    /// Whether `key` may start an attempt now.
    fn check(&self, key: &K, now: Instant) -> Result<(), Wait> {
        let Some(s) = self.strikes.get(key) else {
            return Ok(());
        };
        if s.locked_until > now {
            return Err(Wait::Locked(s.locked_until - now));
        }
        let failures = if now.duration_since(s.last) > FORGET {
            0
        } else {
            s.failures
        };
        if failures < self.free && failures + s.running >= self.free {
            return Err(Wait::Busy);
        }
        Ok(())
    }

    fn entry(&mut self, key: &K, now: Instant) -> &mut Strikes {
        if self.strikes.len() >= SWEEP_AT {
            // An attacker trying many keys must not grow this without bound.
            self.strikes.retain(|_, s| {
                s.running > 0 || now.duration_since(s.last) < FORGET || s.locked_until > now
            });
        }
        let s = self.strikes.entry(key.clone()).or_insert(Strikes {
            failures: 0,
            running: 0,
            last: now,
            locked_until: now,
        });
        if now.duration_since(s.last) > FORGET {
            s.failures = 0;
        }
        s
    }

    fn begin(&mut self, key: &K, now: Instant) {
        let s = self.entry(key, now);
        s.running += 1;
        s.last = now;
    }

    /// Ends an attempt begun with `begin`; a failure counts and may lock the key out.
    fn end(&mut self, key: &K, failed: bool, now: Instant) {
        let free = self.free;
        let s = self.entry(key, now);
        s.running = s.running.saturating_sub(1);
        if failed {
            s.failures += 1;
            s.last = now;
            if s.failures >= free {
                let doublings = (s.failures - free).min(16);
                s.locked_until = now + Duration::from_secs(1 << doublings).min(MAX_LOCKOUT);
            }
        }
    }

    /// Counts one event (a signup) that is allowed `free` times; after that, each one waits
    /// out a lock-out twice as long as the one before.
    pub fn count(&mut self, key: &K) -> Result<(), Wait> {
        let now = Instant::now();
        if let Some(s) = self.strikes.get(key) {
            if s.locked_until > now {
                return Err(Wait::Locked(s.locked_until - now));
            }
        }
        let free = self.free;
        let s = self.entry(key, now);
        s.failures += 1;
        s.last = now;
        if s.failures >= free {
            let doublings = (s.failures - free).min(16);
            s.locked_until = now + Duration::from_secs(1 << doublings).min(MAX_LOCKOUT);
        }
        Ok(())
    }

    fn clear(&mut self, key: &K, now: Instant) {
        if let Some(s) = self.strikes.get_mut(key) {
            s.failures = 0;
            s.locked_until = now;
        }
    }
}

/// Says how long to wait, in whole seconds.
pub fn wait_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// How a login attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The password was right.
    Right,
    /// The password (or the name) was wrong.
    Wrong,
    /// It was not checked (the balancer was busy, or failed).
    Untried,
}

/// The balancer's memory of logins.
#[derive(Debug)]
pub struct Logins {
    pairs: Table<(String, IpAddr)>,
    addresses: Table<IpAddr>,
}

impl Default for Logins {
    fn default() -> Logins {
        Logins {
            pairs: Table::new(FREE_FAILURES_PER_PAIR),
            addresses: Table::new(FREE_FAILURES_PER_ADDRESS),
        }
    }
}

impl Logins {
    /// Reserves a login attempt of `user` (if it is a valid name) from `from`, or says why it
    /// must wait. Every attempt begun must be ended with [`Logins::end`].
    pub fn begin(&mut self, user: Option<&str>, from: IpAddr) -> Result<(), Refusal> {
        let now = Instant::now();
        let pair = user.map(|u| (u.to_string(), from));
        if let Some(p) = &pair {
            self.pairs
                .check(p, now)
                .map_err(|wait| Refusal::new(wait, format!("for {} from {from}", p.0)))?;
        }
        self.addresses
            .check(&from, now)
            .map_err(|wait| Refusal::new(wait, format!("from {from}")))?;
        if let Some(p) = &pair {
            self.pairs.begin(p, now);
        }
        self.addresses.begin(&from, now);
        Ok(())
    }

    /// Ends an attempt begun with [`Logins::begin`]. A right password clears the pair's
    /// failures (not the address's); a wrong one counts for both.
    pub fn end(&mut self, user: Option<&str>, from: IpAddr, outcome: Outcome) {
        let now = Instant::now();
        let failed = outcome == Outcome::Wrong;
        if let Some(u) = user {
            let pair = (u.to_string(), from);
            self.pairs.end(&pair, failed, now);
            if outcome == Outcome::Right {
                self.pairs.clear(&pair, now);
            }
        }
        self.addresses.end(&from, failed, now);
    }
}

/// Why a login may not start now, and what to tell the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Locked out, or busy with as many attempts as may fail.
    pub wait: Wait,
    /// For the user, e.g. "too many failed logins for carol from 10.0.0.9; try again in 2 s".
    pub why: String,
}

impl Refusal {
    fn new(wait: Wait, whom: String) -> Refusal {
        let why = match wait {
            Wait::Locked(d) => format!(
                "too many failed logins {whom}; try again in {} s",
                wait_secs(d)
            ),
            Wait::Busy => format!("too many logins {whom} at once; try again in a moment"),
        };
        Refusal { wait, why }
    }
}

/// [`Logins`] shared by the balancer's connection threads: an attempt that is merely busy
/// waits for a running one to end instead of being refused.
#[derive(Debug, Default)]
pub struct Gate {
    logins: Mutex<Logins>,
    /// Rung when an attempt ends.
    ended: Condvar,
}

impl Gate {
    /// Reserves a login attempt as [`Logins::begin`] does; while the only reason to refuse it
    /// is attempts running at once, waits up to `patience` for one to end. A lock-out (the
    /// running ones failed, say) is answered at once.
    pub fn begin(
        &self,
        user: Option<&str>,
        from: IpAddr,
        patience: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + patience;
        let mut logins = self.logins.lock();
        loop {
            match logins.begin(user, from) {
                Ok(()) => return Ok(()),
                Err(r) if r.wait == Wait::Busy && Instant::now() < deadline => {
                    self.ended.wait_until(&mut logins, deadline);
                }
                Err(r) => return Err(r.why),
            }
        }
    }

    /// Ends an attempt begun with [`Gate::begin`], as [`Logins::end`] does, and wakes those
    /// waiting for their turn.
    pub fn end(&self, user: Option<&str>, from: IpAddr, outcome: Outcome) {
        self.logins.lock().end(user, from, outcome);
        self.ended.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::sync::Arc;

    const HOME: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
    const AWAY: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9));

    fn fail(t: &mut Table<String>, key: &String, now: Instant) {
        t.begin(key, now);
        t.end(key, true, now);
    }

    #[test]
    fn a_key_is_locked_out_after_its_free_failures_and_longer_each_time() {
        let mut t = Table::<String>::new(5);
        let now = Instant::now();
        let alice = "alice".to_string();
        for _ in 0..4 {
            fail(&mut t, &alice, now);
        }
        assert_eq!(t.check(&alice, now), Ok(()), "four are free");
        fail(&mut t, &alice, now);
        assert_eq!(
            t.check(&alice, now),
            Err(Wait::Locked(Duration::from_secs(1)))
        );
        fail(&mut t, &alice, now);
        assert_eq!(
            t.check(&alice, now),
            Err(Wait::Locked(Duration::from_secs(2)))
        );
        for _ in 0..30 {
            fail(&mut t, &alice, now);
        }
        assert_eq!(t.check(&alice, now), Err(Wait::Locked(MAX_LOCKOUT)));
        assert_eq!(t.check(&alice, now + MAX_LOCKOUT), Ok(()));
        t.clear(&alice, now);
        assert_eq!(t.check(&alice, now), Ok(()));
    }

    #[test]
    fn attempts_running_at_once_count_before_they_are_hashed() {
        let mut l = Logins::default();
        for _ in 0..FREE_FAILURES_PER_PAIR {
            l.begin(Some("carol"), AWAY).unwrap();
        }
        let err = l.begin(Some("carol"), AWAY).unwrap_err().why;
        assert!(err.contains("at once"), "{err}");
        for _ in 0..FREE_FAILURES_PER_PAIR {
            l.end(Some("carol"), AWAY, Outcome::Wrong);
        }
        // All five failed: the sixth guess is locked out, not merely queued.
        let err = l.begin(Some("carol"), AWAY).unwrap_err().why;
        assert!(
            err.starts_with("too many failed logins for carol from 10.0.0.9"),
            "{err}"
        );
    }

    #[test]
    fn a_stranger_cannot_lock_a_user_out() {
        let mut l = Logins::default();
        for _ in 0..10 {
            if l.begin(Some("carol"), AWAY).is_ok() {
                l.end(Some("carol"), AWAY, Outcome::Wrong);
            }
        }
        assert!(l.begin(Some("carol"), AWAY).is_err());
        // Carol, from her own address, is not locked out.
        l.begin(Some("carol"), HOME).unwrap();
        l.end(Some("carol"), HOME, Outcome::Right);
    }

    #[test]
    fn an_address_trying_many_names_is_locked_out() {
        let mut l = Logins::default();
        for i in 0..FREE_FAILURES_PER_ADDRESS - 1 {
            let name = format!("user{i}");
            l.begin(Some(&name), HOME).unwrap();
            l.end(Some(&name), HOME, Outcome::Wrong);
        }
        // Invalid names count for the address too.
        l.begin(None, HOME).unwrap();
        l.end(None, HOME, Outcome::Wrong);
        let err = l.begin(Some("someone"), HOME).unwrap_err().why;
        assert!(
            err.starts_with("too many failed logins from 127.0.0.1"),
            "{err}"
        );
    }

    /// Starts `FREE_FAILURES_PER_PAIR` logins of carol from AWAY, and one more on a thread
    /// that waits its turn; returns that thread.
    fn a_sixth_login_waits(gate: &Arc<Gate>) -> std::thread::JoinHandle<Result<(), String>> {
        for _ in 0..FREE_FAILURES_PER_PAIR {
            gate.begin(Some("carol"), AWAY, Duration::ZERO).unwrap();
        }
        let waiting = Arc::clone(gate);
        let sixth =
            std::thread::spawn(move || waiting.begin(Some("carol"), AWAY, Duration::from_secs(30)));
        // Until an attempt ends, it cannot start (bounded: the check below would not wait).
        std::thread::sleep(Duration::from_millis(50));
        assert!(!sixth.is_finished(), "the sixth began while five ran");
        sixth
    }

    #[test]
    fn a_login_that_finds_its_limit_busy_waits_for_an_attempt_to_end() {
        let gate = Arc::new(Gate::default());
        let sixth = a_sixth_login_waits(&gate);
        gate.end(Some("carol"), AWAY, Outcome::Right);
        assert_eq!(sixth.join().unwrap(), Ok(()));
        // Without patience, a busy pair is refused at once.
        let err = gate.begin(Some("carol"), AWAY, Duration::ZERO).unwrap_err();
        assert!(err.contains("at once"), "{err}");
    }

    #[test]
    fn a_waiting_login_is_refused_when_the_running_ones_fail() {
        let gate = Arc::new(Gate::default());
        let sixth = a_sixth_login_waits(&gate);
        for _ in 0..FREE_FAILURES_PER_PAIR {
            gate.end(Some("carol"), AWAY, Outcome::Wrong);
        }
        let err = sixth.join().unwrap().unwrap_err();
        assert!(
            err.starts_with("too many failed logins for carol from 10.0.0.9"),
            "{err}"
        );
    }

    #[test]
    fn counted_events_lock_out_past_the_free_number() {
        let mut t = Table::<IpAddr>::new(3);
        for _ in 0..3 {
            t.count(&HOME).unwrap();
        }
        assert!(matches!(t.count(&HOME), Err(Wait::Locked(_))));
        assert_eq!(t.count(&AWAY), Ok(()));
    }
}
