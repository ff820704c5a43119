//! The interactive client on a real terminal, driven through tmux the way a person would:
//! typing, reading the screen, Ctrl-C.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Cluster, LIMIT};

/// A tmux server of this test's own (its own socket), stopped by its PID when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    /// Starts `command` in a 100 x 24 terminal.
    fn start(name: &str, env: &[(&str, String)], command: &str) -> Tmux {
        Tmux::start_sized(name, 100, env, command)
    }

    /// Starts `command` in a `cols` x 24 terminal, on a tmux server of its own.
    fn start_sized(name: &str, cols: u32, env: &[(&str, String)], command: &str) -> Tmux {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let t = Tmux {
            socket: format!("fastchat-test-{}-{n}-{name}", std::process::id()),
        };
        let mut cmd = Command::new("tmux");
        cmd.args([
            "-L",
            &t.socket,
            "new-session",
            "-d",
            "-x",
            &cols.to_string(),
            "-y",
            "24",
        ]);
        for (k, v) in env {
            cmd.args(["-e", &format!("{k}={v}")]);
        }
        let status = cmd
            .arg(command)
            .status()
            .expect("tmux is installed (.ci/run)");
        assert!(status.success());
        t
    }

    fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("tmux");
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Types keys (tmux key names, such as `Enter` or `C-c`, or literal text with `-l`).
    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys"];
        args.extend_from_slice(keys);
        self.tmux(&args);
    }

    fn text(&self, text: &str) {
        self.tmux(&["send-keys", "-l", text]);
    }

    /// The screen's lines, without trailing blank ones.
    fn screen(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .tmux(&["capture-pane", "-p"])
            .lines()
            .map(|l| l.trim_end().to_string())
            .collect();
        while lines.last().is_some_and(|l| l.is_empty()) {
            lines.pop();
        }
        lines
    }

    /// Waits until the screen satisfies `check`, failing after `LIMIT`.
    fn wait(&self, what: &str, check: impl Fn(&[String]) -> bool) -> Vec<String> {
        let deadline = Instant::now() + LIMIT;
        loop {
            let screen = self.screen();
            if check(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "never saw {what}; screen:\n{}",
                screen.join("\n")
            );
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    fn wait_for(&self, text: &str) -> Vec<String> {
        self.wait(text, |s| s.iter().any(|l| l.contains(text)))
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let pid = self.tmux(&["display-message", "-p", "#{pid}"]);
        if let Ok(pid) = pid.trim().parse::<u32>() {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
    }
}

fn env_for(c: &Cluster, user: &str) -> Vec<(&'static str, String)> {
    vec![
        ("FASTCHAT_BALANCER", c.balancer_addr.clone()),
        ("FASTCHAT_HOME", c.home().to_string_lossy().to_string()),
        ("FASTCHAT_USER", user.to_string()),
        ("FASTCHAT_PASSWORD", format!("password-{user}")),
    ]
}

#[test]
fn chat_on_a_terminal_prints_above_the_prompt_and_keeps_what_is_typed() {
    let c = Cluster::start_with(2, "round-robin");
    for u in ["alice", "bob", "carol"] {
        c.signup(u);
    }
    let bin = common::bin("fastchat");
    let t = Tmux::start(
        "alice",
        &env_for(&c, "alice"),
        // The shell says how the client ended, on the screen.
        &format!(
            "sh -c '{} chat --no-time; echo exited with $?; sleep 60'",
            bin.display()
        ),
    );
    t.wait_for("logged in as alice on server ");
    t.wait("the prompt", |s| s.last().is_some_and(|l| l == "alice>"));

    // Half a command typed, then a message comes in.
    t.text("/msg bob hel");
    t.wait_for("alice> /msg bob hel");
    c.send("bob", "alice", "hi alice, are you there?");
    // (bob's coming and going, as his command logs in and out, may be shown too.)
    let screen = t.wait("the message above the prompt", |s| {
        s.len() >= 2
            && s.iter().any(|l| l == "bob: hi alice, are you there?")
            && s[s.len() - 1] == "alice> /msg bob hel"
    });
    assert_eq!(
        screen.iter().filter(|l| l.contains("/msg bob hel")).count(),
        1,
        "the typed text is shown once, after the message: {screen:?}"
    );
    // Finishing the line sends what was typed, whole.
    t.text("lo there");
    t.keys(&["Enter"]);
    t.wait_for("-> bob: hello there");
    assert_eq!(c.run("bob", &["recv"]).lines(), ["alice: hello there"]);

    // /help lists every command.
    t.text("/help");
    t.keys(&["Enter"]);
    let screen = t.wait_for("/quit");
    for command in [
        "/msg USER TEXT",
        "/file USER PATH",
        "/who",
        "/group send GROUP TEXT",
    ] {
        assert!(
            screen.iter().any(|l| l.contains(command)),
            "{command} in /help: {screen:?}"
        );
    }

    // /who: carol is online (chatting from a pipe).
    let mut carol = c.spawn("carol", &["chat"]);
    assert!(carol.line().starts_with("logged in as carol"));
    c.wait_online("carol", 1);
    t.text("/who");
    t.keys(&["Enter"]);
    t.wait_for("online: carol");

    // A mistyped command gets a hint; a plain line says how to send.
    t.text("/mgs bob oops");
    t.keys(&["Enter"]);
    t.wait_for("error: unknown command /mgs; did you mean /msg? (/help lists them)");
    t.text("just words");
    t.keys(&["Enter"]);
    t.wait_for("error: to send, type /msg USER TEXT, or /query USER first");
    t.text("/msg nobody hi");
    t.keys(&["Enter"]);
    t.wait_for("error: no such user: nobody");
    t.text("/query alice");
    t.keys(&["Enter"]);
    t.wait_for("error: you cannot send a message to yourself");

    // Ctrl-C clears the line; Ctrl-D on an empty line leaves cleanly: exit status 0, the
    // session given up.
    t.text("never sent");
    t.keys(&["C-c"]);
    t.wait("the line cleared", |s| {
        s.last().is_some_and(|l| l == "alice>")
    });
    t.keys(&["C-d"]);
    t.wait_for("exited with 0");
    c.wait_online("alice", 0);
    carol.type_line("/quit");
    assert_eq!(carol.wait_exit(LIMIT).and_then(|s| s.code()), Some(0));
}

/// A chat on a terminal of `cols` columns, as `user`, with `args` after `chat`.
fn chat_in_tmux(c: &Cluster, user: &str, args: &str, cols: u32) -> Tmux {
    let bin = common::bin("fastchat");
    let mut env = env_for(c, user);
    env.push(("FASTCHAT_CA", c.ca().to_string_lossy().to_string()));
    let t = Tmux::start_sized(
        user,
        cols,
        &env,
        &format!(
            "sh -c '{} chat {args}; echo exited with $?; sleep 60'",
            bin.display()
        ),
    );
    t.wait_for(&format!("logged in as {user} on server "));
    t
}

/// The messages `user` has waiting, as `recv` prints them (it sends receipts).
fn received(c: &Cluster, user: &str) -> Vec<String> {
    let out = common::run_limited(c.cmd_with_receipts(user).arg("recv"));
    assert_eq!(out.code, 0, "{out:?}");
    out.lines().iter().map(|l| l.to_string()).collect()
}

#[test]
fn lines_typed_ahead_or_pasted_are_all_sent_in_order() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    let t = chat_in_tmux(&c, "alice", "--no-time bob", 100);
    t.wait_for("now talking to bob");
    t.wait("the prompt", |s| {
        s.last().is_some_and(|l| l == "[bob] alice>")
    });

    // Typed ahead: four lines in one burst, faster than any of them is sent.
    let mut burst = Vec::new();
    for i in 1..=4 {
        burst.push(format!("/msg bob typed {i}"));
        burst.push("Enter".to_string());
    }
    let mut args = vec!["send-keys"];
    for (i, k) in burst.iter().enumerate() {
        if i % 2 == 0 {
            args.extend(["-l", k.as_str()]);
            t.tmux(&args);
            args = vec!["send-keys"];
        } else {
            t.tmux(&["send-keys", "Enter"]);
        }
    }
    t.wait_for("-> bob: typed 4");

    // A bracketed paste of 20 lines: 20 messages, in order, in the current conversation.
    let pasted: Vec<String> = (1..=20).map(|i| format!("pasted line {i}")).collect();
    t.tmux(&["set-buffer", "-b", "p", &format!("{}\n", pasted.join("\n"))]);
    t.tmux(&["paste-buffer", "-p", "-d", "-b", "p"]);
    t.wait_for("-> bob: pasted line 20");

    let mut expected: Vec<String> = (1..=4).map(|i| format!("alice: typed {i}")).collect();
    expected.extend(pasted.iter().map(|l| format!("alice: {l}")));
    assert_eq!(received(&c, "bob"), expected);
}

#[test]
fn conversations_unread_counts_completion_and_times() {
    let c = Cluster::start(1);
    for u in ["alice", "bob", "carol"] {
        c.signup(u);
    }
    c.group_ok("alice", &["create", "team"]);
    c.group_ok("alice", &["add", "team", "bob"]);
    let t = chat_in_tmux(&c, "alice", "", 100);
    // Every line has the local time.
    let screen = t.wait_for("logged in as alice");
    let first = screen.iter().find(|l| l.contains("logged in")).unwrap();
    assert!(
        !first.starts_with(char::is_numeric),
        "the banner is not a chat line"
    );

    // Tab completes commands and names.
    t.text("/que");
    t.keys(&["Tab"]);
    t.wait("the command completed", |s| {
        s.last().is_some_and(|l| l.ends_with("alice> /query"))
    });
    t.text("bo");
    t.keys(&["Tab"]);
    t.wait("the name completed", |s| {
        s.last().is_some_and(|l| l.ends_with("alice> /query bob"))
    });
    t.keys(&["Enter"]);
    let screen = t.wait_for("now talking to bob");
    let line = screen
        .iter()
        .find(|l| l.contains("now talking to bob"))
        .unwrap();
    assert!(
        line.len() > 6 && line.as_bytes()[2] == b':' && line[..2].parse::<u8>().is_ok(),
        "HH:MM first: {line:?}"
    );
    t.wait("the conversation in the prompt", |s| {
        s.last().is_some_and(|l| l == "[bob] alice>")
    });

    // Plain text goes to the conversation.
    t.text("plain words to bob");
    t.keys(&["Enter"]);
    t.wait_for("-> bob: plain words to bob");
    assert_eq!(
        received(&c, "bob"),
        [
            "[alice/team] * alice added bob",
            "alice: plain words to bob"
        ]
    );

    // Messages from elsewhere are shown, and counted until their conversation is entered.
    c.send("carol", "alice", "psst");
    c.group_ok("bob", &["send", "team", "hello team"]);
    t.wait_for("carol: psst");
    t.wait("two unread in the prompt", |s| {
        s.last()
            .is_some_and(|l| l == "[bob] alice (2 unread, /list)>")
    });
    t.text("/list");
    t.keys(&["Enter"]);
    t.wait_for("carol: 1 unread");
    t.wait_for("alice/team: 1 unread");
    t.text("/join te");
    t.keys(&["Tab"]);
    t.wait("the group completed", |s| {
        s.last().is_some_and(|l| l.ends_with("/join alice/team"))
    });
    t.keys(&["Enter"]);
    t.wait_for("now talking to alice/team (1 unread above)");
    t.wait("one unread left", |s| {
        s.last()
            .is_some_and(|l| l == "[alice/team] alice (1 unread, /list)>")
    });
    t.text("to the team");
    t.keys(&["Enter"]);
    t.wait_for("stored message");
    let bob = received(&c, "bob");
    assert!(
        bob.contains(&"[alice/team] alice: to the team".to_string()),
        "{bob:?}"
    );
    t.text("/quit");
    t.keys(&["Enter"]);
    t.wait_for("exited with 0");
}

#[test]
fn a_long_line_in_a_narrow_window_leaves_nothing_behind() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    let t = chat_in_tmux(&c, "alice", "--no-time", 30);
    t.wait("the prompt", |s| s.last().is_some_and(|l| l == "alice>"));
    // "alice> " and 73 characters: the input wraps over three rows of 30, the last of 20.
    let long = format!("/msg bob {}", "x".repeat(64));
    t.text(&long);
    t.wait("the line wrapped", |s| {
        s.len() >= 3 && s[s.len() - 1] == "x".repeat(20)
    });
    for i in 1..=3 {
        c.send("bob", "alice", &format!("incoming {i}"));
        t.wait_for(&format!("bob: incoming {i}"));
    }
    let screen = t.wait("the input drawn once, below the messages", |s| {
        s.len() >= 6 && s[s.len() - 1] == "x".repeat(20) && s[s.len() - 4] == "bob: incoming 3"
    });
    let xs = screen.iter().filter(|l| l.contains("xxx")).count();
    assert_eq!(xs, 3, "three rows of input, no stale fragment: {screen:?}");
    t.keys(&["Enter"]);
    t.wait_for("-> bob: xxxx");
    let screen = t.wait("an empty prompt", |s| {
        s.last().is_some_and(|l| l == "alice>")
    });
    assert_eq!(
        screen
            .iter()
            .filter(|l| l.starts_with("alice> /msg"))
            .count(),
        0,
        "no input left on screen: {screen:?}"
    );
}

