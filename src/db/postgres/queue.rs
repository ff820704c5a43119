//! The message queue: storing messages (idempotently per sender and client id), remembering
//! what was delivered, removing what was (see the SQLite backend's `queue`).

use std::collections::{HashMap, HashSet};

use postgres::Row;

use super::files::{drop_file, finish_upload};
use super::{in_chunks, unsigned, Conn, MERGED_BYTES};
use crate::db::{now_ms, Outgoing, StoredMessage, Usage};
use crate::error::{Error, ErrorCode, Result};
use crate::net::Envelope;

/// The columns [`envelope_row`] reads, from `messages m`.
macro_rules! envelope_columns {
    () => {
        "m.id, m.sender, coalesce(m.recipient, ''), m.grp, m.client_id, m.body, m.sent_at"
    };
}
pub(crate) use envelope_columns;

/// Reads an envelope from a row of `envelope_columns`.
pub fn envelope_row(r: &Row) -> Result<Envelope> {
    Ok(Envelope {
        id: r.try_get(0)?,
        from: r.try_get(1)?,
        to: r.try_get(2)?,
        group: r.try_get(3)?,
        client_id: r.try_get::<_, i64>(4)? as u64,
        body: r.try_get(5)?,
        sent_at: r.try_get(6)?,
    })
}

/// What a re-send of `msg` refers to: the stored message, or one already delivered and
/// removed (its id, with the request's own fields). `after` bounds the search of delivered
/// messages: the original, if stored at all, has an id above it.
pub fn earlier(
    conn: &mut Conn,
    msg: &Outgoing<'_>,
    to: &str,
    group: Option<&str>,
    after: i64,
) -> Result<Option<Envelope>> {
    if let Some(copy) = stored_copy(conn, msg.from, msg.client_id)? {
        return msg.resend_of(copy, to, group).map(Some);
    }
    let delivered = conn.opt(
        "SELECT msg_id FROM delivered WHERE msg_id > $3 AND sender = $1 AND client_id = $2",
        &[&msg.from, &(msg.client_id as i64), &after],
    )?;
    match delivered {
        Some(r) => Ok(Some(msg.envelope(r.try_get(0)?, to, group, now_ms()))),
        None => Ok(None),
    }
}

/// The newest message id ever assigned: the sequence's last value (ids are taken under the
/// writers' lock, so every id below it belongs to a committed message or to none).
pub fn newest_message_id(conn: &mut Conn) -> Result<i64> {
    Ok(conn
        .one(
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM messages_id_seq",
            &[],
        )?
        .try_get(0)?)
}

/// Forgets the deliveries of messages with ids up to `upto`, the oldest `limit` at most.
pub fn forget_deliveries(conn: &mut Conn, upto: i64, limit: usize) -> Result<usize> {
    Ok(conn.exec(
        "DELETE FROM delivered WHERE msg_id IN \
         (SELECT msg_id FROM delivered WHERE msg_id <= $1 ORDER BY msg_id LIMIT $2)",
        &[&upto, &(limit as i64)],
    )? as usize)
}

/// The message `from` already stored under `client_id`, if any (a re-send).
fn stored_copy(conn: &mut Conn, from: &str, client_id: u64) -> Result<Option<Envelope>> {
    match conn.opt(
        concat!(
            "SELECT ",
            envelope_columns!(),
            " FROM messages m WHERE m.sender = $1 AND m.client_id = $2"
        ),
        &[&from, &(client_id as i64)],
    )? {
        Some(r) => envelope_row(&r).map(Some),
        None => Ok(None),
    }
}

/// A new message's id, and the recipient's connections.
type Inserted = (i64, Vec<(u64, String)>);

