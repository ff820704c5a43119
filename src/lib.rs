//! fastchat: a multi-server chat system with end-to-end encryption.
//!
//! Synchronous Rust: blocking `std::net` sockets, a thread per connection, crossbeam channels
//! between threads, no async runtime. A **balancer** signs users up, checks passwords, keeps the
//! key directory and the registry of live **chat servers**, and hands each login a session token
//! and a server. Servers store messages (ciphertext only) in one shared SQLite file and relay
//! them to each other over a peer mesh. The **client** encrypts and decrypts; the servers never
//! hold a private key.
//!
//! # Layout
//!
//! * [`net`]: the frame codec and every message of the wire protocol.
//! * [`error`]: the library's error type and exit codes.
//! * [`names`]: the naming rule for users and groups.
//! * [`crypto`]: password hashing, tokens, key pairs, pair keys, AES-GCM, signatures.
//! * [`db`]: the schema, its migrations, the reader pool and the group-commit writer thread.
//! * [`balancer`]: the front door: accounts, sessions, key directory, server registry.
//! * [`server`]: the chat server: accepting, peer links in, the balancer link.
//! * `session`: one client connection on a server: requests, its writer thread, its sync.
//! * [`throttle`]: limits on failed logins and on requests per connection.
//! * [`router`]: a server's map of local users to their connections' outbound queues.
//! * [`peers`]: a server's outbound links to the other servers.
//! * [`client`]: the client library: balancer requests and a chat-server connection.
//! * [`keystore`]: the client's key files and pinned peer keys.
//! * [`e2e`]: message encryption as the client does it: body format, key directory, pinning.
//! * [`files`]: files and images as the client sends and receives them: chunks, safe names.
//! * [`cli`]: the `fastchat` subcommands.
//! * [`mailbox`]: a bounded channel whose consumer sleeps without spinning (the hot queues).
//! * [`logging`]: logging set-up shared by the binaries.
//! * [`launch`]: starting a local cluster (balancer and servers) as child processes.
//! * [`bench`]: the load generator behind `fastchat-bench`.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod balancer;
pub mod bench;
pub mod cli;
pub mod client;
pub mod crypto;
pub mod db;
pub mod e2e;
pub mod error;
pub mod files;
pub mod keystore;
pub mod launch;
pub mod logging;
pub mod mailbox;
pub mod names;
pub mod net;
pub mod peers;
pub mod router;
pub mod server;
mod session;
pub mod throttle;

pub use error::{Error, Result};
