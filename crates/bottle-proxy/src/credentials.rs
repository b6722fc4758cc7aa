//! Credential injection. The bottle only ever holds random placeholders; the real values are read on the host
//! when the proxy starts and substituted into exactly one header or query parameter, for exactly one host, inside
//! an intercepted TLS stream. A placeholder anywhere else is a leak: the request is refused and audited.
//!
//! Trusts the policy (which already refused credentials for passthrough or non-allowed hosts); trusts nothing in
//! the request.

use std::fmt;
use std::path::PathBuf;

use bottle_policy::host::HostName;
use bottle_policy::{Credential, Placement, SecretSource};
use http::HeaderValue;
use http::header::HeaderMap;
use http::uri::{PathAndQuery, Uri};

use crate::decide::DenyReason;
use crate::secrets::Needle;

/// Every placeholder starts with this, so one substring search tells whether a value needs a closer look.
pub const PLACEHOLDER_PREFIX: &str = "bottle-placeholder-";
/// Random bytes in a placeholder (rendered as hex).
const PLACEHOLDER_RANDOM_BYTES: usize = 16;
/// Real values shorter than this are not redacted from responses (too likely to match innocent text).
const MIN_REDACT_LEN: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("credential `{env}` for {host}: environment variable `{var}` is not set or empty")]
    MissingEnv { env: String, host: String, var: String },
    #[error("credential `{env}` for {host}: cannot read {path}")]
    ReadFile {
        env: String,
        host: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("credential `{env}` for {host}: the secret is empty or holds control characters")]
    BadValue { env: String, host: String },
    #[error("cannot draw random bytes for a placeholder")]
    Random(#[source] getrandom::Error),
}

struct Bound {
    env: String,
    placeholder: String,
    host: HostName,
    placement: Placement,
    value: String,
}

pub struct Credentials {
    bound: Vec<Bound>,
    /// The real values long enough to search for, with their placeholders (`secrets`).
    needles: std::sync::Arc<[Needle]>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // SECURITY: never print values (or placeholders, which are per-bottle secrets of a lesser kind).
        f.debug_list().entries(self.bound.iter().map(|b| &b.env)).finish()
    }
}

impl Credentials {
    /// Resolves each credential's real value. `lookup` reads an environment variable (the process environment in
    /// production; a map in tests). A missing optional credential is skipped: no placeholder, nothing to inject.
    /// `seed`: placeholders derived from it (see `ProxyConfig::placeholder_seed`) instead of random ones.
    pub fn load(
        creds: &[Credential],
        lookup: &dyn Fn(&str) -> Option<String>,
        seed: Option<&[u8]>,
    ) -> Result<Self, CredentialError> {
        let mut bound = Vec::new();
        for c in creds {
            let Some(value) = resolve(c, lookup)? else {
                tracing::info!(env = %c.env, host = %c.host, "optional credential has no value; not injected");
                continue;
            };
            if value.bytes().any(|b| b.is_ascii_control()) {
                return Err(CredentialError::BadValue {
                    env: c.env.clone(),
                    host: c.host.to_string(),
                });
            }
            bound.push(Bound {
                env: c.env.clone(),
                placeholder: placeholder(&c.env, seed)?,
                host: c.host.clone(),
                placement: c.placement.clone(),
                value,
            });
        }
        let needles = bound
            .iter()
            .filter(|b| b.value.len() >= MIN_REDACT_LEN)
            .map(|b| Needle {
                env: b.env.clone(),
                value: b.value.as_bytes().to_vec(),
                placeholder: b.placeholder.as_bytes().to_vec(),
            })
            .collect();
        Ok(Self { bound, needles })
    }

    /// The real values to search streams for; empty when the bottle has no credential.
    pub fn needles(&self) -> std::sync::Arc<[Needle]> {
        std::sync::Arc::clone(&self.needles)
    }

    /// True when a credential is bound to `host`: its answers may echo a real value.
    pub fn is_bound(&self, host: &HostName) -> bool {
        self.bound.iter().any(|b| &b.host == host)
    }

    /// SECURITY: the bottle must never hold a real value; a request that carries one (in the URL or a header,
    /// before any placeholder is substituted) is refused wherever it goes.
    fn refuse_real_values(&self, uri: &Uri, headers: &HeaderMap) -> Result<(), DenyReason> {
        let carries = |haystack: &[u8]| {
            self.needles
                .iter()
                .find(|n| memchr::memmem::find(haystack, &n.value).is_some())
        };
        let found = carries(uri.to_string().as_bytes()).or_else(|| {
            headers
                .iter()
                .find_map(|(name, value)| carries(name.as_str().as_bytes()).or_else(|| carries(value.as_bytes())))
        });
        match found {
            Some(n) => Err(DenyReason::SecretLeak { env: n.env.clone() }),
            None => Ok(()),
        }
    }

