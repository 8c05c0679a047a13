//! The authorization engine: AuthorizationPolicy specs as users write them, judged
//! against any caller and call. Never a panic, and DENY always wins: the same policies
//! plus one DENY rule that matches everything deny every call.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_model::{
    authz::{Authorizer, Call, Caller, Decision},
    spec::{AuthorizationAction, AuthorizationPolicySpec, AuthorizationRule, DefaultPolicy},
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // policies as a YAML list \n---call---\n principal \n method \n path \n port \n header: value
    let (policies, call) = text.split_once("\n---call---\n").unwrap_or((text, ""));
    let Ok(specs) = serde_norway::from_str::<Vec<AuthorizationPolicySpec>>(policies) else { return };
    let mut lines = call.split('\n');
    let principal = lines.next().filter(|p| !p.is_empty());
    let method = lines.next().unwrap_or("GET");
    let path = lines.next().unwrap_or("/");
    let port = lines.next().and_then(|p| p.parse().ok());
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
    let namespace = principal
        .and_then(|p| weft_model::SpiffeId::parse(p).ok())
        .and_then(|id| id.workload_parts().map(|(ns, _)| ns.to_string()));
    let caller = Caller { principal, namespace: namespace.as_deref() };
    let call = Call { method, path, port, header: &header };
    let named: Vec<(String, &AuthorizationPolicySpec)> =
        specs.iter().enumerate().map(|(i, spec)| (format!("policy-{i}"), spec)).collect();
    let policies: Vec<(&str, &AuthorizationPolicySpec)> = named.iter().map(|(n, s)| (n.as_str(), *s)).collect();
    for default in [DefaultPolicy::Allow, DefaultPolicy::Deny, DefaultPolicy::Authenticated] {
        if let Ok(authorizer) = Authorizer::new(&policies, default) {
            let _ = authorizer.decide(&caller, &call);
        }
    }
    let Some(first) = specs.first() else { return };
    let deny_all = AuthorizationPolicySpec {
        target_ref: first.target_ref.clone(),
        action: AuthorizationAction::Deny,
        rules: vec![AuthorizationRule::default()],
    };
    let mut with_deny = policies.clone();
    with_deny.push(("deny-all", &deny_all));
    if let Ok(authorizer) = Authorizer::new(&with_deny, DefaultPolicy::Allow) {
        let decision = authorizer.decide(&caller, &call);
        assert!(matches!(decision, Decision::Deny { .. }), "a DENY-everything rule was overruled: {decision:?}");
    }
});
