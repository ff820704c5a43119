//! What operators do (`fastchat-admin`): list, make, reset and delete accounts, end sessions,
//! look at and purge queues, export what the servers hold. Uses every other concern.

use rusqlite::{params, Connection, OptionalExtension};

use super::files::drop_file;
use super::groups::delete_group;
use crate::db::{Deleted, Exported, OnlineRow, UserSummary};
use crate::error::Result;
use crate::net::PublicKeys;

/// Every account, by name, with what it holds on the servers.
pub fn users(conn: &Connection) -> Result<Vec<UserSummary>> {
    Ok(conn
        .prepare_cached(
            "SELECT u.name, u.created_at, length(u.x25519) > 0, u.rekey,
                    (SELECT count(*) FROM messages m WHERE m.recipient = u.name),
                    (SELECT coalesce(sum(length(m.body)), 0) FROM messages m
                      WHERE m.recipient = u.name),
                    (SELECT count(*) FROM presence p WHERE p.user = u.name),
                    (SELECT count(*) FROM members g WHERE g.user = u.name)
               FROM users u ORDER BY u.name",
        )?
        .query_map([], |r| {
            Ok(UserSummary {
                name: r.get(0)?,
                created_at: r.get(1)?,
                has_keys: r.get(2)?,
                may_rekey: r.get(3)?,
                queued: r.get::<_, i64>(4)? as u64,
                queued_bytes: r.get::<_, i64>(5)? as u64,
                connections: r.get::<_, i64>(6)? as u64,
                groups: r.get::<_, i64>(7)? as u64,
            })
        })?
        .collect::<rusqlite::Result<_>>()?)
}

/// Makes an account without keys, that takes its first keys from its owner's first signup
/// (`fastchat signup`, which claims it). `Ok(false)` if the name is taken, in any case.
pub fn create_account(conn: &Connection, name: &str, password_hash: &str) -> Result<bool> {
    let empty = PublicKeys {
        x25519: Vec::new(),
        ed25519: Vec::new(),
    };
    if !super::accounts::create_user(conn, name, password_hash, &empty)? {
        return Ok(false);
    }
    conn.prepare_cached("UPDATE users SET rekey = 1 WHERE name = ?1")?
        .execute(params![name])?;
    Ok(true)
}

/// Sets a user's password, ends their sessions, and lets them upload new keys once (their
/// key file, sealed under the old password, may be lost with it). `Ok(false)` if there is no
/// such user.
pub fn reset_password(conn: &Connection, name: &str, password_hash: &str) -> Result<bool> {
    let n = conn
        .prepare_cached("UPDATE users SET password_hash = ?2, rekey = 1 WHERE name = ?1")?
        .execute(params![name, password_hash])?;
    end_sessions(conn, name)?;
    Ok(n == 1)
}

/// Replaces a user's public keys if an operator allowed it (see [`reset_password`]); `Ok(false)`
/// if not. Their prekeys go with the old keys (they were made and signed with them).
pub fn set_keys(conn: &Connection, name: &str, keys: &PublicKeys) -> Result<bool> {
    let n = conn
        .prepare_cached(
            "UPDATE users SET x25519 = ?2, ed25519 = ?3, rekey = 0 WHERE name = ?1 AND rekey = 1",
        )?
        .execute(params![name, keys.x25519, keys.ed25519])?;
    if n == 1 {
        for table in ["signed_prekeys", "one_time_prekeys"] {
            conn.prepare_cached(&format!("DELETE FROM {table} WHERE user = ?1"))?
                .execute(params![name])?;
        }
    }
    Ok(n == 1)
}

/// Ends every session of a user: the balancer refuses their tokens, and every server closes
/// their connections at its next heartbeat. Returns how many there were.
pub fn end_sessions(conn: &Connection, name: &str) -> Result<usize> {
    Ok(conn
        .prepare_cached("DELETE FROM sessions WHERE user = ?1")?
        .execute(params![name])?)
}

