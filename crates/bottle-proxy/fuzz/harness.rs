//! The engine behind `tests/fuzz.rs`: a seeded, time-bounded, coverage-unguided mutation loop on stable Rust.
//! Seeds come from `fuzz/corpus/<target>/`; each iteration derives its own RNG from (seed, iteration), so any
//! single failing input can be rebuilt from two numbers without re-running the ones before it.
//!
//! Environment: `BOTTLE_FUZZ_SECONDS` (per target, default 3), `BOTTLE_FUZZ_SEED` (decimal or 0x-hex; default a
//! fixed seed so `cargo test` is reproducible; `random` picks one from the clock and prints it),
//! `BOTTLE_FUZZ_ITERATION` (run only that iteration: the replay of a reported failure).

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const DEFAULT_SECONDS: f64 = 3.0;
/// The default seed: fixed, so that a plain `cargo test` explores the same inputs on every machine.
const DEFAULT_SEED: u64 = 0xb077_1e5e_ed00_0003;
/// Mutants are capped so that one slow input cannot eat the budget.
const MAX_INPUT_BYTES: usize = 32 * 1024;
const MAX_MUTATIONS_PER_INPUT: usize = 6;

/// splitmix64: tiny, fast, good enough to drive mutations, and identical everywhere.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The RNG of one iteration: independent of every other iteration's.
    pub fn for_iteration(seed: u64, iteration: u64) -> Self {
        let mut r = Self(seed ^ iteration.wrapping_mul(0xd6e8_feb8_6659_fd93));
        r.next();
        r
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next() % n as u64) as usize
    }

    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// A size biased towards small values: 1, a handful, or anything up to `max`.
    pub fn size(&mut self, max: usize) -> usize {
        let max = max.max(1);
        match self.below(3) {
            0 => 1,
            1 => 1 + self.below(max.min(16)),
            _ => 1 + self.below(max),
        }
    }
}

/// Splits `data` into consecutive non-empty pieces of random sizes (single bytes, short runs, long runs): the
/// shapes in which a socket may deliver it. A lone piece is also possible.
pub fn pieces<'a>(data: &'a [u8], rng: &mut Rng) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    let style = rng.below(4);
    while !rest.is_empty() {
        let n = match style {
            0 => 1,
            1 => rng.size(8),
            2 => rng.size(rest.len()),
            _ => rest.len(),
        }
        .min(rest.len());
        let (head, tail) = rest.split_at(n);
        out.push(head);
        rest = tail;
    }
    out
}

/// Lengths that sit on parser boundaries: empty, one, sign bits, all ones.
const INTERESTING_U16: [u16; 8] = [0, 1, 2, 0x7f, 0x80, 0xff, 0x7fff, 0xffff];
const INTERESTING_BYTES: [u8; 12] = [0, 1, 0x7f, 0x80, 0xff, b'\r', b'\n', b' ', b':', b'.', b';', b'0'];

/// One mutant: a seed with 1–6 of bit flips, byte sets, inserts, deletes, truncation, splicing with another seed,
/// chunk duplication, dictionary tokens and interesting 16-bit lengths.
pub fn mutate(rng: &mut Rng, seeds: &[Vec<u8>], dict: &[&[u8]]) -> Vec<u8> {
    let mut data = rng.pick(seeds).clone();
    for _ in 0..1 + rng.below(MAX_MUTATIONS_PER_INPUT) {
        let len = data.len();
        match rng.below(10) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = if rng.one_in(2) {
                    *rng.pick(&INTERESTING_BYTES)
                } else {
                    rng.next() as u8
                };
            }
            2 => {
                let at = rng.below(len + 1);
                let fresh: Vec<u8> = (0..rng.size(8)).map(|_| rng.next() as u8).collect();
                data.splice(at..at, fresh);
            }
            3 if len > 0 => {
                let at = rng.below(len);
                let n = rng.size(len - at);
                data.drain(at..at + n);
            }
            4 if len > 0 => data.truncate(rng.below(len)),
            5 => {
                let other = rng.pick(seeds);
                let (cut_a, cut_b) = (rng.below(len + 1), rng.below(other.len() + 1));
                data.truncate(cut_a);
                data.extend_from_slice(&other[cut_b..]);
            }
            6 if len > 0 => {
                let at = rng.below(len);
                let n = rng.size(len - at);
                let chunk = data[at..at + n].to_vec();
                let to = rng.below(len + 1);
                for _ in 0..1 + rng.below(3) {
                    data.splice(to..to, chunk.iter().copied());
                }
            }
            7 | 8 if !dict.is_empty() => {
                let token = rng.pick(dict);
                let at = rng.below(len + 1);
                if rng.one_in(2) || at == len {
                    data.splice(at..at, token.iter().copied());
                } else {
                    let end = (at + token.len()).min(len);
                    data.splice(at..end, token.iter().copied());
                }
            }
            9 if len >= 2 => {
                let at = rng.below(len - 1);
                let value = if rng.one_in(2) {
                    *rng.pick(&INTERESTING_U16)
                } else {
                    // Off by a little from what is there: the classic length-field bug.
                    u16::from_be_bytes([data[at], data[at + 1]])
                        .wrapping_add(rng.below(5) as u16)
                        .wrapping_sub(2)
                };
                data[at..at + 2].copy_from_slice(&value.to_be_bytes());
            }
            _ => {}
        }
    }
    data.truncate(MAX_INPUT_BYTES);
    data
}

/// Where an input came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A corpus file or an extra seed, unchanged.
    Seed,
    Mutant,
    /// Built by the target's grammar: well-formed by construction.
    Generated,
}

