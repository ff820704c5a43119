//! The load generator behind `fastchat-bench`: many clients, the real protocol, real crypto.
//!
//! Every simulated user signs up and logs in through the balancer (with fresh key pairs), then
//! holds one connection to the server it was given. Each client has two threads:
//!
//! ```text
//! sender: wait for a window slot ─▶ seal (and sign, in groups) ─▶ Send/GroupSend ─▶ socket
//!            ▲ slot back on Stored                    (flushed when the window is full)
//! reader: socket ─▶ Stored: free a slot │ Deliver: open, check, record latency, queue Ack
//!                                       └ Ack sent when the read buffer runs dry
//! ```
//!
//! A payload is text, `SENDER:SEQ:NANOS:` padded to the requested size, where NANOS is when it
//! was sent (or, with a fixed rate, when it was due: latency then includes any time the client
//! fell behind). Receivers count each (sender, seq) once: what never arrives is lost, what
//! arrives twice is duplicated.
//!
//! Direct mode: client i sends to client i+1 (cyclically). Group mode: groups of K consecutive
//! clients, made through the real group protocol; every member sends to its group, and every
//! message reaches the K-1 others. Idle mode: connect and hold, to see what a connection costs a
//! server.

use std::collections::HashSet;
use std::io::IsTerminal;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use parking_lot::Mutex;

use crate::client::{dial, BalancerClient, Session};
use crate::crypto::{self, Identity, PairKey};
use crate::e2e::{self, Plain};
use crate::error::{Error, Result};
use crate::launch::{self, LocalCluster, Usage};
use crate::net::{FrameReader, FrameWriter, PublicKeys, ServerEvent, ServerRequest};

/// What the clients do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Client i sends to client i+1.
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
    /// Clients.
    pub clients: usize,
    /// Messages per client.
    pub messages: u64,
    /// Plaintext bytes per message.
    pub size: usize,
    /// Window per client.
    pub window: usize,
    /// Members per group (group mode).
    pub group_size: usize,
    /// Offered rate, if fixed.
    pub rate: Option<f64>,
    /// Servers in the cluster.
    pub servers: usize,
    /// Time to sign up, log in and connect every client.
    pub connect_secs: f64,
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
    /// Delivered more than once.
    pub duplicated: u64,
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
}

impl Report {
    /// True when nothing was lost, duplicated or refused.
    pub fn clean(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.errors == 0
    }
}

/// One simulated user.
struct User {
    name: String,
    identity: Arc<Identity>,
    public: PublicKeys,
}

/// A connected client: its socket, split.
struct Link {
    reader: FrameReader<TcpStream>,
    writer: Arc<Mutex<FrameWriter<TcpStream>>>,
    stream: TcpStream,
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
        )?),
        Target::Balancer(_) => None,
    };
    let balancer = match (&config.target, &cluster) {
        (_, Some(c)) => c.balancer.clone(),
        (Target::Balancer(b), None) => b.clone(),
        (Target::Spawn(_), None) => unreachable!("spawned above"),
    };
    let servers = BalancerClient::connect(&balancer)?.servers()?.len();
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
    let links = connect_all(&balancer, &users)?;
    let connect_secs = started.elapsed().as_secs_f64();

    let mut report = Report {
        mode: config.mode.to_string(),
        clients: config.clients,
        messages: config.messages,
        size: config.size,
        window: config.window,
        group_size: config.group_size,
        rate: config.rate,
        servers,
        connect_secs,
        ..Report::default()
    };
    if config.mode == Mode::Idle {
        std::thread::sleep(config.hold.min(Duration::from_secs(1)));
        let after = sample(cluster.as_ref());
        report.server_usage = usage_before.into_iter().zip(after).collect();
        std::thread::sleep(config.hold.saturating_sub(Duration::from_secs(1)));
        for l in &links {
            let _ = l.stream.shutdown(Shutdown::Both);
        }
        return Ok(report);
    }
    let plan = Plan::make(config, &users, links)?;
    let cpu_before = cpu_sample(cluster.as_ref());
    plan.run(config, &mut report)?;
    report.cpu = cpu_before
        .into_iter()
        .zip(cpu_sample(cluster.as_ref()))
        .map(|((name, before), (_, after))| (name, after - before))
        .collect();
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

