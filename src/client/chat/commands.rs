//! The chat's commands, run one at a time, in the order they were entered, on the command
//! thread; and Tab completion.

use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use super::editor::Editor;
use super::{error_line, watch, Command, Conversation, Ctx, Line, Out};
use crate::client::cli::{history_line, resolve_group, take_offer, Format, GroupCmd};
use crate::client::e2e::Reached;
use crate::client::files::{self, Target};
use crate::client::receipts;
use crate::client::text::one_line;
use crate::crypto;
use crate::error::{Error, Result};
use crate::names;

/// The chat commands and what they do (also the `/help` text).
pub(super) const CHAT_COMMANDS: &[(&str, &str)] = &[
    ("/query USER", "talk to USER: plain text goes to them"),
    ("/join GROUP", "talk in GROUP: plain text goes to it"),
    ("/close", "leave the current conversation"),
    ("/list", "conversations with unread messages"),
    (
        "/history [N]",
        "the last N lines (20) of this conversation, from the local history",
    ),
    ("/msg USER TEXT", "send TEXT to USER"),
    (
        "/file USER PATH",
        "send the file (or image) at PATH to USER, in the background",
    ),
    ("/who", "who is online"),
    ("/get ID", "save the file offered by message ID"),
    ("/group create GROUP", "create GROUP; you are its admin"),
    (
        "/group add GROUP USER...",
        "(admin) add USER (or several) to GROUP",
    ),
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
    (
        "/group key-change GROUP",
        "add your key change to GROUP (after rekey, where it failed)",
    ),
    ("/help", "this list"),
    (
        "/quit",
        "leave (Ctrl-D on an empty line too; Ctrl-C clears the line)",
    ),
];

const GROUP_SUBCOMMANDS: &[&str] = &[
    "create",
    "add",
    "remove",
    "leave",
    "send",
    "send-file",
    "list",
    "members",
];

pub(super) fn chat_help() -> String {
    let mut s = String::from("commands (plain text goes to the current conversation):");
    for (usage, what) in CHAT_COMMANDS {
        s.push_str(&format!("\n  {usage:<28}{what}"));
    }
    s
}

