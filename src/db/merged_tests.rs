//! A contract test that both backends run: sends and acknowledgements the writer merges
//! ([`Store::submit_message`], [`Store::submit_ack`]) answer exactly as they would one by one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::unbounded;

use super::Urgency::Batched;
use super::{DirectMessage, Fence, GroupMessage, Outgoing, Store, StoredMessage, Tx};
use crate::error::{Error, ErrorCode, Result};
use crate::membership;
use crate::net::{PublicKeys, WrappedKey};

/// Recipients of the batch that checks the order of ids (more than one, so that a join in
/// the merged statement could reorder them).
const SPREAD: usize = 20;

fn keys() -> PublicKeys {
    PublicKeys {
        x25519: vec![1; 32],
        ed25519: vec![2; 32],
    }
}

/// Holds the writer for a moment, so that what is submitted next forms one batch.
fn hold(store: &Store) {
    store.submit(
        |_| {
            std::thread::sleep(Duration::from_millis(300));
            Ok(())
        },
        |_: Result<()>| {},
    );
}

/// Waits for `n` numbered results.
fn results<T>(rx: &crossbeam_channel::Receiver<(usize, Result<T>)>, n: usize) -> Vec<Result<T>> {
    let mut got: Vec<(usize, Result<T>)> = (0..n)
        .map(|_| rx.recv_timeout(Duration::from_secs(30)).expect("a result"))
        .collect();
    got.sort_by_key(|(i, _)| *i);
    got.into_iter().map(|(_, r)| r).collect()
}

fn refused<T: std::fmt::Debug>(r: &Result<T>) -> Option<ErrorCode> {
    match r {
        Err(Error::Refused { code, .. }) => Some(*code),
        _ => None,
    }
}

