//! Groups: the group, member and key tables, and group messages (stored once, with a position
//! per member). The statements only; who may do what is decided by the caller
//! ([`crate::membership`]). Builds on the queue ([`super::queue`]) and files.

use rusqlite::{params, Connection, OptionalExtension};

use super::files::{drop_file, finish_upload};
use super::queue::{earlier, new_envelope, newest_message_id, remove_message};
use crate::db::{now_ms, Outgoing, StoredMessage};
use crate::error::Result;
use crate::net::{GroupInfo, WrappedKey};

/// A group's admin, members (longest-standing first), epoch and whether the epoch has keys.
pub fn group(conn: &Connection, group: &str) -> Result<Option<GroupInfo>> {
    let row: Option<(String, u64)> = conn
        .prepare_cached("SELECT admin, epoch FROM groups WHERE name = ?1")?
        .query_row(params![group], |r| {
            Ok((r.get(0)?, r.get::<_, i64>(1)? as u64))
        })
        .optional()?;
    let Some((admin, epoch)) = row else {
        return Ok(None);
    };
    let members = conn
        .prepare_cached("SELECT user FROM members WHERE grp = ?1 ORDER BY seq")?
        .query_map(params![group], |r| r.get(0))?
        .collect::<rusqlite::Result<Vec<String>>>()?;
    let keyed = conn
        .prepare_cached("SELECT 1 FROM group_keys WHERE grp = ?1 AND epoch = ?2 LIMIT 1")?
        .query_row(params![group, epoch as i64], |_| Ok(()))
        .optional()?
        .is_some();
    Ok(Some(GroupInfo {
        name: group.to_string(),
        admin,
        members,
        epoch,
        keyed,
    }))
}

/// The names of the groups `user` belongs to, sorted.
pub fn user_groups(conn: &Connection, user: &str) -> Result<Vec<String>> {
    Ok(conn
        .prepare_cached("SELECT grp FROM members WHERE user = ?1 ORDER BY grp")?
        .query_map(params![user], |r| r.get(0))?
        .collect::<rusqlite::Result<Vec<String>>>()?)
}

/// Creates a group at epoch 1 with `admin` as its only member; `false` if the name is taken.
pub fn create_group(conn: &Connection, group: &str, admin: &str) -> Result<bool> {
    let created = conn
        .prepare_cached(
            "INSERT INTO groups (name, admin, epoch, created_at) SELECT ?1, ?2, 1, ?3
             WHERE NOT EXISTS (SELECT 1 FROM groups WHERE name = ?1 COLLATE NOCASE)",
        )?
        .execute(params![group, admin, now_ms()])?;
    if created == 0 {
        return Ok(false);
    }
    add_member(conn, group, admin)?;
    Ok(true)
}

/// Adds a member; its position starts at the newest message id, so it reads only what is sent
/// after it joined.
pub fn add_member(conn: &Connection, group: &str, user: &str) -> Result<()> {
    let position = newest_message_id(conn)?;
    conn.prepare_cached(
        "INSERT INTO members (grp, user, seq, position)
         VALUES (?1, ?2, (SELECT coalesce(max(seq), 0) + 1 FROM members WHERE grp = ?1), ?3)",
    )?
    .execute(params![group, user, position])?;
    Ok(())
}

/// Removes a member, then the group messages that only they still needed.
pub fn remove_member(conn: &Connection, group: &str, user: &str) -> Result<()> {
    conn.prepare_cached("DELETE FROM members WHERE grp = ?1 AND user = ?2")?
        .execute(params![group, user])?;
    collect_group_garbage(conn, group, 0, i64::MAX)
}

/// Sets a group's admin and epoch.
pub fn set_group(conn: &Connection, group: &str, admin: &str, epoch: u64) -> Result<()> {
    conn.prepare_cached("UPDATE groups SET admin = ?2, epoch = ?3 WHERE name = ?1")?
        .execute(params![group, admin, epoch as i64])?;
    Ok(())
}