/// CPU seconds so far of each spawned process and of this one.
fn cpu_sample(cluster: Option<&LocalCluster>) -> Vec<(String, f64)> {
    let mut processes: Vec<(String, u32)> = Vec::new();
    if let Some(c) = cluster {
        for s in &c.servers {
            processes.push((s.name.clone(), s.pid()));
        }
        processes.push(("balancer".into(), c.balancer_process.pid()));
    }
    processes.push(("bench".into(), std::process::id()));
    processes
        .into_iter()
        .map(|(name, pid)| (name, launch::usage(pid).map_or(0.0, |u| u.cpu_secs)))
        .collect()
}

/// Signs up, logs in and connects every user, from a few threads at once.
fn connect_all(balancer: &str, users: &[User]) -> Result<Vec<Link>> {
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
                    let result = connect_one(balancer, &mut b, &users[i]);
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

fn connect_one(balancer: &str, b: &mut Option<BalancerClient>, user: &User) -> Result<Link> {
    let conn = match b {
        Some(c) => c,
        None => b.insert(BalancerClient::connect(balancer)?),
    };
    conn.signup(&user.name, PASSWORD, user.public.clone())?;
    let session = conn.login(&user.name, PASSWORD)?;
    open_link(&session)
}

/// Connects to the session's server and says hello.
fn open_link(session: &Session) -> Result<Link> {
    let stream = dial(&session.server.addr, "chat server")?;
    let mut reader = FrameReader::new(stream.try_clone()?);
    let mut writer = FrameWriter::new(stream.try_clone()?);
    writer.send(&ServerRequest::Hello {
        id: 0,
        token: session.token.clone(),
    })?;
    match reader.read::<ServerEvent>()? {
        Some(ServerEvent::Welcome { .. }) => Ok(Link {
            reader,
            writer: Arc::new(Mutex::new(writer)),
            stream,
        }),
        Some(ServerEvent::Error { message, code, .. }) => Err(Error::Refused { code, message }),
        other => Err(Error::Protocol(format!(
            "unexpected reply to Hello: {other:?}"
        ))),
    }
}

/// Sends a request on a link and reads until its reply (setup only; nothing else is going on).
fn call(link: &mut Link, request: ServerRequest) -> Result<ServerEvent> {
    let id = match &request {
        ServerRequest::GroupCreate { id, .. }
        | ServerRequest::GroupAdd { id, .. }
        | ServerRequest::GroupKey { id, .. } => *id,
        _ => return Err(Error::Protocol("not a setup request".into())),
    };
    link.writer.lock().send(&request)?;
    loop {
        match link.reader.read::<ServerEvent>()? {
            Some(ServerEvent::Error {
                id: Some(i),
                code,
                message,
            }) if i == id => return Err(Error::Refused { code, message }),
            Some(e @ (ServerEvent::Done { id: i } | ServerEvent::GroupKey { id: i, .. }))
                if i == id =>
            {
                return Ok(e)
            }
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
    /// Direct mode: the recipient and the pair key with them.
    to: Option<(String, PairKey)>,
    /// Direct mode: the one sender and the pair key with them.
    from_key: Option<PairKey>,
    /// Group mode: the group and its key (epoch 1).
    group: Option<(String, PairKey)>,
    identity: Arc<Identity>,
}

/// Every client's role, ready to go.
struct Plan {
    roles: Vec<Role>,
    /// Each user's Ed25519 public key, for checking group signatures.
    ed25519: Arc<Vec<Vec<u8>>>,
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
                to: None,
                from_key: None,
                group: None,
                identity: Arc::clone(&users[i].identity),
            });
        }
        let fanout = match config.mode {
            Mode::Direct => {
                for i in 0..n {
                    let next = (i + 1) % n;
                    let prev = (i + n - 1) % n;
                    let u = &users[i];
                    let to_key = u.identity.pair_key(
                        &u.name,
                        &users[next].name,
                        &users[next].public.x25519,
                    )?;
                    let from_key = u.identity.pair_key(
                        &u.name,
                        &users[prev].name,
                        &users[prev].public.x25519,
                    )?;
                    roles[i].to = Some((users[next].name.clone(), to_key));
                    roles[i].from_key = Some(from_key);
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
            ed25519: Arc::new(users.iter().map(|u| u.public.ed25519.clone()).collect()),
            fanout,
        })
    }

    fn run(self, config: &Config, report: &mut Report) -> Result<()> {
        let n = self.roles.len() as u64;
        let expected = n * config.messages * self.fanout;
        let shared = Arc::new(Counters::default());
        let start: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
        let (go_tx, go) = bounded::<()>(0);
        let mut readers: Vec<JoinHandle<Vec<u32>>> = Vec::new();
        let mut senders: Vec<JoinHandle<Result<()>>> = Vec::new();
        let mut streams = Vec::new();
        let mut all_acks = Vec::new();
        let mut paced = Vec::new();
        for role in self.roles {
            streams.push(role.link.stream.try_clone()?);
            let (slots, free) = bounded::<()>(config.window);
            let receiving = Receiving {
                from_key: role.from_key.clone(),
                group_key: role.group.as_ref().map(|(_, k)| k.clone()),
                ed25519: Arc::clone(&self.ed25519),
                prefix_len: role.me.rfind('-').map_or(0, |p| p + 1),
                counters: Arc::clone(&shared),
                start: Arc::clone(&start),
                free,
            };
            let Role {
                link,
                index,
                me,
                to,
                group,
                identity,
                ..
            } = role;
            let Link { reader, writer, .. } = link;
            let acks = Arc::new(Acks::new(Arc::clone(&writer)));
            all_acks.push(Arc::clone(&acks));
            readers.push(
                std::thread::Builder::new()
                    .name(format!("bench-reader-{index}"))
                    .spawn(move || receiving.run(reader, &acks))?,
            );
            let sending = Sending {
                index,
                me,
                to,
                group,
                identity,
                writer,
                slots,
                size: config.size,
                counters: Arc::clone(&shared),
            };
            if config.rate.is_some() {
                paced.push(sending);
                continue;
            }
            let (go, start, messages) = (go.clone(), Arc::clone(&start), config.messages);
            senders.push(
                std::thread::Builder::new()
                    .name(format!("bench-sender-{index}"))
                    .spawn(move || sending.run(messages, &go, &start))?,
            );
        }
        if let Some(rate) = config.rate {
            let (go, start, messages) = (go.clone(), Arc::clone(&start), config.messages);
            senders.push(
                std::thread::Builder::new()
                    .name("bench-pacer".into())
                    .spawn(move || pace(paced, messages, rate, &go, &start))?,
            );
        }
        let acker = Acker::start(all_acks)?;
        // Go.
        let t0 = *start.get_or_init(Instant::now);
        drop(go_tx);
        let progress = config
            .progress
            .then(|| Progress::start(Arc::clone(&shared), expected));
        let mut send_error = None;
        for s in senders {
            match s.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => send_error = send_error.or(Some(e)),
                Err(_) => {
                    send_error = send_error.or(Some(Error::Protocol("sender panicked".into())))
                }
            }
        }
        report.send_secs = t0.elapsed().as_secs_f64();
        // Wait for the stragglers, as long as deliveries keep coming.
        let mut last = shared.delivered.load(Ordering::SeqCst);
        let mut quiet_since = Instant::now();
        while shared.delivered.load(Ordering::SeqCst) < expected {
            std::thread::sleep(Duration::from_millis(20));
            let now = shared.delivered.load(Ordering::SeqCst);
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
        acker.stop();
        for s in &streams {
            let _ = s.shutdown(Shutdown::Both);
        }
        let mut latencies: Vec<u32> = Vec::new();
        for r in readers {
            if let Ok(l) = r.join() {
                latencies.extend(l);
            }
        }
        if let Some(e) = send_error {
            shared.error(&format!("sending failed: {e}"));
        }
        let delivered = shared.delivered.load(Ordering::SeqCst);
        report.expected = expected;
        report.delivered = delivered;
        report.lost = expected.saturating_sub(delivered);
        report.duplicated = shared.duplicated.load(Ordering::SeqCst);
        report.errors = shared.errors.load(Ordering::SeqCst);
        report.first_error = shared.first_error.lock().clone();
        report.deliver_secs = shared.last_delivery_ns.load(Ordering::SeqCst) as f64 / 1e9;
        if report.deliver_secs > 0.0 {
            report.throughput = delivered as f64 / report.deliver_secs;
        }
        report.latency = percentiles(&mut latencies);
        Ok(())
    }
}

