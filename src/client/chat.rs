//! `fastchat chat`: the interactive session. On a terminal, our own line editor
//! (`editor`) with everything else printed above the prompt; from a pipe, one command per
//! input line.
//!
//! ```text
//! input thread:   keys (terminal) or lines (pipe) ──▶ main loop
//! main loop:      Key ──▶ Editor ──▶ entered lines ──▶ commands channel (in order, never
//!                 dropped) ; Out ──▶ the screen (above the prompt) ; Ctrl-D, /quit, signals
//! command thread: one line at a time ──▶ Client (send, /who, /group ...) ──▶ Out
//!                 /file ──▶ an upload thread of its own (progress ──▶ Out)
//! printer thread: Client::next ──▶ open (E2e) ──▶ Out ──▶ ack
//! ```
//!
//! A conversation (`/query USER`, `/join GROUP`) is where plain text goes; while in one,
//! messages from other conversations (shown all the same) count as unread until entered. Lines carry the local time
//! (`--no-time` leaves it out; pipes never get it, so that scripts read the same lines).

mod commands;
mod editor;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::{self, BufRead, IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, unbounded, Receiver, Sender};
use parking_lot::Mutex;

use super::cli::{login, show, Downloads, Format, LoggedIn, Options, Shown, Waiting};
use super::e2e::{E2e, Reached, Receipt};
use super::receipts;
use super::{Client, Event};
use crate::error::{Error, Result};
use crate::net::Envelope;
use editor::{Action, Editor, Key, RawMode, Screen};

/// How the chat looks.
#[derive(Debug, Clone)]
pub struct ChatOptions {
    /// Print the local time before each line (on a terminal).
    pub time: bool,
    /// The conversation to start in: a user or a group.
    pub with: Option<String>,
}

/// A conversation: with a user, or in a group.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Conversation {
    User(String),
    Group(String),
}

impl Conversation {
    /// How it is shown: `bob`, `alice/team`.
    pub(super) fn label(&self) -> &str {
        match self {
            Conversation::User(u) | Conversation::Group(u) => u,
        }
    }

    /// The conversation a message belongs to, for its recipient.
    fn of(msg: &Envelope) -> Conversation {
        match &msg.group {
            Some(g) => Conversation::Group(g.clone()),
            None => Conversation::User(msg.from.clone()),
        }
    }
}

/// What the chat's threads share.
#[derive(Default)]
pub(super) struct State {
    /// Where plain text goes.
    pub(super) current: Option<Conversation>,
    /// Messages not seen in their conversation yet, by conversation.
    pub(super) unread: BTreeMap<Conversation, u32>,
    /// Names seen (online, in groups, senders): Tab completes them.
    pub(super) users: BTreeSet<String>,
    /// The user's groups, by full name.
    pub(super) groups: BTreeSet<String>,
    /// Whose comings and goings are shown: pinned contacts, group members, anyone written to
    /// or heard from.
    pub(super) contacts: BTreeSet<String>,
    /// The contacts online, as last told.
    pub(super) online: BTreeSet<String>,
    /// Messages of other conversations, delivered but not read yet: their read receipts go
    /// when the conversation is entered.
    pub(super) unread_ids: BTreeMap<Conversation, Vec<(i64, u64)>>,
    /// What this chat sent lately, by the sender's id for it: receipts name it.
    pub(super) sent: std::collections::VecDeque<(u64, String)>,
}

/// How many sent texts are kept for receipts.
const REMEMBER_SENT: usize = 4096;

impl State {
    /// Remembers a text sent, for its receipts.
    pub(super) fn sent(&mut self, client_id: u64, text: &str) {
        if self.sent.len() >= REMEMBER_SENT {
            self.sent.pop_front();
        }
        self.sent.push_back((client_id, text.to_string()));
    }
}

