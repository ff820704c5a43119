//! The prekeys of the key directory (asynchronous key agreement, `crypto::x3dh`): one signed
//! prekey per user, and one-time prekeys, each handed out once.

use rusqlite::{params, Connection, OptionalExtension};

use crate::crypto::x3dh::Bundle;
use crate::error::{Error, ErrorCode, Result};
use crate::net::SignedPrekey;

/// Stores prekeys of `user` (see `Tx::put_prekeys`); how many one-time prekeys they have.
pub fn put_prekeys(
    conn: &Connection,
    user: &str,
    signed: Option<&SignedPrekey>,
    one_time: &[(u32, Vec<u8>)],
    max: usize,
) -> Result<u64> {
    if let Some(s) = signed {
        conn.prepare_cached(
            "INSERT OR REPLACE INTO signed_prekeys (user, id, public, signature)
             VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![user, s.id, s.public, s.signature])?;
    }
    let have = count(conn, user)?;
    if have as usize + one_time.len() > max {
        return Err(Error::refused(
            ErrorCode::QuotaExceeded,
            format!("at most {max} one-time prekeys are kept; {have} are there"),
        ));
    }
    let mut insert = conn.prepare_cached(
        "INSERT INTO one_time_prekeys (user, id, public) VALUES (?1, ?2, ?3)
         ON CONFLICT DO NOTHING",
    )?;
    for (id, public) in one_time {
        if insert.execute(params![user, id, public])? == 0 {
            return Err(Error::refused(
                ErrorCode::BadRequest,
                format!("one-time prekey {id} was published before; give each its own id"),
            ));
        }
    }
    count(conn, user)
}

fn count(conn: &Connection, user: &str) -> Result<u64> {
    let n: i64 = conn
        .prepare_cached("SELECT count(*) FROM one_time_prekeys WHERE user = ?1")?
        .query_row(params![user], |r| r.get(0))?;
    Ok(n as u64)
}

/// `user`'s bundle, taking (deleting) one one-time prekey; `None` without a signed prekey.
pub fn take_bundle(conn: &Connection, user: &str) -> Result<Option<Bundle>> {
    let signed: Option<Bundle> = conn
        .prepare_cached(
            "SELECT u.x25519, s.id, s.public, s.signature
               FROM signed_prekeys s JOIN users u ON u.name = s.user WHERE s.user = ?1",
        )?
        .query_row(params![user], |r| {
            Ok(Bundle {
                identity: r.get(0)?,
                signed_prekey_id: r.get(1)?,
                signed_prekey: r.get(2)?,
                signature: r.get(3)?,
                one_time: None,
            })
        })
        .optional()?;
    let Some(mut bundle) = signed else {
        return Ok(None);
    };
    let one_time: Option<(u32, Vec<u8>)> = conn
        .prepare_cached(
            "DELETE FROM one_time_prekeys
              WHERE user = ?1 AND id = (SELECT min(id) FROM one_time_prekeys WHERE user = ?1)
             RETURNING id, public",
        )?
        .query_row(params![user], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    bundle.one_time = one_time.map(|(id, p)| (id, serde_bytes::ByteBuf::from(p)));
    Ok(Some(bundle))
}