/// Stores a direct message, idempotently per `(sender, client_id)` (see the SQLite backend).
///
/// The common case is one round trip: the insert returns the new id with the recipient's
/// connections (read in the same statement, under the writers' lock). It names its recipient
/// only if that user exists, rather than leaning on the foreign key: a failed statement would
/// abort the whole transaction, where SQLite fails just the statement.
pub fn store_message(conn: &mut Conn, msg: &Outgoing<'_>, to: &str) -> Result<StoredMessage> {
    let now = now_ms();
    // The new id and where the recipient is connected; `None` if nothing was inserted (a
    // re-send, or no such user).
    let insert = |conn: &mut Conn| -> Result<Option<Inserted>> {
        let rows = conn.rows(
            r#"WITH ins AS (
                   INSERT INTO messages (sender, recipient, client_id, body, sent_at, file_id)
                   SELECT $1, name, $3, $4, $5, $6 FROM users WHERE name = $2
                   ON CONFLICT (sender, client_id) DO NOTHING
                   RETURNING id)
               SELECT ins.id, p.server_id, p."user" FROM ins
                 LEFT JOIN (SELECT DISTINCT server_id, "user" FROM presence
                             WHERE "user" = $2) p ON true
                ORDER BY p.server_id"#,
            &[
                &msg.from,
                &to,
                &(msg.client_id as i64),
                &msg.body,
                &now,
                &msg.file,
            ],
        )?;
        let Some(first) = rows.first() else {
            if !super::accounts::user_exists(conn, to)? {
                return Err(Error::refused(
                    ErrorCode::UnknownUser,
                    format!("no such user: {to}"),
                ));
            }
            return Ok(None);
        };
        let id: i64 = first.try_get(0)?;
        Ok(Some((id, joined_connections(&rows, 1)?)))
    };
    let (envelope, online_at) = match (msg.file, msg.resend_after) {
        // The common case (a conflict means a duplicate on the wire).
        (None, None) => match insert(conn)? {
            Some((id, online)) => (msg.envelope(id, to, None, now), online),
            None => {
                let first = stored_copy(conn, msg.from, msg.client_id)?
                    .ok_or_else(|| Error::Commit("a re-sent message vanished".into()))?;
                (msg.resend_of(first, to, None)?, online(conn, to)?)
            }
        },
        // A re-send, or an offer that must not finish (and so orphan) a second upload.
        (file, after) => match earlier(conn, msg, to, None, after.unwrap_or(0))? {
            Some(first) => (first, online(conn, to)?),
            None => {
                if let Some(upload) = file {
                    finish_upload(conn, msg.from, upload)?;
                }
                let (id, online) = insert(conn)?
                    .ok_or_else(|| Error::Commit("a message was stored twice".into()))?;
                (msg.envelope(id, to, None, now), online)
            }
        },
    };
    Ok(StoredMessage {
        envelope,
        online_at,
    })
}

