//! What the `fastchat` command does: one function per subcommand.
//!
//! Output contract (scripts rely on it): `recv` prints one line per message, `FROM: TEXT`, in
//! the order sent (control characters in TEXT are escaped, so a message is always one line), or
//! with `--json` one JSON object per line. Errors go to standard error as one line.

use std::collections::HashMap;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use parking_lot::Mutex;

use super::e2e::{fingerprint, Directory, E2e, FileOffer, Plain};
use super::files::{self, Target};
use super::keystore::Keystore;
use super::replay::Verdict;
use super::text::one_line;
use super::{BalancerClient, Client, Event};
use crate::crypto::{self, Identity};
use crate::error::{Error, Result};
use crate::names;
use crate::net::Envelope;
use crate::transport::Transport;

/// Settings every subcommand shares.
#[derive(Debug, Clone)]
pub struct Options {
    /// Balancer address.
    pub balancer: String,
    /// How to reach the cluster: TLS with its CA (given, or pinned on first use), or
    /// plaintext.
    pub transport: Transport,
    /// Folder holding one sub-folder of keys per user.
    pub home: PathBuf,
    /// The acting user, for commands that need one.
    pub user: Option<String>,
    /// The password, if given in the environment (else prompted).
    pub password: Option<String>,
    /// Signalled on Ctrl-C: the long-running commands (`chat`, `recv --wait`) then end
    /// cleanly, with what was shown acknowledged, and exit 0.
    pub interrupt: Receiver<()>,
    /// Files up to this size are saved when they arrive; larger ones are offered, and saved
    /// by `fastchat get ID` (or `/get ID`).
    pub auto_download: u64,
}

impl Options {
    fn user(&self) -> Result<&str> {
        let user = self.user.as_deref().ok_or_else(|| {
            Error::Invalid("no user given: pass --user NAME or set FASTCHAT_USER".into())
        })?;
        names::validate("user", user)?;
        Ok(user)
    }

    fn password(&self, prompt: &str) -> Result<String> {
        if let Some(p) = &self.password {
            return Ok(p.clone());
        }
        if !io::stdin().is_terminal() {
            return Err(Error::Invalid(
                "no password: set FASTCHAT_PASSWORD or run in a terminal to be asked".into(),
            ));
        }
        rpassword::prompt_password(prompt).map_err(Error::Io)
    }
}

/// `fastchat signup NAME`: makes keys, creates the account, saves the keys.
pub fn signup(opts: &Options, name: &str) -> Result<()> {
    names::validate("user", name)?;
    let store = Keystore::new(&opts.home, name);
    if store.has_identity() {
        return Err(Error::Invalid(format!(
            "keys for {name} already exist in {}; remove them first to sign up again",
            store.dir().display()
        )));
    }
    let password = match &opts.password {
        Some(p) => p.clone(),
        None => {
            let p = opts.password(&format!("new password for {name}: "))?;
            if opts.password(&format!("repeat the password for {name}: "))? != p {
                return Err(Error::Invalid("the passwords differ".into()));
            }
            p
        }
    };
    if password.is_empty() {
        return Err(Error::Invalid("password must not be empty".into()));
    }
    let identity = Identity::generate()?;
    let mut balancer = BalancerClient::connect(&opts.balancer, &opts.transport)?;
    balancer.signup(name, &password, identity.public()?)?;
    store.save_identity(&identity, &password)?;
    println!(
        "signed up {name}; keys saved in {} (fingerprint {})",
        store.dir().display(),
        fingerprint(&identity.public()?)?
    );
    Ok(())
}

/// Where received files go, and which are saved at once.
#[derive(Debug, Clone)]
pub(super) struct Downloads {
    /// `FASTCHAT_HOME/USER/downloads/`.
    pub(super) dir: PathBuf,
    /// Files up to this size are saved when they arrive; larger ones wait for `get`.
    pub(super) auto_max: u64,
}

/// A logged-in user: the (failover-capable) client and the end-to-end state.
pub(super) struct LoggedIn {
    /// The connection, shared with the chat's printer thread.
    pub(super) client: Arc<Client>,
    /// Keys and pins; locked to seal or open one message.
    pub(super) e2e: Arc<Mutex<E2e>>,
    /// Where received files are saved.
    pub(super) downloads: Downloads,
    /// Files offered and not saved yet (larger than `downloads.auto_max`), by message id:
    /// `/get ID` in chat saves one.
    pub(super) offers: Arc<Mutex<HashMap<i64, Envelope>>>,
}

