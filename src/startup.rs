//! What every binary does when it starts: logging, the Ctrl-C handler, private files, and the
//! transport its flags ask for (with the warning that plaintext deserves); and how a server's
//! threads are scheduled: the batch policy, and the CPUs `--cpus` names.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::transport::{pin_path, Transport};

/// Checks an address to listen on, for the argument parser (a bad one is then a usage
/// error, exit code 2): HOST:PORT that this machine resolves.
pub fn listen_address(s: &str) -> std::result::Result<String, String> {
    use std::net::ToSocketAddrs;
    match s.to_socket_addrs().map(|mut addrs| addrs.next()) {
        Ok(Some(_)) => Ok(s.to_string()),
        Ok(None) => Err("it names no address".into()),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => Err(
            "not an address: give HOST:PORT, such as 127.0.0.1:7001 (port 0 picks a free port)"
                .into(),
        ),
        Err(e) => Err(format!("cannot resolve it: {e}")),
    }
}

/// Checks the address of another process (ADDR, or ADDR,ADDR,... where several may be
/// given), for the argument parser: each HOST:PORT, with a port number. Names are not
/// resolved here: one that does not resolve is unreachable (exit code 3), not mistyped.
pub fn remote_addresses(s: &str) -> std::result::Result<String, String> {
    for addr in s.split(',') {
        remote_address(addr)?;
    }
    Ok(s.to_string())
}

/// Checks one address of another process, as [`remote_addresses`] checks each.
pub fn remote_address(addr: &str) -> std::result::Result<String, String> {
    let host_port = addr.rsplit_once(':').filter(|(host, _)| !host.is_empty());
    if host_port.is_none_or(|(_, port)| port.parse::<u16>().is_err()) {
        return Err(format!(
            "{addr:?} is not an address: give HOST:PORT, such as 127.0.0.1:7000"
        ));
    }
    Ok(addr.to_string())
}

/// Checks a count or a duration that must be at least 1, for the argument parser.
pub fn at_least_one<T>(s: &str) -> std::result::Result<T, String>
where
    T: std::str::FromStr + From<u8> + PartialOrd,
    T::Err: std::fmt::Display,
{
    let n: T = s.parse().map_err(|e: T::Err| e.to_string())?;
    if n < T::from(1) {
        return Err("must be at least 1".into());
    }
    Ok(n)
}

/// Logs to standard error at `info` (or as `RUST_LOG` says), one line per record:
/// `2026-11-24T10:00:00Z INFO server: text`.
pub fn init(program: &'static str) {
    init_with(program, None, "info");
}

/// Like [`init`], at `level` (a `--log-level` flag: `off`, `error`, `warn`, `info`, `debug`,
/// `trace`, or a `RUST_LOG`-style filter) if given, else as `RUST_LOG` says, else `default`.
/// Lines are never coloured.
pub fn init_with(program: &'static str, level: Option<&str>, default: &str) {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default));
    if let Some(level) = level {
        builder.parse_filters(level);
    }
    builder
        .format(move |buf, record| {
            writeln!(
                buf,
                "{} {:<5} {program}: {}",
                buf.timestamp_seconds(),
                record.level(),
                record.args()
            )
        })
        .init();
}

/// Ends the process with `code` after `limit`, saying so (a `--timeout` flag): whatever it is
/// waiting for, a script gets its answer in time.
pub fn exit_after(limit: std::time::Duration, program: &'static str, code: i32) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!(
            "{program}: error: timed out after {} (--timeout)",
            crate::units::human_duration_precise(limit)
        );
        std::process::exit(code);
    });
}

/// Installs a Ctrl-C (SIGINT/SIGTERM) handler and returns the channel it signals.
pub fn shutdown_channel() -> crossbeam_channel::Receiver<()> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    if let Err(e) = ctrlc::set_handler(move || {
        let _ = tx.try_send(());
    }) {
        log::warn!("cannot install the Ctrl-C handler: {e}");
    }
    rx
}

