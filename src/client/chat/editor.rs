//! The chat's line editor: the terminal in raw mode, keys decoded from the bytes typed, and
//! the screen: lines printed above an input line that wraps.
//!
//! It is ours rather than a library's because the chat needs what line-editing libraries do
//! not give together: every byte typed ahead (while a command runs) or pasted is kept and
//! becomes input, in order; a bracketed paste of several lines becomes several lines; lines
//! arrive from other threads at any time and are printed above the prompt without disturbing
//! what is being typed, whatever its length and the window's width.
//!
//! ```text
//! input thread: read(stdin) ──▶ Decoder ──▶ Key ──▶ channel ──▶ the chat's main loop
//! main loop: Key ──▶ Editor::key ──▶ Action (submit a line, quit, complete)
//!            a line from elsewhere ──▶ Screen::print_above
//! ```

use std::io::{self, Read, Write};
use std::os::fd::AsFd;

use rustix::termios::{self, OptionalActions, Termios};
use unicode_width::UnicodeWidthChar;

/// A key, or a paste.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// A character to insert.
    Char(char),
    /// Text pasted at once (bracketed paste): its lines are separate input lines.
    Paste(String),
    Enter,
    Backspace,
    Delete,
    Left,
    Right,
    Home,
    End,
    Up,
    Down,
    Tab,
    /// Ctrl-A .. Ctrl-Z (by letter), for the ones that mean something here.
    Ctrl(char),
    /// Alt-B / Alt-F: a word left or right.
    WordLeft,
    WordRight,
}

/// Turns bytes read from a terminal in raw mode into keys. Bytes of an unfinished sequence
/// (a UTF-8 character or an escape sequence cut by a read) wait for the next read.
#[derive(Default)]
pub struct Decoder {
    pending: Vec<u8>,
    /// Inside a bracketed paste: what was pasted so far.
    paste: Option<Vec<u8>>,
}

const PASTE_START: &[u8] = b"\x1b[200~";
const PASTE_END: &[u8] = b"\x1b[201~";

