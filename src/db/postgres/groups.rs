//! Groups: the group, member and key tables, and group messages (stored once, with a position
//! per member). See the SQLite backend's `groups`.

use super::files::{drop_file, finish_upload};
use super::queue::{
    earlier, first_of_each, joined_connections, merged_rows, newest_message_id, server_users,
};
use super::registry::strings;
use super::{in_chunks, Conn, MERGED_BYTES};
use crate::db::{now_ms, Outgoing, StoredMessage};
use crate::error::{Error, Result};
use crate::net::{GroupInfo, WrappedKey};

/// A group's admin, members (longest-standing first), epoch and whether the epoch has keys.
pub fn group(conn: &mut Conn, group: &str) -> Result<Option<GroupInfo>> {
    let Some(row) = conn.opt("SELECT admin, epoch FROM groups WHERE name = $1", &[&group])? else {
        return Ok(None);
    };
    let admin: String = row.try_get(0)?;
    let epoch: i64 = row.try_get(1)?;
    let members = strings(conn.rows(
        r#"SELECT "user" FROM members WHERE grp = $1 ORDER BY seq"#,
        &[&group],
    )?)?;
    let keyed = conn
        .opt(
            "SELECT 1 FROM group_keys WHERE grp = $1 AND epoch = $2 LIMIT 1",
            &[&group, &epoch],
        )?
        .is_some();
    Ok(Some(GroupInfo {
        name: group.to_string(),
        admin,
        members,
        epoch: epoch.max(0) as u64,
        keyed,
    }))
}

/// The names of the groups `user` belongs to, sorted.
pub fn user_groups(conn: &mut Conn, user: &str) -> Result<Vec<String>> {
    strings(conn.rows(
        r#"SELECT grp FROM members WHERE "user" = $1 ORDER BY grp"#,
        &[&user],
    )?)
}

/// Creates a group at epoch 1 with `admin` as its only member; `false` if the name is taken
/// (in any case).
pub fn create_group(conn: &mut Conn, group: &str, admin: &str) -> Result<bool> {
    let created = conn.exec(
        "INSERT INTO groups (name, admin, epoch, created_at) VALUES ($1, $2, 1, $3)
         ON CONFLICT DO NOTHING",
        &[&group, &admin, &now_ms()],
    )?;
    if created == 0 {
        return Ok(false);
    }
    add_member(conn, group, admin)?;
    Ok(true)
}

/// Adds a member; its position starts at the newest message id, so it reads only what is sent
/// after it joined.
pub fn add_member(conn: &mut Conn, group: &str, user: &str) -> Result<()> {
    let position = newest_message_id(conn)?;
    conn.exec(
        r#"INSERT INTO members (grp, "user", seq, position)
           VALUES ($1, $2, (SELECT coalesce(max(seq), 0) + 1 FROM members WHERE grp = $1), $3)"#,
        &[&group, &user, &position],
    )?;
    Ok(())
}

/// Removes a member, then the group messages that only they still needed.
pub fn remove_member(conn: &mut Conn, group: &str, user: &str) -> Result<()> {
    conn.exec(
        r#"DELETE FROM members WHERE grp = $1 AND "user" = $2"#,
        &[&group, &user],
    )?;
    collect_group_garbage(conn, &[(group.to_string(), 0, i64::MAX)])
}

/// Sets a group's admin and epoch.
pub fn set_group(conn: &mut Conn, group: &str, admin: &str, epoch: u64) -> Result<()> {
    conn.exec(
        "UPDATE groups SET admin = $2, epoch = $3 WHERE name = $1",
        &[&group, &admin, &(epoch as i64)],
    )?;
    Ok(())
}

/// Deletes a group with its messages, the files they offer, its members and its keys.
pub fn delete_group(conn: &mut Conn, group: &str) -> Result<()> {
    let files = conn.rows(
        "DELETE FROM messages WHERE grp = $1 AND file_id IS NOT NULL RETURNING file_id",
        &[&group],
    )?;
    for r in &files {
        drop_file(conn, r.try_get(0)?)?;
    }
    conn.exec("DELETE FROM groups WHERE name = $1", &[&group])?;
    Ok(())
}