impl Drop for LoggedIn {
    /// Each command is one session: its token is given up when the command ends.
    fn drop(&mut self) {
        if let Err(e) = self.client.logout() {
            log::debug!("logout failed: {e}");
        }
    }
}

pub(super) fn login(opts: &Options) -> Result<LoggedIn> {
    let user = opts.user()?.to_string();
    let password = opts.password(&format!("password for {user}: "))?;
    let store = Keystore::new(&opts.home, &user);
    let (client, balancer) = Client::login(&opts.balancer, &opts.transport, &user, &password)?;
    let identity = store.load_identity(&password)?;
    let directory = Directory::new(
        &opts.balancer,
        &opts.transport,
        client.session(),
        Some(balancer),
    );
    Ok(LoggedIn {
        e2e: Arc::new(Mutex::new(E2e::new(&user, identity, store, directory))),
        client: Arc::new(client),
        downloads: Downloads {
            dir: opts.home.join(&user).join("downloads"),
            auto_max: opts.auto_download,
        },
        offers: Arc::default(),
    })
}

/// `fastchat send TO TEXT`.
pub fn send(opts: &Options, to: &str, text: &str) -> Result<()> {
    names::validate("recipient", to)?;
    if text.is_empty() {
        return Err(Error::Invalid("empty message: nothing was sent".into()));
    }
    let me = login(opts)?;
    let client_id = crypto::random_u64()?;
    let body = me.e2e.lock().seal_text(to, client_id, text)?;
    let id = me.client.send(to, client_id, &body, None)?;
    println!("stored message {id} for {to}");
    Ok(())
}

/// `fastchat send-file TO PATH`.
pub fn send_file(opts: &Options, to: &str, path: &Path) -> Result<()> {
    names::validate("recipient", to)?;
    let me = login(opts)?;
    println!(
        "{}",
        file_sent(&me.client, &mut me.e2e.lock(), Target::User(to), path)?
    );
    Ok(())
}

/// Sends a file and says what was sent.
pub(super) fn file_sent(
    client: &Client,
    e2e: &mut E2e,
    target: Target<'_>,
    path: &Path,
) -> Result<String> {
    let id = files::send_file(client, e2e, target, path)?;
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let to = match target {
        Target::User(u) => u.to_string(),
        Target::Group(g) => format!("group {g}"),
    };
    Ok(format!(
        "sent {} ({}) to {to} as message {id}",
        one_line(&name),
        files::human_size(size)
    ))
}

/// `fastchat whoami`: the user and the server the balancer gave.
pub fn whoami(opts: &Options) -> Result<()> {
    let me = login(opts)?;
    let server = me.client.server();
    println!(
        "{} on server {} at {}",
        me.client.user(),
        server.id,
        server.addr
    );
    Ok(())
}

/// `fastchat servers`: the live servers.
pub fn servers(opts: &Options) -> Result<()> {
    let servers = BalancerClient::connect(&opts.balancer, &opts.transport)?.servers()?;
    if servers.is_empty() {
        println!("no live servers");
    }
    for s in servers {
        let plural = if s.load == 1 { "" } else { "s" };
        println!("server {} at {}: {} client{plural}", s.id, s.addr, s.load);
    }
    Ok(())
}

/// `fastchat trust USER`: accept USER's current keys.
pub fn trust(opts: &Options, peer: &str) -> Result<()> {
    names::validate("user", peer)?;
    let session = login(opts)?;
    let keys = session.e2e.lock().trust(peer)?;
    println!(
        "now trusting {peer} with fingerprint {}",
        fingerprint(&keys)?
    );
    Ok(())
}

/// A `fastchat group ...` command (also `/group ...` in chat mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupCmd {
    /// Create a group; the caller becomes its admin.
    Create(String),
    /// Admin: add a user.
    Add(String, String),
    /// Admin: remove a user (starts a new key epoch).
    Remove(String, String),
    /// Leave a group.
    Leave(String),
    /// Send a text to every other member.
    Send(String, String),
    /// Send a file to every other member.
    SendFile(String, PathBuf),
    /// The caller's groups.
    List,
    /// A group's members, the admin first marked.
    Members(String),
}