#[test]
fn a_file_uploads_in_the_background_while_messages_print() {
    // A server that takes 40 requests a second: the 192 chunks take about five seconds.
    let mut c = Cluster::start(0);
    c.add_server_with(&["--max-rate", "40"]);
    c.signup("alice");
    c.signup("bob");
    let big = c.dir.path().join("big.bin");
    // 48 MiB of varied bytes: long enough to take seconds.
    let mut data = Vec::with_capacity(48 << 20);
    let mut x: u64 = 1;
    while data.len() < 48 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(&big, &data).unwrap();
    let t = chat_in_tmux(&c, "alice", "--no-time", 100);
    t.wait("the prompt", |s| s.last().is_some_and(|l| l == "alice>"));
    t.text(&format!("/file bob {}", big.display()));
    t.keys(&["Enter"]);
    // The upload reports progress; meanwhile commands run and messages print.
    t.wait_for("* big.bin: ");
    c.send("bob", "alice", "during the upload");
    t.text("/who");
    t.keys(&["Enter"]);
    let screen = t.wait_for("sent big.bin (48.0 MiB) to bob as message");
    let at = |needle: &str| {
        screen
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle} on screen: {screen:?}"))
    };
    assert!(
        at("bob: during the upload") < at("sent big.bin"),
        "{screen:?}"
    );
    // The answer to /who, whichever it is: bob's one-shot client may still be counted
    // online for a moment after it exits (its presence row goes in the next commit).
    let who = screen
        .iter()
        .position(|l| l.contains("nobody else is online") || l.starts_with("online: "))
        .unwrap_or_else(|| panic!("the answer to /who on screen: {screen:?}"));
    assert!(who < at("sent big.bin"), "{screen:?}");
    let out = c.run("bob", &["recv"]);
    // Over the 16 MiB auto-download limit: offered, to fetch with `get`.
    assert!(
        out.stdout
            .starts_with("alice offers big.bin (48.0 MiB): fastchat get "),
        "{out:?}"
    );
}

