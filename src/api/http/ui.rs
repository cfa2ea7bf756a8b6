//! The operator's page at `/ui`: one HTML file, one stylesheet and one script, embedded
//! in the binary (`include_str!`: no build step, nothing fetched from elsewhere). The
//! script reads the admin API (`/admin/overview`, `/admin/drift`, `/admin/outbox`,
//! `/admin/audit`, and for an opened model its rollout timeline and histograms) every
//! few seconds and calls it for promote, rollback and weight changes, with the token the
//! operator types in (kept in the page's memory only, never stored).
//!
//! The page holds no data and no secret: what it shows, the admin API answers under its
//! own permission checks. With no token configured the page is served to this host only,
//! as the admin API answers only it. Every answer carries a strict Content-Security-Policy
//! (`default-src 'self'`, no inline script or style, `frame-ancestors 'none'`),
//! `X-Content-Type-Options: nosniff` and `X-Frame-Options: DENY`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::api::Api;

const INDEX_HTML: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const APP_CSS: &str = include_str!("ui/app.css");

/// The page's Content-Security-Policy: its own origin only, nothing inline, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
    style-src 'self'; img-src 'self' data:; connect-src 'self'; object-src 'none'; \
    base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// An embedded file with the page's security headers.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // A new binary may serve a new script: always revalidated.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// With no token configured, only this host gets the page (the admin API would refuse
/// anyone else's reads anyway).
fn admitted(s: &Api) -> bool {
    !s.auth.tokenless() || crate::serve::peer().is_some_and(|p| p.ip().is_loopback())
}

/// The answer to a caller [`admitted`] refuses.
fn refused() -> Response {
    let mut resp = (
        StatusCode::FORBIDDEN,
        "no admin token is configured: the operator's page answers this host only\n",
    )
        .into_response();
    resp.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

pub(super) async fn index(State(s): State<Arc<Api>>) -> Response {
    if !admitted(&s) {
        return refused();
    }
    asset("text/html; charset=utf-8", INDEX_HTML)
}

pub(super) async fn script(State(s): State<Arc<Api>>) -> Response {
    if !admitted(&s) {
        return refused();
    }
    asset("text/javascript; charset=utf-8", APP_JS)
}

pub(super) async fn style(State(s): State<Arc<Api>>) -> Response {
    if !admitted(&s) {
        return refused();
    }
    asset("text/css; charset=utf-8", APP_CSS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_has_no_inline_script_or_style_and_names_its_files() {
        assert!(INDEX_HTML.contains(r#"<script src="/ui/app.js""#));
        assert!(INDEX_HTML.contains(r#"href="/ui/app.css""#));
        // Every <script> has a src (nothing inline the policy would block).
        assert_eq!(
            INDEX_HTML.matches("<script").count(),
            INDEX_HTML.matches("<script src=").count()
        );
        for inline in ["<style", " style=", "onclick=", "onload=", "javascript:"] {
            assert!(
                !INDEX_HTML.contains(inline),
                "inline {inline} in index.html"
            );
        }
        // The script builds elements itself, never from HTML strings.
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "eval(",
            "new Function",
        ] {
            assert!(!APP_JS.contains(sink), "{sink} in app.js");
        }
        assert!(!CONTENT_SECURITY_POLICY.contains("unsafe"));
    }
}
