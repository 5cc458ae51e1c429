//! The browser client (`GET /herald.js`) and the demo page (`GET /`),
//! embedded in the binary so `herald serve` shows what it does with no
//! files beside it and no CDN.
//!
//! Both are revalidated on every use (`Cache-Control: no-cache` with an
//! `ETag`, so an unchanged file costs a 304): a new herald version must
//! never leave browsers on an old client.

use std::sync::OnceLock;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The client, as published to npm (`clients/js/herald.js`).
pub const CLIENT_JS: &str = include_str!("../../clients/js/herald.js");
/// The demo page (`clients/demo/index.html`).
pub const DEMO_HTML: &str = include_str!("../../clients/demo/index.html");

/// A strong ETag for embedded content: FNV-1a over the bytes.
fn etag(content: &str) -> HeaderValue {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in content.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // A quoted hex string is always a valid header value.
    HeaderValue::from_str(&format!("\"{h:016x}\"")).unwrap_or(HeaderValue::from_static("\"0\""))
}

fn serve(
    headers: &HeaderMap,
    content: &'static str,
    tag: &HeaderValue,
    extra: &[(header::HeaderName, &'static str)],
) -> Response {
    let mut out = if headers.get(header::IF_NONE_MATCH).is_some_and(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii() == tag.as_bytes() || t.trim_ascii() == b"*")
    }) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        content.into_response()
    };
    let h = out.headers_mut();
    h.insert(header::ETAG, tag.clone());
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    for (k, v) in extra {
        h.insert(k.clone(), HeaderValue::from_static(v));
    }
    out
}

pub(super) async fn client_js(headers: HeaderMap) -> Response {
    static TAG: OnceLock<HeaderValue> = OnceLock::new();
    serve(
        &headers,
        CLIENT_JS,
        TAG.get_or_init(|| etag(CLIENT_JS)),
        &[
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            // Pages of any origin may import it as a module.
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
        ],
    )
}

pub(super) async fn demo(headers: HeaderMap) -> Response {
    static TAG: OnceLock<HeaderValue> = OnceLock::new();
    serve(
        &headers,
        DEMO_HTML,
        TAG.get_or_init(|| etag(DEMO_HTML)),
        &[
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self' ws: wss:; img-src 'self' data:; frame-ancestors 'none'",
            ),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
    )
}
