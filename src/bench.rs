//! The load generator behind `fastchat-bench`: many clients, the real protocol, real crypto.
//!
//! Every simulated user signs up and logs in through the balancer (with fresh key pairs), then
//! holds one connection to the server it was given, driven by one of a few threads (one per
//! core and at most 50 clients each, unless `--threads` says otherwise; see `driver`): it
//! seals (and in groups tags) and sends while its window has room (and, at a fixed offered
//! rate, when each message is due), and opens, checks and acknowledges what arrives.
//!
//! A payload is text, `SENDER:SEQ:NANOS:` padded to the requested size, where NANOS is when it
//! was sent (or, with a fixed rate, when it was due: latency then includes any time the client
//! fell behind). Receivers count each (sender, seq) once: what never arrives is lost, what
//! arrives twice is duplicated.
//!
//! Direct mode: message s of client i goes to client i+1+(s mod R), R = min(messages,
//! clients-1) (`--pattern` spread, the default; random: one of those R at random; ring:
//! always i+1). Group mode: groups of K consecutive
//! clients, made through the real group protocol; every member sends to its group, and every
//! message reaches the K-1 others. Idle mode: connect and hold, to see what a connection costs a
//! server.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;
use parking_lot::Mutex;

use crate::client::e2e;
use crate::client::sender_keys::GroupChains;
use crate::client::sessions::Session as RatchetSession;
use crate::client::{BalancerClient, Session};
use crate::crypto::ratchet::{self, Ratchet};
use crate::crypto::{self, Identity, PairKey};
use crate::error::{Error, Result};
use crate::membership::{self, After, Roster};
use crate::net::{
    Action, Change, Greeting, PublicKeys, Request, Response, ServerEvent, ServerReply,
    ServerRequest, WrappedKey, MAX_FRAME,
};
use crate::transport::{Channel, Expect, Transport, Waker};
use launch::{LocalCluster, Usage};

mod driver;
pub mod launch;
pub mod plot;
mod report;

use driver::{Client, Counters, Receiving, Sending};
pub use report::{markdown_header, markdown_row, progress_default, render, to_json};

/// What the clients do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Direct messages, to recipients chosen by a [`Pattern`].
    Direct,
    /// Groups of `group_size`; everyone sends to their group.
    Group,
    /// Connect and hold, sending nothing.
    Idle,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Mode, String> {
        match s {
            "direct" => Ok(Mode::Direct),
            "group" => Ok(Mode::Group),
            "idle" => Ok(Mode::Idle),
            other => Err(format!("unknown mode {other:?}: use direct, group or idle")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Direct => "direct",
            Mode::Group => "group",
            Mode::Idle => "idle",
        })
    }
}

/// Whom each client writes to in direct mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Client i to client i+1 only: a whole window to one recipient, which batches
    /// perfectly (and flatters the server).
    Ring,
    /// Message s of client i to client i+1+(s mod K), over K = min(messages, clients-1)
    /// others: every message to another recipient, as chat is (the default).
    Spread,
    /// Each message to one of those K others, chosen at random.
    Random,
}

impl std::str::FromStr for Pattern {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Pattern, String> {
        match s {
            "ring" => Ok(Pattern::Ring),
            "spread" => Ok(Pattern::Spread),
            "random" => Ok(Pattern::Random),
            other => Err(format!(
                "unknown pattern {other:?}: use ring, spread or random"
            )),
        }
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pattern::Ring => "ring",
            Pattern::Spread => "spread",
            Pattern::Random => "random",
        })
    }
}

/// Where the cluster comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A running cluster's balancer.
    Balancer(String),
    /// Start a balancer and this many servers on a temporary database, stop them after.
    Spawn(usize),
}

/// A run's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Simulated users, one connection each.
    pub clients: usize,
    /// Messages each client sends.
    pub messages: u64,
    /// Plaintext bytes per message (at least the header `SENDER:SEQ:NANOS:`).
    pub size: usize,
    /// Messages a client may have sent and not yet seen `Stored`.
    pub window: usize,
    /// What the clients do.
    pub mode: Mode,
    /// Whom they write to, in direct mode.
    pub pattern: Pattern,
    /// Members per group (group mode).
    pub group_size: usize,
    /// Total offered messages per second across all clients; `None` for as fast as possible.
    pub rate: Option<f64>,
    /// The cluster.
    pub target: Target,
    /// scrypt cost (log2 N) of a spawned balancer.
    pub scrypt_log_n: u8,
    /// How long to wait for missing deliveries once everything is sent.
    pub drain: Duration,
    /// How long idle clients stay connected (idle mode).
    pub hold: Duration,
    /// Show a progress bar on standard error.
    pub progress: bool,
    /// Kill one spawned server (SIGKILL) this long after the messages start: its clients must
    /// move to another server and nothing may be lost.
    pub kill_server: Option<Duration>,
    /// The CA of a running cluster (`--balancer`); a spawned cluster makes its own.
    pub ca: Option<PathBuf>,
    /// Run without TLS (a spawned cluster too).
    pub plaintext: bool,
    /// Message bodies are the payload itself, not sealed end to end (the servers' work is the
    /// same; the clients do no cryptography).
    pub opaque: bool,
    /// The database of a spawned cluster: a file, or a PostgreSQL URL (default: a SQLite file
    /// in the run's temporary folder).
    pub db: Option<String>,
    /// Threads that drive the clients, each its share (`None`: one per core, and at most 50
    /// clients each).
    pub threads: Option<usize>,
    /// Also report each stretch of this length of the run (by delivery time): latency and CPU.
    pub every: Option<Duration>,
}