impl Decoder {
    /// The keys that `bytes` complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Key> {
        self.pending.extend_from_slice(bytes);
        let mut keys = Vec::new();
        let mut at = 0;
        loop {
            let rest = &self.pending[at..];
            if rest.is_empty() {
                break;
            }
            if let Some(paste) = &mut self.paste {
                match find(rest, PASTE_END) {
                    Some(end) => {
                        paste.extend_from_slice(&rest[..end]);
                        let text = String::from_utf8_lossy(paste).replace("\r\n", "\n");
                        keys.push(Key::Paste(text.replace('\r', "\n")));
                        self.paste = None;
                        at += end + PASTE_END.len();
                        continue;
                    }
                    None => {
                        // Keep what may be the start of the end marker.
                        let keep = (1..PASTE_END.len())
                            .rev()
                            .find(|&n| rest.ends_with(&PASTE_END[..n]))
                            .unwrap_or(0);
                        paste.extend_from_slice(&rest[..rest.len() - keep]);
                        at += rest.len() - keep;
                        break;
                    }
                }
            }
            match decode_one(rest) {
                Decoded::Key(key, n) => {
                    keys.push(key);
                    at += n;
                }
                Decoded::PasteStart(n) => {
                    self.paste = Some(Vec::new());
                    at += n;
                }
                Decoded::Skip(n) => at += n,
                Decoded::Incomplete => break,
            }
        }
        self.pending.drain(..at);
        keys
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

enum Decoded {
    Key(Key, usize),
    PasteStart(usize),
    /// Bytes that mean nothing here (an unknown escape sequence).
    Skip(usize),
    Incomplete,
}

fn decode_one(b: &[u8]) -> Decoded {
    match b[0] {
        b'\r' | b'\n' => Decoded::Key(Key::Enter, 1),
        0x7f | 0x08 => Decoded::Key(Key::Backspace, 1),
        b'\t' => Decoded::Key(Key::Tab, 1),
        0x1b => decode_escape(b),
        c @ 0x01..=0x1a => Decoded::Key(Key::Ctrl((b'a' + c - 1) as char), 1),
        c if c < 0x20 => Decoded::Skip(1),
        _ => {
            let len = match b[0] {
                0xc0..=0xdf => 2,
                0xe0..=0xef => 3,
                0xf0..=0xf7 => 4,
                0x80..=0xbf | 0xf8..=0xff => return Decoded::Skip(1),
                _ => 1,
            };
            if b.len() < len {
                return Decoded::Incomplete;
            }
            match std::str::from_utf8(&b[..len]) {
                Ok(s) => Decoded::Key(Key::Char(s.chars().next().unwrap_or('?')), len),
                Err(_) => Decoded::Skip(1),
            }
        }
    }
}

fn decode_escape(b: &[u8]) -> Decoded {
    if b.len() < 2 {
        return Decoded::Incomplete;
    }
    match b[1] {
        b'[' | b'O' => {
            // CSI: parameters (digits, ';') then one final byte.
            let Some(end) = b[2..].iter().position(|c| (0x40..=0x7e).contains(c)) else {
                return if b.len() > 32 {
                    Decoded::Skip(b.len())
                } else {
                    Decoded::Incomplete
                };
            };
            let n = end + 3;
            if b[..n] == *PASTE_START {
                return Decoded::PasteStart(n);
            }
            let params = &b[2..n - 1];
            let key = match (b[n - 1], params) {
                (b'A', _) => Key::Up,
                (b'B', _) => Key::Down,
                (b'C', p) if p.ends_with(b"5") || p.ends_with(b"3") => Key::WordRight,
                (b'D', p) if p.ends_with(b"5") || p.ends_with(b"3") => Key::WordLeft,
                (b'C', _) => Key::Right,
                (b'D', _) => Key::Left,
                (b'H', _) => Key::Home,
                (b'F', _) => Key::End,
                (b'~', b"1" | b"7") => Key::Home,
                (b'~', b"4" | b"8") => Key::End,
                (b'~', b"3") => Key::Delete,
                _ => return Decoded::Skip(n),
            };
            Decoded::Key(key, n)
        }
        b'b' => Decoded::Key(Key::WordLeft, 2),
        b'f' => Decoded::Key(Key::WordRight, 2),
        0x7f => Decoded::Key(Key::Ctrl('w'), 2),
        _ => Decoded::Skip(1),
    }
}

/// What a key asks the chat to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing beyond redrawing.
    None,
    /// These lines were entered (one, or several from a paste), in order.
    Submit(Vec<String>),
    /// Ctrl-D on an empty line: end the session.
    Quit,
    /// Tab: complete the word before the cursor.
    Complete,
}

/// The input line: its text, the cursor, and the lines entered before (Up and Down).
#[derive(Default)]
pub struct Editor {
    line: Vec<char>,
    cursor: usize,
    history: Vec<String>,
    /// Where Up/Down is in `history` (`history.len()`: the line being typed).
    browsing: usize,
    /// The line being typed when browsing started.
    draft: Vec<char>,
}

impl Editor {
    /// The text typed so far.
    pub fn text(&self) -> String {
        self.line.iter().collect()
    }

    /// The text before the cursor.
    pub fn before_cursor(&self) -> String {
        self.line[..self.cursor].iter().collect()
    }

    /// Replaces the last `n` characters before the cursor with `with`.
    pub fn replace_before_cursor(&mut self, n: usize, with: &str) {
        let start = self.cursor.saturating_sub(n);
        self.line.splice(start..self.cursor, with.chars());
        self.cursor = start + with.chars().count();
    }

