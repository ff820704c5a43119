//! What `fastchat-admin` does on a cluster's database: accounts (list, make in bulk, reset,
//! delete), who is online where, queues (depth, purge), sessions (kick), an export of what
//! the servers hold, and wiping a class. It works on the database file that the balancer and
//! servers share, while they run: they see its changes at once (a kicked user's connections
//! close at their server's next heartbeat).
//!
//! Every command prints for people, or with `json` one JSON object per line.

use std::collections::HashSet;
use std::io::{self, Write};

use serde_json::{json, Value};

use crate::client::cli::output_error;
use crate::crypto::{self, ScryptCost};
use crate::db::{Exported, Location, Store, UserSummary};
use crate::error::{Error, ErrorCode, Result};
use crate::names;
use crate::net::new_password_problem;
use crate::units::{counted, human_size, utc_minute};

/// A roster line: a name, and its password if the file gives one.
pub type RosterEntry = (String, Option<String>);

/// The operator's handle on a cluster's database.
pub struct Admin {
    store: Store,
    json: bool,
    cost: ScryptCost,
}

impl Admin {
    /// Opens the database at `db`, which must exist (a typo must not create an empty one).
    /// `cost` is the scrypt cost of the passwords it sets.
    pub fn open(db: &Location, json: bool, cost: ScryptCost) -> Result<Admin> {
        if db.path().is_some_and(|p| !p.is_file()) {
            return Err(Error::Invalid(format!(
                "no database at {db}: give the --db the balancer uses"
            )));
        }
        Ok(Admin {
            store: Store::open(db.clone())?,
            json,
            cost,
        })
    }

    /// Prints one result: `text` for people, or `value` as one JSON line.
    fn emit(&self, text: &str, value: Value) -> Result<()> {
        let mut out = io::stdout().lock();
        if self.json {
            writeln!(out, "{value}")
        } else {
            writeln!(out, "{text}")
        }
        .and_then(|()| out.flush())
        .map_err(output_error)
    }

    /// Every account.
    fn all_users(&self) -> Result<Vec<UserSummary>> {
        self.store.read(|tx| tx.users())
    }

    /// The stored spelling of `name` (names are unique regardless of case).
    fn canonical(&self, name: &str) -> Result<String> {
        names::validate("user", name)?;
        self.all_users()?
            .into_iter()
            .map(|u| u.name)
            .find(|n| n.eq_ignore_ascii_case(name))
            .ok_or_else(|| Error::refused(ErrorCode::UnknownUser, format!("no such user: {name}")))
    }

    /// A table's header line for people (none in JSON), or, for a table without rows, a line
    /// that says so: a header alone reads like output cut short.
    fn header(&self, empty: bool, header: &str, nothing: &str) -> Result<()> {
        match (self.json, empty) {
            (true, _) => Ok(()),
            (false, false) => self.emit(header, Value::Null),
            (false, true) => self.emit(nothing, Value::Null),
        }
    }

    /// `users list`: every account, with what it holds.
    pub fn list(&self) -> Result<()> {
        let users = self.all_users()?;
        self.header(
            users.is_empty(),
            &format!(
                "{:<32} {:<16} {:<9} {:>7} {:>10} {:>5} {:>6}",
                "USER", "SINCE (UTC)", "KEYS", "QUEUED", "BYTES", "CONNS", "GROUPS"
            ),
            "no accounts (fastchat signup NAME, or fastchat-admin users add NAME)",
        )?;
        for u in &users {
            let keys = match (u.has_keys, u.may_rekey) {
                (false, _) => "unclaimed",
                (true, true) => "reset",
                (true, false) => "yes",
            };
            self.emit(
                &format!(
                    "{:<32} {:<16} {:<9} {:>7} {:>10} {:>5} {:>6}",
                    u.name,
                    utc_minute(u.created_at),
                    keys,
                    u.queued,
                    human_size(u.queued_bytes),
                    u.connections,
                    u.groups
                ),
                serde_json::to_value(u).map_err(|e| Error::Invalid(e.to_string()))?,
            )?;
        }
        Ok(())
    }

