//! A user's inbox: what is queued for them across direct and group messages, acknowledging it,
//! and fetching the chunks of a file a queued message offers (see the SQLite backend's
//! `inbox`).

use std::collections::{HashMap, HashSet};

use super::files::drop_file;
use super::groups::advance_positions;
use super::queue::{envelope_columns, envelope_row};
use super::{in_chunks, Conn, MERGED_IDS};
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
    ack_many(conn, &[(user, ids)])?.pop().unwrap_or(Ok(0))
}

/// Several users' acknowledgements (see [`ack`]) in one statement (per `MERGED_IDS` ids):
/// the direct messages among them removed and remembered as delivered, the group ones
/// recorded; then the files of removed messages dropped and every touched member's position
/// moved (two statements for all, [`advance_positions`]).
pub fn ack_many(conn: &mut Conn, acks: &[(&str, &[i64])]) -> Result<Vec<Result<usize>>> {
    in_chunks(conn, acks, |(_, ids)| ids.len(), MERGED_IDS, ack_some)
}

/// [`ack_many`], in one statement (and those of the positions).
fn ack_some(conn: &mut Conn, acks: &[(&str, &[i64])]) -> Result<Vec<Result<usize>>> {
    let (mut ids, mut users) = (Vec::new(), Vec::new());
    for (user, list) in acks {
        ids.extend_from_slice(list);
        users.extend(std::iter::repeat_n(*user, list.len()));
    }
    // Each id is looked up by index, one after another (`LATERAL ... OFFSET 0`: whatever the
    // planner believes of the arrays' sizes, it cannot join them with whole tables or with
    // each other). Direct messages have a recipient and no group, group messages the other
    // way round, so the two parts never touch the same message.
    let rows = conn.rows(
        r#"WITH found AS MATERIALIZED (
               SELECT a.usr, m.id, m.recipient, m.grp, m.sender
                 FROM unnest($1::bigint[], $2::text[]) AS a(id, usr)
                CROSS JOIN LATERAL (
                      SELECT id, recipient, grp, sender FROM messages
                       WHERE id = a.id OFFSET 0) m),
           gone AS (
               DELETE FROM messages
                WHERE id = ANY (ARRAY(SELECT id FROM found WHERE recipient = usr))
               RETURNING id, recipient, sender, client_id, file_id),
           remembered AS (
               INSERT INTO delivered (msg_id, sender, client_id)
               SELECT id, sender, client_id FROM gone ON CONFLICT DO NOTHING),
           acked AS (
               INSERT INTO group_acks (grp, "user", msg_id)
               SELECT DISTINCT f.grp, f.usr, f.id FROM found f
                CROSS JOIN LATERAL (
                      SELECT position FROM members
                       WHERE grp = f.grp AND "user" = f.usr OFFSET 0) mb
                WHERE f.grp IS NOT NULL AND f.sender <> f.usr AND f.id > mb.position
               ON CONFLICT DO NOTHING
               RETURNING grp, "user", msg_id)
           SELECT id, recipient, file_id, NULL::text FROM gone
           UNION ALL
           SELECT msg_id, "user", NULL::bigint, grp FROM acked"#,
        &[&ids, &users],
    )?;
    let mut done: HashMap<String, HashSet<i64>> = HashMap::new();
    // The (group, member) pairs whose acknowledgements were recorded, in first-seen order.
    let mut touched: Vec<(String, String)> = Vec::new();
    let mut seen = HashSet::new();
    for r in &rows {
        let (id, user): (i64, String) = (r.try_get(0)?, r.try_get(1)?);
        if let Some(file) = r.try_get::<_, Option<i64>>(2)? {
            drop_file(conn, file)?;
        }
        if let Some(group) = r.try_get::<_, Option<String>>(3)? {
            let pair = (group, user.clone());
            if seen.insert(pair.clone()) {
                touched.push(pair);
            }
        }
        done.entry(user).or_default().insert(id);
    }
    let pairs: Vec<(&str, &str)> = touched
        .iter()
        .map(|(g, u)| (g.as_str(), u.as_str()))
        .collect();
    advance_positions(conn, &pairs)?;
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
