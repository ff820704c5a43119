//! Just enough IRC (RFC 2812) for a rival run against an IRC server (ngircd): register a
//! nickname, join a channel, send `PRIVMSG`, and read lines back.
//!
//! IRC confirms nothing, so each message is followed by `PING :SEQ`: the server answers
//! `PONG` once it has handled everything before it, the window's confirmation (as fastchat's
//! `Stored` and MQTT's `PUBACK`, one reply per message). Receivers answer nothing.

/// The longest line IRC allows, with its CR LF.
pub const MAX_LINE: usize = 512;

/// A line from the server, borrowing from the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// 001: registered.
    Welcome,
    /// 366: the end of a channel's member list, the last answer to `JOIN`.
    Joined,
    /// A message for us (directly or through a channel): its text.
    Privmsg(&'a [u8]),
    /// The answer to our `PING`.
    Pong,
    /// The server checks that we are alive: answer `PONG` with this token.
    Ping(&'a [u8]),
    /// A numeric error (400-599) or `ERROR`: the whole line.
    Refused(&'a [u8]),
    /// Anything else.
    Other,
}

/// Appends the registration of `nick`.
pub fn register(out: &mut Vec<u8>, nick: &str) {
    out.extend_from_slice(format!("NICK {nick}\r\nUSER {nick} 0 * :fastchat-bench\r\n").as_bytes());
}

/// Appends `JOIN` of `channel` (with its `#`).
pub fn join(out: &mut Vec<u8>, channel: &str) {
    out.extend_from_slice(format!("JOIN {channel}\r\n").as_bytes());
}

/// Appends `PRIVMSG` of `text` to `target` (a nickname or a channel), then `PING :seq`.
pub fn privmsg(out: &mut Vec<u8>, target: &[u8], text: &[u8], seq: u64) {
    out.extend_from_slice(b"PRIVMSG ");
    out.extend_from_slice(target);
    out.extend_from_slice(b" :");
    out.extend_from_slice(text);
    out.extend_from_slice(format!("\r\nPING :{seq}\r\n").as_bytes());
}

/// Appends `PONG` with `token`.
pub fn pong(out: &mut Vec<u8>, token: &[u8]) {
    out.extend_from_slice(b"PONG :");
    out.extend_from_slice(token);
    out.extend_from_slice(b"\r\n");
}

/// The first whole line of `buf` and its length with its line end; `Ok(None)` if more bytes
/// are needed; an error for a line longer than IRC allows.
pub fn parse(buf: &[u8]) -> Result<Option<(Line<'_>, usize)>, String> {
    let Some(end) = buf.iter().position(|b| *b == b'\n') else {
        if buf.len() > MAX_LINE {
            return Err(format!("a line of more than {MAX_LINE} bytes"));
        }
        return Ok(None);
    };
    let mut line = &buf[..end];
    if line.last() == Some(&b'\r') {
        line = &line[..line.len() - 1];
    }
    Ok(Some((classify(line), end + 1)))
}

fn classify(whole: &[u8]) -> Line<'_> {
    // [":" prefix " "] command params [" :" trailing]
    let mut rest = whole;
    if rest.first() == Some(&b':') {
        rest = match rest.iter().position(|b| *b == b' ') {
            Some(at) => &rest[at + 1..],
            None => return Line::Other,
        };
    }
    let (command, params) = match rest.iter().position(|b| *b == b' ') {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (rest, &[][..]),
    };
    let trailing = || {
        params
            .windows(2)
            .position(|w| w == b" :")
            .map(|at| &params[at + 2..])
            .or_else(|| params.strip_prefix(b":"))
            .unwrap_or(params)
    };
    match command {
        b"001" => Line::Welcome,
        b"366" => Line::Joined,
        b"PRIVMSG" => Line::Privmsg(trailing()),
        b"PONG" => Line::Pong,
        b"PING" => Line::Ping(trailing()),
        b"ERROR" => Line::Refused(whole),
        [b'4' | b'5', b'0'..=b'9', b'0'..=b'9'] => Line::Refused(whole),
        _ => Line::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_told_apart_and_read_only_when_whole() {
        let buf = b":c1!~c1@127.0.0.1 PRIVMSG c2 :3:42:1000: with :colons\r\n\
                    :srv PONG srv :7\r\n\
                    PING :srv\r\n\
                    :srv 001 c2 :Welcome to the Internet Relay Network c2\r\n\
                    :srv 366 c2 #g0 :End of NAMES list\r\n\
                    :srv 401 c2 c9 :No such nick or channel name\r\n\
                    :srv NOTICE c2 :hello\r\n\
                    :c1!~c1@127.0.0.1 PRIVMSG #g0 :x\n";
        let mut at = 0;
        let mut lines = Vec::new();
        while let Some((line, used)) = parse(&buf[at..]).unwrap() {
            lines.push(line);
            at += used;
        }
        assert_eq!(at, buf.len());
        assert_eq!(
            lines,
            [
                Line::Privmsg(b"3:42:1000: with :colons"),
                Line::Pong,
                Line::Ping(b"srv"),
                Line::Welcome,
                Line::Joined,
                Line::Refused(b":srv 401 c2 c9 :No such nick or channel name"),
                Line::Other,
                Line::Privmsg(b"x"),
            ]
        );
        assert_eq!(parse(b":srv PONG srv :7\r"), Ok(None));
        assert!(parse(&[b'x'; MAX_LINE + 1]).is_err());
    }

    #[test]
    fn a_message_is_followed_by_its_ping() {
        let mut out = Vec::new();
        privmsg(&mut out, b"c5", b"1:2:3:..", 2);
        assert_eq!(out, b"PRIVMSG c5 :1:2:3:..\r\nPING :2\r\n");
    }
}
