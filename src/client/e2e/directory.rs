//! The key directory: the balancer, asked for users' keys and prekey bundles.

use crate::client::BalancerClient;
use crate::crypto::x3dh;
use crate::error::Result;
use crate::net::PublicKeys;
use crate::transport::Transport;

/// The key directory (the balancer), asked as a logged-in user and reconnected on demand: a
/// long chat session outlives the balancer's idle timeout.
pub struct Directory {
    addr: String,
    transport: Transport,
    session: crate::client::Session,
    conn: Option<BalancerClient>,
}

impl Directory {
    /// A directory at the balancer `addr`, reached with `transport` and asked as `session`'s
    /// user; `conn` may be an already open connection.
    pub fn new(
        addr: &str,
        transport: &Transport,
        session: &crate::client::Session,
        conn: Option<BalancerClient>,
    ) -> Directory {
        Directory {
            addr: addr.to_string(),
            transport: transport.clone(),
            session: session.clone(),
            conn,
        }
    }

    /// Runs `f` on a connection, reconnecting once if the old one has gone.
    pub fn with<T>(&mut self, mut f: impl FnMut(&mut BalancerClient) -> Result<T>) -> Result<T> {
        if let Some(conn) = self.conn.as_mut() {
            match f(conn) {
                Err(e) if e.is_disconnect() => self.conn = None,
                other => return other,
            }
        }
        let conn = self
            .conn
            .insert(BalancerClient::connect(&self.addr, &self.transport)?);
        f(conn)
    }

    /// A user's keys as the directory has them now.
    pub fn keys(&mut self, name: &str) -> Result<PublicKeys> {
        let session = self.session.clone();
        self.with(|c| c.keys(&session, name))
    }

    /// A user's prekey bundle (taking one of their one-time prekeys), if they published one.
    pub fn bundle(&mut self, name: &str) -> Result<Option<x3dh::Bundle>> {
        let session = self.session.clone();
        self.with(|c| c.bundle(&session, name))
    }
}