/// Latency percentiles, microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Latency {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest.
    pub max: u64,
}

/// What a run measured.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The mode, as text.
    pub mode: String,
    /// Whom messages went to (direct mode), as text.
    pub pattern: String,
    /// Bodies sent as they are, not end-to-end encrypted.
    pub opaque: bool,
    /// Clients.
    pub clients: usize,
    /// Messages per client.
    pub messages: u64,
    /// Plaintext bytes per message.
    pub size: usize,
    /// Window per client.
    pub window: usize,
    /// Threads that drove the clients.
    pub threads: usize,
    /// Members per group (group mode).
    pub group_size: usize,
    /// Offered rate, if fixed.
    pub rate: Option<f64>,
    /// Servers in the cluster.
    pub servers: usize,
    /// Time to sign up, log in and connect every client.
    pub connect_secs: f64,
    /// `--kill-server` came after the run had ended: no failover was tested.
    pub kill_missed: bool,
    /// Clients that could not sign up, log in or connect: the run goes on without them.
    pub connect_failed: usize,
    /// Why the first of them failed.
    pub connect_error: Option<String>,
    /// Time until every message was sent and stored.
    pub send_secs: f64,
    /// Time until the last delivery.
    pub deliver_secs: f64,
    /// Deliveries expected (each message times its recipients).
    pub expected: u64,
    /// Distinct deliveries.
    pub delivered: u64,
    /// Expected but never delivered.
    pub lost: u64,
    /// Delivered again under another message id: stored twice.
    pub duplicated: u64,
    /// Delivered again under the same message id (at-least-once on the wire; a client shows
    /// it once).
    pub redelivered: u64,
    /// Connections that moved to another server after losing theirs.
    pub failovers: u64,
    /// Error replies and undecryptable messages.
    pub errors: u64,
    /// The first error seen, if any.
    pub first_error: Option<String>,
    /// Delivered messages per second.
    pub throughput: f64,
    /// Send-to-delivery latency.
    pub latency: Latency,
    /// Per server (spawned clusters): before and after connecting the clients.
    pub server_usage: Vec<(Usage, Usage)>,
    /// CPU seconds each process spent while messages flowed: the spawned servers and balancer
    /// (when spawned), and this tool.
    pub cpu: Vec<(String, f64)>,
    /// The run stretch by stretch (`--every`): does the tail grow, or come in bursts?
    pub periods: Vec<Period>,
}

/// One stretch of a run (`--every`): the messages first delivered in it, and the CPU seconds
/// each process spent in it (spawned clusters and this tool; empty otherwise).
#[derive(Debug, Clone, Default)]
pub struct Period {
    /// Seconds since the first message where the stretch starts.
    pub from_secs: f64,
    /// And where it ends.
    pub to_secs: f64,
    /// Deliveries in it.
    pub delivered: u64,
    /// Their latency.
    pub latency: Latency,
    /// CPU seconds per process.
    pub cpu: Vec<(String, f64)>,
}

impl Report {
    /// What made the run unclean, for one line of text.
    pub fn problems(&self) -> String {
        let mut said = Vec::new();
        for (n, what) in [
            (self.lost, "lost"),
            (self.duplicated, "duplicated"),
            (self.errors, "errors"),
            (self.connect_failed as u64, "clients could not connect"),
        ] {
            if n > 0 {
                said.push(format!("{n} {what}"));
            }
        }
        if let Some(e) = self.first_error.as_ref().or(self.connect_error.as_ref()) {
            said.push(format!("first error: {e}"));
        }
        if self.kill_missed {
            said.push("the run ended before --kill-server's time: no failover was tested".into());
        }
        said.join("; ")
    }

    /// True when every client connected and nothing was lost, duplicated or refused.
    pub fn clean(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.errors == 0
            && self.connect_failed == 0
            && !self.kill_missed
    }
}

/// One simulated user.
struct User {
    name: String,
    identity: Arc<Identity>,
    public: PublicKeys,
}

/// A connected client: its channel, and what `Welcome` said.
struct Link {
    chan: Channel,
    server_id: u64,
    /// The newest message id when it connected.
    newest: i64,
    /// The session (token and key), for moving to another server.
    session: Session,
    /// Messages delivered during set-up (group membership announcements), to acknowledge.
    unacked: Vec<i64>,
}