    /// `(variable, placeholder)` pairs for the bottle's environment.
    pub fn placeholders(&self) -> Vec<(String, String)> {
        self.bound
            .iter()
            .map(|b| (b.env.clone(), b.placeholder.clone()))
            .collect()
    }

    /// Substitutes placeholders bound to `host` in their configured place and refuses any other placeholder.
    /// `host` is `None` outside intercepted TLS (plain HTTP, CONNECT heads): every placeholder there is a leak.
    /// Returns the variables injected.
    pub fn apply(
        &self,
        uri: &mut Uri,
        headers: &mut HeaderMap,
        host: Option<&HostName>,
    ) -> Result<Vec<String>, DenyReason> {
        let mut injected = Vec::new();
        if self.bound.is_empty() {
            return Ok(injected);
        }
        self.refuse_real_values(uri, headers)?;
        if let Some(new_uri) = self.apply_uri(uri, host, &mut injected)? {
            *uri = new_uri;
        }
        for (name, value) in headers.iter_mut() {
            if self.find(name.as_str().as_bytes()).is_some() {
                return Err(self.leak_any(name.as_str().as_bytes(), "a header name"));
            }
            while let Some(b) = self.find(value.as_bytes()) {
                let place = format!("header `{name}`");
                let admitted = matches!(&b.placement, Placement::Header(h) if h == name.as_str());
                if host != Some(&b.host) || !admitted {
                    return Err(leak(b, place));
                }
                let Ok(text) = value.to_str() else {
                    return Err(leak(b, place));
                };
                let replaced = text.replace(&b.placeholder, &b.value);
                *value = HeaderValue::from_str(&replaced).map_err(|_| leak(b, place))?;
                value.set_sensitive(true);
                injected.push(b.env.clone());
            }
        }
        Ok(injected)
    }

    fn apply_uri(
        &self,
        uri: &Uri,
        host: Option<&HostName>,
        injected: &mut Vec<String>,
    ) -> Result<Option<Uri>, DenyReason> {
        if let Some(auth) = uri.authority()
            && self.find(auth.as_str().as_bytes()).is_some()
        {
            return Err(self.leak_any(auth.as_str().as_bytes(), "the URL authority"));
        }
        if self.find(uri.path().as_bytes()).is_some() {
            return Err(self.leak_any(uri.path().as_bytes(), "the URL path"));
        }
        let Some(query) = uri.query() else {
            return Ok(None);
        };
        if self.find(query.as_bytes()).is_none() {
            return Ok(None);
        }
        let mut pairs = Vec::new();
        for pair in query.split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if self.find(key.as_bytes()).is_some() {
                return Err(self.leak_any(key.as_bytes(), "a query parameter name"));
            }
            let mut value = value.to_string();
            while let Some(b) = self.find(value.as_bytes()) {
                let admitted = matches!(&b.placement, Placement::Query(q) if q == key);
                if host != Some(&b.host) || !admitted {
                    return Err(leak(b, format!("query parameter `{key}`")));
                }
                value = value.replace(&b.placeholder, &percent_encode(&b.value));
                injected.push(b.env.clone());
            }
            pairs.push(if pair.contains('=') {
                format!("{key}={value}")
            } else {
                key.to_string()
            });
        }
        let pq = format!("{}?{}", uri.path(), pairs.join("&"));
        let mut parts = uri.clone().into_parts();
        let bad = || DenyReason::Framing("the rewritten URL is not valid");
        parts.path_and_query = Some(PathAndQuery::try_from(pq).map_err(|_| bad())?);
        Uri::from_parts(parts).map(Some).map_err(|_| bad())
    }

    /// SECURITY: an upstream that echoes the real value back (an error page, a debug endpoint) would hand it to
    /// the bottle; put the placeholder back in response headers (also a 101's). Bodies go through `secrets`.
    pub fn redact_response(&self, headers: &mut HeaderMap) {
        for b in self.bound.iter().filter(|b| b.value.len() >= MIN_REDACT_LEN) {
            for value in headers.values_mut() {
                if memchr::memmem::find(value.as_bytes(), b.value.as_bytes()).is_none() {
                    continue;
                }
                let text = String::from_utf8_lossy(value.as_bytes()).replace(&b.value, &b.placeholder);
                *value = HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("redacted"));
            }
        }
    }

    /// The credential whose placeholder occurs in `haystack`, if any.
    fn find(&self, haystack: &[u8]) -> Option<&Bound> {
        memchr::memmem::find(haystack, PLACEHOLDER_PREFIX.as_bytes())?;
        self.bound
            .iter()
            .find(|b| memchr::memmem::find(haystack, b.placeholder.as_bytes()).is_some())
    }

    fn leak_any(&self, haystack: &[u8], place: &str) -> DenyReason {
        match self.find(haystack) {
            Some(b) => leak(b, place.to_string()),
            None => DenyReason::PlaceholderLeak {
                env: "unknown".into(),
                place: place.into(),
            },
        }
    }
}

