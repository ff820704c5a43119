//! End-to-end encryption: the servers see ciphertext only; keys at rest; pinning; tampering.

mod common;

use std::path::Path;

use common::{dir_contains, Cluster, RecordingProxy};
use openssl::pkey::PKey;

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The raw private keys (X25519, Ed25519) in a user's key file, decrypted here by hand from
/// the format documented in `Identity::from_key_file`, with `password`.
fn raw_private_with(home: &Path, user: &str, password: &str) -> Option<(Vec<u8>, Vec<u8>)> {
    let text = std::fs::read_to_string(home.join(user).join("identity.key")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "fastchat-identity v2");
    let p: Vec<&str> = lines[1].split(' ').collect();
    assert_eq!(p[0], "scrypt");
    let (log_n, r, pp): (u32, u64, u64) = (
        p[1].parse().unwrap(),
        p[2].parse().unwrap(),
        p[3].parse().unwrap(),
    );
    let salt = fastchat::crypto::from_hex(p[4]).unwrap();
    let mut key = [0u8; 32];
    openssl::pkcs5::scrypt(
        password.as_bytes(),
        &salt,
        1 << log_n,
        r,
        pp,
        1 << 30,
        &mut key,
    )
    .unwrap();
    let sealed = fastchat::crypto::from_hex(lines[2]).unwrap();
    let aad = [b"fastchat/identity/v2".as_slice(), user.as_bytes()].concat();
    let both = fastchat::crypto::PairKey(key).open(&aad, &sealed).ok()?;
    Some((both[..32].to_vec(), both[32..].to_vec()))
}

fn raw_private(home: &Path, user: &str) -> (Vec<u8>, Vec<u8>) {
    raw_private_with(home, user, &format!("password-{user}")).expect("the password opens it")
}

#[test]
fn servers_store_and_carry_ciphertext_only() {
    let mut c = Cluster::start(0);
    let proxy = RecordingProxy::bind();
    c.add_server_behind(&proxy);
    c.signup("alice");
    c.signup("bob");
    let marker = "MARKER-7f3a9c-the-eagle-lands-at-dawn";
    c.send("alice", "bob", marker);
    c.send("alice", "bob", &format!("{marker} again"));

    // At rest: the database file and its WAL, before delivery.
    let stored = c.stored_bytes();
    // Opened once: each opening costs a password hash (PostgreSQL stores many files).
    let keys = ["alice", "bob"].map(|user| (user, raw_private(&c.home(), user)));
    for (name, bytes) in &stored {
        assert!(!contains(bytes, marker.as_bytes()), "plaintext in {name}");
        assert!(!contains(bytes, b"password-alice"), "password in {name}");
        for (user, (x, e)) in &keys {
            assert!(!contains(bytes, x), "{user}'s private key in {name}");
            assert!(!contains(bytes, e), "{user}'s private key in {name}");
        }
    }
    let bodies = stored
        .iter()
        .filter(|(name, _)| name.starts_with("chat.db") || name == "messages.body");
    assert!(
        bodies.count() >= 2,
        "database and WAL (or both stored bodies) were checked"
    );
    assert!(c.count("SELECT count(*) FROM messages") == 2);

    // In transit: everything the server's side of the connection received and sent.
    let out = c.run("bob", &["recv"]);
    assert_eq!(
        out.lines(),
        [format!("alice: {marker}"), format!("alice: {marker} again")]
    );
    let wire = proxy.recorded.lock().clone();
    assert!(
        wire.len() > 200,
        "the proxy saw the traffic ({} bytes)",
        wire.len()
    );
    assert!(!contains(&wire, marker.as_bytes()), "plaintext on the wire");
    assert!(
        !contains(&wire, b"alice"),
        "inside TLS, not even the sender's name is visible (tests/tls.rs shows the same \
         recording in plaintext, where it is)"
    );
}

#[test]
fn private_keys_are_encrypted_at_rest_with_mode_0600() {
    use std::os::unix::fs::PermissionsExt;
    let c = Cluster::start(1);
    c.signup("alice");
    let path = c.home().join("alice").join("identity.key");
    let text = std::fs::read_to_string(&path).unwrap();
    // scrypt at the balancer's default cost: a stolen file costs a guess as much as the
    // password hash does.
    assert!(
        text.starts_with("fastchat-identity v2\nscrypt 15 8 1 "),
        "{text}"
    );
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(raw_private_with(&c.home(), "alice", "wrong").is_none());
    // The directory holds the matching public keys.
    let x: Vec<u8> = c
        .sql()
        .one("SELECT x25519 FROM users WHERE name = 'alice'", &[]);
    let private = PKey::private_key_from_raw_bytes(
        &raw_private(&c.home(), "alice").0,
        openssl::pkey::Id::X25519,
    )
    .unwrap();
    assert_eq!(private.raw_public_key().unwrap(), x);
}

