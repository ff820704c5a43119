//! Fuzzing the frame decoder, for a bounded time: random values of every message of every link
//! survive encoding and decoding unchanged, and mutated frames (flipped, cut, stretched,
//! re-lengthed) are always either decoded or refused, never a panic or a huge allocation.
//!
//! Runs for `FASTCHAT_FUZZ_SECS` seconds (default 3) or 200,000 cases, whichever comes first;
//! set a larger value to search longer. Each run draws a new seed and prints it;
//! `FASTCHAT_FUZZ_SEED` replays one.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Rng;
use fastchat::net::{
    decode, encode_into, BalancerReply, BalancerRequest, Envelope, ErrorCode, FrameReader,
    GroupInfo, PublicKeys, ServerEvent, ServerInfo, ServerRequest, WrappedKey, MAX_FRAME,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

fn budget() -> Duration {
    let secs = std::env::var("FASTCHAT_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(secs.clamp(0.1, 24.0 * 3600.0))
}

/// A generator of random but well-formed messages.
struct Gen(Rng);

impl Gen {
    fn n(&mut self) -> u64 {
        match self.0.below(4) {
            0 => 0,
            1 => u64::MAX,
            _ => self.0.next(),
        }
    }
    fn i(&mut self) -> i64 {
        self.n() as i64
    }
    fn s(&mut self) -> String {
        let len = self.0.below(40);
        (0..len)
            .map(|_| char::from_u32(self.0.below(0x3000) as u32).unwrap_or('x'))
            .collect()
    }
    fn b(&mut self) -> Vec<u8> {
        let len = self.0.below(200);
        self.0.bytes(len)
    }
    fn keys(&mut self) -> PublicKeys {
        PublicKeys {
            x25519: self.b(),
            ed25519: self.b(),
        }
    }
    fn server(&mut self) -> ServerInfo {
        ServerInfo {
            id: self.n(),
            addr: self.s(),
            load: self.0.next() as u32,
        }
    }
    fn envelope(&mut self) -> Arc<Envelope> {
        Arc::new(Envelope {
            id: self.i(),
            from: self.s(),
            to: self.s(),
            group: if self.0.below(2) == 0 {
                None
            } else {
                Some(self.s())
            },
            client_id: self.n(),
            body: self.b(),
            sent_at: self.i(),
        })
    }
    fn opt(&mut self) -> Option<i64> {
        if self.0.below(2) == 0 {
            None
        } else {
            Some(self.i())
        }
    }
    fn code(&mut self) -> ErrorCode {
        [
            ErrorCode::BadFrame,
            ErrorCode::InvalidToken,
            ErrorCode::Conflict,
            ErrorCode::RateLimited,
            ErrorCode::Internal,
        ][self.0.below(5)]
    }
    fn wrapped(&mut self) -> Vec<WrappedKey> {
        (0..self.0.below(4))
            .map(|_| WrappedKey {
                member: self.s(),
                wrapped: self.b(),
            })
            .collect()
    }

    fn balancer_request(&mut self) -> BalancerRequest {
        let id = self.n();
        match self.0.below(8) {
            0 => BalancerRequest::Signup {
                id,
                name: self.s(),
                password: self.s(),
                keys: self.keys(),
            },
            1 => BalancerRequest::Login {
                id,
                name: self.s(),
                password: self.s(),
            },
            2 => BalancerRequest::Resume {
                id,
                token: self.s(),
                avoid: self.opt().map(|v| v as u64),
            },
            3 => BalancerRequest::Logout {
                id,
                token: self.s(),
            },
            4 => BalancerRequest::Servers { id },
            5 => BalancerRequest::Keys { id, name: self.s() },
            6 => BalancerRequest::Register {
                id,
                addr: self.s(),
                server_id: self.opt().map(|v| v as u64),
                secret: self.b(),
                cluster_key: self.b(),
            },
            _ => BalancerRequest::Heartbeat {
                id,
                load: self.0.next() as u32,
            },
        }
    }

    fn balancer_reply(&mut self) -> BalancerReply {
        let id = self.n();
        match self.0.below(7) {
            0 => BalancerReply::Ok { id },
            1 => BalancerReply::LoggedIn {
                id,
                user: self.s(),
                token: self.s(),
                server: self.server(),
            },
            2 => BalancerReply::Servers {
                id,
                servers: (0..self.0.below(4)).map(|_| self.server()).collect(),
            },
            3 => BalancerReply::Keys {
                id,
                name: self.s(),
                keys: self.keys(),
            },
            4 => BalancerReply::Registered {
                id,
                server_id: self.n(),
            },
            5 => BalancerReply::Peers {
                id,
                peers: (0..self.0.below(4)).map(|_| self.server()).collect(),
            },
            _ => BalancerReply::Error {
                id: self.opt().map(|v| v as u64),
                code: self.code(),
                message: self.s(),
            },
        }
    }

    fn server_request(&mut self) -> ServerRequest {
        let id = self.n();
        match self.0.below(17) {
            0 => ServerRequest::Hello {
                id,
                token: self.s(),
            },
            1 => ServerRequest::Send {
                id,
                to: self.s(),
                client_id: self.n(),
                body: self.b(),
                file: self.opt(),
                resend_after: self.opt(),
            },
            2 => ServerRequest::Ack {
                id,
                msg_ids: (0..self.0.below(8)).map(|_| self.i()).collect(),
            },
            3 => ServerRequest::GroupCreate {
                id,
                group: self.s(),
                key: self.b(),
            },
            4 => ServerRequest::GroupAdd {
                id,
                group: self.s(),
                user: self.s(),
                epoch: self.n(),
                key: self.b(),
            },
            5 => ServerRequest::GroupRemove {
                id,
                group: self.s(),
                user: self.s(),
                epoch: self.n(),
                keys: self.wrapped(),
            },
            6 => ServerRequest::GroupLeave {
                id,
                group: self.s(),
            },
            7 => ServerRequest::GroupRekey {
                id,
                group: self.s(),
                epoch: self.n(),
                keys: self.wrapped(),
            },
            8 => ServerRequest::GroupSend {
                id,
                group: self.s(),
                client_id: self.n(),
                epoch: self.n(),
                body: self.b(),
                file: self.opt(),
                resend_after: self.opt(),
            },
            9 => ServerRequest::GroupList { id },
            10 => ServerRequest::GroupInfo {
                id,
                group: self.s(),
            },
            11 => ServerRequest::GroupKey {
                id,
                group: self.s(),
                epoch: self.n(),
            },
            12 => ServerRequest::FileBegin {
                id,
                size: self.n(),
                chunks: self.n(),
            },
            13 => ServerRequest::FileChunk {
                id,
                upload: self.i(),
                index: self.n(),
                data: self.b(),
            },
            14 => ServerRequest::FileGet {
                id,
                msg_id: self.i(),
                index: self.n(),
            },
            15 => ServerRequest::PeerHello {
                server_id: self.n(),
                secret: self.b(),
            },
            _ => ServerRequest::Relay {
                msg: self.envelope(),
                users: (0..self.0.below(4)).map(|_| self.s()).collect(),
            },
        }
    }

    fn server_event(&mut self) -> ServerEvent {
        let id = self.n();
        match self.0.below(13) {
            0 => ServerEvent::Welcome {
                id,
                user: self.s(),
                server_id: self.n(),
                max_file: self.n(),
                newest: self.i(),
            },
            1 => ServerEvent::Stored {
                id,
                msg_id: self.i(),
            },
            2 => ServerEvent::Acked { id },
            3 => ServerEvent::Done { id },
            4 => ServerEvent::Groups {
                id,
                groups: (0..self.0.below(3)).map(|_| self.group()).collect(),
            },
            5 => ServerEvent::Group {
                id,
                group: self.group(),
            },
            6 => ServerEvent::Upload {
                id,
                upload: self.i(),
            },
            7 => ServerEvent::FileData { id, data: self.b() },
            8 => ServerEvent::GroupKey {
                id,
                wrapped_by: self.s(),
                key: self.b(),
            },
            9 => ServerEvent::Deliver {
                msg: self.envelope(),
            },
            10 => ServerEvent::Synced,
            _ => ServerEvent::Error {
                id: self.opt().map(|v| v as u64),
                code: self.code(),
                message: self.s(),
            },
        }
    }

    fn group(&mut self) -> GroupInfo {
        GroupInfo {
            name: self.s(),
            admin: self.s(),
            members: (0..self.0.below(5)).map(|_| self.s()).collect(),
            epoch: self.n(),
            keyed: self.0.below(2) == 0,
        }
    }
}

/// One case: `value` round-trips; its frame, mutated, decodes or is refused.
fn case<T>(rng: &mut Rng, value: T)
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let mut bytes = Vec::new();
    encode_into(&mut bytes, &value).unwrap();
    let mut reader = FrameReader::new(&bytes[..]);
    assert_eq!(reader.read::<T>().unwrap().as_ref(), Some(&value));
    rng.mutate(&mut bytes);
    // Two frames in a row, so a bad length also desynchronises what follows.
    let copy = bytes.clone();
    bytes.extend_from_slice(&copy);
    let mut reader = FrameReader::new(&bytes[..]);
    for _ in 0..3 {
        match reader.read::<T>() {
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    // And the bare body through every decoder.
    let body = bytes.get(4..).unwrap_or(&[]);
    let _ = decode::<BalancerRequest>(body);
    let _ = decode::<BalancerReply>(body);
    let _ = decode::<ServerRequest>(body);
    let _ = decode::<ServerEvent>(body);
}

#[test]
fn every_message_round_trips_and_mutated_frames_never_panic() {
    // A new seed each run explores further over time; FASTCHAT_FUZZ_SEED replays one.
    let seed = std::env::var("FASTCHAT_FUZZ_SEED")
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .unwrap_or_else(|| fastchat::crypto::random_u64().unwrap_or(1));
    println!("fuzz seed {seed:#x} (FASTCHAT_FUZZ_SEED={seed:x} replays it)");
    let mut rng = Rng::new(seed);
    let mut gen = Gen(Rng::new(seed.rotate_left(17)));
    let started = Instant::now();
    let budget = budget();
    let mut cases = 0u64;
    let limit = if std::env::var("FASTCHAT_FUZZ_SECS").is_ok() {
        u64::MAX
    } else {
        200_000
    };
    while started.elapsed() < budget && cases < limit {
        match cases % 4 {
            0 => case(&mut rng, gen.balancer_request()),
            1 => case(&mut rng, gen.balancer_reply()),
            2 => case(&mut rng, gen.server_request()),
            _ => case(&mut rng, gen.server_event()),
        }
        cases += 1;
    }
    println!("{cases} cases in {:?}", started.elapsed());
    assert!(cases >= 1000, "only {cases} cases in {budget:?}");
}

#[test]
fn a_length_over_the_limit_is_refused_before_anything_is_read() {
    for len in [MAX_FRAME as u32 + 1, u32::MAX / 2, u32::MAX] {
        // Nothing follows the prefix: had the reader tried to allocate and fill `len` bytes,
        // it would report a truncated frame instead.
        let bytes = len.to_be_bytes();
        match FrameReader::new(&bytes[..]).read::<ServerRequest>() {
            Err(fastchat::Error::FrameTooLarge(n)) => assert_eq!(n, len as usize),
            other => panic!("{len}: {other:?}"),
        }
    }
}
