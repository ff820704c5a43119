//! How many connections a process can hold on this machine: its descriptor limit and its
//! thread budget, read at start-up, so that it refuses the next connection cleanly ("server
//! is full") instead of failing to accept it.

use std::path::Path;

use rustix::process::{getrlimit, Resource};

/// What bounds a process's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open descriptors allowed (`RLIMIT_NOFILE`, soft).
    pub descriptors: u64,
    /// Threads this process may still start: the smallest of the kernel's thread limit, half
    /// the memory-map limit (a thread's stack and guard page are two maps), and the user's
    /// process limit (`RLIMIT_NPROC`, which counts threads).
    pub threads: u64,
}

impl Limits {
    /// The limits of this process, as the kernel says (generous guesses where it does not).
    pub fn of_this_process() -> Limits {
        let soft = |r: Resource| getrlimit(r).current.unwrap_or(u64::MAX);
        let from_proc = |p: &str| -> u64 {
            std::fs::read_to_string(Path::new(p))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(u64::MAX)
        };
        let threads = from_proc("/proc/sys/kernel/threads-max")
            .min(from_proc("/proc/sys/vm/max_map_count") / 2)
            .min(soft(Resource::Nproc));
        Limits {
            descriptors: soft(Resource::Nofile),
            threads,
        }
    }

    /// How many connections fit, each needing `fds` descriptors and one thread, after `reserve`
    /// descriptors and threads for everything else.
    pub fn connections(&self, fds: u64, reserve: u64) -> u64 {
        let by_fds = self.descriptors.saturating_sub(reserve) / fds.max(1);
        let by_threads = self.threads.saturating_sub(reserve);
        by_fds.min(by_threads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tighter_limit_wins() {
        let l = Limits {
            descriptors: 20_000,
            threads: 30_000,
        };
        assert_eq!(l.connections(2, 200), 9_900);
        assert_eq!(l.connections(3, 200), 6_600);
        let few_threads = Limits {
            descriptors: 20_000,
            threads: 1_000,
        };
        assert_eq!(few_threads.connections(2, 200), 800);
        assert_eq!(few_threads.connections(2, 5_000), 0);
        let here = Limits::of_this_process();
        assert!(here.descriptors > 0 && here.threads > 0, "{here:?}");
    }
}