#[test]
fn a_machine_without_the_key_files_gets_a_clear_error() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    let elsewhere = c.dir.path().join("new-laptop");
    let out = common::run_limited(
        c.cmd("alice")
            .env("FASTCHAT_HOME", &elsewhere)
            .args(["send", "bob", "hi"]),
    );
    assert_eq!(out.code, 4, "local trouble: {out:?}");
    assert!(out.stderr.contains("no private keys for alice"), "{out:?}");
    assert!(out.stderr.contains("copy that folder here"), "{out:?}");
    assert_eq!(c.count("SELECT count(*) FROM messages"), 0);
}

#[test]
fn tampered_or_misaddressed_messages_are_rejected_never_shown() {
    let c = Cluster::start(1);
    for u in ["alice", "bob", "carol"] {
        c.signup(u);
    }
    c.send("alice", "bob", "original text");
    c.send("alice", "bob", "for bob only");
    c.send("alice", "bob", "untouched");
    let db = c.sql();
    let ids: Vec<i64> = db.column("SELECT id FROM messages ORDER BY id", &[]);
    // Flip one ciphertext byte of the first; re-address the second to carol.
    let mut body: Vec<u8> = db.one("SELECT body FROM messages WHERE id = ?1", &[&ids[0]]);
    let last = body.len() - 20;
    body[last] ^= 0x40;
    db.exec(
        "UPDATE messages SET body = ?1 WHERE id = ?2",
        &[&body, &ids[0]],
    );
    db.exec(
        "UPDATE messages SET recipient = 'carol' WHERE id = ?1",
        &[&ids[1]],
    );

    let bob = common::run_limited(c.cmd_with_receipts("bob").arg("recv"));
    assert_eq!(bob.code, 0, "{bob:?}");
    assert_eq!(bob.lines(), ["alice: untouched"]);
    assert!(
        bob.stderr
            .contains(&format!("message {} from alice rejected", ids[0])),
        "{bob:?}"
    );
    assert!(!bob.stdout.contains("original"));

    let carol = c.run("carol", &["recv"]);
    assert_eq!(carol.stdout, "", "{carol:?}");
    assert!(carol.stderr.contains("rejected"), "{carol:?}");
    // Rejected messages are acknowledged too, so they do not come back forever. (Left: the
    // read receipt for the one bob was shown; none for the rejected ones.)
    assert_eq!(
        c.count("SELECT count(*) FROM messages WHERE recipient IN ('bob', 'carol')"),
        0
    );
    let receipts = c.run("alice", &["recv", "--json"]);
    let r: serde_json::Value = serde_json::from_str(receipts.stdout.trim()).unwrap();
    assert_eq!(
        (&r["kind"], &r["reached"]),
        (&"receipt".into(), &"read".into())
    );
    assert_eq!(r["of"], serde_json::json!([ids[2]]));
}

#[test]
fn changed_keys_are_refused_until_trusted() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    c.send("alice", "bob", "first contact pins bob's keys");
    assert!(std::fs::read_to_string(c.home().join("alice/known_keys"))
        .unwrap()
        .starts_with("bob "));

    // The directory now serves other keys for bob (a compromised or reset account).
    let mallory = fastchat::crypto::Identity::generate()
        .unwrap()
        .public()
        .unwrap();
    c.sql().exec(
        "UPDATE users SET x25519 = ?1, ed25519 = ?2 WHERE name = 'bob'",
        &[&mallory.x25519, &mallory.ed25519],
    );
    let out = c.run("alice", &["send", "bob", "secret"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("WARNING: the keys of bob have CHANGED"),
        "{out:?}"
    );
    assert!(out.stderr.contains("fastchat trust bob"), "{out:?}");
    assert_eq!(
        c.count("SELECT count(*) FROM messages"),
        1,
        "nothing more was sent"
    );

    let trust = c.run("alice", &["trust", "bob"]);
    assert_eq!(trust.code, 0, "{trust:?}");
    assert!(trust
        .stdout
        .starts_with("now trusting bob with fingerprint "));
    // The session with the old keys is gone, and a new one needs prekeys signed with the new
    // keys: the directory swapped the keys but cannot sign for them.
    assert!(!c.home().join("alice/sessions/bob").exists());
    let out = c.run("alice", &["send", "bob", "after trust"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("bob's signed prekey does not carry bob's signature"),
        "{out:?}"
    );
}

#[test]
fn nothing_is_left_in_the_home_but_key_files() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    c.send("alice", "bob", "PLAINTEXT-CANARY");
    let out = c.run("bob", &["recv"]);
    assert_eq!(out.lines(), ["alice: PLAINTEXT-CANARY"]);
    assert!(dir_contains(c.dir.path(), b"PLAINTEXT-CANARY").is_empty());
}