    /// `users add` and `users bulk`: makes accounts without keys, each claimed by its owner's
    /// first `fastchat signup NAME` with the password. A generated password is printed once
    /// (it is stored only as a hash). Names that exist already are reported and left alone,
    /// so a class's roster may be run again.
    pub fn add(&self, roster: &[RosterEntry]) -> Result<()> {
        for (name, given) in roster {
            names::validate("user", name)?;
            if let Some(p) = given {
                check_password(p)?;
            }
        }
        for (name, given) in roster {
            let password = match given {
                Some(p) => p.clone(),
                None => generate_password()?,
            };
            let hash = crypto::hash_password(&password, self.cost)?;
            let owned = name.clone();
            let created = self
                .store
                .call(move |tx| tx.create_account(&owned, &hash))?;
            let shown = if given.is_some() {
                None
            } else {
                Some(&password)
            };
            let text = match (created, shown) {
                (true, Some(p)) => format!("{name:<32} {p}"),
                (true, None) => format!("{name:<32} (password from the file)"),
                (false, _) => format!("{name:<32} exists already: left as it is"),
            };
            self.emit(
                &text,
                json!({ "user": name, "created": created, "password": shown.filter(|_| created) }),
            )?;
        }
        Ok(())
    }

    /// `users reset-password NAME`: a new password (given, or generated and printed once);
    /// their sessions end, and their next `fastchat rekey` may upload new keys.
    pub fn reset_password(&self, name: &str, given: Option<String>) -> Result<()> {
        let name = self.canonical(name)?;
        let password = match &given {
            Some(p) => check_password(p)?,
            None => generate_password()?,
        };
        let hash = crypto::hash_password(&password, self.cost)?;
        let owned = name.clone();
        if !self
            .store
            .call(move |tx| tx.reset_password(&owned, &hash))?
        {
            return Err(Error::refused(
                ErrorCode::UnknownUser,
                format!("no such user: {name}"),
            ));
        }
        let shown = given.is_none().then_some(password);
        let text = match &shown {
            Some(p) => format!(
                "reset {name}: new password {p}; they run `fastchat rekey` with it (or `fastchat \
                 signup {name}` on a machine without their keys)"
            ),
            None => format!("reset {name}; they run `fastchat rekey` with the new password"),
        };
        self.emit(&text, json!({ "user": name, "password": shown }))
    }

    /// `users delete NAME...`: each account with its sessions, queue, files and the groups it
    /// owns.
    pub fn delete(&self, names: &[String]) -> Result<()> {
        let names = names
            .iter()
            .map(|n| self.canonical(n))
            .collect::<Result<Vec<_>>>()?;
        for name in names {
            let owned = name.clone();
            let Some(gone) = self.store.call(move |tx| tx.delete_user(&owned))? else {
                continue;
            };
            let mut text = format!(
                "deleted {name}: {}",
                counted(gone.messages_deleted, "queued message")
            );
            if !gone.groups_deleted.is_empty() {
                text += &format!(", groups {}", gone.groups_deleted.join(", "));
            }
            if !gone.groups_left.is_empty() {
                text += &format!(
                    "; still named in the member lists of {} until their admins remove them",
                    gone.groups_left.join(", ")
                );
            }
            let mut value =
                serde_json::to_value(&gone).map_err(|e| Error::Invalid(e.to_string()))?;
            value["user"] = json!(name);
            self.emit(&text, value)?;
        }
        Ok(())
    }

    /// `online`: who is connected to which server.
    pub fn online(&self) -> Result<()> {
        let rows = self.store.read(|tx| tx.online())?;
        self.header(
            rows.is_empty(),
            &format!("{:<32} {:<20} {:>5}", "USER", "SERVER", "CONNS"),
            "nobody is online",
        )?;
        for r in &rows {
            let server = if r.server.is_empty() {
                format!("#{}", r.server_id)
            } else {
                format!("{} (#{})", r.server, r.server_id)
            };
            self.emit(
                &format!("{:<32} {:<20} {:>5}", r.user, server, r.connections),
                serde_json::to_value(r).map_err(|e| Error::Invalid(e.to_string()))?,
            )?;
        }
        Ok(())
    }

