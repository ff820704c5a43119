//! The cluster registry: the cluster key, the chat servers, and which server each connected
//! user is on (presence).

use rusqlite::{params, Connection, OptionalExtension};

use crate::db::now_ms;
use crate::error::Result;

/// Registers the server named `name` at `addr` (a new row, or the address of its row updated);
/// returns its id.
pub fn register_server(conn: &Connection, name: &str, addr: &str) -> Result<u64> {
    let id: i64 = conn
        .prepare_cached(
            "INSERT INTO servers (name, addr, registered_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO UPDATE SET addr = excluded.addr RETURNING id",
        )?
        .query_row(params![name, addr, now_ms()], |r| r.get(0))?;
    Ok(id as u64)
}

/// Forgets the connections of a server that has gone silent: its presence rows (its uploads
/// are the files layer's to drop). Its row stays: the id belongs to its name, and a server
/// that was only stopped registers again under it.
pub fn forget_server(conn: &Connection, server_id: u64) -> Result<()> {
    conn.execute(
        "DELETE FROM presence WHERE server_id = ?1",
        params![server_id as i64],
    )?;
    Ok(())
}

/// The connections of `server_id` that have a presence row.
pub fn present_connections(conn: &Connection, server_id: u64) -> Result<Vec<u64>> {
    Ok(conn
        .prepare_cached("SELECT conn_id FROM presence WHERE server_id = ?1")?
        .query_map(
            params![server_id as i64],
            |r| Ok(r.get::<_, i64>(0)? as u64),
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?)
}

/// The address and name a server registered with, if it is still registered.
pub fn server_addr(conn: &Connection, server_id: u64) -> Result<Option<(String, String)>> {
    Ok(conn
        .prepare_cached("SELECT addr, name FROM servers WHERE id = ?1")?
        .query_row(params![server_id as i64], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?)
}

/// Records that `user` is connected to `server_id` on connection `conn_id` with the session
/// whose token hashes to `token_hash`.
pub fn add_presence(
    conn: &Connection,
    server_id: u64,
    conn_id: u64,
    user: &str,
    token_hash: &[u8],
) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO presence (server_id, conn_id, user, token_hash)
         VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![server_id as i64, conn_id as i64, user, token_hash])?;
    Ok(())
}

/// The connections on `server_id` whose session has ended (logged out or expired).
pub fn ended_sessions(conn: &Connection, server_id: u64) -> Result<Vec<u64>> {
    Ok(conn
        .prepare_cached(
            "SELECT p.conn_id FROM presence p
              WHERE p.server_id = ?1 AND p.token_hash IS NOT NULL
                AND NOT EXISTS (SELECT 1 FROM sessions s
                                 WHERE s.token_hash = p.token_hash AND s.expires_at > ?2)",
        )?
        .query_map(params![server_id as i64, now_ms()], |r| {
            Ok(r.get::<_, i64>(0)? as u64)
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?)
}

/// Users connected to any server now, by name (at most `limit`).
pub fn online_users(conn: &Connection, limit: usize, servers: &[u64]) -> Result<Vec<String>> {
    Ok(conn
        .prepare_cached(
            "SELECT DISTINCT user FROM presence
              WHERE server_id IN (SELECT value FROM json_each(?2))
              ORDER BY user LIMIT ?1",
        )?
        .query_map(params![limit as i64, json_list(servers)], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?)
}

/// Which of `users` are connected to one of `servers`.
pub fn online_among(conn: &Connection, users: &[String], servers: &[u64]) -> Result<Vec<String>> {
    let users = serde_json::to_string(users).map_err(|e| crate::Error::Invalid(e.to_string()))?;
    Ok(conn
        .prepare_cached(
            "SELECT DISTINCT user FROM presence
              WHERE user IN (SELECT value FROM json_each(?1))
                AND server_id IN (SELECT value FROM json_each(?2))",
        )?
        .query_map(params![users, json_list(servers)], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?)
}

/// The servers with presence rows.
pub fn presence_servers(conn: &Connection) -> Result<Vec<u64>> {
    Ok(conn
        .prepare_cached("SELECT DISTINCT server_id FROM presence")?
        .query_map([], |r| Ok(r.get::<_, i64>(0)? as u64))?
        .collect::<rusqlite::Result<_>>()?)
}

/// `[1,2,3]`, for `json_each`.
fn json_list(ids: &[u64]) -> String {
    let ids: Vec<String> = ids.iter().map(u64::to_string).collect();
    format!("[{}]", ids.join(","))
}

/// Removes one connection's presence row.
pub fn remove_presence(conn: &Connection, server_id: u64, conn_id: u64) -> Result<()> {
    conn.prepare_cached("DELETE FROM presence WHERE server_id = ?1 AND conn_id = ?2")?
        .execute(params![server_id as i64, conn_id as i64])?;
    Ok(())
}

/// Removes every presence row of a server (at its start, after a crash of an earlier run).
pub fn clear_presence(conn: &Connection, server_id: u64) -> Result<()> {
    conn.prepare_cached("DELETE FROM presence WHERE server_id = ?1")?
        .execute(params![server_id as i64])?;
    Ok(())
}
