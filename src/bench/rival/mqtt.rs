//! Just enough MQTT 5 for a rival run against a broker (mosquitto): connect, subscribe with
//! QoS 1, publish with QoS 1, acknowledge, and read what comes back. Packets are written into
//! a buffer and parsed out of one, so the driving thread owns every byte and system call.
//!
//! A message is `PUBLISH` (QoS 1, so the broker answers `PUBACK` once it has taken it: the
//! window's confirmation, as fastchat's `Stored`), and each subscriber answers every
//! `PUBLISH` it gets with a `PUBACK` (MQTT acknowledges one message at a time).

/// Packet types (the first byte's high nibble).
const CONNECT: u8 = 1;
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const SUBSCRIBE: u8 = 8;
const SUBACK: u8 = 9;

/// A remaining length takes at most four bytes (256 MiB).
const MAX_LENGTH_BYTES: usize = 4;

/// A packet from the broker, borrowing from the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Packet<'a> {
    /// The answer to `CONNECT`: 0 is success.
    ConnAck { reason: u8 },
    /// The answer to `SUBSCRIBE`: one code per filter, the granted QoS or an error (0x80 up).
    SubAck { reasons: &'a [u8] },
    /// A message for a subscription; `pid` when it must be acknowledged (QoS 1).
    Publish { pid: Option<u16>, payload: &'a [u8] },
    /// The broker took one of our messages; reasons from 0x80 up are refusals.
    PubAck { reason: u8 },
    /// Anything else (its type): not used by a rival run.
    Other(u8),
}

/// Appends `CONNECT` for a clean session named `client_id`, keep-alive off.
pub fn connect(out: &mut Vec<u8>, client_id: &str) {
    let mut body = Vec::with_capacity(16 + client_id.len());
    string(&mut body, b"MQTT");
    body.push(5); // protocol version
    body.push(0x02); // clean start
    body.extend_from_slice(&0u16.to_be_bytes()); // keep-alive: none
    body.push(0); // no properties
    string(&mut body, client_id.as_bytes());
    packet(out, CONNECT << 4, &body);
}

/// Appends `SUBSCRIBE` to `topic` with QoS 1; `no_local`: the broker does not send our own
/// messages back (a group's sender is also its subscriber).
pub fn subscribe(out: &mut Vec<u8>, pid: u16, topic: &str, no_local: bool) {
    let mut body = Vec::with_capacity(8 + topic.len());
    body.extend_from_slice(&pid.to_be_bytes());
    body.push(0); // no properties
    string(&mut body, topic.as_bytes());
    body.push(if no_local { 0x05 } else { 0x01 });
    packet(out, (SUBSCRIBE << 4) | 0x02, &body);
}

/// Appends `PUBLISH` of `payload` to `topic` with QoS 1 and packet id `pid`.
pub fn publish(out: &mut Vec<u8>, topic: &[u8], pid: u16, payload: &[u8]) {
    let length = 2 + topic.len() + 2 + 1 + payload.len();
    out.push((PUBLISH << 4) | 0x02);
    remaining_length(out, length);
    string(out, topic);
    out.extend_from_slice(&pid.to_be_bytes());
    out.push(0); // no properties
    out.extend_from_slice(payload);
}

/// Appends `PUBACK` for `pid` (success, no properties: the short form).
pub fn puback(out: &mut Vec<u8>, pid: u16) {
    out.extend_from_slice(&[PUBACK << 4, 2]);
    out.extend_from_slice(&pid.to_be_bytes());
}

/// The first whole packet of `buf` and its length; `Ok(None)` if more bytes are needed.
pub fn parse(buf: &[u8]) -> Result<Option<(Packet<'_>, usize)>, String> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let Some((length, header)) = read_length(&buf[1..])? else {
        return Ok(None);
    };
    let end = 1 + header + length;
    if buf.len() < end {
        return Ok(None);
    }
    let body = &buf[1 + header..end];
    let short = || format!("a short packet of type {}", first >> 4);
    let packet = match first >> 4 {
        CONNACK => Packet::ConnAck {
            reason: *body.get(1).ok_or_else(short)?,
        },
        SUBACK => {
            let (props, n) = read_length(body.get(2..).ok_or_else(short)?)?.ok_or_else(short)?;
            Packet::SubAck {
                reasons: body.get(2 + n + props..).ok_or_else(short)?,
            }
        }
        PUBACK => Packet::PubAck {
            reason: body.get(2).copied().unwrap_or(0),
        },
        PUBLISH => {
            let qos = (first >> 1) & 0x03;
            let topic = u16::from_be_bytes([
                *body.first().ok_or_else(short)?,
                *body.get(1).ok_or_else(short)?,
            ]) as usize;
            let mut at = 2 + topic;
            let pid = if qos > 0 {
                let id = body.get(at..at + 2).ok_or_else(short)?;
                at += 2;
                Some(u16::from_be_bytes([id[0], id[1]]))
            } else {
                None
            };
            let (props, n) = read_length(body.get(at..).ok_or_else(short)?)?.ok_or_else(short)?;
            Packet::Publish {
                pid,
                payload: body.get(at + n + props..).ok_or_else(short)?,
            }
        }
        other => Packet::Other(other),
    };
    Ok(Some((packet, end)))
}

