//! The policy loader under seeded mutation, in the test suite (as the proxy's parsers are, `bottle-proxy/fuzz`):
//! every shipped example, bad fixture and README block, mutated byte- and token-wise, must load or be refused with
//! one error that renders, never panic; and a file that is not a regular file (a FIFO) is refused without waiting.
//! Fixed seed, bounded count and time, so a failure reproduces.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bottle_policy::{Overrides, from_bytes, load_file};

const SEED: u64 = 0x5eed_b0771e;
const ITERATIONS: usize = 20_000;
const TIME_BUDGET: Duration = Duration::from_secs(4);

/// Tokens that steer mutations into the parser's corners: globs, wildcards, ports, brackets, escapes, addresses.
const TOKENS: &[&str] = &[
    "*",
    "**",
    "*.",
    ":*",
    ":0",
    ":65536",
    "[",
    "]",
    "{",
    "}",
    "{a,{b,{c}}}",
    "[!a-z]",
    "\\",
    "\"",
    "'",
    "=",
    "\n",
    "[[host]]\nname = \"a.test\"\n",
    "[[host.rule]]\n",
    "paths = [\"/**\"]\n",
    "query = { a = \"*\" }\n",
    "upgrades = [\"tcp\"]\n",
    "allow = [\"",
    "allow_cidr = [\"",
    "10.0.0.1:80",
    "[::1]:443",
    "::ffff:10.0.0.1",
    "64:ff9b:1::1",
    "xn--",
    "bücher.de",
    "\u{202e}",
    "\0",
    "%00",
    "%zz",
    ";",
    "..",
    "~/",
    "1e999",
    "-1",
];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for dir in ["examples", "crates/bottle-policy/tests/fixtures/bad"] {
        for entry in std::fs::read_dir(root().join(dir)).unwrap() {
            out.push(std::fs::read(entry.unwrap().path()).unwrap());
        }
    }
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    for block in readme.split("```toml\n").skip(1) {
        out.push(block.split("```").next().unwrap().as_bytes().to_vec());
    }
    out
}

fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(v.len() + 1);
        match rng.below(7) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            1 => {
                let t = TOKENS[rng.below(TOKENS.len())].as_bytes();
                v.splice(at..at, t.iter().copied());
            }
            2 if at < v.len() => {
                let end = (at + rng.below(64)).min(v.len());
                v.drain(at..end);
            }
            3 => {
                // A long run: a huge value or a very long line.
                let t = TOKENS[rng.below(TOKENS.len())].as_bytes();
                let times = 1 + rng.below(20_000 / t.len().max(1));
                let run: Vec<u8> = t.iter().copied().cycle().take(t.len() * times).collect();
                v.splice(at..at, run);
            }
            4 if !v.is_empty() => {
                let from = rng.below(v.len());
                let end = (from + rng.below(200)).min(v.len());
                let chunk = v[from..end].to_vec();
                v.splice(at..at, chunk);
            }
            5 => v.truncate(at),
            _ => v.insert(at, b"\n\"[]{}=,.:*"[rng.below(11)]),
        }
    }
    v
}

#[test]
fn mutated_policies_load_or_fail_with_one_error_and_never_panic() {
    let seeds = seeds();
    assert!(seeds.len() > 20, "seeds: {}", seeds.len());
    let mut rng = Rng(SEED);
    let start = Instant::now();
    let (mut loaded, mut refused, mut ran) = (0, 0, 0);
    while ran < ITERATIONS && start.elapsed() < TIME_BUDGET {
        let pick = rng.below(seeds.len());
        let input = mutate(&mut rng, &seeds[pick]);
        let result = std::panic::catch_unwind(|| match from_bytes(&input, None, &Overrides::default()) {
            Ok(_) => true,
            Err(e) => {
                let shown = e.to_string();
                assert!(!shown.is_empty());
                assert!(shown.len() < 8 * 1024, "an error of {} bytes", shown.len());
                false
            }
        });
        match result {
            Ok(true) => loaded += 1,
            Ok(false) => refused += 1,
            Err(_) => panic!(
                "the loader panicked on input #{ran} (seed {SEED:#x}):\n{}",
                String::from_utf8_lossy(&input)
            ),
        }
        ran += 1;
    }
    eprintln!("{ran} mutated policies: {loaded} loaded, {refused} refused");
    assert!(ran >= 500, "only {ran} inputs in the time budget");
    assert!(loaded > 0 && refused > 0, "mutations must reach both outcomes");
}

#[test]
fn a_fifo_given_as_the_policy_is_refused_without_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("policy.toml");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(load_file(&fifo, &Overrides::default()).map(|_| ()));
    });
    let err = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("load_file waited on a FIFO")
        .unwrap_err();
    assert!(err.to_string().contains("not a regular file"), "{err}");
}

#[test]
fn huge_globs_are_refused_with_a_reason() {
    let many = "{a,b}".repeat(100);
    for (glob, why) in [
        (format!("/{}", "a".repeat(5000)), "longer than"),
        (format!("/{many}"), "groups"),
    ] {
        let text = format!("[[host]]\nname = \"a.test\"\n[[host.rule]]\npaths = [\"{glob}\"]\n");
        let err = from_bytes(text.as_bytes(), None, &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains(why), "{err}");
    }
}
