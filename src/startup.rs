//! What every binary does when it starts: logging, the Ctrl-C handler, private files, and the
//! transport its flags ask for (with the warning that plaintext deserves).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::transport::{pin_path, Transport};

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
        (Some(dir), false) => Transport::member(dir, name.unwrap_or(default_name)),
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

/// The glibc tunable that turns off its per-thread cache of freed memory.
const NO_THREAD_CACHE: &str = "glibc.malloc.tcache_count=0";

/// Starts this program again, as the same process with the same arguments, with glibc's
/// per-thread cache of freed memory turned off, unless the environment already says how to
/// set that cache. Call it first thing in `main`.
///
/// Each thread keeps up to seven freed chunks of every small size for itself until it ends.
/// A chat server's connection thread lives as long as its connection, and what its TLS
/// handshake and login freed stayed with it: 7.4 of the 49 KiB an idle connection cost
/// (BENCHMARKS.md). Without the cache, freed memory goes back to the shared arenas at once;
/// at 10,000 messages/s the server's CPU did not move beyond its spread. Tunables are read
/// only when a program starts, hence the new start. Returns if the program was not started
/// again: already set, not glibc, or the start failed (it says so on standard error).
pub fn without_thread_cache() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        let current = std::env::var_os("GLIBC_TUNABLES");
        let Some(tunables) = tunables_without_thread_cache(current.as_deref()) else {
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
        eprintln!("warning: could not start again without the per-thread malloc cache: {e}");
    }
}

/// The value of `GLIBC_TUNABLES` that turns the per-thread cache off and keeps the other
/// tunables in `current`; `None` if `current` already sets the cache (the operator's choice
/// stands) or cannot be read.
fn tunables_without_thread_cache(current: Option<&std::ffi::OsStr>) -> Option<String> {
    match current.map(|c| c.to_str()) {
        None => Some(NO_THREAD_CACHE.to_string()),
        Some(None) => None,
        Some(Some(c)) if c.contains("glibc.malloc.tcache") => None,
        Some(Some("")) => Some(NO_THREAD_CACHE.to_string()),
        Some(Some(c)) => Some(format!("{c}:{NO_THREAD_CACHE}")),
    }
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

#[cfg(test)]
mod tests {
    use thread_priority::{NormalThreadSchedulePolicy, ThreadSchedulePolicy};

    #[test]
    fn the_thread_cache_is_turned_off_unless_the_environment_sets_it() {
        use super::tunables_without_thread_cache as tunables;
        use std::ffi::OsStr;
        assert_eq!(
            tunables(None).as_deref(),
            Some("glibc.malloc.tcache_count=0")
        );
        assert_eq!(
            tunables(Some(OsStr::new(""))).as_deref(),
            Some("glibc.malloc.tcache_count=0")
        );
        assert_eq!(
            tunables(Some(OsStr::new("glibc.malloc.arena_max=2"))).as_deref(),
            Some("glibc.malloc.arena_max=2:glibc.malloc.tcache_count=0")
        );
        // The operator's own setting of the cache stands (and ends the new start's loop).
        assert_eq!(
            tunables(Some(OsStr::new("glibc.malloc.tcache_count=3"))),
            None
        );
        assert_eq!(
            tunables(Some(OsStr::new(
                "glibc.malloc.arena_max=2:glibc.malloc.tcache_count=0"
            ))),
            None
        );
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