/// The client's folder when FASTCHAT_HOME is not set: `~/.fastchat`.
pub fn default_home() -> std::path::PathBuf {
    std::env::var_os("HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from("."))
        .join(".fastchat")
}

/// Every file and folder this process creates from now on is its owner's alone (0600, 0700):
/// the database with its -wal and -shm files, logs, keys.
pub fn private_files() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

/// The warning every binary prints, at every start, when it runs without TLS.
pub fn warn_plaintext(program: &str) {
    eprintln!(
        "{program}: WARNING: --insecure-plaintext: no TLS. Passwords, session tokens and \
         everything else on the wire can be read and changed by anyone on the network path. \
         For teaching on a trusted machine only."
    );
}

/// What to run when the cluster folder has no CA, or no certificate for `name` (a folder
/// never made, or a server added to a cluster).
fn missing_certificate(program: &str, dir: &Path, name: &str) -> Option<Error> {
    // A name that is no name is refused as such (by `Transport::member`), not looked for.
    crate::names::validate("member", name).ok()?;
    let dir_shown = dir.display();
    if !crate::transport::pki::ca_path(dir).exists() {
        return Some(Error::Local(format!(
            "no cluster certificate authority in {dir_shown} (ca.pem): make the cluster's \
             certificates there first, with `fastchat-admin init {dir_shown}`"
        )));
    }
    if !dir.join(format!("{name}.pem")).exists() {
        let role = if program.ends_with("balancer") {
            "balancer"
        } else {
            "server"
        };
        return Some(Error::Local(format!(
            "no certificate for {name} in {dir_shown}: issue one with \
             `fastchat-admin cert {dir_shown} --{role} {name}`"
        )));
    }
    None
}

/// A balancer's or server's transport: `--insecure-plaintext`, or its certificate `name` (or
/// `default_name`) from the cluster folder `tls_dir`.
pub fn member_transport(
    program: &str,
    tls_dir: Option<&Path>,
    name: Option<&str>,
    default_name: &str,
    plaintext: bool,
) -> Result<Transport> {
    match (tls_dir, plaintext) {
        (Some(_), true) => Err(Error::Invalid(
            "--tls-dir and --insecure-plaintext exclude each other".into(),
        )),
        (None, true) => {
            warn_plaintext(program);
            Ok(Transport::plaintext())
        }
        (Some(dir), false) => {
            let name = name.unwrap_or(default_name);
            missing_certificate(program, dir, name)
                .map_or_else(|| Transport::member(dir, name), Err)
        }
        (None, false) => Err(Error::Invalid(
            "no certificates: give --tls-dir DIR (make one with `fastchat-admin init DIR`), or \
             --insecure-plaintext for a classroom on one trusted machine"
                .into(),
        )),
    }
}

/// A client's transport: `--insecure-plaintext`; the CA file `ca`; or the CA of the cluster
/// whose balancer is `balancer`, pinned under `home` on first use.
pub fn client_transport(
    program: &str,
    home: &Path,
    balancer: &str,
    ca: Option<&PathBuf>,
    plaintext: bool,
) -> Result<Transport> {
    match (ca, plaintext) {
        (Some(_), true) => Err(Error::Invalid(
            "--ca and --insecure-plaintext exclude each other".into(),
        )),
        (None, true) => {
            warn_plaintext(program);
            Ok(Transport::plaintext())
        }
        (Some(ca), false) => Transport::client_with_ca(ca),
        (None, false) => Transport::client_pinned(pin_path(home, balancer)),
    }
}

/// The glibc tunables a chat server runs with, each as (what names it, the setting): the
/// setting is added unless the environment already has a tunable whose name starts with the
/// first (the operator's choice stands).
const TUNABLES: [(&str, &str); 2] = [
    // No per-thread cache of freed memory.
    ("glibc.malloc.tcache", "glibc.malloc.tcache_count=0"),
    // No cache of ended threads' stacks.
    (
        "glibc.pthread.stack_cache_size",
        "glibc.pthread.stack_cache_size=0",
    ),
];

/// Starts this program again, as the same process with the same arguments, with two of
/// glibc's caches turned off, unless the environment already says how to set them. Call it
/// first thing in `main`. Both kept memory that an idle connection does not need:
///
/// * **The per-thread cache of freed memory.** Each thread keeps up to seven freed chunks of
///   every small size for itself until it ends. A chat server's connection thread lives as
///   long as its connection, and what its TLS handshake and login freed stayed with it: 7.4
///   of the 49 KiB an idle connection cost. Without it, freed memory goes back to the shared
///   arenas at once; at 10,000 messages/s the server's CPU did not move beyond its spread.
/// * **The cache of stacks.** glibc keeps the stacks of ended threads (up to 40 MiB) for new
///   ones, with the pages next to the top still in memory. A client's session runs on a fresh
///   thread, after the thread that did its TLS handshake ended (`listen::Rest`), and it took
///   that thread's stack, with the four or five pages the handshake had touched, where its
///   own idle loop touches three: 4 KiB an idle connection. A thread start now maps a stack
///   and its end unmaps it; logins were no slower.
///
/// Measured in BENCHMARKS.md. Tunables are read only when a program starts, hence the new
/// start. Returns if the program was not started again: already set, not glibc, or the start
/// failed (it says so on standard error).
pub fn tune_glibc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        let current = std::env::var_os("GLIBC_TUNABLES");
        let Some(tunables) = tunables_to_set(current.as_deref()) else {
            return;
        };
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        let mut args = std::env::args_os();
        let mut again = std::process::Command::new(exe);
        if let Some(arg0) = args.next() {
            again.arg0(arg0);
        }
        let e = again.args(args).env("GLIBC_TUNABLES", tunables).exec();
        eprintln!("warning: could not start again with glibc's caches turned off: {e}");
    }
}

