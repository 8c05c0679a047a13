//! Certificate signing requests as the CA receives them. Whatever the request says, a
//! certificate the CA signs verifies against its root, carries exactly the identity the
//! CA gave (never the one requested), and is no CA.
#![no_main]

use std::{
    sync::OnceLock,
    time::{Duration, SystemTime},
};

use libfuzzer_sys::fuzz_target;
use weft_identity::{
    authority::Authority,
    verify::{verify_workload_certificate, Usage},
    SpiffeId, TrustDomain,
};

fn authority() -> &'static (Authority, SystemTime) {
    static AUTHORITY: OnceLock<(Authority, SystemTime)> = OnceLock::new();
    AUTHORITY.get_or_init(|| {
        let now = SystemTime::now();
        (Authority::generate(&TrustDomain::new("weft.local").unwrap(), now).unwrap(), now)
    })
}

fuzz_target!(|data: &[u8]| {
    let (authority, now) = authority();
    let id = SpiffeId::parse("spiffe://weft.local/ns/default/sa/reviews").unwrap();
    if let Ok(signed) = authority.sign(data, &id, Duration::from_secs(3600), *now) {
        let verified = verify_workload_certificate(
            &signed.chain,
            &[authority.root().clone()],
            id.trust_domain(),
            *now,
            Usage::Client,
        )
        .expect("a certificate the CA signed verifies");
        assert_eq!(verified, id, "the certificate carries the identity the CA gave");
    }
});
