//! Receiving: `recv` (lines or JSON, following or not), showing one message, `get`.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::client::e2e::{E2e, FileOffer, Plain, Reached, Receipt};
use crate::client::files;
use crate::client::receipts::Receipts;
use crate::client::replay::Verdict;
use crate::client::text::one_line;
use crate::client::{Client, Event};
use crate::error::{Error, Result};
use crate::net::Envelope;

use super::login::{login, Downloads, LoggedIn};
use super::{output_error, Options};

/// How `recv` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `FROM: TEXT`
    Lines,
    /// One JSON object per line.
    Json,
}

/// How `recv` reads the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvOptions {
    /// After the queue is drained, keep showing live messages this long.
    pub wait: Duration,
    /// Show without acknowledging: everything stays queued (and is shown again next time).
    pub peek: bool,
    /// Stop after showing this many messages.
    pub limit: Option<u64>,
}

/// Acknowledgements are sent in pages of this many while a queue drains (the server takes at
/// most 4096 ids in one).
const ACK_PAGE: usize = 1024;

/// `fastchat recv [--wait SECS] [--peek] [--limit N]`: prints queued messages and acknowledges
/// them (in pages, so any queue drains), then waits up to `wait` for live ones. Ctrl-C ends it
/// cleanly, even while it is looking for another server.
pub fn recv(opts: &Options, how: RecvOptions) -> Result<()> {
    let format = if opts.json {
        Format::Json
    } else {
        Format::Lines
    };
    let me = login(opts)?;
    let interrupted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        // The loop below notices Ctrl-C within 200 ms; a client stuck looking for another
        // server is closed, which ends its search.
        let (flag, client, interrupt) = (
            Arc::clone(&interrupted),
            Arc::clone(&me.client),
            opts.interrupt.clone(),
        );
        std::thread::spawn(move || {
            if interrupt.recv().is_ok() {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(500));
                client.close();
            }
        });
    }
    let stopped = || interrupted.load(std::sync::atomic::Ordering::SeqCst);
    let mut waiting = Waiting::default();
    let result = match recv_loop(opts, &me, how, format, &mut waiting, &stopped) {
        Err(_) if stopped() => Ok(()),
        other => other,
    };
    if let Some(note) = waiting.note() {
        eprintln!("fastchat: {note}");
    }
    result
}

fn recv_loop(
    opts: &Options,
    me: &LoggedIn,
    how: RecvOptions,
    format: Format,
    waiting: &mut Waiting,
    stopped: &dyn Fn() -> bool,
) -> Result<()> {
    let out = io::stdout();
    // No deadline until the queue is drained (bounded by the server's queue); then `wait`.
    let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
    let mut deadline = far;
    let mut batch: Vec<i64> = Vec::new();
    let mut shown = 0u64;
    let mut receipts = Receipts::default();
    // Acknowledges a page, and sends the receipts it earned.
    let ack = |batch: &mut Vec<i64>, receipts: &mut Receipts| -> Result<()> {
        receipts.send(&me.client, &me.e2e);
        if how.peek || batch.is_empty() {
            batch.clear();
            return Ok(());
        }
        // The keys of what was shown go before the acknowledgement.
        me.e2e.lock().settle()?;
        me.client.ack(&std::mem::take(batch))
    };
    loop {
        if how.limit.is_some_and(|n| shown >= n) {
            return ack(&mut batch, &mut receipts);
        }
        // Wake up now and then to notice Ctrl-C.
        let slice = deadline.min(Instant::now() + Duration::from_millis(200));
        let event = me.client.next(slice)?;
        if stopped() {
            return ack(&mut batch, &mut receipts);
        }
        let Some(event) = event else {
            if Instant::now() >= deadline {
                return ack(&mut batch, &mut receipts);
            }
            continue;
        };
        match event {
            Event::Message(msg) => {
                // This message, then what waited for a sender key, if it brings one.
                let mut todo = VecDeque::from([msg]);
                while let Some(msg) = todo.pop_front() {
                    if how.limit.is_some_and(|n| shown >= n) {
                        break;
                    }
                    let done = show(
                        &me.e2e,
                        &me.client,
                        &me.downloads,
                        &msg,
                        format,
                        !how.peek,
                        &mut out.lock(),
                    );
                    let done = match done {
                        // What was shown is acknowledged before the command ends quietly.
                        Err(Error::OutputClosed) => {
                            ack(&mut batch, &mut receipts)?;
                            return Err(Error::OutputClosed);
                        }
                        other => other?,
                    };
                    match done {
                        Shown::Waiting => {
                            waiting.add(msg);
                            continue;
                        }
                        Shown::Silent => todo.extend(waiting.take()),
                        _ => {}
                    }
                    // An offered file stays queued until it is taken with `get`.
                    if done != Shown::Offered {
                        batch.push(msg.id);
                    }
                    if done == Shown::Answer && opts.receipts {
                        let reached = if how.peek {
                            Reached::Delivered
                        } else {
                            Reached::Read
                        };
                        receipts.add(&msg, reached);
                    }
                    if done != Shown::Silent {
                        shown += 1;
                    }
                    if deadline != far || batch.len() >= ACK_PAGE {
                        ack(&mut batch, &mut receipts)?;
                    }
                }
            }
            Event::Synced => {
                ack(&mut batch, &mut receipts)?;
                if how.wait.is_zero() {
                    return Ok(());
                }
                if deadline == far {
                    deadline = Instant::now() + how.wait;
                }
            }
            Event::Presence { .. } => {}
            Event::Failover(server) => {
                if !opts.json {
                    eprintln!("fastchat: server lost; continuing on server {}", server.id)
                }
            }
        }
    }
}