    /// Applies one key.
    pub fn key(&mut self, key: Key) -> Action {
        match key {
            Key::Char(c) => self.insert(&[c]),
            Key::Paste(text) => {
                // Every complete line is entered; a last line without its newline is left
                // to edit.
                let mut lines: Vec<String> = Vec::new();
                let mut parts = text.split('\n').peekable();
                let mut first = true;
                while let Some(part) = parts.next() {
                    if parts.peek().is_none() {
                        self.insert(&part.chars().collect::<Vec<_>>());
                        break;
                    }
                    let mut whole = if first { self.take() } else { String::new() };
                    whole.push_str(part);
                    first = false;
                    if !whole.trim().is_empty() {
                        self.remember(&whole);
                        lines.push(whole);
                    }
                }
                if lines.is_empty() {
                    Action::None
                } else {
                    Action::Submit(lines)
                }
            }
            Key::Enter => {
                let line = self.take();
                if line.trim().is_empty() {
                    return Action::None;
                }
                self.remember(&line);
                Action::Submit(vec![line])
            }
            Key::Backspace => {
                if self.cursor > 0 {
                    self.cursor -= 1;
                    self.line.remove(self.cursor);
                }
                Action::None
            }
            Key::Delete => {
                if self.cursor < self.line.len() {
                    self.line.remove(self.cursor);
                }
                Action::None
            }
            Key::Ctrl('d') if self.line.is_empty() => Action::Quit,
            Key::Ctrl('d') => self.key(Key::Delete),
            Key::Left | Key::Ctrl('b') => {
                self.cursor = self.cursor.saturating_sub(1);
                Action::None
            }
            Key::Right | Key::Ctrl('f') => {
                self.cursor = (self.cursor + 1).min(self.line.len());
                Action::None
            }
            Key::Home | Key::Ctrl('a') => {
                self.cursor = 0;
                Action::None
            }
            Key::End | Key::Ctrl('e') => {
                self.cursor = self.line.len();
                Action::None
            }
            Key::WordLeft => {
                self.cursor = self.word_start();
                Action::None
            }
            Key::WordRight => {
                while self.cursor < self.line.len() && self.line[self.cursor] == ' ' {
                    self.cursor += 1;
                }
                while self.cursor < self.line.len() && self.line[self.cursor] != ' ' {
                    self.cursor += 1;
                }
                Action::None
            }
            // Ctrl-C clears the line (Ctrl-D or /quit ends the session).
            Key::Ctrl('c') => {
                self.take();
                Action::None
            }
            Key::Ctrl('u') => {
                self.line.drain(..self.cursor);
                self.cursor = 0;
                Action::None
            }
            Key::Ctrl('k') => {
                self.line.truncate(self.cursor);
                Action::None
            }
            Key::Ctrl('w') => {
                let start = self.word_start();
                self.line.drain(start..self.cursor);
                self.cursor = start;
                Action::None
            }
            Key::Up | Key::Ctrl('p') => {
                if self.browsing > 0 {
                    if self.browsing == self.history.len() {
                        self.draft = self.line.clone();
                    }
                    self.browsing -= 1;
                    self.line = self.history[self.browsing].chars().collect();
                    self.cursor = self.line.len();
                }
                Action::None
            }
            Key::Down | Key::Ctrl('n') => {
                if self.browsing < self.history.len() {
                    self.browsing += 1;
                    self.line = match self.history.get(self.browsing) {
                        Some(h) => h.chars().collect(),
                        None => std::mem::take(&mut self.draft),
                    };
                    self.cursor = self.line.len();
                }
                Action::None
            }
            Key::Tab => Action::Complete,
            Key::Ctrl(_) => Action::None,
        }
    }

    fn insert(&mut self, chars: &[char]) -> Action {
        for &c in chars {
            // Tabs and other control characters typed into a line become spaces.
            let c = if c.is_control() { ' ' } else { c };
            self.line.insert(self.cursor, c);
            self.cursor += 1;
        }
        Action::None
    }

    /// Empties the line and returns what it held.
    fn take(&mut self) -> String {
        self.cursor = 0;
        self.draft.clear();
        std::mem::take(&mut self.line).into_iter().collect()
    }

    fn remember(&mut self, line: &str) {
        if self.history.last().map(String::as_str) != Some(line) {
            self.history.push(line.to_string());
            if self.history.len() > 1000 {
                self.history.remove(0);
            }
        }
        self.browsing = self.history.len();
    }

