//! Rival runs (`--rival`): the same workload against a mature messaging server started on
//! the same machine, so that a comparison is like with like: same clients, messages, sizes,
//! window, pattern and offered rate, measured by the same tool in the same minutes.
//!
//! * mosquitto (MQTT 5): each client subscribes to its own topic (`u/INDEX`), or to its
//!   group's (`g/GROUP`, without its own messages back); a message is a QoS 1 `PUBLISH`,
//!   confirmed by the broker's `PUBACK`, and each receiver answers with a `PUBACK` of its own.
//! * ngircd (IRC): each client registers a nickname (`cINDEX`), or also joins its group's
//!   channel (`#gGROUP`); a message is a `PRIVMSG` followed by a `PING`, confirmed by the
//!   `PONG` (IRC confirms nothing else); receivers answer nothing.
//!
//! Both speak TLS 1.3 (with a CA and a certificate made for the run, checked by the clients as
//! fastchat's) unless `--insecure-plaintext`. Neither encrypts end to end nor stores a message
//! before confirming it: compare them with fastchat's `--opaque` rows, which measure its
//! servers alone, and say which is which.
//!
//! ```text
//! start the rival on a free loopback port, in a temporary folder (its configuration, its log,
//!   its certificate)
//! connect every client: register, subscribe or join, wait for the answer
//! driving threads (as for fastchat: one per core, at most 50 clients each), round after round:
//!   a turn for each client with something to do: read and answer what came, send while the
//!   window (and, at a fixed rate, the schedule) allows, write what is pending
//!   one wait (epoll) on every client's socket, until data, room to write, or the next due
//!   message
//! ```

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender};

use super::driver::{self, Counters, Delivery};
use super::launch::{self, Process};
use super::plan::{drivers, recipients, stop_drivers, tally, wait_for_stragglers};
use super::report::{self, BENCH_PROCESS};
use super::usage::{cpu_sample, cpu_spent, sample_cpu_every, switch_sample, switches_made};
use super::{Config, Mode, Pattern, Report};
use crate::error::{Error, Result};
use crate::transport::pki::{self, Member, Role};
use crate::transport::{Expect, Interest, Poller, Stream, Transport, Waker};

mod irc;
mod mqtt;

/// A mature messaging server to measure with fastchat's workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rival {
    /// The MQTT broker, over MQTT 5 with QoS 1.
    Mosquitto,
    /// The IRC server.
    Ngircd,
}

impl std::str::FromStr for Rival {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Rival, String> {
        match s {
            "mosquitto" => Ok(Rival::Mosquitto),
            "ngircd" => Ok(Rival::Ngircd),
            other => Err(format!("unknown rival {other:?}: use mosquitto or ngircd")),
        }
    }
}

impl std::fmt::Display for Rival {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.program())
    }
}

impl Rival {
    /// The largest `--size` it carries (an IRC line holds 512 bytes with its command and the
    /// sender's prefix).
    pub fn max_size(self) -> usize {
        match self {
            Rival::Mosquitto => crate::net::MAX_BODY - 200,
            Rival::Ngircd => irc::MAX_LINE - 112,
        }
    }

