//! Host and authority parsing: the absolute URI, `Host` headers, and the Service lookup
//! they lead to. An authority the proxy accepts is the URI's or the one Host header's
//! (several are refused), and a Host it accepts is a host[:port], nothing more.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // request target \n Host value \n Host value ...
    let mut lines = text.split('\n');
    let Ok(uri) = lines.next().unwrap_or("/").parse::<http::Uri>() else { return };
    let mut request = http::Request::builder().uri(uri.clone());
    let mut hosts = Vec::new();
    for line in lines {
        if let Ok(value) = http::HeaderValue::from_str(line) {
            hosts.push(line.to_string());
            request = request.header(http::header::HOST, value);
        }
    }
    let Ok(request) = request.body(()) else { return };
    let (parts, ()) = request.into_parts();
    if let Ok(Some(authority)) = weft_proxy::forward::checked_authority(&parts) {
        let from_uri = uri.authority().map(|a| a.as_str()) == Some(authority);
        let from_host = hosts.len() == 1 && hosts[0] == authority;
        assert!(from_uri || from_host, "{authority:?} is neither the URI's nor the one Host's: {uri} {hosts:?}");
        if !from_uri {
            assert!(
                authority.bytes().all(|b| b.is_ascii_alphanumeric() || b".-_:[]%".contains(&b)),
                "{authority:?} is no host[:port]"
            );
        }
        let _ = weft_fuzz::routes_snapshot().lookup_host(authority);
    }
    let _ = weft_fuzz::routes_snapshot().lookup_host(text);
});
