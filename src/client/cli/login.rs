//! Logging in for a command (with a kept session or the password), `login` and `logout`
//! of kept sessions, `whoami`, `servers`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::client::agent;
use crate::client::balancer::Session;
use crate::client::e2e::{Directory, E2e};
use crate::client::keystore::{KeptSession, Keystore};
use crate::client::prekeys;
use crate::client::{BalancerClient, Client};
use crate::crypto::{Identity, SessionKey};
use crate::error::{Error, ErrorCode, Result};
use crate::net::Envelope;

use super::Options;

/// Where received files go, and which are saved at once.
#[derive(Debug, Clone)]
pub(in crate::client) struct Downloads {
    /// `FASTCHAT_HOME/USER/downloads/`.
    pub(in crate::client) dir: PathBuf,
    /// Files up to this size are saved when they arrive; larger ones wait for `get`.
    pub(in crate::client) auto_max: u64,
}

/// A logged-in user: the (failover-capable) client and the end-to-end state.
pub(in crate::client) struct LoggedIn {
    /// The connection, shared with the chat's printer thread.
    pub(in crate::client) client: Arc<Client>,
    /// Keys and pins; locked to seal or open one message.
    pub(in crate::client) e2e: Arc<Mutex<E2e>>,
    /// Where received files are saved.
    pub(in crate::client) downloads: Downloads,
    /// Files offered and not saved yet (larger than `downloads.auto_max`), by message id:
    /// `/get ID` in chat saves one.
    pub(in crate::client) offers: Arc<Mutex<HashMap<i64, Envelope>>>,
    /// A kept session (`fastchat login`) outlives the command; any other ends with it.
    pub(in crate::client) kept: bool,
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
pub(in crate::client) fn login(opts: &Options) -> Result<LoggedIn> {
    let user = opts.user()?.to_string();
    let store = Keystore::new(&opts.home, &user);
    if let Some(me) = kept_login(opts, &user, &store)? {
        return Ok(me);
    }
    let password = opts.password(&format!("password for {user}: "))?;
    let (client, balancer) = Client::login(&opts.balancer, &opts.transport, &user, &password)?;
    let identity = store
        .load_identity(&password)
        .map_err(|e| after_reset(e, &user, &store))?;
    logged_in(opts, client, balancer, identity, store, false)
}

/// A key file that the account's own password does not open, once the balancer took that
/// password: most likely an operator reset it (`fastchat-admin users reset-password`), and
/// the keys are still under the old one.
fn after_reset(e: Error, user: &str, store: &Keystore) -> Error {
    match e {
        Error::Integrity(_) => Error::Integrity(format!(
            "the balancer took this password for {user}, but the key file in {} does not \
             open with it: if an operator reset your password, run `fastchat --user {user} \
             rekey` to make new keys with it (messages sealed for the old keys are lost); \
             otherwise the file is damaged",
            store.dir().display()
        )),
        other => other,
    }
}

pub(super) fn logged_in(
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
    let mut b = BalancerClient::connect(&opts.balancer, &opts.transport)?;
    let session = b.login(&user, &password)?;
    let identity = store
        .load_identity(&password)
        .map_err(|e| after_reset(e, &user, &store))?;
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