/// Deletes a user: their sessions (so their connections close), the groups they own (with
/// those groups' messages), their queue, their files (and the messages offering them), their
/// memberships. Messages they sent to others stay queued for those others. `None` if there
/// is no such user.
pub fn delete_user(conn: &Connection, name: &str) -> Result<Option<Deleted>> {
    let exists = conn
        .prepare_cached("SELECT 1 FROM users WHERE name = ?1")?
        .query_row(params![name], |_| Ok(()))
        .optional()?
        .is_some();
    if !exists {
        return Ok(None);
    }
    end_sessions(conn, name)?;
    let owned: Vec<String> = conn
        .prepare_cached("SELECT name FROM groups WHERE admin = ?1 OR name LIKE ?2 ORDER BY name")?
        .query_map(params![name, format!("{name}/%")], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for g in &owned {
        delete_group(conn, g)?;
    }
    let member_of: Vec<String> = conn
        .prepare_cached("SELECT grp FROM members WHERE user = ?1 ORDER BY grp")?
        .query_map(params![name], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    // Messages offering their files, to anyone, go with the files.
    conn.prepare_cached(
        "DELETE FROM messages WHERE file_id IN (SELECT id FROM files WHERE owner = ?1)",
    )?
    .execute(params![name])?;
    let files: Vec<i64> = conn
        .prepare_cached("SELECT id FROM files WHERE owner = ?1")?
        .query_map(params![name], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for f in files {
        drop_file(conn, f)?;
    }
    let (queued,): (i64,) = conn
        .prepare_cached("SELECT count(*) FROM messages WHERE recipient = ?1")?
        .query_row(params![name], |r| Ok((r.get(0)?,)))?;
    conn.prepare_cached("DELETE FROM group_keys WHERE member = ?1")?
        .execute(params![name])?;
    // Cascades: their queue, memberships, acknowledgements.
    conn.prepare_cached("DELETE FROM users WHERE name = ?1")?
        .execute(params![name])?;
    Ok(Some(Deleted {
        groups_deleted: owned,
        groups_left: member_of,
        messages_deleted: queued as u64,
    }))
}

/// Who is connected, where: one row per user and server.
pub fn online(conn: &Connection) -> Result<Vec<OnlineRow>> {
    Ok(conn
        .prepare_cached(
            "SELECT p.user, p.server_id, coalesce(s.name, ''), count(*)
               FROM presence p LEFT JOIN servers s ON s.id = p.server_id
              GROUP BY p.user, p.server_id ORDER BY p.user, p.server_id",
        )?
        .query_map([], |r| {
            Ok(OnlineRow {
                user: r.get(0)?,
                server_id: r.get::<_, i64>(1)? as u64,
                server: r.get(2)?,
                connections: r.get::<_, i64>(3)? as u64,
            })
        })?
        .collect::<rusqlite::Result<_>>()?)
}

/// Empties a user's queue: deletes the direct messages waiting for them (with the files they
/// offer), and moves their place in each group past every group message sent so far. Returns
/// how many direct messages went.
pub fn purge_queue(conn: &Connection, name: &str) -> Result<u64> {
    let files: Vec<i64> = conn
        .prepare_cached(
            "DELETE FROM messages WHERE recipient = ?1 AND file_id IS NOT NULL RETURNING file_id",
        )?
        .query_map(params![name], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut n = files.len() as u64;
    for f in files {
        drop_file(conn, f)?;
    }
    n += conn
        .prepare_cached("DELETE FROM messages WHERE recipient = ?1")?
        .execute(params![name])? as u64;
    conn.prepare_cached(
        "UPDATE members SET position = max(position, coalesce(
             (SELECT max(id) FROM messages m WHERE m.grp = members.grp), 0))
          WHERE user = ?1",
    )?
    .execute(params![name])?;
    conn.prepare_cached("DELETE FROM group_acks WHERE user = ?1")?
        .execute(params![name])?;
    Ok(n)
}

/// What the servers hold, as it is stored (ciphertext and metadata): every message to or from
/// `user`, or every message, oldest first.
pub fn export(conn: &Connection, user: Option<&str>) -> Result<Vec<Exported>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, sender, recipient, grp, client_id, sent_at, body, file_id FROM messages
          WHERE ?1 IS NULL OR sender = ?1 OR recipient = ?1
             OR grp IN (SELECT grp FROM members WHERE user = ?1)
          ORDER BY id",
    )?;
    let rows = stmt
        .query_map(params![user], |r| {
            Ok(Exported {
                id: r.get(0)?,
                sender: r.get(1)?,
                recipient: r.get(2)?,
                group: r.get(3)?,
                client_id: r.get::<_, i64>(4)? as u64,
                sent_at: r.get(5)?,
                body: r.get(6)?,
                file_id: r.get(7)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

/// Messages stored and not yet acknowledged, in all.
pub fn queued_total(conn: &Connection) -> Result<u64> {
    let n: i64 = conn
        .prepare_cached("SELECT count(*) FROM messages")?
        .query_row([], |r| r.get(0))?;
    Ok(n as u64)
}