/// The command thread: runs each entered line in order until `/quit` (or the end of input),
/// then waits for the uploads still running and says the session is over.
pub(super) fn run(ctx: &Ctx, commands: &Receiver<Command>) {
    seed_names(ctx);
    let mut uploads: Vec<JoinHandle<()>> = Vec::new();
    for command in commands.iter() {
        uploads.retain(|u| !u.is_finished());
        let line = match command {
            Command::Line(line) => line,
            Command::Quit => break,
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        match command_line(ctx, line, &mut uploads) {
            Ok(Some(lines)) => {
                let _ = ctx.out.send(Out::Lines(lines));
            }
            Ok(None) => break,
            Err(e) => ctx.say(error_line(&e)),
        }
    }
    if !uploads.is_empty() {
        ctx.say(Line::Notice(format!(
            "* waiting for {} upload(s) to finish",
            uploads.len()
        )));
        for u in uploads {
            let _ = u.join();
        }
    }
    let _ = ctx.out.send(Out::Done(Ok(())));
}

/// Names for Tab to complete (who is online, the user's groups and their members), and the
/// contacts to watch (the pinned ones, and the members of the user's groups).
fn seed_names(ctx: &Ctx) {
    let online = ctx.client.who().unwrap_or_default();
    let groups = ctx.client.group_list().unwrap_or_default();
    let mut contacts = ctx.e2e.lock().keystore().pinned_names();
    {
        let mut state = ctx.state.lock();
        state.users.extend(online);
        for g in groups {
            contacts.extend(g.members.iter().cloned());
            state.users.extend(g.members);
            state.groups.insert(g.name);
        }
        state.users.extend(contacts.iter().cloned());
        let me = ctx.client.user().to_string();
        state.users.remove(&me);
    }
    watch(ctx, contacts);
}

/// Runs one line. `Ok(None)` means quit.
fn command_line(
    ctx: &Ctx,
    line: &str,
    uploads: &mut Vec<JoinHandle<()>>,
) -> Result<Option<Vec<Line>>> {
    let client = &*ctx.client;
    let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
    let rest = rest.trim();
    let one = |text: String| Ok(Some(vec![Line::Reply(text)]));
    match cmd {
        "/quit" | "/exit" => Ok(None),
        "/help" => one(chat_help()),
        "/query" | "/join" | "/close" | "/open" => {
            let conversation = match (cmd, rest) {
                ("/close", _) | (_, "") => None,
                // `chat WITH`: a group when it is written as one or names no user.
                ("/open", with) if with == client.user() => return Err(to_yourself()),
                ("/open", with) => {
                    let user = !with.contains('/')
                        && names::validate("user", with).is_ok()
                        && ctx.e2e.lock().peer_keys(with).is_ok();
                    if user {
                        Some(Conversation::User(with.to_string()))
                    } else {
                        Some(Conversation::Group(resolve_group(
                            client,
                            client.user(),
                            with,
                            false,
                        )?))
                    }
                }
                ("/query", user) => {
                    names::validate("user", user)?;
                    if user == client.user() {
                        return Err(to_yourself());
                    }
                    // The user must exist: their keys are fetched (and pinned) now.
                    ctx.e2e.lock().peer_keys(user)?;
                    Some(Conversation::User(user.to_string()))
                }
                (_, group) => Some(Conversation::Group(resolve_group(
                    client,
                    client.user(),
                    group,
                    false,
                )?)),
            };
            let mut read_now = None;
            let text = {
                let mut state = ctx.state.lock();
                let text = match &conversation {
                    Some(c) => {
                        if let Some(ids) = state.unread_ids.remove(c) {
                            read_now = Some((c.clone(), ids));
                        }
                        let unread = state.unread.remove(c).unwrap_or(0);
                        match unread {
                            0 => format!("now talking to {}", c.label()),
                            n => format!("now talking to {} ({n} unread above)", c.label()),
                        }
                    }
                    None => "no current conversation: /msg USER TEXT, or /query USER".into(),
                };
                match &conversation {
                    Some(Conversation::User(u)) => {
                        state.users.insert(u.clone());
                    }
                    Some(Conversation::Group(g)) => {
                        state.groups.insert(g.clone());
                    }
                    None => {}
                }
                state.current = conversation.clone();
                text
            };
            if let Some(Conversation::User(u)) = conversation {
                watch(ctx, [u]);
            }
            // What waited in this conversation is read now: tell its senders.
            if let Some((Conversation::User(from), ids)) = read_now.filter(|_| ctx.receipts) {
                receipts::send(client, &ctx.e2e, &from, Reached::Read, ids);
            }
            let _ = ctx.out.send(Out::Prompt);
            // The last lines of the conversation, as a reminder.
            let mut lines = vec![Line::Reply(text)];
            let current = ctx.state.lock().current.clone();
            if let Some(c) = current {
                lines.extend(backlog(ctx, &c, BACKLOG)?);
            }
            Ok(Some(lines))
        }
        "/history" => {
            let n: usize = match rest {
                "" => 20,
                n => n
                    .parse()
                    .map_err(|_| Error::Invalid("usage: /history [N]".into()))?,
            };
            let current = ctx.state.lock().current.clone();
            let Some(c) = current else {
                return Err(Error::Invalid(
                    "no current conversation: /query USER or /join GROUP first".into(),
                ));
            };
            let lines = backlog(ctx, &c, n)?;
            if lines.is_empty() {
                return one(format!("no history with {}", c.label()));
            }
            Ok(Some(lines))
        }
        "/list" => {
            let state = ctx.state.lock();
            if state.unread.is_empty() {
                return one("no unread messages".into());
            }
            let lines = state
                .unread
                .iter()
                .map(|(c, n)| Line::Reply(format!("{}: {n} unread", c.label())))
                .collect();
            Ok(Some(lines))
        }
        "/get" => {
            let id: i64 = rest.parse().map_err(|_| {
                Error::Invalid("usage: /get ID (the number the offer shows)".into())
            })?;
            let msg = ctx
                .offers
                .lock()
                .remove(&id)
                .ok_or_else(|| Error::Invalid(format!("no file offered by message {id}")))?;
            let mut line = Vec::new();
            take_offer(
                &ctx.e2e,
                client,
                &ctx.downloads,
                &msg,
                Format::Lines,
                &mut line,
            )?;
            one(String::from_utf8_lossy(&line).trim_end().to_string())
        }
        "/who" => {
            let users = client.who()?;
            let others: Vec<String> = users.into_iter().filter(|u| u != client.user()).collect();
            ctx.state.lock().users.extend(others.iter().cloned());
            one(if others.is_empty() {
                "nobody else is online".to_string()
            } else {
                format!("online: {}", others.join(", "))
            })
        }
        "/msg" => {
            let (to, text) = rest
                .split_once(' ')
                .ok_or_else(|| Error::Invalid("usage: /msg USER TEXT".into()))?;
            send_text(ctx, to, text.trim()).map(|line| Some(vec![line]))
        }
        "/file" => {
            let (to, path) = rest
                .split_once(' ')
                .ok_or_else(|| Error::Invalid("usage: /file USER PATH".into()))?;
            names::validate("recipient", to)?;
            files::check_target(client, Target::User(to))?;
            uploads.push(upload(
                ctx,
                Conversation::User(to.to_string()),
                path.trim().into(),
            ));
            Ok(Some(Vec::new()))
        }
        "/group" => match GroupCmd::parse(rest)? {
            GroupCmd::SendFile(g, path) => {
                let g = resolve_group(client, client.user(), &g, false)?;
                uploads.push(upload(ctx, Conversation::Group(g), path));
                Ok(Some(Vec::new()))
            }
            cmd => run_group(ctx, &cmd),
        },
        _ if cmd.starts_with('/') => Err(Error::Invalid(match closest_command(cmd) {
            Some(known) => {
                format!("unknown command {cmd}; did you mean {known}? (/help lists them)")
            }
            None => format!("unknown command {cmd}; /help lists the commands"),
        })),
        _ => {
            let current = ctx.state.lock().current.clone();
            match current {
                Some(Conversation::User(to)) => {
                    send_text(ctx, &to, line).map(|line| Some(vec![line]))
                }
                Some(Conversation::Group(g)) => {
                    run_group(ctx, &GroupCmd::Send(g, line.to_string()))
                }
                None => Err(Error::Invalid(
                    "to send, type /msg USER TEXT, or /query USER first; /help lists the commands"
                        .into(),
                )),
            }
        }
    }
}

/// How many lines of history entering a conversation shows.
const BACKLOG: usize = 5;

/// The last `n` lines of a conversation from the local history, dated when not from today.
/// Runs a group command: its lines, and if a later step failed after earlier ones were done
/// (`/group add G A B` adding A, then failing on B), those lines above the error.
fn run_group(ctx: &Ctx, cmd: &GroupCmd) -> Result<Option<Vec<Line>>> {
    let client = &*ctx.client;
    let mut lines = Vec::new();
    let done = cmd.run(client, &mut ctx.e2e.lock(), &mut |text, _| {
        lines.push(Line::Reply(text));
        Ok(())
    });
    match done {
        Ok(()) => Ok(Some(lines)),
        Err(e) if !lines.is_empty() => {
            lines.push(super::error_line(&e));
            Ok(Some(lines))
        }
        Err(e) => Err(e),
    }
}

fn backlog(ctx: &Ctx, c: &Conversation, n: usize) -> Result<Vec<Line>> {
    let entries = ctx.e2e.lock().history()?.last(Some(c.label()), n)?;
    let today = chrono::Local::now().date_naive();
    Ok(entries
        .iter()
        .map(|e| {
            use chrono::TimeZone;
            let dated = chrono::Local
                .timestamp_millis_opt(e.at)
                .single()
                .is_none_or(|t| t.date_naive() != today);
            Line::History(history_line(e, dated))
        })
        .collect())
}

/// Why there is no conversation with ourselves (see [`crate::net::TO_YOURSELF`]).
fn to_yourself() -> Error {
    Error::Invalid(crate::net::TO_YOURSELF.into())
}

/// Sends a text to a user: `-> bob: TEXT`.
fn send_text(ctx: &Ctx, to: &str, text: &str) -> Result<Line> {
    names::validate("recipient", to)?;
    if text.is_empty() {
        return Err(Error::Invalid("empty message: nothing was sent".into()));
    }
    let client_id = crypto::random_u64()?;
    let body = ctx.e2e.lock().seal_text(to, client_id, text)?;
    ctx.client.send(to, client_id, &body, None)?;
    ctx.e2e.lock().remember_sent(to, text);
    {
        let mut state = ctx.state.lock();
        state.users.insert(to.to_string());
        state.sent(client_id, text);
    }
    watch(ctx, [to.to_string()]);
    // ✓: stored (✓✓ lines follow when it is delivered and read).
    let mark = if ctx.terminal { " ✓" } else { "" };
    Ok(Line::Reply(format!("-> {to}: {}{mark}", one_line(text))))
}

/// Files from this size on show their progress.
const PROGRESS_FROM: u64 = 4 << 20;

/// Uploads a file on a thread of its own (messages keep printing, commands keep running),
/// with a progress line now and then on a terminal; then offers it to `to`.
fn upload(ctx: &Ctx, to: Conversation, path: PathBuf) -> JoinHandle<()> {
    let ctx = ctx.clone();
    std::thread::spawn(move || {
        let name = one_line(&path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().to_string(),
        ));
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let started = Instant::now();
        let mut last = Instant::now();
        // A line at each quarter, and at most one a second beside them.
        let mut quarter = 0;
        let mut progress = |sent: u64| {
            let now_quarter = sent.saturating_mul(4) / size.max(1);
            let due = now_quarter > quarter || last.elapsed() >= Duration::from_secs(1);
            if ctx.terminal && size >= PROGRESS_FROM && due && sent < size {
                quarter = now_quarter;
                last = Instant::now();
                ctx.say(Line::Notice(format!(
                    "* {name}: {} of {} ({:.0}%)",
                    files::human_size(sent),
                    files::human_size(size),
                    sent as f64 * 100.0 / size.max(1) as f64
                )));
            }
        };
        let sent = files::upload_file(&ctx.client, &path, &mut progress).and_then(|uploaded| {
            let target = match &to {
                Conversation::User(u) => Target::User(u),
                Conversation::Group(g) => Target::Group(g),
            };
            // The lock only to seal the offer: a message's worth.
            let mut e2e = ctx.e2e.lock();
            let id = files::offer(&ctx.client, &mut e2e, target, uploaded)?;
            e2e.remember_sent(
                to.label(),
                &format!("sent {name} ({})", files::human_size(size)),
            );
            Ok(id)
        });
        match sent {
            Ok(id) => {
                let to = match &to {
                    Conversation::User(u) => u.clone(),
                    Conversation::Group(g) => format!("group {g}"),
                };
                ctx.say(Line::Reply(format!(
                    "sent {name} ({}) to {to} as message {id}{}",
                    files::human_size(size),
                    if started.elapsed() >= Duration::from_secs(2) {
                        format!(" in {:.0} s", started.elapsed().as_secs_f64())
                    } else {
                        String::new()
                    }
                )));
            }
            Err(e) => ctx.say(error_line(&Error::Invalid(format!(
                "{name} was not sent: {e}"
            )))),
        }
    })
}