/// Runs the benchmark.
pub fn run(config: &Config) -> Result<Report> {
    check(config)?;
    let cluster = match &config.target {
        Target::Spawn(n) => Some(LocalCluster::start(
            *n,
            config.scrypt_log_n,
            "round-robin",
            &["--max-clients", &config.clients.max(10_000).to_string()],
            !config.plaintext,
            config.db.as_deref(),
        )?),
        Target::Balancer(_) => None,
    };
    let balancer = match (&config.target, &cluster) {
        (_, Some(c)) => c.balancer.clone(),
        (Target::Balancer(b), None) => b.clone(),
        (Target::Spawn(_), None) => unreachable!("spawned above"),
    };
    let transport = match (&cluster, &config.ca) {
        _ if config.plaintext => Transport::plaintext(),
        (Some(c), _) => c.transport()?,
        (None, Some(ca)) => Transport::client_with_ca(ca)?,
        (None, None) => {
            return Err(Error::Invalid(
                "give the cluster's CA file with --ca (or --insecure-plaintext)".into(),
            ))
        }
    };
    let servers = BalancerClient::connect(&balancer, &transport)?
        .servers()?
        .len();
    let usage_before = sample(cluster.as_ref());

    let run_id = crypto::to_hex(&crypto::random_bytes(3)?);
    let users: Vec<User> = (0..config.clients)
        .map(|i| {
            let identity = Identity::generate()?;
            Ok(User {
                name: format!("b{run_id}-{i}"),
                public: identity.public()?,
                identity: Arc::new(identity),
            })
        })
        .collect::<Result<_>>()?;
    let started = Instant::now();
    let outcomes = connect_all(&balancer, &transport, &users);
    let connect_secs = started.elapsed().as_secs_f64();
    let (users, links, failed) = connected(config, users, outcomes)?;

    let mut report = Report {
        mode: config.mode.to_string(),
        pattern: config.pattern.to_string(),
        opaque: config.opaque,
        clients: config.clients,
        messages: config.messages,
        size: config.size,
        window: config.window,
        threads: drivers(config),
        group_size: config.group_size,
        rate: config.rate,
        servers,
        connect_secs,
        connect_failed: failed.len(),
        connect_error: failed.into_iter().next().map(|e| e.to_string()),
        ..Report::default()
    };
    if config.mode == Mode::Idle {
        std::thread::sleep(config.hold.min(Duration::from_secs(1)));
        let after = sample(cluster.as_ref());
        report.server_usage = usage_before.into_iter().zip(after).collect();
        std::thread::sleep(config.hold.saturating_sub(Duration::from_secs(1)));
        for l in &links {
            l.chan.stream().shutdown();
        }
        return Ok(report);
    }
    let plan = Plan::make(config, &users, links)?;
    let processes = processes(cluster.as_ref());
    let cpu_before = cpu_sample(&processes);
    let victim = match (config.kill_server, &cluster) {
        (Some(after), Some(c)) => c.servers.first().map(|s| (after, s.pid())),
        _ => None,
    };
    plan.run(
        config,
        &balancer,
        &transport,
        victim,
        &processes,
        &mut report,
    )?;
    report.cpu = cpu_spent(&cpu_before, &cpu_sample(&processes));
    drop(cluster);
    Ok(report)
}

/// Checks a configuration before anything starts (the binary reports a failure as a usage
/// error).
pub fn check(config: &Config) -> Result<()> {
    let bad = |m: &str| Err(Error::Invalid(m.to_string()));
    if config.clients == 0 {
        return bad("--clients must be at least 1");
    }
    if config.mode == Mode::Direct && config.clients < 2 {
        return bad("direct mode needs at least 2 clients");
    }
    if config.window == 0 {
        return bad("--window must be at least 1");
    }
    if config.threads == Some(0) {
        return bad("--threads must be at least 1");
    }
    if config.mode == Mode::Group {
        if config.group_size < 2 {
            return bad("--group-size must be at least 2");
        }
        if !config.clients.is_multiple_of(config.group_size) {
            return bad("--clients must be a multiple of --group-size");
        }
    }
    if config.size > crate::net::MAX_BODY - 200 {
        return bad("--size is over the largest message");
    }
    if let Some(r) = config.rate {
        if !(r > 0.0 && r.is_finite()) {
            return bad("--rate must be a positive number of messages per second");
        }
    }
    Ok(())
}

fn sample(cluster: Option<&LocalCluster>) -> Vec<Usage> {
    cluster
        .map(|c| {
            c.servers
                .iter()
                .map(|s| launch::usage(s.pid()).unwrap_or_default())
                .collect()
        })
        .unwrap_or_default()
}

/// The processes whose CPU a run counts, by name and PID: each spawned process and this one;
/// none when the cluster is not this tool's (its servers' CPU is not ours to see, and this
/// tool's alone would mislead).
fn processes(cluster: Option<&LocalCluster>) -> Vec<(String, u32)> {
    let Some(c) = cluster else {
        return Vec::new();
    };
    let mut processes: Vec<(String, u32)> = Vec::new();
    for s in &c.servers {
        processes.push((s.name.clone(), s.pid()));
    }
    processes.push(("balancer".into(), c.balancer_process.pid()));
    processes.push((report::BENCH_PROCESS.into(), std::process::id()));
    processes
}

