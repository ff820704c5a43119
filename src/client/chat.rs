//! `fastchat chat`: the interactive session. On a terminal, a line editor (rustyline) with
//! incoming messages printed above the prompt; from a pipe, one command per input line.
//!
//! ```text
//! main thread: read a line ──▶ chat_command ──▶ Client (send, /who, /group ...)
//! printer thread: Client::next ──▶ open (E2e) ──▶ print above the prompt ──▶ ack
//! ```

use std::io::{self, BufRead, IsTerminal};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::select;

use super::cli::{file_sent, login, show, take_offer, Format, GroupCmd, LoggedIn, Options, Shown};
use super::files::Target;
use super::text::one_line;
use super::Event;
use crate::crypto;
use crate::error::{Error, Result};
use crate::names;
use crate::net::Envelope;

/// The chat commands and what they do (also the `/help` text).
const CHAT_COMMANDS: &[(&str, &str)] = &[
    ("/msg USER TEXT", "send TEXT to USER"),
    (
        "/file USER PATH",
        "send the file (or image) at PATH to USER",
    ),
    ("/who", "who is online"),
    ("/get ID", "save the file offered by message ID"),
    ("/group create GROUP", "create GROUP; you are its admin"),
    ("/group add GROUP USER", "(admin) add USER to GROUP"),
    (
        "/group remove GROUP USER",
        "(admin) remove USER; the group gets a new key",
    ),
    ("/group leave GROUP", "leave GROUP"),
    (
        "/group send GROUP TEXT",
        "send TEXT to every member of GROUP",
    ),
    (
        "/group send-file GROUP PATH",
        "send the file at PATH to every member of GROUP",
    ),
    ("/group list", "your groups"),
    ("/group members GROUP", "who is in GROUP"),
    ("/help", "this list"),
    ("/quit", "leave (Ctrl-D and Ctrl-C work too)"),
];

fn chat_help() -> String {
    let mut s = String::from("commands:");
    for (usage, what) in CHAT_COMMANDS {
        s.push_str(&format!("\n  {usage:<28}{what}"));
    }
    s
}

/// ANSI styles for the terminal; plain text when `on` is false (pipes, scripts, tests).
/// `text` in an ANSI `style` when `on`, unless `NO_COLOR` is set (https://no-color.org).
fn paint(style: &str, text: &str, on: bool) -> String {
    if on && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) {
        format!("\x1b[{style}m{text}\x1b[0m")
    } else {
        text.to_string()
    }
}

/// `fastchat chat`: interactive session. On a terminal, incoming messages are printed above
/// the prompt without disturbing what is being typed; otherwise (a pipe) line by line.
pub fn chat(opts: &Options) -> Result<()> {
    let me = login(opts)?;
    let terminal = io::stdin().is_terminal() && io::stdout().is_terminal();
    let server = me.client.server();
    println!(
        "logged in as {} on server {} ({}); /help for commands",
        paint("1", me.client.user(), terminal),
        server.id,
        server.addr
    );
    if terminal {
        chat_terminal(&me, opts)
    } else {
        chat_lines(&me, opts)
    }
}

/// Receives messages until the session ends, handing each line to `print`.
fn spawn_printer(
    me: &LoggedIn,
    color: bool,
    mut print: impl FnMut(String) + Send + 'static,
) -> std::thread::JoinHandle<Result<()>> {
    let client = Arc::clone(&me.client);
    let e2e = Arc::clone(&me.e2e);
    let downloads = me.downloads.clone();
    let offers = Arc::clone(&me.offers);
    std::thread::spawn(move || -> Result<()> {
        let forever = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        while let Some(event) = client.next(forever)? {
            match event {
                Event::Message(msg) => {
                    let mut line = Vec::new();
                    match show(
                        &e2e,
                        &client,
                        &downloads,
                        &msg,
                        Format::Lines,
                        true,
                        &mut line,
                    )? {
                        Shown::Done => client.ack(&[msg.id])?,
                        // Kept queued until `/get ID`.
                        Shown::Offered => {
                            offers.lock().insert(msg.id, msg.clone());
                        }
                    }
                    let text = String::from_utf8_lossy(&line).trim_end().to_string();
                    if !text.is_empty() {
                        print(if color { colorize(&msg, &text) } else { text });
                    }
                }
                Event::Synced => {}
                Event::Failover(server) => print(paint(
                    "33",
                    &format!(
                        "* server lost; now on server {} ({})",
                        server.id, server.addr
                    ),
                    color,
                )),
            }
        }
        Ok(())
    })
}