/// Stores first attempts of direct messages without files in one statement, with ids in
/// their order, each returned with its recipient's connections. The few it leaves (a re-send
/// on the wire, an unknown recipient, a client id used twice in the call) then go through
/// [`store_message`], in order, for its answer.
pub fn store_messages(
    conn: &mut Conn,
    msgs: &[(Outgoing<'_>, &str)],
) -> Result<Vec<Result<StoredMessage>>> {
    in_chunks(conn, msgs, |(m, _)| m.body.len(), MERGED_BYTES, store_some)
}

/// [`store_messages`], in one statement.
fn store_some(
    conn: &mut Conn,
    msgs: &[(Outgoing<'_>, &str)],
) -> Result<Vec<Result<StoredMessage>>> {
    let now = now_ms();
    let picked = first_of_each(msgs.iter().map(|(m, _)| m));
    let senders: Vec<&str> = picked.iter().map(|&i| msgs[i].0.from).collect();
    let recipients: Vec<&str> = picked.iter().map(|&i| msgs[i].1).collect();
    let client_ids: Vec<i64> = picked.iter().map(|&i| msgs[i].0.client_id as i64).collect();
    let bodies: Vec<&[u8]> = picked.iter().map(|&i| msgs[i].0.body).collect();
    // Ids are taken in input order: a sequence default is evaluated after the sort below it.
    // Each recipient and its connections are looked up by index, row by row (the `OFFSET 0`
    // and `LATERAL` keep the planner from joining whole tables, whatever it believes of their
    // sizes), and the new rows are matched to their messages by (sender, client id) here.
    let rows = conn.rows(
        r#"WITH input AS (
               SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bytea[])
                        WITH ORDINALITY AS i(sender, recipient, client_id, body, ord)),
           ins AS (
               INSERT INTO messages (sender, recipient, client_id, body, sent_at)
               SELECT i.sender, u.name, i.client_id, i.body, $5
                 FROM input i CROSS JOIN LATERAL (
                      SELECT name FROM users WHERE name = i.recipient OFFSET 0) u
                ORDER BY i.ord
               ON CONFLICT (sender, client_id) DO NOTHING
               RETURNING id, sender, client_id, recipient)
           SELECT ins.id, ins.sender, ins.client_id, p.server_id, p."user"
             FROM ins LEFT JOIN LATERAL (SELECT DISTINCT server_id, "user" FROM presence
                                          WHERE "user" = ins.recipient) p ON true
            ORDER BY ins.id, p.server_id"#,
        &[&senders, &recipients, &client_ids, &bodies, &now],
    )?;
    let stored = merged_rows(&rows, msgs.iter().map(|(m, _)| m), &picked, |i, id| {
        msgs[i].0.envelope(id, msgs[i].1, None, now)
    })?;
    let mut out = Vec::with_capacity(msgs.len());
    for (slot, (msg, to)) in stored.into_iter().zip(msgs) {
        out.push(match slot {
            Some(stored) => Ok(stored),
            None => match store_message(conn, msg, to) {
                // A failed statement lost the transaction: nothing of the call stays.
                Err(e) if conn.failed => return Err(e),
                result => result,
            },
        });
    }
    Ok(out)
}

/// The positions of the messages a merged insert takes: the first with each (sender, client
/// id), so that one statement never meets its own conflict.
pub fn first_of_each<'a, 'm: 'a>(msgs: impl Iterator<Item = &'a Outgoing<'m>>) -> Vec<usize> {
    let mut seen = HashSet::new();
    msgs.enumerate()
        .filter(|(_, m)| seen.insert((m.from, m.client_id)))
        .map(|(i, _)| i)
        .collect()
}

/// The answer of a merged insert for each of `msgs`, from its rows `(id, sender, client id,
/// server, user)`, those of one message together: the stored message (built by `envelope`
/// from its position and id) with the connections to route it to; `None` where no row names
/// it. `picked` are the positions the insert was given (one per sender and client id).
pub fn merged_rows<'a, 'm: 'a>(
    rows: &[Row],
    msgs: impl ExactSizeIterator<Item = &'a Outgoing<'m>>,
    picked: &[usize],
    envelope: impl Fn(usize, i64) -> Envelope,
) -> Result<Vec<Option<StoredMessage>>> {
    let msgs: Vec<&Outgoing<'_>> = msgs.collect();
    let at: HashMap<(&str, i64), usize> = picked
        .iter()
        .map(|&i| ((msgs[i].from, msgs[i].client_id as i64), i))
        .collect();
    let mut stored: Vec<Option<StoredMessage>> = msgs.iter().map(|_| None).collect();
    for r in rows {
        let (id, sender, client_id): (i64, &str, i64) =
            (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
        let i = *at.get(&(sender, client_id)).ok_or_else(|| {
            Error::Commit(format!(
                "the database stored an unknown message {sender}/{client_id}"
            ))
        })?;
        let entry = stored[i].get_or_insert_with(|| StoredMessage {
            envelope: envelope(i, id),
            online_at: Vec::new(),
        });
        if let Some(server) = r.try_get::<_, Option<i64>>(3)? {
            entry.online_at.push((server.max(0) as u64, r.try_get(4)?));
        }
    }
    Ok(stored)
}

/// `(server, user)` from columns `at` and `at + 1` of rows that joined a message with the
/// presence of its recipients (a row without a connection has no server).
pub fn joined_connections(rows: &[Row], at: usize) -> Result<Vec<(u64, String)>> {
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        if let Some(server) = r.try_get::<_, Option<i64>>(at)? {
            out.push((server.max(0) as u64, r.try_get(at + 1)?));
        }
    }
    Ok(out)
}

/// `(server, user)` from the rows of a presence query.
pub fn server_users(rows: Vec<Row>) -> Result<Vec<(u64, String)>> {
    rows.iter()
        .map(|r| Ok((unsigned(r, 0)?, r.try_get(1)?)))
        .collect()
}

/// `(server, user)` of every connection of `user`, sorted by server.
fn online(conn: &mut Conn, user: &str) -> Result<Vec<(u64, String)>> {
    server_users(conn.rows(
        r#"SELECT DISTINCT server_id, "user" FROM presence WHERE "user" = $1 ORDER BY server_id"#,
        &[&user],
    )?)
}

