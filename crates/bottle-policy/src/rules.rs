//! Per-host L7 rules: methods, path globs, query constraints. Pure matching; the proxy hands in the method, the
//! path and the raw query string of each request.
//!
//! SECURITY: rules decide on what the upstream will read, not on the bytes as sent: paths and query names and
//! values are percent-decoded before matching, and a request that servers could read two ways (`;` parameters,
//! double encoding, a repeated parameter, `+` that would change the verdict) is refused where rules apply.

use globset::{GlobBuilder, GlobMatcher};

/// Methods a rule may name (RFC 9110 §9 plus PATCH, RFC 5789). CONNECT is the proxy's business, not a rule's.
pub const KNOWN_METHODS: [&str; 8] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"];

/// Longest glob a rule may hold, and most alternation groups (`{a,b}`) and classes (`[ab]`) in one: bounds the
/// matcher a policy can make the proxy build.
const MAX_GLOB_CHARS: usize = 1024;
const MAX_GLOB_GROUPS: usize = 32;

fn bounded_glob(raw: &str, what: &str) -> Result<(), String> {
    if raw.chars().count() > MAX_GLOB_CHARS {
        return Err(format!("{what} is longer than {MAX_GLOB_CHARS} characters"));
    }
    if raw.matches(['{', '[']).count() > MAX_GLOB_GROUPS {
        return Err(format!(
            "{what} has more than {MAX_GLOB_GROUPS} `{{…}}` and `[…]` groups; split it into several globs"
        ));
    }
    Ok(())
}

/// A glob over request paths (`*` stays within one segment, `**` crosses segments).
#[derive(Debug, Clone)]
pub struct PathGlob {
    source: String,
    matcher: GlobMatcher,
}

