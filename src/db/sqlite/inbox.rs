//! A user's inbox: what is queued for them across direct and group messages, acknowledging it,
//! and fetching the chunks of a file a queued message offers. The top layer: it reads the
//! queue, the groups and the files.

use rusqlite::{params, Connection, OptionalExtension};

use super::files::drop_file;
use super::groups::acknowledge;
use super::queue::{envelope_row, remember_delivered, ENVELOPE_COLUMNS};
use crate::error::{Error, ErrorCode, Result};
use crate::net::Envelope;

/// Up to `limit` queued messages for `user` with ids above `after`, oldest first: direct
/// messages to them, and group messages of their groups past their position that they have not
/// acknowledged out of order.
pub fn queued(conn: &Connection, user: &str, after: i64, limit: usize) -> Result<Vec<Envelope>> {
    let rows = conn
        .prepare_cached(&format!(
            "SELECT {ENVELOPE_COLUMNS} FROM messages m WHERE m.recipient = ?1 AND m.id > ?2
             UNION ALL
             SELECT {ENVELOPE_COLUMNS} FROM messages m
               JOIN members mb ON mb.grp = m.grp AND mb.user = ?1
              WHERE m.id > ?2 AND m.id > mb.position AND m.sender <> ?1
                AND NOT EXISTS (SELECT 1 FROM group_acks a
                                 WHERE a.grp = m.grp AND a.user = ?1 AND a.msg_id = m.id)
             ORDER BY id LIMIT ?3"
        ))?
        .query_map(params![user, after, limit as i64], envelope_row)?
        .collect::<rusqlite::Result<Vec<Envelope>>>()?;
    Ok(rows)
}

/// Acknowledges messages for `user`. A direct message is removed. A group message moves the
/// user's position in that group: a position means "everything up to here is acknowledged", so
/// an id acknowledged ahead of an older unacknowledged one waits in `group_acks` until the gap
/// closes (acknowledgements may arrive out of order when messages come through several
/// servers). Group messages every recipient has passed are removed. Ids that are not the user's
/// to acknowledge are ignored; returns how many were.
pub fn ack(conn: &Connection, user: &str, ids: &[i64]) -> Result<usize> {
    let mut n = 0;
    // Group messages acknowledged, by group, walked once per group after the loop.
    let mut by_group: Vec<(String, Vec<i64>)> = Vec::new();
    // Prepared once per batch of ids: this runs for every message delivered. One look at the
    // message tells a direct one from a group one (the membership is checked once per group).
    let mut find = conn.prepare_cached(
        "SELECT recipient, grp, sender, client_id, file_id FROM messages WHERE id = ?1",
    )?;
    let mut remove = conn.prepare_cached("DELETE FROM messages WHERE id = ?1")?;
    for &id in ids {
        let found = find
            .query_row(params![id], |r| {
                Ok((
                    r.get::<_, Option<String>>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                ))
            })
            .optional()?;
        let Some((recipient, group, sender, client_id, file)) = found else {
            continue;
        };
        if recipient.as_deref() == Some(user) {
            // A direct message to this user: removed (with the file it offers) and
            // remembered as delivered.
            remove.execute(params![id])?;
            remember_delivered(conn, id, &sender, client_id)?;
            if let Some(file) = file {
                drop_file(conn, file)?;
            }
            n += 1;
            continue;
        }
        match group {
            Some(g) if sender != user => match by_group.iter_mut().find(|(name, _)| *name == g) {
                Some((_, acked)) => acked.push(id),
                None => by_group.push((g, vec![id])),
            },
            _ => {}
        }
    }
    for (g, acked) in by_group {
        n += acknowledge(conn, &g, user, acked)?;
    }
    Ok(n)
}

/// Chunk `index` of the file offered by message `msg_id`, if that message is queued for `user`
/// (a direct message to them, or a group message they have not yet acknowledged).
pub fn file_chunk(conn: &Connection, user: &str, msg_id: i64, index: u64) -> Result<Vec<u8>> {
    conn.prepare_cached(
        "SELECT c.data FROM messages m
           JOIN file_chunks c ON c.file_id = m.file_id AND c.idx = ?3
          WHERE m.id = ?1
            AND (m.recipient = ?2
                 OR (m.sender <> ?2 AND EXISTS (
                       SELECT 1 FROM members mb
                        WHERE mb.grp = m.grp AND mb.user = ?2 AND mb.position < m.id)))",
    )?
    .query_row(params![msg_id, user, index as i64], |r| r.get(0))
    .optional()?
    .ok_or_else(|| {
        Error::refused(
            ErrorCode::BadRequest,
            format!("message {msg_id} offers you no file chunk {index}"),
        )
    })
}
