//! The client side: the library a program uses to talk to a fastchat cluster, its end-to-end
//! encryption, its files on disk, and the `fastchat` commands.
//!
//! # Layout
//!
//! * [`balancer`]: [`BalancerClient`], request and reply with the balancer (signup, login,
//!   keys, servers).
//! * [`connection`]: [`Connection`], one chat-server connection, whose one thread owns the
//!   socket.
//! * [`api`]: [`Client`], a logged-in session that survives the loss of its server, with one
//!   typed method per request.
//! * [`e2e`]: message encryption as the client does it: `E2e` (pinning, sessions, opening);
//!   beside it `wire` (body formats, sealing and parsing), `directory` (the key directory) and
//!   `groups` (verified chains, epoch keys, sender keys, sending to a group).
//! * [`keystore`]: the private key files, pinned peer keys, and the sealed state files.
//! * [`prekeys`], [`sessions`], [`sender_keys`]: forward secrecy: the prekeys others start a
//!   conversation with, the double ratchet of each conversation, each group's sender chains.
//! * [`chains`]: the groups' chains of membership changes, as this client verified them.
//! * [`replay`]: the record of messages already shown (replays are refused).
//! * [`history`]: the local history of conversations, encrypted at rest.
//! * [`receipts`]: telling senders their messages were delivered and read.
//! * [`files`]: files and images: chunked encryption, upload, download, safe names.
//! * [`text`]: other people's text made safe to show (controls and format characters
//!   escaped).
//! * [`cli`]: the one-shot `fastchat` subcommands; [`chat`]: the interactive chat;
//!   [`agent`]: the key agent of a kept session (`fastchat login`).

pub mod agent;
pub mod api;
pub mod balancer;
pub mod chains;
pub mod chat;
pub mod cli;
pub mod connection;
pub mod e2e;
pub mod files;
pub mod history;
pub mod keystore;
pub mod prekeys;
pub mod receipts;
pub mod replay;
pub mod sender_keys;
pub mod sessions;
pub mod text;

pub use api::{Client, Event, SealedGroupKey, FAILOVER_LIMIT};
pub use balancer::{BalancerClient, Session};
pub use connection::{wait_reply, Connection, Incoming};
