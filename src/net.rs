//! The wire protocol: frame codec and the message enums of every link.
//!
//! Every link (client to balancer, client to server, server to balancer, server to server) speaks
//! the same framing:
//!
//! ```text
//! +--------------------+--------------------------------------+
//! | length: u32 BE     | body: `length` bytes of MessagePack  |
//! +--------------------+--------------------------------------+
//! ```
//!
//! The body is one value of a closed serde enum, encoded with rmp-serde (structs as arrays).
//! A length over [`MAX_FRAME`] is refused before any allocation; a body that does not decode is
//! refused with [`Error::Malformed`]. Both are answered with an error frame and the connection is
//! closed by the receiving side.
//!
//! What each link carries:
//!
//! ```text
//! client → balancer   Request<BalancerRequest>              ◀ Response<BalancerReply>
//! server → balancer   Request<Register>, then Heartbeats    ◀ Response<BalancerReply>
//! client → server     Greeting::Hello, then Request<ServerRequest>
//!                                                           ◀ ServerEvent: Welcome, Reply,
//!                                                             Deliver, Synced
//! server → server     Greeting::Peer, then PeerMessage      (one direction only)
//! ```
//!
//! A request's id is chosen by its sender; the response names it. Messages pushed by a server
//! (`Deliver`) carry the server's message id, which the client acknowledges.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Largest frame body accepted, in bytes. Message bodies and file chunks are sized well below it.
pub const MAX_FRAME: usize = 1024 * 1024;

/// Largest message body (ciphertext) a client may send in one `Send`.
pub const MAX_BODY: usize = 64 * 1024;

/// Longest password accepted, in bytes.
pub const MAX_PASSWORD: usize = 1024;

/// Shortest password an account may be given (at signup, or by an operator), in characters:
/// the password also encrypts the private keys on the user's disk, where a stolen copy can
/// be guessed at offline. Logins take any length (accounts made before the rule).
pub const MIN_PASSWORD: usize = 8;

/// Why `password` may not be an account's new password (shorter than [`MIN_PASSWORD`]
/// characters, or longer than [`MAX_PASSWORD`] bytes); `None` if it may.
pub fn new_password_problem(password: &str) -> Option<String> {
    if password.chars().count() < MIN_PASSWORD {
        Some(format!(
            "a password must be at least {MIN_PASSWORD} characters long (it also protects \
             your private keys on this machine)"
        ))
    } else if password.len() > MAX_PASSWORD {
        Some(format!("password is longer than {MAX_PASSWORD} bytes"))
    } else {
        None
    }
}

/// Most names in one `Online` reply.
pub const MAX_WHO: usize = 1000;

/// Most changes in one `Changes` reply.
pub const MAX_CHANGES: usize = 256;

/// Plaintext bytes per file chunk; every chunk but the last is exactly this long.
pub const FILE_CHUNK: usize = 256 * 1024;

/// Largest encrypted file chunk: a full chunk plus the AES-GCM nonce and tag.
pub const MAX_CHUNK: usize = FILE_CHUNK + 12 + 16;

/// Default largest file a server accepts, in bytes (64 MiB).
pub const DEFAULT_MAX_FILE: u64 = 64 * 1024 * 1024;

/// The refusal of a direct message (or file) to its own sender: end-to-end sessions are made
/// between two users, so none of the sender's keys would open it. The client says it before
/// sending; the server refuses one all the same.
pub const TO_YOURSELF: &str = "you cannot send a message to yourself";

/// How many chunks a file of `size` bytes has.
pub fn chunk_count(size: u64) -> u64 {
    size.div_ceil(FILE_CHUNK as u64)
}

pub use crate::error::ErrorCode;

/// A request and the id its response will carry.
///
/// ```text
/// Request  = [id: u64, body]
/// Response = [id: u64 or nil, {"Ok": reply} or {"Err": [code, message]}]
/// ```
///
/// The id is chosen by the sender of the request (unique among its requests in flight on the
/// connection); a response with no id is about the connection itself, which is closed after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request<T> {
    /// Chosen by the requester; the response names it.
    pub id: u64,
    /// What is asked.
    pub body: T,
}

/// The answer to a [`Request`], or a refusal of the whole connection (`id: None`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response<T> {
    /// The request answered; `None` when the connection itself is refused (a bad frame, a
    /// bad token), just before it closes.
    pub id: Option<u64>,
    /// The reply, or why the request was refused.
    pub result: std::result::Result<T, Refusal>,
}

impl<T> Response<T> {
    /// A refusal of request `id` (or of the connection, for `None`).
    pub fn refused(id: Option<u64>, code: ErrorCode, message: impl Into<String>) -> Response<T> {
        Response {
            id,
            result: Err(Refusal {
                code,
                message: message.into(),
            }),
        }
    }

