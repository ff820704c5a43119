//! Files and images: byte-identical delivery across servers and to offline users, groups, safe
//! names, the size limit, and interrupted transfers that leave nothing behind.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Cluster, Gate, GateProxy, LIMIT};
use fastchat::client::e2e::{Directory, E2e};
use fastchat::client::files::Target;
use fastchat::client::keystore::Keystore;
use fastchat::client::Client;

const MIB: usize = 1024 * 1024;

/// Writes `len` random bytes to `dir/name`.
fn random_file(dir: &Path, name: &str, len: usize) -> PathBuf {
    let mut bytes = vec![0u8; len];
    openssl::rand::rand_bytes(&mut bytes).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, &bytes).unwrap();
    path
}

fn downloads(c: &Cluster, user: &str) -> PathBuf {
    c.home().join(user).join("downloads")
}

/// The names in a folder, sorted (hidden ones included).
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

fn count(c: &Cluster, table: &str) -> i64 {
    c.count(&format!("SELECT count(*) FROM {table}"))
}

/// Checks a `recv` line `FROM sent NAME (SIZE) -> PATH` (`prefix` is everything up to PATH)
/// and returns PATH.
fn saved_path(line: &str, prefix: &str) -> PathBuf {
    let path = line
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("{line:?} does not start with {prefix:?}"));
    PathBuf::from(path)
}