#[test]
fn contacts_coming_and_going_are_shown_and_who_forgets_dead_servers() {
    let mut c = Cluster::start(2);
    for u in ["alice", "bob", "carol"] {
        c.signup(u);
    }
    // alice has written to bob (pinned: a contact); carol is in her group.
    c.send("alice", "bob", "hi");
    c.group_ok("alice", &["create", "team"]);
    c.group_ok("alice", &["add", "team", "carol"]);
    let t = chat_in_tmux(&c, "alice", "--no-time", 100);
    t.wait("the prompt", |s| s.last().is_some_and(|l| l == "alice>"));

    // bob comes online, then leaves.
    let mut bob = c.spawn("bob", &["recv", "--wait", "60"]);
    t.wait_for("* bob is online");
    bob.interrupt();
    t.wait_for("* bob is offline");

    // carol is on a server that dies: she is offline at once for everyone (not shown by
    // /who), although her presence row stays until that server is forgotten.
    // (Her client is stopped first, so that it cannot move to another server.)
    let mut carol = c.spawn("carol", &["recv", "--wait", "60"]);
    t.wait_for("* carol is online");
    let carol_server = c.count("SELECT server_id FROM presence WHERE user = 'carol'") as u64;
    let stopped = Command::new("kill")
        .args(["-STOP", &carol.pid().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    let index = c.index_of(carol_server);
    c.servers[index].kill9();
    t.wait_for("* carol is offline");
    carol.kill9();
    t.text("/who");
    t.keys(&["Enter"]);
    t.wait_for("nobody else is online");

    // The balancer restarts before it forgot that server: the new one, which never heard of
    // it, forgets its clients after a while all the same.
    c.balancer.kill9();
    c.restart_balancer();
    let deadline = Instant::now() + LIMIT;
    while c.count(&format!(
        "SELECT count(*) FROM presence WHERE server_id = {carol_server}"
    )) > 0
    {
        assert!(Instant::now() < deadline, "the dead server's rows stayed");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn senders_see_their_messages_stored_delivered_and_read() {
    let c = Cluster::start(1);
    for u in ["alice", "bob", "carol"] {
        c.signup(u);
    }
    c.send("carol", "bob", "so bob knows carol");
    assert_eq!(received(&c, "bob"), ["carol: so bob knows carol"]);
    let alice = chat_in_tmux(&c, "alice", "--no-time bob", 100);
    alice.wait("the prompt", |s| {
        s.last().is_some_and(|l| l == "[bob] alice>")
    });
    // Stored: ✓.
    alice.text("first");
    alice.keys(&["Enter"]);
    alice.wait_for("-> bob: first ✓");
    // bob reads it with recv: read.
    assert_eq!(received(&c, "bob"), ["alice: first"]);
    alice.wait_for("✓✓ bob read “first”");

    // bob chats with carol: alice's next message reaches him, but is not read...
    let bob = chat_in_tmux(&c, "bob", "--no-time carol", 100);
    bob.wait("bob's prompt", |s| {
        s.last().is_some_and(|l| l == "[carol] bob>")
    });
    alice.text("second");
    alice.keys(&["Enter"]);
    bob.wait_for("alice: second");
    alice.wait_for("✓✓ bob got “second”");
    assert!(
        !alice.screen().iter().any(|l| l.contains("read “second”")),
        "not read yet"
    );
    // ... until he goes to that conversation.
    bob.text("/query alice");
    bob.keys(&["Enter"]);
    bob.wait_for("now talking to alice (1 unread above)");
    alice.wait_for("✓✓ bob read “second”");
}

#[test]
fn receipts_can_be_turned_off() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    let alice = chat_in_tmux(&c, "alice", "--no-time bob", 100);
    alice.wait("the prompt", |s| {
        s.last().is_some_and(|l| l == "[bob] alice>")
    });
    alice.text("private");
    alice.keys(&["Enter"]);
    alice.wait_for("-> bob: private ✓");
    let out = common::run_limited(c.cmd_with_receipts("bob").args(["recv", "--no-receipts"]));
    assert_eq!(out.stdout, "alice: private\n");
    // A message bob reads with receipts on comes after: its receipt is the only one.
    alice.text("public");
    alice.keys(&["Enter"]);
    alice.wait_for("-> bob: public ✓");
    assert_eq!(received(&c, "bob"), ["alice: public"]);
    let screen = alice.wait_for("✓✓ bob read “public”");
    assert!(
        !screen.iter().any(|l| l.contains("“private”")),
        "{screen:?}"
    );
}

#[test]
fn history_is_kept_encrypted_and_shown_in_the_chat_and_by_the_command() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    c.send("alice", "bob", "the secret plan");
    c.send("bob", "alice", "sounds good");
    assert_eq!(c.run("alice", &["recv"]).stdout, "bob: sounds good\n");
    // The file holds no plaintext.
    let file = c.home().join("alice").join("history");
    let raw = std::fs::read(&file).unwrap();
    assert!(!raw.windows(6).any(|w| w == b"secret"));

    // The command: oldest first, JSON too.
    let out = c.run("alice", &["history", "bob"]);
    assert_eq!(out.code, 0, "{out:?}");
    let lines = out.lines();
    assert_eq!(lines.len(), 2, "{out:?}");
    assert!(lines[0].ends_with(" alice: the secret plan"), "{out:?}");
    assert!(lines[1].ends_with(" bob: sounds good"), "{out:?}");
    let out = c.run("alice", &["history", "bob", "--limit", "1", "--json"]);
    let e: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(
        (&e["from"], &e["text"]),
        (&"bob".into(), &"sounds good".into())
    );

    // The chat shows the last lines when a conversation starts, and /history more.
    let t = chat_in_tmux(&c, "alice", "--no-time bob", 100);
    t.wait_for("now talking to bob");
    t.wait_for("alice: the secret plan");
    t.wait_for("bob: sounds good");
    t.text("more to say");
    t.keys(&["Enter"]);
    t.wait_for("-> bob: more to say");
    t.text("/history 1");
    t.keys(&["Enter"]);
    let screen = t.wait("the last line again", |s| {
        s.iter()
            .filter(|l| l.ends_with("alice: more to say"))
            .count()
            == 1
    });
    assert!(
        screen.iter().any(|l| l.contains("-> bob: more to say")),
        "{screen:?}"
    );
    // bob's history is his own: what he sent (he has not read alice's message yet).
    let out = c.run("bob", &["history", "alice"]);
    assert_eq!(out.lines().len(), 1, "{out:?}");
    assert!(out.stdout.ends_with(" bob: sounds good\n"), "{out:?}");
}

#[test]
fn a_member_removed_while_chatting_is_told() {
    let c = Cluster::start(1);
    for u in ["alice", "carol"] {
        c.signup(u);
    }
    c.group_ok("alice", &["create", "team"]);
    c.group_ok("alice", &["add", "team", "carol"]);
    let t = chat_in_tmux(&c, "carol", "--no-time team", 100);
    t.wait_for("now talking to alice/team");
    t.wait("the prompt", |s| {
        s.last().is_some_and(|l| l == "[alice/team] carol>")
    });
    c.group_ok("alice", &["remove", "team", "carol"]);
    t.wait_for("* alice removed you from alice/team");
}

#[test]
fn a_message_that_waited_shows_when_it_was_sent() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    c.send("bob", "alice", "written while you were away");
    // Two days ago, as the server says.
    let two_days = 2 * 24 * 3600 * 1000;
    c.sql().exec(
        "UPDATE messages SET sent_at = sent_at - ?1",
        &[&(two_days as i64)],
    );
    let then: i64 = c.count("SELECT sent_at FROM messages");
    use chrono::TimeZone;
    let day = chrono::Local
        .timestamp_millis_opt(then)
        .unwrap()
        .format("%Y-%m-%d %H:%M")
        .to_string();
    let t = chat_in_tmux(&c, "alice", "", 100);
    let screen = t.wait_for("bob: written while you were away");
    let line = screen
        .iter()
        .find(|l| l.contains("written while you were away"))
        .unwrap();
    assert!(line.starts_with(&day), "{line:?} starts with {day}");
}

/// The chat, like `recv`, holds a group message that came before its sender's key and shows
/// it when the key comes.
#[test]
fn a_group_message_before_its_senders_key_is_shown_in_the_chat() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    c.group_ok("alice", &["create", "team"]);
    c.group_ok("alice", &["add", "team", "bob"]);
    c.group_ok("alice", &["send", "team", "after its key"]);
    let key = c.queued_to("bob")[0].id;
    let newest = c.count("SELECT max(id) FROM messages");
    c.sql().exec(
        "UPDATE messages SET id = ?1 WHERE id = ?2",
        &[&(newest + 1000), &key],
    );
    let mut bob = c.spawn("bob", &["chat"]);
    assert!(bob.line().starts_with("logged in as bob"));
    let deadline = Instant::now() + LIMIT;
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let Some(line) = bob.line_within(Duration::from_secs(1)) else {
            continue;
        };
        seen.push(line.clone());
        if line.contains("[alice/team] alice: after its key") {
            break;
        }
    }
    assert!(
        seen.iter().any(|l| l.contains("alice: after its key")),
        "{seen:?}"
    );
    // Acknowledged once shown (the printer pays what it owes when no more is coming).
    let position = || c.count("SELECT position FROM members WHERE user = 'bob'");
    while position() < newest && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(position() >= newest, "acknowledged once shown");
    bob.type_line("/quit");
    assert_eq!(bob.wait_exit(LIMIT).and_then(|s| s.code()), Some(0));
}

