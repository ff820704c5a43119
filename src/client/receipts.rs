//! Receipts on the recipient's side: which messages reached this client or were shown, to
//! tell their senders, a batch at a time (a page of `recv`, or a message in the chat). They
//! are ordinary direct messages of their own kind (see [`super::e2e::Receipt`]): sealed for
//! the sender and authenticated, so no server can make one up. Best effort: a receipt that
//! cannot be sent is logged, never an error for the command.

use std::collections::BTreeMap;

use parking_lot::Mutex;

use super::e2e::{E2e, Plain, Reached, Receipt, MAX_RECEIPT};
use super::Client;
use crate::crypto;
use crate::net::Envelope;

/// Receipts not sent yet, by sender and how far their messages got.
#[derive(Default)]
pub struct Receipts {
    pending: BTreeMap<(String, Reached), Vec<(i64, u64)>>,
}

impl Receipts {
    /// Notes that `msg` (a direct message) got this far.
    pub fn add(&mut self, msg: &Envelope, reached: Reached) {
        self.pending
            .entry((msg.from.clone(), reached))
            .or_default()
            .push((msg.id, msg.client_id));
    }

    /// Sends every pending receipt.
    pub fn send(&mut self, client: &Client, e2e: &Mutex<E2e>) {
        for ((to, reached), of) in std::mem::take(&mut self.pending) {
            send(client, e2e, &to, reached, of);
        }
    }
}

/// Tells `to` that the messages `of` got as far as `reached`.
pub fn send(client: &Client, e2e: &Mutex<E2e>, to: &str, reached: Reached, of: Vec<(i64, u64)>) {
    for part in of.chunks(MAX_RECEIPT) {
        let plain = Plain::Receipt(Receipt {
            reached,
            of: part.to_vec(),
        });
        let sent = crypto::random_u64().and_then(|client_id| {
            let body = e2e.lock().seal_direct(to, client_id, &plain)?;
            client.send(to, client_id, &body, None)
        });
        if let Err(e) = sent {
            log::warn!("could not send {to} a receipt: {e}");
        }
    }
}
