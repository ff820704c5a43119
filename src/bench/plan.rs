//! Who does what: each client's role (its recipients and ratchet sessions, or its group and
//! sender chains), made before the clock starts, and the run of the driving threads.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;

use super::driver::{self, Client, Counters, Receiving, Sending};
use super::launch;
use super::report;
use super::usage::{periods, sample_cpu_every, switch_sample, switches_made, Sample};
use super::users::{call, Link, User};
use super::{Config, Mode, Pattern, Report};
use crate::client::e2e;
use crate::client::sender_keys::GroupChains;
use crate::client::sessions::Session as RatchetSession;
use crate::crypto::ratchet::{self, Ratchet};
use crate::crypto::{self, PairKey};
use crate::error::{Error, Result};
use crate::membership::{self, After, Roster};
use crate::net::{Action, Change, ServerReply, ServerRequest, WrappedKey};
use crate::transport::{Transport, Waker};

/// A server to take down mid-run: after how long, its PID, and how.
pub(super) struct Victim {
    pub after: Duration,
    pub pid: u32,
    pub fault: Fault,
}

/// How a server is taken down.
pub(super) enum Fault {
    /// `kill -9`.
    Kill,
    /// SIGSTOP (outside a commit to the database `db`) until `resume` has passed (SIGCONT,
    /// the run going on), or else until the run is over.
    Stop {
        db: String,
        resume: Option<Duration>,
    },
}