#[test]
fn signup_on_a_terminal_says_a_password_is_too_short_before_asking_for_it_again() {
    let c = Cluster::start(1);
    let mut env = env_for(&c, "dave");
    env.retain(|(k, _)| *k != "FASTCHAT_PASSWORD");
    let signup = format!(
        "sh -c '{} signup dave; echo exited with $?; sleep 60'",
        common::bin("fastchat").display()
    );
    let t = Tmux::start("short", &env, &signup);
    t.wait_for("new password for dave:");
    t.text("seven77");
    t.keys(&["Enter"]);
    let screen = t.wait_for("exited with 1");
    assert!(
        screen.iter().any(|l| l.contains("at least 8 characters")),
        "{screen:?}"
    );
    assert!(
        !screen.iter().any(|l| l.contains("repeat the password")),
        "{screen:?}"
    );
    // Eight, typed twice, make the account; nothing typed is shown.
    let t = Tmux::start("long", &env, &signup);
    for prompt in ["new password for dave:", "repeat the password for dave:"] {
        t.wait_for(prompt);
        t.text("eight888");
        t.keys(&["Enter"]);
    }
    let screen = t.wait_for("exited with 0");
    assert!(!screen.iter().any(|l| l.contains("eight888")), "{screen:?}");
    assert_eq!(c.count("SELECT count(*) FROM users WHERE name = 'dave'"), 1);
}
