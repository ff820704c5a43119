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
use serde_json::{json, Value};

use super::agent;
use super::balancer::Session;
use super::e2e::{fingerprint, Directory, E2e, FileOffer, Plain, Reached, Receipt};
use super::files::{self, Target};
use super::keystore::{KeptSession, Keystore};
use super::prekeys::{self, Prekeys};
use super::receipts::Receipts;
use super::replay::Verdict;
use super::text::one_line;
use super::{BalancerClient, Client, Event};
use crate::crypto::{self, Identity, SessionKey};
use crate::error::{Error, ErrorCode, Result};
use crate::names;
use crate::net::{Envelope, NewPrekeys};
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
    /// The user found by its kept session when no `--user` was given.
    pub kept_user: std::sync::OnceLock<String>,
    /// Print one JSON object per result (per message, for `recv`) instead of text.
    pub json: bool,
    /// Send receipts (delivered, read) to the senders of the messages shown.
    pub receipts: bool,
}

impl Options {
    /// The acting user: `--user`, else the one user with a kept session.
    fn user(&self) -> Result<&str> {
        let user = match self.user.as_deref() {
            Some(u) => u,
            None => {
                let kept = super::keystore::kept_users(&self.home);
                match &kept[..] {
                    [one] => return self.user_kept(one.clone()),
                    [] => {
                        return Err(Error::Invalid(
                            "no user given: pass --user NAME, set FASTCHAT_USER, or run \
                             `fastchat login NAME` first"
                                .into(),
                        ))
                    }
                    several => {
                        return Err(Error::Invalid(format!(
                            "several users are logged in here ({}); say which with --user",
                            several.join(", ")
                        )))
                    }
                }
            }
        };
        names::validate("user", user)?;
        Ok(user)
    }

    /// Prints a command's result: `text` for people, or `json` as one line.
    pub fn print(&self, text: &str, json: serde_json::Value) -> Result<()> {
        let mut out = io::stdout().lock();
        let written = if self.json {
            writeln!(out, "{json}")
        } else {
            writeln!(out, "{text}")
        };
        written.and_then(|()| out.flush()).map_err(output_error)
    }