/// Prints one message: `FROM: TEXT`, `[GROUP] FROM: TEXT`, `[GROUP] * FROM TEXT` for a notice,
/// `FROM sent NAME (SIZE) -> PATH` for a file (saved first). A message that fails to decrypt,
/// verify or download, a replay of one already shown, or one too old to tell, is reported on
/// stderr, never shown; the same message delivered again is silently skipped; a group message
/// that came before its sender's key is [`Shown::Waiting`] (see [`Waiting`]). A file larger
/// than `downloads.auto_max` is offered (`FROM offers NAME (SIZE): fastchat get ID`), not
/// saved: it stays queued, and is offered again next time, until `get` takes it. Only a lost
/// connection is an error (the message then stays queued).
pub(in crate::client) fn show(
    e2e: &Mutex<E2e>,
    client: &Client,
    downloads: &Downloads,
    msg: &Envelope,
    format: Format,
    record: bool,
    out: &mut impl Write,
) -> Result<Shown> {
    let reject = |why: String| {
        eprintln!(
            "fastchat: warning: message {} from {} rejected: {}",
            msg.id,
            msg.from,
            one_line(&why)
        );
    };
    // The lock is held to open the message, not while a file downloads.
    let result = e2e.lock().open(client, msg);
    let opened = match result {
        Ok(opened) => opened,
        Err(e) if e.is_disconnect() => return Err(e),
        // Its sender's key may still be on its way.
        Err(Error::Early(_)) if Waiting::may_wait(msg) => return Ok(Shown::Waiting),
        // Shown before, and sent again (its acknowledgement was lost): nothing to say.
        Err(Error::Integrity(_)) if e2e.lock().shown_before(msg)? => return Ok(Shown::Done),
        Err(e) => {
            reject(e.to_string());
            return Ok(Shown::Done);
        }
    };
    match opened.verdict {
        Verdict::New => {}
        Verdict::Again => return Ok(Shown::Done),
        Verdict::Replay { first } => {
            reject(format!(
                "it replays message {first}, which was shown before (the server sent it again \
                 under another id)"
            ));
            return Ok(Shown::Done);
        }
        Verdict::TooOld => {
            reject(format!(
                "it is more than a week older than the newest message of {} you have seen, \
                 and may be a replay",
                msg.from
            ));
            return Ok(Shown::Done);
        }
    }
    // A sender key was installed as it opened: nothing to show.
    if let Plain::SenderKey(_) = &opened.plain {
        if record {
            e2e.lock().shown(&opened)?;
        }
        return Ok(Shown::Silent);
    }
    let path = match &opened.plain {
        Plain::File(offer) if offer.size > downloads.auto_max => {
            offered(msg, offer, format, out)?;
            return Ok(Shown::Offered);
        }
        Plain::File(offer) => match files::receive(client, msg, offer, &downloads.dir) {
            Ok(path) => Some(path),
            Err(e) if e.is_disconnect() => return Err(e),
            Err(e) => {
                reject(e.to_string());
                return Ok(Shown::Done);
            }
        },
        _ => None,
    };
    let plain = &opened.plain;
    match (format, plain) {
        // Receipts are for the sender's client (the chat shows them); a script sees them
        // with --json.
        (Format::Lines, Plain::Receipt(_)) => {}
        (Format::Lines, _) => {
            writeln!(out, "{}", message_line(msg, plain, path.as_deref())).map_err(output_error)?
        }
        (Format::Json, _) => {
            let mut json = serde_json::json!({
                "id": msg.id,
                "from": msg.from,
                "to": (!msg.to.is_empty()).then_some(&msg.to),
                "group": msg.group,
                "sent_at": msg.sent_at,
            });
            let fields = match plain {
                Plain::Text(t) => serde_json::json!({ "kind": "text", "text": t }),
                Plain::Membership(t) => serde_json::json!({ "kind": "membership", "text": t }),
                // (Opened messages carry removals as the membership notice they checked out as.)
                Plain::Removal(s) => serde_json::json!({
                    "kind": "membership",
                    "text": crate::membership::describe(&s.change),
                }),
                Plain::File(offer) => serde_json::json!({
                    "kind": "file",
                    "name": offer.name,
                    "size": offer.size,
                    "path": path,
                }),
                Plain::SenderKey(k) => serde_json::json!({
                    "kind": "sender-key",
                    "group": k.group,
                    "epoch": k.epoch,
                }),
                Plain::Receipt(r) => serde_json::json!({
                    "kind": "receipt",
                    "reached": match r.reached {
                        Reached::Delivered => "delivered",
                        Reached::Read => "read",
                    },
                    "of": r.of.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
                }),
            };
            if let (Some(all), serde_json::Value::Object(more)) = (json.as_object_mut(), fields) {
                all.extend(more);
            }
            writeln!(out, "{json}").map_err(output_error)?
        }
    }
    out.flush().map_err(output_error)?;
    // Peeked at, it is not recorded as shown: shown again next time, it must not look like a
    // replay.
    if record {
        let mut e2e = e2e.lock();
        e2e.shown(&opened)?;
        if let Some(text) = history_text(plain) {
            let conversation = msg.group.as_deref().unwrap_or(&msg.from);
            e2e.remember_at(msg.sent_at, conversation, &msg.from, &text);
        }
    }
    Ok(match opened.plain {
        Plain::Receipt(r) => Shown::Receipt(r),
        Plain::Text(_) | Plain::File(_) if msg.group.is_none() => Shown::Answer,
        _ => Shown::Done,
    })
}