    /// The reply, with a refusal turned into [`Error::Refused`].
    pub fn into_result(self) -> Result<T> {
        self.result.map_err(Error::from)
    }
}

/// Why a request (or a connection) was refused: a code for programs, a line for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// Machine-readable reason.
    pub code: ErrorCode,
    /// Human-readable reason, one line.
    pub message: String,
}

impl From<Refusal> for Error {
    fn from(r: Refusal) -> Error {
        Error::Refused {
            code: r.code,
            message: r.message,
        }
    }
}

/// A user's public keys, as uploaded at signup and served by the directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicKeys {
    /// Raw 32-byte X25519 public key (key agreement).
    #[serde(with = "serde_bytes")]
    pub x25519: Vec<u8>,
    /// Raw 32-byte Ed25519 public key (signatures).
    #[serde(with = "serde_bytes")]
    pub ed25519: Vec<u8>,
}

/// A chat server as the balancer knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    /// Stable id assigned by the balancer at first registration.
    pub id: u64,
    /// Its name in the cluster: the name in its certificate, which a client checks.
    pub name: String,
    /// Address clients and peers connect to.
    pub addr: String,
    /// Connected clients at the last report.
    pub load: u32,
}

/// Requests to the balancer (in a [`Request`]), from clients and from chat servers; each is
/// answered with a [`Response`] of a [`BalancerReply`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BalancerRequest {
    /// Create an account (`Ok`). `keys` are the user's public keys for the directory.
    Signup {
        /// Requested user name.
        name: String,
        /// Password (hashed by the balancer, never stored).
        password: String,
        /// Public keys for the key directory.
        keys: PublicKeys,
        /// The first prekeys (checked as `Prekeys` checks them, stored with the account), so
        /// that others can start a conversation before the user first logs in.
        #[serde(default)]
        prekeys: Option<NewPrekeys>,
    },
    /// Check a password and get a session token plus a chat server (`LoggedIn`).
    Login {
        /// User name.
        name: String,
        /// Password.
        password: String,
        /// The public half (32-byte Ed25519) of a key pair the client made for this session:
        /// the token works only with a proof made with it (see [`Greeting::Hello`]).
        #[serde(with = "serde_bytes")]
        session_key: Vec<u8>,
    },
    /// With a still-valid token, get a (possibly different) chat server (`LoggedIn`): used
    /// after failover.
    Resume {
        /// The session token from `LoggedIn`.
        token: String,
        /// The session key's proof for this connection (see [`Greeting::Hello`]).
        #[serde(with = "serde_bytes")]
        proof: Vec<u8>,
        /// A server that just failed for this client: not chosen unless it is the only one.
        avoid: Option<u64>,
    },
    /// End a session (`Ok`): its token is refused from now on, and every connection that
    /// uses it is closed, on every server.
    Logout {
        /// The session token.
        token: String,
        /// The session key's proof for this connection.
        #[serde(with = "serde_bytes")]
        proof: Vec<u8>,
    },
    /// List the live chat servers (`Servers`).
    Servers,
    /// Look up a user's public keys (`Keys`): for a logged-in user only, so that the
    /// directory does not tell strangers which names exist.
    Keys {
        /// Whose keys.
        name: String,
        /// The asker's session token.
        token: String,
        /// The session key's proof for this connection.
        #[serde(with = "serde_bytes")]
        proof: Vec<u8>,
    },
    /// A chat server announces itself (`Registered`; first request of a server's link). With
    /// TLS only a connection that presented a `server` certificate of the cluster may
    /// register, under the name in that certificate; the server's id stays with its name.
    Register {
        /// Address clients and peers should use.
        addr: String,
        /// Its name (with TLS, it must be the one its certificate states).
        name: String,
    },
    /// A registered server reports its load (`Peers`: its live peers).
    Heartbeat {
        /// Connected clients.
        load: u32,
        /// Clients arrived in all since the server started (so that the balancer knows
        /// which logins it assigned have connected).
        arrived: u64,
        /// What the server has done since it started (for the dashboard's rates).
        counts: Counts,
    },
    /// Replace the caller's public keys (`Ok`): allowed once after an operator reset the
    /// password or made the account without keys (`fastchat-admin`), refused otherwise, so
    /// that a stolen password alone cannot swap a user's keys.
    SetKeys {
        /// The session token.
        token: String,
        /// The session key's proof for this connection.
        #[serde(with = "serde_bytes")]
        proof: Vec<u8>,
        /// The new public keys.
        keys: PublicKeys,
    },
    /// Publish prekeys for the asynchronous key agreement (`Prekeys`: how many one-time
    /// prekeys the directory now holds for the caller). `signed`, if given, replaces the
    /// caller's signed prekey (its signature is checked against the caller's identity key);
    /// `one_time` are added (ids unique per user, at most [`PREKEYS_PER_REQUEST`] at once and
    /// [`MAX_ONE_TIME_PREKEYS`] kept). With neither, it only counts.
    Prekeys {
        /// The session token.
        token: String,
        /// The session key's proof for this connection.
        #[serde(with = "serde_bytes")]
        proof: Vec<u8>,
        /// A new signed prekey.
        signed: Option<SignedPrekey>,
        /// New one-time prekeys: (id, X25519 public key).
        one_time: Vec<(u32, serde_bytes::ByteBuf)>,
    },
    /// Get a user's prekey bundle (`Bundle`), for a logged-in user only. The directory hands
    /// out each one-time prekey once: it is deleted as it is handed out.
    Bundle {
        /// Whose bundle.
        name: String,
        /// The asker's session token.
        token: String,
        /// The session key's proof for this connection.
        #[serde(with = "serde_bytes")]
        proof: Vec<u8>,
    },
}