/// Creates group `g` of `members` through the protocol: the first member is admin, wraps the
/// key for everyone; the others fetch and unwrap theirs.
fn make_group(members: &mut [Role], users: &[User], first: usize) -> Result<()> {
    let group = format!("{}-g", members[0].me);
    let key = PairKey::random()?;
    let admin = &users[first];
    let wrap = |member: &User| -> Result<Vec<u8>> {
        let pair = admin
            .identity
            .pair_key(&admin.name, &member.name, &member.public.x25519)?;
        let aad = e2e::wrap_aad(&group, 1, &member.name, &admin.name);
        pair.seal(&aad, &key.0)
    };
    call(
        &mut members[0].link,
        ServerRequest::GroupCreate {
            id: 1,
            group: group.clone(),
            key: wrap(admin)?,
        },
    )?;
    for (j, member) in users[first + 1..first + members.len()].iter().enumerate() {
        call(
            &mut members[0].link,
            ServerRequest::GroupAdd {
                id: 2 + j as u64,
                group: group.clone(),
                user: member.name.clone(),
                epoch: 1,
                key: wrap(member)?,
            },
        )?;
    }
    for (j, role) in members.iter_mut().enumerate() {
        let user = &users[first + j];
        let wrapped = match call(
            &mut role.link,
            ServerRequest::GroupKey {
                id: 100,
                group: group.clone(),
                epoch: 1,
            },
        )? {
            ServerEvent::GroupKey {
                key, wrapped_by, ..
            } if wrapped_by == admin.name => key,
            other => return Err(Error::Protocol(format!("unexpected {other:?}"))),
        };
        let pair = user
            .identity
            .pair_key(&user.name, &admin.name, &admin.public.x25519)?;
        let raw = pair.open(&e2e::wrap_aad(&group, 1, &user.name, &admin.name), &wrapped)?;
        let key = PairKey(
            raw.try_into()
                .map_err(|_| Error::Integrity("group key of the wrong size".into()))?,
        );
        role.group = Some((group.clone(), key));
    }
    Ok(())
}