/// CPU seconds of each process, by name.
type Cpu = Vec<(String, f64)>;

/// A CPU sample and when it was taken (seconds since the first message).
type Sample = (f64, Cpu);

/// CPU seconds so far of each of `processes`.
fn cpu_sample(processes: &[(String, u32)]) -> Cpu {
    processes
        .iter()
        .map(|(name, pid)| {
            let secs = launch::usage(*pid).map_or(0.0, |u| u.cpu_secs);
            (name.clone(), secs)
        })
        .collect()
}

/// CPU seconds spent by each process between two samples.
fn cpu_spent(before: &[(String, f64)], after: &[(String, f64)]) -> Cpu {
    before
        .iter()
        .zip(after)
        .map(|((name, b), (_, a))| (name.clone(), (a - b).max(0.0)))
        .collect()
}

/// Samples the CPU of `processes` every `every` from `t0` on, until `over` is dropped, and once
/// more then: (seconds since `t0`, sample), the first at `t0`.
fn sample_cpu_every(
    processes: Vec<(String, u32)>,
    t0: Instant,
    every: Duration,
    over: crossbeam_channel::Receiver<()>,
) -> JoinHandle<Vec<Sample>> {
    std::thread::spawn(move || {
        let mut samples = vec![(0.0, cpu_sample(&processes))];
        for k in 1u32.. {
            let due = t0 + every * k;
            let wait = due.saturating_duration_since(Instant::now());
            let ended =
                over.recv_timeout(wait) != Err(crossbeam_channel::RecvTimeoutError::Timeout);
            samples.push((t0.elapsed().as_secs_f64(), cpu_sample(&processes)));
            if ended {
                break;
            }
        }
        samples
    })
}

/// The run stretch by stretch: deliveries by when they came, `every` long each, with the CPU
/// spent between the samples (`sample_cpu_every`) that bound them. The last stretch ends with
/// the run; one shorter than a fifth of `every` (the last few deliveries) joins the one
/// before it.
fn periods(deliveries: &[driver::Delivery], every: Duration, samples: &[Sample]) -> Vec<Period> {
    let every_ms = every.as_millis().max(1) as u64;
    let Some(last) = deliveries.iter().map(|d| d.at_ms as u64).max() else {
        return Vec::new();
    };
    let mut n = (last / every_ms) as usize + 1;
    if n > 1 && last % every_ms < every_ms / 5 {
        n -= 1;
    }
    let mut latencies: Vec<Vec<u32>> = vec![Vec::new(); n];
    for d in deliveries {
        let k = (d.at_ms as u64 / every_ms) as usize;
        latencies[k.min(n - 1)].push(d.latency_us);
    }
    latencies
        .into_iter()
        .enumerate()
        .map(|(k, mut us)| {
            // Bounded by samples k and k + 1; the last stretch by the last sample (the run's
            // end). Without them (no spawned cluster to sample), no CPU and a nominal end.
            let end = if k + 1 == n {
                samples.len().saturating_sub(1)
            } else {
                k + 1
            };
            let (to_secs, cpu) = match (samples.get(k), samples.get(end)) {
                (Some((_, a)), Some((at, b))) if end > k => (*at, cpu_spent(a, b)),
                _ => (((k as u64 + 1) * every_ms) as f64 / 1000.0, Vec::new()),
            };
            Period {
                from_secs: (k as u64 * every_ms) as f64 / 1000.0,
                to_secs,
                delivered: us.len() as u64,
                latency: report::percentiles(&mut us),
                cpu,
            }
        })
        .collect()
}

/// The users that connected, with their links, and why the others did not. A run goes on
/// without the clients that failed (and reports them); in group mode, with whole groups only.
/// No client at all is an error.
fn connected(
    config: &Config,
    users: Vec<User>,
    outcomes: Vec<Result<Link>>,
) -> Result<(Vec<User>, Vec<Link>, Vec<Error>)> {
    let mut ok = Vec::with_capacity(users.len());
    let mut failed = Vec::new();
    for (user, outcome) in users.into_iter().zip(outcomes) {
        match outcome {
            Ok(link) => ok.push((user, link)),
            Err(e) => failed.push(e),
        }
    }
    if !failed.is_empty() {
        log::warn!(
            "{} of {} clients could not connect (first: {})",
            failed.len(),
            failed.len() + ok.len(),
            failed[0]
        );
    }
    if config.mode == Mode::Group {
        let whole = ok.len() - ok.len() % config.group_size;
        for (_, link) in ok.drain(whole..) {
            link.chan.stream().shutdown();
        }
    }
    let least = if config.mode == Mode::Group {
        config.group_size
    } else {
        1
    };
    if ok.len() < least.max(1) {
        return Err(failed.into_iter().next().unwrap_or_else(|| {
            Error::Invalid("too few clients connected to make a group".into())
        }));
    }
    let (users, links) = ok.into_iter().unzip();
    Ok((users, links, failed))
}

