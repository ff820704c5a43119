//! A user's inbox: what is queued for them across direct and group messages, acknowledging it,
//! and fetching the chunks of a file a queued message offers (see the SQLite backend's
//! `inbox`).

use std::collections::{HashMap, HashSet};

use super::files::drop_file;
use super::groups::advance_position;
use super::queue::{envelope_columns, envelope_row};
use super::Conn;
use crate::error::{Error, ErrorCode, Result};
use crate::net::Envelope;

/// Up to `limit` queued messages for `user` with ids above `after`, oldest first.
pub fn queued(conn: &mut Conn, user: &str, after: i64, limit: usize) -> Result<Vec<Envelope>> {
    conn.rows(
        concat!(
            "SELECT ",
            envelope_columns!(),
            r#" FROM messages m WHERE m.recipient = $1 AND m.id > $2
             UNION ALL
             SELECT "#,
            envelope_columns!(),
            r#" FROM messages m
               JOIN members mb ON mb.grp = m.grp AND mb."user" = $1
              WHERE m.id > $2 AND m.id > mb.position AND m.sender <> $1
                AND NOT EXISTS (SELECT 1 FROM group_acks a
                                 WHERE a.grp = m.grp AND a."user" = $1 AND a.msg_id = m.id)
             ORDER BY 1 LIMIT $3"#
        ),
        &[&user, &after, &(limit as i64)],
    )?
    .iter()
    .map(envelope_row)
    .collect()
}

/// Acknowledges messages for `user`: a direct message is removed (and remembered as
/// delivered), a group message moves the user's position (see the SQLite backend). Returns how
/// many ids were the user's to acknowledge.
pub fn ack(conn: &mut Conn, user: &str, ids: &[i64]) -> Result<usize> {
    let mut touched: Vec<String> = Vec::new();
    // Every direct message among them in one round trip: removed, and remembered as
    // delivered.
    let direct = conn.rows(
        "WITH gone AS (
             DELETE FROM messages WHERE id = ANY($1) AND recipient = $2
             RETURNING id, sender, client_id, file_id),
         remembered AS (
             INSERT INTO delivered (msg_id, sender, client_id)
             SELECT id, sender, client_id FROM gone ON CONFLICT DO NOTHING)
         SELECT id, file_id FROM gone",
        &[&ids, &user],
    )?;
    let mut n = direct.len();
    let mut done = std::collections::HashSet::with_capacity(direct.len());
    for r in &direct {
        done.insert(r.try_get::<_, i64>(0)?);
        if let Some(file) = r.try_get::<_, Option<i64>>(1)? {
            drop_file(conn, file)?;
        }
    }
    // The rest are group messages, or not the user's to acknowledge (ignored): one statement
    // for all of them.
    let rest: Vec<i64> = ids
        .iter()
        .copied()
        .filter(|id| !done.contains(id))
        .collect();
    if !rest.is_empty() {
        let acked = conn.rows(
            r#"INSERT INTO group_acks (grp, "user", msg_id)
               SELECT m.grp, mb."user", m.id FROM messages m
                 JOIN members mb ON mb.grp = m.grp AND mb."user" = $2
                WHERE m.id = ANY($1) AND m.sender <> $2 AND m.id > mb.position
               ON CONFLICT DO NOTHING
               RETURNING grp"#,
            &[&rest, &user],
        )?;
        n += acked.len();
        for r in &acked {
            let g: String = r.try_get(0)?;
            if !touched.contains(&g) {
                touched.push(g);
            }
        }
    }
    for g in touched {
        advance_position(conn, &g, user)?;
    }
    Ok(n)
}

/// Several users' acknowledgements (see [`ack`]) in one statement: the direct messages
/// among them removed and remembered as delivered, the group ones recorded; then the files
/// of removed messages dropped and each touched member's position moved (a statement per
/// member and group).
pub fn ack_many(conn: &mut Conn, acks: &[(&str, &[i64])]) -> Result<Vec<Result<usize>>> {
    let (mut ids, mut users) = (Vec::new(), Vec::new());
    for (user, list) in acks {
        ids.extend_from_slice(list);
        users.extend(std::iter::repeat_n(*user, list.len()));
    }
    // Direct messages have a recipient and no group, group messages the other way round, so
    // the two parts never touch the same message.
    let rows = conn.rows(
        r#"WITH a AS (SELECT * FROM unnest($1::bigint[], $2::text[]) AS a(id, usr)),
           gone AS (
               DELETE FROM messages m USING a WHERE m.id = a.id AND m.recipient = a.usr
               RETURNING m.id, m.recipient, m.sender, m.client_id, m.file_id),
           remembered AS (
               INSERT INTO delivered (msg_id, sender, client_id)
               SELECT id, sender, client_id FROM gone ON CONFLICT DO NOTHING),
           acked AS (
               INSERT INTO group_acks (grp, "user", msg_id)
               SELECT DISTINCT m.grp, a.usr, m.id FROM a
                 JOIN messages m ON m.id = a.id AND m.grp IS NOT NULL
                 JOIN members mb ON mb.grp = m.grp AND mb."user" = a.usr
                WHERE m.sender <> a.usr AND m.id > mb.position
               ON CONFLICT DO NOTHING
               RETURNING grp, "user", msg_id)
           SELECT id, recipient, file_id, NULL::text FROM gone
           UNION ALL
           SELECT msg_id, "user", NULL::bigint, grp FROM acked"#,
        &[&ids, &users],
    )?;
    let mut done: HashMap<String, HashSet<i64>> = HashMap::new();
    let mut touched: Vec<(String, String)> = Vec::new();
    for r in &rows {
        let (id, user): (i64, String) = (r.try_get(0)?, r.try_get(1)?);
        if let Some(file) = r.try_get::<_, Option<i64>>(2)? {
            drop_file(conn, file)?;
        }
        if let Some(group) = r.try_get::<_, Option<String>>(3)? {
            let pair = (group, user.clone());
            if !touched.contains(&pair) {
                touched.push(pair);
            }
        }
        done.entry(user).or_default().insert(id);
    }
    for (group, user) in &touched {
        advance_position(conn, group, user)?;
    }
    Ok(acks
        .iter()
        .map(|(user, list)| {
            let mine = done.get(*user);
            let mut counted = HashSet::with_capacity(list.len());
            Ok(list
                .iter()
                .filter(|&&id| mine.is_some_and(|m| m.contains(&id)) && counted.insert(id))
                .count())
        })
        .collect())
}

/// Chunk `index` of the file offered by message `msg_id`, if that message is queued for `user`.
pub fn file_chunk(conn: &mut Conn, user: &str, msg_id: i64, index: u64) -> Result<Vec<u8>> {
    let row = conn.opt(
        r#"SELECT c.data FROM messages m
             JOIN file_chunks c ON c.file_id = m.file_id AND c.idx = $3
            WHERE m.id = $1
              AND (m.recipient = $2
                   OR (m.sender <> $2 AND EXISTS (
                         SELECT 1 FROM members mb
                          WHERE mb.grp = m.grp AND mb."user" = $2 AND mb.position < m.id)))"#,
        &[&msg_id, &user, &(index as i64)],
    )?;
    match row {
        Some(r) => Ok(r.try_get(0)?),
        None => Err(Error::refused(
            ErrorCode::BadRequest,
            format!("message {msg_id} offers you no file chunk {index}"),
        )),
    }
}
