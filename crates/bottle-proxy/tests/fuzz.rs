//! Fuzzing on stable Rust for the three parsers that read bottle-controlled bytes: the HTTP/1 request-framing
//! tracker (the smuggling guard), the TLS ClientHello/SNI peeker, and the policy's host matcher. Each test runs
//! the corpus in `fuzz/corpus/<target>/`, then seeded mutants for `BOTTLE_FUZZ_SECONDS` (default 3), and holds
//! invariants, not just "no panic". The engine is `fuzz/harness.rs`; what this is and is not: `fuzz/README.md`.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

#[path = "../fuzz/harness.rs"]
mod harness;

use std::collections::VecDeque;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};

use bottle_policy::host::{HostName, HostPattern, NamePattern, PatternUse, PortSpec};
use bottle_policy::{HostRule, HostVerdict, Network, Origin, TlsMode};
use bottle_proxy::fuzzing::{
    DenyReason, Hello, HelloError, Target as Dest, Tracker, check_same_host, decide_target, parse_authority,
    read_client_hello,
};
use harness::{Input, Kind, Rng, Target, pieces};
use tokio::io::{AsyncRead, ReadBuf};

// ---------------------------------------------------------------------------------------------------------------
// HTTP/1 request framing

/// A head that must always be refused when it arrives where a request head is expected.
const SMUGGLE: &[u8] = b"POST /s HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";

const FRAMING_DICT: &[&[u8]] = &[
    b"\r\n",
    b"\r\n\r\n",
    b"\n\n",
    b"Content-Length: ",
    b"content-length:5",
    b"Content-Length: 0\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"transfer-encoding:CHUNKED",
    b"Upgrade: h2c\r\n",
    b"CONNECT ",
    b"POST / HTTP/1.1\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"0\r\n\r\n",
    b"ffffffffffffffff\r\n",
    b";ext=1",
    b"18446744073709551616",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
];

/// Feeds the pieces in order; the verdict (`Err` text) and the tracker, for probing its state afterwards.
fn feed(pieces: &[&[u8]]) -> (Result<(), String>, Tracker) {
    let mut t = Tracker::default();
    let verdict = pieces.iter().try_for_each(|p| t.feed(p)).map_err(|e| e.to_string());
    (verdict, t)
}

fn has_blank_line(bytes: &[u8]) -> bool {
    bytes.windows(2).any(|w| w == b"\n\n") || bytes.windows(3).any(|w| w == b"\n\r\n")
}

fn contains_ci(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle))
}

fn check_framing(input: &Input<'_>, rng: &mut Rng) {
    let bytes = input.bytes;
    let (whole, mut whole_tracker) = feed(&[bytes]);
    let split = pieces(bytes, rng);
    let sizes: Vec<usize> = split.iter().map(|p| p.len()).collect();
    let (parts, mut parts_tracker) = feed(&split);
    // Incremental parsing: how the socket chopped the stream must not change the verdict.
    assert_eq!(whole, parts, "verdict depends on the read sizes {sizes:?}");
    if bytes.len() <= 4096 && rng.one_in(4) {
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(whole, feed(&singles).0, "verdict differs when fed byte by byte");
    }
    match &whole {
        Ok(()) => {
            // Same state after either split: both react alike to what follows.
            for probe in [SMUGGLE, b"0\r\n\r\n".as_slice()] {
                let a = whole_tracker.feed(probe).map_err(|e| e.to_string());
                let b = parts_tracker.feed(probe).map_err(|e| e.to_string());
                assert_eq!(a, b, "trackers diverged after split {sizes:?}");
            }
        }
        Err(_) => {
            // The refusal is decided by bytes already fed, at the byte that ends a head: find the shortest prefix
            // refused (monotone: a refused prefix stays refused) and check it really holds such a head.
            let (mut lo, mut hi) = (0, bytes.len());
            while lo < hi {
                let mid = (lo + hi) / 2;
                if feed(&[&bytes[..mid]]).0.is_err() {
                    hi = mid;
                } else {
                    lo = mid + 1;
                }
            }
            let prefix = &bytes[..lo];
            assert!(prefix.ends_with(b"\n"), "refused before a head ended: {lo} bytes");
            assert!(
                has_blank_line(prefix)
                    && contains_ci(prefix, b"content-length")
                    && contains_ci(prefix, b"transfer-encoding"),
                "refused without a head carrying both Content-Length and Transfer-Encoding"
            );
        }
    }
    if input.kind == Kind::Generated {
        // A well-formed pipelined stream is never refused, and leaves the tracker at a message boundary: a
        // smuggling head right after it must be caught (the guard did not lose its place in any body).
        assert_eq!(whole, Ok(()), "a well-formed stream was refused");
        let mut t = Tracker::default();
        for p in &split {
            t.feed(p).unwrap();
        }
        assert!(
            t.feed(SMUGGLE).is_err(),
            "lost track of the framing: CL+TE after a valid stream passed"
        );
    }
}