/// Appends change `seq` (a serialized `SignedChange`) to a group's chain.
pub fn add_change(conn: &mut Conn, group: &str, seq: u64, change: &[u8]) -> Result<()> {
    conn.exec(
        "INSERT INTO group_changes (grp, seq, change) VALUES ($1, $2, $3)",
        &[&group, &(seq as i64), &change],
    )?;
    Ok(())
}

/// Up to `limit` changes of a group's chain after `after`, in order.
pub fn changes(conn: &mut Conn, group: &str, after: u64, limit: usize) -> Result<Vec<Vec<u8>>> {
    conn.rows(
        "SELECT change FROM group_changes WHERE grp = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        &[&group, &(after as i64), &(limit as i64)],
    )?
    .iter()
    .map(|r| Ok(r.try_get(0)?))
    .collect()
}

/// The last change of a group's chain.
pub fn last_change(conn: &mut Conn, group: &str) -> Result<Option<Vec<u8>>> {
    match conn.opt(
        "SELECT change FROM group_changes WHERE grp = $1 ORDER BY seq DESC LIMIT 1",
        &[&group],
    )? {
        Some(r) => Ok(Some(r.try_get(0)?)),
        None => Ok(None),
    }
}

/// Stores wrapped keys of `epoch` (replacing any earlier one of the same member).
pub fn put_keys(
    conn: &mut Conn,
    group: &str,
    epoch: u64,
    keys: &[WrappedKey],
    by: &str,
) -> Result<()> {
    for k in keys {
        conn.exec(
            "INSERT INTO group_keys (grp, epoch, member, wrapped, wrapped_by)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (grp, epoch, member)
             DO UPDATE SET wrapped = excluded.wrapped, wrapped_by = excluded.wrapped_by",
            &[&group, &(epoch as i64), &k.member, &k.wrapped, &by],
        )?;
    }
    Ok(())
}

/// `member`'s wrapped key of `epoch` and who wrapped it.
pub fn group_key(
    conn: &mut Conn,
    group: &str,
    epoch: u64,
    member: &str,
) -> Result<Option<(Vec<u8>, String)>> {
    match conn.opt(
        "SELECT wrapped, wrapped_by FROM group_keys
          WHERE grp = $1 AND epoch = $2 AND member = $3",
        &[&group, &(epoch as i64), &member],
    )? {
        Some(r) => Ok(Some((r.try_get(0)?, r.try_get(1)?))),
        None => Ok(None),
    }
}

/// `(server, user)` of every connection of a member of `group` other than `from`, by server.
fn group_online(conn: &mut Conn, group: &str, from: &str) -> Result<Vec<(u64, String)>> {
    server_users(conn.rows(
        r#"SELECT DISTINCT p.server_id, p."user" FROM presence p
             JOIN members mb ON mb."user" = p."user"
            WHERE mb.grp = $1 AND p."user" <> $2 ORDER BY p.server_id"#,
        &[&group, &from],
    )?)
}

/// The earlier copy of a re-sent group message, with the members to route it to.
pub fn stored_group_copy(
    conn: &mut Conn,
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
    conn: &mut Conn,
    msg: &Outgoing<'_>,
    group: &str,
) -> Result<StoredMessage> {
    if let Some(upload) = msg.file {
        finish_upload(conn, msg.from, upload)?;
    }
    let now = now_ms();
    // One round trip: the new id, whether anyone else is a member (if not, nobody will ever
    // acknowledge it), and the other members' connections.
    let rows = conn.rows(
        r#"WITH ins AS (
               INSERT INTO messages (sender, grp, client_id, body, sent_at, file_id)
               VALUES ($1, $2, $3, $4, $5, $6) RETURNING id)
           SELECT ins.id,
                  EXISTS (SELECT 1 FROM members WHERE grp = $2 AND "user" <> $1),
                  p.server_id, p."user"
             FROM ins LEFT JOIN (
                  SELECT DISTINCT p.server_id, p."user" FROM presence p
                    JOIN members mb ON mb."user" = p."user"
                   WHERE mb.grp = $2 AND p."user" <> $1) p ON true
            ORDER BY p.server_id"#,
        &[
            &msg.from,
            &group,
            &(msg.client_id as i64),
            &msg.body,
            &now,
            &msg.file,
        ],
    )?;
    let first = rows
        .first()
        .ok_or_else(|| Error::Commit("a group message was not stored".into()))?;
    let id: i64 = first.try_get(0)?;
    let others: bool = first.try_get(1)?;
    let online_at = joined_connections(&rows, 2)?;
    if !others {
        collect_group_garbage(conn, &[(group.to_string(), id - 1, id)])?;
    }
    Ok(StoredMessage {
        envelope: msg.envelope(id, "", Some(group), now),
        online_at,
    })
}