/// Counters shared by every thread of a run.
#[derive(Default)]
struct Counters {
    delivered: AtomicU64,
    duplicated: AtomicU64,
    stored: AtomicU64,
    errors: AtomicU64,
    last_delivery_ns: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Counters {
    fn error(&self, what: &str) {
        self.errors.fetch_add(1, Ordering::SeqCst);
        let mut first = self.first_error.lock();
        if first.is_none() {
            *first = Some(what.to_string());
        }
    }
}

/// A client's sending side.
struct Sending {
    index: usize,
    me: String,
    to: Option<(String, PairKey)>,
    group: Option<(String, PairKey)>,
    identity: Arc<Identity>,
    writer: Arc<Mutex<FrameWriter<TcpStream>>>,
    /// Window: a slot is taken per message and given back by the reader on `Stored`.
    slots: Sender<()>,
    size: usize,
    counters: Arc<Counters>,
}

impl Sending {
    /// Seals and writes message `seq`, due at `due` (`start` is time zero); `flush` sends it
    /// now, else it waits in the buffer until the window fills.
    fn send(&self, seq: u64, due: Instant, start: Instant, flush: bool) -> Result<()> {
        if self.slots.try_send(()).is_err() {
            // The window is full: push out what is buffered, then wait for a slot.
            self.writer.lock().flush()?;
            self.slots
                .send_timeout((), Duration::from_secs(30))
                .map_err(|_| Error::Protocol("no Stored reply for 30 s".into()))?;
        }
        let sent_ns = due.saturating_duration_since(start).as_nanos() as u64;
        let text = payload(self.index, seq, sent_ns, self.size);
        let request = self.request(seq, &text)?;
        let mut w = self.writer.lock();
        w.write(&request)?;
        if flush {
            w.flush()?;
        }
        Ok(())
    }

