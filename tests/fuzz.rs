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
    decode, encode_into, Action, BalancerReply, BalancerRequest, Change, Envelope, ErrorCode,
    FrameReader, Greeting, GroupInfo, NewMessage, PeerMessage, PublicKeys, Refusal, Request,
    Response, ServerEvent, ServerInfo, ServerReply, ServerRequest, SignedChange, Welcome,
    WrappedKey, MAX_FRAME,
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
            name: self.s(),
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

    fn balancer_request(&mut self) -> Request<BalancerRequest> {
        let body = match self.0.below(8) {
            0 => BalancerRequest::Signup {
                name: self.s(),
                password: self.s(),
                keys: self.keys(),
                prekeys: None,
            },
            1 => BalancerRequest::Login {
                name: self.s(),
                password: self.s(),
                session_key: self.b(),
            },
            2 => BalancerRequest::Resume {
                token: self.s(),
                proof: self.b(),
                avoid: self.opt().map(|n| n as u64),
            },
            3 => BalancerRequest::Logout {
                token: self.s(),
                proof: self.b(),
            },
            4 => BalancerRequest::Servers,
            5 => BalancerRequest::Keys {
                name: self.s(),
                token: self.s(),
                proof: self.b(),
            },
            6 => BalancerRequest::Register {
                addr: self.s(),
                name: self.s(),
            },
            _ => BalancerRequest::Heartbeat {
                load: self.0.next() as u32,
                arrived: self.0.next(),
                counts: fastchat::net::Counts {
                    stored: self.0.next(),
                    delivered: self.0.next(),
                    relayed: self.0.next(),
                    links: vec![(self.0.next(), self.0.next())],
                },
            },
        };
        Request { id: self.n(), body }
    }

    fn refusal(&mut self) -> Refusal {
        Refusal {
            code: self.code(),
            message: self.s(),
        }
    }

    fn response<T>(&mut self, reply: impl FnOnce(&mut Gen) -> T) -> Response<T> {
        let id = self.opt().map(|n| n as u64);
        let result = if self.0.below(4) == 0 {
            Err(self.refusal())
        } else {
            Ok(reply(self))
        };
        Response { id, result }
    }

    fn balancer_reply(&mut self) -> Response<BalancerReply> {
        self.response(|g| match g.0.below(6) {
            0 => BalancerReply::Ok,
            1 => BalancerReply::LoggedIn {
                user: g.s(),
                token: g.s(),
                server: g.server(),
            },
            2 => BalancerReply::Servers {
                servers: (0..g.0.below(4)).map(|_| g.server()).collect(),
            },
            3 => BalancerReply::Keys {
                name: g.s(),
                keys: g.keys(),
            },
            4 => BalancerReply::Registered { server_id: g.n() },
            _ => BalancerReply::Peers {
                peers: (0..g.0.below(4)).map(|_| g.server()).collect(),
            },
        })
    }

    fn greeting(&mut self) -> Greeting {
        if self.0.below(2) == 0 {
            Greeting::Hello {
                token: self.s(),
                proof: self.b(),
            }
        } else {
            Greeting::Peer {
                server_id: self.n(),
            }
        }
    }

    fn peer_message(&mut self) -> PeerMessage {
        PeerMessage::Relay {
            msg: self.envelope(),
            users: (0..self.0.below(4)).map(|_| self.s()).collect(),
        }
    }

    fn server_request(&mut self) -> Request<ServerRequest> {
        let body = match self.0.below(16) {
            0 => ServerRequest::Send {
                to: self.s(),
                message: NewMessage {
                    client_id: self.n(),
                    body: self.b(),
                    file: self.opt(),
                    resend_after: self.opt(),
                    patient: false,
                },
            },
            1 => ServerRequest::Ack {
                msg_ids: (0..self.0.below(8)).map(|_| self.i()).collect(),
                quiet: self.0.below(2) == 0,
            },
            2..=4 => ServerRequest::GroupChange {
                change: SignedChange {
                    change: Change {
                        group: self.s(),
                        seq: self.n(),
                        prev: self.b(),
                        by: self.s(),
                        action: match self.0.below(4) {
                            0 => Action::Create,
                            1 => Action::Add(self.s()),
                            2 => Action::Remove(self.s()),
                            _ => Action::Leave,
                        },
                    },
                    signature: self.b(),
                },
                keys: self.wrapped(),
                client_id: self.n(),
            },
            5 => ServerRequest::GroupLog {
                group: self.s(),
                after: self.n(),
            },
            6 => ServerRequest::GroupRekey {
                group: self.s(),
                epoch: self.n(),
                keys: self.wrapped(),
            },
            7 => ServerRequest::GroupSend {
                group: self.s(),
                epoch: self.n(),
                message: NewMessage {
                    client_id: self.n(),
                    body: self.b(),
                    file: self.opt(),
                    resend_after: self.opt(),
                    patient: false,
                },
            },
            8 => ServerRequest::GroupList,
            9 => ServerRequest::GroupInfo { group: self.s() },
            10 => ServerRequest::GroupKey {
                group: self.s(),
                epoch: self.n(),
            },
            11 => ServerRequest::FileBegin {
                size: self.n(),
                chunks: self.n(),
            },
            12 => ServerRequest::FileChunk {
                upload: self.i(),
                index: self.n(),
                data: self.b(),
            },
            13 => ServerRequest::FileGet {
                msg_id: self.i(),
                index: self.n(),
            },
            14 => ServerRequest::Ping,
            _ => ServerRequest::Who,
        };
        Request { id: self.n(), body }
    }

    fn server_event(&mut self) -> ServerEvent {
        match self.0.below(4) {
            0 => ServerEvent::Welcome(Welcome {
                user: self.s(),
                server_id: self.n(),
                max_file: self.n(),
                newest: self.i(),
            }),
            1 => ServerEvent::Deliver {
                msg: self.envelope(),
            },
            2 => ServerEvent::Synced,
            _ => ServerEvent::Reply(self.response(|g| match g.0.below(8) {
                0 => ServerReply::Done,
                1 => ServerReply::Stored { msg_id: g.i() },
                2 => ServerReply::Groups {
                    groups: (0..g.0.below(3)).map(|_| g.group()).collect(),
                },
                3 => ServerReply::Group { group: g.group() },
                4 => ServerReply::Online {
                    users: (0..g.0.below(5)).map(|_| g.s()).collect(),
                },
                5 => ServerReply::Upload { upload: g.i() },
                6 => ServerReply::FileData { data: g.b() },
                _ => ServerReply::GroupKey {
                    wrapped_by: g.s(),
                    key: g.b(),
                },
            })),
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
    let _ = decode::<Request<BalancerRequest>>(body);
    let _ = decode::<Response<BalancerReply>>(body);
    let _ = decode::<Greeting>(body);
    let _ = decode::<Request<ServerRequest>>(body);
    let _ = decode::<ServerEvent>(body);
    let _ = decode::<PeerMessage>(body);
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
        match cases % 6 {
            0 => case(&mut rng, gen.balancer_request()),
            1 => case(&mut rng, gen.balancer_reply()),
            2 => case(&mut rng, gen.greeting()),
            3 => case(&mut rng, gen.server_request()),
            4 => case(&mut rng, gen.server_event()),
            _ => case(&mut rng, gen.peer_message()),
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
        match FrameReader::new(&bytes[..]).read::<Request<ServerRequest>>() {
            Err(fastchat::Error::FrameTooLarge { len: n, .. }) => assert_eq!(n, len as usize),
            other => panic!("{len}: {other:?}"),
        }
    }
}
