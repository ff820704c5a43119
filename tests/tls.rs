//! TLS on every link, a cluster that trusts by certificate, tokens bound to their connection,
//! and private files. Each test is an attack the cluster must defeat, or a promise it keeps.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::time::Instant;

use common::{next_message, Cluster, Proc, RecordingProxy, LIMIT};
use fastchat::client::Connection;
use fastchat::net::{BalancerReply, BalancerRequest, ErrorCode, Greeting, ServerEvent};
use fastchat::transport::pki::{self, Member, Role};
use fastchat::transport::{Channel, Expect, Transport};

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A cluster whose every link passes through a recording proxy: clients and servers reach
/// the balancer through one, clients and peer servers reach each server through one.
fn recorded_cluster(plaintext: bool) -> (Cluster, Vec<RecordingProxy>, fastchat::client::Session) {
    let mut c = if plaintext {
        Cluster::start_plaintext(0)
    } else {
        Cluster::start(0)
    };
    let front = RecordingProxy::bind();
    front.forward_to(&c.balancer_addr);
    c.balancer_addr = front.addr.clone();
    let mut proxies = vec![front];
    for _ in 0..2 {
        let p = RecordingProxy::bind();
        c.add_server_behind(&p);
        proxies.push(p);
    }
    c.wait_servers(2);
    c.signup("alice");
    c.signup("bob");
    // A library login, so the test knows a token that crossed the wire.
    let session = c
        .balancer_client()
        .login("alice", "password-alice")
        .unwrap();
    // Round-robin puts alice and bob on different servers: the message crosses a peer link.
    let bob = c.spawn("bob", &["recv", "--wait", "10"]);
    c.wait_online("bob", 1);
    c.send("alice", "bob", "MARKER-on-every-link");
    let mut bob = bob;
    assert_eq!(bob.line(), "alice: MARKER-on-every-link");
    let _ = bob.interrupt();
    (c, proxies, session)
}

#[test]
fn nothing_secret_crosses_any_link_in_the_clear() {
    let (c, proxies, session) = recorded_cluster(false);
    let wire: Vec<u8> = proxies
        .iter()
        .flat_map(|p| p.recorded.lock().clone())
        .collect();
    assert!(wire.len() > 10_000, "the proxies saw the traffic");
    let secrets: Vec<(&str, Vec<u8>)> = vec![
        ("a password", b"password-alice".to_vec()),
        ("a password", b"password-bob".to_vec()),
        ("a session token", session.token.as_bytes().to_vec()),
        ("a message", b"MARKER-on-every-link".to_vec()),
        ("a user name", b"alice".to_vec()),
        ("a server's name", b"server-".to_vec()),
    ];
    for (what, needle) in &secrets {
        assert!(
            !contains(&wire, needle),
            "{what} crossed a link in the clear"
        );
    }
    // The links a server opens (to the balancer, to its peers) were recorded too: each
    // proxy in front of a server saw more than client traffic.
    let key = std::fs::read(c.tls.as_ref().unwrap().join("server-1.key")).unwrap();
    assert!(
        !contains(&wire, &key[40..80]),
        "a private key crossed a link"
    );
}

#[test]
fn the_recording_proxies_do_see_secrets_when_tls_is_off() {
    // The test above means something only if the same recording would show them in the clear.
    let (_c, proxies, session) = recorded_cluster(true);
    let wire: Vec<u8> = proxies
        .iter()
        .flat_map(|p| p.recorded.lock().clone())
        .collect();
    assert!(contains(&wire, b"password-alice"));
    assert!(contains(&wire, session.token.as_bytes()));
    assert!(
        contains(&wire, b"server-"),
        "a server's name (registration, server lists): the balancer link too"
    );
}

/// A second cluster folder: another CA, with its own balancer and servers.
fn foreign_ca(c: &Cluster) -> std::path::PathBuf {
    let dir = c.dir.path().join("foreign");
    let member = |role, name: &str| Member {
        role,
        name: name.into(),
    };
    pki::init(
        &dir,
        &[
            member(Role::Balancer, "balancer"),
            member(Role::Server, "server-1"),
            member(Role::Server, "server-9"),
        ],
    )
    .unwrap();
    dir
}

