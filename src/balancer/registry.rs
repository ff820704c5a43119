//! The registry of live chat servers, and the algorithms that choose one for each login.
//!
//! Servers register, then report their load every 500 ms. A server silent for longer than the
//! timeout is out of rotation; one silent for [`FORGET_AFTER`] is forgotten. A login assigned
//! to a server counts as its load until the server reports that client arrived (each report
//! says how many clients have arrived in all), or for [`PENDING_FOR`] at most: so a burst of
//! logins is spread evenly however the reports fall within it.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::net::{Counts, ServerInfo};

/// Servers silent for this long are forgotten: their presence rows are removed.
pub const FORGET_AFTER: Duration = Duration::from_secs(10);

/// A login assigned to a server and not reported arrived counts as load for this long: a
/// client that was handed a server but never connected stops counting.
pub const PENDING_FOR: Duration = Duration::from_secs(5);

/// How a chat server is chosen for each login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algo {
    /// Each live server in turn, by id.
    RoundRobin,
    /// A uniformly random live server.
    Random,
    /// The live server with the fewest clients (reported plus assigned since the report).
    LeastLoaded,
    /// Power of two choices: the less loaded of two random live servers.
    P2c,
}

impl Algo {
    /// Every algorithm with its command-line name.
    pub const ALL: [(&'static str, Algo); 4] = [
        ("round-robin", Algo::RoundRobin),
        ("random", Algo::Random),
        ("least-loaded", Algo::LeastLoaded),
        ("p2c", Algo::P2c),
    ];
}

impl FromStr for Algo {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Algo, String> {
        Algo::ALL
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, a)| *a)
            .ok_or_else(|| {
                let names: Vec<&str> = Algo::ALL.iter().map(|(n, _)| *n).collect();
                format!(
                    "unknown algorithm {s:?}; choose one of {}",
                    names.join(", ")
                )
            })
    }
}

impl fmt::Display for Algo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = Algo::ALL.iter().find(|(_, a)| a == self).map(|(n, _)| *n);
        f.write_str(name.unwrap_or("?"))
    }
}

/// A server as the dashboard draws it.
pub struct Board {
    /// Who and where; `load` is its clients.
    pub info: ServerInfo,
    /// Whether it is in rotation.
    pub live: bool,
    /// Messages stored, delivered and relayed per second, over its last two reports.
    pub rates: [f64; 3],
    /// Deliveries relayed per second to each peer: (server id, rate).
    pub links: Vec<(u64, f64)>,
}

/// A registered chat server, as the registry sees it.
pub struct Live {
    /// Its name (from its certificate).
    name: String,
    addr: String,
    /// The balancer connection it registered on; `None` once that connection ended (the
    /// server is then out of rotation until it registers again).
    link: Option<u64>,
    /// Clients at the last report.
    load: u32,
    /// Clients arrived in all, at the last report (`None` before the first one).
    arrived: Option<u64>,
    /// When each login assigned here and not reported arrived yet was assigned, oldest first.
    pending: VecDeque<Instant>,
    /// The last two reports of what it has done, with when they came (for rates).
    counts: [(Instant, Counts); 2],
    last_seen: Instant,
}

/// The live chat servers. Locked briefly by connection threads: a lookup or an update of a few
/// fields, far cheaper than a round trip to a registry thread.
pub struct Registry {
    servers: BTreeMap<u64, Live>,
    next: usize,
    rng: u64,
}

impl Registry {
    /// No servers yet; `seed` seeds the choices of `random` and `p2c`.
    pub fn new(seed: u64) -> Registry {
        Registry {
            servers: BTreeMap::new(),
            next: usize::MAX,
            rng: seed | 1,
        }
    }

    fn live(&self, timeout: Duration) -> impl Iterator<Item = (&u64, &Live)> {
        self.servers
            .iter()
            .filter(move |(_, s)| s.link.is_some() && s.last_seen.elapsed() <= timeout)
    }

    fn random(&mut self, below: usize) -> usize {
        // xorshift64*: plenty for spreading load; seeded from OpenSSL at start.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) % below as u64) as usize
    }

