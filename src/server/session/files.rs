//! File requests: uploads in encrypted chunks, and downloads of a file a queued message offers.
//! Each connection has a window of [`super::FILE_WINDOW`] chunks in flight, so a client cannot
//! make the server hold more than a few chunks at a time.

use super::{error_event, Session};
use crate::error::Result;
use crate::net::{chunk_count, ErrorCode, ServerEvent, ServerReply, MAX_CHUNK};
use crate::server::outbound::Outbound;

/// Unfinished uploads one connection may have at once.
const MAX_UPLOADS: usize = 4;

impl Session<'_> {
    /// `FileBegin`: an upload of `size` bytes in `chunks` chunks, within the server's limit.
    pub(super) fn file_begin(&self, id: u64, size: u64, chunks: u64) {
        let max = self.shared.config.max_file;
        if size > max {
            let why = format!("a file of {size} bytes is over this server's limit of {max} bytes");
            return self.refuse(id, ErrorCode::BadMessage, why);
        }
        if chunks != chunk_count(size) {
            let why = format!("a file of {size} bytes has {} chunks", chunk_count(size));
            return self.refuse(id, ErrorCode::BadRequest, why);
        }
        let (me, sid, cid) = (self.user.clone(), self.shared.server_id, self.conn_id);
        let quotas = self.shared.config.quotas;
        self.write(id, move |tx| {
            quotas.check_file(tx.file_usage(Some(&me))?, tx.file_usage(None)?, size)?;
            let upload = tx.begin_upload(&me, sid, cid, size, chunks, MAX_UPLOADS)?;
            Ok(ServerReply::Upload { upload })
        });
    }

    /// `FileChunk`: one chunk of an unfinished upload; waits for a window slot first (only a
    /// client that stops reading its replies waits long, and then the connection ends).
    pub(super) fn file_chunk(&self, id: u64, upload: i64, index: u64, data: Vec<u8>) -> Result<()> {
        if data.is_empty() || data.len() > MAX_CHUNK {
            let why = format!("a file chunk holds 1 to {MAX_CHUNK} bytes");
            self.refuse(id, ErrorCode::BadMessage, why);
            return Ok(());
        }
        let permit = self.permit()?;
        let (me, handle) = (self.user.clone(), self.handle.clone());
        self.shared.store.submit(
            move |tx| tx.store_chunk(&me, upload, index, &data),
            move |res| {
                drop(permit);
                let event = match res {
                    Ok(()) => ServerEvent::reply(id, ServerReply::Done),
                    Err(e) => error_event(id, e),
                };
                handle.offer(Outbound::event(event));
            },
        );
        Ok(())
    }

    /// `FileGet`: one chunk of a file offered by a message queued for the caller; its window
    /// slot comes back once the chunk is written to the socket.
    pub(super) fn file_get(&self, id: u64, msg_id: i64, index: u64) -> Result<()> {
        let permit = self.permit()?;
        let me = &self.user;
        match self
            .shared
            .store
            .read(|tx| tx.file_chunk(me, msg_id, index))
        {
            Ok(data) => self.queue(Outbound::Chunk(
                Box::new(ServerEvent::reply(id, ServerReply::FileData { data })),
                permit,
            )),
            Err(e) => self.queue(Outbound::event(error_event(id, e))),
        }
        Ok(())
    }
}