/// What the local history keeps of a message (receipts are not kept).
fn history_text(plain: &Plain) -> Option<String> {
    match plain {
        Plain::Text(t) => Some(t.clone()),
        Plain::Membership(t) => Some(format!("* {t}")),
        Plain::Removal(s) => Some(format!("* {}", crate::membership::describe(&s.change))),
        Plain::File(offer) => Some(format!(
            "sent {} ({})",
            offer.name,
            files::human_size(offer.size)
        )),
        Plain::Receipt(_) | Plain::SenderKey(_) => None,
    }
}

/// What [`show`] did with a message. Anything but `Offered` is acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::client) enum Shown {
    /// Shown (or reported as rejected).
    Done,
    /// A new direct message, shown: its sender may be sent a receipt.
    Answer,
    /// A receipt for messages we sent (not shown as a message).
    Receipt(Receipt),
    /// A file offered and not saved: leave it queued until `get` takes it.
    Offered,
    /// Handled, not shown (a sender key): acknowledged, not counted.
    Silent,
    /// A group message that came before its sender's key: not acknowledged; keep it in a
    /// [`Waiting`] and show it again once a key comes.
    Waiting,
}

/// How long a group message may wait for its sender's key, from when the server stored it.
/// Meanwhile it stays queued (unacknowledged) and opens once the key comes: in this run, or
/// in the next, whose sync delivers in id order and the key was stored first. After it, it is
/// reported as rejected and acknowledged, so that a sender who never hands out its key cannot
/// hold a member's place in the group for ever.
const KEY_PATIENCE_MS: i64 = 10 * 60 * 1000;

/// Group messages that came before their sender's key (a sender that failed over between
/// handing its key out and sending, or a server that delivered them out of order), to show
/// again when a key comes.
#[derive(Debug, Default)]
pub(in crate::client) struct Waiting {
    msgs: VecDeque<Envelope>,
}

impl Waiting {
    /// At most this many wait in memory; the oldest beyond them stay queued for the next run.
    const MAX: usize = 1024;

    /// Whether `msg` may still wait for its sender's key.
    fn may_wait(msg: &Envelope) -> bool {
        crate::db::now_ms().saturating_sub(msg.sent_at) < KEY_PATIENCE_MS
    }

    /// Keeps `msg` until a key comes.
    pub(in crate::client) fn add(&mut self, msg: Envelope) {
        if self.msgs.len() >= Self::MAX {
            self.msgs.pop_front();
        }
        self.msgs.push_back(msg);
    }

    /// What waited, in the order it came, to show again now that a key came.
    pub(in crate::client) fn take(&mut self) -> VecDeque<Envelope> {
        std::mem::take(&mut self.msgs)
    }