fn random_case(rng: &mut Rng, s: &str) -> String {
    s.chars()
        .map(|c| {
            if rng.one_in(2) {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect()
}

/// Body bytes that look like framing, to tempt a tracker that confuses body and head.
fn body(rng: &mut Rng) -> Vec<u8> {
    const TRAPS: [&[u8]; 5] = [SMUGGLE, b"\r\n\r\n", b"0\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n", b"\n\n"];
    let mut b = Vec::new();
    for _ in 0..rng.below(4) {
        if rng.one_in(2) {
            let trap: &&[u8] = rng.pick(&TRAPS);
            b.extend_from_slice(trap);
        } else {
            b.extend((0..rng.size(40)).map(|_| rng.next() as u8));
        }
    }
    b
}

/// A well-formed pipelined HTTP/1.1 request stream: bodiless requests, Content-Length bodies, chunked bodies with
/// extensions and trailers; random header case, optional whitespace, CRLF or bare LF line ends.
fn well_formed_stream(rng: &mut Rng) -> Vec<u8> {
    let eol: &[u8] = if rng.one_in(4) { b"\n" } else { b"\r\n" };
    let mut out = Vec::new();
    for n in 0..1 + rng.below(4) {
        if rng.one_in(6) {
            out.extend_from_slice(eol); // RFC 9112 §2.2: tolerated before a request line
        }
        let kind = rng.below(3);
        let method = match kind {
            0 => *rng.pick(&["GET", "HEAD", "DELETE", "OPTIONS"]),
            _ => *rng.pick(&["POST", "PUT", "PATCH"]),
        };
        out.extend_from_slice(format!("{method} /r{n}?q={n} HTTP/1.1").as_bytes());
        out.extend_from_slice(eol);
        let header = |out: &mut Vec<u8>, rng: &mut Rng, name: &str, value: &str| {
            let ws = if rng.one_in(3) { "" } else { " " };
            out.extend_from_slice(format!("{}:{ws}{value}{ws}", random_case(rng, name)).as_bytes());
            out.extend_from_slice(eol);
        };
        header(&mut out, rng, "Host", "a.test");
        if rng.one_in(2) {
            header(&mut out, rng, "X-Note", "content-length transfer-encoding");
        }
        match kind {
            0 => out.extend_from_slice(eol),
            1 => {
                let b = body(rng);
                header(&mut out, rng, "Content-Length", &b.len().to_string());
                out.extend_from_slice(eol);
                out.extend_from_slice(&b);
            }
            _ => {
                header(&mut out, rng, "Transfer-Encoding", "chunked");
                out.extend_from_slice(eol);
                for _ in 0..rng.below(4) {
                    let b = body(rng);
                    if b.is_empty() {
                        continue;
                    }
                    let size = format!("{:0width$x}", b.len(), width = rng.below(4));
                    out.extend_from_slice(random_case(rng, &size).as_bytes());
                    if rng.one_in(3) {
                        out.extend_from_slice(b";ext=1");
                    }
                    out.extend_from_slice(eol);
                    out.extend_from_slice(&b);
                    out.extend_from_slice(eol);
                }
                out.extend_from_slice(b"0");
                out.extend_from_slice(eol);
                for i in 0..rng.below(3) {
                    header(&mut out, rng, "X-Trailer", &i.to_string());
                }
                out.extend_from_slice(eol);
            }
        }
    }
    out
}

#[test]
fn http1_framing() {
    harness::run(Target {
        name: "http1_framing",
        dict: FRAMING_DICT,
        extra_seeds: Vec::new(),
        generate: Some(well_formed_stream),
        check: &check_framing,
    });
}

/// The guard is the only line against CL+TE: hyper drops the `Content-Length` of such a request before the proxy
/// sees it (so `check_framing` in exchange.rs cannot), processes it as chunked, and the proxy forwards it.
/// Regression: the guard once gave up following the stream (letting a later CL+TE head through) after a
/// chunk-size line over 4 KiB, which hyper accepts (16 KiB of chunk extensions, `CHUNKED_EXTENSIONS_LIMIT`).
#[test]
fn framing_guard_keeps_following_after_a_long_chunk_extension() {
    let first = format!(
        "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;x={}\r\nhello\r\n0\r\n\r\n",
        "a".repeat(5000)
    );
    let mut t = Tracker::default();
    t.feed(first.as_bytes()).unwrap();
    assert!(
        t.feed(SMUGGLE).is_err(),
        "a CL+TE head after a long chunk extension passed the guard"
    );
}

// ---------------------------------------------------------------------------------------------------------------
// TLS ClientHello / SNI

const HELLO_DICT: &[&[u8]] = &[
    b"\x16\x03\x01",
    b"\x16\x03\x03\x00\x01",
    b"\x00\x00",                              // server_name extension type
    b"\xfe\x0d",                              // encrypted_client_hello
    b"\x00\x10",                              // ALPN
    b"\x00\x00\x05\x00\x03\x00\x00\x00",      // server_name, empty host
    b"\x00\x00\x0a\x00\x08\x00\x00\x05a.com", // server_name "a.com"
    b"\x01\x00\xff\xff",
];

/// A reader that hands out the pieces one read at a time and never blocks (then EOF).
struct Pieces(VecDeque<Vec<u8>>);

impl AsyncRead for Pieces {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if let Some(front) = self.0.front_mut() {
            let n = front.len().min(buf.remaining());
            buf.put_slice(&front[..n]);
            front.drain(..n);
            if front.is_empty() {
                self.0.pop_front();
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Runs the proxy's peeker over `pieces`. The reader never returns `Pending`, so one poll must finish it.
fn peek(pieces: &[&[u8]]) -> Result<Hello, HelloError> {
    let mut reader = Pieces(pieces.iter().filter(|p| !p.is_empty()).map(|p| p.to_vec()).collect());
    let mut fut = std::pin::pin!(read_client_hello(&mut reader));
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(result) => result,
        Poll::Pending => panic!("the peeker waited on a reader that never blocks"),
    }
}

/// The handshake bytes carried by the TLS records in `raw`, record headers removed (a ClientHello, and so its
/// server name, may span records).
fn handshake_bytes(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = raw;
    while rest.len() >= 5 {
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        let end = (5 + len).min(rest.len());
        out.extend_from_slice(&rest[5..end]);
        rest = &rest[end..];
    }
    out
}

fn outcome(r: &Result<Hello, HelloError>) -> String {
    match r {
        Ok(h) => format!("ok sni={:?} ech={}", h.sni, h.ech),
        Err(e) => format!("err {e}"),
    }
}

/// rustls's own reading of the same bytes: `Some(server_name)` when its Acceptor takes the ClientHello.
fn rustls_server_name(bytes: &[u8]) -> Option<Option<String>> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rest = bytes;
    loop {
        match acceptor.read_tls(&mut rest) {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => return Some(accepted.client_hello().server_name().map(str::to_owned)),
            Ok(None) => {}
            Err(_) => return None,
        }
    }
}

fn normalise_sni(s: &str) -> String {
    s.trim_end_matches('.').to_ascii_lowercase()
}

fn check_client_hello(input: &Input<'_>, rng: &mut Rng) {
    let bytes = input.bytes;
    let whole = peek(&[bytes]);
    let split = pieces(bytes, rng);
    let sizes: Vec<usize> = split.iter().map(|p| p.len()).collect();
    let parts = peek(&split);
    assert_eq!(
        outcome(&whole),
        outcome(&parts),
        "result depends on the read sizes {sizes:?}"
    );
    if let Ok(hello) = &whole {
        // What the proxy replays (to its TLS acceptor, or to a passthrough upstream) is exactly what was sent.
        assert!(bytes.starts_with(&hello.raw), "raw is not a prefix of the stream");
        assert_eq!(hello.raw.first(), Some(&0x16));
        if let Some(sni) = &hello.sni {
            let message = handshake_bytes(&hello.raw);
            assert!(
                sni.is_empty() || message.windows(sni.len()).any(|w| w == sni.as_bytes()),
                "SNI {sni:?} is not a substring of the ClientHello message"
            );
        }
        // The whole hello is inside `raw`: replaying raw alone gives the same answer.
        assert_eq!(
            outcome(&peek(&[&hello.raw])),
            outcome(&whole),
            "raw does not hold the whole hello"
        );
        if let Ok(p) = &parts {
            assert!(
                bytes.starts_with(&p.raw),
                "raw (split reads) is not a prefix of the stream"
            );
        }
    }
    // Differential: when rustls takes the hello and finds a server name, the peeker must not see another name, or
    // none (a proxy and an upstream that disagree on the name is how SNI-based policy is bypassed). Refusing a
    // mutant rustls tolerates is fail-closed and fine; refusing a real client's hello (a seed) is not.
    if let Some(theirs) = rustls_server_name(bytes) {
        let ours = whole.as_ref().map(|h| h.sni.clone());
        match (&theirs, &ours) {
            (Some(t), Ok(Some(o))) => assert_eq!(normalise_sni(t), normalise_sni(o), "SNI differs from rustls"),
            (Some(t), Ok(None)) => panic!("rustls reads SNI {t:?}; the peeker finds none"),
            (_, Err(e)) if input.kind == Kind::Seed => panic!("rustls accepts this seed; the peeker refuses it: {e}"),
            (_, _) => {}
        }
    }
}

/// ClientHellos from the rustls linked into this build: (seed name, bytes, expected SNI).
fn rustls_client_hellos() -> Vec<(&'static str, Vec<u8>, Option<&'static str>)> {
    use rustls::pki_types::ServerName;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cases = [
        ("rustls-sni-alpn-h2.bin", "api.example.test", true, false, true),
        ("rustls-sni-no-alpn.bin", "api.example.test", false, false, true),
        ("rustls-tls12-only.bin", "old.example.test", true, true, true),
        ("rustls-ip-literal-no-sni.bin", "127.0.0.1", true, false, true),
        ("rustls-sni-disabled.bin", "api.example.test", true, false, false),
    ];
    cases
        .into_iter()
        .map(|(file, server, alpn, tls12_only, sni)| {
            let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider));
            let builder = if tls12_only {
                builder.with_protocol_versions(&[&rustls::version::TLS12])
            } else {
                builder.with_safe_default_protocol_versions()
            };
            let mut config = builder
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            if alpn {
                config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            }
            config.enable_sni = sni;
            let name = ServerName::try_from(server.to_string()).unwrap();
            let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
            let mut bytes = Vec::new();
            while conn.wants_write() {
                conn.write_tls(&mut bytes).unwrap();
            }
            let expected = (sni && server.parse::<IpAddr>().is_err()).then_some(server);
            (file, bytes, expected)
        })
        .collect()
}

#[test]
fn tls_client_hello() {
    let live = rustls_client_hellos();
    for (file, bytes, expected) in &live {
        let hello = peek(&[bytes]).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(hello.sni.as_deref(), *expected, "{file}");
    }
    harness::run(Target {
        name: "tls_client_hello",
        dict: HELLO_DICT,
        extra_seeds: live.into_iter().map(|(_, b, _)| b).collect(),
        generate: None,
        check: &check_client_hello,
    });
}

/// Rewrites the rustls seeds in the corpus from the rustls in this build:
/// `cargo test -p bottle-proxy --test fuzz -- --ignored capture_rustls_client_hellos`.
#[test]
#[ignore = "writes into fuzz/corpus; run by hand after a rustls upgrade"]
fn capture_rustls_client_hellos() {
    for (file, bytes, _) in rustls_client_hellos() {
        std::fs::write(harness::corpus_dir("tls_client_hello").join(file), bytes).unwrap();
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Policy host matching

const HOST_DICT: &[&[u8]] = &[
    b"*.",
    b".",
    b"..",
    b":",
    b":443",
    b":*",
    b"[",
    b"]",
    b"0x",
    b"xn--",
    b"-",
    b"_",
    b"@",
    b"%2e",
    "ß".as_bytes(),
    "İ".as_bytes(),
    "．".as_bytes(),
    "。".as_bytes(),
    "\u{200d}".as_bytes(),
    "\u{0301}".as_bytes(),
    "１".as_bytes(),
    "①".as_bytes(),
    "﹡".as_bytes(),
    "Ｅ".as_bytes(),
];

/// glibc `inet_aton` (without its trailing-whitespace leniency): 1–4 parts, decimal, 0-octal or 0x-hex, the
/// last part filling the remaining bytes. A string it accepts is an IPv4 address, whatever it looks like.
fn inet_aton(s: &str) -> Option<u32> {
    let parts: Vec<&str> = s.split('.').collect();
    if parts.len() > 4 {
        return None;
    }
    let mut values = Vec::new();
    for p in &parts {
        let (digits, radix) = match p.strip_prefix("0x").or_else(|| p.strip_prefix("0X")) {
            Some(h) => (h, 16),
            None if p.len() > 1 && p.starts_with('0') => (&p[1..], 8),
            None => (*p, 10),
        };
        if (digits.is_empty() && radix != 16) || !digits.chars().all(|c| c.is_digit(radix)) {
            return None;
        }
        values.push(if digits.is_empty() {
            0
        } else {
            u64::from_str_radix(digits, radix).ok()?
        });
    }
    let (last, init) = values.split_last()?;
    if init.iter().any(|v| *v > 255) || *last >= 1u64 << (8 * (4 - init.len())) {
        return None;
    }
    let high = init
        .iter()
        .enumerate()
        .fold(0u64, |acc, (i, v)| acc | v << (24 - 8 * i));
    u32::try_from(high | last).ok()
}

/// ASCII case flipped at random, and a trailing dot: spellings of the same host.
fn variants(rng: &mut Rng, s: &str) -> Vec<String> {
    let mut v = vec![random_case(rng, s), s.to_ascii_uppercase()];
    if !s.ends_with('.') {
        v.push(format!("{s}."));
        v.push(format!("{}.", random_case(rng, s)));
    }
    v
}

fn check_name(s: &str, rng: &mut Rng) -> Option<HostName> {
    let parsed = HostName::parse(s);
    for v in variants(rng, s) {
        let other = HostName::parse(&v);
        match (&parsed, &other) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{s:?} and {v:?} normalise differently"),
            (Err(a), Err(b)) => assert_eq!(std::mem::discriminant(a), std::mem::discriminant(b), "{s:?} / {v:?}"),
            _ => panic!("{s:?} → {parsed:?} but {v:?} → {other:?}"),
        }
    }
    let name = parsed.ok()?;
    let n = name.as_str();
    assert!(n.len() <= 253 && !n.is_empty(), "{n:?}");
    for label in n.split('.') {
        assert!((1..=63).contains(&label.len()), "bad label in {n:?}");
        assert!(!label.starts_with('-') && !label.ends_with('-'), "{n:?}");
        assert!(
            label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        );
    }
    // SECURITY: a name that any resolver would read as an address must never be treated as a name.
    assert!(
        n.parse::<IpAddr>().is_err() && inet_aton(n).is_none(),
        "{s:?} → {n:?} spells an address"
    );
    assert_eq!(
        HostName::parse(n).as_ref(),
        Ok(&name),
        "normalisation is not idempotent"
    );
    Some(name)
}

fn check_pattern(s: &str, rng: &mut Rng) -> Option<HostPattern> {
    let allow = HostPattern::parse(s, PatternUse::Allow);
    let deny = HostPattern::parse(s, PatternUse::Deny);
    if let Ok(p) = &allow {
        // Deny accepts everything allow does; a port-less deny entry covers every port (deny wins everywhere).
        let d = deny
            .as_ref()
            .unwrap_or_else(|e| panic!("{s:?}: allowed as an allow pattern, refused as a deny pattern: {e}"));
        assert_eq!(d.name, p.name, "{s:?}");
        let want = if p.port == PortSpec::Default {
            PortSpec::Any
        } else {
            p.port
        };
        assert_eq!(d.port, want, "{s:?}");
    }
    if let Ok(p) = &deny {
        let text = p.to_string();
        assert_eq!(
            HostPattern::parse(&text, PatternUse::Deny).as_ref(),
            Ok(p),
            "{s:?} → {text:?} round trip"
        );
        assert_eq!(
            HostPattern::parse(&random_case(rng, s), PatternUse::Deny).as_ref(),
            Ok(p),
            "{s:?} case"
        );
        if let NamePattern::Subdomains(apex) = &p.name {
            assert!(!p.matches_name(apex), "{s:?} matches its own apex");
            if let Ok(child) = HostName::parse(&format!("x.{apex}")) {
                assert!(p.matches_name(&child), "{s:?} does not match {child}");
            }
        }
    }
    allow.ok()
}

/// The policy decision for `name`, checked against what each pattern says on its own.
fn check_decision(net: &Network, name: &HostName, port: u16) {
    let verdict = net.decide_host(name, port);
    let denied = net.deny.iter().any(|d| d.matches(name, port));
    let allows: Vec<&HostRule> = net.hosts.iter().filter(|h| h.pattern.matches(name, port)).collect();
    match &verdict {
        HostVerdict::Denied(p) => assert!(p.matches(name, port), "deny {p} does not match {name}:{port}"),
        HostVerdict::Allow(rule) => {
            assert!(!denied, "{name}:{port} allowed although a deny entry matches");
            assert!(rule.pattern.matches(name, port));
            // SECURITY: a broad rule never overrides a narrow one.
            if allows.iter().any(|h| h.pattern.exact_name().is_some()) {
                assert!(
                    rule.pattern.exact_name().is_some(),
                    "a wildcard beat an exact rule for {name}"
                );
            }
        }
        HostVerdict::NotAllowed => assert!(!denied && allows.is_empty(), "{name}:{port} matched but not decided"),
    }
    assert_eq!(
        denied,
        matches!(verdict, HostVerdict::Denied(_)),
        "deny must win for {name}:{port}"
    );
    let proxy = decide_target(net, &Dest::Name(name.clone()), port);
    assert_eq!(
        proxy.is_ok(),
        matches!(verdict, HostVerdict::Allow(_)),
        "decide_target disagrees for {name}"
    );
}

fn check_target(s: &str, rng: &mut Rng, name: Option<&HostName>) {
    let target = Dest::parse(s);
    if let Ok(Dest::Name(n)) = &target {
        assert_eq!(Some(n), name, "Target::parse({s:?}) and HostName::parse disagree");
        assert!(inet_aton(n.as_str()).is_none());
    }
    if let Ok(Dest::Ip(ip)) = &target {
        let bare = s.trim_start_matches('[').trim_end_matches(']');
        assert_eq!(bare.parse::<IpAddr>().ok(), Some(*ip), "{s:?} → {ip}");
    }
    if inet_aton(s).is_some() {
        assert!(
            !matches!(target, Ok(Dest::Name(_))),
            "{s:?} is an address, taken as a name"
        );
    }
    let Some(name) = name else { return };
    let dest = Dest::Name(name.clone());
    for v in variants(rng, s) {
        // The same host however it is spelled: same target, and never "domain fronting" against itself.
        assert_eq!(Dest::parse(&v).as_ref(), Ok(&dest), "{v:?}");
        let port = [80, 443, 8443][rng.below(3)];
        assert_eq!(check_same_host(&dest, port, &v), Ok(()), "{v:?} fronts {name}");
        let with_port = format!("{v}:{port}");
        if !s.contains(':') {
            assert_eq!(
                parse_authority(&with_port, None).as_ref(),
                Ok(&(dest.clone(), port)),
                "{with_port:?}"
            );
            assert_eq!(check_same_host(&dest, port, &with_port), Ok(()), "{with_port:?}");
            let other = if port == 443 { 8443 } else { 443 };
            assert!(matches!(
                check_same_host(&dest, other, &with_port),
                Err(DenyReason::HostMismatch { .. })
            ));
        }
    }
}

/// The corpus's allow and deny patterns, and the names it spells: the policy every input is decided against.
fn base_policy() -> &'static (Network, Vec<HostName>) {
    static BASE: OnceLock<(Network, Vec<HostName>)> = OnceLock::new();
    BASE.get_or_init(|| {
        let mut net = Network::default();
        let mut names = Vec::new();
        for (file, bytes) in harness::corpus("policy_host") {
            let s = String::from_utf8_lossy(&bytes);
            if let Ok(p) = HostPattern::parse(&s, PatternUse::Allow) {
                net.hosts.push(rule(p));
            }
            if file.starts_with("deny-") {
                net.deny.extend(HostPattern::parse(&s, PatternUse::Deny));
            }
            names.extend(HostName::parse(&s));
        }
        (net, names)
    })
}

fn rule(pattern: HostPattern) -> HostRule {
    HostRule {
        pattern,
        tls: TlsMode::Intercept,
        rules: Vec::new(),
        upgrades: Vec::new(),
        origin: Origin::Flag,
    }
}

fn check_host(input: &Input<'_>, rng: &mut Rng) {
    let s = String::from_utf8_lossy(input.bytes);
    let name = check_name(&s, rng);
    let pattern = check_pattern(&s, rng);
    check_target(&s, rng, name.as_ref());
    let _ = parse_authority(&s, Some(443));

    let (base, names) = base_policy();
    let mut net = base.clone();
    if let Some(p) = &pattern {
        if rng.one_in(3) {
            net.deny.push(p.clone());
        } else {
            net.hosts.push(rule(p.clone()));
        }
    }
    let mut candidates: Vec<HostName> = name.into_iter().collect();
    candidates.push(rng.pick(names).clone());
    if let Some(NamePattern::Exact(n) | NamePattern::Subdomains(n)) = pattern.as_ref().map(|p| &p.name) {
        candidates.push(n.clone());
        candidates.extend(HostName::parse(&format!("a.b.{n}")));
    }
    for n in &candidates {
        for port in [80, 443, 8443, 18443, 1 + rng.below(65535) as u16] {
            check_decision(&net, n, port);
        }
    }
}

#[test]
fn policy_host() {
    harness::run(Target {
        name: "policy_host",
        dict: HOST_DICT,
        extra_seeds: Vec::new(),
        generate: None,
        check: &check_host,
    });
}

/// The invariant helpers themselves: `inet_aton` agrees with what glibc accepts.
#[test]
fn inet_aton_reads_every_ipv4_spelling() {
    for (s, want) in [
        ("127.0.0.1", Some(0x7f00_0001)),
        ("127.1", Some(0x7f00_0001)),
        ("0x7f.1", Some(0x7f00_0001)),
        ("2130706433", Some(0x7f00_0001)),
        ("0177.0.0.1", Some(0x7f00_0001)),
        ("1.2.3.4.5", None),
        ("08", None),
        ("a.0x10", None),
        ("", None),
    ] {
        assert_eq!(inet_aton(s), want, "{s}");
    }
}
