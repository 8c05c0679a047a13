//! Route matching and path normalisation on what a caller sends. Normalising is
//! idempotent and never leaves the root; routing a request through a compiled snapshot
//! of real routes never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_model::{authz::normalize_path, matching::RequestView};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // method \n path?query \n header: value ...
    let mut lines = text.split('\n');
    let method = lines.next().unwrap_or("GET");
    let target = lines.next().unwrap_or("/");
    if let Some(normalized) = normalize_path(target) {
        assert!(normalized.starts_with('/'), "{normalized:?} leaves the root");
        assert!(!normalized.split('/').any(|s| s == ".." || s == "."), "{normalized:?} keeps dot segments");
        assert_eq!(
            normalize_path(&normalized).as_deref(),
            Some(normalized.as_str()),
            "normalising twice changes {target:?}"
        );
    }
    let Ok(method) = http::Method::from_bytes(method.as_bytes()) else { return };
    let mut headers = http::HeaderMap::new();
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if let (Ok(name), Ok(value)) =
                (http::HeaderName::from_bytes(name.trim().as_bytes()), http::HeaderValue::from_str(value.trim()))
            {
                headers.append(name, value);
            }
        }
    }
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    let request = RequestView { method: &method, path, query, headers: &headers };
    for service in &weft_fuzz::routes_snapshot().services {
        for port in &service.ports {
            for rule in port.routes.iter().flatten() {
                if rule.matcher.matches(&request) {
                    for filter in &rule.action.filters {
                        if let weft_model::snapshot::Filter::UrlRewrite { path: Some(rewrite), .. } = filter {
                            let _ = rewrite.apply(path);
                        }
                    }
                    break;
                }
            }
        }
    }
});
