//! Accounts and sessions (the balancer's tables): users with their password hash and public
//! keys, and sessions by the SHA-256 of their token.

use super::Conn;
use crate::db::{now_ms, SessionRow};
use crate::error::Result;
use crate::net::PublicKeys;

/// Inserts a new user. `Ok(false)` if the name is taken, in any case (`Alice` by `alice`: a
/// unique index on `lower(name)`).
pub fn create_user(
    conn: &mut Conn,
    name: &str,
    password_hash: &str,
    keys: &PublicKeys,
) -> Result<bool> {
    let n = conn.exec(
        "INSERT INTO users (name, password_hash, x25519, ed25519, created_at)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        &[
            &name,
            &password_hash,
            &keys.x25519,
            &keys.ed25519,
            &now_ms(),
        ],
    )?;
    Ok(n == 1)
}

/// The stored password hash of a user, if the user exists.
pub fn password_hash(conn: &mut Conn, name: &str) -> Result<Option<String>> {
    match conn.opt("SELECT password_hash FROM users WHERE name = $1", &[&name])? {
        Some(r) => Ok(Some(r.try_get(0)?)),
        None => Ok(None),
    }
}

/// Whether a user exists.
pub fn user_exists(conn: &mut Conn, name: &str) -> Result<bool> {
    Ok(conn
        .opt("SELECT 1 FROM users WHERE name = $1", &[&name])?
        .is_some())
}

/// A user's public keys.
pub fn user_keys(conn: &mut Conn, name: &str) -> Result<Option<PublicKeys>> {
    match conn.opt(
        "SELECT x25519, ed25519 FROM users WHERE name = $1",
        &[&name],
    )? {
        Some(r) => Ok(Some(PublicKeys {
            x25519: r.try_get(0)?,
            ed25519: r.try_get(1)?,
        })),
        None => Ok(None),
    }
}

/// Stores a session (by the token's hash, with the key its token is proven with) and drops
/// expired ones.
pub fn create_session(
    conn: &mut Conn,
    token_hash: &[u8],
    user: &str,
    expires_at: i64,
    session_key: &[u8],
) -> Result<()> {
    conn.exec("DELETE FROM sessions WHERE expires_at < $1", &[&now_ms()])?;
    conn.exec(
        r#"INSERT INTO sessions (token_hash, "user", expires_at, session_key)
           VALUES ($1, $2, $3, $4)"#,
        &[&token_hash, &user, &expires_at, &session_key],
    )?;
    Ok(())
}

/// Ends a session (logout); unknown tokens are ignored.
pub fn end_session(conn: &mut Conn, token_hash: &[u8]) -> Result<()> {
    conn.exec("DELETE FROM sessions WHERE token_hash = $1", &[&token_hash])?;
    Ok(())
}

/// The session a token belongs to, if it exists and has not expired.
pub fn session(conn: &mut Conn, token_hash: &[u8]) -> Result<Option<SessionRow>> {
    let row = conn.opt(
        r#"SELECT "user", session_key, expires_at FROM sessions
            WHERE token_hash = $1 AND expires_at > $2"#,
        &[&token_hash, &now_ms()],
    )?;
    match row {
        Some(r) => Ok(Some(SessionRow {
            user: r.try_get(0)?,
            session_key: r.try_get(1)?,
            expires_at: r.try_get(2)?,
        })),
        None => Ok(None),
    }
}

/// Moves a live session's expiry to `expires_at` (a session in use is renewed).
pub fn renew_session(conn: &mut Conn, token_hash: &[u8], expires_at: i64) -> Result<()> {
    conn.exec(
        "UPDATE sessions SET expires_at = $2 WHERE token_hash = $1 AND expires_at > $3",
        &[&token_hash, &expires_at, &now_ms()],
    )?;
    Ok(())
}