fn packet(out: &mut Vec<u8>, first: u8, body: &[u8]) {
    out.push(first);
    remaining_length(out, body.len());
    out.extend_from_slice(body);
}

/// A length-prefixed string.
fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// A variable byte integer: seven bits a byte, low first, the high bit saying more follow.
fn remaining_length(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let byte = (n % 128) as u8;
        n /= 128;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// A variable byte integer at the start of `buf` and how many bytes it took; `Ok(None)` if
/// it is not all there yet.
fn read_length(buf: &[u8]) -> Result<Option<(usize, usize)>, String> {
    let mut n = 0usize;
    for (i, byte) in buf.iter().enumerate().take(MAX_LENGTH_BYTES) {
        n |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((n, i + 1)));
        }
    }
    if buf.len() >= MAX_LENGTH_BYTES {
        return Err("a length of more than four bytes".into());
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_take_one_to_four_bytes() {
        for (n, bytes) in [
            (0, vec![0]),
            (127, vec![0x7f]),
            (128, vec![0x80, 0x01]),
            (16_383, vec![0xff, 0x7f]),
            (2_097_152, vec![0x80, 0x80, 0x80, 0x01]),
        ] {
            let mut out = Vec::new();
            remaining_length(&mut out, n);
            assert_eq!(out, bytes);
            assert_eq!(read_length(&out), Ok(Some((n, bytes.len()))));
            assert_eq!(read_length(&out[..out.len() - 1]), Ok(None));
        }
        assert!(read_length(&[0x80, 0x80, 0x80, 0x80, 0x01]).is_err());
    }

    #[test]
    fn a_publish_parses_back_whole_and_not_before() {
        // As a broker sends it on: QoS 1, packet id 7, one property (a topic alias).
        let mut out = Vec::new();
        let payload = b"3:42:1000:....";
        let body: Vec<u8> = [&[0, 3][..], b"u/1", &[0, 7], &[3, 0x23, 0, 1], payload].concat();
        out.push(0x32);
        remaining_length(&mut out, body.len());
        out.extend_from_slice(&body);
        out.extend_from_slice(&[0x40, 2, 0, 9]); // and a PUBACK behind it
        for cut in 0..out.len() - 4 {
            assert_eq!(parse(&out[..cut]), Ok(None), "cut at {cut}");
        }
        let (packet, used) = parse(&out).unwrap().unwrap();
        assert_eq!(
            packet,
            Packet::Publish {
                pid: Some(7),
                payload
            }
        );
        assert_eq!(
            parse(&out[used..]),
            Ok(Some((Packet::PubAck { reason: 0 }, 4)))
        );
    }

    #[test]
    fn our_own_publish_reads_as_the_broker_would() {
        let mut out = Vec::new();
        publish(&mut out, b"g/4", 513, b"hello");
        let (packet, used) = parse(&out).unwrap().unwrap();
        assert_eq!(used, out.len());
        assert_eq!(
            packet,
            Packet::Publish {
                pid: Some(513),
                payload: b"hello"
            }
        );
    }

    #[test]
    fn answers_say_their_reasons() {
        assert_eq!(
            parse(&[0x20, 3, 0, 0x87, 0]),
            Ok(Some((Packet::ConnAck { reason: 0x87 }, 5)))
        );
        assert_eq!(
            parse(&[0x90, 4, 0, 1, 0, 1]),
            Ok(Some((Packet::SubAck { reasons: &[1] }, 6)))
        );
        assert_eq!(
            parse(&[0x40, 4, 0, 1, 0x97, 0]),
            Ok(Some((Packet::PubAck { reason: 0x97 }, 6)))
        );
        // Truncated inside: an error, not a panic.
        assert!(parse(&[0x20, 0]).is_err());
        assert!(parse(&[0x32, 1, 0]).is_err());
    }
}