impl PathGlob {
    pub fn parse(raw: &str) -> Result<Self, String> {
        bounded_glob(raw, "a path glob")?;
        if !raw.starts_with('/') {
            return Err(format!("path glob `{raw}` must start with `/`"));
        }
        if raw.contains('?') && !raw.contains("\\?") {
            // `?` is a glob wildcard, but users write it meaning a query string.
            return Err(format!(
                "path glob `{raw}` contains `?`; paths never include the query, constrain it with `query`"
            ));
        }
        let matcher = GlobBuilder::new(raw)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|e| format!("path glob `{raw}` is not valid: {}", e.kind()))?
            .compile_matcher();
        Ok(Self {
            source: raw.to_string(),
            matcher,
        })
    }

    pub fn matches(&self, path: &str) -> bool {
        self.matcher.is_match(path)
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl PartialEq for PathGlob {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

/// A glob over one query parameter's value (no separator semantics).
#[derive(Debug, Clone)]
pub struct ValueGlob {
    source: String,
    matcher: GlobMatcher,
}

impl ValueGlob {
    pub fn parse(raw: &str) -> Result<Self, String> {
        bounded_glob(raw, "a query glob")?;
        let matcher = GlobBuilder::new(raw)
            .backslash_escape(true)
            .build()
            .map_err(|e| format!("query glob `{raw}` is not valid: {}", e.kind()))?
            .compile_matcher();
        Ok(Self {
            source: raw.to_string(),
            matcher,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl PartialEq for ValueGlob {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

/// What to do with query parameters a rule does not list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OtherQuery {
    #[default]
    Allow,
    Deny,
}

/// One rule: a request passes when its method is listed (or none are), its path matches a glob (or none are
/// given) and every listed query parameter present matches its glob.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RequestRule {
    pub methods: Vec<String>,
    pub paths: Vec<PathGlob>,
    pub query: Vec<(String, ValueGlob)>,
    pub other_query: OtherQuery,
}

/// Why no rule of a host admitted a request: the part that failed in the rule that came closest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleRefusal {
    /// No rule admits the method.
    Method,
    /// A rule admits the method, but none of those admits the path.
    Path,
    /// A rule admits method and path, but refuses this query parameter (its decoded name).
    Query { name: String },
    /// The request could be read two ways by the upstream.
    Ambiguous(&'static str),
}

/// A query as the upstream will read it: decoded `(name, value)` pairs, in order.
type Pairs = Vec<(String, String)>;

impl RequestRule {
    /// Whether this rule admits the request; `path` is the decoded path, `readings` every way the query can be read.
    fn check(&self, method: &str, path: &str, readings: &[Pairs]) -> Result<(), RuleRefusal> {
        if !self.methods.is_empty() && !self.methods.iter().any(|m| m == method) {
            return Err(RuleRefusal::Method);
        }
        if !self.paths.is_empty() && !self.paths.iter().any(|g| g.matches(path)) {
            return Err(RuleRefusal::Path);
        }
        for pairs in readings {
            self.query_admits(pairs)?;
        }
        Ok(())
    }

    fn constrains_query(&self) -> bool {
        !self.query.is_empty() || self.other_query == OtherQuery::Deny
    }

    fn query_admits(&self, pairs: &Pairs) -> Result<(), RuleRefusal> {
        for (key, value) in pairs {
            let refused = || RuleRefusal::Query { name: key.clone() };
            match self.query.iter().find(|(k, _)| k == key) {
                Some((_, glob)) if !glob.matcher.is_match(value) => return Err(refused()),
                Some(_) => {}
                None if self.other_query == OtherQuery::Deny => return Err(refused()),
                None => {}
            }
        }
        Ok(())
    }
}

/// Passes the request when one of `rules` admits it (an empty list admits everything). `path` and `query` are as
/// sent (raw); they are decoded here the way the upstream will read them.
pub fn check_request(rules: &[RequestRule], method: &str, path: &str, query: Option<&str>) -> Result<(), RuleRefusal> {
    if rules.is_empty() {
        return Ok(());
    }
    let path = decode_path(path)?;
    let readings = if rules.iter().any(RequestRule::constrains_query) {
        query_readings(query.unwrap_or(""))?
    } else {
        Vec::new()
    };
    let mut closest = RuleRefusal::Method;
    for rule in rules {
        match rule.check(method, &path, &readings) {
            Ok(()) => return Ok(()),
            Err(e) => {
                let rank = |r: &RuleRefusal| match r {
                    RuleRefusal::Method | RuleRefusal::Ambiguous(_) => 0,
                    RuleRefusal::Path => 1,
                    RuleRefusal::Query { .. } => 2,
                };
                if rank(&e) > rank(&closest) {
                    closest = e;
                }
            }
        }
    }
    Err(closest)
}

fn decode_path(raw: &str) -> Result<String, RuleRefusal> {
    if raw.contains(';') {
        return Err(RuleRefusal::Ambiguous(
            "a `;` in the path (path parameters such as `/a;x=1` or `/..;/`) is read differently by different servers",
        ));
    }
    let decoded = percent_decode(raw, false)?;
    if decoded.contains('%') {
        return Err(RuleRefusal::Ambiguous(
            "the path is percent-encoded twice (`%25`), which a server that decodes again reads as another path",
        ));
    }
    Ok(decoded)
}

/// Every way a server may read the query: `+` as itself (RFC 3986) and as a space (HTML forms). `;` separators
/// and repeated parameters are refused outright.
fn query_readings(raw: &str) -> Result<Vec<Pairs>, RuleRefusal> {
    if raw.contains(';') {
        return Err(RuleRefusal::Ambiguous(
            "a `;` in the query is a parameter separator for some servers and not for others",
        ));
    }
    let plus_variants: &[bool] = if raw.contains('+') { &[false, true] } else { &[false] };
    let mut readings = Vec::new();
    for &plus_is_space in plus_variants {
        let mut pairs: Pairs = Vec::new();
        for pair in raw.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = percent_decode(key, plus_is_space)?;
            if pairs.iter().any(|(k, _)| *k == key) {
                return Err(RuleRefusal::Ambiguous(
                    "a query parameter is given twice; servers disagree on which one counts",
                ));
            }
            pairs.push((key, percent_decode(value, plus_is_space)?));
        }
        readings.push(pairs);
    }
    Ok(readings)
}

fn percent_decode(raw: &str, plus_is_space: bool) -> Result<String, RuleRefusal> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
                let Some(byte) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) else {
                    return Err(RuleRefusal::Ambiguous("a `%` that is not a valid percent-escape"));
                };
                out.push(byte);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| RuleRefusal::Ambiguous("a percent-escape decodes to bytes that are not UTF-8"))
}

/// Methods are case-sensitive tokens (RFC 9110 §9.1); refuse lowercase rather than silently never matching.
pub fn parse_method(raw: &str) -> Result<String, String> {
    if KNOWN_METHODS.contains(&raw) {
        return Ok(raw.to_string());
    }
    let upper = raw.to_ascii_uppercase();
    if KNOWN_METHODS.contains(&upper.as_str()) {
        return Err(format!(
            "method `{raw}` must be written `{upper}` (methods are case-sensitive)"
        ));
    }
    Err(format!(
        "unknown method `{raw}`; expected one of {}",
        KNOWN_METHODS.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(methods: &[&str], paths: &[&str]) -> RequestRule {
        RequestRule {
            methods: methods.iter().map(|m| m.to_string()).collect(),
            paths: paths.iter().map(|p| PathGlob::parse(p).unwrap()).collect(),
            ..RequestRule::default()
        }
    }

    fn admits(r: &RequestRule, method: &str, path: &str, query: Option<&str>) -> bool {
        check_request(std::slice::from_ref(r), method, path, query).is_ok()
    }

    #[test]
    fn methods_and_paths() {
        let r = rule(&["GET"], &["/repos/*/info/refs", "/api/**"]);
        assert!(admits(&r, "GET", "/repos/x/info/refs", None));
        assert!(!admits(&r, "GET", "/repos/x/y/info/refs", None));
        assert!(admits(&r, "GET", "/api/a/b/c", None));
        assert!(!admits(&r, "POST", "/api/a", None));
        assert!(!admits(&r, "GET", "/git-receive-pack", None));
    }

    #[test]
    fn query_constraints() {
        let mut r = rule(&[], &[]);
        r.query = vec![("service".into(), ValueGlob::parse("git-upload-pack").unwrap())];
        assert!(admits(&r, "GET", "/", Some("service=git-upload-pack")));
        assert!(!admits(&r, "GET", "/", Some("service=git-receive-pack")));
        assert!(admits(&r, "GET", "/", Some("other=1")));
        r.other_query = OtherQuery::Deny;
        assert!(!admits(&r, "GET", "/", Some("other=1")));
    }

    #[test]
    fn query_names_and_values_are_matched_decoded() {
        let mut r = rule(&["GET"], &["/repo/**"]);
        r.query = vec![("service".into(), ValueGlob::parse("git-upload-pack").unwrap())];
        let rules = std::slice::from_ref(&r);
        // The upstream decodes `servic%65` to `service`: the rule must see the same name.
        assert_eq!(
            check_request(rules, "GET", "/repo/info/refs", Some("servic%65=git-receive-pack")),
            Err(RuleRefusal::Query { name: "service".into() })
        );
        assert!(check_request(rules, "GET", "/repo/info/refs", Some("service=git-upload-p%61ck")).is_ok());
        // `+` read as a space by some servers changes nothing here, so both readings agree.
        assert!(check_request(rules, "GET", "/repo/x", Some("a=b+c&service=git-upload-pack")).is_ok());
        r.query = vec![("q".into(), ValueGlob::parse("a+b").unwrap())];
        let rules = std::slice::from_ref(&r);
        assert!(
            check_request(rules, "GET", "/repo/x", Some("q=a+b")).is_err(),
            "`a b` is another reading"
        );
    }

    #[test]
    fn requests_that_read_two_ways_are_refused_where_rules_apply() {
        let mut r = rule(&["GET"], &["/pub/**"]);
        r.query = vec![("service".into(), ValueGlob::parse("git-upload-pack").unwrap())];
        let rules = std::slice::from_ref(&r);
        for (path, query) in [
            ("/pub/..;/admin", None),
            ("/pub/a;x=1", None),
            ("/pub/%252e%252e/admin", None),
            ("/pub/%zz", None),
            ("/pub/%ff", None),
            ("/pub/x", Some("service=git-upload-pack;service=git-receive-pack")),
            ("/pub/x", Some("service=git-upload-pack&service=git-receive-pack")),
            ("/pub/x", Some("service=%g1")),
        ] {
            assert!(
                matches!(check_request(rules, "GET", path, query), Err(RuleRefusal::Ambiguous(_))),
                "{path} {query:?}"
            );
        }
        // Without rules nothing is interpreted.
        assert!(check_request(&[], "GET", "/pub/a;x=1", Some("a=1;b=2")).is_ok());
        // Decoded paths match the glob the way the upstream reads them.
        assert!(check_request(rules, "GET", "/pub/%61dmin", Some("service=git-upload-pack")).is_ok());
        assert_eq!(
            check_request(rules, "GET", "/%70rivate/x", None),
            Err(RuleRefusal::Path)
        );
        assert_eq!(check_request(rules, "POST", "/pub/x", None), Err(RuleRefusal::Method));
    }

    #[test]
    fn methods_are_case_sensitive() {
        assert!(parse_method("GET").is_ok());
        assert!(parse_method("get").unwrap_err().contains("`GET`"));
        assert!(parse_method("FETCH").is_err());
    }

    #[test]
    fn path_globs_need_a_slash_and_no_query() {
        assert!(PathGlob::parse("repos/*").is_err());
        assert!(PathGlob::parse("/a?b=1").is_err());
        assert!(PathGlob::parse("/a[").is_err());
    }
}
