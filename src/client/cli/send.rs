//! Sending: `send` (also to many at once), `send-file`, and the local `history`.

use std::io;
use std::path::Path;

use serde_json::json;

use crate::client::agent;
use crate::client::e2e::E2e;
use crate::client::files::{self, Target};
use crate::client::keystore::Keystore;
use crate::client::text::one_line;
use crate::client::Client;
use crate::crypto::{self, Identity};
use crate::error::{Error, Result};
use crate::names;

use super::login::login;
use super::Options;

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
    let history =
        crate::client::history::History::new(store.dir().to_path_buf(), &user, &identity)?;
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
pub(in crate::client) fn history_line(e: &crate::client::history::Entry, date: bool) -> String {
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
