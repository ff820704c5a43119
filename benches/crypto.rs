//! Per-message cryptography cost: `cargo bench --bench crypto`.
//!
//! Each operation runs for a fixed count (bounded time), and the mean time per operation is
//! printed. These are the figures in BENCHMARKS.md.

use std::hint::black_box;
use std::time::Instant;

use fastchat::crypto::{verify_signature, Identity, PairKey};

fn measure(name: &str, iterations: u32, mut op: impl FnMut()) {
    for _ in 0..iterations / 10 {
        op(); // warm-up
    }
    let start = Instant::now();
    for _ in 0..iterations {
        op();
    }
    let per_op = start.elapsed() / iterations;
    println!(
        "{name:<44} {:>9.2} µs/op  ({iterations} runs)",
        per_op.as_nanos() as f64 / 1000.0
    );
}

fn main() -> fastchat::Result<()> {
    let alice = Identity::generate()?;
    let bob = Identity::generate()?;
    let bob_public = bob.public()?;
    let key = alice.pair_key("alice", "bob", &bob_public.x25519)?;
    let aad = b"fastchat/dm/v1 alice bob 0123456789 1";
    let text = vec![b'x'; 100];
    let sealed = key.seal(aad, &text)?;
    let big = vec![b'y'; 16 * 1024];
    let signature = alice.sign(&sealed)?;
    let alice_public = alice.public()?;

    println!("fastchat crypto, mean per operation");
    measure("seal 100 B (AES-256-GCM, random nonce)", 200_000, || {
        black_box(key.seal(aad, black_box(&text)).unwrap());
    });
    measure("open 100 B (AES-256-GCM)", 200_000, || {
        black_box(key.open(aad, black_box(&sealed)).unwrap());
    });
    measure("seal 16 KiB", 20_000, || {
        black_box(key.seal(aad, black_box(&big)).unwrap());
    });
    measure(
        "pair key: X25519 + HKDF-SHA256 (once per peer)",
        5_000,
        || {
            black_box(alice.pair_key("alice", "bob", &bob_public.x25519).unwrap());
        },
    );
    measure("Ed25519 sign (group messages)", 5_000, || {
        black_box(alice.sign(black_box(&sealed)).unwrap());
    });
    measure("Ed25519 verify", 5_000, || {
        black_box(verify_signature(&alice_public.ed25519, &sealed, &signature).unwrap());
    });
    measure("random group/file key", 100_000, || {
        black_box(PairKey::random().unwrap());
    });
    Ok(())
}
