//! The embedded browser client and demo page.

use crate::support::TestHub;

#[tokio::test]
async fn the_client_and_the_demo_page_are_served_with_types_and_revalidation() {
    let hub = TestHub::spawn().await;
    let js = hub.http.get(hub.url("/herald.js")).send().await.unwrap();
    assert_eq!(js.status(), 200);
    let h = js.headers().clone();
    assert_eq!(h["content-type"], "text/javascript; charset=utf-8");
    assert_eq!(h["cache-control"], "no-cache");
    assert_eq!(h["access-control-allow-origin"], "*");
    assert_eq!(h["x-content-type-options"], "nosniff");
    let etag = h["etag"].to_str().unwrap().to_owned();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    let body = js.text().await.unwrap();
    let source =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/clients/js/herald.js"))
            .unwrap();
    assert_eq!(body, source, "the npm package's file, unchanged");
    assert!(body.contains("export function connect"));

    // Revalidation: the same ETag is a 304 with no body.
    let again = hub
        .http
        .get(hub.url("/herald.js"))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);
    assert_eq!(again.headers()["etag"], etag.as_str());
    assert!(again.bytes().await.unwrap().is_empty());
    let other = hub
        .http
        .get(hub.url("/herald.js"))
        .header("if-none-match", "\"something-else\"")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200);

    let page = hub.http.get(hub.url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    assert!(
        page.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'self'")
    );
    let html = page.text().await.unwrap();
    assert!(
        html.contains("from '/herald.js'"),
        "the page uses the served client"
    );
    assert!(!html.contains("https://"), "no CDN");
    let head = hub.http.head(hub.url("/")).send().await.unwrap();
    assert_eq!(head.status(), 200);
    // Other methods are still refused as JSON.
    let post = hub.http.post(hub.url("/herald.js")).send().await.unwrap();
    assert_eq!(post.status(), 405);
}