/// One batch of sends: fresh messages, a re-send of one of them and a reused client id in the
/// same batch, an unknown recipient, and many recipients; then one batch of acknowledgements
/// by several users, direct and group, in order and with a gap, some not theirs to make.
pub fn merged_sends_and_acks_answer_as_one_by_one(store: &Store) -> Result<()> {
    let spread: Vec<String> = (0..SPREAD).map(|i| format!("r{i}")).collect();
    let (g1, g2) = store.call({
        let spread = spread.clone();
        move |tx| {
            for u in ["alice", "bob", "carol"]
                .iter()
                .copied()
                .chain(spread.iter().map(|s| s.as_str()))
            {
                assert!(tx.create_user(u, "h", &keys())?);
            }
            tx.add_presence(7, 1, "bob", b"t")?;
            assert!(tx.create_group("alice/team", "alice")?);
            tx.add_member("alice/team", "bob")?;
            tx.add_member("alice/team", "carol")?;
            let g1 = tx.store_group_message(&Outgoing::new("alice", 50, b"g1"), "alice/team")?;
            let g2 = tx.store_group_message(&Outgoing::new("alice", 51, b"g2"), "alice/team")?;
            Ok((g1.envelope.id, g2.envelope.id))
        }
    })?;

    let (sent, sent_rx) = unbounded::<(usize, Result<StoredMessage>)>();
    let send = |i: usize, from: &str, to: &str, client_id: u64, body: &[u8]| {
        let sent = sent.clone();
        let body = body.to_vec();
        let msg = DirectMessage {
            from: from.into(),
            to: to.into(),
            client_id,
            body,
        };
        store.submit_message(msg, Batched, Fence::now(), move |r| {
            let _ = sent.send((i, r));
        });
    };
    hold(store);
    send(0, "alice", "bob", 1, b"one");
    send(1, "carol", "bob", 1, b"c1");
    send(2, "alice", "nobody", 2, b"x");
    send(3, "alice", "bob", 1, b"one");
    send(4, "alice", "bob", 1, b"another");
    for k in 0..2 * SPREAD {
        send(5 + k, "alice", &spread[k % SPREAD], 100 + k as u64, b"m");
    }
    let r = results(&sent_rx, 5 + 2 * SPREAD);
    let id = |i: usize| r[i].as_ref().map(|s| s.envelope.id).expect("stored");
    assert_eq!(
        r[0].as_ref().expect("stored").online_at,
        [(7, "bob".into())]
    );
    assert_eq!(r[0].as_ref().expect("stored").envelope.body, b"one");
    assert_eq!(refused(&r[2]), Some(ErrorCode::UnknownUser));
    assert_eq!(
        id(3),
        id(0),
        "a re-send in the same batch is the first message"
    );
    assert_eq!(
        refused(&r[4]),
        Some(ErrorCode::Conflict),
        "a client id reused"
    );
    let spread_ids: Vec<i64> = (5..5 + 2 * SPREAD).map(id).collect();
    assert!(id(0) < id(1) && id(1) < spread_ids[0]);
    assert!(
        spread_ids.windows(2).all(|w| w[0] < w[1]),
        "ids follow the order of submission: {spread_ids:?}"
    );
    assert!(r[5..]
        .iter()
        .all(|s| s.as_ref().expect("stored").online_at.is_empty()));
    let queued = store.read(|tx| tx.queued("r0", 0, 100))?;
    assert_eq!(
        queued.iter().map(|m| m.id).collect::<Vec<_>>(),
        [spread_ids[0], spread_ids[SPREAD]]
    );

    let (acked, acked_rx) = unbounded::<(usize, Result<usize>)>();
    let ack = |i: usize, user: &str, ids: Vec<i64>| {
        let acked = acked.clone();
        store.submit_ack(user.into(), ids, move |r| {
            let _ = acked.send((i, r));
        });
    };
    hold(store);
    ack(0, "bob", vec![g2]);
    ack(1, "carol", vec![id(0)]);
    ack(2, "carol", vec![g1, g2]);
    ack(3, "bob", vec![id(0), id(1), g1]);
    ack(4, "r0", vec![spread_ids[0], spread_ids[0], spread_ids[1]]);
    // A send between acknowledgements is merged with them.
    send(100, "carol", "r1", 7, b"late");
    let counts: Vec<usize> = results(&acked_rx, 5).into_iter().collect::<Result<_>>()?;
    assert_eq!(
        counts,
        [1, 0, 2, 3, 1],
        "r0's repeated id counts once; r1's is not r0's"
    );
    let late = results(&sent_rx, 1).remove(0)?;
    assert!(late.envelope.id > spread_ids[2 * SPREAD - 1]);
    store.read(|tx| {
        assert!(tx.queued("bob", 0, 10)?.is_empty());
        assert!(tx.queued("carol", 0, 10)?.is_empty());
        assert_eq!(
            tx.queue_usage("g:alice/team")?.messages,
            0,
            "every member passed both"
        );
        assert_eq!(tx.queued("r0", 0, 10)?.len(), 1);
        assert_eq!(tx.queued("r1", 0, 10)?.len(), 3);
        Ok(())
    })?;
    // A delivered message is remembered: its re-send is not stored again.
    let resend = store.call(|tx| {
        let again = Outgoing {
            resend_after: Some(0),
            ..Outgoing::new("alice", 1, b"one")
        };
        tx.store_message(&again, "bob")
    })?;
    assert_eq!(resend.envelope.id, id(0));
    assert!(store.read(|tx| tx.queued("bob", 0, 10))?.is_empty());
    // Delivery records are forgotten a chunk at a time, up to a mark.
    assert_eq!(
        store.call(|tx| tx.forget_deliveries(0, 100))?,
        0,
        "ids start at 1"
    );
    assert_eq!(store.call(|tx| tx.forget_deliveries(i64::MAX, 2))?, 2);
    assert!(store.call(|tx| tx.forget_deliveries(i64::MAX, 100_000))? > 0);
    assert_eq!(store.call(|tx| tx.forget_deliveries(i64::MAX, 100))?, 0);
    Ok(())
}

/// What the server checks before it stores a group message one by one (its session's
/// `group_send`): the fallback of a merged group message.
fn checked(tx: &mut dyn Tx, msg: &Outgoing<'_>, group: &str, epoch: u64) -> Result<StoredMessage> {
    let g = membership::member_view(group, tx.group(group)?, msg.from)?;
    if let Some(copy) = tx.stored_group_copy(msg, group)? {
        return Ok(copy);
    }
    membership::check_send(&g, epoch)?;
    tx.store_group_message(msg, group)
}

