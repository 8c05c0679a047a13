//! Discovery messages as a proxy receives and applies them: decode, compile the view
//! (what the proxy NACKs or installs), read the revocations and the trust bundle. A view
//! that compiles has the properties of `weft_fuzz::check_snapshot`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustls_pki_types::{pem::PemObject, CertificateDer};
use weft_api::discovery::{control_message, ControlMessage};

fuzz_target!(|data: &[u8]| {
    let Ok(message) = <ControlMessage as prost::Message>::decode(data) else { return };
    let Some(control_message::Message::Config(config)) = message.message else { return };
    if let Ok(snapshot) = weft_proxy::discovery::compile_view(&config, weft_fuzz::NAMESPACE) {
        let resources = weft_model::parse_documents("view", &config.resources).expect("it compiled");
        weft_fuzz::check_snapshot(&resources, &snapshot);
    }
    let revocations = config.revocations.unwrap_or_default();
    let _ = weft_proxy::revocation::Revoked::new(revocations.identities, revocations.serials);
    let _ = CertificateDer::pem_slice_iter(config.trust_bundle.as_bytes()).collect::<Result<Vec<_>, _>>();
});
