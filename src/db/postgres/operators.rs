//! What operators do (`fastchat-admin`; see the SQLite backend's `operators`).

use super::files::drop_file;
use super::groups::delete_group;
use super::registry::strings;
use super::{unsigned, Conn};
use crate::db::{Deleted, Exported, OnlineRow, UserSummary};
use crate::error::Result;
use crate::net::PublicKeys;

/// Every account, by name, with what it holds on the servers.
pub fn users(conn: &mut Conn) -> Result<Vec<UserSummary>> {
    conn.rows(
        r#"SELECT u.name, u.created_at, length(u.x25519) > 0, u.rekey,
                  (SELECT count(*) FROM messages m WHERE m.recipient = u.name),
                  (SELECT coalesce(sum(length(m.body)), 0)::BIGINT FROM messages m
                    WHERE m.recipient = u.name),
                  (SELECT count(*) FROM presence p WHERE p."user" = u.name),
                  (SELECT count(*) FROM members g WHERE g."user" = u.name)
             FROM users u ORDER BY u.name"#,
        &[],
    )?
    .iter()
    .map(|r| {
        Ok(UserSummary {
            name: r.try_get(0)?,
            created_at: r.try_get(1)?,
            has_keys: r.try_get(2)?,
            may_rekey: r.try_get(3)?,
            queued: unsigned(r, 4)?,
            queued_bytes: unsigned(r, 5)?,
            connections: unsigned(r, 6)?,
            groups: unsigned(r, 7)?,
        })
    })
    .collect()
}

/// Makes an account without keys, claimed by its owner's first signup; `false` if the name is
/// taken, in any case.
pub fn create_account(conn: &mut Conn, name: &str, password_hash: &str) -> Result<bool> {
    let empty = PublicKeys {
        x25519: Vec::new(),
        ed25519: Vec::new(),
    };
    if !super::accounts::create_user(conn, name, password_hash, &empty)? {
        return Ok(false);
    }
    conn.exec("UPDATE users SET rekey = true WHERE name = $1", &[&name])?;
    Ok(true)
}

/// Sets a user's password, ends their sessions, and lets them upload new keys once; `false` if
/// there is no such user.
pub fn reset_password(conn: &mut Conn, name: &str, password_hash: &str) -> Result<bool> {
    let n = conn.exec(
        "UPDATE users SET password_hash = $2, rekey = true WHERE name = $1",
        &[&name, &password_hash],
    )?;
    end_sessions(conn, name)?;
    Ok(n == 1)
}

