//! `fastchat group ...` (and `/group ...` in chat).

use std::path::PathBuf;

use serde_json::{json, Value};

use crate::client::e2e::{E2e, Left, Plain};
use crate::client::files::Target;
use crate::client::text::one_line;
use crate::client::Client;
use crate::error::{Error, ErrorCode, Result};
use crate::names;

use super::login::login;
use super::send::file_sent;
use super::Options;

/// A `fastchat group ...` command (also `/group ...` in chat mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupCmd {
    /// Create a group; the caller becomes its admin.
    Create(String),
    /// Admin: add users, one change each, in the order given.
    Add(String, Vec<String>),
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
    pub(in crate::client) fn parse(words: &str) -> Result<GroupCmd> {
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
                let (g, users) = two("add GROUP USER...")?;
                GroupCmd::Add(g, users.split_whitespace().map(str::to_string).collect())
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
            GroupCmd::Add(g, users) => {
                names::validate_group_ref(g)?;
                for (i, u) in users.iter().enumerate() {
                    names::validate("user", u)?;
                    if users[..i].contains(u) {
                        return Err(Error::Invalid(format!(
                            "{u} is named twice: nobody was added"
                        )));
                    }
                }
                Ok(())
            }
            GroupCmd::Remove(g, u) => {
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

    /// Runs the command, handing `out` each line to print with its JSON as it is done (so
    /// that what was done is shown even if a later step fails). Membership shown is the
    /// group's verified chain of changes, not the server's word.
    pub(in crate::client) fn run(
        &self,
        client: &Client,
        e2e: &mut E2e,
        out: &mut dyn FnMut(String, Value) -> Result<()>,
    ) -> Result<()> {
        self.validate()?;
        let me = client.user().to_string();
        let group = |g: &str| resolve_group(client, &me, g, false);
        match self {
            GroupCmd::Create(g) => {
                let g = resolve_group(client, &me, g, true)?;
                e2e.group_create(client, &g)?;
                out(
                    format!("created group {g}; you are its admin"),
                    json!({ "group": g, "admin": me }),
                )
            }
            GroupCmd::Add(g, users) => {
                let g = group(g)?;
                if let [_, _, ..] = &users[..] {
                    // Several: all or none, as far as can be known beforehand.
                    let roster = e2e.group_roster(client, &g)?;
                    if roster.admin != me {
                        return Err(Error::refused(
                            ErrorCode::NotAllowed,
                            format!("only the admin of {g} ({}) can add members", roster.admin),
                        ));
                    }
                    for u in users {
                        if roster.has(u) {
                            return Err(Error::Invalid(format!(
                                "{u} is already a member of {g}: nobody was added"
                            )));
                        }
                        e2e.peer_keys(u).map_err(|e| match e {
                            Error::Refused { code, message } => {
                                Error::refused(code, format!("{message}: nobody was added"))
                            }
                            e => e,
                        })?;
                    }
                }
                for u in users {
                    e2e.group_add(client, &g, u)?;
                    out(
                        format!("added {u} to {g}"),
                        json!({ "group": g, "added": u }),
                    )?;
                }
                Ok(())
            }
            GroupCmd::Remove(g, u) => {
                let g = group(g)?;
                let epoch = e2e.group_remove(client, &g, u)?;
                out(
                    format!("removed {u} from {g}; new group key (epoch {epoch})"),
                    json!({ "group": g, "removed": u, "epoch": epoch }),
                )
            }
            GroupCmd::Leave(g) => {
                let g = group(g)?;
                match e2e.group_leave(client, &g)? {
                    Left::Member => out(format!("left {g}"), json!({ "group": g, "left": true })),
                    Left::HandedTo(admin) => out(
                        format!("left {g}; {admin} is now its admin"),
                        json!({ "group": g, "left": true, "admin": admin }),
                    ),
                    Left::Deleted => out(
                        format!("left {g}, its last member: the group is gone"),
                        json!({ "group": g, "left": true, "deleted": true }),
                    ),
                }
            }
            GroupCmd::Send(g, text) => {
                let g = group(g)?;
                let id = e2e.group_send(client, &g, &Plain::Text(text.clone()))?;
                e2e.remember_sent(&g, text);
                out(
                    format!("stored message {id} for group {g}"),
                    json!({ "id": id, "group": g }),
                )
            }
            GroupCmd::SendFile(g, path) => {
                let g = group(g)?;
                let (text, json) = file_sent(client, e2e, Target::Group(&g), path)?;
                out(text, json)
            }
            GroupCmd::List => {
                let groups = client.group_list()?;
                if groups.is_empty() {
                    return out("no groups".into(), Value::Null);
                }
                for g in &groups {
                    let (text, json) = match e2e.group_roster(client, &g.name) {
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
                    };
                    out(text, json)?;
                }
                Ok(())
            }
            GroupCmd::KeyChange(g) => {
                let g = group(g)?;
                e2e.group_key_change_again(client, &g)?;
                out(
                    format!("added your key change to {g}; its new group key is made with your new keys"),
                    json!({ "group": g, "key_change": true }),
                )
            }
            GroupCmd::Members(g) => {
                let roster = e2e.group_roster(client, &group(g)?)?;
                for m in &roster.members {
                    let admin = *m == roster.admin;
                    let text = if admin {
                        format!("{m} (admin)")
                    } else {
                        m.clone()
                    };
                    out(text, json!({ "user": m, "admin": admin }))?;
                }
                Ok(())
            }
        }
    }
}

/// The full name of the group a command names: `OWNER/NAME` as given; or, for a short name,
/// our own group of that name when creating, else the one group of ours with that name.
pub(in crate::client) fn resolve_group(
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
            ErrorCode::UnknownGroup,
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
    let mut e2e = me.e2e.lock();
    cmd.run(&me.client, &mut e2e, &mut |text, json| {
        // An empty list prints nothing as JSON.
        if opts.json && json.is_null() {
            return Ok(());
        }
        opts.print(&text, json)
    })
}
