//! The cluster registry: the chat servers, and which server each connected user is on
//! (presence).

use super::{unsigned, Conn};
use crate::db::now_ms;
use crate::error::Result;

/// Registers the server named `name` at `addr` (a new row, or the address of its row updated);
/// returns its id.
pub fn register_server(conn: &mut Conn, name: &str, addr: &str) -> Result<u64> {
    let row = conn.one(
        "INSERT INTO servers (name, addr, registered_at) VALUES ($1, $2, $3)
         ON CONFLICT (name) DO UPDATE SET addr = excluded.addr RETURNING id",
        &[&name, &addr, &now_ms()],
    )?;
    unsigned(&row, 0)
}

/// Forgets the connections of a server that has gone silent: its presence rows (its uploads
/// are the files layer's to drop). Its row stays with its name.
pub fn forget_server(conn: &mut Conn, server_id: u64) -> Result<()> {
    clear_presence(conn, server_id)
}

/// `u64` ids from the first column of `rows`.
fn ids(rows: Vec<postgres::Row>) -> Result<Vec<u64>> {
    rows.iter().map(|r| unsigned(r, 0)).collect()
}

/// Strings from the first column of `rows`.
pub fn strings(rows: Vec<postgres::Row>) -> Result<Vec<String>> {
    rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
}

/// The connections of `server_id` that have a presence row.
pub fn present_connections(conn: &mut Conn, server_id: u64) -> Result<Vec<u64>> {
    ids(conn.rows(
        "SELECT conn_id FROM presence WHERE server_id = $1 ORDER BY conn_id",
        &[&(server_id as i64)],
    )?)
}

/// The address and name a server registered with, if it is still registered.
pub fn server_addr(conn: &mut Conn, server_id: u64) -> Result<Option<(String, String)>> {
    match conn.opt(
        "SELECT addr, name FROM servers WHERE id = $1",
        &[&(server_id as i64)],
    )? {
        Some(r) => Ok(Some((r.try_get(0)?, r.try_get(1)?))),
        None => Ok(None),
    }
}

/// Records that `user` is connected to `server_id` on connection `conn_id` with the session
/// whose token hashes to `token_hash`.
pub fn add_presence(
    conn: &mut Conn,
    server_id: u64,
    conn_id: u64,
    user: &str,
    token_hash: &[u8],
) -> Result<()> {
    conn.exec(
        r#"INSERT INTO presence (server_id, conn_id, "user", token_hash) VALUES ($1, $2, $3, $4)
           ON CONFLICT (server_id, conn_id)
           DO UPDATE SET "user" = excluded."user", token_hash = excluded.token_hash"#,
        &[&(server_id as i64), &(conn_id as i64), &user, &token_hash],
    )?;
    Ok(())
}

/// The connections on `server_id` whose session has ended (logged out or expired).
pub fn ended_sessions(conn: &mut Conn, server_id: u64) -> Result<Vec<u64>> {
    ids(conn.rows(
        "SELECT p.conn_id FROM presence p
          WHERE p.server_id = $1 AND p.token_hash IS NOT NULL
            AND NOT EXISTS (SELECT 1 FROM sessions s
                             WHERE s.token_hash = p.token_hash AND s.expires_at > $2)
          ORDER BY p.conn_id",
        &[&(server_id as i64), &now_ms()],
    )?)
}

/// `servers` as PostgreSQL's `bigint[]`.
fn server_list(servers: &[u64]) -> Vec<i64> {
    servers.iter().map(|&s| s as i64).collect()
}

/// Users connected to one of `servers` now, by name (at most `limit`).
pub fn online_users(conn: &mut Conn, limit: usize, servers: &[u64]) -> Result<Vec<String>> {
    strings(conn.rows(
        r#"SELECT DISTINCT "user" FROM presence WHERE server_id = ANY($2)
            ORDER BY "user" LIMIT $1"#,
        &[&(limit as i64), &server_list(servers)],
    )?)
}

/// Which of `users` are connected to one of `servers`.
pub fn online_among(conn: &mut Conn, users: &[String], servers: &[u64]) -> Result<Vec<String>> {
    strings(conn.rows(
        r#"SELECT DISTINCT "user" FROM presence
            WHERE "user" = ANY($1) AND server_id = ANY($2) ORDER BY "user""#,
        &[&users, &server_list(servers)],
    )?)
}

/// The servers with presence rows.
pub fn presence_servers(conn: &mut Conn) -> Result<Vec<u64>> {
    ids(conn.rows(
        "SELECT DISTINCT server_id FROM presence ORDER BY server_id",
        &[],
    )?)
}

/// Removes one connection's presence row.
pub fn remove_presence(conn: &mut Conn, server_id: u64, conn_id: u64) -> Result<()> {
    conn.exec(
        "DELETE FROM presence WHERE server_id = $1 AND conn_id = $2",
        &[&(server_id as i64), &(conn_id as i64)],
    )?;
    Ok(())
}

/// Removes every presence row of a server (at its start, after a crash of an earlier run).
pub fn clear_presence(conn: &mut Conn, server_id: u64) -> Result<()> {
    conn.exec(
        "DELETE FROM presence WHERE server_id = $1",
        &[&(server_id as i64)],
    )?;
    Ok(())
}