    /// `queues`: how many direct messages wait for each user, deepest first.
    pub fn queues(&self) -> Result<()> {
        let mut users = self.all_users()?;
        users.retain(|u| u.queued > 0);
        users.sort_by(|a, b| b.queued.cmp(&a.queued).then(a.name.cmp(&b.name)));
        self.header(
            users.is_empty(),
            &format!("{:<32} {:>7} {:>10}", "USER", "QUEUED", "BYTES"),
            "no direct messages are waiting",
        )?;
        for u in &users {
            self.emit(
                &format!(
                    "{:<32} {:>7} {:>10}",
                    u.name,
                    u.queued,
                    human_size(u.queued_bytes)
                ),
                json!({ "user": u.name, "queued": u.queued, "queued_bytes": u.queued_bytes }),
            )?;
        }
        Ok(())
    }

    /// `purge NAME`: empties a user's queue.
    pub fn purge(&self, name: &str) -> Result<()> {
        let name = self.canonical(name)?;
        let owned = name.clone();
        let n = self.store.call(move |tx| tx.purge_queue(&owned))?;
        self.emit(
            &format!("purged {} waiting for {name}", counted(n, "message")),
            json!({ "user": name, "purged": n }),
        )
    }

    /// `kick NAME`: ends a user's sessions; their servers close their connections at the next
    /// heartbeat, and they must log in again.
    pub fn kick(&self, name: &str) -> Result<()> {
        let name = self.canonical(name)?;
        let owned = name.clone();
        let n = self.store.call(move |tx| tx.end_sessions(&owned))?;
        self.emit(
            &format!(
                "ended {} of {name}; their connections close within seconds",
                counted(n as u64, "session")
            ),
            json!({ "user": name, "sessions": n }),
        )
    }

    /// The users an announcement from `sender` goes to: everyone with keys but the sender.
    pub fn recipients(&self, sender: &str) -> Result<Vec<String>> {
        Ok(self
            .all_users()?
            .into_iter()
            .filter(|u| u.has_keys && !u.name.eq_ignore_ascii_case(sender))
            .map(|u| u.name)
            .collect())
    }

    /// `export [NAME]`: what the servers hold, as stored: one JSON object per message, with
    /// the end-to-end encrypted body in hex. Nothing is decrypted: the servers cannot.
    pub fn export(&self, user: Option<&str>) -> Result<()> {
        let user = user.map(|u| self.canonical(u)).transpose()?;
        let rows = self.store.read(move |tx| tx.export(user.as_deref()))?;
        let mut out = io::stdout().lock();
        for m in &rows {
            writeln!(out, "{}", exported_json(m)).map_err(output_error)?;
        }
        out.flush().map_err(output_error)
    }

    /// `wipe`: deletes the accounts of a roster (or every account), as `delete` does.
    pub fn wipe(&self, roster: Option<&[RosterEntry]>) -> Result<()> {
        let names: Vec<String> = match roster {
            Some(r) => {
                let known: HashSet<String> = self
                    .all_users()?
                    .into_iter()
                    .map(|u| u.name.to_lowercase())
                    .collect();
                r.iter()
                    .filter(|(n, _)| known.contains(&n.to_lowercase()))
                    .map(|(n, _)| n.clone())
                    .collect()
            }
            None => self.all_users()?.into_iter().map(|u| u.name).collect(),
        };
        self.delete(&names)?;
        self.emit(
            &format!("wiped {}", counted(names.len() as u64, "account")),
            json!({ "wiped": names.len() }),
        )
    }
}