#[test]
fn a_5_mib_file_arrives_byte_identical_across_servers_and_to_an_offline_user() {
    let c = Cluster::start_with(2, "round-robin");
    c.wait_servers(2);
    for u in ["alice", "bob", "carol"] {
        c.signup(u);
    }
    let original = random_file(c.dir.path(), "data.bin", 5 * MIB);
    let want = std::fs::read(&original).unwrap();

    // carol is online, waiting; alice is then given the other server.
    let carol = c.spawn("carol", &["recv", "--wait", "20"]);
    c.wait_online("carol", 1);
    let out = c.run("alice", &["send-file", "carol", original.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout
            .starts_with("sent data.bin (5.0 MiB) to carol as message "),
        "{out:?}"
    );
    let line = carol.line();
    let got = saved_path(&line, "alice sent data.bin (5.0 MiB) -> ");
    assert_eq!(got, downloads(&c, "carol").join("data.bin"));
    assert!(std::fs::read(&got).unwrap() == want, "carol's copy differs");

    // bob is offline: the file waits, stored (encrypted) once, and arrives at his next recv.
    let out = c.run("alice", &["send-file", "bob", original.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(count(&c, "files"), 1);
    assert_eq!(count(&c, "file_chunks"), 20);
    let out = c.run("bob", &["recv"]);
    assert_eq!(out.code, 0, "{out:?}");
    let got = saved_path(out.stdout.trim_end(), "alice sent data.bin (5.0 MiB) -> ");
    assert!(std::fs::read(&got).unwrap() == want, "bob's copy differs");
    // Acknowledged: the message, the file and its chunks are gone from the server.
    assert_eq!(count(&c, "messages"), 0);
    assert_eq!(count(&c, "files"), 0);
    assert_eq!(count(&c, "file_chunks"), 0);
    // Sent again, it is saved beside the first copy, never over it.
    c.run("alice", &["send-file", "bob", original.to_str().unwrap()]);
    let out = c.run("bob", &["recv"]);
    let again = saved_path(out.stdout.trim_end(), "alice sent data.bin (5.0 MiB) -> ");
    assert_eq!(again, downloads(&c, "bob").join("data (1).bin"));
    assert_eq!(listing(&downloads(&c, "bob")), ["data (1).bin", "data.bin"]);
}

#[test]
fn the_file_never_appears_in_clear_on_the_server() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    let marker = b"FILE-PLAINTEXT-MARKER-93c1";
    let path = c.dir.path().join("secret.txt");
    std::fs::write(&path, marker.repeat(1000)).unwrap();
    let out = c.run("alice", &["send-file", "bob", path.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{out:?}");
    let stored = c.stored_bytes();
    assert!(!stored.is_empty());
    for (name, bytes) in stored {
        assert!(
            !bytes.windows(marker.len()).any(|w| w == marker),
            "plaintext in {name}"
        );
        assert!(
            !bytes.windows(10).any(|w| w == b"secret.txt"),
            "the file name in {name}"
        );
    }
}

#[test]
fn a_group_image_reaches_every_member() {
    let c = Cluster::start_with(3, "round-robin");
    c.wait_servers(3);
    for u in ["alice", "bob", "carol", "dave"] {
        c.signup(u);
    }
    let group = |user: &str, args: &[&str]| {
        let mut all = vec!["group"];
        all.extend_from_slice(args);
        let out = c.run(user, &all);
        assert_eq!(out.code, 0, "{out:?}");
        out
    };
    group("alice", &["create", "pics"]);
    for u in ["bob", "carol", "dave"] {
        group("alice", &["add", "pics", u]);
    }
    let image = random_file(c.dir.path(), "photo.png", 300 * 1024);
    let out = group("alice", &["send-file", "pics", image.to_str().unwrap()]);
    assert!(
        out.stdout
            .starts_with("sent photo.png (300.0 KiB) to group alice/pics as message "),
        "{out:?}"
    );
    assert_eq!(count(&c, "files"), 1, "stored once for the whole group");
    let want = std::fs::read(&image).unwrap();
    for u in ["bob", "carol", "dave"] {
        let out = c.run(u, &["recv"]);
        assert_eq!(out.code, 0, "{out:?}");
        let line = out.lines().last().unwrap().to_string();
        let got = saved_path(&line, "[alice/pics] alice sent photo.png (300.0 KiB) -> ");
        assert!(std::fs::read(&got).unwrap() == want, "{u}'s copy differs");
    }
    assert_eq!(count(&c, "files"), 0, "removed once every member has it");
    assert_eq!(count(&c, "file_chunks"), 0);
}

/// Alice's library client and end-to-end state (her keys from her key files).
fn alice(c: &Cluster) -> (Client, E2e) {
    let store = Keystore::new(&c.home(), "alice");
    let identity = store.load_identity("password-alice").unwrap();
    let client = c.login("alice");
    let e2e = E2e::new(
        "alice",
        identity,
        store,
        Directory::new(&c.balancer_addr, &c.transport, client.session(), None),
    )
    .unwrap();
    (client, e2e)
}

#[test]
fn hostile_file_names_are_saved_safely_inside_downloads() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    let (client, mut e2e) = alice(&c);
    let names = [
        "../../x",
        "/etc/passwd",
        ".bashrc",
        "",
        "..",
        "a\nb\u{1b}[2J.txt",
    ];
    for name in names {
        let data = format!("contents of {name:?}");
        fastchat::client::files::send_from(
            &client,
            &mut e2e,
            Target::User("bob"),
            name,
            data.len() as u64,
            || Ok(std::io::Cursor::new(data.clone().into_bytes())),
        )
        .unwrap();
    }
    let out = c.run("bob", &["recv"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.lines().len(), names.len(), "{out:?}");
    let dl = downloads(&c, "bob");
    assert_eq!(
        listing(&dl),
        [
            "a\\nb\\u{1b}[2J.txt",
            "bashrc",
            "file",
            "file (1)",
            "passwd",
            "x"
        ]
    );
    for (name, line) in names.iter().zip(out.lines()) {
        let path = PathBuf::from(line.split_once(" -> ").unwrap().1);
        assert_eq!(path.parent(), Some(dl.as_path()), "{line}");
        let data = std::fs::read_to_string(&path).unwrap();
        assert_eq!(data, format!("contents of {name:?}"));
    }
    assert!(
        !out.stdout.contains('\u{1b}'),
        "control characters are escaped"
    );
    // Nothing was written outside the downloads folder.
    assert!(!c.home().join("x").exists());
    assert!(!c.home().join("bob").join("x").exists());
    assert!(!c.home().join("bob").join(".bashrc").exists());
}

#[test]
fn an_oversize_file_is_refused_before_upload() {
    let mut c = Cluster::start(0);
    c.add_server_with(&["--max-file-size", "1M"]);
    c.signup("alice");
    c.signup("bob");
    let big = random_file(c.dir.path(), "big.iso", 2 * MIB);
    let out = c.run("alice", &["send-file", "bob", big.to_str().unwrap()]);
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(
        out.stderr.trim_end(),
        "fastchat: error: big.iso is 2.0 MiB, over the server's limit of 1.0 MiB: nothing was sent"
    );
    assert_eq!(count(&c, "files"), 0);
    assert_eq!(count(&c, "messages"), 0);
    // The server enforces it too, whatever a client claims.
    let (client, _) = alice(&c);
    let err = client.file_begin(2 * MIB as u64, 8).unwrap_err();
    assert!(
        err.to_string()
            .contains("over this server's limit of 1048576 bytes"),
        "{err}"
    );
    // At the limit is fine.
    let ok = random_file(c.dir.path(), "ok.bin", MIB);
    let out = c.run("alice", &["send-file", "bob", ok.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{out:?}");
    let missing = c.run("alice", &["send-file", "bob", "/nonexistent/file"]);
    assert_eq!(missing.code, 1);
    assert!(missing
        .stderr
        .starts_with("fastchat: error: cannot read /nonexistent/file"));
}

/// Waits until `check` holds, failing after `LIMIT`.
fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !check() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_interrupted_upload_leaves_nothing_stored_and_the_sender_can_retry() {
    let mut c = Cluster::start(0);
    // The first connection through the proxy (alice's) stalls after 1 MiB of upload.
    let proxy = GateProxy::bind(0, Gate::Up, MIB);
    let real = c.add_server_at(&proxy.addr, &[]);
    proxy.forward_to(&real);
    c.signup("alice");
    c.signup("bob");
    let file = random_file(c.dir.path(), "video.mp4", 3 * MIB);
    let mut sender = c.spawn("alice", &["send-file", "bob", file.to_str().unwrap()]);
    wait_until("part of the upload is stored", || {
        count(&c, "file_chunks") >= 2
    });
    assert_eq!(c.count("SELECT count(*) FROM files WHERE NOT complete"), 1);
    sender.kill9();
    wait_until("the unfinished upload is deleted", || {
        count(&c, "files") == 0 && count(&c, "file_chunks") == 0
    });
    assert_eq!(count(&c, "messages"), 0, "nothing was offered to bob");
    assert_eq!(c.run("bob", &["recv"]).stdout, "");
    // The sender tries again (a new connection, not held) and it goes through.
    let out = c.run("alice", &["send-file", "bob", file.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{out:?}");
    let out = c.run("bob", &["recv"]);
    let got = saved_path(out.stdout.trim_end(), "alice sent video.mp4 (3.0 MiB) -> ");
    assert!(std::fs::read(got).unwrap() == std::fs::read(&file).unwrap());
}

#[test]
fn an_interrupted_download_leaves_nothing_half_saved_and_the_next_recv_completes_it() {
    let mut c = Cluster::start(0);
    // Connection 0 is alice sending; connection 1 (bob's first recv) stalls after 1 MiB.
    let proxy = GateProxy::bind(1, Gate::Down, MIB);
    let real = c.add_server_at(&proxy.addr, &[]);
    proxy.forward_to(&real);
    c.signup("alice");
    c.signup("bob");
    let file = random_file(c.dir.path(), "album.zip", 3 * MIB);
    let out = c.run("alice", &["send-file", "bob", file.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{out:?}");
    let dl = downloads(&c, "bob");
    let mut receiver = c.spawn("bob", &["recv"]);
    wait_until("part of the file is written", || {
        listing(&dl).iter().any(|n| {
            n.starts_with(".incoming-")
                && std::fs::metadata(dl.join(n)).map(|m| m.len()).unwrap_or(0) > 0
        })
    });
    receiver.kill9();
    // Only a hidden partial file, which the next run clears.
    assert!(listing(&dl).iter().all(|n| n.starts_with(".incoming-")));
    assert_eq!(count(&c, "messages"), 1, "not acknowledged: still queued");
    let out = c.run("bob", &["recv"]);
    assert_eq!(out.code, 0, "{out:?}");
    let got = saved_path(out.stdout.trim_end(), "alice sent album.zip (3.0 MiB) -> ");
    assert!(std::fs::read(got).unwrap() == std::fs::read(&file).unwrap());
    assert_eq!(listing(&dl), ["album.zip"], "the partial file is gone");
    assert_eq!(count(&c, "files"), 0);
}

#[test]
fn a_corrupted_file_is_rejected_and_not_saved() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    let file = random_file(c.dir.path(), "doc.pdf", MIB + 10);
    c.run("alice", &["send-file", "bob", file.to_str().unwrap()]);
    // A hostile server flips a byte of the last chunk.
    let sql = c.sql();
    let last = "(SELECT max(idx) FROM file_chunks)";
    let mut data: Vec<u8> = sql.one(
        &format!("SELECT data FROM file_chunks WHERE idx = {last}"),
        &[],
    );
    data[20] ^= 0xff;
    let n = sql.exec(
        &format!("UPDATE file_chunks SET data = ?1 WHERE idx = {last}"),
        &[&data],
    );
    assert_eq!(n, 1);
    let out = c.run("bob", &["recv"]);
    assert_eq!(out.stdout, "", "{out:?}");
    assert!(
        out.stderr
            .contains("chunk 4 of doc.pdf failed authentication"),
        "{out:?}"
    );
    assert_eq!(listing(&downloads(&c, "bob")), Vec::<String>::new());
}

#[test]
fn chat_mode_sends_and_saves_files() {
    let c = Cluster::start_with(2, "round-robin");
    c.signup("alice");
    c.signup("bob");
    let mut alice = c.spawn("alice", &["chat"]);
    let bob = c.spawn("bob", &["chat"]);
    assert!(alice.line().starts_with("logged in as alice"));
    assert!(bob.line().starts_with("logged in as bob"));
    let image = random_file(c.dir.path(), "cat.jpg", 70 * 1024);
    alice.type_line(&format!("/file bob {}", image.display()));
    let sent = alice.line();
    assert!(
        sent.starts_with("sent cat.jpg (70.0 KiB) to bob as message "),
        "{sent}"
    );
    let got = saved_path(&bob.line(), "alice sent cat.jpg (70.0 KiB) -> ");
    assert!(std::fs::read(got).unwrap() == std::fs::read(&image).unwrap());
    alice.type_line("/file bob /no/such/file");
    alice.type_line("/quit");
    assert_eq!(alice.wait_exit(LIMIT).and_then(|s| s.code()), Some(0));
}

#[test]
fn format_characters_are_shown_escaped_in_text_and_file_names() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    // Shown raw, U+202E would make this read "invoiceexe.pdf".
    let tricky = "invoice\u{202E}fdp.exe";
    let path = c.dir.path().join(tricky);
    std::fs::write(&path, b"MZ not really").unwrap();
    let out = c.run("alice", &["send-file", "bob", path.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{out:?}");
    c.send(
        "alice",
        "bob",
        "see the \u{202E}fdp.exe\u{202C} and a\u{200B}b",
    );
    let out = c.run("bob", &["recv"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        !out.stdout.contains('\u{202E}') && !out.stdout.contains('\u{200B}'),
        "{:?}",
        out.stdout
    );
    assert!(
        out.stdout.contains("invoice\\u{202e}fdp.exe"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("alice: see the \\u{202e}fdp.exe\\u{202c} and a\\u{200b}b"),
        "{}",
        out.stdout
    );
    let downloads = c.home().join("bob").join("downloads");
    let saved: Vec<String> = std::fs::read_dir(&downloads)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(saved, ["invoice\\u{202e}fdp.exe"]);
}

#[test]
fn a_large_file_is_offered_and_saved_only_when_asked_for() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    let big = random_file(c.dir.path(), "video.bin", 40 * 1024);
    let out = c.run("alice", &["send-file", "bob", big.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{out:?}");
    c.send("alice", "bob", "it is big");
    let recv = |args: &[&str]| {
        let mut cmd = c.cmd("bob");
        cmd.env("FASTCHAT_AUTO_DOWNLOAD", "10K").args(args);
        common::run_limited(&mut cmd)
    };
    // Offered, not saved; offered again until taken; the text is shown once.
    let out = recv(&["recv"]);
    assert_eq!(out.code, 0, "{out:?}");
    let lines = out.lines();
    assert_eq!(lines.len(), 2, "{out:?}");
    let id: i64 = lines[0]
        .strip_prefix("alice offers video.bin (40.0 KiB): fastchat get ")
        .unwrap_or_else(|| panic!("{out:?}"))
        .parse()
        .unwrap();
    assert_eq!(lines[1], "alice: it is big");
    assert!(listing(&downloads(&c, "bob")).is_empty());
    let again = recv(&["recv"]);
    assert_eq!(again.lines(), [lines[0]], "still waiting");
    // Taken on request, checked like any file.
    let out = recv(&["get", &id.to_string()]);
    assert_eq!(out.code, 0, "{out:?}");
    let got = saved_path(out.lines()[0], "alice sent video.bin (40.0 KiB) -> ");
    assert!(std::fs::read(&got).unwrap() == std::fs::read(&big).unwrap());
    assert_eq!(recv(&["recv"]).stdout, "", "taken");
    assert_eq!(count(&c, "files"), 0);
    let out = recv(&["get", &id.to_string()]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr
            .contains(&format!("no message {id} waiting for you")),
        "{out:?}"
    );
}

#[test]
fn in_chat_an_offered_file_is_saved_with_get() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    let mut cmd = c.cmd("bob");
    cmd.env("FASTCHAT_AUTO_DOWNLOAD", "1K").arg("chat");
    let mut bob = common::Proc::spawn("bob", &mut cmd);
    assert!(bob.line().starts_with("logged in as bob"));
    let file = random_file(c.dir.path(), "notes.txt", 5000);
    assert_eq!(
        c.run("alice", &["send-file", "bob", file.to_str().unwrap()])
            .code,
        0
    );
    let offer = bob.line();
    let id = offer
        .strip_prefix("alice offers notes.txt (4.9 KiB): fastchat get ")
        .unwrap_or_else(|| panic!("{offer:?}"))
        .to_string();
    bob.type_line("/get 999999");
    bob.type_line(&format!("/get {id}"));
    let saved = bob.line();
    let got = saved_path(&saved, "alice sent notes.txt (4.9 KiB) -> ");
    assert!(std::fs::read(&got).unwrap() == std::fs::read(&file).unwrap());
    bob.type_line("/quit");
    assert_eq!(bob.wait_exit(common::LIMIT).and_then(|s| s.code()), Some(0));
    assert_eq!(count(&c, "files"), 0, "taken from the queue");
}