/// The value of `GLIBC_TUNABLES` that keeps the tunables in `current` and adds those of
/// [`TUNABLES`] it does not set; `None` if there is nothing to add (which also ends the new
/// start's loop) or `current` cannot be read.
fn tunables_to_set(current: Option<&std::ffi::OsStr>) -> Option<String> {
    let current = match current.map(|c| c.to_str()) {
        None => "",
        Some(None) => return None,
        Some(Some(c)) => c,
    };
    let missing: Vec<&str> = TUNABLES
        .iter()
        .filter(|(name, _)| !current.contains(name))
        .map(|(_, setting)| *setting)
        .collect();
    if missing.is_empty() {
        return None;
    }
    Some(
        std::iter::once(current)
            .filter(|c| !c.is_empty())
            .chain(missing)
            .collect::<Vec<_>>()
            .join(":"),
    )
}

/// Puts the calling thread, and every thread it starts from then on, under `SCHED_BATCH` at
/// the niceness it already has. The only thing that changes is wake-up preemption: a thread
/// woken by another of the process (a connection's, when the writer hands it a reply) no
/// longer takes the CPU from the thread that woke it, but runs on the other core or when the
/// waker sleeps. Without this a chat server at 10,000 messages/s was preempted after nearly
/// every hand-off, and each preemption is two context switches (see BENCHMARKS.md). CPU
/// shares are unchanged. Where the system refuses, it says so and carries on.
pub fn batch_scheduling() {
    use thread_priority::{
        set_thread_priority_and_policy, thread_native_id, NormalThreadSchedulePolicy,
        ThreadPriority, ThreadSchedulePolicy,
    };
    let batch = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Batch);
    let nice = match rustix::process::getpriority_process(None) {
        Ok(nice) => nice,
        Err(e) => {
            log::warn!("batch scheduling not set: cannot read this thread's niceness: {e}");
            return;
        }
    };
    // The crate sets the niceness too, from a value 0-99 that it maps onto -20..19: choose the
    // one that maps onto the niceness this thread has.
    let keeps_nice = (0..=99u8).find_map(|p| {
        let priority = ThreadPriority::Crossplatform(p.try_into().ok()?);
        (priority.to_posix(batch).ok()? == nice).then_some(priority)
    });
    let Some(priority) = keeps_nice else {
        log::warn!("batch scheduling not set: niceness {nice} is out of range");
        return;
    };
    if let Err(e) = set_thread_priority_and_policy(thread_native_id(), priority, batch) {
        log::warn!("batch scheduling not set: {e:?}");
    }
}