impl GroupCmd {
    /// Parses the words after `/group` in chat mode.
    pub(super) fn parse(words: &str) -> Result<GroupCmd> {
        let usage = || {
            Error::Invalid(
                "usage: /group create|add|remove|leave|send|send-file|list|members ...; /help lists them"
                    .into(),
            )
        };
        let mut it = words.trim().splitn(3, ' ');
        let sub = it.next().unwrap_or("");
        let group = it.next().map(str::trim).filter(|g| !g.is_empty());
        let rest = it.next().map(str::trim).unwrap_or("");
        let one = |what: &str| -> Result<String> {
            let g = group.ok_or_else(|| Error::Invalid(format!("usage: /group {what}")))?;
            Ok(g.to_string())
        };
        let two = |what: &str| -> Result<(String, String)> {
            let g = one(what)?;
            if rest.is_empty() {
                return Err(Error::Invalid(format!("usage: /group {what}")));
            }
            Ok((g, rest.to_string()))
        };
        Ok(match sub {
            "create" => GroupCmd::Create(one("create GROUP")?),
            "add" => {
                let (g, u) = two("add GROUP USER")?;
                GroupCmd::Add(g, u)
            }
            "remove" => {
                let (g, u) = two("remove GROUP USER")?;
                GroupCmd::Remove(g, u)
            }
            "leave" => GroupCmd::Leave(one("leave GROUP")?),
            "send" => {
                let (g, t) = two("send GROUP TEXT")?;
                GroupCmd::Send(g, t)
            }
            "send-file" => {
                let (g, p) = two("send-file GROUP PATH")?;
                GroupCmd::SendFile(g, PathBuf::from(p))
            }
            "list" => GroupCmd::List,
            "members" => GroupCmd::Members(one("members GROUP")?),
            _ => return Err(usage()),
        })
    }

    /// Checks names and text before anything is sent.
    fn validate(&self) -> Result<()> {
        match self {
            GroupCmd::Create(g)
            | GroupCmd::Leave(g)
            | GroupCmd::Members(g)
            | GroupCmd::SendFile(g, _) => names::validate_group_ref(g),
            GroupCmd::Add(g, u) | GroupCmd::Remove(g, u) => {
                names::validate_group_ref(g)?;
                names::validate("user", u)
            }
            GroupCmd::Send(g, text) => {
                names::validate_group_ref(g)?;
                if text.trim().is_empty() {
                    return Err(Error::Invalid("empty message: nothing was sent".into()));
                }
                Ok(())
            }
            GroupCmd::List => Ok(()),
        }
    }