/// Replaces a user's public keys if an operator allowed it; `false` if not. Their prekeys go
/// with the old keys.
pub fn set_keys(conn: &mut Conn, name: &str, keys: &PublicKeys) -> Result<bool> {
    let n = conn.exec(
        "UPDATE users SET x25519 = $2, ed25519 = $3, rekey = false WHERE name = $1 AND rekey",
        &[&name, &keys.x25519, &keys.ed25519],
    )?;
    if n == 1 {
        conn.exec(r#"DELETE FROM signed_prekeys WHERE "user" = $1"#, &[&name])?;
        conn.exec(
            r#"DELETE FROM one_time_prekeys WHERE "user" = $1"#,
            &[&name],
        )?;
    }
    Ok(n == 1)
}

/// Ends every session of a user; how many there were.
pub fn end_sessions(conn: &mut Conn, name: &str) -> Result<usize> {
    Ok(conn.exec(r#"DELETE FROM sessions WHERE "user" = $1"#, &[&name])? as usize)
}

/// Deletes a user and what is theirs (see the SQLite backend); `None` if there is no such user.
pub fn delete_user(conn: &mut Conn, name: &str) -> Result<Option<Deleted>> {
    if conn
        .opt("SELECT 1 FROM users WHERE name = $1", &[&name])?
        .is_none()
    {
        return Ok(None);
    }
    end_sessions(conn, name)?;
    let prefix = format!("{name}/%");
    let owned = strings(conn.rows(
        "SELECT name FROM groups WHERE admin = $1 OR name LIKE $2 ORDER BY name",
        &[&name, &prefix],
    )?)?;
    for g in &owned {
        delete_group(conn, g)?;
    }
    let member_of = strings(conn.rows(
        r#"SELECT grp FROM members WHERE "user" = $1 ORDER BY grp"#,
        &[&name],
    )?)?;
    // Messages offering their files, to anyone, go with the files.
    conn.exec(
        "DELETE FROM messages WHERE file_id IN (SELECT id FROM files WHERE owner = $1)",
        &[&name],
    )?;
    let files = conn.rows("SELECT id FROM files WHERE owner = $1", &[&name])?;
    for r in &files {
        drop_file(conn, r.try_get(0)?)?;
    }
    let queued = unsigned(
        &conn.one(
            "SELECT count(*) FROM messages WHERE recipient = $1",
            &[&name],
        )?,
        0,
    )?;
    conn.exec("DELETE FROM group_keys WHERE member = $1", &[&name])?;
    // Cascades: their queue, memberships, acknowledgements.
    conn.exec("DELETE FROM users WHERE name = $1", &[&name])?;
    Ok(Some(Deleted {
        groups_deleted: owned,
        groups_left: member_of,
        messages_deleted: queued,
    }))
}

/// Who is connected, where: one row per user and server.
pub fn online(conn: &mut Conn) -> Result<Vec<OnlineRow>> {
    conn.rows(
        r#"SELECT p."user", p.server_id, coalesce(s.name, ''), count(*)
             FROM presence p LEFT JOIN servers s ON s.id = p.server_id
            GROUP BY p."user", p.server_id, s.name ORDER BY p."user", p.server_id"#,
        &[],
    )?
    .iter()
    .map(|r| {
        Ok(OnlineRow {
            user: r.try_get(0)?,
            server_id: unsigned(r, 1)?,
            server: r.try_get(2)?,
            connections: unsigned(r, 3)?,
        })
    })
    .collect()
}

/// Empties a user's queue (direct messages with their files, and their place in each group);
/// how many direct messages went.
pub fn purge_queue(conn: &mut Conn, name: &str) -> Result<u64> {
    let files = conn.rows(
        "DELETE FROM messages WHERE recipient = $1 AND file_id IS NOT NULL RETURNING file_id",
        &[&name],
    )?;
    let mut n = files.len() as u64;
    for r in &files {
        drop_file(conn, r.try_get(0)?)?;
    }
    n += conn.exec("DELETE FROM messages WHERE recipient = $1", &[&name])?;
    conn.exec(
        r#"UPDATE members SET position = greatest(position, coalesce(
               (SELECT max(id) FROM messages m WHERE m.grp = members.grp), 0))
            WHERE "user" = $1"#,
        &[&name],
    )?;
    conn.exec(r#"DELETE FROM group_acks WHERE "user" = $1"#, &[&name])?;
    Ok(n)
}

/// What the servers hold, as stored: every message to or from `user` (or every message),
/// oldest first.
pub fn export(conn: &mut Conn, user: Option<&str>) -> Result<Vec<Exported>> {
    conn.rows(
        r#"SELECT id, sender, recipient, grp, client_id, sent_at, body, file_id FROM messages
            WHERE $1::TEXT IS NULL OR sender = $1 OR recipient = $1
               OR grp IN (SELECT grp FROM members WHERE "user" = $1)
            ORDER BY id"#,
        &[&user],
    )?
    .iter()
    .map(|r| {
        Ok(Exported {
            id: r.try_get(0)?,
            sender: r.try_get(1)?,
            recipient: r.try_get(2)?,
            group: r.try_get(3)?,
            client_id: unsigned(r, 4)?,
            sent_at: r.try_get(5)?,
            body: r.try_get(6)?,
            file_id: r.try_get(7)?,
        })
    })
    .collect()
}

/// Messages stored and not yet acknowledged, in all.
pub fn queued_total(conn: &mut Conn) -> Result<u64> {
    unsigned(&conn.one("SELECT count(*) FROM messages", &[])?, 0)
}
