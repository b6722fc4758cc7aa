//! Denial responses: a 403 (or 400 for malformed input, 502 for upstream failures) with a short text body and an
//! `x-bottle-denied` header that names the host, the rule and how to allow it. Never echoes request headers.

use http::header::{CONNECTION, CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};

use crate::body::{ProxyBody, full};
use crate::decide::DenyReason;

pub const DENIED_HEADER: &str = "x-bottle-denied";

pub fn response(reason: &DenyReason, host: &str, port: u16) -> Response<ProxyBody> {
    let status = if reason.is_malformed() {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::FORBIDDEN
    };
    let hint = reason.hint(host, port);
    let header = format!("host={host}; rule={}; allow with: {hint}", reason.code());
    let body = format!(
        "bot-bottle: {host}:{port} denied ({}): {}\nallow with: {hint}\n",
        reason.code(),
        reason.explain()
    );
    let close = matches!(reason, DenyReason::Framing(_) | DenyReason::BadTarget);
    build(status, Some(header), body, close)
}

/// The upstream could not be reached: the destination was allowed, so this is an error, not a policy denial.
pub fn upstream_error(host: &str, port: u16, what: &str) -> Response<ProxyBody> {
    let body = format!("bot-bottle: {host}:{port} could not be reached: {what}\n");
    build(StatusCode::BAD_GATEWAY, None, body, false)
}

/// The decision could not be recorded, so the request was not forwarded (503: the proxy, not the policy).
pub fn audit_failed(host: &str, port: u16, failure: &crate::audit::AuditFailure) -> Response<ProxyBody> {
    let header = format!(
        "host={host}; rule=audit-log-failing; allow with: free space for {}",
        failure.path.display()
    );
    let body =
        format!("bot-bottle: {host}:{port} not forwarded: {failure}; nothing is forwarded that is not recorded\n");
    build(StatusCode::SERVICE_UNAVAILABLE, Some(header), body, false)
}

fn build(status: StatusCode, header: Option<String>, body: String, close: bool) -> Response<ProxyBody> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    if let Some(h) = header {
        // Host names and codes are ASCII; a value that still fails is replaced rather than dropped.
        let value = HeaderValue::from_str(&h).unwrap_or_else(|_| HeaderValue::from_static("rule=denied"));
        headers.insert(DENIED_HEADER, value);
    }
    if close {
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_allowed_carries_the_allow_hint() {
        let r = response(&DenyReason::HostNotAllowed, "example.com", 443);
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        let h = r.headers()[DENIED_HEADER].to_str().unwrap();
        assert_eq!(
            h,
            "host=example.com; rule=not-allowed; allow with: bot-bottle run --allow example.com:443"
        );
    }

    #[test]
    fn malformed_is_400() {
        let r = response(&DenyReason::BadPath("x"), "example.com", 443);
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    }
}