/// Tab: completes the word before the cursor (a command, a `/group` subcommand, a user or a
/// group name). One candidate is filled in; several are filled in as far as they agree and
/// returned, to be shown.
pub(super) fn complete(ctx: &Ctx, editor: &mut Editor) -> String {
    let before = editor.before_cursor();
    let words: Vec<&str> = before.split(' ').collect();
    let word = *words.last().unwrap_or(&"");
    let candidates: Vec<String> = if words.len() == 1 && word.starts_with('/') {
        let mut c: Vec<String> = CHAT_COMMANDS
            .iter()
            .filter_map(|(usage, _)| usage.split(' ').next())
            .map(str::to_string)
            .collect();
        c.dedup();
        c
    } else if words.len() == 2 && words[0] == "/group" {
        GROUP_SUBCOMMANDS.iter().map(|s| s.to_string()).collect()
    } else {
        let state = ctx.state.lock();
        let groups_first = words[0] == "/join" || (words[0] == "/group" && words.len() == 3);
        let mut c: Vec<String> = Vec::new();
        if groups_first {
            c.extend(state.groups.iter().cloned());
        } else {
            c.extend(state.users.iter().cloned());
            c.extend(state.groups.iter().cloned());
        }
        c
    };
    // A group matches by its full name or its short one (`te` finds `alice/team`).
    let mut matching: Vec<&String> = candidates
        .iter()
        .filter(|c| {
            c.starts_with(word)
                || c.split_once('/')
                    .is_some_and(|(_, short)| short.starts_with(word))
        })
        .collect();
    matching.dedup();
    match matching.len() {
        0 => String::new(),
        1 => {
            editor.replace_before_cursor(word.chars().count(), &format!("{} ", matching[0]));
            String::new()
        }
        _ => {
            let common = common_prefix(&matching);
            if common.len() > word.len() && common.starts_with(word) {
                editor.replace_before_cursor(word.chars().count(), &common);
            }
            matching
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("  ")
        }
    }
}

fn common_prefix(words: &[&String]) -> String {
    let first = words[0];
    let mut end = first.len();
    for w in &words[1..] {
        end = end.min(
            first
                .char_indices()
                .zip(w.chars())
                .find(|((_, a), b)| a != b)
                .map_or(end.min(w.len()), |((i, _), _)| i),
        );
    }
    first[..end].to_string()
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

    #[test]
    fn common_prefixes() {
        let (a, b, c) = ("alice".to_string(), "alina".to_string(), "al".to_string());
        assert_eq!(common_prefix(&[&a, &b]), "ali");
        assert_eq!(common_prefix(&[&a, &c]), "al");
        assert_eq!(common_prefix(&[&a]), "alice");
    }
}
