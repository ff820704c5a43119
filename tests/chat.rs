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
        let t = Tmux {
            socket: format!("fastchat-test-{}-{name}", std::process::id()),
        };
        let mut cmd = Command::new("tmux");
        cmd.args([
            "-L",
            &t.socket,
            "new-session",
            "-d",
            "-x",
            "100",
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
        ("FASTCHAT_PASSWORD", format!("pw-{user}")),
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
            "sh -c '{} chat; echo exited with $?; sleep 60'",
            bin.display()
        ),
    );
    t.wait_for("logged in as alice on server ");
    t.wait("the prompt", |s| s.last().is_some_and(|l| l == "alice>"));

    // Half a command typed, then a message comes in.
    t.text("/msg bob hel");
    t.wait_for("alice> /msg bob hel");
    c.send("bob", "alice", "hi alice, are you there?");
    let screen = t.wait("the message above the prompt", |s| {
        s.len() >= 2
            && s[s.len() - 2] == "bob: hi alice, are you there?"
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
    t.wait_for("error: to send, type /msg USER TEXT; /help lists the commands");
    t.text("/msg nobody hi");
    t.keys(&["Enter"]);
    t.wait_for("error: no such user: nobody");

    // Ctrl-C leaves cleanly: exit status 0, the session given up.
    t.keys(&["C-c"]);
    t.wait_for("exited with 0");
    c.wait_online("alice", 0);
    carol.type_line("/quit");
    assert_eq!(carol.wait_exit(LIMIT).and_then(|s| s.code()), Some(0));
}
