//! The prekeys of the key directory (see the SQLite backend's `prekeys`).

use super::Conn;
use crate::crypto::x3dh::Bundle;
use crate::error::{Error, ErrorCode, Result};
use crate::net::SignedPrekey;

/// Stores prekeys of `user` (see `Tx::put_prekeys`); how many one-time prekeys they have.
pub fn put_prekeys(
    conn: &mut Conn,
    user: &str,
    signed: Option<&SignedPrekey>,
    one_time: &[(u32, Vec<u8>)],
    max: usize,
) -> Result<u64> {
    if let Some(s) = signed {
        conn.exec(
            r#"INSERT INTO signed_prekeys ("user", id, public, signature) VALUES ($1, $2, $3, $4)
               ON CONFLICT ("user") DO UPDATE
               SET id = excluded.id, public = excluded.public, signature = excluded.signature"#,
            &[&user, &(s.id as i64), &s.public, &s.signature],
        )?;
    }
    let have = count(conn, user)?;
    if have as usize + one_time.len() > max {
        return Err(Error::refused(
            ErrorCode::QuotaExceeded,
            format!("at most {max} one-time prekeys are kept; {have} are there"),
        ));
    }
    for (id, public) in one_time {
        let n = conn.exec(
            r#"INSERT INTO one_time_prekeys ("user", id, public) VALUES ($1, $2, $3)
               ON CONFLICT DO NOTHING"#,
            &[&user, &(*id as i64), public],
        )?;
        if n == 0 {
            return Err(Error::refused(
                ErrorCode::BadRequest,
                format!("one-time prekey {id} was published before; give each its own id"),
            ));
        }
    }
    count(conn, user)
}

fn count(conn: &mut Conn, user: &str) -> Result<u64> {
    super::unsigned(
        &conn.one(
            r#"SELECT count(*) FROM one_time_prekeys WHERE "user" = $1"#,
            &[&user],
        )?,
        0,
    )
}

/// `user`'s bundle, taking (deleting) one one-time prekey; `None` without a signed prekey.
pub fn take_bundle(conn: &mut Conn, user: &str) -> Result<Option<Bundle>> {
    let Some(row) = conn.opt(
        r#"SELECT u.x25519, s.id, s.public, s.signature
             FROM signed_prekeys s JOIN users u ON u.name = s."user" WHERE s."user" = $1"#,
        &[&user],
    )?
    else {
        return Ok(None);
    };
    let one_time = conn.opt(
        r#"DELETE FROM one_time_prekeys
            WHERE "user" = $1
              AND id = (SELECT min(id) FROM one_time_prekeys WHERE "user" = $1)
           RETURNING id, public"#,
        &[&user],
    )?;
    let one_time = match one_time {
        Some(r) => Some((
            r.try_get::<_, i64>(0)? as u32,
            serde_bytes::ByteBuf::from(r.try_get::<_, Vec<u8>>(1)?),
        )),
        None => None,
    };
    Ok(Some(Bundle {
        identity: row.try_get(0)?,
        signed_prekey_id: row.try_get::<_, i64>(1)? as u32,
        signed_prekey: row.try_get(2)?,
        signature: row.try_get(3)?,
        one_time,
    }))
}