/// One batch of group messages: two in the common case, and one of each kind the merged
/// statement must leave to the checks (a non-member, a stale epoch, an epoch without keys, a
/// group of one, a client id already stored, the same message twice). Every answer is the one
/// the checks give; returns how many messages the fallback stored or refused.
pub fn merged_group_messages_answer_as_one_by_one(store: &Store) -> Result<usize> {
    store.call(|tx| {
        for u in ["alice", "bob", "dave"] {
            assert!(tx.create_user(u, "h", &keys())?);
        }
        tx.add_presence(7, 1, "bob", b"t")?;
        let key = |m: &str| WrappedKey {
            member: m.into(),
            wrapped: b"k".to_vec(),
        };
        for (group, members) in [
            ("alice/club", &["bob"][..]),
            ("alice/bare", &["bob"][..]),
            ("alice/solo", &[][..]),
        ] {
            assert!(tx.create_group(group, "alice")?);
            for m in members {
                tx.add_member(group, m)?;
            }
            if group != "alice/bare" {
                let keys: Vec<WrappedKey> =
                    ["alice"].iter().chain(members).map(|m| key(m)).collect();
                tx.put_keys(group, 1, &keys, "alice")?;
            }
        }
        tx.store_group_message(&Outgoing::new("alice", 9, b"old"), "alice/club")?;
        Ok(())
    })?;
    let fallbacks = Arc::new(AtomicUsize::new(0));
    let (sent, sent_rx) = unbounded::<(usize, Result<StoredMessage>)>();
    let send = |i: usize, from: &str, group: &str, epoch: u64, client_id: u64, body: &[u8]| {
        let (sent, fallbacks) = (sent.clone(), Arc::clone(&fallbacks));
        let to = group.to_string();
        let msg = GroupMessage {
            from: from.into(),
            group: group.into(),
            epoch,
            client_id,
            body: body.to_vec(),
        };
        store.submit_group_message(
            msg,
            move |tx, msg| {
                fallbacks.fetch_add(1, Ordering::Relaxed);
                checked(tx, msg, &to, epoch)
            },
            Batched,
            Fence::now(),
            move |r| {
                let _ = sent.send((i, r));
            },
        );
    };
    hold(store);
    send(0, "alice", "alice/club", 1, 10, b"a");
    send(1, "dave", "alice/club", 1, 1, b"d");
    send(2, "alice", "alice/club", 2, 11, b"stale");
    send(3, "alice", "alice/bare", 1, 12, b"unkeyed");
    send(4, "alice", "alice/solo", 1, 13, b"alone");
    send(5, "alice", "alice/club", 1, 9, b"old");
    send(6, "alice", "alice/club", 1, 10, b"a");
    send(7, "bob", "alice/club", 1, 1, b"b");
    let r = results(&sent_rx, 8);
    let id = |i: usize| r[i].as_ref().map(|s| s.envelope.id).expect("stored");
    let first = r[0].as_ref().expect("stored");
    assert_eq!(first.online_at, [(7, "bob".into())]);
    assert_eq!(first.envelope.group.as_deref(), Some("alice/club"));
    assert_eq!(
        refused(&r[1]),
        Some(ErrorCode::UnknownGroup),
        "not a member"
    );
    assert_eq!(refused(&r[2]), Some(ErrorCode::Conflict), "a stale epoch");
    assert_eq!(
        refused(&r[3]),
        Some(ErrorCode::Conflict),
        "an epoch without keys"
    );
    assert!(
        r[4].as_ref().expect("stored").online_at.is_empty(),
        "nobody else"
    );
    assert!(id(5) < id(0), "a client id already stored is that message");
    assert_eq!(id(6), id(0), "the same message twice is stored once");
    assert!(id(0) < id(7));
    assert!(
        r[7].as_ref().expect("stored").online_at.is_empty(),
        "bob is the sender"
    );
    let club = store.read(|tx| tx.queued("bob", 0, 10))?;
    assert_eq!(
        club.iter().map(|m| m.id).collect::<Vec<_>>(),
        [id(5), id(0)],
        "bob's queue: the two of alice's that reached the club"
    );
    // Direct and group messages in one batch keep the order they were sent in.
    let checked_before = fallbacks.load(Ordering::Relaxed);
    hold(store);
    send(0, "alice", "alice/club", 1, 20, b"first");
    let direct = sent.clone();
    let second = DirectMessage {
        from: "alice".into(),
        to: "bob".into(),
        client_id: 21,
        body: b"second".to_vec(),
    };
    store.submit_message(second, Batched, Fence::now(), move |r| {
        let _ = direct.send((1, r));
    });
    send(2, "alice", "alice/club", 1, 22, b"third");
    let r = results(&sent_rx, 3);
    let ids: Vec<i64> = r
        .iter()
        .map(|s| s.as_ref().expect("stored").envelope.id)
        .collect();
    assert!(
        ids[0] < ids[1] && ids[1] < ids[2],
        "in order of sending: {ids:?}"
    );
    Ok(checked_before)
}

