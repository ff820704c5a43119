//! A chat server's settings.

use std::time::Duration;

use super::quota::Quotas;
use crate::net::DEFAULT_MAX_FILE;
use crate::transport::Transport;

/// Chat server settings.
#[derive(Clone)]
pub struct Config {
    /// The shared SQLite file.
    pub db: crate::db::Location,
    /// TLS with this server's certificate (or plaintext, for teaching).
    pub transport: Transport,
    /// The name to register under: with TLS, the name in the certificate (the default); in
    /// plaintext, `server-PORT` unless given.
    pub name: Option<String>,
    /// The balancer to register with: `ADDR`, or `ADDR,ADDR,...` for a cluster with several
    /// (on PostgreSQL); the server registers with, and beats to, every one.
    pub balancer: String,
    /// The address to register (default: the listener's address, with 127.0.0.1 for 0.0.0.0).
    pub advertise: Option<String>,
    /// Most client connections at once; more are refused with an `Unavailable` error.
    pub max_clients: usize,
    /// Per-connection outbound queue length; a client that lets it fill is disconnected.
    pub queue_len: usize,
    /// A connection must send `Hello` within this time.
    pub hello_timeout: Duration,
    /// The largest file accepted, in bytes.
    pub max_file: u64,
    /// Requests per second one connection may make (in bursts of as many); a faster client is
    /// slowed down, not refused. 0: no limit.
    pub max_rate: u32,
    /// How long to keep trying the balancer at start before giving up.
    pub startup_timeout: Duration,
    /// What queues and users may hold, and how long messages are kept.
    pub quotas: Quotas,
    /// How long work waits for the database, and how large its log may grow.
    pub db_options: crate::db::Options,
    /// Serve `/metrics` (Prometheus text) on this address.
    pub metrics: Option<String>,
}

impl Config {
    /// The balancers' addresses, in the order given.
    pub fn balancers(&self) -> Vec<String> {
        self.balancer
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// Defaults for everything but the database, the balancer and the transport.
    pub fn new(
        db: impl Into<crate::db::Location>,
        balancer: String,
        transport: Transport,
    ) -> Config {
        Config {
            db: db.into(),
            transport,
            name: None,
            balancer,
            advertise: None,
            max_clients: 10_000,
            queue_len: 4096,
            hello_timeout: Duration::from_secs(10),
            max_file: DEFAULT_MAX_FILE,
            max_rate: 10_000,
            startup_timeout: Duration::from_secs(10),
            quotas: Quotas::default(),
            db_options: crate::db::Options::default(),
            metrics: None,
        }
    }
}