/// Signs up, logs in and connects every user, from a few threads at once: each user's
/// outcome, in order.
fn connect_all(balancer: &str, transport: &Transport, users: &[User]) -> Vec<Result<Link>> {
    let next = AtomicU64::new(0);
    let slots: Vec<Mutex<Option<Result<Link>>>> = users.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..16.min(users.len()) {
            scope.spawn(|| {
                let mut b: Option<BalancerClient> = None;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= users.len() {
                        break;
                    }
                    let result = connect_one(balancer, transport, &mut b, &users[i]);
                    if result.is_err() {
                        b = None;
                    }
                    *slots[i].lock() = Some(result);
                }
            });
        }
    });
    slots
        .into_iter()
        .map(|s| s.into_inner().expect("every slot filled"))
        .collect()
}

const PASSWORD: &str = "bench-password";

fn connect_one(
    balancer: &str,
    transport: &Transport,
    b: &mut Option<BalancerClient>,
    user: &User,
) -> Result<Link> {
    let conn = match b {
        Some(c) => c,
        None => b.insert(BalancerClient::connect(balancer, transport)?),
    };
    conn.signup(&user.name, PASSWORD, user.public.clone(), None)?;
    let session = conn.login(&user.name, PASSWORD)?;
    open_link(&session, transport)
}

/// Connects to the session's server and says hello (with the session's proof).
fn open_link(session: &Session, transport: &Transport) -> Result<Link> {
    let expect = Expect::Server(Some(session.server.name.clone()));
    let stream = transport.connect(&session.server.addr, "chat server", &expect)?;
    let mut chan = Channel::new(stream)?;
    chan.stream()
        .tcp()
        .set_read_timeout(Some(crate::client::balancer::REPLY_TIMEOUT))?;
    let proof = session.key.prove(chan.stream().binding().as_ref())?;
    chan.send(&Greeting::Hello {
        token: session.token.clone(),
        proof,
    })?;
    match chan.recv::<ServerEvent>(MAX_FRAME)? {
        Some(ServerEvent::Welcome(w)) => Ok(Link {
            chan,
            server_id: w.server_id,
            newest: w.newest,
            session: session.clone(),
            unacked: Vec::new(),
        }),
        Some(ServerEvent::Reply(Response {
            result: Err(refusal),
            ..
        })) => Err(refusal.into()),
        other => Err(Error::Protocol(format!(
            "unexpected reply to Hello: {other:?}"
        ))),
    }
}

/// Sends a request on a link and reads until its reply (setup only; nothing else is going on).
fn call(link: &mut Link, id: u64, body: ServerRequest) -> Result<ServerReply> {
    link.chan.send(&Request { id, body })?;
    loop {
        match link.chan.recv::<ServerEvent>(MAX_FRAME)? {
            Some(ServerEvent::Reply(r)) if r.id == Some(id) || r.id.is_none() => {
                return r.into_result()
            }
            Some(ServerEvent::Deliver { msg }) => link.unacked.push(msg.id),
            Some(_) => {}
            None => return Err(Error::Protocol("server closed during setup".into())),
        }
    }
}

/// What one client sends and how it opens what it receives.
struct Role {
    index: usize,
    me: String,
    link: Link,
    /// Direct mode: the recipients (name, index).
    to: Vec<(String, usize)>,
    /// Direct mode: this client's side of the double ratchet with each peer, by index.
    sessions: HashMap<usize, RatchetSession>,
    /// Group mode: this client's sender chain and the other members'.
    chains: GroupChains,
    /// Group mode: the group's members.
    members: Vec<String>,
    /// Group mode: the group, its current key and epoch.
    group: Option<(String, PairKey, u64)>,
}

/// Every client's role, ready to go.
struct Plan {
    roles: Vec<Role>,
    /// Each user's place in `roles`, by name.
    senders: Arc<HashMap<String, usize>>,
    /// Deliveries per message.
    fanout: u64,
}

impl Plan {
    fn make(config: &Config, users: &[User], links: Vec<Link>) -> Result<Plan> {
        let n = users.len();
        let mut roles: Vec<Role> = Vec::with_capacity(n);
        for (i, link) in links.into_iter().enumerate() {
            roles.push(Role {
                index: i,
                me: users[i].name.clone(),
                link,
                to: Vec::new(),
                sessions: HashMap::new(),
                chains: GroupChains::default(),
                members: Vec::new(),
                group: None,
            });
        }
        let fanout = match config.mode {
            Mode::Direct => {
                // Client i writes to the K clients after it; so client j hears from the K
                // before it. A session serves both directions: each pair's is made once (its
                // secret on as many threads as there are cores), both sides in this process
                // (the tool skips the directory's key agreement, which happens once per pair).
                let k = recipients(config, n);
                let mut pairs: Vec<(usize, usize)> = (0..n)
                    .flat_map(|i| (1..=k).map(move |d| (i, (i + d) % n)))
                    .map(|(a, b)| (a.min(b), a.max(b)))
                    .collect();
                pairs.sort_unstable();
                pairs.dedup();
                let keys = pair_keys(users, &pairs)?;
                for &(a, b) in &pairs {
                    let (first, second) = session_pair(&keys[&(a, b)], a, b)?;
                    roles[a].sessions.insert(b, first);
                    roles[b].sessions.insert(a, second);
                }
                for (i, role) in roles.iter_mut().enumerate() {
                    for d in 1..=k {
                        let j = (i + d) % n;
                        role.to.push((users[j].name.clone(), j));
                    }
                }
                1
            }
            Mode::Group => {
                let k = config.group_size;
                for g in 0..n / k {
                    make_group(&mut roles[g * k..(g + 1) * k], users, g * k)?;
                }
                (k - 1) as u64
            }
            Mode::Idle => 0,
        };
        Ok(Plan {
            roles,
            senders: Arc::new(
                users
                    .iter()
                    .enumerate()
                    .map(|(i, u)| (u.name.clone(), i))
                    .collect(),
            ),
            fanout,
        })
    }