/// The most one-time prekeys the directory keeps for one user.
pub const MAX_ONE_TIME_PREKEYS: usize = 200;

/// The most one-time prekeys one `Prekeys` request carries (a request to the balancer is at
/// most 4 KiB).
pub const PREKEYS_PER_REQUEST: usize = 64;

/// Prekeys published with a signup: a signed prekey and one-time prekeys (id, X25519 public
/// key), at most [`PREKEYS_PER_REQUEST`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewPrekeys {
    /// The signed prekey.
    pub signed: SignedPrekey,
    /// One-time prekeys.
    pub one_time: Vec<(u32, serde_bytes::ByteBuf)>,
}

/// A signed prekey as published: its id, its X25519 public key, and the Ed25519 signature of
/// `crypto::x3dh::signed_prekey_message(id, public)` by the owner's identity key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedPrekey {
    /// Its id (the owner's choice; a new one replaces the old).
    pub id: u32,
    /// The X25519 public key.
    #[serde(with = "serde_bytes")]
    pub public: Vec<u8>,
    /// The owner's signature.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// What a chat server has done since it started, reported with each heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Messages stored (direct and group).
    pub stored: u64,
    /// Deliveries to this server's clients.
    pub delivered: u64,
    /// Deliveries handed to peer links, for their clients.
    pub relayed: u64,
    /// The same, by peer: (server id, deliveries).
    pub links: Vec<(u64, u64)>,
}

/// Replies from the balancer, inside a [`Response`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BalancerReply {
    /// The request succeeded and has nothing else to say.
    Ok,
    /// Login or resume succeeded.
    LoggedIn {
        /// The user name, as registered.
        user: String,
        /// Session token to present to the chat server in `Hello`.
        token: String,
        /// The chat server assigned to this session.
        server: ServerInfo,
    },
    /// The live chat servers.
    Servers {
        /// Live servers, by id.
        servers: Vec<ServerInfo>,
    },
    /// A user's public keys.
    Keys {
        /// Whose keys.
        name: String,
        /// The keys.
        keys: PublicKeys,
    },
    /// Registration accepted.
    Registered {
        /// The server's id.
        server_id: u64,
    },
    /// Heartbeat accepted; these are the other live servers.
    Peers {
        /// Live servers other than the caller.
        peers: Vec<ServerInfo>,
    },
    /// Prekeys stored: how many one-time prekeys the directory holds for the caller.
    Prekeys {
        /// One-time prekeys left.
        one_time: u32,
    },
    /// A user's prekey bundle; `None` if they have published none yet.
    Bundle {
        /// Whose.
        name: String,
        /// The bundle (with one one-time prekey while any are left).
        bundle: Option<crate::crypto::x3dh::Bundle>,
    },
}

/// A stored message as delivered to its recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Server message id: unique, never reused, increasing in commit order.
    pub id: i64,
    /// Sender (taken from the sender's session, never from the request).
    pub from: String,
    /// Recipient of a direct message; empty for a group message.
    pub to: String,
    /// The group of a group message.
    pub group: Option<String>,
    /// The sender's id for this message, unique per sender (idempotent re-sends).
    pub client_id: u64,
    /// Opaque body: ciphertext produced by the sender's client.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// When the server stored it, Unix milliseconds.
    pub sent_at: i64,
}

/// A group key wrapped for one member (sealed under the pair key of wrapper and member).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey {
    /// Who can unwrap it.
    pub member: String,
    /// The sealed key.
    #[serde(with = "serde_bytes")]
    pub wrapped: Vec<u8>,
}