/// One exported message as JSON: `id`, `from`, `to` or `group`, `client_id`, `sent_at`
/// (milliseconds since the epoch), `file` (the file it offers, or null), `body` (hex).
fn exported_json(m: &Exported) -> Value {
    json!({
        "id": m.id,
        "from": m.sender,
        "to": m.recipient,
        "group": m.group,
        "client_id": m.client_id,
        "sent_at": m.sent_at,
        "file": m.file_id,
        "body": crypto::to_hex(&m.body),
    })
}

/// Reads a roster: one account per line, `NAME` or `NAME PASSWORD` (the password is the rest
/// of the line); blank lines and lines starting with `#` are skipped. Every bad line is
/// reported at once, and then nothing is done.
pub fn parse_roster(text: &str) -> Result<Vec<RosterEntry>> {
    let mut entries = Vec::new();
    let mut problems = Vec::new();
    let mut seen = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, password) = match line.split_once(char::is_whitespace) {
            Some((n, p)) => (n, Some(p.trim().to_string())),
            None => (line, None),
        };
        let checked = names::validate("user", name)
            .and_then(|()| password.as_deref().map(check_password).transpose());
        if let Err(e) = checked {
            problems.push(format!("line {}: {e}", i + 1));
        } else if !seen.insert(name.to_lowercase()) {
            problems.push(format!("line {}: {name} is listed twice", i + 1));
        } else {
            entries.push((name.to_string(), password));
        }
    }
    if !problems.is_empty() {
        let lines = if problems.len() == 1 { "line" } else { "lines" };
        return Err(Error::Invalid(format!(
            "the roster has {} bad {lines}, nothing was done: {}",
            problems.len(),
            problems.join("; ")
        )));
    }
    Ok(entries)
}

/// A password an operator gives: as long as a signup's must be ([`new_password_problem`]).
fn check_password(p: &str) -> Result<String> {
    match new_password_problem(p) {
        Some(problem) => Err(Error::Invalid(problem)),
        None => Ok(p.to_string()),
    }
}

/// A password to read aloud or hand out on paper: three groups of four letters and digits
/// without look-alikes (`k7mf-3qzp-x9wd`), about 61 bits.
pub fn generate_password() -> Result<String> {
    const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789";
    let mut out = String::with_capacity(14);
    let mut made = 0;
    while made < 12 {
        for b in crypto::random_bytes(16)? {
            // Rejection sampling keeps every character equally likely.
            let limit = 256 - 256 % ALPHABET.len();
            if (b as usize) < limit && made < 12 {
                if made > 0 && made % 4 == 0 {
                    out.push('-');
                }
                out.push(ALPHABET[b as usize % ALPHABET.len()] as char);
                made += 1;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rosters_give_names_and_optional_passwords() -> Result<()> {
        let r = parse_roster("# class 3b\nalice s3cret pass\n\n  bob  \n")?;
        assert_eq!(
            r,
            vec![
                ("alice".to_string(), Some("s3cret pass".to_string())),
                ("bob".to_string(), None)
            ]
        );
        Ok(())
    }

    #[test]
    fn a_bad_roster_names_every_bad_line_and_does_nothing() {
        let e = parse_roster("alice\nbad/name\nAlice xylophone\nok\ncarol short\n").unwrap_err();
        let text = e.to_string();
        assert!(text.contains("3 bad lines"), "{text}");
        assert!(text.contains("line 2"), "{text}");
        assert!(text.contains("line 3: Alice is listed twice"), "{text}");
        assert!(
            text.contains("line 5: a password must be at least 8"),
            "{text}"
        );
    }

    #[test]
    fn generated_passwords_differ_and_read_well() -> Result<()> {
        let a = generate_password()?;
        let b = generate_password()?;
        assert_ne!(a, b);
        assert_eq!(a.len(), 14);
        assert_eq!(a.matches('-').count(), 2);
        assert!(a.chars().all(|c| c == '-' || c.is_ascii_alphanumeric()));
        assert!(!a.contains(['0', 'o', '1', 'l', 'i']), "{a}");
        Ok(())
    }
}