    /// As fast as the window allows: this client's own thread.
    fn run(self, messages: u64, go: &Receiver<()>, start: &OnceLock<Instant>) -> Result<()> {
        let _ = go.recv();
        let start = *start.get().expect("set before go");
        for seq in 0..messages {
            self.send(seq, Instant::now(), start, false)?;
        }
        self.writer.lock().flush()?;
        self.wait_stored();
        Ok(())
    }

    /// Waits until every message is stored (all window slots back).
    fn wait_stored(&self) {
        for _ in 0..self.slots.capacity().unwrap_or(0) {
            if self
                .slots
                .send_timeout((), Duration::from_secs(30))
                .is_err()
            {
                self.counters.error("messages never confirmed as stored");
                break;
            }
        }
    }

    fn request(&self, seq: u64, text: &str) -> Result<ServerRequest> {
        let plain = Plain::Text(text.to_string());
        if let Some((to, key)) = &self.to {
            let body = e2e::seal_direct_with(key, &self.me, to, seq, &plain)?;
            return Ok(ServerRequest::Send {
                id: seq,
                to: to.clone(),
                client_id: seq,
                body,
                file: None,
            });
        }
        let (group, key) = self.group.as_ref().expect("a direct or group role");
        let body = e2e::seal_group_with(&self.identity, key, group, &self.me, seq, 1, &plain)?;
        Ok(ServerRequest::GroupSend {
            id: seq,
            group: group.clone(),
            client_id: seq,
            epoch: 1,
            body,
            file: None,
        })
    }
}

/// A fixed offered load, from one thread for all clients: message k (of client k mod N, its
/// number k div N) is due k/R seconds after the start, and is written and flushed then. One
/// pacing thread wakes far less often than one sleeping thread per client would, so the tool
/// takes less of the machine it measures.
fn pace(
    clients: Vec<Sending>,
    messages: u64,
    rate: f64,
    go: &Receiver<()>,
    start: &OnceLock<Instant>,
) -> Result<()> {
    let _ = go.recv();
    let start = *start.get().expect("set before go");
    let n = clients.len() as u64;
    for k in 0..n * messages {
        let due = start + Duration::from_secs_f64(k as f64 / rate);
        let now = Instant::now();
        if due > now + Duration::from_micros(50) {
            std::thread::sleep(due - now);
        }
        clients[(k % n) as usize].send(k / n, due, start, true)?;
    }
    for c in &clients {
        c.wait_stored();
    }
    Ok(())
}

/// `SENDER:SEQ:NANOS:` padded with dots to `size` bytes.
fn payload(sender: usize, seq: u64, nanos: u64, size: usize) -> String {
    let mut s = format!("{sender}:{seq}:{nanos}:");
    if s.len() < size {
        s.extend(std::iter::repeat_n('.', size - s.len()));
    }
    s
}

/// Parses a payload back into (sender, seq, nanos).
fn parse_payload(text: &str) -> Option<(u64, u64, u64)> {
    let mut it = text.splitn(4, ':');
    Some((
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
    ))
}

/// A client's receiving side.
struct Receiving {
    from_key: Option<PairKey>,
    group_key: Option<PairKey>,
    ed25519: Arc<Vec<Vec<u8>>>,
    /// Where the index starts in a user name (`bRUN-INDEX`).
    prefix_len: usize,
    counters: Arc<Counters>,
    start: Arc<OnceLock<Instant>>,
    free: Receiver<()>,
}

/// Most message ids in one acknowledgement from the bench.
const ACK_BATCH: usize = 256;

/// Longest an acknowledgement waits to be batched with others.
const ACK_DELAY: Duration = Duration::from_millis(10);

/// A client's acknowledgements not yet sent. Like TCP's delayed ACK: sent at once when a
/// batch is full, else by the [`Acker`] within [`ACK_DELAY`], so a client at a low rate does
/// not cost the server a transaction and a reply per message.
struct Acks {
    pending: Mutex<Vec<i64>>,
    writer: Arc<Mutex<FrameWriter<TcpStream>>>,
    next_id: AtomicU64,
}

impl Acks {
    fn new(writer: Arc<Mutex<FrameWriter<TcpStream>>>) -> Acks {
        Acks {
            pending: Mutex::new(Vec::with_capacity(ACK_BATCH)),
            writer,
            next_id: AtomicU64::new(1 << 62),
        }
    }