/// A line for the screen, by what it is (each kind looks different).
#[derive(Debug, Clone)]
pub(super) enum Line {
    /// A message received (already styled when on a terminal), and when it was sent (ms
    /// since the epoch): a message that waited while its recipient was away shows when it
    /// was written, not when it arrived.
    Incoming(String, i64),
    /// The result of the user's own command (`-> bob: hi`).
    Reply(String),
    /// Something that happened (`* server lost`, an upload's progress).
    Notice(String),
    /// A command failed.
    Error(String),
    /// A line from the local history (it has its own time).
    History(String),
}

/// What the other threads tell the main loop.
pub(super) enum Out {
    Lines(Vec<Line>),
    /// The conversation or the unread counts changed: draw the prompt again.
    Prompt,
    /// The session is over (a `/quit` reached, or the connection is gone for good).
    Done(Result<()>),
}

/// What the command thread takes.
pub(super) enum Command {
    Line(String),
    Quit,
}

/// Everything a chat thread needs, cheap to clone.
#[derive(Clone)]
pub(super) struct Ctx {
    pub(super) client: Arc<Client>,
    pub(super) e2e: Arc<Mutex<E2e>>,
    pub(super) downloads: Downloads,
    pub(super) offers: Arc<Mutex<std::collections::HashMap<i64, Envelope>>>,
    pub(super) state: Arc<Mutex<State>>,
    pub(super) out: Sender<Out>,
    /// On a terminal: colours, progress lines.
    pub(super) terminal: bool,
    /// Send receipts for the messages shown.
    pub(super) receipts: bool,
}

impl Ctx {
    pub(super) fn say(&self, line: Line) {
        let _ = self.out.send(Out::Lines(vec![line]));
    }
}

/// ANSI styles for the terminal: `text` in `style` when `on`, unless `NO_COLOR` is set
/// (<https://no-color.org>).
pub(super) fn paint(style: &str, text: &str, on: bool) -> String {
    if on && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) {
        format!("\x1b[{style}m{text}\x1b[0m")
    } else {
        text.to_string()
    }
}

/// `fastchat chat`: the interactive session.
pub fn chat(opts: &Options, how: &ChatOptions) -> Result<()> {
    let me = login(opts)?;
    let terminal = io::stdin().is_terminal() && io::stdout().is_terminal();
    let server = me.client.server();
    println!(
        "logged in as {} on server {} ({}); /help for commands",
        paint("1", me.client.user(), terminal),
        server.id,
        server.addr
    );
    let (out_tx, out) = unbounded::<Out>();
    let ctx = Ctx {
        client: Arc::clone(&me.client),
        e2e: Arc::clone(&me.e2e),
        downloads: me.downloads.clone(),
        offers: Arc::clone(&me.offers),
        state: Arc::new(Mutex::new(State::default())),
        out: out_tx,
        terminal,
        receipts: opts.receipts,
    };
    let (commands_tx, commands_rx) = unbounded::<Command>();
    if let Some(with) = &how.with {
        commands_tx
            .send(Command::Line(format!("/open {with}")))
            .expect("the receiver is here");
    }
    spawn_printer(ctx.clone());
    {
        let ctx = ctx.clone();
        std::thread::spawn(move || commands::run(&ctx, &commands_rx));
    }
    let result = if terminal {
        chat_terminal(&ctx, &me, opts, how, &commands_tx, &out)
    } else {
        chat_lines(opts, &commands_tx, &out)
    };
    drop(me);
    result
}

/// Receives messages until the session ends: each one opened, shown, acknowledged.
///
/// Acknowledgements and receipts wait while more messages are already there, and go together
/// once there are none (one round trip for a burst, not one per message).
fn spawn_printer(ctx: Ctx) {
    std::thread::spawn(move || {
        let forever = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        let mut owed = Owed::default();
        let result = loop {
            let idle = owed.acks.is_empty();
            let deadline = if idle { forever } else { Instant::now() };
            let event = match ctx.client.next(deadline) {
                Ok(Some(event)) => event,
                Ok(None) if idle => break Ok(()),
                Ok(None) => match owed.pay(&ctx) {
                    Ok(()) => continue,
                    Err(e) => break Err(e),
                },
                Err(e) => break Err(e),
            };
            if let Err(e) = printed(&ctx, event, &mut owed) {
                break Err(e);
            }
        };
        let _ = ctx.out.send(Out::Done(result));
    });
}

