//! Protocol switches (`Upgrade`, RFC 9110 §7.8). After a 101 the proxy splices two byte streams and sees no more
//! requests, so a switch is a way past every rule unless it is policed here.
//!
//! SECURITY: only a WebSocket upgrade whose 101 answers the request's key (RFC 6455 §4.2.2) is spliced; `h2c`
//! (RFC 7540 §3.2: an HTTP/2 channel the proxy could not police) and `HTTP2-Settings` are stripped, so the request
//! goes on as plain HTTP/1.1; any other protocol must be opted into per host (`upgrades = [...]`) and its 101 must
//! name it. A 101 that does not fit is never spliced.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bottle_policy::HostRule;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode, Version, request};

use crate::decide::DenyReason;

/// RFC 6455 §1.3: appended to the key before hashing.
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Bytes in a decoded `Sec-WebSocket-Key` (RFC 6455 §4.1).
const WEBSOCKET_KEY_BYTES: usize = 16;

/// What a request may switch to, after policing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Switch {
    None,
    /// A WebSocket handshake; the 101 must carry this `Sec-WebSocket-Accept`.
    WebSocket {
        accept: String,
    },
    /// A protocol the host opted into (lowercase, as listed).
    Other {
        protocol: String,
    },
}

impl Switch {
    pub fn is_upgrade(&self) -> bool {
        !matches!(self, Self::None)
    }

    /// The protocol name for the audit log.
    pub fn protocol(&self) -> Option<&str> {
        match self {
            Self::None => None,
            Self::WebSocket { .. } => Some("websocket"),
            Self::Other { protocol } => Some(protocol),
        }
    }
}

/// Decides what the request may switch to and strips what may not be forwarded. `Err` refuses the request.
pub fn police(parts: &mut request::Parts, rule: &HostRule) -> Result<Switch, DenyReason> {
    // HTTP2-Settings only ever serves an h2c upgrade.
    parts.headers.remove("http2-settings");
    let asked = parts.version == Version::HTTP_11
        && parts.headers.contains_key(header::UPGRADE)
        && connection_tokens(&parts.headers).any(|t| t.eq_ignore_ascii_case("upgrade"));
    let tokens: Vec<String> = list(&parts.headers, header::UPGRADE)
        .map(|t| t.to_ascii_lowercase())
        .filter(|t| t != "h2c")
        .collect();
    if !asked || tokens.is_empty() {
        parts.headers.remove(header::UPGRADE);
        return Ok(Switch::None);
    }
    let [protocol] = tokens.as_slice() else {
        return Err(DenyReason::Upgrade {
            protocol: tokens.join(", "),
        });
    };
    if protocol == "websocket" {
        return websocket(&parts.headers).map(|accept| Switch::WebSocket { accept });
    }
    if rule.upgrades.iter().any(|u| u == protocol) {
        return Ok(Switch::Other {
            protocol: protocol.clone(),
        });
    }
    Err(DenyReason::Upgrade {
        protocol: protocol.clone(),
    })
}

/// The `Sec-WebSocket-Accept` a genuine server answers this handshake with.
fn websocket(headers: &HeaderMap) -> Result<String, DenyReason> {
    let bad = DenyReason::Framing("a WebSocket upgrade needs exactly one valid Sec-WebSocket-Key");
    let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
    let (Some(key), None) = (keys.next(), keys.next()) else {
        return Err(bad);
    };
    let key = key.to_str().map_err(|_| bad.clone())?.trim();
    match STANDARD.decode(key) {
        Ok(raw) if raw.len() == WEBSOCKET_KEY_BYTES => {}
        _ => return Err(bad),
    }
    Ok(accept_for(key))
}

/// RFC 6455 §4.2.2: base64(SHA-1(key ++ GUID)).
pub fn accept_for(key: &str) -> String {
    let digest = ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{key}{WEBSOCKET_GUID}").as_bytes(),
    );
    STANDARD.encode(digest.as_ref())
}

