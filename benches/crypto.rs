//! Per-message cryptography cost: `cargo bench --bench crypto`.
//!
//! Each operation runs for a fixed count (bounded time), and the mean time per operation is
//! printed. These are the figures in BENCHMARKS.md.

use std::hint::black_box;
use std::time::Instant;

use fastchat::crypto::{verify_signature, Identity, PairKey};

fn measure(name: &str, iterations: u32, mut op: impl FnMut()) {
    for _ in 0..iterations / 10 {
        op(); // warm-up
    }
    let start = Instant::now();
    for _ in 0..iterations {
        op();
    }
    let per_op = start.elapsed() / iterations;
    println!(
        "{name:<44} {:>9.2} µs/op  ({iterations} runs)",
        per_op.as_nanos() as f64 / 1000.0
    );
}

fn main() -> fastchat::Result<()> {
    let alice = Identity::generate()?;
    let bob = Identity::generate()?;
    let bob_public = bob.public()?;
    let key = alice.pair_key("alice", "bob", &bob_public.x25519)?;
    let aad = b"fastchat/dm/v1 alice bob 0123456789 1";
    let text = vec![b'x'; 100];
    let sealed = key.seal(aad, &text)?;
    let big = vec![b'y'; 16 * 1024];
    let signature = alice.sign(&sealed)?;
    let alice_public = alice.public()?;

    println!("fastchat crypto, mean per operation");
    measure("seal 100 B (AES-256-GCM, random nonce)", 200_000, || {
        black_box(key.seal(aad, black_box(&text)).unwrap());
    });
    measure("open 100 B (AES-256-GCM)", 200_000, || {
        black_box(key.open(aad, black_box(&sealed)).unwrap());
    });
    // Every message key of a ratchet or a sender chain is used once: seal and open under a
    // key never seen before.
    let fresh: Vec<PairKey> = (0..1000)
        .map(|_| PairKey::random())
        .collect::<Result<_, _>>()?;
    let mut i = 0;
    measure("seal + open 100 B, a new key each time", 100_000, || {
        let k = &fresh[i % fresh.len()];
        i += 1;
        let sealed = k.seal(aad, black_box(&text)).unwrap();
        black_box(k.open(aad, &sealed).unwrap());
    });
    measure("seal 16 KiB", 20_000, || {
        black_box(key.seal(aad, black_box(&big)).unwrap());
    });
    measure(
        "pair key: X25519 + HKDF-SHA256 (once per peer)",
        5_000,
        || {
            black_box(alice.pair_key("alice", "bob", &bob_public.x25519).unwrap());
        },
    );
    measure("Ed25519 sign (membership changes)", 5_000, || {
        black_box(alice.sign(black_box(&sealed)).unwrap());
    });
    measure("Ed25519 verify", 5_000, || {
        black_box(verify_signature(&alice_public.ed25519, &sealed, &signature).unwrap());
    });
    // The double ratchet's unit of cost: a turn makes a key and agrees twice (see
    // "ratchet: a round trip, new keys" below). OpenSSL 3.0 makes an X25519 key with the
    // same ladder as an agreement, not with a table for the base point.
    {
        use openssl::pkey::{Id, PKey};
        measure("X25519: make a key pair", 5_000, || {
            let k = PKey::generate_x25519().unwrap();
            black_box(k.raw_public_key().unwrap());
        });
        let (_, theirs) = fastchat::crypto::ratchet::x25519_pair()?;
        let ours = PKey::generate_x25519()?;
        measure("X25519: agree (our key loaded)", 5_000, || {
            let theirs = PKey::public_key_from_raw_bytes(&theirs, Id::X25519).unwrap();
            let mut deriver = openssl::derive::Deriver::new(&ours).unwrap();
            deriver.set_peer(&theirs).unwrap();
            let mut out = [0u8; 32];
            black_box(deriver.derive(&mut out).unwrap());
        });
    }
    measure("random group/file key", 100_000, || {
        black_box(PairKey::random().unwrap());
    });
    forward_secrecy(&alice, &bob)
}