/// What a membership change does (see [`crate::membership`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// The group begins, with its creator as admin and only member.
    Create,
    /// The admin adds a user.
    Add(String),
    /// The admin removes a member.
    Remove(String),
    /// The signer leaves.
    Leave,
    /// The signer has new keys (`fastchat rekey`), and names its Ed25519 public key before
    /// them: the changes it signed before this one are checked with that key. Members stay;
    /// the new epoch is keyed by the signer, with its new keys.
    KeyChange(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// One change of a group's membership: a link of the group's chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The group.
    pub group: String,
    /// Its place in the chain, from 1 (the creation); also the key epoch it starts.
    pub seq: u64,
    /// The hash of the previous change ([`crate::membership::hash`]); empty for the creation.
    #[serde(with = "serde_bytes")]
    pub prev: Vec<u8>,
    /// Who makes it, and signs it.
    pub by: String,
    /// What it does.
    pub action: Action,
}

/// A [`Change`] with its maker's Ed25519 signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedChange {
    /// The change.
    pub change: Change,
    /// Ed25519 signature of [`crate::membership::signed_bytes`] by `change.by`.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// A group as a member sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfo {
    /// Group name.
    pub name: String,
    /// The admin.
    pub admin: String,
    /// Members, longest-standing first (the admin among them).
    pub members: Vec<String>,
    /// Current key epoch.
    pub epoch: u64,
    /// Whether the current epoch has keys yet (false right after a member left).
    pub keyed: bool,
}

/// The first frame on a chat server's port: who is connecting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Greeting {
    /// A client, with the session token the balancer gave it; answered with
    /// [`ServerEvent::Welcome`], then the client sends [`Request`]s of [`ServerRequest`]s.
    Hello {
        /// Session token from the balancer.
        token: String,
        /// The signature, with the session's key, of this TLS connection's binding (keying
        /// material that only its two ends can derive): the token is refused on any other
        /// connection, and from anyone without the key. Empty without TLS.
        #[serde(with = "serde_bytes")]
        proof: Vec<u8>,
    },
    /// Another chat server opening its link to this one; then it sends [`PeerMessage`]s.
    /// With TLS the link's certificate must be that server's.
    Peer {
        /// The sending server's id.
        server_id: u64,
    },
}

/// A message as its sender submits it, in `Send` and `GroupSend`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewMessage {
    /// Sender-chosen id, unique per sender; a re-send with the same id is not stored twice.
    pub client_id: u64,
    /// Ciphertext.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// A completed upload this message offers (the body holds its key and name).
    pub file: Option<i64>,
    /// Set on a re-send after a lost connection: a message id the original (if it was stored
    /// at all) is newer than, so the server can tell whether it was already stored, or even
    /// delivered and removed. `None` on a first attempt.
    pub resend_after: Option<i64>,
    /// The sender does not wait on this message's `Stored`: the server may send it with the
    /// next thing it sends this client (within 10 ms), instead of waking for it alone. A
    /// client sets it while it can send on without the reply (its window has room); one that
    /// waits for it (one message, a window of one) leaves it unset. Last, and `false` when
    /// absent.
    #[serde(default)]
    pub patient: bool,
}

