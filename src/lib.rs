//! fastchat: a multi-server chat system with end-to-end encryption.
//!
//! Synchronous Rust: blocking `std::net` sockets, a thread per connection, crossbeam channels
//! between threads, no async runtime. A **balancer** signs users up, checks passwords, keeps the
//! key directory and the registry of live **chat servers**, and hands each login a session token
//! and a server. Servers store messages (ciphertext only) in one shared database (an SQLite
//! file on one machine, PostgreSQL across machines) and relay them to each other over a peer
//! mesh; every link is TLS, and cluster members know each other by certificate. The **client**
//! encrypts and decrypts; the servers never hold a private key.
//!
//! # Layout
//!
//! The tree follows the architecture: shared pieces at the top, then one folder per side.
//! Sides depend on shared pieces, never on each other (the load generator drives the client).
//!
//! Shared:
//! * [`net`]: the frame codec and every message of the wire protocol.
//! * [`error`]: the library's error type, refusal codes and exit codes.
//! * [`names`]: the naming rule for users and groups.
//! * [`crypto`]: password hashing, tokens, key pairs, pair keys, AES-GCM, signatures.
//! * [`membership`]: the rules of groups (who may add, remove, leave; epochs), without I/O.
//! * [`db`]: the storage interface ([`db::Store`], [`db::Tx`]), the group-commit writer, and
//!   its backends (SQLite, PostgreSQL).
//! * [`transport`]: how bytes travel: TLS (certificates, trust, the cluster CA), framed
//!   channels, wakers, and the thread model (one thread owns a connection).
//! * [`listen`]: the accept loop, stopping it, joining connection threads.
//! * [`mailbox`]: a bounded channel whose consumer sleeps without spinning (the hot queues).
//! * [`throttle`]: a token bucket for request rates; log lines that may repeat.
//! * [`capacity`]: how many connections the descriptor limit and thread budget hold.
//! * [`units`]: sizes, durations and moments for people.
//! * [`config`]: `fastchat.toml`, a binary's table turned into flags.
//! * [`startup`]: what every binary does first: logging, Ctrl-C, private files, its transport;
//!   a server's scheduling (batch policy, `--cpus`).
//!
//! Sides:
//! * [`balancer`]: the front door: accounts, sessions, key directory, server registry.
//! * [`server`]: the chat server: sessions, routing, the peer mesh, the balancer link.
//! * [`client`]: the client library, its end-to-end encryption, key files, files, and the
//!   `fastchat` commands.
//! * [`admin`]: the operator's commands behind `fastchat-admin`, on the database (its
//!   announcements are sent by the client, as a user).
//! * [`bench`](mod@bench): the load generator behind `fastchat-bench`, and starting a local cluster.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod balancer;
pub mod bench;
pub mod capacity;
pub mod client;
pub mod config;
pub mod crypto;
pub mod db;
pub mod error;
pub mod freeze;
pub mod listen;
pub mod mailbox;
pub mod membership;
pub mod names;
pub mod net;
pub mod server;
pub mod startup;
pub mod throttle;
pub mod transport;
pub mod units;

pub use error::{Error, Result};