/// What the printer owes the server and the senders: acknowledgements and receipts.
#[derive(Default)]
struct Owed {
    acks: Vec<i64>,
    receipts: receipts::Receipts,
    /// Group messages that came before their sender's key.
    waiting: Waiting,
}

impl Owed {
    /// Sends what is owed.
    fn pay(&mut self, ctx: &Ctx) -> Result<()> {
        if !self.acks.is_empty() {
            // The keys of what was shown go before the acknowledgement.
            ctx.e2e.lock().settle()?;
            ctx.client.ack(&std::mem::take(&mut self.acks))?;
        }
        self.receipts.send(&ctx.client, &ctx.e2e);
        Ok(())
    }
}

/// Shows one event.
fn printed(ctx: &Ctx, event: Event, owed: &mut Owed) -> Result<()> {
    match event {
        Event::Message(msg) => {
            // This message, then what waited for a sender key, if it brings one.
            let mut todo = VecDeque::from([msg]);
            while let Some(msg) = todo.pop_front() {
                if message_printed(ctx, msg, owed)? == Shown::Silent {
                    todo.extend(owed.waiting.take());
                }
            }
        }
        Event::Synced => {}
        Event::Failover(server) => {
            ctx.say(Line::Notice(format!(
                "* server lost; now on server {} ({})",
                server.id, server.addr
            )));
            // The new server does not know whom this connection watched.
            let contacts: Vec<String> = ctx.state.lock().contacts.iter().cloned().collect();
            if let Err(e) = ctx.client.watch(contacts) {
                log::debug!("watch after failover: {e}");
            }
        }
        Event::Presence { user, online } => {
            let changed = {
                let mut state = ctx.state.lock();
                if online {
                    state.users.insert(user.clone());
                    state.online.insert(user.clone())
                } else {
                    state.online.remove(&user)
                }
            };
            // For people: a script reading a pipe gets messages and replies only.
            if changed && ctx.terminal {
                let now = if online { "online" } else { "offline" };
                ctx.say(Line::Notice(format!("* {user} is {now}")));
            }
        }
    }
    Ok(())
}

/// Shows one message (and says how), keeping what it owes in `owed`.
fn message_printed(ctx: &Ctx, msg: Envelope, owed: &mut Owed) -> Result<Shown> {
    let mut line = Vec::new();
    let shown = show(
        &ctx.e2e,
        &ctx.client,
        &ctx.downloads,
        &msg,
        Format::Lines,
        true,
        &mut line,
    )?;
    match &shown {
        // Kept unacknowledged until a sender key comes (or for the next session).
        Shown::Waiting => {
            owed.waiting.add(msg);
            return Ok(shown);
        }
        // Kept queued until `/get ID`.
        Shown::Offered => {
            ctx.offers.lock().insert(msg.id, msg.clone());
        }
        _ => owed.acks.push(msg.id),
    }
    match &shown {
        Shown::Receipt(r) => {
            ctx.say(Line::Notice(receipt_line(ctx, &msg.from, r)));
            return Ok(shown);
        }
        Shown::Answer if ctx.receipts => owed.receipts.add(&msg, reached(ctx, &msg)),
        _ => {}
    }
    let text = String::from_utf8_lossy(&line).trim_end().to_string();
    if text.is_empty() {
        return Ok(shown);
    }
    watch(ctx, [msg.from.clone()]);
    {
        let mut state = ctx.state.lock();
        state.users.insert(msg.from.clone());
        let conversation = Conversation::of(&msg);
        if let Conversation::Group(g) = &conversation {
            state.groups.insert(g.clone());
        }
        // Without a current conversation every message is in the one stream shown;
        // in one, the others' messages wait, counted, until they are entered.
        if state.current.is_some() && state.current.as_ref() != Some(&conversation) {
            *state.unread.entry(conversation).or_default() += 1;
            let _ = ctx.out.send(Out::Prompt);
        }
    }
    let text = if ctx.terminal {
        colorize(&msg, &text)
    } else {
        text
    };
    ctx.say(Line::Incoming(text, msg.sent_at));
    Ok(shown)
}