    /// Runs the clients; `victim` is a server to kill (after how long, its PID).
    fn run(
        self,
        config: &Config,
        balancer: &str,
        transport: &Transport,
        victim: Option<(Duration, u32)>,
        processes: &[(String, u32)],
        report: &mut Report,
    ) -> Result<()> {
        let n = self.roles.len() as u64;
        let expected = n * config.messages * self.fanout;
        let counters = Arc::new(Counters::default());
        let start: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
        let shared = Arc::new(driver::Shared {
            counters: Arc::clone(&counters),
            start: Arc::clone(&start),
            balancer: balancer.to_string(),
            transport: transport.clone(),
        });
        let (go_tx, go) = bounded::<()>(0);
        let (stored_tx, stored) = crossbeam_channel::unbounded::<Result<()>>();
        let n_drivers = report.threads;
        let mut groups: Vec<Vec<Client>> = (0..n_drivers).map(|_| Vec::new()).collect();
        let clients = self.roles.len();
        for role in self.roles {
            let sending = Sending {
                index: role.index,
                me: role.me.clone(),
                to: role.to,
                pattern: config.pattern,
                group: role.group.clone(),
                others: e2e::tag_order(&role.members, &role.me),
                messages: config.messages,
                size: config.size,
                window: config.window,
                schedule: config.rate.map(|r| (r, n)),
                opaque: config.opaque,
            };
            let tag_index = role
                .members
                .iter()
                .filter_map(|sender| {
                    let order = e2e::tag_order(&role.members, sender);
                    let at = order.iter().position(|m| *m == role.me)?;
                    Some((sender.clone(), at))
                })
                .collect();
            let receiving = Receiving {
                group_key: role.group.map(|(_, k, _)| k),
                tag_index,
                senders: Arc::clone(&self.senders),
                opaque: config.opaque,
            };
            let client = Client::new(
                role.link,
                sending,
                receiving,
                driver::Keys {
                    sessions: role.sessions,
                    chains: role.chains,
                },
                Arc::clone(&shared),
                stored_tx.clone(),
            )?;
            groups[role.index % n_drivers].push(client);
        }
        drop(stored_tx);
        let mut threads: Vec<JoinHandle<Vec<driver::Delivery>>> = Vec::new();
        let mut wakers = Vec::new();
        for (i, group) in groups.into_iter().enumerate() {
            let waker = Arc::new(Waker::new()?);
            wakers.push(Arc::clone(&waker));
            let go = go.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("bench-driver-{i}"))
                    .spawn(move || driver::drive(group, waker, &go))?,
            );
        }
        // Go.
        let t0 = *start.get_or_init(Instant::now);
        drop(go_tx);
        let (sampling, sampled) = bounded::<()>(0);
        let sampler = config
            .every
            .map(|every| sample_cpu_every(processes.to_vec(), t0, every, sampled));
        // The kill is called off if the run ends first (and then reported: a fault run
        // whose fault came too late tested nothing).
        let (run_over, over) = bounded::<()>(0);
        let killer = victim.map(|(after, pid)| {
            std::thread::spawn(move || {
                if over.recv_timeout(after) != Err(crossbeam_channel::RecvTimeoutError::Timeout) {
                    return false;
                }
                log::debug!("killing server process {pid} (kill -9)");
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
                true
            })
        });
        let progress = config
            .progress
            .then(|| report::Progress::start(Arc::clone(&counters), expected));
        let mut send_error = None;
        for outcome in stored.iter().take(clients) {
            if let Err(e) = outcome {
                send_error = send_error.or(Some(e));
            }
        }
        report.send_secs = t0.elapsed().as_secs_f64();
        // Wait for the stragglers, as long as deliveries keep coming.
        let mut last = counters.delivered.load(Ordering::SeqCst);
        let mut quiet_since = Instant::now();
        while counters.delivered.load(Ordering::SeqCst) < expected {
            std::thread::sleep(Duration::from_millis(20));
            let now = counters.delivered.load(Ordering::SeqCst);
            if now != last {
                last = now;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() > config.drain {
                break;
            }
        }
        if let Some(p) = progress {
            p.stop();
        }
        drop(run_over);
        drop(sampling);
        report.kill_missed = killer.is_some_and(|k| !k.join().unwrap_or(false));
        counters.finished.store(true, Ordering::SeqCst);
        for w in &wakers {
            w.wake();
        }
        let mut deliveries: Vec<driver::Delivery> = Vec::new();
        for t in threads {
            if let Ok(d) = t.join() {
                deliveries.extend(d);
            }
        }
        if let Some(e) = send_error {
            counters.error(&format!("sending failed: {e}"));
        }
        let shared = counters;
        let delivered = shared.delivered.load(Ordering::SeqCst);
        report.expected = expected;
        report.delivered = delivered;
        report.lost = expected.saturating_sub(delivered);
        report.duplicated = shared.duplicated.load(Ordering::SeqCst);
        report.redelivered = shared.redelivered.load(Ordering::SeqCst);
        report.failovers = shared.failovers.load(Ordering::SeqCst);
        report.errors = shared.errors.load(Ordering::SeqCst);
        report.first_error = shared.first_error.lock().clone();
        report.deliver_secs = shared.last_delivery_ns.load(Ordering::SeqCst) as f64 / 1e9;
        if report.deliver_secs > 0.0 {
            report.throughput = delivered as f64 / report.deliver_secs;
        }
        if let (Some(every), Some(sampler)) = (config.every, sampler) {
            let samples = sampler.join().unwrap_or_default();
            report.periods = periods(&deliveries, every, &samples);
        }
        let mut latencies: Vec<u32> = deliveries.iter().map(|d| d.latency_us).collect();
        report.latency = report::percentiles(&mut latencies);
        Ok(())
    }
}

