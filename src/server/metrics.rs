//! `/metrics` of a chat server (`--metrics ADDR`), in the Prometheus text format: its
//! connections and what it has done since it started. Served by `tiny_http` on a thread of
//! its own; read-only, and counts only (no names, no messages).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::Shared;
use crate::error::{Error, Result};

/// Serves `/metrics` on `addr` until the server stops; returns where it listens.
pub fn start(addr: &str, shared: Arc<Shared>) -> Result<SocketAddr> {
    let server = tiny_http::Server::http(addr)
        .map_err(|e| Error::Invalid(format!("cannot serve metrics on {addr}: {e}")))?;
    let bound = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| Error::Invalid(format!("{addr} is not an IP address")))?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            while !shared.stopping.load(Ordering::SeqCst) {
                let request = match server.recv_timeout(Duration::from_millis(200)) {
                    Ok(Some(r)) => r,
                    Ok(None) => continue,
                    Err(e) => {
                        log::warn!("metrics: {e}");
                        std::thread::sleep(Duration::from_millis(200));
                        continue;
                    }
                };
                let (status, body) = match request.url() {
                    "/metrics" => (200, text(&shared)),
                    _ => (404, "not found: /metrics\n".to_string()),
                };
                let header = tiny_http::Header::from_bytes(
                    &b"Content-Type"[..],
                    &b"text/plain; version=0.0.4"[..],
                )
                .expect("a valid header");
                let response = tiny_http::Response::from_string(body)
                    .with_status_code(status)
                    .with_header(header);
                if let Err(e) = request.respond(response) {
                    log::debug!("metrics: {e}");
                }
            }
        })?;
    Ok(bound)
}

/// The metrics, labelled with the server's id.
fn text(shared: &Shared) -> String {
    let counts = shared.counts();
    let id = shared.server_id;
    let rows: [(&str, &str, &str, u64); 6] = [
        (
            "fastchat_server_clients",
            "gauge",
            "Clients connected now.",
            u64::from(shared.clients.load(Ordering::Relaxed)),
        ),
        (
            "fastchat_server_clients_arrived_total",
            "counter",
            "Clients accepted since the start.",
            shared.arrived.load(Ordering::Relaxed),
        ),
        (
            "fastchat_server_messages_stored_total",
            "counter",
            "Messages stored (direct and group).",
            counts.stored,
        ),
        (
            "fastchat_server_messages_delivered_total",
            "counter",
            "Messages handed to this server's clients.",
            counts.delivered,
        ),
        (
            "fastchat_server_messages_relayed_total",
            "counter",
            "Deliveries handed to peer servers for their clients.",
            counts.relayed,
        ),
        (
            "fastchat_server_peers_live",
            "gauge",
            "Other servers the balancer lists as live.",
            shared.live_peers.lock().len() as u64,
        ),
    ];
    let mut out = String::new();
    for (name, kind, help, value) in rows {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{server=\"{id}\"}} {value}\n"
        ));
    }
    let name = "fastchat_server_link_relayed_total";
    out.push_str(&format!(
        "# HELP {name} Deliveries handed to each peer.\n# TYPE {name} counter\n"
    ));
    for (to, n) in shared.counts.relayed_to.lock().iter() {
        out.push_str(&format!("{name}{{server=\"{id}\",to=\"{to}\"}} {n}\n"));
    }
    let w = shared.store.writer_stats();
    for (name, help, value) in [
        (
            "fastchat_server_commits_total",
            "Transactions the writer committed.",
            w.batches.load(Ordering::Relaxed),
        ),
        (
            "fastchat_server_commit_jobs_total",
            "Jobs in them (divided by commits: the mean batch size).",
            w.jobs.load(Ordering::Relaxed),
        ),
    ] {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{server=\"{id}\"}} {value}\n"
        ));
    }
    let name = "fastchat_server_commit_seconds_total";
    out.push_str(&format!(
        "# HELP {name} Time from BEGIN to the end of COMMIT, in all (divided by commits: the mean commit latency).\n# TYPE {name} counter\n{name}{{server=\"{id}\"}} {:.6}\n",
        w.commit_us.load(Ordering::Relaxed) as f64 / 1e6
    ));
    let name = "fastchat_server_refusals_total";
    out.push_str(&format!(
        "# HELP {name} Requests refused, by reason.\n# TYPE {name} counter\n"
    ));
    for (code, n) in shared.counts.refusals.lock().iter() {
        out.push_str(&format!(
            "{name}{{server=\"{id}\",reason=\"{code:?}\"}} {n}\n"
        ));
    }
    out
}
