//! The properties the double ratchet and the key agreement promise, each shown by a test that
//! would fail if it broke.

use super::super::x3dh::{self, Bundle};
use super::super::Identity;
use super::{Header, Ratchet, KEPT_FOR_MS, KEY_MIN_AGE_MS, MAX_SKIP};
use crate::error::{Error, Result};

const AD: &[u8] = b"alice->bob";
const NOW: i64 = 1_000_000;

/// A captured message: what crossed the wire.
type Captured = (Header, Vec<u8>);

/// Alice and Bob after a key agreement over Bob's published bundle (with a one-time prekey
/// when `one_time`).
fn pair(one_time: bool) -> Result<(Ratchet, Ratchet)> {
    let alice = Identity::generate()?;
    let bob = Identity::generate()?;
    let bob_public = bob.public()?;
    let (spk, spk_public, signature) = x3dh::signed_prekey(7, |m| bob.sign(m))?;
    let (opk, opk_public) = super::x25519_pair()?;
    let bundle = Bundle {
        identity: bob_public.x25519.clone(),
        signed_prekey_id: 7,
        signed_prekey: spk_public.clone(),
        signature,
        one_time: one_time.then(|| (3, serde_bytes::ByteBuf::from(opk_public))),
    };
    let alice_raw = alice.to_raw()?;
    let (secret_a, init) = x3dh::initiate(
        "alice",
        &alice_raw[..32],
        "bob",
        &bob_public.ed25519,
        &bundle,
    )?;
    let bob_raw = bob.to_raw()?;
    let secret_b = x3dh::respond(
        "bob",
        &bob_raw[..32],
        &spk,
        one_time.then_some(opk.as_slice()),
        "alice",
        &alice.public()?.x25519,
        &init,
    )?;
    assert_eq!(secret_a, secret_b, "both sides agree");
    Ok((
        Ratchet::initiator(&secret_a, &spk_public)?,
        Ratchet::responder(&secret_b, &spk)?,
    ))
}

fn send(from: &mut Ratchet, text: &str) -> Result<Captured> {
    send_at(from, text, NOW)
}

fn send_at(from: &mut Ratchet, text: &str, now: i64) -> Result<Captured> {
    from.seal(AD, text.as_bytes(), now)
}

fn read(to: &mut Ratchet, m: &Captured) -> Result<String> {
    Ok(String::from_utf8(to.open(AD, &m.0, &m.1, NOW)?).unwrap())
}

#[test]
fn both_sides_agree_with_and_without_a_one_time_prekey() -> Result<()> {
    for one_time in [true, false] {
        let (mut alice, mut bob) = pair(one_time)?;
        assert!(!bob.can_send(), "the responder waits for the first message");
        let m = send(&mut alice, "hello bob")?;
        assert_eq!(read(&mut bob, &m)?, "hello bob");
        let r = send(&mut bob, "hello alice")?;
        assert_eq!(read(&mut alice, &r)?, "hello alice");
    }
    Ok(())
}