/// Colours a message line: the group tag, the sender, notices dimmed.
fn colorize(msg: &Envelope, line: &str) -> String {
    let (tag, rest) = match &msg.group {
        Some(g) => {
            let tag = format!("[{g}] ");
            match line.strip_prefix(&tag) {
                Some(rest) => (paint("36", &tag, true), rest.to_string()),
                None => (String::new(), line.to_string()),
            }
        }
        None => (String::new(), line.to_string()),
    };
    if rest.starts_with("* ") {
        return format!("{tag}{}", paint("2", &rest, true));
    }
    match rest.strip_prefix(msg.from.as_str()) {
        Some(after) => format!("{tag}{}{after}", paint("1;32", &msg.from, true)),
        None => format!("{tag}{rest}"),
    }
}

/// Chat on a terminal: a line editor (history, editing) with incoming messages printed above
/// the prompt.
fn chat_terminal(me: &LoggedIn, opts: &Options) -> Result<()> {
    use rustyline::error::ReadlineError;
    use rustyline::ExternalPrinter;
    let editor_error = |e: ReadlineError| Error::Io(io::Error::other(e.to_string()));
    let mut editor = rustyline::DefaultEditor::new().map_err(editor_error)?;
    let mut printer = editor.create_external_printer().map_err(editor_error)?;
    let printer = spawn_printer(me, true, move |line| {
        let _ = printer.print(format!("{line}\n"));
    });
    // Ctrl-C as a key ends the editor below; a signal from elsewhere (kill -INT, SIGTERM)
    // cannot interrupt it, so it ends the session here: logout, terminal back to normal.
    {
        let client = Arc::clone(&me.client);
        let interrupt = opts.interrupt.clone();
        let kept = me.kept;
        std::thread::spawn(move || {
            if interrupt.recv().is_ok() {
                if kept {
                    client.close();
                } else {
                    let _ = client.logout();
                }
                let _ = std::process::Command::new("stty").arg("sane").status();
                println!();
                std::process::exit(0);
            }
        });
    }
    let prompt = format!("{}> ", paint("1", me.client.user(), true));
    loop {
        if printer.is_finished() {
            return match printer.join() {
                Ok(Err(e)) => Err(e),
                _ => Ok(()),
            };
        }
        match editor.readline(&prompt) {
            Ok(line) => {
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                let _ = editor.add_history_entry(line);
                match chat_command(line, me) {
                    Ok(Some(reply)) => println!("{}", paint("2", &reply, true)),
                    Ok(None) => return Ok(()),
                    Err(e) => println!(
                        "{}",
                        paint("31", &format!("error: {}", one_line(&e.to_string())), true)
                    ),
                }
            }
            Err(ReadlineError::Interrupted | ReadlineError::Eof) => return Ok(()),
            Err(e) => return Err(editor_error(e)),
        }
    }
}