fn leak(b: &Bound, place: String) -> DenyReason {
    DenyReason::PlaceholderLeak {
        env: b.env.clone(),
        place,
    }
}

fn resolve(c: &Credential, lookup: &dyn Fn(&str) -> Option<String>) -> Result<Option<String>, CredentialError> {
    let value = match &c.source {
        SecretSource::FromEnv(var) => match lookup(var).filter(|v| !v.is_empty()) {
            Some(v) => Some(v),
            None if c.required => {
                return Err(CredentialError::MissingEnv {
                    env: c.env.clone(),
                    host: c.host.to_string(),
                    var: var.clone(),
                });
            }
            None => None,
        },
        SecretSource::FromFile(path) => match std::fs::read_to_string(path) {
            // A trailing newline is how editors and `echo` write files, not part of the secret.
            Ok(text) => Some(text.trim_end_matches(['\n', '\r']).to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !c.required => None,
            Err(source) => {
                return Err(CredentialError::ReadFile {
                    env: c.env.clone(),
                    host: c.host.to_string(),
                    path: path.clone(),
                    source,
                });
            }
        },
    };
    match value {
        Some(v) if v.is_empty() && c.required => Err(CredentialError::BadValue {
            env: c.env.clone(),
            host: c.host.to_string(),
        }),
        Some(v) if v.is_empty() => Ok(None),
        other => Ok(other),
    }
}

/// A placeholder for `env`: random, or HMAC-SHA256(seed, env) cut to the same length when a seed is given (the
/// same in every bottle with that seed; it says nothing of the real value).
fn placeholder(env: &str, seed: Option<&[u8]>) -> Result<String, CredentialError> {
    let mut random = [0u8; PLACEHOLDER_RANDOM_BYTES];
    match seed {
        Some(seed) => {
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, seed);
            let tag = ring::hmac::sign(&key, env.as_bytes());
            random.copy_from_slice(&tag.as_ref()[..PLACEHOLDER_RANDOM_BYTES]);
        }
        None => getrandom::fill(&mut random).map_err(CredentialError::Random)?,
    }
    let name: String = env
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{PLACEHOLDER_PREFIX}{name}-{hex}"))
}