/// Most clients one driving thread takes by default: its `poll` looks at every one of their
/// sockets each time, so thousands on one thread cost more than their wake-ups would.
const CLIENTS_PER_THREAD: usize = 50;

/// How many threads drive the clients: as asked, else one per core and at most
/// [`CLIENTS_PER_THREAD`] clients each; never more threads than clients.
fn drivers(config: &Config) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let default = cores.max(config.clients.div_ceil(CLIENTS_PER_THREAD));
    config
        .threads
        .unwrap_or(default)
        .clamp(1, config.clients.max(1))
}

/// How many others each client writes to in direct mode: one in a ring, else as many as it
/// sends messages, at most everyone else.
fn recipients(config: &Config, n: usize) -> usize {
    match config.pattern {
        Pattern::Ring => 1,
        Pattern::Spread | Pattern::Random => {
            (config.messages.min(n.saturating_sub(1) as u64) as usize).max(1)
        }
    }
}

/// Both sides of a pair's double ratchet, from their shared secret: `a` starts it and `b`
/// answers a first message at once (in memory), so that either may send.
fn session_pair(secret: &PairKey, a: usize, b: usize) -> Result<(RatchetSession, RatchetSession)> {
    let (private, public) = ratchet::x25519_pair()?;
    let mut first = Ratchet::initiator(&secret.0, &public)?;
    let mut second = Ratchet::responder(&secret.0, &private)?;
    let now = crate::db::now_ms();
    let (header, sealed) = first.seal(b"fastchat-bench", b"hello", now)?;
    second.open(b"fastchat-bench", &header, &sealed, now)?;
    let id = ((a as u64) << 32) | b as u64;
    let side = |ratchet| RatchetSession {
        id,
        ratchet,
        init: None,
    };
    Ok((side(first), side(second)))
}