#[test]
fn a_server_without_a_certificate_of_the_cluster_cannot_register() {
    let c = Cluster::start(1);
    let foreign = foreign_ca(&c);
    // A real binary with another CA's certificate: it cannot even finish the handshake.
    let out = common::run_limited(
        std::process::Command::new(common::bin("fastchat-server")).args([
            "--listen",
            "127.0.0.1:0",
            "--balancer",
            &c.balancer_addr,
            "--db",
            &c.db,
            "--tls-dir",
            foreign.to_str().unwrap(),
            "--name",
            "server-9",
        ]),
    );
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("certificate"), "{}", out.stderr);
    // A client (no certificate) asking to register: refused.
    let refused = c.balancer_client().request(BalancerRequest::Register {
        addr: "127.0.0.1:9".into(),
        name: "server-7".into(),
    });
    assert!(
        matches!(
            refused,
            Err(fastchat::Error::Refused {
                code: ErrorCode::NotAllowed,
                ..
            })
        ),
        "{refused:?}"
    );
    // A real server certificate claiming another server's name: refused.
    let tls = c.tls.as_ref().unwrap();
    pki::issue(
        tls,
        &Member {
            role: Role::Server,
            name: "server-5".into(),
        },
    )
    .unwrap();
    let server5 = Transport::member(tls, "server-5").unwrap();
    let stream = server5
        .connect(&c.balancer_addr, "balancer", &Expect::Balancer)
        .unwrap();
    let mut ch = Channel::new(stream).unwrap();
    ch.send(&fastchat::net::Request {
        id: 1,
        body: BalancerRequest::Register {
            addr: "127.0.0.1:9".into(),
            name: "server-1".into(),
        },
    })
    .unwrap();
    let answer: fastchat::net::Response<BalancerReply> =
        ch.recv(fastchat::net::MAX_FRAME).unwrap().unwrap();
    assert!(answer.result.is_err(), "{answer:?}");
    // Only the one real server was ever handed to clients.
    let live = c.wait_servers(1);
    assert_eq!(live[0].name, "server-1");
}