/// Requests of a logged-in client to its chat server (in a [`Request`]); each is answered
/// with a [`ServerEvent::Reply`] naming the reply shown here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerRequest {
    /// Store a message for `to` and deliver it when possible (`Stored`).
    Send {
        /// Recipient.
        to: String,
        /// The message.
        message: NewMessage,
    },
    /// The client has shown these messages: remove them from its queue (`Done`).
    Ack {
        /// Server message ids.
        msg_ids: Vec<i64>,
        /// No `Done` when it worked (a refusal still answers): for a client that only needs
        /// its messages gone eventually (a redelivered one is recognised anyway), each
        /// acknowledgement then costs the server no reply, and both ends a wake-up.
        #[serde(default)]
        quiet: bool,
    },
    /// Change a group's membership: create it, add or remove a member (the admin), or leave
    /// it. The change must be signed by the caller and follow the group's chain (see
    /// [`crate::membership`]); it starts key epoch `change.seq`, whose key comes wrapped in
    /// `keys` for every member after the change (none for a leave: the next member to send
    /// keys it). Every member is then sent the change, as a group message from the caller
    /// with `client_id` (`Stored`; `Done` when the last member left and the group is gone).
    GroupChange {
        /// The signed change.
        change: SignedChange,
        /// The new epoch's key, wrapped for each member.
        keys: Vec<WrappedKey>,
        /// The caller's id for the message announcing the change.
        client_id: u64,
    },
    /// The changes of a group's chain after `after` (members only; `Changes`), at most
    /// [`MAX_CHANGES`] at a time.
    GroupLog {
        /// Group name.
        group: String,
        /// The last change the caller has.
        after: u64,
    },
    /// Any member: provide the keys of the current epoch when it has none yet (`Done`).
    GroupRekey {
        /// Group name.
        group: String,
        /// The current epoch.
        epoch: u64,
        /// The key, wrapped for each member.
        keys: Vec<WrappedKey>,
    },
    /// Send to every other member (`Stored`).
    GroupSend {
        /// Group name.
        group: String,
        /// The epoch whose key sealed the body (must be the current one).
        epoch: u64,
        /// The message: ciphertext and signature.
        message: NewMessage,
    },
    /// Start uploading an encrypted file of `size` plaintext bytes in `chunks` chunks of
    /// [`FILE_CHUNK`] (`Upload`). An upload not offered by a `Send` or `GroupSend` before its
    /// connection ends is deleted.
    FileBegin {
        /// Plaintext size, checked against the server's limit.
        size: u64,
        /// Number of chunks: `size` divided by [`FILE_CHUNK`], rounded up.
        chunks: u64,
    },
    /// One encrypted chunk of an upload (`Done` once committed).
    FileChunk {
        /// The upload, from `Upload`.
        upload: i64,
        /// Chunk number, from 0.
        index: u64,
        /// Ciphertext, at most [`MAX_CHUNK`] bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// One chunk of the file offered by a message queued for the caller (`FileData`).
    FileGet {
        /// The message that offers the file.
        msg_id: i64,
        /// Chunk number, from 0.
        index: u64,
    },
    /// The caller's groups (`Groups`).
    GroupList,
    /// Who is online, on any live server (`Online`).
    Who,
    /// Whether the server still answers (`Done`, at once, from the connection's own thread):
    /// a client that has heard nothing for a while asks, and leaves a server that is stopped
    /// (its socket open, nothing answering) for another.
    Ping,
    /// Tell this connection when any of `users` comes online or goes offline
    /// ([`ServerEvent::Presence`]; at most [`MAX_WHO`] names; replaces the set given before;
    /// `Done`). Each newly watched user is told at once, online or not.
    Watch {
        /// The users to watch.
        users: Vec<String>,
    },
    /// One group's admin, members and epoch (members only; `Group`).
    GroupInfo {
        /// Group name.
        group: String,
    },
    /// The caller's wrapped key for one epoch of a group (members only; `GroupKey`).
    GroupKey {
        /// Group name.
        group: String,
        /// Which epoch.
        epoch: u64,
    },
}

/// Replies of a chat server to a client's requests, inside a [`Response`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerReply {
    /// The request succeeded and has nothing else to say.
    Done,
    /// The message is committed to the database.
    Stored {
        /// Server message id.
        msg_id: i64,
    },
    /// The caller's groups.
    Groups {
        /// Groups, by name.
        groups: Vec<GroupInfo>,
    },
    /// Changes of a group's chain, in order.
    Changes {
        /// The changes.
        changes: Vec<SignedChange>,
    },
    /// One group.
    Group {
        /// The group.
        group: GroupInfo,
    },
    /// The users connected to any server now, by name (at most [`MAX_WHO`]).
    Online {
        /// Names.
        users: Vec<String>,
    },
    /// An upload has started.
    Upload {
        /// The upload's id, for `FileChunk` and the offering `Send`.
        upload: i64,
    },
    /// One encrypted file chunk.
    FileData {
        /// Ciphertext.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// A wrapped group key.
    GroupKey {
        /// Who wrapped it (unwrap with the pair key shared with them).
        wrapped_by: String,
        /// The wrapped key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
}

/// What the server said hello with: who the token says the client is, and this server's facts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// Who the token says we are.
    pub user: String,
    /// This server's id.
    pub server_id: u64,
    /// The largest file this server accepts, in bytes.
    pub max_file: u64,
    /// The newest message id assigned so far: anything the client sends from now on gets
    /// a larger one (the lower bound of a later `resend_after`).
    pub newest: i64,
}

/// Frames from a chat server to a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerEvent {
    /// `Hello` accepted: the first frame of a session.
    Welcome(Welcome),
    /// The response to a request (or, with no id, the refusal of the connection, which
    /// then closes).
    Reply(Response<ServerReply>),
    /// A message for this client; acknowledge it with `Ack`.
    Deliver {
        /// The message (shared with the other queues it is in, not copied).
        msg: Arc<Envelope>,
    },
    /// Everything that was queued at login has been delivered; what follows is live.
    Synced,
    /// A watched user (see [`ServerRequest::Watch`]) came online or went offline.
    Presence {
        /// Who.
        user: String,
        /// Online now (on some live server), or not.
        online: bool,
    },
}

impl ServerEvent {
    /// The refusal of a request, or of the connection (`id: None`).
    pub fn refused(id: Option<u64>, code: ErrorCode, message: impl Into<String>) -> ServerEvent {
        ServerEvent::Reply(Response::refused(id, code, message))
    }

