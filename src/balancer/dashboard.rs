//! The balancer's web dashboard (`--http ADDR`): a live picture of the cluster for a class
//! (servers as boxes with their clients, messages per second, queue depth), `/api/cluster`
//! (the JSON the page polls every second) and `/metrics` (Prometheus text). Metadata only:
//! names, counts and rates, never a message or a key.
//!
//! Synchronous like the rest: `tiny_http` accepts on a thread of its own, and this module
//! answers each request on that thread (the page's requests are small and few). On an
//! address other than loopback every request needs the token (`?token=T`, or
//! `Authorization: Bearer T`), given with `--http-token` or made at start and printed.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;
use serde_json::json;

use super::Shared;
use crate::error::{Error, Result};

/// The page: plain HTML, CSS and JavaScript, shipped in the binary.
const PAGE: &str = include_str!("dashboard.html");

/// What the balancer counts for `/metrics`.
#[derive(Default)]
pub struct Counters {
    /// Logins that succeeded.
    pub logins: std::sync::atomic::AtomicU64,
    /// Logins refused for a wrong name or password.
    pub failed_logins: std::sync::atomic::AtomicU64,
    /// Accounts made.
    pub signups: std::sync::atomic::AtomicU64,
    /// Requests refused, by reason.
    pub refusals: parking_lot::Mutex<std::collections::BTreeMap<crate::net::ErrorCode, u64>>,
}

/// A dashboard being served.
pub struct Dashboard {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The token every request needs, if any.
    pub token: Option<String>,
}