/// RFC 3986 §2.3: everything but unreserved characters is percent-encoded in a query value.
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bottle_policy::Origin;

    fn cred(host: &str, placement: Placement, var: &str) -> Credential {
        Credential {
            host: HostName::parse(host).unwrap(),
            placement,
            source: SecretSource::FromEnv(var.into()),
            env: var.into(),
            required: true,
            origin: Origin::File,
        }
    }

    fn creds() -> Credentials {
        let list = [
            cred("api.example.com", Placement::Header("authorization".into()), "API_KEY"),
            cred("q.example.com", Placement::Query("key".into()), "Q_KEY"),
        ];
        Credentials::load(&list, &|v| Some(format!("real-{v} value")), None).unwrap()
    }

    fn ph(c: &Credentials, env: &str) -> String {
        c.placeholders().into_iter().find(|(e, _)| e == env).unwrap().1
    }

    #[test]
    fn placeholders_are_random_and_named() {
        let c = creds();
        let p = ph(&c, "API_KEY");
        assert!(p.starts_with("bottle-placeholder-api-key-"));
        assert_eq!(p.len(), "bottle-placeholder-api-key-".len() + 32);
        assert_ne!(p, ph(&creds(), "API_KEY"));
    }

    #[test]
    fn a_seed_gives_the_same_placeholders_every_time_and_another_seed_others() {
        let list = [
            cred("api.example.com", Placement::Header("authorization".into()), "API_KEY"),
            cred("api.example.com", Placement::Header("x-other".into()), "OTHER"),
        ];
        let load = |seed: &[u8]| Credentials::load(&list, &|v| Some(format!("real-{v} value")), Some(seed)).unwrap();
        let (a, b, c) = (load(b"home one"), load(b"home one"), load(b"home two"));
        assert_eq!(a.placeholders(), b.placeholders());
        assert_ne!(a.placeholders(), c.placeholders());
        let p = ph(&a, "API_KEY");
        assert!(p.starts_with("bottle-placeholder-api-key-") && p.len() == "bottle-placeholder-api-key-".len() + 32);
        assert_ne!(
            p.rsplit('-').next(),
            ph(&a, "OTHER").rsplit('-').next(),
            "each variable has its own"
        );
        assert!(!p.contains("real"), "a placeholder says nothing of the value");
    }

    #[test]
    fn header_is_substituted_only_for_the_bound_host() {
        let c = creds();
        let host = HostName::parse("api.example.com").unwrap();
        let mut uri: Uri = "/v1".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            "authorization",
            format!("Bearer {}", ph(&c, "API_KEY")).parse().unwrap(),
        );
        let injected = c.apply(&mut uri, &mut h, Some(&host)).unwrap();
        assert_eq!(injected, ["API_KEY"]);
        assert_eq!(h["authorization"], "Bearer real-API_KEY value");

        let other = HostName::parse("other.example.com").unwrap();
        let mut h = HeaderMap::new();
        h.insert("authorization", ph(&c, "API_KEY").parse().unwrap());
        let err = c.apply(&mut uri, &mut h, Some(&other)).unwrap_err();
        assert_eq!(err.code(), "placeholder-leak");
        // Right host, wrong header; and plain HTTP.
        let mut h = HeaderMap::new();
        h.insert("x-other", ph(&c, "API_KEY").parse().unwrap());
        assert!(c.apply(&mut uri, &mut h, Some(&host)).is_err());
        let mut h = HeaderMap::new();
        h.insert("authorization", ph(&c, "API_KEY").parse().unwrap());
        assert!(c.apply(&mut uri, &mut h, None).is_err());
    }

    #[test]
    fn query_is_substituted_and_encoded() {
        let c = creds();
        let host = HostName::parse("q.example.com").unwrap();
        let mut uri: Uri = format!("/x?a=1&key={}", ph(&c, "Q_KEY")).parse().unwrap();
        let mut h = HeaderMap::new();
        c.apply(&mut uri, &mut h, Some(&host)).unwrap();
        assert_eq!(uri.to_string(), "/x?a=1&key=real-Q_KEY%20value");
        let mut uri: Uri = format!("/{}", ph(&c, "Q_KEY")).parse().unwrap();
        assert!(c.apply(&mut uri, &mut h, Some(&host)).is_err());
    }

    #[test]
    fn missing_required_is_an_error_and_optional_is_skipped() {
        let mut c = cred("api.example.com", Placement::Header("authorization".into()), "NOPE");
        assert!(matches!(
            Credentials::load(std::slice::from_ref(&c), &|_| None, None),
            Err(CredentialError::MissingEnv { .. })
        ));
        c.required = false;
        assert!(
            Credentials::load(&[c], &|_| None, None)
                .unwrap()
                .placeholders()
                .is_empty()
        );
    }

    #[test]
    fn a_request_carrying_a_real_value_is_refused_wherever_it_goes() {
        let c = creds();
        let host = HostName::parse("api.example.com").unwrap();
        let mut uri: Uri = "/v1".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-anything", "Bearer real-API_KEY value".parse().unwrap());
        let err = c.apply(&mut uri, &mut h, Some(&host)).unwrap_err();
        assert_eq!(err.code(), "secret-leak");
        let mut uri: Uri = "/real-API_KEY".parse().unwrap();
        assert!(
            c.apply(&mut uri, &mut HeaderMap::new(), None).is_ok(),
            "a prefix alone is no value"
        );
    }

    #[test]
    fn responses_are_redacted() {
        let c = creds();
        let mut h = HeaderMap::new();
        h.insert("x-echo", "key=real-API_KEY value".parse().unwrap());
        c.redact_response(&mut h);
        assert!(h["x-echo"].to_str().unwrap().contains("bottle-placeholder-api-key-"));
    }
}