/// Chat from a pipe: one command per input line, one output line per event.
fn chat_lines(me: &LoggedIn, opts: &Options) -> Result<()> {
    let printer = spawn_printer(me, false, |line| println!("{line}"));
    // Standard input is read on a thread of its own, so Ctrl-C and a lost session are noticed
    // while nothing is being typed.
    let (lines_tx, lines) = crossbeam_channel::unbounded::<io::Result<String>>();
    std::thread::spawn(move || {
        for line in io::stdin().lock().lines() {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut printer = Some(printer);
    loop {
        select! {
            recv(lines) -> line => {
                let Ok(line) = line else { return Ok(()) }; // end of input
                let line = line?;
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                match chat_command(line, me) {
                    Ok(Some(reply)) => println!("{reply}"),
                    Ok(None) => return Ok(()),
                    Err(e) => eprintln!("error: {}", one_line(&e.to_string())),
                }
            }
            recv(opts.interrupt) -> _ => return Ok(()),
            default(Duration::from_millis(200)) => {
                if printer.as_ref().is_some_and(|p| p.is_finished()) {
                    if let Some(Ok(Err(e))) = printer.take().map(|p| p.join()) {
                        return Err(e);
                    }
                    return Ok(());
                }
            }
        }
    }
}

/// Runs one chat-mode line. `Ok(None)` means quit.
fn chat_command(line: &str, me: &LoggedIn) -> Result<Option<String>> {
    let (client, e2e) = (&*me.client, &*me.e2e);
    let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
    match cmd {
        "/get" => {
            let id: i64 = rest.trim().parse().map_err(|_| {
                Error::Invalid("usage: /get ID (the number the offer shows)".into())
            })?;
            let msg = me
                .offers
                .lock()
                .remove(&id)
                .ok_or_else(|| Error::Invalid(format!("no file offered by message {id}")))?;
            let mut line = Vec::new();
            take_offer(me, &msg, Format::Lines, &mut line)?;
            Ok(Some(String::from_utf8_lossy(&line).trim_end().to_string()))
        }
        "/quit" | "/exit" => Ok(None),
        "/help" => Ok(Some(chat_help())),
        "/who" => {
            let users = client.who()?;
            let others: Vec<&String> = users.iter().filter(|u| *u != client.user()).collect();
            Ok(Some(if others.is_empty() {
                "nobody else is online".to_string()
            } else {
                format!("online: {}", join(&others))
            }))
        }
        "/msg" => {
            let (to, text) = rest
                .trim()
                .split_once(' ')
                .ok_or_else(|| Error::Invalid("usage: /msg USER TEXT".into()))?;
            names::validate("recipient", to)?;
            let text = text.trim();
            if text.is_empty() {
                return Err(Error::Invalid("empty message: nothing was sent".into()));
            }
            let client_id = crypto::random_u64()?;
            let body = e2e.lock().seal_text(to, client_id, text)?;
            client.send(to, client_id, &body, None)?;
            Ok(Some(format!("-> {to}: {}", one_line(text))))
        }
        "/file" => {
            let (to, path) = rest
                .trim()
                .split_once(' ')
                .ok_or_else(|| Error::Invalid("usage: /file USER PATH".into()))?;
            names::validate("recipient", to)?;
            let path = Path::new(path.trim());
            file_sent(client, &mut e2e.lock(), Target::User(to), path).map(|(text, _)| Some(text))
        }
        "/group" => GroupCmd::parse(rest)?
            .run(client, &mut e2e.lock())
            .map(|lines| {
                lines
                    .into_iter()
                    .map(|(text, _)| text)
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .map(Some),
        _ if cmd.starts_with('/') => Err(Error::Invalid(match closest_command(cmd) {
            Some(known) => {
                format!("unknown command {cmd}; did you mean {known}? (/help lists them)")
            }
            None => format!("unknown command {cmd}; /help lists the commands"),
        })),
        _ => Err(Error::Invalid(
            "to send, type /msg USER TEXT; /help lists the commands".into(),
        )),
    }
}

fn join(names: &[&String]) -> String {
    names
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The known command nearest to a mistyped one, if one is close (at most two edits).
fn closest_command(typed: &str) -> Option<&'static str> {
    CHAT_COMMANDS
        .iter()
        .map(|(usage, _)| usage.split(' ').next().unwrap_or(usage))
        .map(|known| (edit_distance(typed, known), known))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, known)| known)
}

/// Levenshtein distance, over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mistyped_command_gets_the_nearest_one() {
        assert_eq!(closest_command("/mgs"), Some("/msg"));
        assert_eq!(closest_command("/hlep"), Some("/help"));
        assert_eq!(closest_command("/wh"), Some("/who"));
        assert_eq!(closest_command("/launch-missiles"), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn help_lists_every_command() {
        let help = chat_help();
        for (usage, _) in CHAT_COMMANDS {
            assert!(help.contains(usage), "{usage}");
        }
    }
}