/// Starts serving the dashboard on `addr` until `shutdown` disconnects.
pub(super) fn start(
    addr: &str,
    token: Option<String>,
    shared: Arc<Shared>,
    shutdown: Receiver<()>,
) -> Result<Dashboard> {
    let server = tiny_http::Server::http(addr)
        .map_err(|e| Error::Invalid(format!("cannot serve the dashboard on {addr}: {e}")))?;
    let bound = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| Error::Invalid(format!("{addr} is not an IP address")))?;
    // Anything but loopback is read-only and needs a token: one is made if none was given.
    let token = match token {
        Some(t) => Some(t),
        None if bound.ip().is_loopback() => None,
        None => Some(crate::crypto::new_token()?),
    };
    let wanted = token.clone();
    std::thread::Builder::new()
        .name("dashboard".into())
        .spawn(move || loop {
            if matches!(
                shutdown.try_recv(),
                Err(crossbeam_channel::TryRecvError::Disconnected)
            ) {
                return;
            }
            match server.recv_timeout(Duration::from_millis(200)) {
                Ok(Some(request)) => answer(request, &shared, wanted.as_deref()),
                Ok(None) => {}
                Err(e) => {
                    log::warn!("dashboard: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        })?;
    Ok(Dashboard { addr: bound, token })
}

/// Answers one request.
fn answer(request: tiny_http::Request, shared: &Shared, token: Option<&str>) {
    let url = request.url().to_string();
    let (path, query) = url.split_once('?').unwrap_or((&url, ""));
    let allowed = token.is_none_or(|t| {
        let given = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("token="))
            .map(str::to_string)
            .or_else(|| {
                request
                    .headers()
                    .iter()
                    .find(|h| h.field.equiv("Authorization"))
                    .and_then(|h| h.value.as_str().strip_prefix("Bearer ").map(str::to_string))
            });
        given.is_some_and(|g| {
            crate::crypto::sha256(g.as_bytes()).ok() == crate::crypto::sha256(t.as_bytes()).ok()
        })
    });
    let (status, kind, body) = if !allowed {
        (
            401,
            "text/plain",
            "the dashboard needs its token: ?token=...\n".to_string(),
        )
    } else if *request.method() != tiny_http::Method::Get {
        (405, "text/plain", "read-only: GET only\n".to_string())
    } else {
        match path {
            "/" => (200, "text/html; charset=utf-8", PAGE.to_string()),
            "/api/cluster" => match cluster(shared) {
                Ok(v) => (200, "application/json", v.to_string()),
                Err(e) => (503, "text/plain", format!("{e}\n")),
            },
            "/metrics" => match metrics(shared) {
                Ok(text) => (200, "text/plain; version=0.0.4", text),
                Err(e) => (503, "text/plain", format!("{e}\n")),
            },
            _ => (404, "text/plain", "not found\n".to_string()),
        }
    };
    let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], kind.as_bytes())
        .expect("a valid header");
    let response = tiny_http::Response::from_string(body)
        .with_status_code(status)
        .with_header(header);
    if let Err(e) = request.respond(response) {
        log::debug!("dashboard: {e}");
    }
}

/// The cluster as the page draws it.
fn cluster(shared: &Shared) -> Result<serde_json::Value> {
    let servers = shared
        .registry
        .lock()
        .dashboard(shared.config.server_timeout);
    let online = shared.store.read(|tx| tx.online())?;
    let queued = shared.store.read(|tx| tx.queued_total())?;
    let servers: Vec<serde_json::Value> = servers
        .into_iter()
        .map(|board| {
            let (info, live) = (&board.info, board.live);
            let [stored, delivered, relayed] = board.rates;
            // A server that stopped answering has no clients worth showing: theirs are moving
            // to other servers (its rows are forgotten a little later).
            let users: Vec<&str> = online
                .iter()
                .filter(|r| live && r.server_id == info.id)
                .map(|r| r.user.as_str())
                .collect();
            json!({
                "id": info.id,
                "name": info.name,
                "addr": info.addr,
                "live": live,
                "clients": if live { info.load } else { 0 },
                "users": users,
                "stored_per_s": stored,
                "delivered_per_s": delivered,
                "relayed_per_s": relayed,
                "links": board.links.iter().map(|(to, per_s)| json!({ "to": to, "per_s": per_s })).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(json!({
        "algo": shared.config.algo.to_string(),
        "servers": servers,
        "queued": queued,
        "at": crate::db::now_ms(),
    }))
}

/// The balancer's metrics in the Prometheus text format.
fn metrics(shared: &Shared) -> Result<String> {
    let servers = shared
        .registry
        .lock()
        .dashboard(shared.config.server_timeout);
    let live = servers.iter().filter(|b| b.live).count();
    let clients: u64 = servers
        .iter()
        .filter(|b| b.live)
        .map(|b| u64::from(b.info.load))
        .sum();
    let queued = shared.store.read(|tx| tx.queued_total())?;
    let c = &shared.counters;
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    };
    metric(
        "fastchat_balancer_servers_live",
        "gauge",
        "Chat servers in rotation.",
        live as u64,
    );
    metric(
        "fastchat_balancer_clients",
        "gauge",
        "Clients connected to live servers.",
        clients,
    );
    metric(
        "fastchat_messages_queued",
        "gauge",
        "Messages stored and not yet acknowledged.",
        queued,
    );
    metric(
        "fastchat_balancer_logins_total",
        "counter",
        "Logins that succeeded.",
        c.logins.load(Ordering::Relaxed),
    );
    metric(
        "fastchat_balancer_failed_logins_total",
        "counter",
        "Logins refused for a wrong name or password.",
        c.failed_logins.load(Ordering::Relaxed),
    );
    metric(
        "fastchat_balancer_signups_total",
        "counter",
        "Accounts made.",
        c.signups.load(Ordering::Relaxed),
    );
    let name = "fastchat_balancer_refusals_total";
    out.push_str(&format!(
        "# HELP {name} Requests refused, by reason.\n# TYPE {name} counter\n"
    ));
    for (code, n) in c.refusals.lock().iter() {
        out.push_str(&format!("{name}{{reason=\"{code:?}\"}} {n}\n"));
    }
    Ok(out)
}
