//! Accounts and sessions (the balancer's tables): users with their password hash and public
//! keys, and sessions by the SHA-256 of their token.

use rusqlite::{params, Connection, OptionalExtension};

use crate::db::{now_ms, SessionRow};
use crate::error::Result;
use crate::net::PublicKeys;

/// Inserts a new user. `Ok(false)` if the name is taken, in any case (`Alice` by `alice`).
pub fn create_user(
    conn: &Connection,
    name: &str,
    password_hash: &str,
    keys: &PublicKeys,
) -> Result<bool> {
    let n = conn.execute(
        "INSERT INTO users (name, password_hash, x25519, ed25519, created_at)
         SELECT ?1, ?2, ?3, ?4, ?5
         WHERE NOT EXISTS (SELECT 1 FROM users WHERE name = ?1 COLLATE NOCASE)",
        params![name, password_hash, keys.x25519, keys.ed25519, now_ms()],
    )?;
    Ok(n == 1)
}

/// The stored password hash of a user, if the user exists.
pub fn password_hash(conn: &Connection, name: &str) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT password_hash FROM users WHERE name = ?1")?
        .query_row(params![name], |r| r.get(0))
        .optional()?)
}

/// Whether a user exists.
pub fn user_exists(conn: &Connection, name: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM users WHERE name = ?1")?
        .query_row(params![name], |_| Ok(()))
        .optional()?
        .is_some())
}

/// A user's public keys.
pub fn user_keys(conn: &Connection, name: &str) -> Result<Option<PublicKeys>> {
    Ok(conn
        .prepare_cached("SELECT x25519, ed25519 FROM users WHERE name = ?1")?
        .query_row(params![name], |r| {
            Ok(PublicKeys {
                x25519: r.get(0)?,
                ed25519: r.get(1)?,
            })
        })
        .optional()?)
}

/// Stores a session (by the token's hash, with the key its token is proven with) and drops
/// expired ones.
pub fn create_session(
    conn: &Connection,
    token_hash: &[u8],
    user: &str,
    expires_at: i64,
    session_key: &[u8],
) -> Result<()> {
    conn.prepare_cached("DELETE FROM sessions WHERE expires_at < ?1")?
        .execute(params![now_ms()])?;
    conn.prepare_cached(
        "INSERT INTO sessions (token_hash, user, expires_at, session_key) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![token_hash, user, expires_at, session_key])?;
    Ok(())
}

/// Ends a session (logout); unknown tokens are ignored.
pub fn end_session(conn: &Connection, token_hash: &[u8]) -> Result<()> {
    conn.prepare_cached("DELETE FROM sessions WHERE token_hash = ?1")?
        .execute(params![token_hash])?;
    Ok(())
}

/// The session a token belongs to, if it exists and has not expired.
pub fn session(conn: &Connection, token_hash: &[u8]) -> Result<Option<SessionRow>> {
    Ok(conn
        .prepare_cached(
            "SELECT user, session_key, expires_at FROM sessions
             WHERE token_hash = ?1 AND expires_at > ?2",
        )?
        .query_row(params![token_hash, now_ms()], |r| {
            Ok(SessionRow {
                user: r.get(0)?,
                session_key: r.get(1)?,
                expires_at: r.get(2)?,
            })
        })
        .optional()?)
}

/// Moves a live session's expiry to `expires_at` (a session in use is renewed).
pub fn renew_session(conn: &Connection, token_hash: &[u8], expires_at: i64) -> Result<()> {
    conn.prepare_cached(
        "UPDATE sessions SET expires_at = ?2 WHERE token_hash = ?1 AND expires_at > ?3",
    )?
    .execute(params![token_hash, expires_at, now_ms()])?;
    Ok(())
}
