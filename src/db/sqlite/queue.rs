//! The message queue: storing messages (idempotently per sender and client id), remembering
//! what was delivered, removing what was. Knows files (a message offers one); group messages
//! and positions are the layer above ([`super::groups`]).

use rusqlite::{params, Connection, OptionalExtension};

use super::files::{drop_file, finish_upload};
use crate::db::{now_ms, Outgoing, StoredMessage, Usage};
use crate::error::{Error, ErrorCode, Result};
use crate::net::Envelope;

/// The columns [`envelope_row`] reads, from `messages m`.
pub const ENVELOPE_COLUMNS: &str =
    "m.id, m.sender, coalesce(m.recipient, ''), m.grp, m.client_id, m.body, m.sent_at";

/// Reads an envelope from a row of [`ENVELOPE_COLUMNS`].
pub fn envelope_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Envelope> {
    Ok(Envelope {
        id: r.get(0)?,
        from: r.get(1)?,
        to: r.get(2)?,
        group: r.get(3)?,
        client_id: r.get::<_, i64>(4)? as u64,
        body: r.get(5)?,
        sent_at: r.get(6)?,
    })
}

/// What a re-send of `msg` refers to: the stored message, or one already delivered and
/// removed (its id, with the request's own fields: it is not routed again). `after` bounds the
/// search of delivered messages: the original, if stored at all, has an id above it.
pub fn earlier(
    conn: &Connection,
    msg: &Outgoing<'_>,
    to: &str,
    group: Option<&str>,
    after: i64,
) -> Result<Option<Envelope>> {
    if let Some(copy) = stored_copy(conn, msg.from, msg.client_id)? {
        return msg.resend_of(copy, to, group).map(Some);
    }
    let delivered: Option<i64> = conn
        .prepare_cached(
            "SELECT msg_id FROM delivered WHERE msg_id > ?3 AND sender = ?1 AND client_id = ?2",
        )?
        .query_row(params![msg.from, msg.client_id as i64, after], |r| r.get(0))
        .optional()?;
    Ok(delivered.map(|id| msg.envelope(id, to, group, now_ms())))
}

/// The envelope of `msg`, the row just inserted.
pub fn new_envelope(
    conn: &Connection,
    msg: &Outgoing<'_>,
    to: &str,
    group: Option<&str>,
    sent_at: i64,
) -> Envelope {
    msg.envelope(conn.last_insert_rowid(), to, group, sent_at)
}

/// Remembers that a message was delivered and removed (see the `delivered` table).
pub fn remember_delivered(
    conn: &Connection,
    msg_id: i64,
    sender: &str,
    client_id: i64,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR IGNORE INTO delivered (msg_id, sender, client_id) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![msg_id, sender, client_id])?;
    Ok(())
}

/// The newest message id ever assigned.
pub fn newest_message_id(conn: &Connection) -> Result<i64> {
    Ok(conn
        .prepare_cached(
            "SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = 'messages'",
        )?
        .query_row([], |r| r.get(0))?)
}

/// Forgets the deliveries of messages with ids up to `upto`, the oldest `limit` at most.
pub fn forget_deliveries(conn: &Connection, upto: i64, limit: usize) -> Result<usize> {
    Ok(conn
        .prepare_cached(
            "DELETE FROM delivered WHERE msg_id IN \
             (SELECT msg_id FROM delivered WHERE msg_id <= ?1 ORDER BY msg_id LIMIT ?2)",
        )?
        .execute(params![upto, limit as i64])?)
}

/// The message `from` already stored under `client_id`, if any (a re-send).
fn stored_copy(conn: &Connection, from: &str, client_id: u64) -> Result<Option<Envelope>> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {ENVELOPE_COLUMNS} FROM messages m WHERE m.sender = ?1 AND m.client_id = ?2"
        ))?
        .query_row(params![from, client_id as i64], envelope_row)
        .optional()?)
}

/// Stores a direct message, idempotently per `(sender, client_id)`: a re-send returns the first
/// copy, even one already delivered (`resend_after`: see [`earlier`]; `None` for a first
/// attempt, which needs no look-up). `file` is a finished upload of the sender's that the
/// message offers. An unknown recipient is refused (the foreign key says so).
pub fn store_message(conn: &Connection, msg: &Outgoing<'_>, to: &str) -> Result<StoredMessage> {
    let Outgoing {
        from,
        client_id,
        body,
        file,
        resend_after,
    } = *msg;
    let insert = |conn: &Connection, now: i64| -> Result<usize> {
        conn.prepare_cached(
            "INSERT INTO messages (sender, recipient, client_id, body, sent_at, file_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (sender, client_id) DO NOTHING",
        )?
        .execute(params![from, to, client_id as i64, body, now, file])
        .map_err(|e| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::ConstraintViolation) => {
                Error::refused(ErrorCode::UnknownUser, format!("no such user: {to}"))
            }
            _ => e.into(),
        })
    };
    let now = now_ms();
    let envelope = match (file, resend_after) {
        // The common case: one statement (a conflict means a duplicate on the wire).
        (None, None) => match insert(conn, now)? {
            0 => {
                let first = stored_copy(conn, from, client_id)?
                    .ok_or_else(|| Error::Commit("a re-sent message vanished".into()))?;
                msg.resend_of(first, to, None)?
            }
            _ => new_envelope(conn, msg, to, None, now),
        },
        // A re-send, or an offer that must not finish (and so orphan) a second upload.
        (file, after) => match earlier(conn, msg, to, None, after.unwrap_or(0))? {
            Some(first) => first,
            None => {
                if let Some(upload) = file {
                    finish_upload(conn, from, upload)?;
                }
                insert(conn, now)?;
                new_envelope(conn, msg, to, None, now)
            }
        },
    };
    let online_at = online(conn, &envelope.to)?;
    Ok(StoredMessage {
        envelope,
        online_at,
    })
}