fn usage(row: Row) -> Result<Usage> {
    Ok(Usage {
        messages: unsigned(&row, 0)?,
        bytes: unsigned(&row, 1)?,
    })
}

/// What a queue (`owner`: a user, or `g:GROUP`) holds.
pub fn queue_usage(conn: &mut Conn, owner: &str) -> Result<Usage> {
    let row = match owner.strip_prefix("g:") {
        Some(group) => conn.one(
            "SELECT count(*), coalesce(sum(length(body)), 0)::BIGINT FROM messages
              WHERE grp = $1",
            &[&group],
        )?,
        None => conn.one(
            "SELECT count(*), coalesce(sum(length(body)), 0)::BIGINT FROM messages
              WHERE recipient = $1",
            &[&owner],
        )?,
    };
    usage(row)
}

/// What `sender` holds in `recipient`'s queue.
pub fn pair_usage(conn: &mut Conn, sender: &str, recipient: &str) -> Result<Usage> {
    usage(conn.one(
        "SELECT count(*), coalesce(sum(length(body)), 0)::BIGINT FROM messages
          WHERE recipient = $2 AND sender = $1",
        &[&sender, &recipient],
    )?)
}

/// Rows of `(key, count, bytes)` as keyed usages.
fn keyed(rows: Vec<Row>) -> Result<Vec<(String, Usage)>> {
    rows.into_iter()
        .map(|r| {
            let key: String = r.try_get(0)?;
            Ok((
                key,
                Usage {
                    messages: unsigned(&r, 1)?,
                    bytes: unsigned(&r, 2)?,
                },
            ))
        })
        .collect()
}

/// The queues holding at least `messages` messages or `bytes` bytes.
pub fn heavy_queues(conn: &mut Conn, messages: u64, bytes: u64) -> Result<Vec<(String, Usage)>> {
    keyed(conn.rows(
        "SELECT coalesce(recipient, 'g:' || grp), count(*), sum(length(body))::BIGINT
           FROM messages GROUP BY 1
         HAVING count(*) >= $1 OR sum(length(body)) >= $2",
        &[&(messages as i64), &(bytes as i64)],
    )?)
}

/// The (sender, recipient) pairs where the sender has at least `messages` messages or `bytes`
/// bytes waiting; the key is `SENDER RECIPIENT`.
pub fn heavy_senders(conn: &mut Conn, messages: u64, bytes: u64) -> Result<Vec<(String, Usage)>> {
    keyed(conn.rows(
        "SELECT sender || ' ' || recipient, count(*), sum(length(body))::BIGINT FROM messages
          WHERE recipient IS NOT NULL GROUP BY sender, recipient
         HAVING count(*) >= $1 OR sum(length(body)) >= $2",
        &[&(messages as i64), &(bytes as i64)],
    )?)
}

/// Deletes up to `limit` messages stored before `before_ms` (and the files they offer), the
/// oldest first; returns how many. The ids to look at are bounded by a binary search over ids
/// (`db::expiry_bound`: an index probe each, one when nothing is old), not by a scan of the
/// queue filtered by time.
pub fn expire_messages(conn: &mut Conn, before_ms: i64, limit: usize) -> Result<usize> {
    let newest = newest_message_id(conn)?;
    let bound = crate::db::expiry_bound(before_ms, newest, |id| {
        let row = conn.opt(
            "SELECT id, sent_at FROM messages WHERE id >= $1 ORDER BY id LIMIT 1",
            &[&id],
        )?;
        Ok(match row {
            Some(r) => Some((r.try_get(0)?, r.try_get(1)?)),
            None => None,
        })
    })?;
    let Some(lo) = bound else {
        return Ok(0);
    };
    let expired = conn.rows(
        "DELETE FROM messages WHERE id IN (
             SELECT id FROM messages WHERE id < $1 AND sent_at < $2 ORDER BY id LIMIT $3)
         RETURNING file_id",
        &[&lo, &before_ms, &(limit as i64)],
    )?;
    for r in &expired {
        if let Some(file) = r.try_get::<_, Option<i64>>(0)? {
            drop_file(conn, file)?;
        }
    }
    Ok(expired.len())
}
