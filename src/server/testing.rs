//! Helpers for the server's in-process tests.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::outbound::Cut;
use crate::net::Envelope;

/// A connection cut-off that only records that it happened (the tests read the outbound
/// queue directly).
#[derive(Default)]
pub struct Flag(AtomicBool);

impl Flag {
    /// Whether the connection was cut off.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

impl Cut for Flag {
    fn cut(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A direct message from alice to bob with id `id`.
pub fn envelope(id: i64) -> Arc<Envelope> {
    Arc::new(Envelope {
        id,
        from: "alice".into(),
        to: "bob".into(),
        group: None,
        client_id: id as u64,
        body: vec![7; 3],
        sent_at: 0,
    })
}