/// Whether a 101 answers the switch that was asked for. Anything else is not spliced.
pub fn answered<B>(switch: &Switch, resp: &Response<B>) -> Result<(), &'static str> {
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(());
    }
    let upgrade = |want: &str| {
        let mut tokens = list(resp.headers(), header::UPGRADE);
        tokens.next().is_some_and(|t| t.eq_ignore_ascii_case(want)) && tokens.next().is_none()
    };
    let connection = connection_tokens(resp.headers()).any(|t| t.eq_ignore_ascii_case("upgrade"));
    match switch {
        Switch::None => Err("the upstream switched protocols although none was asked for"),
        Switch::WebSocket { accept } => {
            let answered = resp
                .headers()
                .get(header::SEC_WEBSOCKET_ACCEPT)
                .is_some_and(|v| v == HeaderValue::from_str(accept).unwrap_or(HeaderValue::from_static("-")));
            if upgrade("websocket") && connection && answered {
                Ok(())
            } else {
                Err("the upstream's 101 is not a WebSocket handshake answering the request's key")
            }
        }
        Switch::Other { protocol } if upgrade(protocol) && connection => Ok(()),
        Switch::Other { .. } => Err("the upstream's 101 does not name the protocol that was asked for"),
    }
}

pub fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    list(headers, header::CONNECTION)
}

fn list(headers: &HeaderMap, name: header::HeaderName) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn rule(upgrades: &[&str]) -> HostRule {
        let text = format!("[[host]]\nname = \"a.test\"\nupgrades = {upgrades:?}\n");
        let text = if upgrades.is_empty() {
            "[network]\nallow = [\"a.test\"]\n".to_string()
        } else {
            text
        };
        bottle_policy::from_str(
            &bottle_policy::Source {
                text: &text,
                path: None,
            },
            &bottle_policy::Overrides::default(),
        )
        .unwrap()
        .network
        .hosts
        .remove(0)
    }

    fn parts(headers: &[(&str, &str)]) -> request::Parts {
        let mut b = Request::get("/");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn the_rfc_6455_example_key_gives_its_accept() {
        assert_eq!(accept_for("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn h2c_and_http2_settings_are_stripped() {
        let mut p = parts(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
        ]);
        assert_eq!(police(&mut p, &rule(&[])).unwrap(), Switch::None);
        assert!(!p.headers.contains_key("upgrade") && !p.headers.contains_key("http2-settings"));
    }

    #[test]
    fn other_protocols_need_the_hosts_opt_in() {
        for proto in ["tcp", "SPDY/3.1"] {
            let mut p = parts(&[("connection", "upgrade"), ("upgrade", proto)]);
            assert_eq!(police(&mut p, &rule(&[])).unwrap_err().code(), "upgrade", "{proto}");
        }
        let mut p = parts(&[("connection", "upgrade"), ("upgrade", "TCP")]);
        assert_eq!(
            police(&mut p, &rule(&["tcp"])).unwrap(),
            Switch::Other { protocol: "tcp".into() }
        );
        let mut p = parts(&[("connection", "upgrade"), ("upgrade", "websocket, tcp")]);
        assert!(police(&mut p, &rule(&["tcp"])).is_err());
    }

    #[test]
    fn a_101_must_answer_the_websocket_key() {
        let mut p = parts(&[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]);
        let switch = police(&mut p, &rule(&[])).unwrap();
        let resp = |accept: &str| {
            Response::builder()
                .status(101)
                .header("upgrade", "websocket")
                .header("connection", "Upgrade")
                .header("sec-websocket-accept", accept)
                .body(())
                .unwrap()
        };
        assert!(answered(&switch, &resp("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")).is_ok());
        assert!(answered(&switch, &resp("bogus")).is_err());
        assert!(answered(&Switch::None, &resp("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")).is_err());
        let mut no_key = parts(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        assert!(police(&mut no_key, &rule(&[])).is_err());
    }
}