/// The receipt a message shown here deserves: read if it is in the current conversation (or
/// there is none: everything is in view), else delivered, and read later, when its
/// conversation is entered.
fn reached(ctx: &Ctx, msg: &Envelope) -> Reached {
    let conversation = Conversation::of(msg);
    let mut state = ctx.state.lock();
    match &state.current {
        Some(c) if *c != conversation => {
            state
                .unread_ids
                .entry(conversation)
                .or_default()
                .push((msg.id, msg.client_id));
            Reached::Delivered
        }
        _ => Reached::Read,
    }
}

/// What a receipt says: `✓✓ bob read “hi”`, naming the texts this chat sent.
fn receipt_line(ctx: &Ctx, from: &str, r: &Receipt) -> String {
    let state = ctx.state.lock();
    let texts: Vec<String> =
        r.of.iter()
            .filter_map(|(_, cid)| state.sent.iter().find(|(c, _)| c == cid))
            .map(|(_, t)| {
                let t: String = t.chars().take(40).collect();
                format!("“{}”", super::text::one_line(&t))
            })
            .collect();
    let verb = match r.reached {
        Reached::Delivered => "got",
        Reached::Read => "read",
    };
    match texts.len() {
        0 => format!("✓✓ {from} {verb} {} of your messages", r.of.len()),
        n if n <= 3 => format!("✓✓ {from} {verb} {}", texts.join(", ")),
        n => format!(
            "✓✓ {from} {verb} {} and {} more",
            texts[..3].join(", "),
            n - 3
        ),
    }
}