    /// Server `id` (`name`) registered at `addr` on balancer connection `link`: live from now.
    /// Refused (with the reason) while another connection holds a live registration of the
    /// same server: two processes with one certificate.
    pub fn register(
        &mut self,
        id: u64,
        name: &str,
        addr: &str,
        link: u64,
        timeout: Duration,
    ) -> Result<(), String> {
        if let Some(old) = self.servers.get(&id) {
            let held = old.link.is_some_and(|l| l != link);
            if held && old.last_seen.elapsed() <= timeout {
                return Err(format!(
                    "server {name} is already registered by a live process at {}; is another \
                     process using its certificate?",
                    old.addr
                ));
            }
        }
        self.servers.insert(
            id,
            Live {
                name: name.to_string(),
                addr: addr.to_string(),
                link: Some(link),
                load: 0,
                arrived: None,
                pending: VecDeque::new(),
                counts: [
                    (Instant::now(), Counts::default()),
                    (Instant::now(), Counts::default()),
                ],
                last_seen: Instant::now(),
            },
        );
        Ok(())
    }

    /// The balancer connection `link` of server `id` ended: out of rotation at once (unless
    /// the server registered again on another connection meanwhile).
    pub fn unlink(&mut self, id: u64, link: u64) {
        if let Some(s) = self.servers.get_mut(&id) {
            if s.link == Some(link) {
                s.link = None;
            }
        }
    }

    /// A server reports on `link` its clients now, and how many have arrived in all since
    /// it started; `false` if it is not registered there (forgotten, the balancer restarted,
    /// or another connection took the registration over). The clients that arrived since the
    /// last report are in `load` now: as many pending logins stop counting, oldest first.
    pub fn report(&mut self, id: u64, link: u64, load: u32, arrived: u64, counts: Counts) -> bool {
        match self.servers.get_mut(&id) {
            Some(s) if s.link == Some(link) => {
                s.counts.swap(0, 1);
                s.counts[1] = (Instant::now(), counts);
                let new = s.arrived.map_or(0, |before| arrived.saturating_sub(before));
                let new = usize::try_from(new).unwrap_or(usize::MAX);
                s.pending.drain(..new.min(s.pending.len()));
                s.arrived = Some(arrived);
                s.load = load;
                s.last_seen = Instant::now();
                true
            }
            _ => false,
        }
    }

    /// A server's load as the algorithms see it: its clients, and the logins on their way.
    fn load_of(s: &mut Live) -> u32 {
        while s.pending.front().is_some_and(|t| t.elapsed() > PENDING_FOR) {
            s.pending.pop_front();
        }
        s.load.saturating_add(s.pending.len() as u32)
    }

    /// Whether server `id` is registered (live or silent, not yet forgotten).
    pub fn knows(&self, id: u64) -> bool {
        self.servers.contains_key(&id)
    }

    /// Removes the servers silent for longer than `after`; returns their ids.
    pub fn forget_silent(&mut self, after: Duration) -> Vec<u64> {
        let dead: Vec<u64> = self
            .servers
            .iter()
            .filter(|(_, s)| s.last_seen.elapsed() > after)
            .map(|(id, _)| *id)
            .collect();
        for id in &dead {
            self.servers.remove(id);
        }
        dead
    }

    /// Chooses a server for one login and counts the assignment. `avoid` is skipped unless it
    /// is the only live server.
    pub fn assign(
        &mut self,
        algo: Algo,
        timeout: Duration,
        avoid: Option<u64>,
    ) -> Option<ServerInfo> {
        let mut live: Vec<(u64, u32)> = self
            .servers
            .iter_mut()
            .filter(|(_, s)| s.link.is_some() && s.last_seen.elapsed() <= timeout)
            .map(|(id, s)| (*id, Registry::load_of(s)))
            .collect();
        if live.len() > 1 {
            live.retain(|(id, _)| Some(*id) != avoid);
        }
        if live.is_empty() {
            return None;
        }
        let pick = match algo {
            Algo::RoundRobin => {
                self.next = self.next.wrapping_add(1);
                live[self.next % live.len()].0
            }
            Algo::Random => live[self.random(live.len())].0,
            Algo::LeastLoaded => live.iter().min_by_key(|(_, load)| *load)?.0,
            Algo::P2c => {
                // Two distinct choices (when there are two servers or more).
                let a = self.random(live.len());
                let b = (a + 1 + self.random(live.len().max(2) - 1)) % live.len();
                if live[a].1 <= live[b].1 {
                    live[a].0
                } else {
                    live[b].0
                }
            }
        };
        let s = self.servers.get_mut(&pick)?;
        s.pending.push_back(Instant::now());
        Some(ServerInfo {
            id: pick,
            name: s.name.clone(),
            addr: s.addr.clone(),
            load: Registry::load_of(s),
        })
    }