    fn program(self) -> &'static str {
        match self {
            Rival::Mosquitto => "mosquitto",
            Rival::Ngircd => "ngircd",
        }
    }

    /// Where its program is: `given`, else the first of `PATH` and the `sbin` folders (where
    /// Debian installs both).
    fn find(self, given: Option<&Path>) -> Result<PathBuf> {
        if let Some(path) = given {
            return Ok(path.to_path_buf());
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
            .map(|dir| dir.join(self.program()))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                Error::Local(format!(
                    "{0} is not installed: install it (Debian: apt-get install {0}) or give \
                     its path with --rival-bin",
                    self.program()
                ))
            })
    }

    /// Its name and version, as it says them (`mosquitto 2.0.11`, `ngIRCd 26.1`).
    fn version(self, program: &Path) -> String {
        let flag = match self {
            Rival::Mosquitto => "-h",
            Rival::Ngircd => "--version",
        };
        let said = Command::new(program)
            .arg(flag)
            .output()
            .map(|o| [o.stdout, o.stderr].concat())
            .unwrap_or_default();
        let first = String::from_utf8_lossy(&said)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        match self {
            Rival::Mosquitto => first.replace(" version", ""),
            // "ngIRCd 26.1-IDENT+IPv6+...": the name and the number.
            Rival::Ngircd => first.split('-').next().unwrap_or_default().to_string(),
        }
    }

    /// Its configuration for a run: loopback only, no limits that a benchmark's hundred
    /// clients from one address would hit, nothing that waits on the network; TLS with the
    /// certificate and key in `tls` (PEM files) unless `None`.
    fn configuration(self, port: u16, clients: usize, tls: Option<(&Path, &Path)>) -> String {
        let mut config = match self {
            // Messages queued for a client beyond max_queued_messages are dropped (1000 by
            // default): a hundred senders with a window of 32 may queue more than that for one
            // receiver. Nagle off, as fastchat's sockets are.
            Rival::Mosquitto => format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 max_queued_messages {}\nset_tcp_nodelay true\nlog_dest stderr\n\
                 log_type error\nlog_type warning\n",
                (clients * 64).max(1000)
            ),
            // Penalties (flood control) off: a client sends its window at once.
            Rival::Ngircd => format!(
                "[Global]\nName = bench.fastchat\nInfo = fastchat-bench rival\nPorts = {port}\n\
                 Listen = 127.0.0.1\nMotdPhrase = fastchat-bench\n\
                 AdminInfo1 = fastchat-bench\nAdminInfo2 = loopback\nAdminEMail = none\n\
                 [Limits]\nMaxConnections = 0\nMaxConnectionsIP = 0\nMaxJoins = 0\n\
                 MaxNickLength = 16\nMaxPenaltyTime = 0\nPingTimeout = 600\n\
                 [Options]\nDNS = no\nIdent = no\nPAM = no\n"
            ),
        };
        if let Some((cert, key)) = tls {
            let (cert, key) = (cert.display(), key.display());
            match self {
                // Only TLS 1.3, as fastchat. Started as root, mosquitto switches to its own
                // user before it reads the key, which (like fastchat's) only this user may
                // read: `user root` keeps it as whoever started the run, as fastchat's
                // servers are (started as anyone else, it never switches).
                Rival::Mosquitto => config.push_str(&format!(
                    "certfile {cert}\nkeyfile {key}\ntls_version tlsv1.3\nuser root\n"
                )),
                // Its TLS port instead of a plaintext one.
                Rival::Ngircd => {
                    config = config.replace(&format!("Ports = {port}\n"), "");
                    config.push_str(&format!(
                        "[SSL]\nPorts = {port}\nCertFile = {cert}\nKeyFile = {key}\n"
                    ));
                }
            }
        }
        config
    }

    fn arguments(self, config: &Path) -> Vec<String> {
        let config = config.to_string_lossy().to_string();
        match self {
            Rival::Mosquitto => vec!["-c".into(), config],
            Rival::Ngircd => vec!["--nodaemon".into(), "--config".into(), config],
        }
    }
}

/// How long the rival may take to listen.
const READY_LIMIT: Duration = Duration::from_secs(10);

/// How long a client's registration may take.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// How long a client with messages in flight waits for a confirmation before it gives up on
/// its run (on loopback, with no failover to wait for, ten seconds is a stall).
const CONFIRM_LIMIT: Duration = Duration::from_secs(10);

/// A rival server started by this run, stopped (and its folder removed) when dropped.
struct Started {
    dir: PathBuf,
    process: Process,
    addr: String,
    /// How its clients reach it: TLS with the CA made for it, or plaintext.
    transport: Transport,
}

/// Most bytes a client writes to ngircd in one TLS record. ngircd reads a connection 2048
/// bytes at a time when its socket is readable, and what GnuTLS decrypted beyond that waits
/// for the socket's next event: a window of messages in one record stalled until the
/// server's next `PING`, ten minutes later (measured; in plaintext the rest waits in
/// ngircd's own buffer, which it does look at).
const NGIRCD_TLS_RECORD: usize = 1024;

/// The name in the rival's certificate, which its clients check.
const CERTIFIED_AS: &str = "rival";

