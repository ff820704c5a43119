//! Uploads and their chunks (see the SQLite backend's `files`): the lowest layer of the
//! message tables.

use super::Conn;
use crate::db::{now_ms, Usage};
use crate::error::{Error, ErrorCode, Result};

fn refuse(message: String) -> Error {
    Error::refused(ErrorCode::BadRequest, message)
}

/// Starts an upload of `chunks` chunks for `owner` on connection `conn_id` of `server_id`,
/// unless that connection already has `limit` unfinished uploads.
pub fn begin_upload(
    conn: &mut Conn,
    owner: &str,
    server_id: u64,
    conn_id: u64,
    size: u64,
    chunks: u64,
    limit: usize,
) -> Result<i64> {
    let (server_id, conn_id) = (server_id as i64, conn_id as i64);
    let open: i64 = conn
        .one(
            "SELECT count(*) FROM files WHERE server_id = $1 AND conn_id = $2 AND NOT complete",
            &[&server_id, &conn_id],
        )?
        .try_get(0)?;
    if open as usize >= limit {
        return Err(refuse(format!(
            "at most {limit} unfinished uploads per connection"
        )));
    }
    Ok(conn
        .one(
            "INSERT INTO files (owner, server_id, conn_id, size, chunks, created_at)
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
            &[
                &owner,
                &server_id,
                &conn_id,
                &(size as i64),
                &(chunks as i64),
                &now_ms(),
            ],
        )?
        .try_get(0)?)
}

/// An unfinished upload of `owner`'s: its chunk count.
fn open_upload(conn: &mut Conn, owner: &str, upload: i64) -> Result<u64> {
    match conn.opt(
        "SELECT chunks FROM files WHERE id = $1 AND owner = $2 AND NOT complete",
        &[&upload, &owner],
    )? {
        Some(r) => Ok(r.try_get::<_, i64>(0)?.max(0) as u64),
        None => Err(refuse(format!("no unfinished upload {upload} of yours"))),
    }
}

/// Stores chunk `index` of an upload of `owner`'s (a chunk sent again replaces the first).
pub fn store_chunk(
    conn: &mut Conn,
    owner: &str,
    upload: i64,
    index: u64,
    data: &[u8],
) -> Result<()> {
    let chunks = open_upload(conn, owner, upload)?;
    if index >= chunks {
        return Err(refuse(format!(
            "chunk {index} is past the end of upload {upload} ({chunks} chunks)"
        )));
    }
    conn.exec(
        "INSERT INTO file_chunks (file_id, idx, data) VALUES ($1, $2, $3)
         ON CONFLICT (file_id, idx) DO UPDATE SET data = excluded.data",
        &[&upload, &(index as i64), &data],
    )?;
    Ok(())
}

/// Marks an upload complete, if every chunk is there.
pub fn finish_upload(conn: &mut Conn, owner: &str, upload: i64) -> Result<()> {
    let chunks = open_upload(conn, owner, upload)?;
    let have: i64 = conn
        .one(
            "SELECT count(*) FROM file_chunks WHERE file_id = $1",
            &[&upload],
        )?
        .try_get(0)?;
    if have as u64 != chunks {
        return Err(refuse(format!(
            "upload {upload} has {have} of its {chunks} chunks"
        )));
    }
    conn.exec("UPDATE files SET complete = true WHERE id = $1", &[&upload])?;
    Ok(())
}

/// Deletes a file (once the message offering it is gone; its chunks go with it).
pub fn drop_file(conn: &mut Conn, file: i64) -> Result<()> {
    conn.exec("DELETE FROM files WHERE id = $1", &[&file])?;
    Ok(())
}

/// Deletes the unfinished uploads of one connection (it ended), or of a whole server when
/// `conn_id` is `None` (it restarted or died).
pub fn drop_uploads(conn: &mut Conn, server_id: u64, conn_id: Option<u64>) -> Result<usize> {
    Ok(conn.exec(
        "DELETE FROM files WHERE NOT complete AND server_id = $1
           AND ($2::BIGINT IS NULL OR conn_id = $2)",
        &[&(server_id as i64), &conn_id.map(|c| c as i64)],
    )? as usize)
}

/// The files `owner` has stored (unfinished uploads and offered files), or all files: how many,
/// and their size.
pub fn file_usage(conn: &mut Conn, owner: Option<&str>) -> Result<Usage> {
    let row = conn.one(
        "SELECT count(*), coalesce(sum(size), 0)::BIGINT FROM files
          WHERE $1::TEXT IS NULL OR owner = $1",
        &[&owner],
    )?;
    Ok(Usage {
        messages: super::unsigned(&row, 0)?,
        bytes: super::unsigned(&row, 1)?,
    })
}
