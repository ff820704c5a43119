//! Connecting to another process: one `dial` for every outbound link (client to balancer,
//! client to server, server to balancer, server to server).

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::error::{Error, Result};

/// How long to wait for a TCP connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Connects to `addr` (host:port), trying each address it resolves to; `what` names the other
/// side in the error (`cannot reach balancer at 127.0.0.1:7000: Connection refused`).
pub fn dial(addr: &str, what: &str) -> Result<TcpStream> {
    let unreachable = |source| Error::Unreachable {
        what: format!("{what} at {addr}"),
        source,
    };
    let addrs = addr.to_socket_addrs().map_err(unreachable)?;
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "address resolves to nothing");
    for a in addrs {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(unreachable(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_is_a_clear_error() {
        // Bind then drop, so the port is very likely closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = dial(&format!("127.0.0.1:{port}"), "balancer").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot reach balancer at 127.0.0.1:"),
            "{err}"
        );
        assert_eq!(err.exit_code(), 3);
    }
}