    /// Every registered server for the dashboard: its info, whether it is live, and its
    /// stored, delivered and relayed messages per second over its last two reports.
    pub fn dashboard(&self, timeout: Duration) -> Vec<Board> {
        self.servers
            .iter()
            .map(|(id, s)| {
                let live = s.link.is_some() && s.last_seen.elapsed() <= timeout;
                let [(t0, a), (t1, b)] = &s.counts;
                let secs = t1.duration_since(*t0).as_secs_f64();
                let rate = |x: u64, y: u64| {
                    if live && secs > 0.0 {
                        y.saturating_sub(x) as f64 / secs
                    } else {
                        0.0
                    }
                };
                let before = |peer: u64| {
                    a.links
                        .iter()
                        .find(|(p, _)| *p == peer)
                        .map_or(0, |(_, n)| *n)
                };
                Board {
                    info: ServerInfo {
                        id: *id,
                        name: s.name.clone(),
                        addr: s.addr.clone(),
                        load: s.load,
                    },
                    live,
                    rates: [
                        rate(a.stored, b.stored),
                        rate(a.delivered, b.delivered),
                        rate(a.relayed, b.relayed),
                    ],
                    links: b
                        .links
                        .iter()
                        .map(|(peer, n)| (*peer, rate(before(*peer), *n)))
                        .collect(),
                }
            })
            .collect()
    }

