//! Starting a local cluster from a program: a balancer and some chat servers, as child
//! processes of the binaries installed next to the current one, on a fresh database in a
//! temporary folder. Used by `fastchat-bench --spawn-servers`; its temporary folders and
//! process starts serve `--rival` too.
//!
//! Every process is stopped by its PID (SIGTERM, then SIGKILL) and the folder removed when the
//! [`LocalCluster`] is dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::client::BalancerClient;
use crate::crypto;
use crate::error::{Error, Result};
use crate::transport::pki::{self, Member, Role};
use crate::transport::Transport;

/// How long a process may take to print its ready line.
const READY_LIMIT: Duration = Duration::from_secs(15);

/// What this program started and has not yet cleaned up, for [`stop_everything`] when the
/// program is interrupted before the owners are dropped.
struct Started {
    pids: Vec<u32>,
    dirs: Vec<PathBuf>,
    /// Set by `stop_everything`: nothing more may be started.
    stopped: bool,
}

static STARTED: parking_lot::Mutex<Started> = parking_lot::Mutex::new(Started {
    pids: Vec::new(),
    dirs: Vec::new(),
    stopped: false,
});

/// Stops every process this program started (SIGTERM, then SIGKILL a second later) and
/// removes their folders: for a Ctrl-C handler, when the normal clean-up will not run.
pub fn stop_everything() {
    let (pids, dirs) = {
        let mut started = STARTED.lock();
        started.stopped = true;
        (
            std::mem::take(&mut started.pids),
            std::mem::take(&mut started.dirs),
        )
    };
    for pid in &pids {
        let _ = signal(*pid, "-TERM");
    }
    let alive = |pid: u32| Path::new("/proc").join(pid.to_string()).exists();
    let deadline = Instant::now() + Duration::from_secs(1);
    while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for pid in pids {
        let _ = signal(pid, "-KILL");
    }
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A started process and its PID.
pub struct Process {
    child: Child,
    /// What it is, for messages (`balancer`, `server 2`).
    pub name: String,
}

impl Process {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, a short wait, then SIGKILL; reaps it.
    pub(super) fn stop(&mut self) {
        let pid = self.pid();
        STARTED.lock().pids.retain(|p| *p != pid);
        if let Ok(None) = self.child.try_wait() {
            let _ = signal(pid, "-TERM");
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Stops process `pid` (SIGSTOP) at a moment when it does not hold the write lock of the
/// database `db`: stopped mid-commit, it would hold up every other process's writes (SQLite's
/// lock until it resumes; PostgreSQL ends the transaction after 5 s), and the run would
/// measure that instead of its clients' failover. Tries up to 50 times.
pub fn stop_outside_a_commit(pid: u32, db: &str) -> Result<()> {
    for _ in 0..50 {
        signal(pid, "-STOP")?;
        if write_lock_free(db)? {
            return Ok(());
        }
        signal(pid, "-CONT")?;
        std::thread::sleep(Duration::from_millis(37));
    }
    Err(Error::Local(format!(
        "process {pid} held the database's write lock every time it was stopped"
    )))
}

/// Sends `sig` (as `kill` takes it) to process `pid`, one this process started.
pub fn signal(pid: u32, sig: &str) -> Result<()> {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status()?;
    if !status.success() {
        return Err(Error::Local(format!("kill {sig} {pid} failed")));
    }
    Ok(())
}

/// Whether the write lock of the database `db` can be had now (given back at once).
fn write_lock_free(db: &str) -> Result<bool> {
    use crate::db::postgres::{Conn, WRITE_LOCK};
    match crate::db::Location::parse(db) {
        crate::db::Location::Sqlite(path) => {
            let conn = rusqlite::Connection::open(path)?;
            conn.busy_timeout(Duration::from_millis(200))?;
            Ok(conn.execute_batch("BEGIN IMMEDIATE; ROLLBACK").is_ok())
        }
        crate::db::Location::Postgres(url) => {
            let mut conn = Conn::connect(&url, Duration::from_secs(1))?;
            let free: bool = conn
                .one("SELECT pg_try_advisory_lock($1)", &[&WRITE_LOCK])?
                .get(0);
            if free {
                conn.one("SELECT pg_advisory_unlock($1)", &[&WRITE_LOCK])?;
            }
            Ok(free)
        }
    }
}

/// A balancer and chat servers started by this process.
pub struct LocalCluster {
    /// The temporary folder (database and logs).
    pub dir: PathBuf,
    /// The balancer's address.
    pub balancer: String,
    /// The balancer process.
    pub balancer_process: Process,
    /// The server processes, in start order.
    pub servers: Vec<Process>,
    /// The cluster's certificate folder; `None` for a plaintext cluster.
    pub tls: Option<PathBuf>,
    /// Its database (`--db` of every process): a file, or a PostgreSQL URL.
    pub db: String,
}

impl LocalCluster {
    /// Starts a balancer (with the given scrypt cost and algorithm) and `servers` servers, and
    /// waits until all are registered. With `tls`, a cluster CA and certificates are made
    /// first (`tls/` in the temporary folder); else everything runs in plaintext. Logs go to
    /// files in the temporary folder.
    pub fn start(
        servers: usize,
        scrypt_log_n: u8,
        algo: &str,
        server_args: &[&str],
        tls: bool,
        db: Option<&str>,
    ) -> Result<LocalCluster> {
        let dir = temp_dir("fastchat")?;
        let db_arg = match db {
            Some(db) => db.to_string(),
            None => dir.join("chat.db").to_string_lossy().to_string(),
        };
        let log_n = scrypt_log_n.to_string();
        let tls_dir = dir.join("tls");
        let tls_arg = tls_dir.to_string_lossy().to_string();
        let names: Vec<String> = (1..=servers).map(|i| format!("server-{i}")).collect();
        if tls {
            let mut members = vec![Member {
                role: Role::Balancer,
                name: "balancer".into(),
            }];
            members.extend(names.iter().map(|n| Member {
                role: Role::Server,
                name: n.clone(),
            }));
            pki::init(&tls_dir, &members)?;
        }
        let security = |name: &str| -> Vec<String> {
            if tls {
                vec![
                    "--tls-dir".into(),
                    tls_arg.clone(),
                    "--name".into(),
                    name.into(),
                ]
            } else {
                vec!["--insecure-plaintext".into()]
            }
        };
        let mut balancer_args: Vec<String> = [
            "--listen",
            "127.0.0.1:0",
            "--db",
            &db_arg,
            "--signups-per-address",
            "0",
            "--scrypt-log-n",
            &log_n,
            "--algo",
            algo,
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        balancer_args.extend(security("balancer"));
        let (balancer_process, line) =
            spawn(&dir, "balancer", "fastchat-balancer", &balancer_args)?;
        let balancer = last_word(&line);
        let mut cluster = LocalCluster {
            dir,
            balancer,
            balancer_process,
            servers: Vec::new(),
            tls: tls.then_some(tls_dir),
            db: db_arg.clone(),
        };
        for (i, name) in names.iter().enumerate() {
            let mut args: Vec<String> = [
                "--listen",
                "127.0.0.1:0",
                "--balancer",
                &cluster.balancer,
                "--db",
                &db_arg,
            ]
            .iter()
            .map(|a| a.to_string())
            .collect();
            args.extend(security(name));
            args.extend(server_args.iter().map(|a| a.to_string()));
            let (process, _) = spawn(
                &cluster.dir,
                &format!("server{i}"),
                "fastchat-server",
                &args,
            )?;
            cluster.servers.push(process);
        }
        cluster.wait_registered(servers)?;
        Ok(cluster)
    }

    /// How a client reaches this cluster: with its CA, or in plaintext.
    pub fn transport(&self) -> Result<Transport> {
        match &self.tls {
            Some(dir) => Transport::client_with_ca(&pki::ca_path(dir)),
            None => Ok(Transport::plaintext()),
        }
    }

    /// Waits until the balancer lists `n` live servers.
    fn wait_registered(&self, n: usize) -> Result<()> {
        let deadline = Instant::now() + READY_LIMIT;
        let transport = self.transport()?;
        loop {
            let live = BalancerClient::connect(&self.balancer, &transport)?.servers()?;
            if live.len() == n {
                return Ok(());
            }
            if Instant::now() > deadline {
                // The tool's own cluster did not come up: local trouble (exit 4).
                return Err(Error::Local(format!(
                    "only {} of {n} servers registered; see the logs in {}",
                    live.len(),
                    self.dir.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for LocalCluster {
    /// Servers first, then the balancer; then the folder.
    fn drop(&mut self) {
        for s in &mut self.servers {
            s.stop();
        }
        self.balancer_process.stop();
        remove_dir(&self.dir);
    }
}

/// The folder of the running binary, where the other fastchat binaries are installed.
fn bin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| Error::Invalid("cannot tell where the fastchat binaries are".into()))
}

/// A new temporary folder, `PREFIX-PID-RANDOM`, removed by [`stop_everything`] unless
/// [`remove_dir`] removed it first.
pub(super) fn temp_dir(prefix: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "{prefix}-{}-{}",
        std::process::id(),
        crypto::to_hex(&crypto::random_bytes(4)?)
    ));
    std::fs::create_dir_all(&dir)?;
    STARTED.lock().dirs.push(dir.clone());
    Ok(dir)
}

/// Removes a folder made by [`temp_dir`].
pub(super) fn remove_dir(dir: &Path) {
    STARTED.lock().dirs.retain(|d| d != dir);
    let _ = std::fs::remove_dir_all(dir);
}

/// Starts `path ARGS` with stderr (and, unless `piped`, stdout) to `dir/NAME.log`, and
/// remembers it for [`stop_everything`].
pub(super) fn start(
    dir: &Path,
    name: &str,
    path: &Path,
    args: &[String],
    piped: bool,
) -> Result<Process> {
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let stdout = if piped {
        Stdio::piped()
    } else {
        Stdio::from(log.try_clone()?)
    };
    let mut child = Command::new(path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(log)
        .spawn()
        .map_err(|e| Error::Local(format!("cannot start {}: {e}", path.display())))?;
    let mut started = STARTED.lock();
    if started.stopped {
        // Interrupted while this one was starting: it must not outlive the program.
        let _ = child.kill();
        let _ = child.wait();
        return Err(Error::Invalid("interrupted".into()));
    }
    started.pids.push(child.id());
    Ok(Process {
        child,
        name: name.to_string(),
    })
}

/// Starts the fastchat binary `program ARGS` with stderr to `dir/NAME.log`; returns it and its
/// first stdout line.
fn spawn(dir: &Path, name: &str, program: &str, args: &[String]) -> Result<(Process, String)> {
    let mut process = start(dir, name, &bin_dir()?.join(program), args, true)?;
    let stdout = process.child.stdout.take().expect("piped");
    // The first line says it is ready; read it on a thread so a silent process times out.
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = tx.send(lines.next());
        // Keep draining, so the child never blocks on a full pipe.
        for _ in lines {}
    });
    match rx.recv_timeout(READY_LIMIT) {
        Ok(Some(Ok(line))) => Ok((process, line)),
        _ => {
            process.stop();
            Err(Error::Local(format!(
                "{name} did not start; see {}",
                dir.join(format!("{name}.log")).display()
            )))
        }
    }
}

fn last_word(line: &str) -> String {
    line.rsplit(' ').next().unwrap_or_default().to_string()
}

/// A process's thread count, open descriptors, resident memory and CPU time so far, from
/// `/proc` (Linux).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Usage {
    /// Threads.
    pub threads: u64,
    /// Open file descriptors (sockets, eventfds, files).
    pub fds: u64,
    /// Resident set size, KiB.
    pub rss_kib: u64,
    /// Of it, the threads' stacks, KiB (read by [`memory`] only: reading every mapping of a
    /// process with thousands of threads takes a while).
    pub stack_kib: u64,
    /// User and system CPU time, seconds.
    pub cpu_secs: f64,
}

/// Clock ticks per second of `/proc/PID/stat` times (USER_HZ, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// Reads [`Usage`] of a process; `None` where `/proc` is unavailable.
pub fn usage(pid: u32) -> Option<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces): utime and
    // stime are the 12th and 13th.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some(Usage {
        threads: field("Threads:")?,
        fds: std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64,
        rss_kib: field("VmRSS:")?,
        stack_kib: 0,
        cpu_secs: ticks / USER_HZ,
    })
}

/// The CPUs process `pid`'s main thread may run on, as the kernel lists them (`0-1`);
/// `None` where `/proc` is unavailable.
pub fn cpus(pid: u32) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
    Some(list.trim().to_string())
}

/// Context switches of a process so far, voluntary (it waited: for its socket, a lock, a
/// queue) and involuntary (it was preempted), summed over its threads alive now (a thread
/// that ended takes its count with it); `None` where `/proc` is unavailable.
pub fn switches(pid: u32) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        // A thread may end between the listing and the read.
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        total += status
            .lines()
            .filter_map(|l| {
                l.strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
            })
            .filter_map(|v| v.trim().parse::<u64>().ok())
            .sum::<u64>();
    }
    Some(total)
}