#[test]
fn a_bundle_with_a_forged_signed_prekey_is_refused() -> Result<()> {
    let bob = Identity::generate()?;
    let mallory = Identity::generate()?;
    // The directory (or the server) swaps in a prekey of its own, signed by someone else.
    let (_, spk_public, signature) = x3dh::signed_prekey(1, |m| mallory.sign(m))?;
    let bundle = Bundle {
        identity: bob.public()?.x25519,
        signed_prekey_id: 1,
        signed_prekey: spk_public,
        signature,
        one_time: None,
    };
    let alice = Identity::generate()?.to_raw()?;
    match x3dh::initiate(
        "alice",
        &alice[..32],
        "bob",
        &bob.public()?.ed25519,
        &bundle,
    ) {
        Err(Error::Integrity(m)) => assert!(m.contains("signature"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    Ok(())
}

#[test]
fn a_used_one_time_prekey_cannot_start_a_second_conversation() -> Result<()> {
    let bob = Identity::generate()?;
    let (spk, spk_public, signature) = x3dh::signed_prekey(1, |m| bob.sign(m))?;
    let (_, opk_public) = super::x25519_pair()?;
    let bundle = Bundle {
        identity: bob.public()?.x25519,
        signed_prekey_id: 1,
        signed_prekey: spk_public,
        signature,
        one_time: Some((9, serde_bytes::ByteBuf::from(opk_public))),
    };
    let alice = Identity::generate()?;
    let raw = alice.to_raw()?;
    let (_, init) = x3dh::initiate("alice", &raw[..32], "bob", &bob.public()?.ed25519, &bundle)?;
    // Bob deleted prekey 9 after its first use: a replayed first message finds nothing.
    let bob_raw = bob.to_raw()?;
    let again = x3dh::respond(
        "bob",
        &bob_raw[..32],
        &spk,
        None,
        "alice",
        &alice.public()?.x25519,
        &init,
    );
    assert!(matches!(again, Err(Error::Integrity(_))), "{again:?}");
    Ok(())
}

/// Fifty round trips, once as fast as a machine turns (each side keeps its key) and once at
/// a human pace (a new key on every turn).
#[test]
fn many_round_trips_in_both_directions() -> Result<()> {
    for pace in [0, KEY_MIN_AGE_MS] {
        let (mut alice, mut bob) = pair(true)?;
        let mut keys = std::collections::HashSet::new();
        for round in 0..50 {
            let now = NOW + round * pace;
            for i in 0..(round % 4 + 1) {
                let m = send_at(&mut alice, &format!("a{round}.{i}"), now)?;
                keys.insert(m.0.dh.clone());
                assert_eq!(read(&mut bob, &m)?, format!("a{round}.{i}"));
            }
            for i in 0..(round % 3 + 1) {
                let m = send_at(&mut bob, &format!("b{round}.{i}"), now)?;
                keys.insert(m.0.dh.clone());
                assert_eq!(read(&mut alice, &m)?, format!("b{round}.{i}"));
            }
        }
        // At a human pace each side has a new key every round; as fast as a machine turns,
        // only the first turns make one (Bob's first answer must, and Alice's first key was
        // made before she heard from him), and then each side keeps its key.
        let expected = if pace == 0 { 3 } else { 2 * 50 };
        assert_eq!(keys.len(), expected, "ratchet keys at a pace of {pace} ms");
    }
    Ok(())
}

/// Forward secrecy: ciphertexts captured from the wire, then a copy of the recipient's state
/// taken after it read them (what a stolen laptop holds), do not open.
#[test]
fn a_stolen_state_does_not_open_earlier_messages() -> Result<()> {
    let (mut alice, mut bob) = pair(true)?;
    let mut captured = Vec::new();
    for i in 0..5 {
        let m = send(&mut alice, &format!("early {i}"))?;
        read(&mut bob, &m)?;
        captured.push(m);
        let r = send(&mut bob, "ok")?;
        read(&mut alice, &r)?;
    }
    // The laptop is stolen now: its state, as saved.
    let stolen: Ratchet = rmp_serde::from_slice(&rmp_serde::to_vec(&bob).unwrap()).unwrap();
    for m in &captured {
        let mut thief = stolen.clone();
        assert!(
            thief.open(AD, &m.0, &m.1, NOW).is_err(),
            "an earlier message opened with the stolen state"
        );
    }
    Ok(())
}

/// Recovery after compromise: the thief of Bob's state reads along until a round trip that
/// starts with a message to Bob (he makes a fresh ratchet key pair on his answer, once his
/// key is [`KEY_MIN_AGE_MS`] old, and Alice's next messages use it); after that, new messages
/// do not open with the stolen state, even for a thief who saw every message on the wire and
/// kept its copy in step. A round trip faster than that heals nothing yet: the delay is
/// bounded by the key's age, not by how fast the conversation turns.
#[test]
fn after_a_compromise_and_a_round_trip_new_messages_are_closed_again() -> Result<()> {
    let (mut alice, mut bob) = pair(true)?;
    let m = send(&mut alice, "before")?;
    read(&mut bob, &m)?;
    let r = send(&mut bob, "ok")?;
    read(&mut alice, &r)?;
    // The laptop is stolen; the thief sees everything on the wire from now on.
    let mut thief = bob.clone();
    let round_trip = |alice: &mut Ratchet, bob: &mut Ratchet, thief: &mut Ratchet, now| {
        let a = send_at(alice, "while stolen", now)?;
        assert_eq!(read(bob, &a)?, "while stolen");
        let stolen_reads = thief.open(AD, &a.0, &a.1, NOW).is_ok();
        let b = send_at(bob, "reply", now)?;
        read(alice, &b)?;
        Ok::<_, Error>(stolen_reads)
    };
    // Round trips within a second of Bob's key: he keeps it, and the thief reads along.
    for dt in [0, 10, KEY_MIN_AGE_MS - 1] {
        let reads = round_trip(&mut alice, &mut bob, &mut thief, NOW + dt)?;
        assert!(reads, "a compromise reads along while the key is young");
    }
    // A round trip once his key is old enough: Bob answers with a fresh key pair.
    let reads = round_trip(&mut alice, &mut bob, &mut thief, NOW + KEY_MIN_AGE_MS)?;
    assert!(
        reads,
        "the message that starts the round trip is still open to it"
    );
    // Alice's next messages use Bob's fresh key: closed to the thief.
    for text in ["after the round trip", "and after"] {
        let m = send_at(&mut alice, text, NOW + KEY_MIN_AGE_MS)?;
        assert_eq!(read(&mut bob, &m)?, text);
        assert!(
            thief.open(AD, &m.0, &m.1, NOW).is_err(),
            "a message after the round trip opened with the stolen state"
        );
    }
    Ok(())
}

/// Offline and out-of-order delivery: 1,000 messages over several ratchet steps, delivered in
/// a shuffled order, all open, each exactly once.
#[test]
fn a_thousand_messages_out_of_order_all_open_once() -> Result<()> {
    let (mut alice, mut bob) = pair(true)?;
    let first = send(&mut alice, "hi")?;
    read(&mut bob, &first)?;
    let mut wire = Vec::new();
    for i in 0..1000 {
        // A round trip now and then, a second apart (Bob reads a ping that overtook what is
        // still on the way, and answers): a new chain of Alice's after each.
        let now = NOW + (i / 250) * KEY_MIN_AGE_MS;
        if i % 250 == 0 {
            read(&mut bob, &send_at(&mut alice, "ping", now)?)?;
            let r = send_at(&mut bob, "still here", now)?;
            read(&mut alice, &r)?;
        }
        wire.push((i, send_at(&mut alice, &format!("m{i}"), now)?));
    }
    let chains: std::collections::HashSet<_> = wire.iter().map(|(_, m)| &m.0.dh).collect();
    assert_eq!(chains.len(), 4, "the messages span four of Alice's keys");
    // A fixed shuffle (a linear congruential order), then a replay of the first.
    let mut order: Vec<usize> = (0..wire.len()).collect();
    let mut x: u64 = 12345;
    for i in (1..order.len()).rev() {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        order.swap(i, (x >> 33) as usize % (i + 1));
    }
    for &k in &order {
        let (i, m) = &wire[k];
        assert_eq!(read(&mut bob, m)?, format!("m{i}"));
    }
    assert_eq!(bob.kept(), 0, "every kept key was used, and deleted");
    let (_, replay) = &wire[order[0]];
    assert!(
        bob.open(AD, &replay.0, &replay.1, NOW).is_err(),
        "a replay does not open"
    );
    Ok(())
}

#[test]
fn kept_keys_are_bounded_in_number_and_age() -> Result<()> {
    let (mut alice, mut bob) = pair(false)?;
    let first = send(&mut alice, "hi")?;
    read(&mut bob, &first)?;
    // A gap larger than a step may skip is refused, and changes nothing.
    let mut far = None;
    for _ in 0..=MAX_SKIP + 1 {
        far = Some(send(&mut alice, "x")?);
    }
    let far = far.unwrap();
    assert!(bob.open(AD, &far.0, &far.1, NOW).is_err());
    assert_eq!(bob.kept(), 0);
    // A small gap keeps its keys, for a while.
    let (mut alice, mut bob) = pair(false)?;
    let late = send(&mut alice, "late")?;
    let next = send(&mut alice, "next")?;
    read(&mut bob, &next)?;
    assert_eq!(bob.kept(), 1);
    let much_later = NOW + KEPT_FOR_MS + 1;
    assert!(
        bob.open(AD, &late.0, &late.1, much_later).is_err(),
        "a key kept past its time is gone"
    );
    assert_eq!(bob.kept(), 0);
    Ok(())
}

#[test]
fn a_forged_or_altered_message_opens_nothing_and_moves_nothing() -> Result<()> {
    let (mut alice, mut bob) = pair(true)?;
    let m = send(&mut alice, "genuine")?;
    let mut altered = m.clone();
    altered.1[20] ^= 1;
    assert!(bob.open(AD, &altered.0, &altered.1, NOW).is_err());
    let mut header = m.0.clone();
    header.n += 1;
    assert!(
        bob.open(AD, &header, &m.1, NOW).is_err(),
        "the header is authenticated"
    );
    assert!(
        bob.open(b"bob->alice", &m.0, &m.1, NOW).is_err(),
        "so is the conversation"
    );
    assert_eq!(read(&mut bob, &m)?, "genuine", "the state did not move");
    Ok(())
}

/// A state saved before the ratchet kept its key for a while (without `owed` and
/// `key_made_ms`) still loads, owes nothing, and talks on in both directions.
#[test]
fn a_state_saved_before_keys_had_an_age_still_loads() -> Result<()> {
    use serde::Serialize;
    use std::collections::VecDeque;
    #[derive(Serialize)]
    struct Before<'a> {
        #[serde(with = "serde_bytes")]
        dh_private: &'a [u8],
        #[serde(with = "serde_bytes")]
        dh_public: &'a [u8],
        #[serde(with = "serde_bytes")]
        their_dh: &'a [u8],
        root: [u8; 32],
        sending: Option<[u8; 32]>,
        receiving: Option<[u8; 32]>,
        ns: u32,
        nr: u32,
        pn: u32,
        skipped: &'a VecDeque<super::Skipped>,
    }
    let (mut alice, mut bob) = pair(false)?;
    read(&mut bob, &send(&mut alice, "hi")?)?;
    read(&mut alice, &send(&mut bob, "hello")?)?;
    let before = Before {
        dh_private: &bob.dh_private,
        dh_public: &bob.dh_public,
        their_dh: &bob.their_dh,
        root: bob.root,
        sending: bob.sending,
        receiving: bob.receiving,
        ns: bob.ns,
        nr: bob.nr,
        pn: bob.pn,
        skipped: &bob.skipped,
    };
    let mut loaded: Ratchet = rmp_serde::from_slice(&rmp_serde::to_vec(&before).unwrap())
        .map_err(|e| Error::Invalid(e.to_string()))?;
    assert!(!loaded.owed && loaded.key_made_ms == 0);
    for round in 0..3 {
        let now = NOW + (round + 1) * KEY_MIN_AGE_MS;
        let m = send_at(&mut alice, "a", now)?;
        assert_eq!(read(&mut loaded, &m)?, "a");
        let r = send_at(&mut loaded, "b", now)?;
        assert_eq!(read(&mut alice, &r)?, "b");
    }
    Ok(())
}