impl Started {
    /// Starts `rival` in a new temporary folder; with `tls`, a CA and a certificate for it
    /// are made there first.
    fn start(rival: Rival, program: &Path, clients: usize, tls: bool) -> Result<Started> {
        let dir = launch::temp_dir("fastchat-rival")?;
        match Started::start_in(&dir, rival, program, clients, tls) {
            Ok(started) => Ok(started),
            Err(e) => {
                launch::remove_dir(&dir);
                Err(e)
            }
        }
    }

    fn start_in(
        dir: &Path,
        rival: Rival,
        program: &Path,
        clients: usize,
        tls: bool,
    ) -> Result<Started> {
        let certs = dir.join("tls");
        let transport = if tls {
            pki::init(
                &certs,
                &[Member {
                    role: Role::Server,
                    name: CERTIFIED_AS.into(),
                }],
            )?;
            Transport::client_with_ca(&pki::ca_path(&certs))?
        } else {
            Transport::plaintext()
        };
        let files = (
            certs.join(format!("{CERTIFIED_AS}.pem")),
            certs.join(format!("{CERTIFIED_AS}.key")),
        );
        // A free port: the rival binds it again a moment later.
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let config = dir.join(format!("{}.conf", rival.program()));
        let tls_files = tls.then_some((files.0.as_path(), files.1.as_path()));
        std::fs::write(&config, rival.configuration(port, clients, tls_files))?;
        let process = launch::start(
            dir,
            rival.program(),
            program,
            &rival.arguments(&config),
            false,
        )?;
        let started = Started {
            addr: format!("127.0.0.1:{port}"),
            dir: dir.to_path_buf(),
            process,
            transport,
        };
        let deadline = Instant::now() + READY_LIMIT;
        while TcpStream::connect(&started.addr).is_err() {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(started.dir.join(format!("{rival}.log")))
                    .unwrap_or_default();
                return Err(Error::Local(format!(
                    "{rival} did not listen on {} within {READY_LIMIT:?}; it said: {}",
                    started.addr,
                    log.trim()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(started)
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        self.process.stop();
        launch::remove_dir(&self.dir);
    }
}

/// Runs `config`'s workload against `rival` (its program at `program`, else found).
pub(super) fn run(config: &Config, rival: Rival, program: Option<&Path>) -> Result<Report> {
    let program = rival.find(program)?;
    let version = rival.version(&program);
    let server = Started::start(rival, &program, config.clients, !config.plaintext)?;
    if let Some(cpus) = &config.server_cpus {
        // Both rivals serve on one thread, their main one: the one this puts there.
        cpus.run_process_on(server.process.pid()).map_err(|e| {
            Error::Local(format!(
                "cannot put {} on CPUs {cpus}: {e}",
                rival.program()
            ))
        })?;
    }
    let before = launch::memory(server.process.pid()).unwrap_or_default();
    let n = config.clients;
    let mut report = Report {
        mode: config.mode.to_string(),
        pattern: config.pattern.to_string(),
        opaque: true,
        tls: !config.plaintext,
        rival: Some(version),
        clients: n,
        messages: config.messages,
        size: config.size,
        window: config.window,
        threads: drivers(config),
        group_size: config.group_size,
        rate: config.rate,
        servers: 1,
        server_cpus: launch::cpus(server.process.pid()),
        ..Report::default()
    };
    let started = Instant::now();
    let mut streams = Vec::with_capacity(n);
    for i in 0..n {
        match handshake(rival, &server, i, config) {
            Ok(s) => streams.push(s),
            Err(e) => {
                // A rival that refuses a client is measured on none: the comparison would
                // not be like with like.
                return Err(Error::Protocol(format!("{rival}: client {i}: {e}")));
            }
        }
    }
    report.connect_secs = started.elapsed().as_secs_f64();
    if config.mode == Mode::Idle {
        std::thread::sleep(config.hold.min(Duration::from_secs(1)));
        let after = launch::memory(server.process.pid()).unwrap_or_default();
        report.server_usage = vec![(before, after)];
        std::thread::sleep(config.hold.saturating_sub(Duration::from_secs(1)));
        return Ok(report);
    }
    let processes = vec![
        (rival.program().to_string(), server.process.pid()),
        (BENCH_PROCESS.to_string(), std::process::id()),
    ];
    let cpu_before = cpu_sample(&processes);
    drive_all(config, rival, streams, &processes, &mut report)?;
    report.cpu = cpu_spent(&cpu_before, &cpu_sample(&processes));
    Ok(report)
}

/// Connects client `i` (TLS unless plaintext) and registers it (and subscribes or joins),
/// waiting for the answers; returns its connection, non-blocking, and what was read after
/// the last answer.
fn handshake(rival: Rival, server: &Started, i: usize, config: &Config) -> Result<Connected> {
    let expect = Expect::Server(Some(CERTIFIED_AS.into()));
    let mut stream = server
        .transport
        .connect(&server.addr, rival.program(), &expect)?;
    stream.tcp().set_read_timeout(Some(HANDSHAKE_LIMIT))?;
    let group = (config.mode == Mode::Group).then(|| i / config.group_size);
    let mut out = Vec::new();
    match rival {
        Rival::Mosquitto => {
            mqtt::connect(&mut out, &format!("c{i}"));
            match group {
                Some(g) => mqtt::subscribe(&mut out, 1, &format!("g/{g}"), true),
                None => mqtt::subscribe(&mut out, 1, &format!("u/{i}"), false),
            }
        }
        Rival::Ngircd => {
            irc::register(&mut out, &format!("c{i}"));
            if let Some(g) = group {
                irc::join(&mut out, &format!("#g{g}"));
            }
        }
    }
    stream.write_all(&out)?;
    // Registered, then (unless IRC without a channel) subscribed or joined.
    let mut steps: u32 = match (rival, group) {
        (Rival::Ngircd, None) => 1,
        _ => 2,
    };
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while steps > 0 {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(Error::Protocol("closed during registration".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        while let Some((event, used)) = event(rival, &buf[at..])? {
            at += used;
            match event {
                Event::Ready => steps = steps.saturating_sub(1),
                Event::Refused(why) => return Err(Error::Protocol(why)),
                Event::Ping(token) => {
                    let mut pong = Vec::new();
                    irc::pong(&mut pong, &token);
                    stream.write_all(&pong)?;
                }
                _ => {}
            }
        }
        buf.drain(..at);
    }
    stream.tcp().set_read_timeout(None)?;
    stream.set_nonblocking(true)?;
    Ok((stream, buf))
}

/// A registered client's connection, and what was read from it after its registration.
type Connected = (Stream, Vec<u8>);

/// What a packet or a line means to a client.
#[derive(Debug, PartialEq)]
enum Event {
    /// Registered, subscribed or joined.
    Ready,
    /// One of our messages was taken.
    Confirmed,
    /// One of our messages was refused (it settles its place in the window all the same).
    Rejected(String),
    /// A message, and the id to acknowledge it by (MQTT QoS 1).
    Message {
        payload: Option<(u64, u64, u64)>,
        ack: Option<u16>,
    },
    /// The server asks for a `PONG` with this token (IRC).
    Ping(Vec<u8>),
    /// An error from the server (a refused message, a numeric error reply).
    Refused(String),
    Other,
}

/// The first whole event of `buf` and its length; `Ok(None)` if more bytes are needed.
fn event(rival: Rival, buf: &[u8]) -> Result<Option<(Event, usize)>> {
    let payload = |p: &[u8]| std::str::from_utf8(p).ok().and_then(driver::parse_payload);
    let event = match rival {
        Rival::Mosquitto => {
            let Some((packet, used)) = mqtt::parse(buf).map_err(Error::Protocol)? else {
                return Ok(None);
            };
            let e = match packet {
                mqtt::Packet::ConnAck { reason: 0 } => Event::Ready,
                mqtt::Packet::ConnAck { reason } => {
                    Event::Refused(format!("connection refused (reason {reason:#04x})"))
                }
                mqtt::Packet::SubAck { reasons } if reasons.iter().all(|r| *r < 0x80) => {
                    Event::Ready
                }
                mqtt::Packet::SubAck { reasons } => {
                    Event::Refused(format!("subscription refused (reasons {reasons:02x?})"))
                }
                mqtt::Packet::PubAck { reason } if reason < 0x80 => Event::Confirmed,
                mqtt::Packet::PubAck { reason } => {
                    Event::Rejected(format!("message refused (reason {reason:#04x})"))
                }
                mqtt::Packet::Publish { pid, payload: p } => Event::Message {
                    payload: payload(p),
                    ack: pid,
                },
                mqtt::Packet::Other(_) => Event::Other,
            };
            (e, used)
        }
        Rival::Ngircd => {
            let Some((line, used)) = irc::parse(buf).map_err(Error::Protocol)? else {
                return Ok(None);
            };
            let e = match line {
                irc::Line::Welcome | irc::Line::Joined => Event::Ready,
                irc::Line::Pong => Event::Confirmed,
                irc::Line::Privmsg(text) => Event::Message {
                    payload: payload(text),
                    ack: None,
                },
                irc::Line::Ping(token) => Event::Ping(token.to_vec()),
                irc::Line::Refused(line) => Event::Refused(String::from_utf8_lossy(line).into()),
                irc::Line::Other => Event::Other,
            };
            (e, used)
        }
    };
    Ok(Some(event))
}

/// One client of a rival run: everything its driving thread owns.
struct Peer {
    rival: Rival,
    index: usize,
    stream: Stream,
    /// The last read stopped because TLS must write before it can read on.
    read_wants_write: bool,
    /// Most bytes written at once (so, with TLS, in one record).
    record: usize,
    /// Direct mode: each recipient's topic or nickname; group mode: the group's topic or
    /// channel alone.
    targets: Vec<Vec<u8>>,
    pattern: Pattern,
    messages: u64,
    size: usize,
    window: usize,
    schedule: Option<(f64, u64)>,
    next_seq: u64,
    /// Sent and not yet confirmed.
    in_flight: usize,
    confirmed: u64,
    /// When the last confirmation came (or the run started).
    last_confirmed: Instant,
    /// The next MQTT packet id (never 0).
    next_pid: u16,
    out: Vec<u8>,
    written: usize,
    inbuf: Vec<u8>,
    /// (sender, sequence) of every message received.
    seen: HashSet<(u64, u64)>,
    deliveries: Vec<Delivery>,
    /// Told once every message of this client is confirmed, or that it never will be.
    stored: Option<Sender<Result<()>>>,
    counters: Arc<Counters>,
    start: Instant,
}

/// What a client waits for after its turn.
struct Wait {
    interest: Interest,
    deadline: Option<Instant>,
}

impl Peer {
    /// Reads and answers what came, sends what the window and schedule allow, writes.
    fn turn(&mut self, scratch: &mut [u8]) -> Result<Wait> {
        self.read(scratch)?;
        if self.confirmed == self.messages {
            if let Some(stored) = self.stored.take() {
                let _ = stored.send(Ok(()));
            }
        }
        let now = Instant::now();
        let confirm_by = self.last_confirmed + CONFIRM_LIMIT;
        if self.in_flight > 0 && now > confirm_by {
            let limit = CONFIRM_LIMIT.as_secs();
            return Err(Error::Protocol(format!(
                "{} messages unconfirmed for {limit} s",
                self.in_flight
            )));
        }
        let mut next_due = None;
        while self.next_seq < self.messages && self.in_flight < self.window {
            let due = self
                .schedule
                .map(|s| driver::due(s, self.index, self.next_seq, self.start));
            if let Some(due) = due.filter(|d| *d > now) {
                next_due = Some(due);
                break;
            }
            self.send(due);
        }
        self.flush()?;
        Ok(Wait {
            interest: Interest {
                read: true,
                write: self.read_wants_write || self.written < self.out.len(),
            },
            deadline: match (next_due, self.in_flight > 0) {
                (Some(due), true) => Some(due.min(confirm_by)),
                (None, true) => Some(confirm_by),
                (due, false) => due,
            },
        })
    }

    /// Queues the next message; `due` is when it was due (at a fixed rate), else now.
    fn send(&mut self, due: Option<Instant>) {
        let seq = self.next_seq;
        let sent = due.unwrap_or_else(Instant::now);
        let nanos = sent.saturating_duration_since(self.start).as_nanos() as u64;
        let text = driver::payload(self.index, seq, nanos, self.size);
        let to = &self.targets[driver::pick(self.pattern, self.index, seq, self.targets.len())];
        match self.rival {
            Rival::Mosquitto => {
                mqtt::publish(&mut self.out, to, self.next_pid, text.as_bytes());
                self.next_pid = self.next_pid.checked_add(1).unwrap_or(1);
            }
            Rival::Ngircd => irc::privmsg(&mut self.out, to, text.as_bytes(), seq),
        }
        self.next_seq += 1;
        self.in_flight += 1;
    }

    /// Writes what is pending, as far as the connection takes it.
    fn flush(&mut self) -> Result<()> {
        while self.written < self.out.len() {
            let end = self.out.len().min(self.written + self.record);
            match self
                .stream
                .write_nonblocking(&self.out[self.written..end])?
            {
                Ok(0) => return Err(Error::Protocol("the server stopped reading".into())),
                Ok(n) => self.written += n,
                Err(_) => break,
            }
        }
        if self.written == self.out.len() {
            self.out.clear();
            self.written = 0;
        }
        Ok(())
    }

    /// Reads what the connection has and handles every whole packet or line of it.
    fn read(&mut self, scratch: &mut [u8]) -> Result<()> {
        let tls = self.stream.is_tls();
        self.read_wants_write = false;
        loop {
            match self.stream.read_nonblocking(scratch)? {
                Ok(0) => return Err(Error::Protocol("the server closed the connection".into())),
                Ok(n) => {
                    self.inbuf.extend_from_slice(&scratch[..n]);
                    // A short read emptied the socket; TLS may still hold decrypted records
                    // that no wait would report, so it reads on until it would block.
                    if n < scratch.len() && !tls {
                        break;
                    }
                }
                Err(wanted) => {
                    self.read_wants_write = wanted.write;
                    break;
                }
            }
        }
        let inbuf = std::mem::take(&mut self.inbuf);
        let mut at = 0;
        let handled = (|| {
            while let Some((event, used)) = event(self.rival, &inbuf[at..])? {
                at += used;
                self.handle(event);
            }
            Ok(())
        })();
        self.inbuf = inbuf;
        self.inbuf.drain(..at);
        handled
    }

    fn handle(&mut self, event: Event) {
        let counters = &self.counters;
        match event {
            Event::Confirmed | Event::Rejected(_) => {
                if let Event::Rejected(why) = &event {
                    counters.error(&format!("{}: {why}", self.rival));
                }
                if self.in_flight == 0 {
                    return counters.error("a confirmation of nothing");
                }
                self.in_flight -= 1;
                self.confirmed += 1;
                self.last_confirmed = Instant::now();
            }
            Event::Message { payload, ack } => {
                if let Some(pid) = ack {
                    mqtt::puback(&mut self.out, pid);
                }
                let Some((sender, seq, sent_ns)) = payload else {
                    return counters.error("not a bench payload");
                };
                if sender == self.index as u64 {
                    return counters.error("a client's own message came back");
                }
                if !self.seen.insert((sender, seq)) {
                    counters.duplicated.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                let now = self.start.elapsed().as_nanos() as u64;
                counters.delivered.fetch_add(1, Ordering::Relaxed);
                counters.last_delivery_ns.fetch_max(now, Ordering::Relaxed);
                self.deliveries.push(Delivery {
                    at_ms: (now / 1_000_000) as u32,
                    latency_us: (now.saturating_sub(sent_ns) / 1000) as u32,
                });
            }
            Event::Ping(token) => irc::pong(&mut self.out, &token),
            Event::Refused(why) => counters.error(&format!("{}: {why}", self.rival)),
            Event::Ready | Event::Other => {}
        }
    }

    /// Gives up on this client's run (its connection failed).
    fn fail(&mut self, e: Error) {
        if let Some(stored) = self.stored.take() {
            let _ = stored.send(Err(e));
        }
    }
}

/// Drives every client until the run is over, and tallies it into `report`.
fn drive_all(
    config: &Config,
    rival: Rival,
    streams: Vec<Connected>,
    processes: &[(String, u32)],
    report: &mut Report,
) -> Result<()> {
    let n = streams.len();
    let fanout = match config.mode {
        Mode::Group => (config.group_size - 1) as u64,
        _ => 1,
    };
    let expected = n as u64 * config.messages * fanout;
    let counters = Arc::new(Counters::default());
    let start: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
    let (stored_tx, stored) = crossbeam_channel::unbounded::<Result<()>>();
    let k = recipients(config, n);
    let name = |i: usize| match rival {
        Rival::Mosquitto => format!("u/{i}").into_bytes(),
        Rival::Ngircd => format!("c{i}").into_bytes(),
    };
    let threads = report.threads;
    let mut shares: Vec<Vec<(usize, Connected)>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, stream) in streams.into_iter().enumerate() {
        shares[i % threads].push((i, stream));
    }
    let (go_tx, go) = bounded::<()>(0);
    let mut handles = Vec::new();
    let mut wakers = Vec::new();
    for (t, share) in shares.into_iter().enumerate() {
        let targets_of = |i: usize| -> Vec<Vec<u8>> {
            match config.mode {
                Mode::Group => {
                    let g = i / config.group_size;
                    vec![match rival {
                        Rival::Mosquitto => format!("g/{g}").into_bytes(),
                        Rival::Ngircd => format!("#g{g}").into_bytes(),
                    }]
                }
                _ => (1..=k).map(|d| name((i + d) % n)).collect(),
            }
        };
        let peers: Vec<(usize, Connected, Vec<Vec<u8>>)> = share
            .into_iter()
            .map(|(i, s)| (i, s, targets_of(i)))
            .collect();
        let waker = Arc::new(Waker::new()?);
        wakers.push(Arc::clone(&waker));
        let (go, start, counters, stored_tx) = (
            go.clone(),
            Arc::clone(&start),
            Arc::clone(&counters),
            stored_tx.clone(),
        );
        let config = config.clone();
        handles.push(
            std::thread::Builder::new()
                .name(format!("bench-rival-{t}"))
                .spawn(move || {
                    let _ = go.recv();
                    let start = *start.get().expect("set before go");
                    let peers = peers
                        .into_iter()
                        .map(|(index, (stream, inbuf), targets)| Peer {
                            rival,
                            index,
                            stream,
                            read_wants_write: false,
                            record: match rival {
                                Rival::Ngircd if config.plaintext => usize::MAX,
                                Rival::Ngircd => NGIRCD_TLS_RECORD,
                                Rival::Mosquitto => usize::MAX,
                            },
                            targets,
                            pattern: config.pattern,
                            messages: config.messages,
                            size: config.size,
                            window: config.window,
                            schedule: config.rate.map(|r| (r, n as u64)),
                            next_seq: 0,
                            in_flight: 0,
                            confirmed: 0,
                            last_confirmed: start,
                            next_pid: 1,
                            out: Vec::new(),
                            written: 0,
                            inbuf,
                            seen: HashSet::new(),
                            deliveries: Vec::new(),
                            stored: Some(stored_tx.clone()),
                            counters: Arc::clone(&counters),
                            start,
                        })
                        .collect();
                    drop(stored_tx);
                    drive(peers, &waker, &counters)
                })?,
        );
    }
    drop(stored_tx);
    let switches_before = switch_sample(processes);
    let t0 = *start.get_or_init(Instant::now);
    drop(go_tx);
    let (sampling, sampled) = bounded::<()>(0);
    let sampler = config
        .every
        .map(|every| sample_cpu_every(processes.to_vec(), t0, every, sampled));
    let progress = config
        .progress
        .then(|| report::Progress::start(Arc::clone(&counters), expected));
    for outcome in stored.iter().take(n) {
        if let Err(e) = outcome {
            counters.error(&format!("sending failed: {e}"));
        }
    }
    report.send_secs = t0.elapsed().as_secs_f64();
    wait_for_stragglers(&counters, expected, config.drain);
    report.switches = switches_made(&switches_before, &switch_sample(processes));
    if let Some(p) = progress {
        p.stop();
    }
    drop(sampling);
    let deliveries = stop_drivers(&counters, &wakers, handles);
    let samples = sampler.map(|s| s.join().unwrap_or_default());
    tally(
        report,
        &counters,
        expected,
        &deliveries,
        config.every,
        samples,
    );
    Ok(())
}

/// A client's place in its thread's round: whether it gets a turn, and what it waits for.
struct Slot {
    peer: Peer,
    due: bool,
    wait: Option<Wait>,
    /// Its connection failed: no more turns.
    failed: bool,
}

/// Drives `peers` on this thread until the run is over (`Counters::finished`, then `waker`
/// rung); returns their deliveries.
fn drive(peers: Vec<Peer>, waker: &Waker, counters: &Counters) -> Vec<Delivery> {
    let mut poller = match Poller::new(waker) {
        Ok(p) => p,
        Err(e) => {
            counters.error(&format!("epoll: {e}"));
            return Vec::new();
        }
    };
    let mut slots: Vec<Slot> = peers
        .into_iter()
        .map(|peer| Slot {
            peer,
            due: true,
            wait: None,
            failed: false,
        })
        .collect();
    let mut scratch = vec![0u8; 64 * 1024];
    let finished = || counters.finished.load(Ordering::SeqCst);
    while !finished() {
        for (i, slot) in slots.iter_mut().enumerate() {
            if !slot.due || slot.failed {
                continue;
            }
            match slot.peer.turn(&mut scratch) {
                Ok(w) => {
                    slot.due = false;
                    slot.wait = Some(w);
                }
                Err(e) => {
                    slot.failed = true;
                    poller.forget(i, &slot.peer.stream);
                    if !finished() {
                        counters.error(&format!("client {}: {e}", slot.peer.index));
                    }
                    slot.peer.fail(e);
                }
            }
        }
        let waiting = slots.iter().enumerate().filter_map(|(i, slot)| match slot {
            Slot {
                failed: false,
                wait: Some(w),
                peer,
                ..
            } => Some((i, &peer.stream, w.interest, w.deadline)),
            _ => None,
        });
        match driver::wait_for_any(&mut poller, waker, waiting, false) {
            Ok(ready) => {
                for i in ready {
                    if let Some(slot) = slots.get_mut(i) {
                        slot.due = true;
                    }
                }
            }
            Err(e) => {
                counters.error(&format!("epoll: {e}"));
                break;
            }
        }
        let now = Instant::now();
        for slot in &mut slots {
            let expired = slot
                .wait
                .as_ref()
                .and_then(|w| w.deadline)
                .is_some_and(|d| d <= now);
            slot.due |= expired;
        }
    }
    slots.into_iter().flat_map(|s| s.peer.deliveries).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_mean_the_same_from_either_rival() {
        let mut buf = Vec::new();
        mqtt::publish(&mut buf, b"u/2", 9, b"1:5:700:..");
        assert_eq!(
            event(Rival::Mosquitto, &buf).unwrap(),
            Some((
                Event::Message {
                    payload: Some((1, 5, 700)),
                    ack: Some(9)
                },
                buf.len()
            ))
        );
        let line = b":c1!~c1@127.0.0.1 PRIVMSG c2 :1:5:700:..\r\n";
        assert_eq!(
            event(Rival::Ngircd, line).unwrap(),
            Some((
                Event::Message {
                    payload: Some((1, 5, 700)),
                    ack: None
                },
                line.len()
            ))
        );
        assert_eq!(
            event(Rival::Ngircd, b":srv PONG srv :5\r\n").unwrap(),
            Some((Event::Confirmed, 18))
        );
        assert_eq!(
            event(Rival::Mosquitto, &[0x40, 2, 0, 9]).unwrap(),
            Some((Event::Confirmed, 4))
        );
        assert!(matches!(
            event(Rival::Mosquitto, &[0x40, 3, 0, 9, 0x80]).unwrap(),
            Some((Event::Rejected(_), 5))
        ));
        assert_eq!(event(Rival::Ngircd, b":srv PONG").unwrap(), None);
    }

    #[test]
    fn rivals_are_named_as_typed() {
        assert_eq!("mosquitto".parse::<Rival>(), Ok(Rival::Mosquitto));
        assert_eq!("ngircd".parse::<Rival>(), Ok(Rival::Ngircd));
        assert!("redis".parse::<Rival>().is_err());
        assert_eq!(Rival::Ngircd.to_string(), "ngircd");
    }
}
