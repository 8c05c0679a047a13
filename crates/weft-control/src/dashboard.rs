//! The dashboard: static pages served at `/` on the API's address, embedded in the
//! binary at build time (HTML, CSS, JavaScript modules and the vendored libraries under
//! `dashboard/`, with their licenses).
//!
//! The pages read only the public API, with the session cookie [`crate::sessions`]
//! hands them at login, so everything they show can be had from the CLI too. Every
//! response carries a strict Content-Security-Policy: scripts, styles and connections
//! from this origin only, no inline script, no framing; so a value from the mesh that
//! slips into the page as markup still cannot run.

use axum::{
    extract::Path,
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};

/// What every dashboard response allows the page to do.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' \
                                           data:; connect-src 'self'; font-src 'self'; base-uri 'none'; form-action \
                                           'self'; frame-ancestors 'none'";

/// One embedded file: its path under `/ui/`, its content type and its bytes.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

macro_rules! assets {
    ($(($path:literal, $type:expr)),* $(,)?) => {
        &[$(Asset {
            path: $path,
            content_type: $type,
            bytes: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/dashboard/", $path)),
        }),*]
    };
}

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

static ASSETS: &[Asset] = assets![
    ("index.html", "text/html; charset=utf-8"),
    ("app.css", CSS),
    ("favicon.svg", "image/svg+xml"),
    ("js/main.js", JS),
    ("js/api.js", JS),
    ("js/dom.js", JS),
    ("js/topology.js", JS),
    ("js/layout.js", JS),
    ("js/service.js", JS),
    ("js/config.js", JS),
    ("js/security.js", JS),
    ("js/mesh.js", JS),
    ("js/tap.js", JS),
    ("js/changes.js", JS),
    ("js/workload.js", JS),
    ("vendor/d3-dispatch.min.js", JS),
    ("vendor/d3-quadtree.min.js", JS),
    ("vendor/d3-timer.min.js", JS),
    ("vendor/d3-force.min.js", JS),
    ("vendor/uPlot.iife.min.js", JS),
    ("vendor/uPlot.min.css", CSS),
    ("vendor/d3-dispatch.LICENSE", TEXT),
    ("vendor/d3-quadtree.LICENSE", TEXT),
    ("vendor/d3-timer.LICENSE", TEXT),
    ("vendor/d3-force.LICENSE", TEXT),
    ("vendor/uPlot.LICENSE", TEXT),
];

/// The routes of the dashboard: `/` and `/ui/...`. They need no token: the pages hold
/// nothing of the mesh until the API, behind login, fills them.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|headers: HeaderMap| async move { serve("index.html", &headers) }))
        .route("/ui/{*path}", get(|Path(path): Path<String>, headers: HeaderMap| async move { serve(&path, &headers) }))
}

/// A version tag for every asset: the binary's version and the asset's length and hash,
/// so a browser revalidates cheaply and never keeps an old page after an upgrade.
fn etag(asset: &Asset) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, asset.bytes);
    format!("\"{}-{}\"", env!("CARGO_PKG_VERSION"), hex::encode(&digest.as_ref()[..8]))
}

fn serve(path: &str, headers: &HeaderMap) -> Response {
    let Some(asset) = ASSETS.iter().find(|asset| asset.path == path) else {
        return (StatusCode::NOT_FOUND, secured(), "no such dashboard file").into_response();
    };
    let tag = etag(asset);
    let fresh = headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).is_some_and(|v| v == tag);
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, asset.content_type)], asset.bytes).into_response()
    };
    let response_headers = response.headers_mut();
    response_headers.extend(secured());
    response_headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(tag) = HeaderValue::from_str(&tag) {
        response_headers.insert(header::ETAG, tag);
    }
    response
}

/// The headers that keep the dashboard to its own origin.
fn secured() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_page_module_is_embedded() {
        // A module the pages import but the table lacks would be a 404 in the browser.
        let modules = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/dashboard/js")).unwrap();
        for module in modules {
            let name = format!("js/{}", module.unwrap().file_name().to_string_lossy());
            assert!(ASSETS.iter().any(|asset| asset.path == name), "{name} is not embedded");
        }
    }

    #[test]
    fn unknown_files_are_not_found_and_known_ones_revalidate() {
        assert_eq!(serve("../Cargo.toml", &HeaderMap::new()).status(), StatusCode::NOT_FOUND);
        let first = serve("index.html", &HeaderMap::new());
        assert!(first.headers()[header::CONTENT_SECURITY_POLICY].to_str().unwrap().contains("script-src 'self'"));
        let mut headers = HeaderMap::new();
        headers.insert(header::IF_NONE_MATCH, first.headers()[header::ETAG].clone());
        assert_eq!(serve("index.html", &headers).status(), StatusCode::NOT_MODIFIED);
    }
}
