//! The server's link to the balancer: registration, then a heartbeat every [`HEARTBEAT`] whose
//! reply is the peer list. Reconnects and re-registers (same id, proven by the server's secret)
//! if the balancer restarts.

use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::config::Config;
use super::shared::Shared;
use crate::error::{Error, Result};
use crate::net::ServerInfo;
use crate::net::{BalancerReply, BalancerRequest, FrameReader, FrameWriter, Request, Response};
use crate::transport::dial;

/// How often the load is reported to the balancer.
pub const HEARTBEAT: Duration = Duration::from_millis(500);

/// A connection to the balancer, registered.
pub struct BalancerLink {
    addr: String,
    advertise: String,
    secret: Vec<u8>,
    /// Proves to the balancer that this server can read the cluster's database.
    cluster_key: Vec<u8>,
    /// The id the balancer gave at the last registration.
    pub server_id: u64,
    conn: Option<(FrameReader<TcpStream>, FrameWriter<TcpStream>)>,
    next_id: u64,
}

impl BalancerLink {
    /// Registers, retrying until `startup_timeout`; a refusal is final.
    pub fn connect(
        config: &Config,
        advertise: &str,
        secret: &[u8],
        cluster_key: Vec<u8>,
    ) -> Result<BalancerLink> {
        let mut link = BalancerLink {
            addr: config.balancer.clone(),
            advertise: advertise.to_string(),
            secret: secret.to_vec(),
            cluster_key,
            server_id: 0,
            conn: None,
            next_id: 1,
        };
        let deadline = Instant::now() + config.startup_timeout;
        loop {
            match link.register(None) {
                Ok(()) => return Ok(link),
                Err(e @ Error::Refused { .. }) => return Err(e),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(e) => {
                    log::warn!("balancer {} not reachable yet: {e}", link.addr);
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    /// Sends one request on the open connection and reads its response.
    fn request(&mut self, body: BalancerRequest) -> Result<BalancerReply> {
        let id = self.next_id;
        self.next_id += 1;
        let (r, w) = self
            .conn
            .as_mut()
            .ok_or_else(|| Error::Protocol("not connected to the balancer".into()))?;
        w.send(&Request { id, body })?;
        match r.read::<Response<BalancerReply>>()? {
            Some(response) if response.id == Some(id) || response.id.is_none() => {
                response.into_result()
            }
            Some(other) => Err(Error::Protocol(format!(
                "the balancer answered request {:?}, not {id}",
                other.id
            ))),
            None => Err(Error::Io(std::io::ErrorKind::UnexpectedEof.into())),
        }
    }

    fn register(&mut self, known: Option<u64>) -> Result<()> {
        self.conn = None;
        let stream = dial(&self.addr, "balancer")?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        self.conn = Some((
            FrameReader::new(stream.try_clone()?),
            FrameWriter::new(stream),
        ));
        let reply = self.request(BalancerRequest::Register {
            addr: self.advertise.clone(),
            server_id: known,
            secret: self.secret.clone(),
            cluster_key: self.cluster_key.clone(),
        });
        match reply {
            Ok(BalancerReply::Registered { server_id }) => {
                self.server_id = server_id;
                Ok(())
            }
            Ok(other) => {
                self.conn = None;
                Err(Error::Protocol(format!(
                    "unexpected reply to Register: {other:?}"
                )))
            }
            Err(e) => {
                self.conn = None;
                Err(e)
            }
        }
    }

    fn heartbeat(&mut self, load: u32) -> Result<Vec<ServerInfo>> {
        match self.request(BalancerRequest::Heartbeat { load })? {
            BalancerReply::Peers { peers } => Ok(peers),
            other => Err(Error::Protocol(format!(
                "unexpected reply to Heartbeat: {other:?}"
            ))),
        }
    }

    /// Heartbeats until the server stops.
    pub fn run(mut self, shared: &Shared) {
        let mut lost = false;
        while !shared.stopping.load(Ordering::SeqCst) {
            if self.conn.is_none() {
                match self.register(Some(shared.server_id)) {
                    Ok(()) if self.server_id == shared.server_id => {
                        log::info!(
                            "re-registered with the balancer as server {}",
                            self.server_id
                        );
                        lost = false;
                    }
                    Ok(()) => {
                        log::error!("balancer gave a new id; this server keeps its old one");
                        self.server_id = shared.server_id;
                    }
                    Err(e) => {
                        if !lost {
                            log::warn!("balancer {} unreachable: {e}; retrying", self.addr);
                            lost = true;
                        }
                        self.conn = None;
                    }
                }
            }
            if self.conn.is_some() {
                let load = shared.clients.load(Ordering::SeqCst);
                match self.heartbeat(load) {
                    Ok(peers) => shared.peers.update(&peers),
                    Err(e) => {
                        log::warn!("heartbeat failed: {e}");
                        self.conn = None;
                        continue;
                    }
                }
            }
            // Sleep one period, or less if the server stops meanwhile.
            let _ = shared.stop_signal.recv_timeout(HEARTBEAT);
        }
    }
}