    /// What to tell a user who leaves with messages still waiting (they stay queued).
    pub(in crate::client) fn note(&self) -> Option<String> {
        let first = self.msgs.front()?;
        let mut from: Vec<&str> = self.msgs.iter().map(|m| m.from.as_str()).collect();
        from.sort_unstable();
        from.dedup();
        Some(format!(
            "group messages waiting for a sender's key: {} (from {}; message {} first); left \
             queued, shown when the key comes, reported if it has not come {} minutes after \
             sending",
            self.msgs.len(),
            from.join(", "),
            first.id,
            KEY_PATIENCE_MS / 60_000,
        ))
    }
}

/// Prints a file offered and not saved: `FROM offers NAME (SIZE): fastchat get ID`.
fn offered(msg: &Envelope, offer: &FileOffer, format: Format, out: &mut impl Write) -> Result<()> {
    match format {
        Format::Lines => {
            let prefix = msg
                .group
                .as_ref()
                .map_or(String::new(), |g| format!("[{g}] "));
            writeln!(
                out,
                "{prefix}{} offers {} ({}): fastchat get {}",
                msg.from,
                one_line(&offer.name),
                files::human_size(offer.size),
                msg.id
            )
            .map_err(output_error)?
        }
        Format::Json => writeln!(
            out,
            "{}",
            serde_json::json!({
                "id": msg.id,
                "from": msg.from,
                "to": (!msg.to.is_empty()).then_some(&msg.to),
                "group": msg.group,
                "sent_at": msg.sent_at,
                "kind": "file-offer",
                "name": offer.name,
                "size": offer.size,
            })
        )
        .map_err(output_error)?,
    }
    out.flush().map_err(output_error)?;
    Ok(())
}

/// `fastchat get ID`: saves the file offered by message ID (one too large to be saved when it
/// arrived), and takes it from the queue.
pub fn get(opts: &Options, id: i64) -> Result<()> {
    let me = login(opts)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut found = None;
    while let Some(event) = me.client.next(deadline)? {
        match event {
            Event::Message(msg) if msg.id == id => found = Some(msg),
            Event::Synced => break,
            _ => {}
        }
    }
    let msg = found.ok_or_else(|| {
        Error::refused(
            crate::error::ErrorCode::BadRequest,
            format!("no message {id} waiting for you (fastchat recv shows what is)"),
        )
    })?;
    let format = if opts.json {
        Format::Json
    } else {
        Format::Lines
    };
    take_offer(
        &me.e2e,
        &me.client,
        &me.downloads,
        &msg,
        format,
        &mut io::stdout().lock(),
    )
}

/// Saves the file `msg` offers, whatever its size, shows it, and acknowledges it.
pub(in crate::client) fn take_offer(
    e2e: &Mutex<E2e>,
    client: &Client,
    downloads: &Downloads,
    msg: &Envelope,
    format: Format,
    out: &mut impl Write,
) -> Result<()> {
    let all = Downloads {
        auto_max: u64::MAX,
        ..downloads.clone()
    };
    if show(e2e, client, &all, msg, format, true, out)? == Shown::Waiting {
        // Left queued: it opens once its sender's key has come.
        return Err(Error::refused(
            crate::error::ErrorCode::BadRequest,
            format!(
                "message {} cannot be opened yet: its sender's key has not come (fastchat recv \
                 shows it once it has)",
                msg.id
            ),
        ));
    }
    e2e.lock().settle()?;
    client.ack(&[msg.id])
}

/// The one line a message is shown as (`path`: where a file was saved).
pub fn message_line(msg: &Envelope, plain: &Plain, path: Option<&Path>) -> String {
    let prefix = match &msg.group {
        Some(g) => format!("[{g}] "),
        None => String::new(),
    };
    match plain {
        Plain::Text(t) => format!("{prefix}{}: {}", msg.from, one_line(t)),
        Plain::Membership(t) => format!("{prefix}* {}", one_line(t)),
        Plain::Removal(s) => format!(
            "{prefix}* {}",
            one_line(&crate::membership::describe(&s.change))
        ),
        Plain::SenderKey(k) => format!(
            "{prefix}* {} handed you their key for {} (epoch {})",
            msg.from, k.group, k.epoch
        ),
        Plain::Receipt(r) => format!(
            "{prefix}* {} {} {} of your messages",
            msg.from,
            match r.reached {
                Reached::Delivered => "received",
                Reached::Read => "read",
            },
            r.of.len()
        ),
        Plain::File(offer) => format!(
            "{prefix}{} sent {} ({}) -> {}",
            msg.from,
            one_line(&offer.name),
            files::human_size(offer.size),
            path.map(|p| one_line(&p.display().to_string()))
                .unwrap_or_default()
        ),
    }
}
