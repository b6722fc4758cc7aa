//! Per-host L7 rules: methods, path globs, query constraints. Pure matching; the proxy hands in the method, the
//! normalised path and the raw query string of each request.

use globset::{GlobBuilder, GlobMatcher};

/// Methods a rule may name (RFC 9110 §9 plus PATCH, RFC 5789). CONNECT is the proxy's business, not a rule's.
pub const KNOWN_METHODS: [&str; 8] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"];

/// A glob over request paths (`*` stays within one segment, `**` crosses segments).
#[derive(Debug, Clone)]
pub struct PathGlob {
    source: String,
    matcher: GlobMatcher,
}

impl PathGlob {
    pub fn parse(raw: &str) -> Result<Self, String> {
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

impl RequestRule {
    pub fn admits(&self, method: &str, path: &str, query: Option<&str>) -> bool {
        if !self.methods.is_empty() && !self.methods.iter().any(|m| m == method) {
            return false;
        }
        if !self.paths.is_empty() && !self.paths.iter().any(|g| g.matches(path)) {
            return false;
        }
        self.query_admits(query.unwrap_or(""))
    }

    fn query_admits(&self, query: &str) -> bool {
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match self.query.iter().find(|(k, _)| k == key) {
                Some((_, glob)) if !glob.matcher.is_match(value) => return false,
                Some(_) => {}
                None if self.other_query == OtherQuery::Deny => return false,
                None => {}
            }
        }
        true
    }
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

    #[test]
    fn methods_and_paths() {
        let r = rule(&["GET"], &["/repos/*/info/refs", "/api/**"]);
        assert!(r.admits("GET", "/repos/x/info/refs", None));
        assert!(!r.admits("GET", "/repos/x/y/info/refs", None));
        assert!(r.admits("GET", "/api/a/b/c", None));
        assert!(!r.admits("POST", "/api/a", None));
        assert!(!r.admits("GET", "/git-receive-pack", None));
    }

    #[test]
    fn query_constraints() {
        let mut r = rule(&[], &[]);
        r.query = vec![("service".into(), ValueGlob::parse("git-upload-pack").unwrap())];
        assert!(r.admits("GET", "/", Some("service=git-upload-pack")));
        assert!(!r.admits("GET", "/", Some("service=git-receive-pack")));
        assert!(r.admits("GET", "/", Some("other=1")));
        r.other_query = OtherQuery::Deny;
        assert!(!r.admits("GET", "/", Some("other=1")));
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
