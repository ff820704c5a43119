//! Accounts and keys: `signup`, `rekey` (and the key changes it adds to groups), `trust`.

use serde_json::json;

use crate::client::agent;
use crate::client::balancer::Session;
use crate::client::e2e::fingerprint;
use crate::client::keystore::Keystore;
use crate::client::prekeys::{self, Prekeys};
use crate::client::{BalancerClient, Client};
use crate::crypto::Identity;
use crate::error::{Error, ErrorCode, Result};
use crate::names;
use crate::net::NewPrekeys;

use super::login::{logged_in, login};
use super::Options;

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
            // Said before the repeat is asked for.
            if let Some(problem) = crate::net::new_password_problem(&p) {
                return Err(Error::Invalid(problem));
            }
            if opts.password(&format!("repeat the password for {name}: "))? != p {
                return Err(Error::Invalid("the passwords differ".into()));
            }
            p
        }
    };
    if let Some(problem) = crate::net::new_password_problem(&password) {
        return Err(Error::Invalid(problem));
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