    /// The one logged-in user, kept for the rest of the command.
    fn user_kept(&self, user: String) -> Result<&str> {
        names::validate("user", &user)?;
        Ok(self.kept_user.get_or_init(|| user).as_str())
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

/// A failed write to standard output: closed by the reader ([`Error::OutputClosed`]: the
/// command ends quietly), or another error.
pub fn output_error(e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::BrokenPipe {
        Error::OutputClosed
    } else {
        Error::Io(e)
    }
}

/// `fastchat signup NAME [--exist-ok]`: makes keys, creates the account, saves the keys. With
/// `exist_ok`, an account that exists already is not an error (a signup script may run
/// again): keys already in the folder are uploaded if the account is missing (the password
/// must open them).
pub fn signup(opts: &Options, name: &str, exist_ok: bool) -> Result<()> {
    names::validate("user", name)?;
    let store = Keystore::new(&opts.home, name);
    let existing = store.has_identity();
    if existing && !exist_ok {
        return Err(Error::Invalid(format!(
            "keys for {name} already exist in {}; remove them first to sign up again (or \
             pass --exist-ok if an existing account is fine)",
            store.dir().display()
        )));
    }
    let password = match &opts.password {
        Some(p) => p.clone(),
        None if existing => opts.password(&format!("password for {name}: "))?,
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
    let identity = if existing {
        store.load_identity(&password)?
    } else {
        Identity::generate()?
    };
    // The folder first: an account must not be made whose keys then have nowhere to go.
    store.ensure_dir()?;
    // The first prekeys go with the signup. With keys already here, their private halves are
    // saved first (the directory may hand them out at once); with new keys, with the keys.
    let now = crate::db::now_ms();
    let mut prekeys = Prekeys::default();
    let published = if existing {
        let _lock = store.lock_state()?;
        prekeys = Prekeys::load(&store, &identity)?;
        let published = prekeys::for_signup(&mut prekeys, &identity, now)?;
        prekeys.save(&store, &identity)?;
        published
    } else {
        prekeys::for_signup(&mut prekeys, &identity, now)?
    };
    let mut balancer = BalancerClient::connect(&opts.balancer, &opts.transport)?;
    let mut claimed = false;
    let signed_up = balancer.signup(name, &password, identity.public()?, Some(published.clone()));
    let created = match signed_up {
        Ok(()) => true,
        Err(
            taken @ Error::Refused {
                code: ErrorCode::NameTaken,
                ..
            },
        ) => {
            // An account an operator made (or reset) takes its first keys from the first
            // signup with its password: that claims it.
            claimed = !existing && claim(&mut balancer, name, &password, &identity, published)?;
            match (claimed, exist_ok) {
                (true, _) => true,
                (false, true) => false,
                (false, false) => return Err(taken),
            }
        }
        Err(e) => return Err(e),
    };
    if created && !existing {
        store.save_identity(&identity, &password)?;
        prekeys.save(&store, &identity)?;
    }
    let fp = fingerprint(&identity.public()?)?;
    let dir = store.dir().display().to_string();
    let text = match (created, existing) {
        (true, false) if claimed => {
            format!("claimed {name}, made by an operator; keys saved in {dir} (fingerprint {fp})")
        }
        (true, false) => format!("signed up {name}; keys saved in {dir} (fingerprint {fp})"),
        (true, true) => {
            format!("signed up {name} with the keys already in {dir} (fingerprint {fp})")
        }
        (false, true) => format!("{name} is signed up already; its keys are in {dir}"),
        (false, false) => format!(
            "{name} is signed up already; its keys are not in {dir} (they stay on the machine \
             that signed up)"
        ),
    };
    opts.print(
        &text,
        serde_json::json!({
            "user": name,
            "created": created,
            "claimed": claimed,
            "keys": if existing || created { Some(dir) } else { None },
            "fingerprint": if existing || created { Some(fp) } else { None },
        }),
    )
}

/// Uploads `identity`'s public keys for an account an operator made or reset, which takes
/// keys once. `Ok(false)` if the password is wrong or the account has its keys already: the
/// name is simply taken.
fn claim(
    balancer: &mut BalancerClient,
    name: &str,
    password: &str,
    identity: &Identity,
    prekeys: NewPrekeys,
) -> Result<bool> {
    let session = match balancer.login(name, password) {
        Ok(s) => s,
        Err(Error::Refused {
            code: ErrorCode::InvalidCredentials,
            ..
        }) => return Ok(false),
        Err(e) => return Err(e),
    };
    let set = balancer
        .set_keys(&session, identity.public()?)
        .and_then(|()| publish_first(balancer, &session, prekeys));
    if let Err(e) = balancer.logout(&session) {
        log::debug!("logout after signup failed: {e}");
    }
    match set {
        Ok(_) => Ok(true),
        Err(Error::Refused {
            code: ErrorCode::NotAllowed,
            ..
        }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Publishes the first prekeys of new keys (see [`prekeys::for_signup`]).
fn publish_first(
    balancer: &mut BalancerClient,
    session: &Session,
    prekeys: NewPrekeys,
) -> Result<u32> {
    let one_time = prekeys
        .one_time
        .into_iter()
        .map(|(id, k)| (id, k.into_vec()));
    balancer.publish_prekeys(session, Some(prekeys.signed), one_time.collect())
}

/// `fastchat rekey`: after an operator reset the password (the key file, sealed under the old
/// one, no longer opens), makes new keys, uploads them and keeps them; the old key file is
/// kept as `identity.key.old`. Contacts see the new fingerprint and must `fastchat trust` it.
pub fn rekey(opts: &Options) -> Result<()> {
    let user = opts.user()?.to_string();
    let store = Keystore::new(&opts.home, &user);
    let password = opts.password(&format!("new password for {user} (from your operator): "))?;
    let identity = Identity::generate()?;
    // The directory drops the old keys' prekeys; new ones go with the new keys.
    let mut prekeys = Prekeys::default();
    let published = prekeys::for_signup(&mut prekeys, &identity, crate::db::now_ms())?;
    let mut balancer = BalancerClient::connect(&opts.balancer, &opts.transport)?;
    let session = balancer.login(&user, &password)?;
    // The key our group changes so far were signed with, as the directory has it: our key
    // change in each group names it (a wrong one is refused by the server, which checks it
    // against our last change there).
    let old = balancer.keys(&session, &user).map(|k| k.ed25519);
    let set = match &old {
        Ok(_) => balancer
            .set_keys(&session, identity.public()?)
            .and_then(|()| publish_first(&mut balancer, &session, published))
            .map(|_| ()),
        Err(_) => Ok(()),
    };
    if let Err(e) = balancer.logout(&session) {
        log::debug!("logout after rekey failed: {e}");
    }
    let old = old?;
    set?;
    store.save_replaced_key(&old)?;
    // The reset ended every session of the user already; the agent holds the old keys.
    agent::stop(store.dir());
    store.remove_session()?;
    store.replace_identity(&identity, &password)?;
    // Our own keys are pinned too (we wrap group keys for ourselves): the new ones now.
    store.pin(&user, &identity.public()?)?;
    {
        // What was sealed under the old keys no longer opens: conversations start again.
        let _lock = store.lock_state()?;
        prekeys.save(&store, &identity)?;
        for folder in ["sessions", "senderkeys"] {
            let folder = store.dir().join(folder);
            if folder.exists() {
                std::fs::remove_dir_all(&folder).map_err(|e| {
                    Error::Local(format!("cannot remove {}: {e}", folder.display()))
                })?;
            }
        }
    }
    let fp = fingerprint(&identity.public()?)?;
    let dir = store.dir().display().to_string();
    let (marked, failed) = mark_key_change(opts, &user, &password, identity, store, old);
    let failed: Vec<_> = failed
        .into_iter()
        .map(|(group, error)| json!({ "group": group, "error": error }))
        .collect();
    opts.print(
        &format!(
            "new keys for {user} saved in {dir} (fingerprint {fp}); your contacts will be told \
             your keys changed and must run `fastchat trust {user}`{}",
            match marked.len() {
                0 => String::new(),
                n => format!("; key change added to {n} group(s): {}", marked.join(", ")),
            }
        ),
        json!({
            "user": user,
            "keys": dir,
            "fingerprint": fp,
            "groups": marked,
            "groups_failed": failed,
        }),
    )
}

/// Adds a key change to each of `user`'s groups, naming `old`, so that those who check a
/// group's chain afresh check our earlier changes with the key that signed them, and the
/// group moves to an epoch keyed with our new keys. Returns the groups marked and what could
/// not be done (a group, or `*` for all of them, and why), each also said on standard error:
/// the new keys stand either way.
fn mark_key_change(
    opts: &Options,
    user: &str,
    password: &str,
    identity: Identity,
    store: Keystore,
    old: Vec<u8>,
) -> (Vec<String>, Vec<(String, String)>) {
    let mut marked = Vec::new();
    let mut failed = Vec::new();
    let mut fail = |group: &str, e: Error| {
        let again = match group {
            "*" => "fastchat group key-change GROUP".to_string(),
            g => format!("fastchat group key-change {g}"),
        };
        eprintln!(
            "fastchat: warning: could not add the key change to {group}: {e}; once that is \
             mended, run `{again}`"
        );
        failed.push((group.to_string(), e.to_string()));
    };
    let me = match Client::login(&opts.balancer, &opts.transport, user, password)
        .and_then(|(client, balancer)| logged_in(opts, client, balancer, identity, store, false))
    {
        Ok(me) => me,
        Err(e) => {
            fail("*", e);
            return (marked, failed);
        }
    };
    let groups = match me.client.group_list() {
        Ok(g) => g,
        Err(e) => {
            fail("*", e);
            return (marked, failed);
        }
    };
    for g in groups {
        let done = me
            .e2e
            .lock()
            .group_key_change(&me.client, &g.name, old.clone());
        match done {
            Ok(()) => marked.push(g.name),
            Err(e) => fail(&g.name, e),
        }
    }
    (marked, failed)
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
    /// A kept session (`fastchat login`) outlives the command; any other ends with it.
    pub(super) kept: bool,
}

impl Drop for LoggedIn {
    /// A command's own session is given up when the command ends; a kept one is not.
    fn drop(&mut self) {
        if self.kept {
            self.client.close();
        } else if let Err(e) = self.client.logout() {
            log::debug!("logout failed: {e}");
        }
    }
}

/// Logs in for one command: with the kept session if there is one (no password, no hash),
/// else with the password (a session that ends with the command).
pub(super) fn login(opts: &Options) -> Result<LoggedIn> {
    let user = opts.user()?.to_string();
    let store = Keystore::new(&opts.home, &user);
    if let Some(me) = kept_login(opts, &user, &store)? {
        return Ok(me);
    }
    let password = opts.password(&format!("password for {user}: "))?;
    let (client, balancer) = Client::login(&opts.balancer, &opts.transport, &user, &password)?;
    let identity = store.load_identity(&password)?;
    logged_in(opts, client, balancer, identity, store, false)
}

fn logged_in(
    opts: &Options,
    client: Client,
    mut balancer: BalancerClient,
    identity: Identity,
    store: Keystore,
    kept: bool,
) -> Result<LoggedIn> {
    let user = client.user().to_string();
    // Every command tops up the one-time prekeys others used (one request to the directory
    // when none are needed): a user who never runs `fastchat login` does not run out.
    let now = crate::db::now_ms();
    if let Err(e) = prekeys::refresh(&store, &identity, &mut balancer, client.session(), now) {
        log::warn!("could not publish prekeys: {e}");
    }
    let directory = Directory::new(
        &opts.balancer,
        &opts.transport,
        client.session(),
        Some(balancer),
    );
    Ok(LoggedIn {
        e2e: Arc::new(Mutex::new(E2e::new(&user, identity, store, directory)?)),
        client: Arc::new(client),
        downloads: Downloads {
            dir: opts.home.join(&user).join("downloads"),
            auto_max: opts.auto_download,
        },
        offers: Arc::default(),
        kept,
    })
}

/// The user's kept session, taken up: `None` if there is none for this balancer, or its agent
/// has gone (a reboot, its idle time), in which case it is forgotten. A session the balancer
/// no longer knows (expired, logged out elsewhere) is forgotten too, and is an error unless a
/// password is at hand to log in afresh.
fn kept_login(opts: &Options, user: &str, store: &Keystore) -> Result<Option<LoggedIn>> {
    let Some(kept) = store.kept_session()? else {
        return Ok(None);
    };
    if kept.balancer != opts.balancer {
        return Ok(None);
    }
    let Some(secrets) = agent::fetch(store.dir())? else {
        log::info!("the session agent of {user} has ended; logging in with the password");
        store.remove_session()?;
        return Ok(None);
    };
    let session = kept_session(user, &kept, &secrets)?;
    match Client::resume(&opts.balancer, &opts.transport, &session) {
        Ok((client, balancer)) => {
            let identity = Identity::from_raw(secrets.identity())?;
            Ok(Some(logged_in(
                opts,
                client,
                balancer,
                identity,
                Keystore::new(&opts.home, user),
                true,
            )?))
        }
        Err(Error::Refused {
            code: ErrorCode::InvalidToken,
            ..
        }) => {
            agent::stop(store.dir());
            store.remove_session()?;
            if opts.password.is_some() {
                return Ok(None);
            }
            Err(Error::refused(
                ErrorCode::InvalidToken,
                format!(
                    "the kept session of {user} has ended (expired, or logged out elsewhere); \
                     run `fastchat login {user}` again"
                ),
            ))
        }
        Err(e) => Err(e),
    }
}

/// How long a kept session's agent waits for a command before it ends, by default.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(8 * 3600);

/// `fastchat login [NAME]`: logs in once and keeps the session for later commands: the token
/// in `FASTCHAT_HOME/NAME/session`, the unlocked keys in a session agent that ends after
/// `idle` without a command (or at `fastchat logout`). A kept session of NAME from before is
/// ended first.
pub fn keep_login(opts: &Options, idle: Duration) -> Result<()> {
    let user = opts.user()?.to_string();
    let store = Keystore::new(&opts.home, &user);
    if store.kept_session()?.is_some() {
        end_kept(opts, &user, &store)?;
    }
    let password = opts.password(&format!("password for {user}: "))?;
    let identity = store.load_identity(&password)?;
    let mut b = BalancerClient::connect(&opts.balancer, &opts.transport)?;
    let session = b.login(&user, &password)?;
    // Trouble with prekeys does not stop the login: the directory keeps what was published
    // before (the signup's at least), and the next command tries again.
    if let Err(e) = prekeys::refresh(&store, &identity, &mut b, &session, crate::db::now_ms()) {
        log::warn!("could not publish prekeys: {e}");
    }
    let mut raw_identity = identity.to_raw()?;
    let mut raw_key = session.key.to_raw()?;
    let secrets = agent::Secrets::new(&raw_identity, &raw_key);
    raw_identity.fill(0);
    raw_key.fill(0);
    let exe = std::env::current_exe()?;
    store.ensure_dir()?;
    let agent_pid = agent::start(&exe, store.dir(), idle, &secrets?)?;
    store.save_session(&KeptSession {
        user: user.clone(),
        balancer: opts.balancer.clone(),
        token: session.token.clone(),
        agent_pid,
        since_ms: crate::db::now_ms(),
    })?;
    opts.print(
        &format!(
            "logged in as {user}; later commands use this session until `fastchat logout` \
             (or {} without one)",
            crate::units::human_duration(idle)
        ),
        serde_json::json!({
            "user": user,
            "agent_pid": agent_pid,
            "idle_secs": idle.as_secs(),
        }),
    )
}

/// `fastchat logout`: ends the kept session (the balancer refuses its token, the servers close
/// its connections) and its agent.
pub fn logout(opts: &Options) -> Result<()> {
    let user = opts.user()?.to_string();
    let store = Keystore::new(&opts.home, &user);
    let had = store.kept_session()?.is_some();
    if had {
        end_kept(opts, &user, &store)?;
    }
    opts.print(
        &if had {
            format!("logged out {user}")
        } else {
            format!("{user} had no kept session here")
        },
        serde_json::json!({ "user": user, "ended": had }),
    )
}

/// The session a kept session's file and agent describe (its server is not known yet: the
/// balancer hands one out on `Resume`).
fn kept_session(user: &str, kept: &KeptSession, secrets: &agent::Secrets) -> Result<Session> {
    Ok(Session {
        user: user.to_string(),
        token: kept.token.clone(),
        key: Arc::new(SessionKey::from_raw(secrets.session_key())?),
        server: crate::net::ServerInfo {
            id: 0,
            name: String::new(),
            addr: String::new(),
            load: 0,
        },
    })
}

/// Ends `user`'s kept session: logs its token out (if the agent still holds its key), stops
/// the agent, removes the file.
fn end_kept(opts: &Options, user: &str, store: &Keystore) -> Result<()> {
    if let (Some(kept), Some(secrets)) = (store.kept_session()?, agent::fetch(store.dir())?) {
        let session = kept_session(user, &kept, &secrets)?;
        let told = BalancerClient::connect(&kept.balancer, &opts.transport)
            .and_then(|mut b| b.logout(&session));
        if let Err(e) = told {
            log::warn!("could not tell the balancer that {user}'s session ended: {e}");
        }
    }
    agent::stop(store.dir());
    store.remove_session()
}

/// `fastchat send TO TEXT`: one message; TEXT `-` reads it from standard input (the whole
/// input, without its last newline), or with `lines` one message per non-empty input line.
pub fn send(opts: &Options, to: &str, text: &str, lines: bool) -> Result<()> {
    names::validate("recipient", to)?;
    let texts: Vec<String> = if text == "-" {
        let mut input = String::new();
        io::Read::read_to_string(&mut io::stdin(), &mut input)?;
        if lines {
            input
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string)
                .collect()
        } else {
            let one = input.strip_suffix('\n').unwrap_or(&input);
            let one = one.strip_suffix('\r').unwrap_or(one);
            vec![one.to_string()]
        }
    } else if lines {
        return Err(Error::Invalid(
            "--lines reads standard input: give the text as -".into(),
        ));
    } else {
        vec![text.to_string()]
    };
    if texts.is_empty() || texts.iter().any(|t| t.is_empty()) {
        return Err(Error::Invalid("empty message: nothing was sent".into()));
    }
    let me = login(opts)?;
    for text in &texts {
        let client_id = crypto::random_u64()?;
        let body = me.e2e.lock().seal_text(to, client_id, text)?;
        let id = me.client.send(to, client_id, &body, None)?;
        me.e2e.lock().remember_sent(to, text);
        opts.print(
            &format!("stored message {id} for {to}"),
            serde_json::json!({ "id": id, "to": to }),
        )?;
    }
    Ok(())
}

/// What [`announce`] did for one recipient: the stored message's id, or why not.
pub type Announced = (String, Result<i64>);

/// Sends `text` as the options' user to each of `recipients`, end-to-end encrypted like any
/// message, over one login (`fastchat-admin announce`). A recipient that fails (a key that
/// changed since it was pinned, an account deleted meanwhile) does not stop the others.
pub fn announce(opts: &Options, recipients: &[String], text: &str) -> Result<Vec<Announced>> {
    if text.is_empty() {
        return Err(Error::Invalid("empty message: nothing was sent".into()));
    }
    let me = login(opts)?;
    let mut done = Vec::with_capacity(recipients.len());
    for to in recipients {
        let sent = crypto::random_u64().and_then(|client_id| {
            let body = me.e2e.lock().seal_text(to, client_id, text)?;
            me.client.send(to, client_id, &body, None)
        });
        // No server or a lost connection ends the announcement; what was sent is reported.
        let unreachable = matches!(&sent, Err(e) if e.exit_code() == 3);
        done.push((to.clone(), sent));
        if unreachable {
            break;
        }
    }
    Ok(done)
}

/// `fastchat history WITH [--limit N]`: the last lines of a conversation (a user, or a group
/// as OWNER/NAME) from the local history, oldest first. Needs no server: the keys come from
/// the kept session's agent, or the key file and the password.
pub fn history(opts: &Options, with: &str, limit: usize) -> Result<()> {
    names::validate_group_ref(with)?;
    let user = opts.user()?.to_string();
    let store = Keystore::new(&opts.home, &user);
    let kept = match store.kept_session()? {
        Some(_) => agent::fetch(store.dir())?,
        None => None,
    };
    let identity = match kept {
        Some(secrets) => Identity::from_raw(secrets.identity())?,
        None => store.load_identity(&opts.password(&format!("password for {user}: "))?)?,
    };
    let history = super::history::History::new(store.dir().to_path_buf(), &user, &identity)?;
    for e in history.last(Some(with), limit)? {
        opts.print(
            &history_line(&e, true),
            json!({
                "at": e.at,
                "conversation": e.conversation,
                "from": e.from,
                "text": e.text,
            }),
        )?;
    }
    Ok(())
}

/// A line of history for people: `2026-12-02 04:05 bob: TEXT` (`04:05 ...` without the
/// date), in local time.
pub(super) fn history_line(e: &super::history::Entry, date: bool) -> String {
    use chrono::TimeZone;
    let at = chrono::Local
        .timestamp_millis_opt(e.at)
        .single()
        .map(|t| {
            t.format(if date { "%Y-%m-%d %H:%M" } else { "%H:%M" })
                .to_string()
        })
        .unwrap_or_default();
    let text = one_line(&e.text);
    match text.strip_prefix("* ") {
        Some(notice) => format!("{at} * {notice}"),
        None => format!("{at} {}: {text}", e.from),
    }
}

/// `fastchat send-file TO PATH`.
pub fn send_file(opts: &Options, to: &str, path: &Path) -> Result<()> {
    names::validate("recipient", to)?;
    let me = login(opts)?;
    let (text, json) = file_sent(&me.client, &mut me.e2e.lock(), Target::User(to), path)?;
    opts.print(&text, json)
}

/// Sends a file and says what was sent: a line, and its JSON.
pub(super) fn file_sent(
    client: &Client,
    e2e: &mut E2e,
    target: Target<'_>,
    path: &Path,
) -> Result<(String, serde_json::Value)> {
    let id = files::send_file(client, e2e, target, path)?;
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let conversation = match target {
        Target::User(u) | Target::Group(u) => u,
    };
    e2e.remember_sent(
        conversation,
        &format!("sent {name} ({})", files::human_size(size)),
    );
    let (to, json_to, json_group) = match target {
        Target::User(u) => (u.to_string(), Some(u), None),
        Target::Group(g) => (format!("group {g}"), None, Some(g)),
    };
    Ok((
        format!(
            "sent {} ({}) to {to} as message {id}",
            one_line(&name),
            files::human_size(size)
        ),
        serde_json::json!({
            "id": id,
            "to": json_to,
            "group": json_group,
            "name": name,
            "size": size,
        }),
    ))
}

/// `fastchat whoami`: the user, the server the balancer gave, and whether the session is kept.
pub fn whoami(opts: &Options) -> Result<()> {
    let me = login(opts)?;
    let server = me.client.server();
    let kept = if me.kept { " (kept session)" } else { "" };
    opts.print(
        &format!(
            "{} on server {} at {}{kept}",
            me.client.user(),
            server.id,
            server.addr
        ),
        serde_json::json!({
            "user": me.client.user(),
            "server": { "id": server.id, "name": server.name, "addr": server.addr },
            "kept": me.kept,
        }),
    )
}

/// `fastchat servers`: the live servers, one per line.
pub fn servers(opts: &Options) -> Result<()> {
    let servers = BalancerClient::connect(&opts.balancer, &opts.transport)?.servers()?;
    if servers.is_empty() && !opts.json {
        opts.print("no live servers", serde_json::Value::Null)?;
    }
    for s in servers {
        let plural = if s.load == 1 { "" } else { "s" };
        opts.print(
            &format!("server {} at {}: {} client{plural}", s.id, s.addr, s.load),
            serde_json::json!({ "id": s.id, "name": s.name, "addr": s.addr, "load": s.load }),
        )?;
    }
    Ok(())
}

/// `fastchat trust USER`: accept USER's current keys.
pub fn trust(opts: &Options, peer: &str) -> Result<()> {
    names::validate("user", peer)?;
    let session = login(opts)?;
    let keys = session.e2e.lock().trust(peer)?;
    let fp = fingerprint(&keys)?;
    opts.print(
        &format!("now trusting {peer} with fingerprint {fp}"),
        serde_json::json!({ "user": peer, "fingerprint": fp }),
    )
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
    /// Add our key change (after `fastchat rekey`, where it could not be added then).
    KeyChange(String),
}

impl GroupCmd {
    /// Parses the words after `/group` in chat mode.
    pub(super) fn parse(words: &str) -> Result<GroupCmd> {
        let usage = || {
            Error::Invalid(
                "usage: /group create|add|remove|leave|send|send-file|list|members|key-change ...; /help lists them"
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
            "key-change" => GroupCmd::KeyChange(one("key-change GROUP")?),
            _ => return Err(usage()),
        })
    }

    /// Checks names and text before anything is sent.
    fn validate(&self) -> Result<()> {
        match self {
            GroupCmd::Create(g)
            | GroupCmd::Leave(g)
            | GroupCmd::Members(g)
            | GroupCmd::KeyChange(g)
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

    /// Runs the command; returns what to print, one line each, with its JSON. Membership
    /// shown is the group's verified chain of changes, not the server's word.
    pub(super) fn run(&self, client: &Client, e2e: &mut E2e) -> Result<Vec<(String, Value)>> {
        self.validate()?;
        let me = client.user().to_string();
        let group = |g: &str| resolve_group(client, &me, g, false);
        let one = |text: String, json: Value| Ok(vec![(text, json)]);
        match self {
            GroupCmd::Create(g) => {
                let g = resolve_group(client, &me, g, true)?;
                e2e.group_create(client, &g)?;
                one(
                    format!("created group {g}; you are its admin"),
                    json!({ "group": g, "admin": me }),
                )
            }
            GroupCmd::Add(g, u) => {
                let g = group(g)?;
                e2e.group_add(client, &g, u)?;
                one(
                    format!("added {u} to {g}"),
                    json!({ "group": g, "added": u }),
                )
            }
            GroupCmd::Remove(g, u) => {
                let g = group(g)?;
                let epoch = e2e.group_remove(client, &g, u)?;
                one(
                    format!("removed {u} from {g}; new group key (epoch {epoch})"),
                    json!({ "group": g, "removed": u, "epoch": epoch }),
                )
            }
            GroupCmd::Leave(g) => {
                let g = group(g)?;
                e2e.group_leave(client, &g)?;
                one(format!("left {g}"), json!({ "group": g, "left": true }))
            }
            GroupCmd::Send(g, text) => {
                let g = group(g)?;
                let id = e2e.group_send(client, &g, &Plain::Text(text.clone()))?;
                e2e.remember_sent(&g, text);
                one(
                    format!("stored message {id} for group {g}"),
                    json!({ "id": id, "group": g }),
                )
            }
            GroupCmd::SendFile(g, path) => {
                let g = group(g)?;
                let (text, json) = file_sent(client, e2e, Target::Group(&g), path)?;
                one(text, json)
            }
            GroupCmd::List => {
                let groups = client.group_list()?;
                if groups.is_empty() {
                    return one("no groups".into(), Value::Null);
                }
                Ok(groups
                    .iter()
                    .map(|g| match e2e.group_roster(client, &g.name) {
                        Ok(r) => {
                            let n = r.members.len();
                            let plural = if n == 1 { "" } else { "s" };
                            (
                                format!("{}: {n} member{plural}, admin {}", g.name, r.admin),
                                json!({ "group": g.name, "members": n, "admin": r.admin }),
                            )
                        }
                        Err(e) => {
                            let why = one_line(&e.to_string());
                            (
                                format!("{}: {why}", g.name),
                                json!({ "group": g.name, "error": why }),
                            )
                        }
                    })
                    .collect())
            }
            GroupCmd::KeyChange(g) => {
                let g = group(g)?;
                e2e.group_key_change_again(client, &g)?;
                one(
                    format!("added your key change to {g}; its new group key is made with your new keys"),
                    json!({ "group": g, "key_change": true }),
                )
            }
            GroupCmd::Members(g) => {
                let roster = e2e.group_roster(client, &group(g)?)?;
                Ok(roster
                    .members
                    .iter()
                    .map(|m| {
                        let admin = *m == roster.admin;
                        let text = if admin {
                            format!("{m} (admin)")
                        } else {
                            m.clone()
                        };
                        (text, json!({ "user": m, "admin": admin }))
                    })
                    .collect())
            }
        }
    }
}

/// The full name of the group a command names: `OWNER/NAME` as given; or, for a short name,
/// our own group of that name when creating, else the one group of ours with that name.
pub(super) fn resolve_group(
    client: &Client,
    me: &str,
    given: &str,
    creating: bool,
) -> Result<String> {
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
    let lines = cmd.run(&me.client, &mut me.e2e.lock())?;
    for (text, json) in lines {
        // An empty list prints nothing as JSON.
        if !(opts.json && json.is_null()) {
            opts.print(&text, json)?;
        }
    }
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

/// How `recv` reads the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvOptions {
    /// After the queue is drained, keep showing live messages this long.
    pub wait: Duration,
    /// Show without acknowledging: everything stays queued (and is shown again next time).
    pub peek: bool,
    /// Stop after showing this many messages.
    pub limit: Option<u64>,
}

/// Acknowledgements are sent in pages of this many while a queue drains (the server takes at
/// most 4096 ids in one).
const ACK_PAGE: usize = 1024;

/// `fastchat recv [--wait SECS] [--peek] [--limit N]`: prints queued messages and acknowledges
/// them (in pages, so any queue drains), then waits up to `wait` for live ones. Ctrl-C ends it
/// cleanly, even while it is looking for another server.
pub fn recv(opts: &Options, how: RecvOptions) -> Result<()> {
    let format = if opts.json {
        Format::Json
    } else {
        Format::Lines
    };
    let me = login(opts)?;
    let interrupted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        // The loop below notices Ctrl-C within 200 ms; a client stuck looking for another
        // server is closed, which ends its search.
        let (flag, client, interrupt) = (
            Arc::clone(&interrupted),
            Arc::clone(&me.client),
            opts.interrupt.clone(),
        );
        std::thread::spawn(move || {
            if interrupt.recv().is_ok() {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(500));
                client.close();
            }
        });
    }
    let stopped = || interrupted.load(std::sync::atomic::Ordering::SeqCst);
    match recv_loop(opts, &me, how, format, &stopped) {
        Err(_) if stopped() => Ok(()),
        other => other,
    }
}

fn recv_loop(
    opts: &Options,
    me: &LoggedIn,
    how: RecvOptions,
    format: Format,
    stopped: &dyn Fn() -> bool,
) -> Result<()> {
    let out = io::stdout();
    // No deadline until the queue is drained (bounded by the server's queue); then `wait`.
    let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
    let mut deadline = far;
    let mut batch: Vec<i64> = Vec::new();
    let mut shown = 0u64;
    let mut receipts = Receipts::default();
    // Acknowledges a page, and sends the receipts it earned.
    let ack = |batch: &mut Vec<i64>, receipts: &mut Receipts| -> Result<()> {
        receipts.send(&me.client, &me.e2e);
        if how.peek || batch.is_empty() {
            batch.clear();
            return Ok(());
        }
        // The keys of what was shown go before the acknowledgement.
        me.e2e.lock().settle()?;
        me.client.ack(&std::mem::take(batch))
    };
    loop {
        if how.limit.is_some_and(|n| shown >= n) {
            return ack(&mut batch, &mut receipts);
        }
        // Wake up now and then to notice Ctrl-C.
        let slice = deadline.min(Instant::now() + Duration::from_millis(200));
        let event = me.client.next(slice)?;
        if stopped() {
            return ack(&mut batch, &mut receipts);
        }
        let Some(event) = event else {
            if Instant::now() >= deadline {
                return ack(&mut batch, &mut receipts);
            }
            continue;
        };
        match event {
            Event::Message(msg) => {
                let done = show(
                    &me.e2e,
                    &me.client,
                    &me.downloads,
                    &msg,
                    format,
                    !how.peek,
                    &mut out.lock(),
                );
                let done = match done {
                    // What was shown is acknowledged before the command ends quietly.
                    Err(Error::OutputClosed) => {
                        ack(&mut batch, &mut receipts)?;
                        return Err(Error::OutputClosed);
                    }
                    other => other?,
                };
                // An offered file stays queued until it is taken with `get`.
                if done != Shown::Offered {
                    batch.push(msg.id);
                }
                if done == Shown::Answer && opts.receipts {
                    let reached = if how.peek {
                        Reached::Delivered
                    } else {
                        Reached::Read
                    };
                    receipts.add(&msg, reached);
                }
                if done != Shown::Silent {
                    shown += 1;
                }
                if deadline != far || batch.len() >= ACK_PAGE {
                    ack(&mut batch, &mut receipts)?;
                }
            }
            Event::Synced => {
                ack(&mut batch, &mut receipts)?;
                if how.wait.is_zero() {
                    return Ok(());
                }
                if deadline == far {
                    deadline = Instant::now() + how.wait;
                }
            }
            Event::Presence { .. } => {}
            Event::Failover(server) => {
                if !opts.json {
                    eprintln!("fastchat: server lost; continuing on server {}", server.id)
                }
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
    record: bool,
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
    // A sender key was installed as it opened: nothing to show.
    if let Plain::SenderKey(_) = &opened.plain {
        if record {
            e2e.lock().shown(&opened)?;
        }
        return Ok(Shown::Silent);
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
    match (format, plain) {
        // Receipts are for the sender's client (the chat shows them); a script sees them
        // with --json.
        (Format::Lines, Plain::Receipt(_)) => {}
        (Format::Lines, _) => {
            writeln!(out, "{}", message_line(msg, plain, path.as_deref())).map_err(output_error)?
        }
        (Format::Json, _) => {
            let mut json = serde_json::json!({
                "id": msg.id,
                "from": msg.from,
                "to": (!msg.to.is_empty()).then_some(&msg.to),
                "group": msg.group,
                "sent_at": msg.sent_at,
            });
            let fields = match plain {
                Plain::Text(t) => serde_json::json!({ "kind": "text", "text": t }),
                Plain::Membership(t) => serde_json::json!({ "kind": "membership", "text": t }),
                // (Opened messages carry removals as the membership notice they checked out as.)
                Plain::Removal(s) => serde_json::json!({
                    "kind": "membership",
                    "text": crate::membership::describe(&s.change),
                }),
                Plain::File(offer) => serde_json::json!({
                    "kind": "file",
                    "name": offer.name,
                    "size": offer.size,
                    "path": path,
                }),
                Plain::SenderKey(k) => serde_json::json!({
                    "kind": "sender-key",
                    "group": k.group,
                    "epoch": k.epoch,
                }),
                Plain::Receipt(r) => serde_json::json!({
                    "kind": "receipt",
                    "reached": match r.reached {
                        Reached::Delivered => "delivered",
                        Reached::Read => "read",
                    },
                    "of": r.of.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
                }),
            };
            if let (Some(all), serde_json::Value::Object(more)) = (json.as_object_mut(), fields) {
                all.extend(more);
            }
            writeln!(out, "{json}").map_err(output_error)?
        }
    }
    out.flush().map_err(output_error)?;
    // Peeked at, it is not recorded as shown: shown again next time, it must not look like a
    // replay.
    if record {
        let mut e2e = e2e.lock();
        e2e.shown(&opened)?;
        if let Some(text) = history_text(plain) {
            let conversation = msg.group.as_deref().unwrap_or(&msg.from);
            e2e.remember_at(msg.sent_at, conversation, &msg.from, &text);
        }
    }
    Ok(match opened.plain {
        Plain::Receipt(r) => Shown::Receipt(r),
        Plain::Text(_) | Plain::File(_) if msg.group.is_none() => Shown::Answer,
        _ => Shown::Done,
    })
}

/// What the local history keeps of a message (receipts are not kept).
pub(super) fn history_text(plain: &Plain) -> Option<String> {
    match plain {
        Plain::Text(t) => Some(t.clone()),
        Plain::Membership(t) => Some(format!("* {t}")),
        Plain::Removal(s) => Some(format!("* {}", crate::membership::describe(&s.change))),
        Plain::File(offer) => Some(format!(
            "sent {} ({})",
            offer.name,
            files::human_size(offer.size)
        )),
        Plain::Receipt(_) | Plain::SenderKey(_) => None,
    }
}

/// What [`show`] did with a message. Anything but `Offered` is acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Shown {
    /// Shown (or reported as rejected).
    Done,
    /// A new direct message, shown: its sender may be sent a receipt.
    Answer,
    /// A receipt for messages we sent (not shown as a message).
    Receipt(Receipt),
    /// A file offered and not saved: leave it queued until `get` takes it.
    Offered,
    /// Handled, not shown (a sender key): acknowledged, not counted.
    Silent,
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
            )
            .map_err(output_error)?
        }
        Format::Json => writeln!(
            out,
            "{}",
            serde_json::json!({
                "id": msg.id,
                "from": msg.from,
                "to": (!msg.to.is_empty()).then_some(&msg.to),
                "group": msg.group,
                "sent_at": msg.sent_at,
                "kind": "file-offer",
                "name": offer.name,
                "size": offer.size,
            })
        )
        .map_err(output_error)?,
    }
    out.flush().map_err(output_error)?;
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
    let format = if opts.json {
        Format::Json
    } else {
        Format::Lines
    };
    take_offer(
        &me.e2e,
        &me.client,
        &me.downloads,
        &msg,
        format,
        &mut io::stdout().lock(),
    )
}

/// Saves the file `msg` offers, whatever its size, shows it, and acknowledges it.
pub(super) fn take_offer(
    e2e: &Mutex<E2e>,
    client: &Client,
    downloads: &Downloads,
    msg: &Envelope,
    format: Format,
    out: &mut impl Write,
) -> Result<()> {
    let all = Downloads {
        auto_max: u64::MAX,
        ..downloads.clone()
    };
    show(e2e, client, &all, msg, format, true, out)?;
    e2e.lock().settle()?;
    client.ack(&[msg.id])
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
        Plain::Removal(s) => format!(
            "{prefix}* {}",
            one_line(&crate::membership::describe(&s.change))
        ),
        Plain::SenderKey(k) => format!(
            "{prefix}* {} handed you their key for {} (epoch {})",
            msg.from, k.group, k.epoch
        ),
        Plain::Receipt(r) => format!(
            "{prefix}* {} {} {} of your messages",
            msg.from,
            match r.reached {
                Reached::Delivered => "received",
                Reached::Read => "read",
            },
            r.of.len()
        ),
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