/// One batch of stores, some read before a freeze of the process (a fence of another epoch):
/// those are refused with [`Error::Frozen`] and store nothing, whether merged (direct and
/// group) or run alone; the others in the batch are stored as ever.
pub fn stores_read_before_a_freeze_are_refused(store: &Store) -> Result<()> {
    store.call(|tx| {
        for u in ["alice", "bob"] {
            assert!(tx.create_user(u, "h", &keys())?);
        }
        assert!(tx.create_group("alice/club", "alice")?);
        tx.add_member("alice/club", "bob")?;
        let keys: Vec<WrappedKey> = ["alice", "bob"]
            .iter()
            .map(|m| WrappedKey {
                member: m.to_string(),
                wrapped: b"k".to_vec(),
            })
            .collect();
        tx.put_keys("alice/club", 1, &keys, "alice")
    })?;
    let now = Fence::now();
    let before = Fence(now.0.wrapping_sub(1));
    let (sent, sent_rx) = unbounded::<(usize, Result<StoredMessage>)>();
    let direct = |i: usize, fence: Fence| {
        let sent = sent.clone();
        let msg = DirectMessage {
            from: "alice".into(),
            to: "bob".into(),
            client_id: i as u64,
            body: b"d".to_vec(),
        };
        store.submit_message(msg, Batched, fence, move |r| {
            let _ = sent.send((i, r));
        });
    };
    let group = |i: usize, fence: Fence| {
        let sent = sent.clone();
        let msg = GroupMessage {
            from: "alice".into(),
            group: "alice/club".into(),
            epoch: 1,
            client_id: i as u64,
            body: b"g".to_vec(),
        };
        let fallback = |tx: &mut dyn Tx, msg: &Outgoing<'_>| checked(tx, msg, "alice/club", 1);
        store.submit_group_message(msg, fallback, Batched, fence, move |r| {
            let _ = sent.send((i, r));
        });
    };
    let alone = |i: usize, fence: Fence| {
        let sent = sent.clone();
        store.submit_fenced(
            fence,
            move |tx| {
                let msg = Outgoing {
                    resend_after: Some(0),
                    ..Outgoing::new("alice", i as u64, b"r")
                };
                tx.store_message(&msg, "bob")
            },
            move |r| {
                let _ = sent.send((i, r));
            },
        );
    };
    hold(store);
    direct(0, before);
    direct(1, now);
    group(2, before);
    group(3, now);
    alone(4, before);
    alone(5, now);
    let r = results(&sent_rx, 6);
    for (i, r) in r.iter().enumerate() {
        if i % 2 == 0 {
            assert!(matches!(r, Err(Error::Frozen)), "{i}: {r:?}");
        } else {
            assert!(r.is_ok(), "{i}: {r:?}");
        }
    }
    let stored = store.read(|tx| {
        Ok((
            tx.queue_usage("bob")?.messages,
            tx.queue_usage("g:alice/club")?.messages,
        ))
    })?;
    assert_eq!(
        stored,
        (2, 1),
        "one of each kind stored, the frozen ones not"
    );
    Ok(())
}