/// What became of the victim.
enum TakenDown {
    /// The run was over first (or it could not be stopped): no failover was tested.
    Missed,
    Killed,
    /// Stopped: resumed when the run is over.
    Stopped(u32),
    /// Stopped, then resumed while the run went on.
    Resumed,
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
pub(super) struct Plan {
    roles: Vec<Role>,
    /// Each user's place in `roles`, by name.
    senders: Arc<HashMap<String, usize>>,
    /// Deliveries per message.
    fanout: u64,
}

impl Plan {
    pub(super) fn make(config: &Config, users: &[User], links: Vec<Link>) -> Result<Plan> {
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
                // before it. A session serves both directions: each pair's is made once (on
                // as many threads as there are cores), both sides in this process (the tool
                // skips the directory's key agreement, which happens once per pair). Opaque
                // bodies need none.
                let k = recipients(config, n);
                if !config.opaque {
                    let mut pairs: Vec<(usize, usize)> = (0..n)
                        .flat_map(|i| (1..=k).map(move |d| (i, (i + d) % n)))
                        .map(|(a, b)| (a.min(b), a.max(b)))
                        .collect();
                    pairs.sort_unstable();
                    pairs.dedup();
                    for ((a, b), (first, second)) in sessions(users, &pairs)? {
                        roles[a].sessions.insert(b, first);
                        roles[b].sessions.insert(a, second);
                    }
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

    /// Runs the clients; `victim` is a server to take down mid-run.
    pub(super) fn run(
        self,
        config: &Config,
        balancer: &str,
        transport: &Transport,
        victim: Option<Victim>,
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
        let switches_before = switch_sample(processes);
        let t0 = *start.get_or_init(Instant::now);
        drop(go_tx);
        let (sampling, sampled) = bounded::<()>(0);
        let sampler = config
            .every
            .map(|every| sample_cpu_every(processes.to_vec(), t0, every, sampled));
        // The kill is called off if the run ends first (and then reported: a fault run
        // whose fault came too late tested nothing).
        let (run_over, over) = bounded::<()>(0);
        let killer = victim.map(|victim| {
            std::thread::spawn(move || {
                let Victim { after, pid, fault } = victim;
                if over.recv_timeout(after) != Err(crossbeam_channel::RecvTimeoutError::Timeout) {
                    return TakenDown::Missed;
                }
                match fault {
                    Fault::Kill => {
                        log::debug!("killing server process {pid} (kill -9)");
                        let _ = launch::signal(pid, "-KILL");
                        TakenDown::Killed
                    }
                    Fault::Stop { db, resume } => {
                        log::debug!("stopping server process {pid} (SIGSTOP)");
                        if let Err(e) = launch::stop_outside_a_commit(pid, &db) {
                            log::warn!("{e}");
                            return TakenDown::Missed;
                        }
                        let Some(resume) = resume else {
                            return TakenDown::Stopped(pid);
                        };
                        if over.recv_timeout(resume)
                            != Err(crossbeam_channel::RecvTimeoutError::Timeout)
                        {
                            log::warn!(
                                "the run was over before the stopped server was to be resumed"
                            );
                            return TakenDown::Stopped(pid);
                        }
                        log::debug!("resuming server process {pid} (SIGCONT)");
                        let _ = launch::signal(pid, "-CONT");
                        TakenDown::Resumed
                    }
                }
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
        wait_for_stragglers(&counters, expected, config.drain);
        report.switches = switches_made(&switches_before, &switch_sample(processes));
        if let Some(p) = progress {
            p.stop();
        }
        drop(run_over);
        drop(sampling);
        let taken_down = killer.map(|k| k.join().unwrap_or(TakenDown::Missed));
        report.kill_missed = matches!(taken_down, Some(TakenDown::Missed));
        let deliveries = stop_drivers(&counters, &wakers, threads);
        // A stopped server goes on once the clients are done (so that it can be stopped for
        // good): what it does then is not the run's. It may commit a message whose request it
        // had read before it stopped, which its sender has since stored again elsewhere.
        if let Some(TakenDown::Stopped(pid)) = taken_down {
            let _ = launch::signal(pid, "-CONT");
        }
        if let Some(e) = send_error {
            counters.error(&format!("sending failed: {e}"));
        }
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
}

/// Ends a run's driving threads (the run is over, then each thread's waker rings) and
/// gathers their deliveries.
pub(super) fn stop_drivers(
    counters: &Counters,
    wakers: &[Arc<Waker>],
    threads: Vec<JoinHandle<Vec<driver::Delivery>>>,
) -> Vec<driver::Delivery> {
    counters.finished.store(true, Ordering::SeqCst);
    for w in wakers {
        w.wake();
    }
    threads
        .into_iter()
        .filter_map(|t| t.join().ok())
        .flatten()
        .collect()
}

/// Once every client has sent all it had: waits while deliveries keep coming, until all
/// `expected` have come or none has for `drain`.
pub(super) fn wait_for_stragglers(counters: &Counters, expected: u64, drain: Duration) {
    let mut last = counters.delivered.load(Ordering::SeqCst);
    let mut quiet_since = Instant::now();
    while counters.delivered.load(Ordering::SeqCst) < expected {
        std::thread::sleep(Duration::from_millis(20));
        let now = counters.delivered.load(Ordering::SeqCst);
        if now != last {
            last = now;
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() > drain {
            break;
        }
    }
}

/// A finished run's counts, throughput and latency into `report`; with `every` and the CPU
/// `samples` taken meanwhile, its stretches too.
pub(super) fn tally(
    report: &mut Report,
    counters: &Counters,
    expected: u64,
    deliveries: &[driver::Delivery],
    every: Option<Duration>,
    samples: Option<Vec<Sample>>,
) {
    let delivered = counters.delivered.load(Ordering::SeqCst);
    report.expected = expected;
    report.delivered = delivered;
    report.lost = expected.saturating_sub(delivered);
    report.duplicated = counters.duplicated.load(Ordering::SeqCst);
    report.redelivered = counters.redelivered.load(Ordering::SeqCst);
    report.failovers = counters.failovers.load(Ordering::SeqCst);
    report.errors = counters.errors.load(Ordering::SeqCst);
    report.first_error = counters.first_error.lock().clone();
    report.deliver_secs = counters.last_delivery_ns.load(Ordering::SeqCst) as f64 / 1e9;
    if report.deliver_secs > 0.0 {
        report.throughput = delivered as f64 / report.deliver_secs;
    }
    if let (Some(every), Some(samples)) = (every, samples) {
        report.periods = periods(deliveries, every, &samples);
    }
    let mut latencies: Vec<u32> = deliveries.iter().map(|d| d.latency_us).collect();
    report.latency = report::percentiles(&mut latencies);
}

/// Most clients one driving thread takes by default: its `poll` looks at every one of their
/// sockets each time, so thousands on one thread cost more than their wake-ups would.
const CLIENTS_PER_THREAD: usize = 50;

/// How many threads drive the clients: as asked, else one per core and at most
/// [`CLIENTS_PER_THREAD`] clients each; never more threads than clients.
pub(super) fn drivers(config: &Config) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let default = cores.max(config.clients.div_ceil(CLIENTS_PER_THREAD));
    config
        .threads
        .unwrap_or(default)
        .clamp(1, config.clients.max(1))
}

/// How many others each client writes to in direct mode: one in a ring, else as many as it
/// sends messages, at most everyone else.
pub(super) fn recipients(config: &Config, n: usize) -> usize {
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

/// Both sides of the session of each of `pairs` (indexes into `users`, lower first), made
/// on every core.
fn sessions(users: &[User], pairs: &[(usize, usize)]) -> Result<Vec<Paired>> {
    let cores = std::thread::available_parallelism().map_or(2, |c| c.get());
    let chunk = pairs.len().div_ceil(cores).max(1);
    let parts: Vec<Result<Vec<Paired>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = pairs
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|&(a, b)| {
                            let (u, v) = (&users[a], &users[b]);
                            let secret = u.identity.pair_key(&u.name, &v.name, &v.public.x25519)?;
                            Ok(((a, b), session_pair(&secret, a, b)?))
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a session thread"))
            .collect()
    });
    let mut all = Vec::with_capacity(pairs.len());
    for part in parts {
        all.extend(part?);
    }
    Ok(all)
}

/// A pair of users (indexes, lower first) and both sides of their session.
type Paired = ((usize, usize), (RatchetSession, RatchetSession));

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
