//! Lock-outs after failed logins, per user name and per client address.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Failed logins allowed before a user name is locked out for a while.
pub const FREE_FAILURES_PER_USER: u32 = 5;

/// Failed logins allowed from one address (over all names) before it is locked out.
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
    last: Instant,
    locked_until: Instant,
}

/// Failures per key; past `free` failures, each one locks the key out for twice as long as the
/// one before (1 s, 2 s, 4 s, ... up to five minutes).
#[derive(Debug)]
struct Table<K> {
    free: u32,
    strikes: HashMap<K, Strikes>,
}

impl<K: Hash + Eq + Clone> Table<K> {
    fn new(free: u32) -> Table<K> {
        Table {
            free,
            strikes: HashMap::new(),
        }
    }

    fn locked(&self, key: &K, now: Instant) -> Option<Duration> {
        let s = self.strikes.get(key)?;
        (s.locked_until > now).then(|| s.locked_until - now)
    }

    fn fail(&mut self, key: &K, now: Instant) {
        if self.strikes.len() >= SWEEP_AT {
            // An attacker trying many names must not grow this without bound.
            self.strikes
                .retain(|_, s| now.duration_since(s.last) < FORGET || s.locked_until > now);
        }
        let s = self.strikes.entry(key.clone()).or_insert(Strikes {
            failures: 0,
            last: now,
            locked_until: now,
        });
        if now.duration_since(s.last) > FORGET {
            s.failures = 0;
        }
        s.failures += 1;
        s.last = now;
        if s.failures > self.free {
            let doublings = (s.failures - self.free - 1).min(16);
            let lockout = Duration::from_secs(1 << doublings).min(MAX_LOCKOUT);
            s.locked_until = now + lockout;
        }
    }

    fn clear(&mut self, key: &K) {
        self.strikes.remove(key);
    }
}

/// The balancer's memory of failed logins.
#[derive(Debug)]
pub struct Logins {
    users: Table<String>,
    addresses: Table<IpAddr>,
}

impl Default for Logins {
    fn default() -> Logins {
        Logins {
            users: Table::new(FREE_FAILURES_PER_USER),
            addresses: Table::new(FREE_FAILURES_PER_ADDRESS),
        }
    }
}

impl Logins {
    /// `Err` with a reason if this user or address must wait before trying again.
    pub fn check(&self, user: &str, from: IpAddr) -> Result<(), String> {
        let now = Instant::now();
        let wait = |d: Duration| d.as_secs() + u64::from(d.subsec_nanos() > 0);
        if let Some(d) = self.users.locked(&user.to_string(), now) {
            return Err(format!(
                "too many failed logins for {user}; try again in {} s",
                wait(d)
            ));
        }
        if let Some(d) = self.addresses.locked(&from, now) {
            return Err(format!(
                "too many failed logins from {from}; try again in {} s",
                wait(d)
            ));
        }
        Ok(())
    }

    /// Counts a failed login (against the name too, when it is one).
    pub fn failed(&mut self, user: Option<&str>, from: IpAddr) {
        let now = Instant::now();
        if let Some(user) = user {
            self.users.fail(&user.to_string(), now);
        }
        self.addresses.fail(&from, now);
    }

    /// A successful login clears the user's strikes (not the address's).
    pub fn succeeded(&mut self, user: &str) {
        self.users.clear(&user.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOME: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn a_user_is_locked_out_after_five_failures_and_longer_each_time() {
        let mut t = Table::<String>::new(5);
        let now = Instant::now();
        let alice = "alice".to_string();
        for _ in 0..5 {
            t.fail(&alice, now);
        }
        assert_eq!(t.locked(&alice, now), None, "five are free");
        t.fail(&alice, now);
        assert_eq!(t.locked(&alice, now), Some(Duration::from_secs(1)));
        t.fail(&alice, now);
        assert_eq!(t.locked(&alice, now), Some(Duration::from_secs(2)));
        for _ in 0..30 {
            t.fail(&alice, now);
        }
        assert_eq!(t.locked(&alice, now), Some(MAX_LOCKOUT));
        assert_eq!(t.locked(&alice, now + MAX_LOCKOUT), None);
        t.clear(&alice);
        assert_eq!(t.locked(&alice, now), None);
    }

    #[test]
    fn logins_count_names_and_addresses_apart() {
        let mut l = Logins::default();
        for i in 0..FREE_FAILURES_PER_ADDRESS {
            l.failed(Some(&format!("user{i}")), HOME);
        }
        assert!(l.check("someone", HOME).is_ok());
        l.failed(None, HOME);
        let err = l.check("someone", HOME).unwrap_err();
        assert!(
            err.starts_with("too many failed logins from 127.0.0.1"),
            "{err}"
        );
    }
}