    fn word_start(&self) -> usize {
        let mut i = self.cursor;
        while i > 0 && self.line[i - 1] == ' ' {
            i -= 1;
        }
        while i > 0 && self.line[i - 1] != ' ' {
            i -= 1;
        }
        i
    }
}

/// Columns a string takes on a terminal (escape sequences take none).
pub fn width(s: &str) -> usize {
    let mut w = 0;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // Skip a CSI sequence: ESC [ params final.
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('\x40'..='\x7e').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        w += c.width().unwrap_or(0);
    }
    w
}

/// Where the cursor is after `columns` columns of text from the start of a line `cols`
/// wide: (row, column). A line that exactly fills its last row leaves the cursor at the start
/// of the next row (we move it there, so that it is never in the terminal's pending-wrap
/// state).
pub fn position(columns: usize, cols: usize) -> (usize, usize) {
    let cols = cols.max(1);
    (columns / cols, columns % cols)
}

/// The screen: an input line at the bottom, lines printed above it.
pub struct Screen {
    out: io::Stdout,
    /// Rows between the start of the prompt and the cursor.
    cursor_row: usize,
}

impl Screen {
    /// A screen on standard output.
    pub fn new() -> Screen {
        Screen {
            out: io::stdout(),
            cursor_row: 0,
        }
    }

    fn cols() -> usize {
        termios::tcgetwinsize(io::stdout().as_fd())
            .map(|w| usize::from(w.ws_col))
            .ok()
            .filter(|&c| c > 0)
            .unwrap_or(80)
    }

    /// Draws the prompt and the input line, with the cursor where the editor has it.
    pub fn draw(&mut self, prompt: &str, editor: &Editor) -> io::Result<()> {
        let mut buf = String::new();
        self.clear_into(&mut buf);
        self.render_into(&mut buf, prompt, editor);
        self.out.write_all(buf.as_bytes())?;
        self.out.flush()
    }

    /// Prints `lines` above the input line, then draws the input line again.
    pub fn print_above(
        &mut self,
        lines: &[String],
        prompt: &str,
        editor: &Editor,
    ) -> io::Result<()> {
        let mut buf = String::new();
        self.clear_into(&mut buf);
        for line in lines {
            for part in line.split('\n') {
                buf.push_str(part);
                buf.push_str("\r\n");
            }
        }
        self.render_into(&mut buf, prompt, editor);
        self.out.write_all(buf.as_bytes())?;
        self.out.flush()
    }

    /// Leaves the input line as it is and moves below it (at the end of the session).
    pub fn finish(&mut self) -> io::Result<()> {
        let mut buf = String::new();
        self.clear_into(&mut buf);
        self.out.write_all(buf.as_bytes())?;
        self.out.flush()
    }

    /// Moves to the start of the prompt and clears from there to the end of the screen.
    fn clear_into(&mut self, buf: &mut String) {
        if self.cursor_row > 0 {
            buf.push_str(&format!("\x1b[{}A", self.cursor_row));
        }
        buf.push_str("\r\x1b[J");
        self.cursor_row = 0;
    }

    fn render_into(&mut self, buf: &mut String, prompt: &str, editor: &Editor) {
        let cols = Screen::cols();
        let text = editor.text();
        buf.push_str(prompt);
        buf.push_str(&text);
        let end = width(prompt) + width(&text);
        let (end_row, end_col) = position(end, cols);
        if end_col == 0 && end > 0 {
            // Out of the pending-wrap state, onto the next row.
            buf.push_str("\r\n");
        }
        let at = width(prompt) + width(&editor.before_cursor());
        let (row, col) = position(at, cols);
        if end_row > row {
            buf.push_str(&format!("\x1b[{}A", end_row - row));
        }
        buf.push('\r');
        if col > 0 {
            buf.push_str(&format!("\x1b[{col}C"));
        }
        self.cursor_row = row;
    }
}