/// Stores first attempts of group messages without files in one statement where the common
/// case holds (see [`crate::db::Tx::store_group_messages`]), with ids in their order; `None`
/// for the others.
pub fn store_group_messages(
    conn: &mut Conn,
    msgs: &[(Outgoing<'_>, &str, u64)],
) -> Result<Vec<Option<StoredMessage>>> {
    in_chunks(
        conn,
        msgs,
        |(m, _, _)| m.body.len(),
        MERGED_BYTES,
        store_some,
    )
}

/// [`store_group_messages`], in one statement.
fn store_some(
    conn: &mut Conn,
    msgs: &[(Outgoing<'_>, &str, u64)],
) -> Result<Vec<Option<StoredMessage>>> {
    let now = now_ms();
    let picked = first_of_each(msgs.iter().map(|(m, _, _)| m));
    let senders: Vec<&str> = picked.iter().map(|&i| msgs[i].0.from).collect();
    let groups: Vec<&str> = picked.iter().map(|&i| msgs[i].1).collect();
    let epochs: Vec<i64> = picked.iter().map(|&i| msgs[i].2 as i64).collect();
    let client_ids: Vec<i64> = picked.iter().map(|&i| msgs[i].0.client_id as i64).collect();
    let bodies: Vec<&[u8]> = picked.iter().map(|&i| msgs[i].0.body).collect();
    // What `member_view`, `stored_group_copy` and `check_send` check, in SQL; a message that
    // fails any of them is left for those to say why. Looked up row by row, as in
    // `store_messages`.
    let rows = conn.rows(
        r#"WITH input AS (
               SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[],
                                    $5::bytea[])
                        WITH ORDINALITY AS i(sender, grp, epoch, client_id, body, ord)),
           ins AS (
               INSERT INTO messages (sender, grp, client_id, body, sent_at)
               SELECT i.sender, g.name, i.client_id, i.body, $6
                 FROM input i CROSS JOIN LATERAL (
                      SELECT name, epoch FROM groups
                       WHERE name = i.grp AND epoch = i.epoch OFFSET 0) g
                WHERE EXISTS (SELECT 1 FROM members mb
                               WHERE mb.grp = g.name AND mb."user" = i.sender)
                  AND EXISTS (SELECT 1 FROM members mb
                               WHERE mb.grp = g.name AND mb."user" <> i.sender)
                  AND EXISTS (SELECT 1 FROM group_keys k
                               WHERE k.grp = g.name AND k.epoch = g.epoch)
                ORDER BY i.ord
               ON CONFLICT (sender, client_id) DO NOTHING
               RETURNING id, sender, client_id, grp)
           SELECT ins.id, ins.sender, ins.client_id, p.server_id, p."user"
             FROM ins LEFT JOIN LATERAL (SELECT DISTINCT p.server_id, p."user" FROM presence p
                                           JOIN members mb ON mb."user" = p."user"
                                          WHERE mb.grp = ins.grp AND p."user" <> ins.sender) p
                  ON true
            ORDER BY ins.id, p.server_id"#,
        &[&senders, &groups, &epochs, &client_ids, &bodies, &now],
    )?;
    merged_rows(&rows, msgs.iter().map(|(m, _, _)| m), &picked, |i, id| {
        msgs[i].0.envelope(id, "", Some(msgs[i].1), now)
    })
}

/// The statement of [`advance_positions`] that moves positions (`$1` the groups, `$2` the
/// members, pairwise); it returns `(group, old position, new position)` of each that moved.
///
/// Each member's walk goes forward from its position a message at a time (an index lookup
/// each, as the SQLite backend's loop does, so the cost is what the position advances, not
/// what is queued behind a gap; the acknowledgement of each step is a lookup of its own,
/// `LIMIT 1`, so that the planner cannot turn it into a join that reads all of the member's
/// acknowledgements at every step) while the next message is acknowledged; the
/// acknowledgements it passes go.
pub(super) const WALK: &str = r#"WITH RECURSIVE pairs AS (
       SELECT DISTINCT * FROM unnest($1::text[], $2::text[]) AS p(grp, usr)),
   walk(grp, usr, p) AS (
       SELECT mb.grp, mb."user", mb.position FROM pairs
         CROSS JOIN LATERAL (
           SELECT grp, "user", position FROM members
            WHERE grp = pairs.grp AND "user" = pairs.usr OFFSET 0) mb
       UNION ALL
       SELECT w.grp, w.usr, acked.msg_id FROM walk w
         CROSS JOIN LATERAL (
           SELECT m.id FROM messages m
            WHERE m.grp = w.grp AND m.id > w.p AND m.sender <> w.usr
            ORDER BY m.id LIMIT 1) nxt
         CROSS JOIN LATERAL (
           SELECT a.msg_id FROM group_acks a
            WHERE a.grp = w.grp AND a."user" = w.usr AND a.msg_id = nxt.id LIMIT 1) acked),
   next AS (SELECT grp, usr, min(p) AS old, max(p) AS p FROM walk GROUP BY grp, usr),
   dropped AS (
       DELETE FROM group_acks a USING next n
        WHERE a.grp = n.grp AND a."user" = n.usr AND a.msg_id <= n.p),
   moved AS (
       UPDATE members mb SET position = n.p FROM next n
        WHERE mb.grp = n.grp AND mb."user" = n.usr AND n.p > mb.position)
   SELECT grp, old, p FROM next WHERE p > old"#;

/// Moves each `(group, member)`'s position over every acknowledged message that directly
/// follows it (`WALK`, one statement for all), then removes the group messages that no
/// member still needs in the ranges the positions passed (one more statement): a member's
/// acknowledgements anywhere in a batch cost two round trips in all.
pub fn advance_positions(conn: &mut Conn, pairs: &[(&str, &str)]) -> Result<()> {
    if pairs.is_empty() {
        return Ok(());
    }
    let (groups, users): (Vec<&str>, Vec<&str>) = pairs.iter().copied().unzip();
    let moved = conn.rows(WALK, &[&groups, &users])?;
    // Per group, from the lowest old position to the highest new one.
    let mut ranges: Vec<(String, i64, i64)> = Vec::new();
    for r in &moved {
        let (group, old, new): (String, i64, i64) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
        match ranges.iter_mut().find(|(g, _, _)| *g == group) {
            Some((_, lo, hi)) => (*lo, *hi) = ((*lo).min(old), (*hi).max(new)),
            None => ranges.push((group, old, new)),
        }
    }
    collect_group_garbage(conn, &ranges)
}

/// Removes the group messages with ids in `(after, upto]` of each `(group, after, upto)` that
/// every current member other than their sender has passed, remembering them as delivered
/// (one statement), then the files they offered.
fn collect_group_garbage(conn: &mut Conn, ranges: &[(String, i64, i64)]) -> Result<()> {
    if ranges.is_empty() {
        return Ok(());
    }
    let groups: Vec<&str> = ranges.iter().map(|(g, _, _)| g.as_str()).collect();
    let after: Vec<i64> = ranges.iter().map(|r| r.1).collect();
    let upto: Vec<i64> = ranges.iter().map(|r| r.2).collect();
    let files = conn.rows(
        r#"WITH done AS (
               DELETE FROM messages WHERE id = ANY (ARRAY(
                   SELECT m.id FROM unnest($1::text[], $2::bigint[], $3::bigint[])
                                    AS r(grp, lo, hi)
                    CROSS JOIN LATERAL (
                          SELECT id, sender FROM messages
                           WHERE grp = r.grp AND id > r.lo AND id <= r.hi OFFSET 0) m
                    WHERE NOT EXISTS (SELECT 1 FROM members mb
                                       WHERE mb.grp = r.grp AND mb."user" <> m.sender
                                         AND mb.position < m.id)))
               RETURNING id, sender, client_id, file_id),
           remembered AS (
               INSERT INTO delivered (msg_id, sender, client_id)
               SELECT id, sender, client_id FROM done ON CONFLICT DO NOTHING)
           SELECT file_id FROM done WHERE file_id IS NOT NULL"#,
        &[&groups, &after, &upto],
    )?;
    for r in &files {
        drop_file(conn, r.try_get(0)?)?;
    }
    Ok(())
}