    /// A successful reply to request `id`.
    pub fn reply(id: u64, reply: ServerReply) -> ServerEvent {
        ServerEvent::Reply(Response {
            id: Some(id),
            result: Ok(reply),
        })
    }
}

/// Frames on a peer link, from the server that opened it (after [`Greeting::Peer`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PeerMessage {
    /// A stored message for users connected to the receiving server.
    Relay {
        /// The message, already committed by the sending server (shared, not copied, by the
        /// queues it passes through).
        msg: Arc<Envelope>,
        /// Its recipients on the receiving server.
        users: Vec<String>,
    },
}

/// Reads frames from a byte stream, reusing one buffer.
pub struct FrameReader<R> {
    inner: BufReader<R>,
    buf: Vec<u8>,
}

impl<R: Read> FrameReader<R> {
    /// Wraps a stream.
    pub fn new(inner: R) -> FrameReader<R> {
        FrameReader {
            inner: BufReader::with_capacity(64 * 1024, inner),
            buf: Vec::new(),
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &R {
        self.inner.get_ref()
    }

    /// The body of the last frame read, whether or not it decoded (to tell a peer what it
    /// sent instead of what was expected).
    pub fn body(&self) -> &[u8] {
        &self.buf
    }

    /// Bytes already read from the stream but not yet returned as frames: when 0, the next
    /// `read` will wait for the peer.
    pub fn buffered(&self) -> usize {
        self.inner.buffer().len()
    }

    /// Reads one frame. `Ok(None)` is a clean close between frames; a close inside a frame is an
    /// `UnexpectedEof` error. The length is checked before any allocation.
    pub fn read<T: DeserializeOwned>(&mut self) -> Result<Option<T>> {
        self.read_max(MAX_FRAME)
    }

    /// Like [`FrameReader::read`], refusing frames over `max` bytes (a first frame, which
    /// should be small, need not be allowed the full [`MAX_FRAME`]).
    pub fn read_max<T: DeserializeOwned>(&mut self, max: usize) -> Result<Option<T>> {
        let mut len = [0u8; 4];
        if !read_exact_or_eof(&mut self.inner, &mut len)? {
            return Ok(None);
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > max.min(MAX_FRAME) {
            return Err(Error::FrameTooLarge {
                len,
                max: max.min(MAX_FRAME),
            });
        }
        // The buffer grows as bytes arrive: a peer that announces a large frame and sends
        // little costs what it sent.
        self.buf.clear();
        let got = (&mut self.inner)
            .take(len as u64)
            .read_to_end(&mut self.buf)?;
        if got < len {
            return Err(Error::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        decode(&self.buf).map(Some)
    }
}

/// Like `read_exact`, but a clean EOF before the first byte returns `false`.
fn read_exact_or_eof(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Decodes a frame body.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    rmp_serde::from_slice(body).map_err(|e| Error::Malformed(e.to_string()))
}

/// Encodes a body (no length prefix).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>> {
    rmp_serde::to_vec(msg).map_err(|e| Error::Malformed(e.to_string()))
}

/// Encodes one frame (length prefix and body) onto the end of `out`.
pub fn encode_into<T: Serialize>(out: &mut Vec<u8>, msg: &T) -> Result<()> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    rmp_serde::encode::write(out, msg).map_err(|e| Error::Malformed(e.to_string()))?;
    let len = out.len() - start - 4;
    if len > MAX_FRAME {
        out.truncate(start);
        return Err(Error::FrameTooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Writes frames to a byte stream through a buffer; call [`FrameWriter::flush`] to send.
///
/// Writers that drain a queue write every queued frame and flush once, so many small frames go
/// out in one system call.
pub struct FrameWriter<W: Write> {
    inner: BufWriter<W>,
    scratch: Vec<u8>,
}

impl<W: Write> FrameWriter<W> {
    /// Wraps a stream.
    pub fn new(inner: W) -> FrameWriter<W> {
        FrameWriter {
            inner: BufWriter::with_capacity(64 * 1024, inner),
            scratch: Vec::new(),
        }
    }

    /// Buffers one frame.
    pub fn write<T: Serialize>(&mut self, msg: &T) -> Result<()> {
        self.scratch.clear();
        encode_into(&mut self.scratch, msg)?;
        self.inner.write_all(&self.scratch)?;
        Ok(())
    }

    /// Sends everything buffered.
    pub fn flush(&mut self) -> Result<()> {
        self.inner.flush()?;
        Ok(())
    }

    /// Buffers one frame and sends it.
    pub fn send<T: Serialize>(&mut self, msg: &T) -> Result<()> {
        self.write(msg)?;
        self.flush()
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &W {
        self.inner.get_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message from a client that predates `patient` (four fields) reads as not patient,
    /// and a patient one keeps its flag.
    #[test]
    fn a_message_without_the_patient_flag_is_not_patient() {
        #[derive(Serialize)]
        struct Before {
            client_id: u64,
            #[serde(with = "serde_bytes")]
            body: Vec<u8>,
            file: Option<i64>,
            resend_after: Option<i64>,
        }
        let old = Before {
            client_id: 3,
            body: b"x".to_vec(),
            file: None,
            resend_after: Some(9),
        };
        let read: NewMessage = rmp_serde::from_slice(&rmp_serde::to_vec(&old).unwrap()).unwrap();
        assert_eq!(
            (read.client_id, read.resend_after, read.patient),
            (3, Some(9), false)
        );
        let patient = NewMessage {
            patient: true,
            ..read
        };
        roundtrip(patient);
    }

    fn roundtrip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(v: T) {
        let mut bytes = Vec::new();
        encode_into(&mut bytes, &v).unwrap();
        let mut r = FrameReader::new(&bytes[..]);
        assert_eq!(r.read::<T>().unwrap(), Some(v));
        assert!(
            r.read::<T>().unwrap().is_none(),
            "clean EOF after the frame"
        );
    }

    fn envelope() -> Envelope {
        Envelope {
            id: 42,
            from: "alice".into(),
            to: "bob".into(),
            group: Some("team".into()),
            client_id: u64::MAX,
            body: vec![0, 1, 2, 255],
            sent_at: 1_700_000_000_000,
        }
    }

    fn request<T>(id: u64, body: T) -> Request<T> {
        Request { id, body }
    }

    #[test]
    fn every_message_kind_roundtrips() {
        roundtrip(request(
            1,
            BalancerRequest::Signup {
                name: "alice".into(),
                password: "pw".into(),
                keys: PublicKeys {
                    x25519: vec![1; 32],
                    ed25519: vec![2; 32],
                },
                prekeys: Some(NewPrekeys {
                    signed: SignedPrekey {
                        id: 1,
                        public: vec![3; 32],
                        signature: vec![4; 64],
                    },
                    one_time: vec![(2, serde_bytes::ByteBuf::from(vec![5; 32]))],
                }),
            },
        ));
        roundtrip(request(
            2,
            BalancerRequest::Register {
                addr: "127.0.0.1:1".into(),
                name: "server-3".into(),
            },
        ));
        roundtrip(request(3, BalancerRequest::Servers));
        roundtrip(Response::<BalancerReply>::refused(
            None,
            ErrorCode::InvalidCredentials,
            "invalid username or password",
        ));
        roundtrip(Response {
            id: Some(7),
            result: Ok(BalancerReply::Peers {
                peers: vec![ServerInfo {
                    id: 1,
                    name: "server-1".into(),
                    addr: "127.0.0.1:9".into(),
                    load: 3,
                }],
            }),
        });
        roundtrip(Greeting::Hello {
            token: "t".repeat(64),
            proof: vec![7; 64],
        });
        roundtrip(Greeting::Peer { server_id: 4 });
        roundtrip(request(
            3,
            ServerRequest::Send {
                to: "bob".into(),
                message: NewMessage {
                    client_id: 99,
                    body: b"hi".to_vec(),
                    file: Some(12),
                    resend_after: Some(40),
                    patient: false,
                },
            },
        ));
        roundtrip(request(
            4,
            ServerRequest::FileChunk {
                upload: 12,
                index: 3,
                data: vec![9; MAX_CHUNK],
            },
        ));
        roundtrip(request(5, ServerRequest::Who));
        roundtrip(request(6, ServerRequest::Ping));
        roundtrip(ServerEvent::reply(
            5,
            ServerReply::FileData { data: vec![1; 100] },
        ));
        roundtrip(PeerMessage::Relay {
            msg: Arc::new(envelope()),
            users: vec!["bob".into()],
        });
        roundtrip(request(
            4,
            ServerRequest::GroupChange {
                change: SignedChange {
                    change: Change {
                        group: "alice/team".into(),
                        seq: 2,
                        prev: vec![3; 32],
                        by: "alice".into(),
                        action: Action::Remove("carol".into()),
                    },
                    signature: vec![9; 64],
                },
                keys: vec![WrappedKey {
                    member: "alice".into(),
                    wrapped: vec![7; 60],
                }],
                client_id: 77,
            },
        ));
        roundtrip(ServerEvent::Welcome(Welcome {
            user: "alice".into(),
            server_id: 2,
            max_file: 1 << 20,
            newest: -1,
        }));
        roundtrip(ServerEvent::refused(
            Some(9),
            ErrorCode::Conflict,
            "moved on",
        ));
        roundtrip(ServerEvent::Deliver {
            msg: Arc::new(envelope()),
        });
        roundtrip(ServerEvent::Synced);
    }

    #[test]
    fn a_refusal_becomes_a_refused_error() {
        let r = Response::<ServerReply>::refused(Some(1), ErrorCode::NotAllowed, "admin only");
        match r.into_result() {
            Err(Error::Refused { code, message }) => {
                assert_eq!(code, ErrorCode::NotAllowed);
                assert_eq!(message, "admin only");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn several_frames_in_one_stream() {
        let mut bytes = Vec::new();
        let mut w = FrameWriter::new(&mut bytes);
        for i in 0..3 {
            w.write(&ServerEvent::reply(i, ServerReply::Done)).unwrap();
        }
        w.flush().unwrap();
        drop(w);
        let mut r = FrameReader::new(&bytes[..]);
        for i in 0..3 {
            assert_eq!(
                r.read::<ServerEvent>().unwrap(),
                Some(ServerEvent::reply(i, ServerReply::Done))
            );
        }
        assert_eq!(r.read::<ServerEvent>().unwrap(), None);
    }

    #[test]
    fn oversize_length_is_refused_before_allocating() {
        let bytes = (u32::MAX).to_be_bytes();
        let mut r = FrameReader::new(&bytes[..]);
        match r.read::<Request<ServerRequest>>() {
            Err(Error::FrameTooLarge { len, max }) => {
                assert_eq!((len, max), (u32::MAX as usize, MAX_FRAME))
            }
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
    }

    #[test]
    fn a_large_announced_frame_costs_only_what_arrives() {
        let mut bytes = ((MAX_FRAME - 1) as u32).to_be_bytes().to_vec();
        bytes.push(0x90);
        let mut r = FrameReader::new(&bytes[..]);
        assert!(r.read::<PeerMessage>().is_err(), "cut short");
        assert_eq!(r.body().len(), 1);
        assert!(r.buf.capacity() < 64 * 1024, "{}", r.buf.capacity());
    }

    #[test]
    fn garbage_body_is_malformed() {
        let mut bytes = 5u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0xc1, 0xff, 0x00, 0x13, 0x37]);
        let mut r = FrameReader::new(&bytes[..]);
        assert!(matches!(
            r.read::<Request<ServerRequest>>(),
            Err(Error::Malformed(_))
        ));
    }

    #[test]
    fn valid_msgpack_of_the_wrong_shape_is_malformed() {
        let mut bytes = Vec::new();
        encode_into(&mut bytes, &request(1, BalancerReply::Ok)).unwrap();
        let mut r = FrameReader::new(&bytes[..]);
        assert!(matches!(
            r.read::<Request<ServerRequest>>(),
            Err(Error::Malformed(_))
        ));
    }

    #[test]
    fn truncated_frame_is_an_eof_error_not_a_clean_close() {
        let mut bytes = Vec::new();
        encode_into(
            &mut bytes,
            &PeerMessage::Relay {
                msg: Arc::new(envelope()),
                users: vec![],
            },
        )
        .unwrap();
        for cut in [1, 3, 4, 10, bytes.len() - 1] {
            let mut r = FrameReader::new(&bytes[..cut]);
            match r.read::<PeerMessage>() {
                Err(Error::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof),
                other => panic!("cut at {cut}: expected EOF error, got {other:?}"),
            }
        }
    }

    #[test]
    fn huge_collection_header_inside_a_small_frame_does_not_allocate_wildly() {
        // [id 1, {"Send": an array header claiming 2^32-1 elements}], then nothing: must
        // fail, not run out of memory.
        let body = [
            0x92, 0x01, 0x81, 0xa4, b'S', b'e', b'n', b'd', 0xdd, 0xff, 0xff, 0xff, 0xff,
        ];
        let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&body);
        let mut r = FrameReader::new(&bytes[..]);
        assert!(r.read::<Request<ServerRequest>>().is_err());
    }

    #[test]
    fn random_bytes_never_panic() {
        // A small deterministic generator; tests/fuzz.rs mutates real frames of every kind.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 64) as usize;
            let mut body = Vec::with_capacity(len);
            let mut y = x;
            for _ in 0..len {
                y = y.wrapping_mul(6364136223846793005).wrapping_add(1);
                body.push((y >> 56) as u8);
            }
            let _ = decode::<Request<ServerRequest>>(&body);
            let _ = decode::<Request<BalancerRequest>>(&body);
            let _ = decode::<Greeting>(&body);
            let _ = decode::<PeerMessage>(&body);
            let _ = decode::<ServerEvent>(&body);
            let _ = decode::<Response<BalancerReply>>(&body);
        }
    }
}