/// The terminal in raw mode while this lives (keys arrive one by one, unechoed; Ctrl-C is a
/// key, not a signal), with bracketed paste on; restored when dropped (also when a panic
/// unwinds).
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// Puts standard input's terminal in raw mode.
    pub fn enable() -> io::Result<RawMode> {
        let stdin = io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd())?;
        let mut raw = saved.clone();
        raw.make_raw();
        // Output keeps its newline translation off: we write "\r\n" ourselves.
        termios::tcsetattr(stdin.as_fd(), OptionalActions::Now, &raw)?;
        let mut out = io::stdout();
        out.write_all(b"\x1b[?2004h")?;
        out.flush()?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(io::stdin().as_fd(), OptionalActions::Now, &self.saved);
        let mut out = io::stdout();
        let _ = out.write_all(b"\x1b[?2004l");
        let _ = out.flush();
    }
}

/// Reads standard input and sends its keys, until input ends or `keys` is closed.
pub fn read_keys(keys: crossbeam_channel::Sender<Key>) {
    let mut decoder = Decoder::default();
    let mut stdin = io::stdin().lock();
    let mut buf = [0u8; 4096];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        for key in decoder.feed(&buf[..n]) {
            if keys.send(key).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(bytes: &[u8]) -> Vec<Key> {
        Decoder::default().feed(bytes)
    }

    #[test]
    fn bytes_become_keys_even_when_a_read_cuts_a_sequence() {
        assert_eq!(
            keys(b"hi\r\x1b[D\x7f\x03"),
            vec![
                Key::Char('h'),
                Key::Char('i'),
                Key::Enter,
                Key::Left,
                Key::Backspace,
                Key::Ctrl('c')
            ]
        );
        let mut d = Decoder::default();
        assert_eq!(d.feed(b"\x1b["), vec![]);
        assert_eq!(d.feed(b"A\xc3"), vec![Key::Up]);
        assert_eq!(d.feed(b"\xa9"), vec![Key::Char('é')]);
        assert_eq!(keys(b"\x1b[3~\x1b[1;5C"), vec![Key::Delete, Key::WordRight]);
    }

    #[test]
    fn a_bracketed_paste_is_one_key_even_across_reads() {
        let mut d = Decoder::default();
        assert_eq!(d.feed(b"x\x1b[200~one\r\ntwo\x1b[20"), vec![Key::Char('x')]);
        assert_eq!(
            d.feed(b"1~y"),
            vec![Key::Paste("one\ntwo".into()), Key::Char('y')]
        );
    }

    #[test]
    fn a_paste_enters_each_complete_line_in_order() {
        let mut e = Editor::default();
        e.key(Key::Char('>'));
        let action = e.key(Key::Paste("a\n\nb\nc".into()));
        assert_eq!(action, Action::Submit(vec![">a".into(), "b".into()]));
        assert_eq!(
            e.text(),
            "c",
            "the last line, without its newline, stays to edit"
        );
        assert_eq!(e.key(Key::Enter), Action::Submit(vec!["c".into()]));
    }

    #[test]
    fn editing_keys_do_what_a_shell_does() {
        let mut e = Editor::default();
        for c in "hello world".chars() {
            e.key(Key::Char(c));
        }
        e.key(Key::Ctrl('w'));
        assert_eq!(e.text(), "hello ");
        e.key(Key::Home);
        e.key(Key::Char('>'));
        assert_eq!(e.text(), ">hello ");
        e.key(Key::Ctrl('c'));
        assert_eq!(e.text(), "", "Ctrl-C clears the line");
        assert_eq!(e.key(Key::Ctrl('d')), Action::Quit);
        e.key(Key::Char('a'));
        e.key(Key::Enter);
        e.key(Key::Char('b'));
        e.key(Key::Up);
        assert_eq!(e.text(), "a");
        e.key(Key::Down);
        assert_eq!(e.text(), "b", "the draft comes back");
    }

    #[test]
    fn positions_wrap_at_the_width() {
        assert_eq!(position(5, 10), (0, 5));
        assert_eq!(position(10, 10), (1, 0));
        assert_eq!(position(25, 10), (2, 5));
        assert_eq!(width("\x1b[1malice\x1b[0m> "), 7);
        assert_eq!(width("日本"), 4);
    }
}