/// The CPUs a process is to run on, as `taskset -c` takes them: `0`, `0-3`, `0,2-3`
/// (`fastchat-server --cpus`). Sorted, each once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuList(Vec<usize>);

impl CpuList {
    /// Reads `text` (for the argument parser), checking every CPU against `allowed`, the
    /// ones this process may run on.
    fn parse(text: &str, allowed: &[usize]) -> std::result::Result<CpuList, String> {
        let mut cpus = Vec::new();
        for part in text.split(',') {
            let part = part.trim();
            let number = |s: &str| {
                s.trim().parse::<usize>().map_err(|_| {
                    format!("{part:?} is not a CPU number or range: give a list such as 0, 0-3 or 0,2-3")
                })
            };
            let (first, last) = match part.split_once('-') {
                Some((a, b)) => (number(a)?, number(b)?),
                None => (number(part)?, number(part)?),
            };
            if first > last {
                return Err(format!("{part:?} runs backwards: write it {last}-{first}"));
            }
            for cpu in first..=last {
                if !allowed.contains(&cpu) {
                    return Err(format!(
                        "CPU {cpu} is not one this process may run on (it may run on {})",
                        CpuList(allowed.to_vec())
                    ));
                }
                cpus.push(cpu);
            }
        }
        cpus.sort_unstable();
        cpus.dedup();
        Ok(CpuList(cpus))
    }

    /// The CPUs the calling thread may run on now.
    pub fn allowed() -> std::io::Result<CpuList> {
        let set = rustix::thread::sched_getaffinity(None)?;
        Ok(CpuList(
            (0..rustix::thread::CpuSet::MAX_CPU)
                .filter(|&cpu| set.is_set(cpu))
                .collect(),
        ))
    }

    /// Puts the calling thread, and every thread it starts from then on, on these CPUs only.
    pub fn run_on(&self) -> std::io::Result<()> {
        rustix::thread::sched_setaffinity(None, &self.set())?;
        Ok(())
    }

    /// Puts the main thread of process `pid` on these CPUs only (its threads started from
    /// then on too; those it has already started keep theirs).
    pub fn run_process_on(&self, pid: u32) -> std::io::Result<()> {
        let pid = rustix::process::Pid::from_raw(pid as i32)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        rustix::thread::sched_setaffinity(Some(pid), &self.set())?;
        Ok(())
    }

    fn set(&self) -> rustix::thread::CpuSet {
        let mut set = rustix::thread::CpuSet::new();
        for &cpu in &self.0 {
            set.set(cpu);
        }
        set
    }
}

/// Lists the CPUs as they are read: ranges where they follow one another (`0-3,6`).
impl std::fmt::Display for CpuList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut at = 0;
        let mut comma = "";
        while at < self.0.len() {
            let first = self.0[at];
            while at + 1 < self.0.len() && self.0[at + 1] == self.0[at] + 1 {
                at += 1;
            }
            let last = self.0[at];
            if last == first {
                write!(f, "{comma}{first}")?;
            } else {
                write!(f, "{comma}{first}-{last}")?;
            }
            comma = ",";
            at += 1;
        }
        Ok(())
    }
}

/// Reads a list of CPUs for the argument parser (see [`CpuList`]): each must be one this
/// process may run on.
pub fn cpu_list(text: &str) -> std::result::Result<CpuList, String> {
    let allowed = CpuList::allowed()
        .map_err(|e| format!("cannot read the CPUs this process may use: {e}"))?;
    CpuList::parse(text, &allowed.0)
}

#[cfg(test)]
mod tests {
    use thread_priority::{NormalThreadSchedulePolicy, ThreadSchedulePolicy};

