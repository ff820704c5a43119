//! The cluster registry: the cluster key, the chat servers, and which server each connected
//! user is on (presence).

use rusqlite::{params, Connection, OptionalExtension};

use super::retry_busy;
use crate::db::{now_ms, DEFAULT_BUSY_TIMEOUT};
use crate::error::Result;

/// The cluster key, made (32 random bytes) by the first process that asks.
pub fn cluster_key(conn: &Connection) -> Result<Vec<u8>> {
    retry_busy(DEFAULT_BUSY_TIMEOUT, || {
        conn.execute(
            "INSERT OR IGNORE INTO cluster (id, key) VALUES (1, randomblob(32))",
            [],
        )?;
        Ok(conn.query_row("SELECT key FROM cluster WHERE id = 1", [], |r| r.get(0))?)
    })
}

/// Registers a server (or re-registers a known id whose secret matches). Returns its id, or
/// `None` when the id is unknown or the secret does not match.
pub fn register_server(
    conn: &Connection,
    addr: &str,
    server_id: Option<u64>,
    secret_hash: &[u8],
) -> Result<Option<u64>> {
    if let Some(id) = server_id {
        let n = conn.execute(
            "UPDATE servers SET addr = ?1 WHERE id = ?2 AND secret_hash = ?3",
            params![addr, id as i64, secret_hash],
        )?;
        return Ok((n == 1).then_some(id));
    }
    conn.execute(
        "INSERT INTO servers (addr, secret_hash, registered_at) VALUES (?1, ?2, ?3)",
        params![addr, secret_hash, now_ms()],
    )?;
    Ok(Some(conn.last_insert_rowid() as u64))
}

/// Forgets a server that has died: its row and its presence rows (its uploads are the files
/// layer's to drop).
pub fn forget_server(conn: &Connection, server_id: u64) -> Result<()> {
    conn.execute(
        "DELETE FROM presence WHERE server_id = ?1",
        params![server_id as i64],
    )?;
    conn.execute(
        "DELETE FROM servers WHERE id = ?1",
        params![server_id as i64],
    )?;
    Ok(())
}

/// The stored hash of a server's secret.
pub fn server_secret_hash(conn: &Connection, server_id: u64) -> Result<Option<Vec<u8>>> {
    Ok(conn
        .prepare_cached("SELECT secret_hash FROM servers WHERE id = ?1")?
        .query_row(params![server_id as i64], |r| r.get(0))
        .optional()?)
}

/// The address a server registered with, if it is still registered.
pub fn server_addr(conn: &Connection, server_id: u64) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT addr FROM servers WHERE id = ?1")?
        .query_row(params![server_id as i64], |r| r.get(0))
        .optional()?)
}

/// Records that `user` is connected to `server_id` on connection `conn_id`.
pub fn add_presence(conn: &Connection, server_id: u64, conn_id: u64, user: &str) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO presence (server_id, conn_id, user) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![server_id as i64, conn_id as i64, user])?;
    Ok(())
}

/// Users connected to any server now, by name (at most `limit`).
pub fn online_users(conn: &Connection, limit: usize) -> Result<Vec<String>> {
    Ok(conn
        .prepare_cached("SELECT DISTINCT user FROM presence ORDER BY user LIMIT ?1")?
        .query_map(params![limit as i64], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?)
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