    /// Runs the command; returns what to print. Membership shown is the group's verified
    /// chain of changes, not the server's word.
    pub(super) fn run(&self, client: &Client, e2e: &mut E2e) -> Result<String> {
        self.validate()?;
        let me = client.user().to_string();
        let group = |g: &str| resolve_group(client, &me, g, false);
        Ok(match self {
            GroupCmd::Create(g) => {
                let g = resolve_group(client, &me, g, true)?;
                e2e.group_create(client, &g)?;
                format!("created group {g}; you are its admin")
            }
            GroupCmd::Add(g, u) => {
                let g = group(g)?;
                e2e.group_add(client, &g, u)?;
                format!("added {u} to {g}")
            }
            GroupCmd::Remove(g, u) => {
                let g = group(g)?;
                let epoch = e2e.group_remove(client, &g, u)?;
                format!("removed {u} from {g}; new group key (epoch {epoch})")
            }
            GroupCmd::Leave(g) => {
                let g = group(g)?;
                e2e.group_leave(client, &g)?;
                format!("left {g}")
            }
            GroupCmd::Send(g, text) => {
                let g = group(g)?;
                let id = e2e.group_send(client, &g, &Plain::Text(text.clone()))?;
                format!("stored message {id} for group {g}")
            }
            GroupCmd::SendFile(g, path) => {
                let g = group(g)?;
                file_sent(client, e2e, Target::Group(&g), path)?
            }
            GroupCmd::List => {
                let groups = client.group_list()?;
                if groups.is_empty() {
                    return Ok("no groups".into());
                }
                groups
                    .iter()
                    .map(|g| match e2e.group_roster(client, &g.name) {
                        Ok(r) => {
                            let n = r.members.len();
                            let plural = if n == 1 { "" } else { "s" };
                            format!("{}: {n} member{plural}, admin {}", g.name, r.admin)
                        }
                        Err(e) => format!("{}: {}", g.name, one_line(&e.to_string())),
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            }
            GroupCmd::Members(g) => {
                let roster = e2e.group_roster(client, &group(g)?)?;
                roster
                    .members
                    .iter()
                    .map(|m| {
                        if *m == roster.admin {
                            format!("{m} (admin)")
                        } else {
                            m.clone()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            }
        })
    }
}

/// The full name of the group a command names: `OWNER/NAME` as given; or, for a short name,
/// our own group of that name when creating, else the one group of ours with that name.
fn resolve_group(client: &Client, me: &str, given: &str, creating: bool) -> Result<String> {
    if given.contains('/') {
        names::validate_group(given)?;
        return Ok(given.to_string());
    }
    if creating {
        return Ok(format!("{me}/{given}"));
    }
    let named: Vec<String> = client
        .group_list()?
        .into_iter()
        .map(|g| g.name)
        .filter(|n| n.split_once('/').map(|(_, short)| short) == Some(given))
        .collect();
    match &named[..] {
        [one] => Ok(one.clone()),
        [] => Err(Error::refused(
            crate::error::ErrorCode::UnknownGroup,
            format!("no group {given} with you as a member"),
        )),
        several => Err(Error::Invalid(format!(
            "several of your groups are called {given} ({}); say which, as OWNER/NAME",
            several.join(", ")
        ))),
    }
}

/// `fastchat group ...`.
pub fn group(opts: &Options, cmd: &GroupCmd) -> Result<()> {
    cmd.validate()?;
    let me = login(opts)?;
    println!("{}", cmd.run(&me.client, &mut me.e2e.lock())?);
    Ok(())
}

/// How `recv` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `FROM: TEXT`
    Lines,
    /// One JSON object per line.
    Json,
}

/// `fastchat recv [--wait SECS] [--json]`: prints and acknowledges queued messages, then waits
/// up to `wait` for live ones.
pub fn recv(opts: &Options, wait: Duration, format: Format) -> Result<()> {
    let me = login(opts)?;
    let e2e = &me.e2e;
    let out = io::stdout();
    // No deadline until the queue is drained (bounded by the server's queue); then `wait`.
    let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
    let mut deadline = far;
    let mut batch: Vec<i64> = Vec::new();
    loop {
        // Wake up now and then to notice Ctrl-C.
        let slice = deadline.min(Instant::now() + Duration::from_millis(200));
        let event = me.client.next(slice)?;
        if opts.interrupt.try_recv().is_ok() {
            return me.client.ack(&batch);
        }
        let Some(event) = event else {
            if Instant::now() >= deadline {
                return Ok(());
            }
            continue;
        };
        match event {
            Event::Message(msg) => {
                let shown = show(
                    e2e,
                    &me.client,
                    &me.downloads,
                    &msg,
                    format,
                    &mut out.lock(),
                )?;
                // An offered file stays queued until it is taken with `get`.
                if shown == Shown::Done {
                    batch.push(msg.id);
                }
                if deadline != far {
                    me.client.ack(&std::mem::take(&mut batch))?;
                }
            }
            Event::Synced => {
                me.client.ack(&std::mem::take(&mut batch))?;
                if wait.is_zero() {
                    return Ok(());
                }
                if deadline == far {
                    deadline = Instant::now() + wait;
                }
            }
            Event::Failover(server) => {
                eprintln!("fastchat: server lost; continuing on server {}", server.id)
            }
        }
    }
}

/// Prints one message: `FROM: TEXT`, `[GROUP] FROM: TEXT`, `[GROUP] * FROM TEXT` for a notice,
/// `FROM sent NAME (SIZE) -> PATH` for a file (saved first). A message that fails to decrypt,
/// verify or download, a replay of one already shown, or one too old to tell, is reported on
/// stderr, never shown; the same message delivered again is silently skipped. A file larger
/// than `downloads.auto_max` is offered (`FROM offers NAME (SIZE): fastchat get ID`), not
/// saved: it stays queued, and is offered again next time, until `get` takes it. Only a lost
/// connection is an error (the message then stays queued).
pub(super) fn show(
    e2e: &Mutex<E2e>,
    client: &Client,
    downloads: &Downloads,
    msg: &Envelope,
    format: Format,
    out: &mut impl Write,
) -> Result<Shown> {
    let reject = |why: String| {
        eprintln!(
            "fastchat: warning: message {} from {} rejected: {}",
            msg.id,
            msg.from,
            one_line(&why)
        );
    };
    // The lock is held to open the message, not while a file downloads.
    let opened = match e2e.lock().open(client, msg) {
        Ok(opened) => opened,
        Err(e) if e.is_disconnect() => return Err(e),
        Err(e) => {
            reject(e.to_string());
            return Ok(Shown::Done);
        }
    };
    match opened.verdict {
        Verdict::New => {}
        Verdict::Again => return Ok(Shown::Done),
        Verdict::Replay { first } => {
            reject(format!(
                "it replays message {first}, which was shown before (the server sent it again \
                 under another id)"
            ));
            return Ok(Shown::Done);
        }
        Verdict::TooOld => {
            reject(format!(
                "it is more than a week older than the newest message of {} you have seen, \
                 and may be a replay",
                msg.from
            ));
            return Ok(Shown::Done);
        }
    }
    let path = match &opened.plain {
        Plain::File(offer) if offer.size > downloads.auto_max => {
            offered(msg, offer, format, out)?;
            return Ok(Shown::Offered);
        }
        Plain::File(offer) => match files::receive(client, msg, offer, &downloads.dir) {
            Ok(path) => Some(path),
            Err(e) if e.is_disconnect() => return Err(e),
            Err(e) => {
                reject(e.to_string());
                return Ok(Shown::Done);
            }
        },
        _ => None,
    };
    let plain = &opened.plain;
    match format {
        Format::Lines => writeln!(out, "{}", message_line(msg, plain, path.as_deref()))?,
        Format::Json => {
            let mut json = serde_json::json!({
                "id": msg.id,
                "from": msg.from,
                "to": msg.to,
                "group": msg.group,
                "sent_at": msg.sent_at,
            });
            let fields = match plain {
                Plain::Text(t) => serde_json::json!({ "kind": "text", "text": t }),
                Plain::Membership(t) => serde_json::json!({ "kind": "membership", "text": t }),
                Plain::File(offer) => serde_json::json!({
                    "kind": "file",
                    "name": offer.name,
                    "size": offer.size,
                    "path": path,
                }),
            };
            if let (Some(all), serde_json::Value::Object(more)) = (json.as_object_mut(), fields) {
                all.extend(more);
            }
            writeln!(out, "{json}")?
        }
    }
    out.flush()?;
    e2e.lock().shown(&opened)?;
    Ok(Shown::Done)
}

/// What [`show`] did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shown {
    /// Shown (or reported as rejected): acknowledge it.
    Done,
    /// A file offered and not saved: leave it queued until `get` takes it.
    Offered,
}

/// Prints a file offered and not saved: `FROM offers NAME (SIZE): fastchat get ID`.
fn offered(msg: &Envelope, offer: &FileOffer, format: Format, out: &mut impl Write) -> Result<()> {
    match format {
        Format::Lines => {
            let prefix = msg
                .group
                .as_ref()
                .map_or(String::new(), |g| format!("[{g}] "));
            writeln!(
                out,
                "{prefix}{} offers {} ({}): fastchat get {}",
                msg.from,
                one_line(&offer.name),
                files::human_size(offer.size),
                msg.id
            )?
        }
        Format::Json => writeln!(
            out,
            "{}",
            serde_json::json!({
                "id": msg.id,
                "from": msg.from,
                "to": msg.to,
                "group": msg.group,
                "sent_at": msg.sent_at,
                "kind": "file-offer",
                "name": offer.name,
                "size": offer.size,
            })
        )?,
    }
    out.flush()?;
    Ok(())
}

/// `fastchat get ID`: saves the file offered by message ID (one too large to be saved when it
/// arrived), and takes it from the queue.
pub fn get(opts: &Options, id: i64) -> Result<()> {
    let me = login(opts)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut found = None;
    while let Some(event) = me.client.next(deadline)? {
        match event {
            Event::Message(msg) if msg.id == id => found = Some(msg),
            Event::Synced => break,
            _ => {}
        }
    }
    let msg = found.ok_or_else(|| {
        Error::refused(
            crate::error::ErrorCode::BadRequest,
            format!("no message {id} waiting for you (fastchat recv shows what is)"),
        )
    })?;
    take_offer(&me, &msg, &mut io::stdout().lock())
}

/// Saves the file `msg` offers, whatever its size, shows it, and acknowledges it.
pub(super) fn take_offer(me: &LoggedIn, msg: &Envelope, out: &mut impl Write) -> Result<()> {
    let all = Downloads {
        auto_max: u64::MAX,
        ..me.downloads.clone()
    };
    show(&me.e2e, &me.client, &all, msg, Format::Lines, out)?;
    me.client.ack(&[msg.id])
}

/// The one line a message is shown as (`path`: where a file was saved).
pub fn message_line(msg: &Envelope, plain: &Plain, path: Option<&Path>) -> String {
    let prefix = match &msg.group {
        Some(g) => format!("[{g}] "),
        None => String::new(),
    };
    match plain {
        Plain::Text(t) => format!("{prefix}{}: {}", msg.from, one_line(t)),
        Plain::Membership(t) => format!("{prefix}* {}", one_line(t)),
        Plain::File(offer) => format!(
            "{prefix}{} sent {} ({}) -> {}",
            msg.from,
            one_line(&offer.name),
            files::human_size(offer.size),
            path.map(|p| one_line(&p.display().to_string()))
                .unwrap_or_default()
        ),
    }
}