#[test]
fn a_peer_link_needs_that_peers_certificate() {
    let c = Cluster::start(1);
    let foreign = foreign_ca(&c);
    let server = &c.server_addrs[0];
    // Another CA's server certificate: the handshake itself fails.
    let rogue = Transport::member(&foreign, "server-1").unwrap();
    assert!(rogue
        .connect(server, "server", &Expect::Server(None))
        .is_err());
    // A client, with no certificate, saying it is server 1's peer link: refused.
    let mut s = common::tls_connect(server);
    let mut hello = Vec::new();
    fastchat::net::encode_into(&mut hello, &Greeting::Peer { server_id: 1 }).unwrap();
    s.write_all(&hello).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let mut r = fastchat::net::FrameReader::new(&answer[..]);
    match r.read::<ServerEvent>() {
        Ok(Some(ServerEvent::Reply(fastchat::net::Response {
            result: Err(refusal),
            ..
        }))) => assert_eq!(refusal.code, ErrorCode::NotAllowed),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // A real certificate of another member of the cluster, claiming server 1's id: refused.
    let tls = c.tls.as_ref().unwrap();
    pki::issue(
        tls,
        &Member {
            role: Role::Server,
            name: "server-6".into(),
        },
    )
    .unwrap();
    let impostor = Transport::member(tls, "server-6").unwrap();
    let stream = impostor
        .connect(server, "server", &Expect::Server(None))
        .unwrap();
    let mut ch = Channel::new(stream).unwrap();
    ch.send(&Greeting::Peer {
        server_id: c.server_ids[0],
    })
    .unwrap();
    match ch.recv::<ServerEvent>(fastchat::net::MAX_FRAME) {
        Ok(Some(ServerEvent::Reply(r))) => assert!(r.result.is_err()),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_client_pins_the_cluster_ca_and_refuses_another_loudly() {
    let c = Cluster::start(1);
    c.signup("alice");
    // Without --ca: trust on first use, with a notice; the pin is private.
    let first = common::run_limited(c.cmd("alice").env_remove("FASTCHAT_CA").args(["servers"]));
    assert_eq!(first.code, 0, "{first:?}");
    assert!(first.stderr.contains("first contact"), "{}", first.stderr);
    let pin = fastchat::transport::pin_path(&c.home(), &c.balancer_addr);
    assert_eq!(std::fs::read(&pin).unwrap(), std::fs::read(c.ca()).unwrap());
    assert_eq!(
        std::fs::metadata(&pin).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let again = common::run_limited(c.cmd("alice").env_remove("FASTCHAT_CA").args(["servers"]));
    assert_eq!(again.code, 0);
    assert!(!again.stderr.contains("first contact"), "said once");
    // The cluster is replaced by one with another CA at the same address (or someone sits on
    // the path): refused, loudly, by the pinned client.
    let mut c = c;
    c.balancer.kill9();
    let foreign = foreign_ca(&c);
    let impostor = Proc::spawn(
        "impostor",
        std::process::Command::new(common::bin("fastchat-balancer")).args([
            "--listen",
            &c.balancer_addr,
            "--db",
            c.dir.path().join("other.db").to_str().unwrap(),
            "--tls-dir",
            foreign.to_str().unwrap(),
        ]),
    );
    impostor.line();
    let refused = common::run_limited(c.cmd("alice").env_remove("FASTCHAT_CA").args(["servers"]));
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(refused.stderr.contains("WARNING"), "{}", refused.stderr);
    assert!(
        refused.stderr.contains(pin.to_str().unwrap()),
        "says how to reset it"
    );
    // And with the cluster's CA given, the same.
    let given = common::run_limited(c.cmd("alice").args(["servers"]));
    assert_eq!(given.code, 1, "{given:?}");
}

#[test]
fn a_client_refuses_a_server_whose_certificate_is_not_the_clusters() {
    let c = Cluster::start(1);
    let foreign = foreign_ca(&c);
    // A server of the other CA, listening where a client is told to go.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let rogue = Transport::member(&foreign, "server-1").unwrap();
    let t = std::thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        let _ = rogue.accept(tcp, Instant::now() + LIMIT, None);
    });
    c.signup_lib("alice");
    let mut session = c
        .balancer_client()
        .login("alice", "password-alice")
        .unwrap();
    session.server.addr = addr;
    match Connection::open(&session, &c.transport) {
        Err(fastchat::Error::Integrity(why)) => assert!(why.contains("did not sign"), "{why}"),
        other => panic!("expected a refusal, got {:?}", other.map(|c| c.server_id)),
    }
    t.join().unwrap();
}

#[test]
fn a_token_is_bound_to_its_connection_and_logout_closes_it_everywhere() {
    let c = Cluster::start_with(2, "round-robin");
    c.wait_servers(2);
    c.signup_lib("alice");
    c.signup_lib("bob");
    let mut b = c.balancer_client();
    let session = b.login("bob", "password-bob").unwrap();
    let live = Connection::open(&session, &c.transport).unwrap();
    // Someone who saw the token and a proof on the wire replays them on a connection of
    // their own: the proof was for another connection.
    let mut replay = common::tls_connect(&session.server.addr);
    let stolen_proof = session.key.prove(Some(&[0u8; 32])).unwrap();
    let mut hello = Vec::new();
    fastchat::net::encode_into(
        &mut hello,
        &Greeting::Hello {
            token: session.token.clone(),
            proof: stolen_proof,
        },
    )
    .unwrap();
    replay.write_all(&hello).unwrap();
    let mut answer = Vec::new();
    let _ = replay.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    assert!(text.contains("session proof"), "{text}");
    // Nor does the token resume elsewhere without a proof for that connection.
    let mut forged = session.clone();
    forged.key = std::sync::Arc::new(fastchat::crypto::SessionKey::generate().unwrap());
    assert!(matches!(
        c.balancer_client().resume(&forged, None),
        Err(fastchat::Error::Refused {
            code: ErrorCode::InvalidToken,
            ..
        })
    ));
    // A second connection of the same session, on the other server.
    let mut elsewhere = b.resume(&session, Some(session.server.id)).unwrap();
    assert_ne!(elsewhere.server.id, session.server.id);
    elsewhere.token = session.token.clone();
    let second = Connection::open(&elsewhere, &c.transport).unwrap();
    // Logout: both live connections are closed by their servers, and the token is refused.
    b.logout(&session).unwrap();
    for conn in [&live, &second] {
        let deadline = Instant::now() + LIMIT;
        loop {
            match conn.events().recv_deadline(deadline) {
                Ok(fastchat::client::Incoming::Closed(_)) => break,
                Ok(_) => continue,
                Err(_) => panic!("a connection of the ended session stayed open"),
            }
        }
    }
    assert!(matches!(
        Connection::open(&session, &c.transport),
        Err(fastchat::Error::Refused {
            code: ErrorCode::InvalidToken,
            ..
        })
    ));
    // Everyone else carries on.
    let alice = c.login("alice");
    let bob = c.login("bob");
    let id = alice.send("bob", 1, b"after", None).unwrap();
    assert_eq!(next_message(&bob).id, id);
}

#[test]
fn the_database_and_certificates_are_private_to_their_owner() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    c.send("alice", "bob", "x");
    for entry in std::fs::read_dir(c.dir.path()).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with("chat.db") {
            let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{name}");
        }
    }
    let tls = c.tls.as_ref().unwrap();
    assert_eq!(
        std::fs::metadata(tls).unwrap().permissions().mode() & 0o777,
        0o700
    );
    for entry in std::fs::read_dir(tls).unwrap().flatten() {
        let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{:?}", entry.file_name());
    }
    // fastchat-admin makes them so too.
    let dir = c.dir.path().join("admin-made");
    let out = common::run_limited(
        std::process::Command::new(common::bin("fastchat-admin"))
            .arg("init")
            .arg(&dir)
            .args(["--servers", "2"]),
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("cluster CA SHA256:"), "{}", out.stdout);
    for f in ["ca.key", "server-2.key", "balancer.pem"] {
        let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    let again = common::run_limited(
        std::process::Command::new(common::bin("fastchat-admin"))
            .arg("init")
            .arg(&dir),
    );
    assert_eq!(again.code, 1, "a second CA in the same folder is refused");
}

#[test]
fn plaintext_is_explicit_and_warned_about_at_every_start() {
    let c = Cluster::start_plaintext(1);
    c.signup("alice");
    let out = c.run("alice", &["servers"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("WARNING: --insecure-plaintext"),
        "{}",
        out.stderr
    );
    // A TLS client meeting a plaintext cluster gets a clear error, not garbage.
    let tls_client = common::run_limited(
        c.cmd("alice")
            .env_remove("FASTCHAT_INSECURE_PLAINTEXT")
            .args(["servers"]),
    );
    assert_eq!(tls_client.code, 3, "{tls_client:?}");
    assert!(
        tls_client.stderr.contains("does not speak TLS"),
        "{}",
        tls_client.stderr
    );
    // Neither binary starts without certificates unless told to run in plaintext.
    let out = common::run_limited(
        std::process::Command::new(common::bin("fastchat-balancer")).args([
            "--listen",
            "127.0.0.1:0",
            "--db",
            c.dir.path().join("x.db").to_str().unwrap(),
        ]),
    );
    assert_eq!(out.code, 4, "{out:?}");
    assert!(out.stderr.contains("fastchat-admin init"), "{}", out.stderr);
}

/// Runs the command a refusal quotes between backticks (`fastchat-admin ...`).
fn run_quoted(stderr: &str) -> common::Output {
    let quoted = stderr
        .split('`')
        .nth(1)
        .unwrap_or_else(|| panic!("no command quoted in: {stderr}"));
    let mut words = quoted.split_whitespace();
    assert_eq!(words.next(), Some("fastchat-admin"), "{stderr}");
    common::run_limited(std::process::Command::new(common::bin("fastchat-admin")).args(words))
}

#[test]
fn a_missing_certificate_names_the_command_that_makes_it_and_that_command_works() {
    let tmp = tempfile::tempdir().unwrap();
    let tls = tmp.path().join("tls");
    std::fs::create_dir(&tls).unwrap();
    let db = tmp.path().join("chat.db");
    let balancer = |name: &str| {
        let mut cmd = std::process::Command::new(common::bin("fastchat-balancer"));
        cmd.args(["--listen", "127.0.0.1:0", "--db", db.to_str().unwrap()])
            .args(["--tls-dir", tls.to_str().unwrap(), "--name", name])
            .env_remove("FASTCHAT_CONFIG")
            .env_remove("FASTCHAT_HOME")
            .env_remove("FASTCHAT_DB");
        cmd
    };
    // A folder with no CA yet: the refusal says how to make one, and that works.
    let out = common::run_limited(&mut balancer("balancer"));
    assert_eq!(out.code, 4, "{out:?}");
    assert!(
        out.stderr.contains("no cluster certificate authority"),
        "{out:?}"
    );
    let made = run_quoted(&out.stderr);
    assert_eq!(made.code, 0, "{made:?}");
    // A second balancer (or a server added later) has no certificate of its own yet.
    let out = common::run_limited(&mut balancer("balancer-2"));
    assert_eq!(out.code, 4, "{out:?}");
    assert!(
        out.stderr.contains("fastchat-admin cert ") && out.stderr.contains("--balancer balancer-2"),
        "{out:?}"
    );
    let issued = run_quoted(&out.stderr);
    assert_eq!(issued.code, 0, "{issued:?}");
    let mut started = Proc::spawn("balancer-2", &mut balancer("balancer-2"));
    assert!(started.line().contains("listening"), "it starts now");
    started.kill9();
    // A chat server's refusal names the server kind of certificate.
    let out = common::run_limited(
        std::process::Command::new(common::bin("fastchat-server"))
            .args(["--listen", "127.0.0.1:0", "--db", db.to_str().unwrap()])
            .args(["--balancer", "127.0.0.1:1", "--name", "server-9"])
            .args(["--tls-dir", tls.to_str().unwrap()])
            .env_remove("FASTCHAT_CONFIG")
            .env_remove("FASTCHAT_HOME")
            .env_remove("FASTCHAT_DB"),
    );
    assert_eq!(out.code, 4, "{out:?}");
    assert!(out.stderr.contains("--server server-9"), "{out:?}");
    assert_eq!(run_quoted(&out.stderr).code, 0);
    assert!(tls.join("server-9.pem").exists());
}

/// A TLS service that is not fastchat's: a self-signed certificate with no member name,
/// answering handshakes on loopback until the returned flag is set.
fn other_tls_service() -> (String, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use openssl::asn1::Asn1Time;
    use openssl::hash::MessageDigest;
    use openssl::pkey::PKey;
    use openssl::ssl::{SslAcceptor, SslMethod};
    use openssl::x509::{X509NameBuilder, X509};
    let key = PKey::generate_ed25519().unwrap();
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", "some other service")
        .unwrap();
    let name = name.build();
    let mut cert = X509::builder().unwrap();
    cert.set_version(2).unwrap();
    cert.set_subject_name(&name).unwrap();
    cert.set_issuer_name(&name).unwrap();
    cert.set_pubkey(&key).unwrap();
    cert.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    cert.set_not_after(&Asn1Time::days_from_now(1).unwrap())
        .unwrap();
    cert.sign(&key, MessageDigest::null()).unwrap();
    let cert = cert.build();
    let mut acceptor = SslAcceptor::mozilla_modern_v5(SslMethod::tls_server()).unwrap();
    acceptor.set_private_key(&key).unwrap();
    acceptor.set_certificate(&cert).unwrap();
    let acceptor = acceptor.build();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopping = stop.clone();
    std::thread::spawn(move || {
        let deadline = Instant::now() + LIMIT;
        while !stopping.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
            match listener.accept() {
                Ok((tcp, _)) => {
                    tcp.set_nonblocking(false).unwrap();
                    tcp.set_read_timeout(Some(std::time::Duration::from_secs(2)))
                        .unwrap();
                    let _ = acceptor.accept(tcp);
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
    });
    (addr, stop)
}

#[test]
fn a_mistyped_address_that_speaks_tls_leaves_no_pin_behind() {
    // On first contact the client trusts the CA it is shown, but only once the other end has
    // proved to be a balancer of a cluster: another program that speaks TLS (a wrong port)
    // is refused and pins nothing, so the real cluster at that address is not refused later.
    let (addr, stop) = other_tls_service();
    let home = tempfile::tempdir().unwrap();
    let out = common::run_limited(
        std::process::Command::new(common::bin("fastchat"))
            .args(["--balancer", &addr, "servers"])
            .env("FASTCHAT_HOME", home.path())
            .env_remove("FASTCHAT_CA")
            .env_remove("FASTCHAT_CONFIG")
            .env("FASTCHAT_PASSWORD", "pw"),
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("is not the cluster's balancer"),
        "{out:?}"
    );
    assert!(!out.stderr.contains("first contact"), "{out:?}");
    let pin = fastchat::transport::pin_path(home.path(), &addr);
    assert!(!pin.exists(), "{} was pinned", pin.display());
}