    /// The live servers (those heard from within `timeout`), by id.
    pub fn infos(&self, timeout: Duration) -> Vec<ServerInfo> {
        self.live(timeout)
            .map(|(id, s)| ServerInfo {
                id: *id,
                name: s.name.clone(),
                addr: s.addr.clone(),
                load: s.load,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(loads: &[u32]) -> Registry {
        let mut servers = BTreeMap::new();
        for (i, load) in loads.iter().enumerate() {
            servers.insert(
                i as u64 + 1,
                Live {
                    name: format!("server-{}", i + 1),
                    addr: format!("127.0.0.1:{}", 1000 + i),
                    link: Some(i as u64),
                    load: *load,
                    arrived: Some(0),
                    pending: VecDeque::new(),
                    counts: [
                        (Instant::now(), Counts::default()),
                        (Instant::now(), Counts::default()),
                    ],
                    last_seen: Instant::now(),
                },
            );
        }
        Registry {
            servers,
            next: usize::MAX,
            rng: 0x1234_5678_9abc_def1,
        }
    }

    const T: Duration = Duration::from_secs(2);

    fn counts(reg: &mut Registry, algo: Algo, n: usize) -> Vec<usize> {
        let mut c = vec![0; reg.servers.len()];
        for _ in 0..n {
            let s = reg.assign(algo, T, None).unwrap();
            c[s.id as usize - 1] += 1;
        }
        c
    }

    #[test]
    fn round_robin_is_exact() {
        assert_eq!(
            counts(&mut registry(&[0, 0, 0]), Algo::RoundRobin, 30),
            [10, 10, 10]
        );
    }

    #[test]
    fn least_loaded_fills_the_gaps_first() {
        let mut reg = registry(&[5, 0, 2]);
        assert_eq!(counts(&mut reg, Algo::LeastLoaded, 8), [0, 5, 3]);
    }

    #[test]
    fn least_loaded_spreads_a_burst_evenly_whatever_reports_fall_within_it() {
        let mut reg = registry(&[0, 0, 0]);
        assert_eq!(counts(&mut reg, Algo::LeastLoaded, 3), [1, 1, 1]);
        // Server 1 reports before its login has connected: that login still counts.
        assert!(reg.report(1, 0, 0, 0, Counts::default()));
        assert_eq!(counts(&mut reg, Algo::LeastLoaded, 3), [1, 1, 1]);
        // Now both of its clients have arrived: they count once, as its load.
        assert!(reg.report(1, 0, 2, 2, Counts::default()));
        assert_eq!(counts(&mut reg, Algo::LeastLoaded, 3), [1, 1, 1]);
        // Logins that never connect stop counting after a while.
        for s in reg.servers.values_mut() {
            for t in s.pending.iter_mut() {
                *t -= PENDING_FOR + Duration::from_secs(1);
            }
        }
        assert!(reg.report(2, 1, 1, 1, Counts::default()));
        assert!(reg.report(3, 2, 1, 1, Counts::default()));
        // Loads now 2 (server 1; its third login lapsed), 1, 1: two logins even them out.
        assert_eq!(counts(&mut reg, Algo::LeastLoaded, 2), [0, 1, 1]);
    }

    #[test]
    fn random_and_p2c_use_every_server() {
        for algo in [Algo::Random, Algo::P2c] {
            let c = counts(&mut registry(&[0, 0, 0]), algo, 300);
            assert!(c.iter().all(|&n| n > 50), "{algo}: {c:?}");
        }
    }

    #[test]
    fn p2c_avoids_the_heavy_server() {
        let c = counts(&mut registry(&[1000, 0, 0]), Algo::P2c, 100);
        assert_eq!(c[0], 0, "{c:?}");
    }

    #[test]
    fn silent_servers_are_out_of_rotation() {
        let mut reg = registry(&[0, 0]);
        reg.servers.get_mut(&1).unwrap().last_seen = Instant::now() - Duration::from_secs(3);
        assert_eq!(counts(&mut reg, Algo::RoundRobin, 4), [0, 4]);
        reg.servers.get_mut(&2).unwrap().last_seen = Instant::now() - Duration::from_secs(3);
        assert!(reg.assign(Algo::LeastLoaded, T, None).is_none());
    }

    #[test]
    fn avoided_server_is_skipped_unless_alone() {
        let mut reg = registry(&[0, 0]);
        for _ in 0..4 {
            assert_eq!(reg.assign(Algo::RoundRobin, T, Some(1)).unwrap().id, 2);
        }
        let mut alone = registry(&[0]);
        assert_eq!(alone.assign(Algo::RoundRobin, T, Some(1)).unwrap().id, 1);
    }

    #[test]
    fn algo_names_parse_and_print() {
        for (name, algo) in Algo::ALL {
            assert_eq!(name.parse::<Algo>().unwrap(), algo);
            assert_eq!(algo.to_string(), name);
        }
        assert!("fastest"
            .parse::<Algo>()
            .unwrap_err()
            .contains("round-robin"));
    }

    #[test]
    fn reports_keep_a_server_and_silence_forgets_it() {
        let mut reg = Registry::new(7);
        reg.register(1, "server-1", "127.0.0.1:1", 10, T).unwrap();
        reg.register(2, "server-2", "127.0.0.1:2", 20, T).unwrap();
        assert!(reg.report(1, 10, 5, 5, Counts::default()));
        assert!(
            !reg.report(1, 11, 5, 5, Counts::default()),
            "not on the link it registered on"
        );
        assert!(
            !reg.report(3, 30, 0, 0, Counts::default()),
            "never registered"
        );
        reg.servers.get_mut(&2).unwrap().last_seen = Instant::now() - Duration::from_secs(11);
        assert_eq!(reg.forget_silent(FORGET_AFTER), [2]);
        assert!(
            !reg.report(2, 20, 0, 0, Counts::default()),
            "forgotten: must register again"
        );
        let infos = reg.infos(T);
        assert_eq!(infos.len(), 1);
        assert_eq!((infos[0].id, infos[0].load), (1, 5));
    }

    #[test]
    fn a_live_registration_is_not_taken_over_and_a_closed_link_leaves_rotation() {
        let mut reg = Registry::new(7);
        reg.register(1, "server-1", "127.0.0.1:1", 10, T).unwrap();
        let err = reg
            .register(1, "server-1", "127.0.0.1:9", 11, T)
            .unwrap_err();
        assert!(err.contains("already registered"), "{err}");
        reg.unlink(1, 11);
        assert_eq!(reg.infos(T).len(), 1, "another link's end changes nothing");
        reg.unlink(1, 10);
        assert!(
            reg.infos(T).is_empty(),
            "out of rotation when its link ends"
        );
        assert!(reg.assign(Algo::RoundRobin, T, None).is_none());
        reg.register(1, "server-1", "127.0.0.1:9", 11, T).unwrap();
        assert_eq!(reg.infos(T)[0].addr, "127.0.0.1:9", "registered again");
    }
}