/// What forward secrecy adds per message (issue 22): the ratchet's steps, the sender chains,
/// and the client's session file written before every message leaves.
fn forward_secrecy(alice: &Identity, bob: &Identity) -> fastchat::Result<()> {
    use fastchat::client::keystore::Keystore;
    use fastchat::client::sender_keys::GroupChains;
    use fastchat::client::sessions::{Conversation, Session, Sessions};
    use fastchat::crypto::ratchet::{x25519_pair, Ratchet, KEY_MIN_AGE_MS};
    use fastchat::crypto::x3dh;

    let ad = b"fastchat/dm/v3 alice bob";
    let text = vec![b'x'; 100];
    let (spk, spk_public) = x25519_pair()?;
    let pair = || -> fastchat::Result<(Ratchet, Ratchet)> {
        let mut a = Ratchet::initiator(&[7; 32], &spk_public)?;
        let mut b = Ratchet::responder(&[7; 32], &spk)?;
        let (h, m) = a.seal(ad, b"hello", 0)?;
        b.open(ad, &h, &m, 0)?;
        Ok((a, b))
    };
    let (mut a, mut b) = pair()?;
    measure("ratchet: seal + open 100 B, same chain", 100_000, || {
        let (h, m) = a.seal(ad, &text, 0).unwrap();
        black_box(b.open(ad, &h, &m, 0).unwrap());
    });
    // Two turns per round: both sides make a new key on each when a second has passed, and
    // keep theirs when the conversation turns faster than that.
    for (label, pace) in [
        (
            "ratchet: a round trip, new keys (a second apart)",
            KEY_MIN_AGE_MS,
        ),
        ("ratchet: a round trip, keys kept (a fast turn)", 0),
    ] {
        let (mut a, mut b) = pair()?;
        let mut now = 0;
        measure(label, 5_000, || {
            now += pace;
            let (h, m) = b.seal(ad, &text, now).unwrap();
            black_box(a.open(ad, &h, &m, now).unwrap());
            let (h, m) = a.seal(ad, &text, now).unwrap();
            black_box(b.open(ad, &h, &m, now).unwrap());
        });
    }
    let mut sender = GroupChains::default();
    let mut member = GroupChains::default();
    let (key, n, _) = sender.sending(1)?;
    let mac = sender.mac_for(1, "bob")?;
    member.install(1, "alice", key, n, mac);
    let epoch_key = PairKey::random()?;
    measure(
        "sender chain: next key + a member's (each HKDF)",
        100_000,
        || {
            let (n, k) = sender.next_key(1).unwrap();
            black_box(fastchat::client::e2e::group_message_key(&epoch_key, &k).unwrap());
            let k = member.receive(1, "alice", n, 0).unwrap();
            member.release(1, "alice", n);
            black_box(fastchat::client::e2e::group_message_key(&epoch_key, &k).unwrap());
        },
    );
    // A group message's authentication: a tag per other member for its sender (here nine,
    // a group of ten), one checked by each member; against an Ed25519 signature and its check.
    let members: Vec<String> = (0..9).map(|i| format!("m{i}")).collect();
    let macs: Vec<[u8; 32]> = members
        .iter()
        .map(|m| sender.mac_for(1, m))
        .collect::<fastchat::Result<_>>()?;
    let plain = fastchat::client::e2e::Plain::Text("x".repeat(100));
    let at = fastchat::client::e2e::GroupSeq {
        epoch: 1,
        seq: 1,
        n: 0,
    };
    let envelope = |body| fastchat::net::Envelope {
        id: 1,
        from: "alice".into(),
        to: String::new(),
        group: Some("alice/team".into()),
        client_id: 1,
        body,
        sent_at: 0,
    };
    let seal = || {
        fastchat::client::e2e::seal_group_with(
            &epoch_key,
            &macs,
            "alice/team",
            "alice",
            1,
            at,
            &plain,
        )
    };
    measure(
        "group message: seal with 9 tags (a group of ten)",
        20_000,
        || {
            black_box(seal().unwrap());
        },
    );
    let msg = envelope(seal()?);
    measure("group message: check a member's tag", 100_000, || {
        let body = fastchat::client::e2e::parse_group(&msg).unwrap();
        body.check(3, &macs[3], "alice").unwrap();
        black_box(body);
    });
    let bob_public = bob.public()?;
    let (_, signed_public, signature) = x3dh::signed_prekey(1, |m| bob.sign(m))?;
    let bundle = x3dh::Bundle {
        identity: bob_public.x25519.clone(),
        signed_prekey_id: 1,
        signed_prekey: signed_public,
        signature,
        one_time: Some((2, serde_bytes::ByteBuf::from(x25519_pair()?.1))),
    };
    let private = alice.x25519_private()?;
    measure("X3DH: start a conversation (once per peer)", 2_000, || {
        black_box(x3dh::initiate("alice", &private, "bob", &bob_public.ed25519, &bundle).unwrap());
    });
    // The session file as the client writes it: in a folder under the current directory
    // (the disk the client's home would be on, not a memory file system).
    let home = tempfile::tempdir_in(".")?;
    let store = Keystore::new(home.path(), "alice");
    let sessions = Sessions::new(&store, alice)?;
    let mut conversation = Conversation::default();
    let (ratchet, _) = pair()?;
    conversation.add(Session {
        id: 1,
        ratchet,
        init: None,
    });
    measure("session file: load + seal + save (fsync)", 300, || {
        let locked = sessions.lock(&store).unwrap();
        black_box(locked.load("bob", 0).unwrap());
        locked.save("bob", &conversation).unwrap();
    });
    Ok(())
}