/// Deletes a group: its messages go with it (a foreign key cascade), and so do the files they
/// offer, its members and its keys.
pub fn delete_group(conn: &Connection, group: &str) -> Result<()> {
    let files: Vec<i64> = conn
        .prepare_cached(
            "DELETE FROM messages WHERE grp = ?1 AND file_id IS NOT NULL RETURNING file_id",
        )?
        .query_map(params![group], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for file in files {
        drop_file(conn, file)?;
    }
    conn.prepare_cached("DELETE FROM groups WHERE name = ?1")?
        .execute(params![group])?;
    Ok(())
}

/// Appends change `seq` (a serialized `SignedChange`) to a group's chain.
pub fn add_change(conn: &Connection, group: &str, seq: u64, change: &[u8]) -> Result<()> {
    conn.prepare_cached("INSERT INTO group_changes (grp, seq, change) VALUES (?1, ?2, ?3)")?
        .execute(params![group, seq as i64, change])?;
    Ok(())
}

/// Up to `limit` changes of a group's chain after `after`, in order.
pub fn changes(conn: &Connection, group: &str, after: u64, limit: usize) -> Result<Vec<Vec<u8>>> {
    Ok(conn
        .prepare_cached(
            "SELECT change FROM group_changes WHERE grp = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )?
        .query_map(params![group, after as i64, limit as i64], |r| r.get(0))?
        .collect::<rusqlite::Result<Vec<Vec<u8>>>>()?)
}

/// The last change of a group's chain.
pub fn last_change(conn: &Connection, group: &str) -> Result<Option<Vec<u8>>> {
    Ok(conn
        .prepare_cached(
            "SELECT change FROM group_changes WHERE grp = ?1 ORDER BY seq DESC LIMIT 1",
        )?
        .query_row(params![group], |r| r.get(0))
        .optional()?)
}

/// Stores wrapped keys of `epoch` (replacing any earlier one of the same member).
pub fn put_keys(
    conn: &Connection,
    group: &str,
    epoch: u64,
    keys: &[WrappedKey],
    by: &str,
) -> Result<()> {
    let mut insert = conn.prepare_cached(
        "INSERT OR REPLACE INTO group_keys (grp, epoch, member, wrapped, wrapped_by)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for k in keys {
        insert.execute(params![group, epoch as i64, k.member, k.wrapped, by])?;
    }
    Ok(())
}

/// `member`'s wrapped key of `epoch` and who wrapped it.
pub fn group_key(
    conn: &Connection,
    group: &str,
    epoch: u64,
    member: &str,
) -> Result<Option<(Vec<u8>, String)>> {
    Ok(conn
        .prepare_cached(
            "SELECT wrapped, wrapped_by FROM group_keys
              WHERE grp = ?1 AND epoch = ?2 AND member = ?3",
        )?
        .query_row(params![group, epoch as i64, member], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?)
}

/// `(server, user)` of every connection of a member of `group` other than `from`, by server.
fn group_online(conn: &Connection, group: &str, from: &str) -> Result<Vec<(u64, String)>> {
    let mut online = all_online(conn, group)?;
    online.retain(|(_, user)| user != from);
    Ok(online)
}

/// `(server, user)` of every connection of a member of `group`, by server, once each. Sorted
/// and made distinct here: in SQL that takes a temporary b-tree per message.
fn all_online(conn: &Connection, group: &str) -> Result<Vec<(u64, String)>> {
    let mut online = conn
        .prepare_cached(
            "SELECT p.server_id, p.user FROM presence p
               JOIN members mb ON mb.user = p.user
              WHERE mb.grp = ?1",
        )?
        .query_map(params![group], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get(1)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    online.sort_unstable();
    online.dedup();
    Ok(online)
}

/// Stores first attempts of group messages without files, as `store_group_messages` in
/// [`crate::db::Tx`] asks: those whose common case holds (the group exists with the sender as
/// a member and another member to receive, `epoch` is its current keyed one, and the sender
/// has no message with that client id stored); `None` for the others, which the one-by-one
/// path stores or refuses with its reasons. Each group is read once per call, not once per
/// message, and the checks all come before the one write of each message, so one savepoint
/// covers the call (on an error the transaction holds nothing of it), not one per message.
pub fn store_group_messages(
    conn: &Connection,
    msgs: &[(Outgoing<'_>, &str, u64)],
) -> Result<Vec<Option<StoredMessage>>> {
    conn.prepare_cached("SAVEPOINT merged_group_messages")?
        .execute([])?;
    let stored = store_common_group_messages(conn, msgs);
    if stored.is_err() {
        conn.prepare_cached("ROLLBACK TO merged_group_messages")?
            .execute([])?;
    }
    conn.prepare_cached("RELEASE merged_group_messages")?
        .execute([])?;
    stored
}

fn store_common_group_messages(
    conn: &Connection,
    msgs: &[(Outgoing<'_>, &str, u64)],
) -> Result<Vec<Option<StoredMessage>>> {
    // Per group of the call: its state, and who of it is online where.
    type Online = Vec<(u64, String)>;
    let mut seen: Vec<(&str, Option<GroupInfo>, Online)> = Vec::new();
    let mut stored = Vec::with_capacity(msgs.len());
    for (msg, group, epoch) in msgs {
        let at = match seen.iter().position(|(name, ..)| name == group) {
            Some(at) => at,
            None => {
                let state = self::group(conn, group)?;
                let online = match &state {
                    Some(_) => all_online(conn, group)?,
                    None => Vec::new(),
                };
                seen.push((group, state, online));
                seen.len() - 1
            }
        };
        let (_, state, online) = &seen[at];
        let common = state.as_ref().is_some_and(|g| {
            g.members.iter().any(|m| m == msg.from)
                && g.members.len() > 1
                && g.epoch == *epoch
                && g.keyed
        });
        if !common || earlier(conn, msg, "", Some(group), i64::MAX)?.is_some() {
            stored.push(None);
            continue;
        }
        stored.push(Some(insert_group_message(
            conn,
            msg,
            group,
            online
                .iter()
                .filter(|(_, u)| u != msg.from)
                .cloned()
                .collect(),
        )?));
    }
    Ok(stored)
}

/// The earlier copy of a re-sent group message (stored, or delivered with an id above
/// `resend_after`; a first attempt looks among stored messages only), with the members to
/// route it to.
pub fn stored_group_copy(
    conn: &Connection,
    msg: &Outgoing<'_>,
    group: &str,
) -> Result<Option<StoredMessage>> {
    let after = msg.resend_after.unwrap_or(i64::MAX);
    match earlier(conn, msg, "", Some(group), after)? {
        Some(envelope) => Ok(Some(StoredMessage {
            envelope,
            online_at: group_online(conn, group, msg.from)?,
        })),
        None => Ok(None),
    }
}

/// Stores a group message once, offering `msg.file` if set; returns it with the other
/// members' connections.
pub fn store_group_message(
    conn: &Connection,
    msg: &Outgoing<'_>,
    group: &str,
) -> Result<StoredMessage> {
    if let Some(upload) = msg.file {
        finish_upload(conn, msg.from, upload)?;
    }
    let online_at = group_online(conn, group, msg.from)?;
    let stored = insert_group_message(conn, msg, group, online_at)?;
    // A sender alone in the group: nobody will ever acknowledge it.
    let id = stored.envelope.id;
    collect_group_garbage(conn, group, id - 1, id)?;
    Ok(stored)
}

/// Stores a group message (its upload, if any, finished) with `online_at`, the other members'
/// connections. A sender alone in its group is the caller's to deal with.
fn insert_group_message(
    conn: &Connection,
    msg: &Outgoing<'_>,
    group: &str,
    online_at: Vec<(u64, String)>,
) -> Result<StoredMessage> {
    let now = now_ms();
    conn.prepare_cached(
        "INSERT INTO messages (sender, grp, client_id, body, sent_at, file_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        msg.from,
        group,
        msg.client_id as i64,
        msg.body,
        now,
        msg.file
    ])?;
    let envelope = new_envelope(conn, msg, "", Some(group), now);
    Ok(StoredMessage {
        envelope,
        online_at,
    })
}

/// Acknowledges `acked`, ids of messages of `group` not sent by `user` (in any order, repeats
/// allowed; ids the user already passed, or all of them if the user is not a member, are
/// ignored): moves the position over every acknowledged message
/// that directly follows it, keeps the others in `group_acks` until the gap before them
/// closes, then removes the group messages that no recipient still needs. Returns how many
/// ids were not acknowledged before.
///
/// One walk per group and batch: the messages after the position are read in order by one
/// statement, stepped only as far as the acknowledgements reach, so a batch of k in-order
/// acknowledgements costs a handful of statements, not several per id.
pub fn acknowledge(
    conn: &Connection,
    group: &str,
    user: &str,
    mut acked: Vec<i64>,
) -> Result<usize> {
    let start: Option<i64> = conn
        .prepare_cached("SELECT position FROM members WHERE grp = ?1 AND user = ?2")?
        .query_row(params![group, user], |r| r.get(0))
        .optional()?;
    let Some(start) = start else { return Ok(0) };
    // Acknowledged earlier, ahead of a gap.
    let waiting = conn
        .prepare_cached(
            "SELECT msg_id FROM group_acks WHERE grp = ?1 AND user = ?2 ORDER BY msg_id",
        )?
        .query_map(params![group, user], |r| r.get::<_, i64>(0))?
        .collect::<rusqlite::Result<Vec<i64>>>()?;
    acked.sort_unstable();
    acked.dedup();
    acked.retain(|id| *id > start && waiting.binary_search(id).is_err());
    let fresh = acked.len();
    let mut known = waiting.clone();
    known.extend_from_slice(&acked);
    known.sort_unstable();

    let mut position = start;
    {
        let mut next = conn.prepare_cached(
            "SELECT id FROM messages WHERE grp = ?1 AND id > ?2 AND sender <> ?3 ORDER BY id",
        )?;
        let mut rows = next.query(params![group, start, user])?;
        let mut known = known.iter().peekable();
        while known.peek().is_some() {
            let Some(row) = rows.next()? else { break };
            let id: i64 = row.get(0)?;
            // An acknowledgement of a message that is gone (purged by an operator, expired)
            // is passed over, as the walk passes the message itself.
            while known.next_if(|k| **k < id).is_some() {}
            if known.next_if(|k| **k == id).is_none() {
                break;
            }
            position = id;
        }
    }

    if waiting.first().is_some_and(|w| *w <= position) {
        conn.prepare_cached(
            "DELETE FROM group_acks WHERE grp = ?1 AND user = ?2 AND msg_id <= ?3",
        )?
        .execute(params![group, user, position])?;
    }
    let ahead = acked.iter().filter(|id| **id > position);
    let mut wait =
        conn.prepare_cached("INSERT INTO group_acks (grp, user, msg_id) VALUES (?1, ?2, ?3)")?;
    for id in ahead {
        wait.execute(params![group, user, id])?;
    }
    if position != start {
        conn.prepare_cached("UPDATE members SET position = ?3 WHERE grp = ?1 AND user = ?2")?
            .execute(params![group, user, position])?;
        collect_group_garbage(conn, group, start, position)?;
    }
    Ok(fresh)
}

/// Removes the group messages with ids in `(after, upto]` that every current member other than
/// their sender has passed.
fn collect_group_garbage(conn: &Connection, group: &str, after: i64, upto: i64) -> Result<()> {
    let done = conn
        .prepare_cached(
            "SELECT id, sender, client_id, file_id FROM messages
              WHERE grp = ?1 AND id > ?2 AND id <= ?3
                AND NOT EXISTS (SELECT 1 FROM members mb
                                 WHERE mb.grp = messages.grp AND mb.user <> messages.sender
                                   AND mb.position < messages.id)",
        )?
        .query_map(params![group, after, upto], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get(2)?,
                r.get(3)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    for (id, sender, client_id, file) in done {
        remove_message(conn, id, &sender, client_id, file)?;
    }
    Ok(())
}