/// [`usage`], with how much of the resident memory is the threads' stacks.
pub fn memory(pid: u32) -> Option<Usage> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    Some(Usage {
        stack_kib: stack_kib(&smaps),
        ..usage(pid)?
    })
}

/// Resident KiB of the thread stacks in `smaps` (a `/proc/PID/smaps`): the anonymous
/// writable mappings right above an anonymous guard page (no access, one page), as glibc
/// makes a thread's stack (and Rust a thread's signal stack). The first thread's stack, the
/// process's own `[stack]`, is not counted.
fn stack_kib(smaps: &str) -> u64 {
    // (start, end, whether it is an anonymous guard) of the mapping before, and whether the
    // mapping being read is a stack.
    let mut before: Option<(u64, u64, bool)> = None;
    let mut in_stack = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let range = fields.first().and_then(|r| r.split_once('-'));
        let bounds = range.and_then(|(a, b)| {
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        });
        if let (Some((start, end)), Some(perms)) = (bounds, fields.get(1)) {
            // A mapping's first line: range, permissions, offset, device, inode[, path].
            let anonymous = fields.len() == 5;
            in_stack = anonymous
                && perms.starts_with("rw")
                && before.is_some_and(|(guard_start, guard_end, guard)| {
                    guard && guard_end == start && guard_end - guard_start == 4096
                });
            before = Some((start, end, anonymous && perms.starts_with("---")));
        } else if let (true, Some(&"Rss:"), Some(n)) = (in_stack, fields.first(), fields.get(1)) {
            kib += n.parse::<u64>().unwrap_or(0);
        }
    }
    kib
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stacks_are_the_writable_mappings_right_above_a_guard_page() {
        let smaps = "\
55d000000000-55d000001000 r--p 00000000 08:01 123 /usr/bin/fastchat-server
Rss:                   4 kB
7f0000000000-7f0000001000 ---p 00000000 00:00 0
Rss:                   0 kB
7f0000001000-7f0000041000 rw-p 00000000 00:00 0
Size:                256 kB
Rss:                  12 kB
7f0000041000-7f0000042000 ---p 00000000 00:00 0
Rss:                   0 kB
7f0000042000-7f0000082000 rw-p 00000000 00:00 0
Rss:                  20 kB
7f0000090000-7f0000091000 ---p 00000000 00:00 0
Rss:                   0 kB
7f00000a0000-7f00000e0000 rw-p 00000000 00:00 0
Rss:                 100 kB
7f1000000000-7f1004000000 ---p 00000000 00:00 0
Rss:                   0 kB
7f1004000000-7f1004100000 rw-p 00000000 00:00 0
Rss:                 800 kB
7f2000000000-7f2000001000 ---p 00000000 08:01 99 /usr/lib/libssl.so.3
Rss:                   0 kB
7f2000001000-7f2000002000 rw-p 00000000 08:01 99 /usr/lib/libssl.so.3
Rss:                   4 kB
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0 [stack]
Rss:                  32 kB
";
        // Two stacks (12 and 20 KiB); not a mapping after a gap, nor one after a larger
        // reservation (a malloc arena), nor a file's, nor the first thread's.
        assert_eq!(stack_kib(smaps), 32);
    }

    #[test]
    fn every_thread_of_a_process_is_counted_while_it_lives() {
        let me = std::process::id();
        let before = switches(me).unwrap();
        let (done, finished) = crossbeam_channel::bounded::<()>(0);
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        // Another thread sleeps twenty times (each a voluntary switch) while this one waits
        // once.
        let thread = std::thread::spawn(move || {
            for _ in 0..20 {
                std::thread::sleep(Duration::from_millis(1));
            }
            done.send(()).unwrap();
            let _ = stopped.recv();
        });
        finished.recv().unwrap();
        let during = switches(me).unwrap();
        assert!(during >= before + 20, "{before} then {during}");
        drop(stop);
        thread.join().unwrap();
        assert_eq!(switches(u32::MAX), None, "no such process");
    }

    #[test]
    fn a_live_process_has_its_threads_stacks_counted() {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let thread = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                // Touch some of the stack, and keep it until told.
                let touched = std::hint::black_box([1u8; 8192]);
                let _ = stopped.recv();
                touched[8191]
            })
            .unwrap();
        let with = memory(std::process::id()).unwrap();
        assert!(with.stack_kib >= 8, "{with:?}");
        assert!(with.stack_kib < with.rss_kib, "{with:?}");
        drop(stop);
        thread.join().unwrap();
    }
}
