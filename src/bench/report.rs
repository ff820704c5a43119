//! How a run's results are shown: for people, as Markdown table rows, as JSON; and the
//! progress bar.

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, RecvTimeoutError, Sender};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::driver::Counters;
use super::launch::Usage;
use super::{Latency, Report};

/// The name under which this tool's own CPU time is counted (its clients' cryptography, not
/// the servers' work).
pub const BENCH_PROCESS: &str = "bench";

/// Percentiles of latencies in microseconds (sorts them).
pub(super) fn percentiles(us: &mut [u32]) -> Latency {
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

/// A progress bar on standard error (indicatif), updated five times a second from the
/// delivery counter by a thread of its own.
pub(super) struct Progress {
    /// Dropped to stop the thread: it then ends at once, whatever it was doing.
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

impl Progress {
    pub fn start(counters: Arc<Counters>, expected: u64) -> Progress {
        Progress::start_on(counters, expected, ProgressDrawTarget::stderr())
    }

    fn start_on(counters: Arc<Counters>, expected: u64, target: ProgressDrawTarget) -> Progress {
        let bar = ProgressBar::with_draw_target(Some(expected), target);
        bar.set_style(
            ProgressStyle::with_template(
                "[{bar:30}] {percent:>3}%  {pos}/{len} delivered  {per_sec:>12}  {elapsed}",
            )
            .expect("a valid template")
            .progress_chars("#>."),
        );
        let (stop, stopped) = bounded::<()>(0);
        let thread = std::thread::spawn(move || loop {
            bar.set_position(counters.delivered.load(Ordering::Relaxed));
            match stopped.recv_timeout(Duration::from_millis(200)) {
                Err(RecvTimeoutError::Timeout) => continue,
                Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                    bar.finish();
                    return;
                }
            }
        });
        Progress { stop, thread }
    }

    /// Draws the last state and ends the bar's thread, at once.
    pub fn stop(self) {
        drop(self.stop);
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
        "direct" => format!("{} pattern, ", r.pattern),
        _ => String::new(),
    };
    let server = match &r.rival {
        Some(rival) => format!("{rival}, "),
        None => String::new(),
    };
    // Idle clients send nothing: no messages, window or rate to tell.
    let workload = match r.mode.as_str() {
        "idle" => format!("{} clients", r.clients),
        _ => format!(
            "{} clients x {} messages of {} B, window {}, {rate}",
            r.clients, r.messages, r.size, r.window
        ),
    };
    let cpus = match &r.server_cpus {
        Some(cpus) if cpus.contains([',', '-']) => format!(" on CPUs {cpus}"),
        Some(cpus) => format!(" on CPU {cpus}"),
        None => String::new(),
    };
    out.push_str(&format!(
        "fastchat-bench: {server}{} mode, {shape}{workload}, {} server{}{cpus}, {}, {} driving thread{}\n",
        r.mode,
        r.servers,
        if r.servers == 1 { "" } else { "s" },
        if r.tls { "TLS" } else { "plaintext" },
        r.threads,
        if r.threads == 1 { "" } else { "s" }
    ));
    if r.rival.is_some() {
        out.push_str(
            "  rival       not fastchat: no end-to-end encryption, nothing stored before it is confirmed\n",
        );
    } else if r.opaque {
        out.push_str(
            "  opaque      bodies sent as they are, not end-to-end encrypted: the servers alone\n",
        );
    }
    let joined = if r.rival.is_some() {
        "connected and registered"
    } else {
        "signed up, logged in and connected"
    };
    out.push_str(&format!(
        "  connect     {} clients {joined} in {:.2} s ({:.2} ms each)\n",
        r.clients - r.connect_failed,
        r.connect_secs,
        r.connect_secs * 1000.0 / r.clients.max(1) as f64
    ));
    if r.connect_failed > 0 {
        out.push_str(&format!(
            "  FAILED      {} clients could not connect and were left out (first: {})\n",
            r.connect_failed,
            r.connect_error.as_deref().unwrap_or("?")
        ));
    }
    if r.mode == "idle" {
        for (i, (before, after)) in r.server_usage.iter().enumerate() {
            let clients = r.clients as f64 / r.server_usage.len() as f64;
            out.push_str(&format!(
                "  server {i}    {} threads, {} descriptors, {:.1} MiB RSS with ~{clients:.0} clients ({:.2} threads, {:.2} descriptors and {:.1} KiB per client, of it {:.1} KiB stack)\n",
                after.threads,
                after.fds,
                after.rss_kib as f64 / 1024.0,
                (after.threads as f64 - before.threads as f64) / clients,
                (after.fds as f64 - before.fds as f64) / clients,
                (after.rss_kib as f64 - before.rss_kib as f64) / clients,
                (after.stack_kib as f64 - before.stack_kib as f64) / clients
            ));
        }
        return out;
    }
    let (taken, delivery) = match (&r.rival, r.opaque) {
        (Some(_), _) => ("confirmed", "delivery"),
        (None, true) => ("stored", "delivery"),
        (None, false) => ("stored", "decrypted delivery"),
    };
    out.push_str(&format!(
        "  sent        {} messages, all {taken}, in {:.2} s\n",
        r.clients as u64 * r.messages,
        r.send_secs
    ));
    out.push_str(&format!(
        "  delivered   {} of {} in {:.2} s: {:.0} messages/s\n",
        r.delivered, r.expected, r.deliver_secs, r.throughput
    ));
    out.push_str(&format!(
        "  latency     p50 {}  p90 {}  p99 {}  max {}  (send to {delivery})\n",
        ms(r.latency.p50),
        ms(r.latency.p90),
        ms(r.latency.p99),
        ms(r.latency.max)
    ));
    if !r.periods.is_empty() {
        out.push_str("  periods     by delivery time, in seconds since the first message:\n");
        for p in &r.periods {
            let cpu = cpu_per(&p.cpu, p.delivered, |n| n != BENCH_PROCESS)
                .map(|us| format!("  servers {us:.1} µs per delivery"))
                .unwrap_or_default();
            let span = format!("{:.1}-{:.1} s", p.from_secs, p.to_secs);
            out.push_str(&format!(
                "    {span:<14} {:>8} delivered  p50 {}  p90 {}  p99 {}  max {}{cpu}\n",
                p.delivered,
                ms(p.latency.p50),
                ms(p.latency.p90),
                ms(p.latency.p99),
                ms(p.latency.max)
            ));
        }
    }
    if r.cpu.is_empty() {
        out.push_str(
            "  cpu         n/a (the servers are not this tool's to measure; --spawn-servers is)\n",
        );
    } else {
        let total: f64 = r.cpu.iter().map(|(_, s)| s).sum();
        let parts: Vec<String> = r.cpu.iter().map(|(n, s)| format!("{n} {s:.2}")).collect();
        out.push_str(&format!(
            "  cpu         {:.2} s in all ({}), {:.1} µs per delivery ({:.1} µs of it servers)\n",
            total,
            parts.join(", "),
            total * 1e6 / r.delivered.max(1) as f64,
            server_cpu_per_delivery(r).unwrap_or(0.0)
        ));
    }
    if !r.switches.is_empty() {
        let total: u64 = r.switches.iter().map(|(_, n)| n).sum();
        let parts: Vec<String> = r.switches.iter().map(|(n, k)| format!("{n} {k}")).collect();
        out.push_str(&format!(
            "  switches    {} context switches in all ({}), {:.2} per delivery ({:.2} of them servers)\n",
            total,
            parts.join(", "),
            total as f64 / r.delivered.max(1) as f64,
            server_switches_per_delivery(r).unwrap_or(0.0)
        ));
    }
    if r.kill_missed {
        out.push_str(
            "  FAILED      the run ended before --kill-server's (or --stop-server's) time: no \
             failover was tested \
             (send more messages, or at a --rate)\n",
        );
    }
    if r.failovers > 0 || r.redelivered > 0 {
        out.push_str(&format!(
            "  failover    {} connections moved to another server; {} messages delivered again under the same id (shown once)\n",
            r.failovers, r.redelivered
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
        "| run | clients | connect time | server threads | server descriptors | server RSS | per client |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    } else {
        "| run | deliveries | delivered/s | p50 | p90 | p99 | max | lost | dup | CPU per delivery | of it, servers | servers' switches per delivery |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    }
}

/// The report as one row of a Markdown table (see [`markdown_header`]).
pub fn markdown_row(label: &str, r: &Report) -> String {
    let ms = |us: u64| format!("{:.2} ms", us as f64 / 1000.0);
    if r.mode == "idle" {
        let sum = |pick: fn(&Usage) -> u64, after: bool| -> f64 {
            r.server_usage
                .iter()
                .map(|(b, a)| pick(if after { a } else { b }))
                .sum::<u64>() as f64
        };
        let n = r.clients.max(1) as f64;
        let per = |pick: fn(&Usage) -> u64| (sum(pick, true) - sum(pick, false)) / n;
        return format!(
            "| {label} | {} | {:.2} s | {} | {} | {:.0} MiB | {:.2} threads, {:.2} descriptors, {:.1} KiB (stack {:.1}) |",
            r.clients,
            r.connect_secs,
            sum(|u| u.threads, true),
            sum(|u| u.fds, true),
            sum(|u| u.rss_kib, true) / 1024.0,
            per(|u| u.threads),
            per(|u| u.fds),
            per(|u| u.rss_kib),
            per(|u| u.stack_kib)
        );
    }
    let us = |v: Option<f64>| v.map_or("n/a".into(), |us| format!("{us:.1} µs"));
    let (cpu, servers) = (us(cpu_per_delivery(r)), us(server_cpu_per_delivery(r)));
    let switches = server_switches_per_delivery(r).map_or("n/a".into(), |n| format!("{n:.2}"));
    format!(
        "| {label} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {cpu} | {servers} | {switches} |",
        r.delivered,
        r.throughput,
        ms(r.latency.p50),
        ms(r.latency.p90),
        ms(r.latency.p99),
        ms(r.latency.max),
        r.lost,
        r.duplicated,
    )
}

/// CPU microseconds per delivery, of every process of the run; `None` when the servers were
/// not spawned by this tool.
fn cpu_per_delivery(r: &Report) -> Option<f64> {
    cpu_of(r, |_| true)
}

/// CPU microseconds per delivery of the chat servers and the balancer alone, without this
/// tool's clients (which do the end-to-end cryptography); `None` as for [`cpu_per_delivery`].
fn server_cpu_per_delivery(r: &Report) -> Option<f64> {
    cpu_of(r, |name| name != BENCH_PROCESS)
}

fn cpu_of(r: &Report, counted: impl Fn(&str) -> bool) -> Option<f64> {
    cpu_per(&r.cpu, r.delivered, counted)
}

/// CPU microseconds per delivery of the processes `counted` picks; `None` without samples.
fn cpu_per(cpu: &[(String, f64)], delivered: u64, counted: impl Fn(&str) -> bool) -> Option<f64> {
    if cpu.is_empty() {
        return None;
    }
    let secs: f64 = cpu.iter().filter(|(n, _)| counted(n)).map(|(_, s)| s).sum();
    Some(secs * 1e6 / delivered.max(1) as f64)
}

/// Context switches per delivery of the servers and the balancer (as for
/// [`server_cpu_per_delivery`]); `None` when the servers were not spawned by this tool.
fn server_switches_per_delivery(r: &Report) -> Option<f64> {
    if r.switches.is_empty() {
        return None;
    }
    let made: u64 = r
        .switches
        .iter()
        .filter(|(n, _)| n != BENCH_PROCESS)
        .map(|(_, k)| k)
        .sum();
    Some(made as f64 / r.delivered.max(1) as f64)
}

/// The report as one JSON object.
pub fn to_json(r: &Report) -> serde_json::Value {
    let switches = (!r.switches.is_empty()).then(|| {
        r.switches
            .iter()
            .map(|(n, k)| (n.clone(), serde_json::json!(k)))
            .collect::<serde_json::Map<_, _>>()
    });
    let mut json = serde_json::json!({
        "mode": r.mode,
        "pattern": (r.mode == "direct").then_some(&r.pattern),
        "opaque": r.opaque,
        "server": r.rival.as_deref().unwrap_or("fastchat"),
        "tls": r.tls,
        "clients": r.clients,
        "messages_per_client": r.messages,
        "size": r.size,
        "window": r.window,
        "threads": r.threads,
        "group_size": r.group_size,
        "rate": r.rate,
        "servers": r.servers,
        "connect_secs": r.connect_secs,
        "connect_failed": r.connect_failed,
        "connect_error": r.connect_error,
        "send_secs": r.send_secs,
        "deliver_secs": r.deliver_secs,
        "expected": r.expected,
        "delivered": r.delivered,
        "lost": r.lost,
        "duplicated": r.duplicated,
        "redelivered": r.redelivered,
        "failovers": r.failovers,
        "kill_missed": r.kill_missed,
        "errors": r.errors,
        "first_error": r.first_error,
        "throughput": r.throughput,
        "latency_us": {
            "p50": r.latency.p50,
            "p90": r.latency.p90,
            "p99": r.latency.p99,
            "max": r.latency.max,
        },
        "cpu_secs": (!r.cpu.is_empty()).then(|| r.cpu.iter().map(|(n, s)| (n.clone(), serde_json::json!(s))).collect::<serde_json::Map<_, _>>()),
        "cpu_us_per_delivery": cpu_per_delivery(r),
        "periods": r.periods.iter().map(|p| serde_json::json!({
            "from_secs": p.from_secs,
            "to_secs": p.to_secs,
            "delivered": p.delivered,
            "latency_us": {
                "p50": p.latency.p50, "p90": p.latency.p90, "p99": p.latency.p99, "max": p.latency.max,
            },
            "cpu_secs": (!p.cpu.is_empty()).then(|| p.cpu.iter().map(|(n, s)| (n.clone(), serde_json::json!(s))).collect::<serde_json::Map<_, _>>()),
            "server_cpu_us_per_delivery": cpu_per(&p.cpu, p.delivered, |n| n != BENCH_PROCESS),
        })).collect::<Vec<_>>(),
        "server_cpu_us_per_delivery": server_cpu_per_delivery(r),
        "server_usage": r.server_usage.iter().map(usage_json).collect::<Vec<_>>(),
    });
    // Set apart: one macro with every key goes past its recursion limit.
    json["switches"] = serde_json::json!(switches);
    json["server_switches_per_delivery"] = serde_json::json!(server_switches_per_delivery(r));
    json["server_cpus"] = serde_json::json!(r.server_cpus);
    json
}

/// A server's usage before and after the run, as JSON.
fn usage_json((b, a): &(Usage, Usage)) -> serde_json::Value {
    serde_json::json!({
        "threads_before": b.threads, "rss_kib_before": b.rss_kib, "fds_before": b.fds,
        "stack_kib_before": b.stack_kib,
        "threads_after": a.threads, "rss_kib_after": a.rss_kib, "fds_after": a.fds,
        "stack_kib_after": a.stack_kib,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bar once waited a minute for a second stop signal after a run that ended short of
    /// its expected deliveries.
    #[test]
    fn the_progress_bar_stops_at_once_after_the_run() {
        let counters = Arc::new(Counters::default());
        counters.delivered.store(5, Ordering::SeqCst);
        let bar = Progress::start_on(Arc::clone(&counters), 10, ProgressDrawTarget::hidden());
        std::thread::sleep(Duration::from_millis(300));
        let (done, stopped) = bounded(1);
        std::thread::spawn(move || {
            bar.stop();
            let _ = done.send(());
        });
        assert!(
            stopped.recv_timeout(Duration::from_secs(10)).is_ok(),
            "stop() returned"
        );
    }

    #[test]
    fn percentiles_pick_ranks() {
        let mut v: Vec<u32> = (1..=100).collect();
        let l = percentiles(&mut v);
        assert_eq!((l.p50, l.p90, l.p99, l.max), (51, 90, 99, 100));
        assert_eq!(percentiles(&mut []), Latency::default());
    }
}
