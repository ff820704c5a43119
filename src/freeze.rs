//! Freezes: spans of [`FROZEN`] or more in which this process did not run at all (it was
//! stopped with SIGSTOP, or its virtual machine was paused).
//!
//! A chat server frozen that long may have been given up on: a client that waited
//! [`crate::client::connection::SERVER_TIMEOUT`] for its `Stored` has sent the message again
//! through another server. A re-send finds an earlier copy only if that copy was stored first;
//! a server that stored the original after its freeze, once the re-sent copy was delivered and
//! removed, would store the message twice, under a new id (which the recipient's client
//! refuses as a replay). So a server takes a freeze as a crash it lived through: what it read
//! before is not stored (the database writer refuses its stores, [`crate::db::Fence`]), and
//! the connections from before are closed when they next send a message, so that their
//! clients reconnect and send again what they never saw confirmed, as they do after a crash.
//! (Their other requests, acknowledgements above all, are served as ever.)
//!
//! Telling a freeze from a busy machine: a monitor thread looks at the clock every 100 ms.
//! A gap of [`FROZEN`] or more between two looks in which the process used little CPU time
//! (less than a quarter of one core; it is counted for the whole process and stands still
//! while every thread is stopped) is a freeze; a process too busy for its monitor to run uses
//! CPU all the while. A thread that finds the last look older than [`FROZEN`] looks itself,
//! so that nothing read just after a freeze is acted on before the freeze is counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// The shortest span without running that counts as a freeze: well under the clients'
/// patience ([`crate::client::connection::SERVER_TIMEOUT`], 5 s), so that no client can have
/// given up on a request over a shorter one, unless it had already waited 3 s before it.
pub const FROZEN: Duration = Duration::from_secs(2);

/// How often the monitor looks.
const TICK: Duration = Duration::from_millis(100);

/// Starts watching for freezes (the first call of [`epoch`] does too): a server does at its
/// start, so that its monitor thread is not counted as a connection's.
pub fn watch() {
    monitor();
}

/// Which freeze this process is past: 0 until the first, then one more for each. Work read
/// in one epoch and not yet done in a later one must not be done (see the module's
/// documentation).
pub fn epoch() -> u64 {
    let monitor = monitor();
    let now = monitor.now_ms();
    if now.saturating_sub(monitor.looked.load(Ordering::Acquire)) >= FROZEN.as_millis() as u64 {
        monitor.look();
    }
    monitor.epoch.load(Ordering::Acquire)
}

struct Monitor {
    /// What the monitor's times count from.
    start: Instant,
    /// When it last looked, in milliseconds since `start`.
    looked: AtomicU64,
    /// The process's CPU time then, in nanoseconds.
    cpu: AtomicU64,
    /// Freezes seen.
    epoch: AtomicU64,
    /// One look at a time.
    looking: Mutex<()>,
}

fn monitor() -> &'static Monitor {
    static MONITOR: OnceLock<Monitor> = OnceLock::new();
    static STARTED: std::sync::Once = std::sync::Once::new();
    let monitor = MONITOR.get_or_init(|| Monitor {
        start: Instant::now(),
        looked: AtomicU64::new(0),
        cpu: AtomicU64::new(process_cpu_ns()),
        epoch: AtomicU64::new(0),
        looking: Mutex::new(()),
    });
    STARTED.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("freeze-watch".into())
            .stack_size(64 * 1024)
            .spawn(move || loop {
                std::thread::sleep(TICK);
                monitor.look();
            });
        if let Err(e) = spawned {
            // Every caller of `epoch` looks for itself after a gap: slower, still right.
            log::warn!("cannot start the freeze monitor thread: {e}");
        }
    });
    monitor
}

impl Monitor {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Looks at the clock and the CPU time; counts a freeze if the gap since the last look
    /// was one.
    fn look(&self) {
        let _one = self.looking.lock();
        let now = self.now_ms();
        let cpu = process_cpu_ns();
        let gap = now.saturating_sub(self.looked.load(Ordering::Acquire));
        let used = cpu.saturating_sub(self.cpu.load(Ordering::Acquire));
        if frozen(gap, used) {
            // Counted before the look is recorded: whoever sees the new look sees the freeze.
            let epoch = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
            log::warn!(
                "this process did not run for {:.1} s (stopped, or its machine paused): what \
                 messages it read before are not stored, and the connections from before are \
                 closed when they next send one (freeze {epoch})",
                gap as f64 / 1000.0
            );
        }
        self.cpu.store(cpu, Ordering::Release);
        self.looked.store(now, Ordering::Release);
    }
}

/// Whether a gap of `gap_ms` between looks, in which the process used `used_ns` of CPU time,
/// was a freeze.
fn frozen(gap_ms: u64, used_ns: u64) -> bool {
    gap_ms >= FROZEN.as_millis() as u64 && used_ns.saturating_mul(4) < gap_ms * 1_000_000
}

/// The CPU time of the whole process so far, in nanoseconds.
fn process_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    (t.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_gap_without_cpu_is_a_freeze_and_a_busy_or_short_one_is_not() {
        let ms = 1_000_000;
        assert!(frozen(2_000, 0));
        // Up to a tick's work on both cores before the stop.
        assert!(frozen(2_100, 200 * ms));
        assert!(frozen(60_000, 200 * ms));
        // Too short to matter, however still.
        assert!(!frozen(1_999, 0));
        // Busy: the monitor thread was starved, not stopped.
        assert!(!frozen(2_000, 500 * ms));
        assert!(!frozen(3_000, 6_000 * ms));
    }

    #[test]
    fn a_running_process_stays_in_its_epoch() {
        let first = epoch();
        let until = Instant::now() + Duration::from_millis(300);
        while Instant::now() < until {
            assert_eq!(epoch(), first);
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(process_cpu_ns() > 0);
    }
}
