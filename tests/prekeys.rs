//! The key directory's prekeys (the asynchronous key agreement of forward secrecy): published
//! with the owner's signature, each one-time prekey handed out once however many ask at once,
//! the signed prekey alone once they run out.

mod common;

use std::collections::HashSet;

use common::Cluster;
use fastchat::client::{BalancerClient, Session};
use fastchat::crypto::{x3dh, Identity};
use fastchat::net::{ErrorCode, SignedPrekey};

/// Signs `user` up with a fresh identity (kept, to sign prekeys) and logs them in.
fn user(c: &Cluster, name: &str) -> (Identity, Session) {
    let identity = Identity::generate().unwrap();
    let mut b = c.balancer_client();
    b.signup(
        name,
        &format!("password-{name}"),
        identity.public().unwrap(),
        None,
    )
    .unwrap();
    let session = b.login(name, &format!("password-{name}")).unwrap();
    (identity, session)
}

fn signed(identity: &Identity, id: u32) -> SignedPrekey {
    let (_, public, signature) = x3dh::signed_prekey(id, |m| identity.sign(m)).unwrap();
    SignedPrekey {
        id,
        public,
        signature,
    }
}

fn one_time(ids: std::ops::Range<u32>) -> Vec<(u32, Vec<u8>)> {
    ids.map(|id| (id, fastchat::crypto::ratchet::x25519_pair().unwrap().1))
        .collect()
}