/// `(server, user)` of every connection of `user`, sorted by server.
fn online(conn: &Connection, user: &str) -> Result<Vec<(u64, String)>> {
    Ok(conn
        .prepare_cached(
            "SELECT DISTINCT server_id, user FROM presence WHERE user = ?1 ORDER BY server_id",
        )?
        .query_map(params![user], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get(1)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?)
}

/// Removes a delivered message, and the file it offers; remembers it as delivered.
pub fn remove_message(
    conn: &Connection,
    id: i64,
    sender: &str,
    client_id: i64,
    file: Option<i64>,
) -> Result<()> {
    conn.prepare_cached("DELETE FROM messages WHERE id = ?1")?
        .execute(params![id])?;
    if let Some(file) = file {
        drop_file(conn, file)?;
    }
    remember_delivered(conn, id, sender, client_id)
}

/// What a queue (`owner`: a user, or `g:GROUP`) holds, counted (an index range: cheap for
/// the queues near their quota that it is asked about).
pub fn queue_usage(conn: &Connection, owner: &str) -> Result<Usage> {
    let (sql, key) = match owner.strip_prefix("g:") {
        Some(group) => (
            "SELECT count(*), coalesce(sum(length(body)), 0) FROM messages WHERE grp = ?1",
            group,
        ),
        None => (
            "SELECT count(*), coalesce(sum(length(body)), 0) FROM messages WHERE recipient = ?1",
            owner,
        ),
    };
    usage(conn, sql, params![key])
}

/// What `sender` holds in `recipient`'s queue.
pub fn pair_usage(conn: &Connection, sender: &str, recipient: &str) -> Result<Usage> {
    usage(
        conn,
        "SELECT count(*), coalesce(sum(length(body)), 0) FROM messages
         WHERE recipient = ?2 AND sender = ?1",
        params![sender, recipient],
    )
}

fn usage(conn: &Connection, sql: &str, args: impl rusqlite::Params) -> Result<Usage> {
    let (messages, bytes): (i64, i64) = conn
        .prepare_cached(sql)?
        .query_row(args, |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(Usage {
        messages: messages.max(0) as u64,
        bytes: bytes.max(0) as u64,
    })
}

/// The queues holding at least `messages` messages or `bytes` bytes (a scan of the whole
/// queue: for a periodic look, not for every message).
pub fn heavy_queues(conn: &Connection, messages: u64, bytes: u64) -> Result<Vec<(String, Usage)>> {
    heavy(
        conn,
        "SELECT coalesce(recipient, 'g:' || grp), count(*), sum(length(body)) FROM messages
         GROUP BY 1 HAVING count(*) >= ?1 OR sum(length(body)) >= ?2",
        messages,
        bytes,
    )
}

/// The (sender, recipient) pairs where the sender has at least `messages` messages or `bytes`
/// bytes waiting; the key is `SENDER RECIPIENT`.
pub fn heavy_senders(conn: &Connection, messages: u64, bytes: u64) -> Result<Vec<(String, Usage)>> {
    heavy(
        conn,
        "SELECT sender || ' ' || recipient, count(*), sum(length(body)) FROM messages
         WHERE recipient IS NOT NULL
         GROUP BY sender, recipient HAVING count(*) >= ?1 OR sum(length(body)) >= ?2",
        messages,
        bytes,
    )
}

fn heavy(conn: &Connection, sql: &str, messages: u64, bytes: u64) -> Result<Vec<(String, Usage)>> {
    Ok(conn
        .prepare_cached(sql)?
        .query_map(params![messages as i64, bytes as i64], |r| {
            Ok((
                r.get::<_, String>(0)?,
                Usage {
                    messages: r.get::<_, i64>(1)?.max(0) as u64,
                    bytes: r.get::<_, i64>(2)?.max(0) as u64,
                },
            ))
        })?
        .collect::<rusqlite::Result<_>>()?)
}

/// Deletes up to `limit` messages stored before `before_ms` (and the files they offer), the
/// oldest first; returns how many. Message ids follow commit order and `sent_at` is the commit
/// time, so the expired messages are the ids below the first one stored at `before_ms` or
/// later, found with a binary search over ids rather than a scan.
pub fn expire_messages(conn: &Connection, before_ms: i64, limit: usize) -> Result<usize> {
    let first_at_or_after = |id: i64| -> Result<Option<(i64, i64)>> {
        Ok(conn
            .prepare_cached("SELECT id, sent_at FROM messages WHERE id >= ?1 ORDER BY id LIMIT 1")?
            .query_row(params![id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?)
    };
    let newest = newest_message_id(conn)?;
    let Some(lo) = crate::db::expiry_bound(before_ms, newest, first_at_or_after)? else {
        return Ok(0);
    };
    let expired: Vec<(i64, Option<i64>)> = conn
        .prepare_cached(
            "SELECT id, file_id FROM messages WHERE id < ?1 AND sent_at < ?2 ORDER BY id LIMIT ?3",
        )?
        .query_map(params![lo, before_ms, limit as i64], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    for (id, file) in &expired {
        conn.prepare_cached("DELETE FROM messages WHERE id = ?1")?
            .execute(params![id])?;
        if let Some(file) = file {
            drop_file(conn, *file)?;
        }
    }
    Ok(expired.len())
}