    #[test]
    fn the_caches_are_turned_off_unless_the_environment_sets_them() {
        use super::tunables_to_set as tunables;
        use std::ffi::OsStr;
        let both = "glibc.malloc.tcache_count=0:glibc.pthread.stack_cache_size=0";
        assert_eq!(tunables(None).as_deref(), Some(both));
        assert_eq!(tunables(Some(OsStr::new(""))).as_deref(), Some(both));
        assert_eq!(
            tunables(Some(OsStr::new("glibc.malloc.arena_max=2"))).as_deref(),
            Some(&*format!("glibc.malloc.arena_max=2:{both}"))
        );
        // The operator's own setting of a cache stands; the other is still added.
        assert_eq!(
            tunables(Some(OsStr::new("glibc.malloc.tcache_count=3"))).as_deref(),
            Some("glibc.malloc.tcache_count=3:glibc.pthread.stack_cache_size=0")
        );
        assert_eq!(
            tunables(Some(OsStr::new("glibc.pthread.stack_cache_size=1048576"))).as_deref(),
            Some("glibc.pthread.stack_cache_size=1048576:glibc.malloc.tcache_count=0")
        );
        // Both set: nothing to add, which ends the new start's loop.
        assert_eq!(
            tunables(Some(OsStr::new(
                "glibc.malloc.arena_max=2:glibc.malloc.tcache_count=0:\
                 glibc.pthread.stack_cache_size=0"
            ))),
            None
        );
        assert_eq!(tunables(Some(OsStr::new(both))), None);
    }

    #[test]
    fn a_cpu_list_is_read_as_taskset_reads_it_and_checked_against_the_allowed_ones() {
        use super::CpuList;
        let allowed = [0, 1, 2, 3, 6];
        let read = |text: &str| CpuList::parse(text, &allowed);
        assert_eq!(read("0"), Ok(CpuList(vec![0])));
        assert_eq!(read("2-3,0, 6"), Ok(CpuList(vec![0, 2, 3, 6])));
        assert_eq!(read("1,1-2"), Ok(CpuList(vec![1, 2])));
        assert_eq!(read("0-3,6").unwrap().to_string(), "0-3,6");
        assert_eq!(read("6,0,2").unwrap().to_string(), "0,2,6");
        let error = read("4").unwrap_err();
        assert!(
            error.contains("CPU 4 is not one") && error.contains("0-3,6"),
            "{error}"
        );
        for bad in ["", "a", "1-", "-1", "1-2-3", "0,,1", "1.5"] {
            let error = read(bad).unwrap_err();
            assert!(
                error.contains("not a CPU number or range"),
                "{bad:?}: {error}"
            );
        }
        assert!(read("3-1").unwrap_err().contains("write it 1-3"));
    }

    #[test]
    fn a_thread_put_on_some_cpus_passes_them_to_the_threads_it_starts() {
        let before = super::CpuList::allowed().unwrap();
        std::thread::spawn(|| {
            let allowed = super::CpuList::allowed().unwrap();
            let first = super::CpuList(vec![allowed.0[0]]);
            first.run_on().unwrap();
            assert_eq!(super::CpuList::allowed().unwrap(), first);
            let child = std::thread::spawn(|| super::CpuList::allowed().unwrap());
            assert_eq!(child.join().unwrap(), first);
        })
        .join()
        .unwrap();
        // Other threads keep theirs.
        assert_eq!(super::CpuList::allowed().unwrap(), before);
    }

    #[test]
    fn batch_scheduling_keeps_the_niceness_and_passes_to_new_threads() {
        // On a thread of its own: the policy and niceness stay with the thread.
        std::thread::spawn(|| {
            rustix::process::setpriority_process(None, 7).unwrap();
            super::batch_scheduling();
            let batch = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Batch);
            assert_eq!(thread_priority::thread_schedule_policy().unwrap(), batch);
            assert_eq!(rustix::process::getpriority_process(None).unwrap(), 7);
            let child = std::thread::spawn(|| {
                (
                    thread_priority::thread_schedule_policy().unwrap(),
                    rustix::process::getpriority_process(None).unwrap(),
                )
            });
            assert_eq!(child.join().unwrap(), (batch, 7));
        })
        .join()
        .unwrap();
    }
}