/// One input handed to a target's check.
pub struct Input<'a> {
    pub bytes: &'a [u8],
    pub kind: Kind,
}

/// A fuzz target: where its seeds live, what to mutate with, and the check that holds its invariants.
pub struct Target<'a> {
    /// Also the corpus folder name and the test name to replay with.
    pub name: &'a str,
    pub dict: &'a [&'a [u8]],
    /// Seeds made at run time (e.g. ClientHellos from the rustls linked into this build), beside the corpus.
    pub extra_seeds: Vec<Vec<u8>>,
    /// Builds a well-formed input from scratch; used for one iteration in three when present.
    pub generate: Option<fn(&mut Rng) -> Vec<u8>>,
    /// Panics (assertions) on a violated invariant. Gets the iteration's RNG for splitting and variants.
    pub check: &'a dyn Fn(&Input<'_>, &mut Rng),
}

pub fn corpus_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(name)
}

/// The seed files of a target, in name order (so iteration numbers mean the same input everywhere).
pub fn corpus(name: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("fuzz corpus {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

struct Settings {
    seed: u64,
    budget: Duration,
    only: Option<u64>,
}

fn parse_u64(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16).ok(),
        None => s.replace('_', "").parse().ok(),
    }
}

fn settings() -> Settings {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let seed = match var("BOTTLE_FUZZ_SEED") {
        None => DEFAULT_SEED,
        Some(v) if v.trim() == "random" => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            Rng::new(now.as_nanos() as u64 ^ u64::from(std::process::id())).next()
        }
        Some(v) => parse_u64(&v).unwrap_or_else(|| panic!("BOTTLE_FUZZ_SEED={v}: a number, 0x-hex, or `random`")),
    };
    let seconds = var("BOTTLE_FUZZ_SECONDS").map_or(DEFAULT_SECONDS, |v| {
        v.trim()
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s >= 0.0)
            .unwrap_or_else(|| panic!("BOTTLE_FUZZ_SECONDS={v}: a number of seconds"))
    });
    let only = var("BOTTLE_FUZZ_ITERATION")
        .map(|v| parse_u64(&v).unwrap_or_else(|| panic!("BOTTLE_FUZZ_ITERATION={v}: a number")));
    Settings {
        seed,
        budget: Duration::from_secs_f64(seconds),
        only,
    }
}

fn hex_preview(bytes: &[u8]) -> String {
    const SHOWN: usize = 256;
    let mut s: String = bytes.iter().take(SHOWN).map(|b| format!("{b:02x}")).collect();
    if bytes.len() > SHOWN {
        s.push('…');
    }
    s
}

/// Runs every seed once, then mutants (and generated inputs) until the budget is spent. On a failed check:
/// saves the input, prints how to replay it, and re-raises the panic. Returns how many inputs ran.
pub fn run(target: Target<'_>) -> u64 {
    let settings = settings();
    let mut seeds: Vec<Vec<u8>> = corpus(target.name).into_iter().map(|(_, b)| b).collect();
    assert!(!seeds.is_empty(), "fuzz target {}: empty corpus", target.name);
    seeds.extend(target.extra_seeds.iter().cloned());
    let start = Instant::now();
    let iterations: Box<dyn Iterator<Item = u64>> = match settings.only {
        Some(i) => Box::new(std::iter::once(i)),
        None => Box::new(0..),
    };
    let mut ran = 0;
    for iteration in iterations {
        let seeds_done = iteration >= seeds.len() as u64;
        if settings.only.is_none() && seeds_done && start.elapsed() >= settings.budget {
            break;
        }
        let mut rng = Rng::for_iteration(settings.seed, iteration);
        let (bytes, kind) = match (
            usize::try_from(iteration).ok().and_then(|i| seeds.get(i)),
            target.generate,
        ) {
            (Some(seed), _) => (seed.clone(), Kind::Seed),
            (None, Some(generate)) if rng.one_in(3) => (generate(&mut rng), Kind::Generated),
            (None, _) => (mutate(&mut rng, &seeds, target.dict), Kind::Mutant),
        };
        let input = Input { bytes: &bytes, kind };
        let outcome = catch_unwind(AssertUnwindSafe(|| (target.check)(&input, &mut rng)));
        ran += 1;
        if let Err(panic) = outcome {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
            let file = dir.join(format!("{}-{:#x}-{iteration}.bin", target.name, settings.seed));
            let saved = std::fs::create_dir_all(&dir)
                .and_then(|()| std::fs::write(&file, &bytes))
                .map_or_else(|e| format!("(not saved: {e})"), |()| file.display().to_string());
            eprintln!(
                "\nfuzz target `{name}` failed on iteration {iteration} (seed {seed:#x}, {kind:?} input of {len} bytes)\n  \
                 replay: BOTTLE_FUZZ_SEED={seed:#x} BOTTLE_FUZZ_ITERATION={iteration} \
                 cargo test -p bottle-proxy --test fuzz {name}\n  saved: {saved}\n  \
                 keep it as a regression seed: cp {saved} {corpus}/\n  input: {hex}\n",
                name = target.name,
                seed = settings.seed,
                len = bytes.len(),
                corpus = corpus_dir(target.name).display(),
                hex = hex_preview(&bytes),
            );
            resume_unwind(panic);
        }
    }
    eprintln!(
        "fuzz {}: {ran} inputs ({} seeds) in {:.1?}, seed {:#x}",
        target.name,
        seeds.len(),
        start.elapsed(),
        settings.seed
    );
    ran
}
