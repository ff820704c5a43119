//! What a run costs the machine: each process's CPU, sampled during the run, and the run cut
//! into periods (`--every`).

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::launch::{self, LocalCluster, Usage};
use super::{driver, report, Period};

/// The spawned servers' resident memory (and how much of it is stacks) and threads now
/// (none when pointed at a running cluster).
pub(super) fn sample(cluster: Option<&LocalCluster>) -> Vec<Usage> {
    cluster
        .map(|c| {
            c.servers
                .iter()
                .map(|s| launch::memory(s.pid()).unwrap_or_default())
                .collect()
        })
        .unwrap_or_default()
}

/// The processes whose CPU a run counts, by name and PID: each spawned process and this one;
/// none when the cluster is not this tool's (its servers' CPU is not ours to see, and this
/// tool's alone would mislead).
pub(super) fn processes(cluster: Option<&LocalCluster>) -> Vec<(String, u32)> {
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
pub(super) type Cpu = Vec<(String, f64)>;

/// A CPU sample and when it was taken (seconds since the first message).
pub(super) type Sample = (f64, Cpu);

/// CPU seconds so far of each of `processes`.
pub(super) fn cpu_sample(processes: &[(String, u32)]) -> Cpu {
    processes
        .iter()
        .map(|(name, pid)| {
            let secs = launch::usage(*pid).map_or(0.0, |u| u.cpu_secs);
            (name.clone(), secs)
        })
        .collect()
}

/// Context switches of each process, by name (see [`launch::switches`]).
pub(super) type Switches = Vec<(String, u64)>;

/// Context switches so far of each of `processes`.
pub(super) fn switch_sample(processes: &[(String, u32)]) -> Switches {
    processes
        .iter()
        .map(|(name, pid)| (name.clone(), launch::switches(*pid).unwrap_or(0)))
        .collect()
}

/// Context switches made by each process between two samples.
pub(super) fn switches_made(before: &[(String, u64)], after: &[(String, u64)]) -> Switches {
    before
        .iter()
        .zip(after)
        .map(|((name, b), (_, a))| (name.clone(), a.saturating_sub(*b)))
        .collect()
}

/// CPU seconds spent by each process between two samples.
pub(super) fn cpu_spent(before: &[(String, f64)], after: &[(String, f64)]) -> Cpu {
    before
        .iter()
        .zip(after)
        .map(|((name, b), (_, a))| (name.clone(), (a - b).max(0.0)))
        .collect()
}

/// Samples the CPU of `processes` every `every` from `t0` on, until `over` is dropped, and once
/// more then: (seconds since `t0`, sample), the first at `t0`.
pub(super) fn sample_cpu_every(
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
pub(super) fn periods(
    deliveries: &[driver::Delivery],
    every: Duration,
    samples: &[Sample],
) -> Vec<Period> {
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