fn refusal(r: fastchat::Result<impl std::fmt::Debug>) -> (ErrorCode, String) {
    match r {
        Err(fastchat::Error::Refused { code, message }) => (code, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn each_one_time_prekey_is_handed_out_once_then_the_signed_prekey_alone() {
    let c = Cluster::start(1);
    let (alice, alice_session) = user(&c, "alice");
    let (_, bob_session) = user(&c, "bob");
    let mut b = c.balancer_client();
    assert_eq!(
        b.bundle(&bob_session, "alice").unwrap(),
        None,
        "nothing published yet"
    );
    let n = b
        .publish_prekeys(&alice_session, Some(signed(&alice, 1)), one_time(0..5))
        .unwrap();
    assert_eq!(n, 5);
    // Eight askers at once, each on a connection of its own.
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let session = bob_session.clone();
            let addr = c.balancer_addr.clone();
            let transport = c.transport.clone();
            std::thread::spawn(move || {
                BalancerClient::connect(&addr, &transport)
                    .and_then(|mut b| b.bundle(&session, "alice"))
                    .unwrap()
                    .expect("a bundle")
            })
        })
        .collect();
    let bundles: Vec<x3dh::Bundle> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let handed: Vec<u32> = bundles
        .iter()
        .filter_map(|b| b.one_time.as_ref().map(|(id, _)| *id))
        .collect();
    let distinct: HashSet<u32> = handed.iter().copied().collect();
    assert_eq!(
        handed.len(),
        5,
        "five askers got a one-time prekey: {handed:?}"
    );
    assert_eq!(distinct.len(), 5, "never the same one twice: {handed:?}");
    // Every bundle, with or without a one-time prekey, starts a key agreement that checks.
    let keys = b.keys(&bob_session, "alice").unwrap();
    let bob_identity = Identity::generate().unwrap().to_raw().unwrap();
    for bundle in &bundles {
        x3dh::initiate("bob", &bob_identity[..32], "alice", &keys.ed25519, bundle).unwrap();
    }
    assert_eq!(
        b.publish_prekeys(&alice_session, None, Vec::new()).unwrap(),
        0,
        "all used up"
    );
}

#[test]
fn prekeys_must_be_the_owners_and_well_formed() {
    let c = Cluster::start(1);
    let (alice, alice_session) = user(&c, "alice");
    let (mallory, _) = user(&c, "mallory");
    let mut b = c.balancer_client();
    // A signed prekey signed by someone else is refused: peers would refuse it anyway.
    let (code, message) =
        refusal(b.publish_prekeys(&alice_session, Some(signed(&mallory, 1)), Vec::new()));
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(message.contains("signature"), "{message}");
    // An id used twice, a key that is not one, too many.
    b.publish_prekeys(&alice_session, Some(signed(&alice, 1)), one_time(0..3))
        .unwrap();
    let (code, message) = refusal(b.publish_prekeys(&alice_session, None, one_time(2..4)));
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(message.contains("published before"), "{message}");
    let (code, _) = refusal(b.publish_prekeys(&alice_session, None, vec![(50, vec![1; 5])]));
    assert_eq!(code, ErrorCode::BadRequest);
    // At most so many at once, and so many in all (3 + 3 x 64 = 195 of 200: 64 more are
    // refused, and nothing of a refused request is kept).
    let per = fastchat::net::PREKEYS_PER_REQUEST as u32;
    let (code, _) = refusal(b.publish_prekeys(&alice_session, None, one_time(100..101 + per)));
    assert_eq!(code, ErrorCode::BadRequest);
    for k in 0..3 {
        let from = 100 + k * per;
        b.publish_prekeys(&alice_session, None, one_time(from..from + per))
            .unwrap();
    }
    let (code, message) =
        refusal(b.publish_prekeys(&alice_session, None, one_time(500..500 + per)));
    assert_eq!(code, ErrorCode::QuotaExceeded, "{message}");
    assert_eq!(
        b.publish_prekeys(&alice_session, None, Vec::new()).unwrap(),
        3 + 3 * per
    );
    // A bundle for nobody is refused as an unknown user.
    let (code, _) = refusal(b.bundle(&alice_session, "nobody"));
    assert_eq!(code, ErrorCode::UnknownUser);
}

/// The client's side: `fastchat signup` publishes a signed prekey and one-time prekeys whose
/// private halves it keeps, sealed, in the user's folder, and `fastchat login` tops them up
/// once others have used them.
#[test]
fn the_client_publishes_prekeys_keeps_their_private_halves_and_tops_them_up() {
    use fastchat::client::keystore::Keystore;
    use fastchat::client::prekeys::{Prekeys, LOW_WATER};
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    let bob = c.balancer_client().login("bob", "password-bob").unwrap();
    let mut b = c.balancer_client();
    // The signup published her first prekeys: she can be written to before she logs in.
    let first = b
        .bundle(&bob, "alice")
        .unwrap()
        .expect("a bundle at signup");
    assert!(first.one_time.is_some());
    let out = c.run("alice", &["login"]);
    assert_eq!(out.code, 0, "{out:?}");
    let keys = b.keys(&bob, "alice").unwrap();
    let bundle = b
        .bundle(&bob, "alice")
        .unwrap()
        .expect("alice published a bundle");
    let bob_identity = Identity::generate().unwrap().to_raw().unwrap();
    x3dh::initiate("bob", &bob_identity[..32], "alice", &keys.ed25519, &bundle).unwrap();
    // Alice's folder holds the private halves of what the directory handed out, sealed.
    let store = Keystore::new(&c.home(), "alice");
    let identity = store.load_identity("password-alice").unwrap();
    let kept = Prekeys::load(&store, &identity).unwrap();
    let public_of = |private: &[u8]| {
        openssl::pkey::PKey::private_key_from_raw_bytes(private, openssl::pkey::Id::X25519)
            .unwrap()
            .raw_public_key()
            .unwrap()
    };
    let signed = kept
        .signed_private(bundle.signed_prekey_id)
        .expect("the signed prekey");
    assert_eq!(public_of(signed), bundle.signed_prekey);
    let (id, public) = bundle.one_time.clone().expect("a one-time prekey");
    let one_time = kept.one_time_private(id).expect("its private half");
    assert_eq!(public_of(one_time), public.into_vec());
    let file = std::fs::read(store.dir().join("prekeys")).unwrap();
    assert!(
        !file.windows(32).any(|w| w == signed || w == one_time),
        "the private halves are not in the file in the clear"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(store.dir().join("prekeys"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // Others use them up, down to fewer than the low-water mark.
    let alice = c
        .balancer_client()
        .login("alice", "password-alice")
        .unwrap();
    let start = b.publish_prekeys(&alice, None, Vec::new()).unwrap();
    assert!(start >= LOW_WATER, "the login published plenty: {start}");
    for _ in 0..=(start - LOW_WATER) {
        b.bundle(&bob, "alice").unwrap();
    }
    let held = b.publish_prekeys(&alice, None, Vec::new()).unwrap();
    assert!(held < LOW_WATER);
    // Alice's next login tops them up.
    let out = c.run("alice", &["login"]);
    assert_eq!(out.code, 0, "{out:?}");
    let after = b.publish_prekeys(&alice, None, Vec::new()).unwrap();
    assert_eq!(after, held + fastchat::net::PREKEYS_PER_REQUEST as u32);
    let _ = c.run("alice", &["logout"]);
    // So does any command of hers, for a user who never keeps a session.
    for _ in 0..=(after - LOW_WATER) {
        b.bundle(&bob, "alice").unwrap();
    }
    let held = b.publish_prekeys(&alice, None, Vec::new()).unwrap();
    assert!(held < LOW_WATER);
    assert_eq!(c.run("alice", &["whoami"]).code, 0);
    let after = b.publish_prekeys(&alice, None, Vec::new()).unwrap();
    assert_eq!(after, held + fastchat::net::PREKEYS_PER_REQUEST as u32);
}

/// A signup script run again (`--exist-ok`) with the keys already in the folder does not push
/// out the private half of the signed prekey the directory holds: others can still start a
/// conversation with the user.
#[test]
fn a_signup_run_again_keeps_the_signed_prekey_the_directory_holds() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    for _ in 0..3 {
        let out = c.run("alice", &["signup", "alice", "--exist-ok"]);
        assert_eq!(out.code, 0, "{out:?}");
    }
    c.send("bob", "alice", "still reachable");
    let out = c.run("alice", &["recv"]);
    assert_eq!(out.lines(), ["bob: still reachable"], "{out:?}");
}

/// A signup's prekeys are checked like published ones, before the account is made: not
/// signed by the account's own key, or with malformed keys, the signup is refused whole.
#[test]
fn a_signup_with_prekeys_not_its_own_is_refused_whole() {
    let c = Cluster::start(1);
    let mut b = c.balancer_client();
    let alice = Identity::generate().unwrap();
    let mallory = Identity::generate().unwrap();
    let prekeys = |id: &Identity| fastchat::net::NewPrekeys {
        signed: signed(id, 1),
        one_time: one_time(0..3)
            .into_iter()
            .map(|(n, k)| (n, serde_bytes::ByteBuf::from(k)))
            .collect(),
    };
    let refused = b.signup(
        "alice",
        "password-alice",
        alice.public().unwrap(),
        Some(prekeys(&mallory)),
    );
    let (code, message) = refusal(refused);
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(message.contains("signature"), "{message}");
    // Nothing was made: the name is still free.
    b.signup(
        "alice",
        "password-alice",
        alice.public().unwrap(),
        Some(prekeys(&alice)),
    )
    .unwrap();
    let bad = fastchat::net::PublicKeys {
        x25519: vec![1; 5],
        ed25519: vec![2; 5],
    };
    let (code, _) = refusal(b.signup("bob", "password-bob", bad, Some(prekeys(&alice))));
    assert_eq!(code, ErrorCode::BadRequest);
}