/// Adds `users` to the contacts whose comings and goings are shown, and tells the server if
/// that changed the set.
pub(super) fn watch(ctx: &Ctx, users: impl IntoIterator<Item = String>) {
    let me = ctx.client.user().to_string();
    let contacts = {
        let mut state = ctx.state.lock();
        let before = state.contacts.len();
        state
            .contacts
            .extend(users.into_iter().filter(|u| *u != me));
        if state.contacts.len() == before {
            return;
        }
        state
            .contacts
            .iter()
            .take(crate::net::MAX_WHO)
            .cloned()
            .collect()
    };
    if let Err(e) = ctx.client.watch(contacts) {
        log::debug!("watch: {e}");
    }
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

/// A line as the terminal shows it: the time, then the text in its kind's style.
fn render(line: &Line, time: bool) -> String {
    let mut at = chrono::Local::now();
    let text = match line {
        Line::Incoming(t, sent) => {
            use chrono::TimeZone;
            if let Some(sent) = chrono::Local.timestamp_millis_opt(*sent).single() {
                at = sent;
            }
            t.clone()
        }
        Line::Reply(t) => paint("2", t, true),
        Line::Notice(t) => paint("33", t, true),
        Line::Error(t) => paint("31", &format!("error: {t}"), true),
        Line::History(t) => return paint("2", t, true),
    };
    if time {
        // A line from another day says which.
        let shown = if at.date_naive() == chrono::Local::now().date_naive() {
            at.format("%H:%M").to_string()
        } else {
            at.format("%Y-%m-%d %H:%M").to_string()
        };
        format!("{} {text}", paint("2", &shown, true))
    } else {
        text
    }
}

/// The prompt: the conversation, the user, and how many messages wait elsewhere.
fn prompt(ctx: &Ctx) -> String {
    let state = ctx.state.lock();
    let mut p = String::new();
    if let Some(c) = &state.current {
        p.push_str(&paint("36", &format!("[{}] ", c.label()), true));
    }
    p.push_str(&paint("1", ctx.client.user(), true));
    let unread: u32 = state.unread.values().sum();
    if unread > 0 {
        p.push_str(&paint("33", &format!(" ({unread} unread, /list)"), true));
    }
    p.push_str("> ");
    p
}

/// Chat on a terminal.
fn chat_terminal(
    ctx: &Ctx,
    me: &LoggedIn,
    opts: &Options,
    how: &ChatOptions,
    commands: &Sender<Command>,
    out: &Receiver<Out>,
) -> Result<()> {
    let raw = RawMode::enable()?;
    let (keys_tx, mut keys) = unbounded::<Key>();
    std::thread::spawn(move || editor::read_keys(keys_tx));
    let mut editor = Editor::default();
    let mut screen = Screen::new();
    screen.draw(&prompt(ctx), &editor)?;
    let result = loop {
        select! {
            recv(keys) -> key => {
                let Ok(key) = key else {
                    // The terminal is gone: finish what was entered, then end.
                    let _ = commands.send(Command::Quit);
                    keys = crossbeam_channel::never();
                    continue;
                };
                match editor.key(key) {
                    Action::Submit(lines) => {
                        for line in lines {
                            let _ = commands.send(Command::Line(line));
                        }
                    }
                    Action::Quit => {
                        let _ = commands.send(Command::Quit);
                    }
                    Action::Complete => {
                        let shown = commands::complete(ctx, &mut editor);
                        if !shown.is_empty() {
                            screen.print_above(&[shown], &prompt(ctx), &editor)?;
                            continue;
                        }
                    }
                    Action::None => {}
                }
                screen.draw(&prompt(ctx), &editor)?;
            }
            recv(out) -> event => match event {
                Ok(Out::Lines(mut lines)) => {
                    // Everything waiting, in one redraw.
                    let mut done = None;
                    for more in out.try_iter() {
                        match more {
                            Out::Lines(l) => lines.extend(l),
                            Out::Prompt => {}
                            Out::Done(r) => { done = Some(r); break; }
                        }
                    }
                    let rendered: Vec<String> =
                        lines.iter().map(|l| render(l, how.time)).collect();
                    screen.print_above(&rendered, &prompt(ctx), &editor)?;
                    if let Some(r) = done {
                        break r;
                    }
                }
                Ok(Out::Prompt) => screen.draw(&prompt(ctx), &editor)?,
                Ok(Out::Done(r)) => break r,
                Err(_) => break Ok(()),
            },
            // SIGTERM or SIGINT from elsewhere.
            recv(opts.interrupt) -> _ => break Ok(()),
        }
    };
    screen.finish()?;
    drop(raw);
    let _ = me;
    result
}

/// Chat from a pipe: one command per input line, one output line per event.
fn chat_lines(opts: &Options, commands: &Sender<Command>, out: &Receiver<Out>) -> Result<()> {
    // Standard input is read on a thread of its own: its lines go to the command thread in
    // order, and the end of input ends the session once they are done.
    let lines_to = commands.clone();
    std::thread::spawn(move || {
        for line in io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if lines_to.send(Command::Line(line)).is_err() {
                return;
            }
        }
        let _ = lines_to.send(Command::Quit);
    });
    loop {
        select! {
            recv(out) -> event => match event {
                Ok(Out::Lines(lines)) => {
                    let mut stdout = io::stdout().lock();
                    for line in lines {
                        let written = match line {
                            Line::Error(t) => {
                                eprintln!("error: {t}");
                                Ok(())
                            }
                            Line::Incoming(t, _)
                            | Line::Reply(t)
                            | Line::Notice(t)
                            | Line::History(t) => {
                                writeln!(stdout, "{t}")
                            }
                        };
                        written
                            .and_then(|()| stdout.flush())
                            .map_err(super::cli::output_error)?;
                    }
                }
                Ok(Out::Prompt) => {}
                Ok(Out::Done(r)) => return r,
                Err(_) => return Ok(()),
            },
            recv(opts.interrupt) -> _ => return Ok(()),
        }
    }
}

/// The error a failed command shows: one line.
pub(super) fn error_line(e: &Error) -> Line {
    Line::Error(super::text::one_line(&e.to_string()))
}