/// The pair keys of `pairs` (indexes into `users`, lower first), made on every core.
fn pair_keys(users: &[User], pairs: &[(usize, usize)]) -> Result<HashMap<(usize, usize), PairKey>> {
    let cores = std::thread::available_parallelism().map_or(2, |c| c.get());
    let chunk = pairs.len().div_ceil(cores).max(1);
    type Keyed = Vec<((usize, usize), PairKey)>;
    let parts: Vec<Result<Keyed>> = std::thread::scope(|scope| {
        let handles: Vec<_> = pairs
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|&(a, b)| {
                            let (u, v) = (&users[a], &users[b]);
                            Ok((
                                (a, b),
                                u.identity.pair_key(&u.name, &v.name, &v.public.x25519)?,
                            ))
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a pair key thread"))
            .collect()
    });
    let mut keys = HashMap::with_capacity(pairs.len());
    for part in parts {
        keys.extend(part?);
    }
    Ok(keys)
}

/// Creates a group of `members` through the protocol, as clients do: the first member
/// creates it and adds the others, each change signed and keyed for the members after it;
/// then every member fetches and unwraps the key of the last epoch.
fn make_group(members: &mut [Role], users: &[User], first: usize) -> Result<()> {
    let group = format!("{}/g", members[0].me);
    let admin = &users[first];
    let wrap = |key: &PairKey, epoch: u64, member: &User| -> Result<WrappedKey> {
        let pair = admin
            .identity
            .pair_key(&admin.name, &member.name, &member.public.x25519)?;
        let aad = e2e::wrap_aad(&group, epoch, &member.name, &admin.name);
        Ok(WrappedKey {
            member: member.name.clone(),
            wrapped: pair.seal(&aad, &key.0)?,
        })
    };
    let mut roster: Option<Roster> = None;
    let group_users = &users[first..first + members.len()];
    for (j, member) in group_users.iter().enumerate() {
        let action = if j == 0 {
            Action::Create
        } else {
            Action::Add(member.name.clone())
        };
        let (seq, prev) = roster
            .as_ref()
            .map_or((1, Vec::new()), |r| (r.seq + 1, r.head.clone()));
        let change = e2e::sign_change(
            &admin.identity,
            Change {
                group: group.clone(),
                seq,
                prev,
                by: admin.name.clone(),
                action,
            },
        )?;
        let key = PairKey::random()?;
        let keys = group_users[..=j]
            .iter()
            .map(|u| wrap(&key, seq, u))
            .collect::<Result<Vec<_>>>()?;
        roster = match membership::apply(roster.as_ref(), &change)? {
            After::Roster(r) => Some(r),
            After::Deleted => None,
        };
        call(
            &mut members[0].link,
            1 + j as u64,
            ServerRequest::GroupChange {
                change,
                keys,
                client_id: crypto::random_u64()?,
            },
        )?;
    }
    let epoch = members.len() as u64;
    for (j, role) in members.iter_mut().enumerate() {
        let user = &users[first + j];
        let wrapped = match call(
            &mut role.link,
            100,
            ServerRequest::GroupKey {
                group: group.clone(),
                epoch,
            },
        )? {
            ServerReply::GroupKey { key, wrapped_by } if wrapped_by == admin.name => key,
            other => return Err(Error::Protocol(format!("unexpected {other:?}"))),
        };
        let pair = user
            .identity
            .pair_key(&user.name, &admin.name, &admin.public.x25519)?;
        let aad = e2e::wrap_aad(&group, epoch, &user.name, &admin.name);
        let raw = pair.open(&aad, &wrapped)?;
        let key = PairKey(
            raw.try_into()
                .map_err(|_| Error::Integrity("group key of the wrong size".into()))?,
        );
        role.group = Some((group.clone(), key, epoch));
    }
    // Each member's sender chain of the epoch, handed to the others in memory (the client
    // hands it out in direct messages, once per epoch).
    let names: Vec<String> = (0..members.len())
        .map(|j| users[first + j].name.clone())
        .collect();
    for i in 0..members.len() {
        let (key, n, _) = members[i].chains.sending(epoch)?;
        let macs: Vec<[u8; 32]> = names
            .iter()
            .map(|name| members[i].chains.mac_for(epoch, name))
            .collect::<Result<_>>()?;
        for (j, other) in members.iter_mut().enumerate() {
            if j != i {
                other.chains.install(epoch, &names[i], key, n, macs[j]);
            }
        }
    }
    for role in members.iter_mut() {
        role.members = names.clone();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::driver::Delivery;
    use super::*;

    fn at(at_ms: u32, latency_us: u32) -> Delivery {
        Delivery { at_ms, latency_us }
    }

    fn cpu(secs: f64) -> Vec<(String, f64)> {
        vec![("server0".into(), secs), ("bench".into(), secs / 2.0)]
    }

    #[test]
    fn periods_take_every_delivery_once_with_the_cpu_between_their_samples() {
        let every = Duration::from_secs(1);
        // Samples at 0, 1 and 2 s, and at the run's end (2.1 s).
        let samples = [
            (0.0, cpu(0.0)),
            (1.0, cpu(0.5)),
            (2.0, cpu(1.5)),
            (2.1, cpu(1.6)),
        ];
        let deliveries = [at(10, 100), at(900, 300), at(1000, 200), at(1999, 400)];
        let p = periods(&deliveries, every, &samples);
        assert_eq!(p.len(), 2);
        assert_eq!(
            (p[0].from_secs, p[0].to_secs, p[0].delivered),
            (0.0, 1.0, 2)
        );
        assert_eq!((p[0].latency.p50, p[0].latency.max), (300, 300));
        assert_eq!(
            p[0].cpu,
            vec![("server0".into(), 0.5), ("bench".into(), 0.25)]
        );
        // The last stretch ends with the run.
        assert_eq!(
            (p[1].from_secs, p[1].to_secs, p[1].delivered),
            (1.0, 2.1, 2)
        );
        assert!((p[1].cpu[0].1 - 1.1).abs() < 1e-9, "{:?}", p[1].cpu);
        // A stub of a stretch (the last deliveries, 50 ms of 1 s) joins the one before.
        let late = [at(10, 100), at(1500, 100), at(2050, 700)];
        let p = periods(&late, every, &samples);
        assert_eq!(p.len(), 2);
        assert_eq!(
            (p[1].delivered, p[1].latency.max, p[1].to_secs),
            (2, 700, 2.1)
        );
        // A stretch long enough stands alone; nothing delivered, no stretches.
        let later = [at(10, 100), at(2500, 100)];
        assert_eq!(periods(&later, every, &samples).len(), 3);
        assert!(periods(&[], every, &samples).is_empty());
    }
}
