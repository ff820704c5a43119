//! Uploads and their chunks: encrypted chunks uploaded first, then offered by a message. A file
//! is deleted with the message that offers it; an upload never offered is deleted when its
//! connection ends. The lowest layer of the message tables: nothing here knows messages.

use rusqlite::{params, Connection, OptionalExtension};

use crate::db::{now_ms, Usage};
use crate::error::{Error, ErrorCode, Result};

fn refuse(code: ErrorCode, message: impl Into<String>) -> Error {
    Error::refused(code, message)
}

/// Starts an upload of `chunks` chunks for `owner` on connection `conn_id` of `server_id`,
/// unless that connection already has `limit` unfinished uploads.
pub fn begin_upload(
    conn: &Connection,
    owner: &str,
    server_id: u64,
    conn_id: u64,
    size: u64,
    chunks: u64,
    limit: usize,
) -> Result<i64> {
    let open: i64 = conn
        .prepare_cached(
            "SELECT count(*) FROM files WHERE server_id = ?1 AND conn_id = ?2 AND complete = 0",
        )?
        .query_row(params![server_id as i64, conn_id as i64], |r| r.get(0))?;
    if open as usize >= limit {
        return Err(refuse(
            ErrorCode::BadRequest,
            format!("at most {limit} unfinished uploads per connection"),
        ));
    }
    conn.prepare_cached(
        "INSERT INTO files (owner, server_id, conn_id, size, chunks, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        owner,
        server_id as i64,
        conn_id as i64,
        size as i64,
        chunks as i64,
        now_ms()
    ])?;
    Ok(conn.last_insert_rowid())
}

/// An unfinished upload of `owner`'s: its chunk count.
fn open_upload(conn: &Connection, owner: &str, upload: i64) -> Result<u64> {
    conn.prepare_cached("SELECT chunks FROM files WHERE id = ?1 AND owner = ?2 AND complete = 0")?
        .query_row(params![upload, owner], |r| r.get::<_, i64>(0))
        .optional()?
        .map(|n| n as u64)
        .ok_or_else(|| {
            refuse(
                ErrorCode::BadRequest,
                format!("no unfinished upload {upload} of yours"),
            )
        })
}

/// Stores chunk `index` of an upload of `owner`'s.
pub fn store_chunk(
    conn: &Connection,
    owner: &str,
    upload: i64,
    index: u64,
    data: &[u8],
) -> Result<()> {
    let chunks = open_upload(conn, owner, upload)?;
    if index >= chunks {
        return Err(refuse(
            ErrorCode::BadRequest,
            format!("chunk {index} is past the end of upload {upload} ({chunks} chunks)"),
        ));
    }
    // A chunk sent again (after a lost reply) replaces the first copy: both are valid.
    conn.prepare_cached(
        "INSERT OR REPLACE INTO file_chunks (file_id, idx, data) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![upload, index as i64, data])?;
    Ok(())
}

/// Marks an upload complete, if every chunk is there.
pub fn finish_upload(conn: &Connection, owner: &str, upload: i64) -> Result<()> {
    let chunks = open_upload(conn, owner, upload)?;
    let have: i64 = conn
        .prepare_cached("SELECT count(*) FROM file_chunks WHERE file_id = ?1")?
        .query_row(params![upload], |r| r.get(0))?;
    if have as u64 != chunks {
        return Err(refuse(
            ErrorCode::BadRequest,
            format!("upload {upload} has {have} of its {chunks} chunks"),
        ));
    }
    conn.prepare_cached("UPDATE files SET complete = 1 WHERE id = ?1")?
        .execute(params![upload])?;
    Ok(())
}

/// Chunk `index` of the file offered by message `msg_id`, if that message is queued for `user`
/// (a direct message to them, or a group message they have not yet acknowledged).
/// Deletes a file (once the message offering it is gone; its chunks go with it).
pub fn drop_file(conn: &Connection, file: i64) -> Result<()> {
    conn.prepare_cached("DELETE FROM files WHERE id = ?1")?
        .execute(params![file])?;
    Ok(())
}

/// Deletes the unfinished uploads of one connection (it ended), or of a whole server when
/// `conn_id` is `None` (it restarted or died).
pub fn drop_uploads(conn: &Connection, server_id: u64, conn_id: Option<u64>) -> Result<usize> {
    Ok(conn
        .prepare_cached(
            "DELETE FROM files WHERE complete = 0 AND server_id = ?1
               AND (?2 IS NULL OR conn_id = ?2)",
        )?
        .execute(params![server_id as i64, conn_id.map(|c| c as i64)])?)
}

/// The files `owner` has stored (unfinished uploads and offered files), or all files: how many,
/// and their size.
pub fn file_usage(conn: &Connection, owner: Option<&str>) -> Result<Usage> {
    let (count, bytes): (i64, i64) = match owner {
        Some(o) => conn
            .prepare_cached("SELECT count(*), coalesce(sum(size), 0) FROM files WHERE owner = ?1")?
            .query_row(params![o], |r| Ok((r.get(0)?, r.get(1)?)))?,
        None => conn
            .prepare_cached("SELECT count(*), coalesce(sum(size), 0) FROM files")?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?,
    };
    Ok(Usage {
        messages: count as u64,
        bytes: bytes as u64,
    })
}