    /// Adds one; sends the batch if it is full.
    fn push(&self, msg_id: i64) -> Result<()> {
        let full = {
            let mut p = self.pending.lock();
            p.push(msg_id);
            p.len() >= ACK_BATCH
        };
        if full {
            self.flush()?;
        }
        Ok(())
    }

    /// Sends what is pending.
    fn flush(&self) -> Result<()> {
        let msg_ids = std::mem::take(&mut *self.pending.lock());
        if msg_ids.is_empty() {
            return Ok(());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.writer.lock().send(&ServerRequest::Ack { id, msg_ids })
    }
}

/// One thread that flushes every client's pending acknowledgements every [`ACK_DELAY`].
struct Acker {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

impl Acker {
    fn start(all: Vec<Arc<Acks>>) -> Result<Acker> {
        let (stop, stopped) = bounded::<()>(0);
        let thread = std::thread::Builder::new()
            .name("bench-acker".into())
            .spawn(move || {
                while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(ACK_DELAY)
                {
                    for acks in &all {
                        let _ = acks.flush();
                    }
                }
            })?;
        Ok(Acker { stop, thread })
    }

    fn stop(self) {
        drop(self.stop);
        let _ = self.thread.join();
    }
}

impl Receiving {
    /// Reads until the socket closes; returns latencies in microseconds.
    fn run(self, mut reader: FrameReader<TcpStream>, acks: &Acks) -> Vec<u32> {
        let mut latencies = Vec::new();
        let mut seen: HashSet<(u64, u64)> = HashSet::new();
        loop {
            match reader.read::<ServerEvent>() {
                Ok(Some(ServerEvent::Stored { .. })) => {
                    let _ = self.free.try_recv();
                    self.counters.stored.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Some(ServerEvent::Deliver { msg })) => {
                    match self.open(&msg) {
                        Ok((sender, seq, sent_ns)) => {
                            let now = self
                                .start
                                .get()
                                .map_or(0, |s| s.elapsed().as_nanos() as u64);
                            if seen.insert((sender, seq)) {
                                self.counters.delivered.fetch_add(1, Ordering::Relaxed);
                                self.counters
                                    .last_delivery_ns
                                    .fetch_max(now, Ordering::Relaxed);
                                latencies.push((now.saturating_sub(sent_ns) / 1000) as u32);
                            } else {
                                self.counters.duplicated.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(e) => self.counters.error(&format!("message {}: {e}", msg.id)),
                    }
                    if acks.push(msg.id).is_err() {
                        break;
                    }
                }
                Ok(Some(ServerEvent::Error { message, .. })) => self.counters.error(&message),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        latencies
    }

    /// Decrypts (and in groups verifies) a delivery; returns its payload's fields.
    fn open(&self, msg: &crate::net::Envelope) -> Result<(u64, u64, u64)> {
        let plain = match (&self.from_key, &self.group_key) {
            (Some(key), _) => e2e::open_direct_with(key, msg)?,
            (None, Some(key)) => {
                let sender: usize = msg
                    .from
                    .get(self.prefix_len..)
                    .and_then(|i| i.parse().ok())
                    .filter(|i| *i < self.ed25519.len())
                    .ok_or_else(|| Error::Integrity(format!("unknown sender {}", msg.from)))?;
                e2e::verify_group(&self.ed25519[sender], msg)?.open(key)?
            }
            (None, None) => return Err(Error::Protocol("a message in idle mode".into())),
        };
        match plain {
            Plain::Text(t) => {
                parse_payload(&t).ok_or_else(|| Error::Integrity("not a bench payload".into()))
            }
            _ => Err(Error::Integrity("not a text message".into())),
        }
    }
}

fn percentiles(us: &mut [u32]) -> Latency {
    if us.is_empty() {
        return Latency::default();
    }
    us.sort_unstable();
    let at = |q: f64| us[((us.len() - 1) as f64 * q).round() as usize] as u64;
    Latency {
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        max: us[us.len() - 1] as u64,
    }
}

/// A progress bar on standard error, redrawn five times a second.
struct Progress {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

impl Progress {
    fn start(counters: Arc<Counters>, expected: u64) -> Progress {
        let (stop, stopped) = bounded::<()>(0);
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut previous = (0u64, Instant::now());
            loop {
                let done = counters.delivered.load(Ordering::Relaxed);
                let rate =
                    (done - previous.0) as f64 / previous.1.elapsed().as_secs_f64().max(1e-3);
                previous = (done, Instant::now());
                let frac = if expected == 0 {
                    1.0
                } else {
                    done as f64 / expected as f64
                };
                let filled = (frac * 30.0) as usize;
                eprint!(
                    "\r[{}{}] {:>5.1}%  {done}/{expected} delivered  {:>9.0} msg/s  {:>5.1} s ",
                    "#".repeat(filled.min(30)),
                    ".".repeat(30 - filled.min(30)),
                    frac * 100.0,
                    rate,
                    started.elapsed().as_secs_f64()
                );
                if stopped.recv_timeout(Duration::from_millis(200)).is_ok() || done >= expected {
                    let _ = stopped.recv_timeout(Duration::from_secs(60));
                    eprintln!();
                    return;
                }
            }
        });
        Progress { stop, thread }
    }

    fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// Whether to show progress by default: only on a terminal.
pub fn progress_default() -> bool {
    std::io::stderr().is_terminal()
}

/// The report for people.
pub fn render(r: &Report) -> String {
    let ms = |us: u64| format!("{:.2} ms", us as f64 / 1000.0);
    let rate = match r.rate {
        Some(rate) => format!("offered {rate:.0} messages/s"),
        None => "as fast as the window allows".to_string(),
    };
    let mut out = String::new();
    let shape = match r.mode.as_str() {
        "group" => format!("groups of {}, ", r.group_size),
        _ => String::new(),
    };
    out.push_str(&format!(
        "fastchat-bench: {} mode, {shape}{} clients x {} messages of {} B, window {}, {rate}, {} server{}\n",
        r.mode,
        r.clients,
        r.messages,
        r.size,
        r.window,
        r.servers,
        if r.servers == 1 { "" } else { "s" }
    ));
    out.push_str(&format!(
        "  connect     {} clients signed up, logged in and connected in {:.2} s ({:.2} ms each)\n",
        r.clients,
        r.connect_secs,
        r.connect_secs * 1000.0 / r.clients.max(1) as f64
    ));
    if r.mode == "idle" {
        for (i, (before, after)) in r.server_usage.iter().enumerate() {
            let clients = r.clients as f64 / r.server_usage.len() as f64;
            out.push_str(&format!(
                "  server {i}    {} threads, {:.1} MiB RSS with ~{clients:.0} clients ({:.2} threads and {:.1} KiB per client)\n",
                after.threads,
                after.rss_kib as f64 / 1024.0,
                (after.threads as f64 - before.threads as f64) / clients,
                (after.rss_kib as f64 - before.rss_kib as f64) / clients
            ));
        }
        return out;
    }
    out.push_str(&format!(
        "  sent        {} messages, all stored, in {:.2} s\n",
        r.clients as u64 * r.messages,
        r.send_secs
    ));
    out.push_str(&format!(
        "  delivered   {} of {} in {:.2} s: {:.0} messages/s\n",
        r.delivered, r.expected, r.deliver_secs, r.throughput
    ));
    out.push_str(&format!(
        "  latency     p50 {}  p90 {}  p99 {}  max {}  (send to decrypted delivery)\n",
        ms(r.latency.p50),
        ms(r.latency.p90),
        ms(r.latency.p99),
        ms(r.latency.max)
    ));
    if !r.cpu.is_empty() {
        let total: f64 = r.cpu.iter().map(|(_, s)| s).sum();
        let parts: Vec<String> = r.cpu.iter().map(|(n, s)| format!("{n} {s:.2}")).collect();
        out.push_str(&format!(
            "  cpu         {:.2} s in all ({}), {:.1} µs per delivery\n",
            total,
            parts.join(", "),
            total * 1e6 / r.delivered.max(1) as f64
        ));
    }
    out.push_str(&format!(
        "  lost {}, duplicated {}, errors {}{}\n",
        r.lost,
        r.duplicated,
        r.errors,
        r.first_error
            .as_ref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default()
    ));
    out
}

/// The header of [`markdown_row`]'s table for a mode (`idle` has its own columns).
pub fn markdown_header(idle: bool) -> &'static str {
    if idle {
        "| run | clients | connect time | server threads | server RSS | per client |\n| --- | ---: | ---: | ---: | ---: | ---: |"
    } else {
        "| run | deliveries | delivered/s | p50 | p90 | p99 | max | lost | dup | CPU per delivery |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    }
}

/// The report as one row of a Markdown table (see [`markdown_header`]).
pub fn markdown_row(label: &str, r: &Report) -> String {
    let ms = |us: u64| format!("{:.2} ms", us as f64 / 1000.0);
    if r.mode == "idle" {
        let (threads, rss): (u64, u64) = r
            .server_usage
            .iter()
            .map(|(_, a)| (a.threads, a.rss_kib))
            .fold((0, 0), |(t, m), (a, b)| (t + a, m + b));
        let (t0, m0): (u64, u64) = r
            .server_usage
            .iter()
            .map(|(b, _)| (b.threads, b.rss_kib))
            .fold((0, 0), |(t, m), (a, b)| (t + a, m + b));
        let n = r.clients.max(1) as f64;
        return format!(
            "| {label} | {} | {:.2} s | {threads} | {:.0} MiB | {:.2} threads, {:.0} KiB |",
            r.clients,
            r.connect_secs,
            rss as f64 / 1024.0,
            (threads as f64 - t0 as f64) / n,
            (rss as f64 - m0 as f64) / n
        );
    }
    let cpu: f64 = r.cpu.iter().map(|(_, s)| s).sum();
    format!(
        "| {label} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {:.1} µs |",
        r.delivered,
        r.throughput,
        ms(r.latency.p50),
        ms(r.latency.p90),
        ms(r.latency.p99),
        ms(r.latency.max),
        r.lost,
        r.duplicated,
        cpu * 1e6 / r.delivered.max(1) as f64
    )
}

/// The report as one JSON object.
pub fn to_json(r: &Report) -> serde_json::Value {
    serde_json::json!({
        "mode": r.mode,
        "clients": r.clients,
        "messages_per_client": r.messages,
        "size": r.size,
        "window": r.window,
        "group_size": r.group_size,
        "rate": r.rate,
        "servers": r.servers,
        "connect_secs": r.connect_secs,
        "send_secs": r.send_secs,
        "deliver_secs": r.deliver_secs,
        "expected": r.expected,
        "delivered": r.delivered,
        "lost": r.lost,
        "duplicated": r.duplicated,
        "errors": r.errors,
        "first_error": r.first_error,
        "throughput": r.throughput,
        "latency_us": {
            "p50": r.latency.p50,
            "p90": r.latency.p90,
            "p99": r.latency.p99,
            "max": r.latency.max,
        },
        "cpu_secs": r.cpu.iter().map(|(n, s)| (n.clone(), serde_json::json!(s))).collect::<serde_json::Map<_, _>>(),
        "server_usage": r.server_usage.iter().map(|(b, a)| serde_json::json!({
            "threads_before": b.threads, "rss_kib_before": b.rss_kib,
            "threads_after": a.threads, "rss_kib_after": a.rss_kib,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_pad() {
        let p = payload(7, 42, 123_456, 64);
        assert_eq!(p.len(), 64);
        assert_eq!(parse_payload(&p), Some((7, 42, 123_456)));
        let short = payload(1, 2, 3, 0);
        assert_eq!(short, "1:2:3:");
        assert_eq!(parse_payload("garbage"), None);
    }

    #[test]
    fn percentiles_pick_ranks() {
        let mut v: Vec<u32> = (1..=100).collect();
        let l = percentiles(&mut v);
        assert_eq!((l.p50, l.p90, l.p99, l.max), (51, 90, 99, 100));
        assert_eq!(percentiles(&mut []), Latency::default());
    }
}
