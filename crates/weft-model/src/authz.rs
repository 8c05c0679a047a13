//! Judging an inbound request against the AuthorizationPolicies of its Service.
//!
//! The order is fixed and simple: a request whose path cannot be normalised is denied;
//! then any matching DENY policy denies; then, if the Service has any ALLOW policy, one of
//! them must match; with no policy at all, MeshConfig's default decides (`allow`, `deny`,
//! or `authenticated`: any caller with a mesh identity).
//!
//! Paths are matched after normalisation, so that a rule on `/admin*` cannot be dodged
//! with `//admin`, `/x/../admin` or `/%61dmin`; a percent-encoded `/` or `\` is refused
//! outright, since the application behind may decode it into a separator the rule never
//! saw.

use crate::spec::{
    AuthorizationAction, AuthorizationOperation, AuthorizationPolicySpec, AuthorizationRule, AuthorizationSource,
    DefaultPolicy, HeaderCondition,
};

/// Who is calling, as mutual TLS proved it; both `None` for a plaintext caller.
#[derive(Clone, Copy, Debug, Default)]
pub struct Caller<'a> {
    /// The caller's SPIFFE ID.
    pub principal: Option<&'a str>,
    /// The namespace in that SPIFFE ID.
    pub namespace: Option<&'a str>,
}

/// What is being called.
pub struct Call<'a> {
    pub method: &'a str,
    /// As received: path and maybe query.
    pub path: &'a str,
    /// The Service port, when the caller's proxy conveyed it (inside mutual TLS);
    /// `None` when it cannot be known (a plaintext caller): port-scoped rules then fail
    /// closed, a DENY applying and an ALLOW not.
    pub port: Option<u16>,
    /// The first value of a request header (names are lowercase).
    pub header: &'a dyn Fn(&str) -> Option<&'a str>,
}

/// The outcome, naming what decided it (for `weft-error` and metrics).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// `policy`: the ALLOW policy that matched; `None` when the default allowed.
    Allow { policy: Option<String> },
    /// `policy`: the DENY policy that matched, or why no policy allowed.
    Deny { policy: String },
}

impl Decision {
    pub fn allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }
}

/// How far a caller reaches a Service over all the requests it could make: one cell of
/// the authorization matrix.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "reach", rename_all = "lowercase")]
pub enum Reach {
    /// Every request is allowed. `policy`: the ALLOW policy; `None` when the default
    /// allows.
    All { policy: Option<String> },
    /// Some requests, by method, path, port or header: `allow` names the ALLOW policies
    /// that let some through, `deny` the DENY policies that stop some.
    Some { allow: Vec<String>, deny: Vec<String> },
    /// No request. `policy`: the DENY policy, or why nothing allows.
    None { policy: String },
}

/// A pattern: exact, `*`, `prefix*` or `*suffix`.
#[derive(Clone, Debug, PartialEq)]
enum Pattern {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl Pattern {
    fn parse(text: &str) -> Result<Self, String> {
        let pattern = match (text.strip_prefix('*'), text.strip_suffix('*')) {
            _ if text == "*" => Pattern::Any,
            (Some(suffix), None) => Pattern::Suffix(suffix.to_string()),
            (None, Some(prefix)) => Pattern::Prefix(prefix.to_string()),
            (None, None) => Pattern::Exact(text.to_string()),
            (Some(_), Some(_)) => return Err(format!("{text:?}: '*' may start or end a pattern, not both")),
        };
        let inner = match &pattern {
            Pattern::Any => "",
            Pattern::Exact(s) | Pattern::Prefix(s) | Pattern::Suffix(s) => s,
        };
        if inner.contains('*') {
            return Err(format!("{text:?}: '*' may only start or end a pattern"));
        }
        Ok(pattern)
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(exact) => value == exact,
            Pattern::Prefix(prefix) => value.starts_with(prefix.as_str()),
            Pattern::Suffix(suffix) => value.ends_with(suffix.as_str()),
        }
    }
}

fn patterns(texts: &[String], what: &str) -> Result<Vec<Pattern>, String> {
    texts.iter().map(|t| Pattern::parse(t).map_err(|e| format!("{what}: {e}"))).collect()
}

/// Any of `patterns` matches `value`; an empty list matches anything.
fn any(patterns: &[Pattern], value: Option<&str>) -> bool {
    patterns.is_empty() || value.is_some_and(|v| patterns.iter().any(|p| p.matches(v)))
}

struct Source {
    principals: Vec<Pattern>,
    namespaces: Vec<Pattern>,
}

struct Operation {
    methods: Vec<String>,
    paths: Vec<Pattern>,
    ports: Vec<u16>,
}

struct Condition {
    header: String,
    values: Vec<Pattern>,
}

struct Rule {
    from: Vec<Source>,
    to: Vec<Operation>,
    when: Vec<Condition>,
}

struct Policy {
    name: String,
    rules: Vec<Rule>,
}

impl Rule {
    /// The rule `{}`: matches every request.
    fn everything() -> Self {
        Rule { from: Vec::new(), to: Vec::new(), when: Vec::new() }
    }
}

fn compile_source(source: &AuthorizationSource) -> Result<Source, String> {
    for principal in &source.principals {
        if principal != "*" && !principal.starts_with("spiffe://") && !principal.starts_with('*') {
            return Err(format!("principal {principal:?}: a SPIFFE ID (spiffe://...), '*', or a '*suffix'"));
        }
    }
    Ok(Source {
        principals: patterns(&source.principals, "principals")?,
        namespaces: patterns(&source.namespaces, "namespaces")?,
    })
}

fn compile_operation(operation: &AuthorizationOperation) -> Result<Operation, String> {
    for path in &operation.paths {
        if path != "*" && !path.starts_with('/') {
            return Err(format!("path {path:?}: paths start with '/' (or are '*')"));
        }
        if path.ends_with('*') && path.len() > 1 && normalize_path(path.trim_end_matches('*')).is_none() {
            return Err(format!("path {path:?} cannot be normalised"));
        }
    }
    for method in &operation.methods {
        if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(format!("method {method:?}: HTTP methods are uppercase letters (GET, POST, ...)"));
        }
    }
    if operation.ports.contains(&0) {
        return Err("ports are 1-65535".into());
    }
    Ok(Operation {
        methods: operation.methods.clone(),
        paths: patterns(&operation.paths, "paths")?,
        ports: operation.ports.clone(),
    })
}

fn compile_condition(condition: &HeaderCondition) -> Result<Condition, String> {
    if condition.header.is_empty() || condition.header.bytes().any(|b| b.is_ascii_uppercase() || b == b' ') {
        return Err(format!("header {:?}: use the lowercase header name", condition.header));
    }
    if condition.values.is_empty() {
        return Err(format!("header {:?}: list the values it may have", condition.header));
    }
    Ok(Condition { header: condition.header.clone(), values: patterns(&condition.values, "values")? })
}

fn compile_rule(rule: &AuthorizationRule) -> Result<Rule, String> {
    Ok(Rule {
        from: rule.from.iter().map(compile_source).collect::<Result<_, _>>()?,
        to: rule.to.iter().map(compile_operation).collect::<Result<_, _>>()?,
        when: rule.when.iter().map(compile_condition).collect::<Result<_, _>>()?,
    })
}

/// How a port condition judges a call whose port is unknown: it matches in a DENY
/// policy and not in an ALLOW one, so not knowing the port never opens anything.
#[derive(Clone, Copy)]
enum UnknownPort {
    Matches,
    DoesNotMatch,
}

impl Rule {
    fn matches(&self, caller: &Caller<'_>, call: &Call<'_>, path: &str, unknown_port: UnknownPort) -> bool {
        let from = self.names_caller(caller);
        let port_matches = |ports: &[u16]| match call.port {
            _ if ports.is_empty() => true,
            Some(port) => ports.contains(&port),
            None => matches!(unknown_port, UnknownPort::Matches),
        };
        let to = self.to.is_empty()
            || self.to.iter().any(|o| {
                (o.methods.is_empty() || o.methods.iter().any(|m| m == call.method))
                    && any(&o.paths, Some(path))
                    && port_matches(&o.ports)
            });
        let when = self.when.iter().all(|c| any(&c.values, (call.header)(&c.header)));
        from && to && when
    }
}

impl Rule {
    /// Whether `caller` is among the rule's sources (any caller when it names none).
    fn names_caller(&self, caller: &Caller<'_>) -> bool {
        self.from.is_empty()
            || self.from.iter().any(|s| any(&s.principals, caller.principal) && any(&s.namespaces, caller.namespace))
    }

    /// Whether the rule holds for every request of a caller it names (no method, path,
    /// port or header narrows it), and whether it holds for any. A port condition is
    /// unknown for a plaintext caller: it holds in a DENY rule and not in an ALLOW one,
    /// as when judging a request.
    fn scope(&self, caller: &Caller<'_>, unknown_port: UnknownPort) -> (bool, bool) {
        let port_unknown = caller.principal.is_none();
        let all_paths = |o: &Operation| o.paths.is_empty() || o.paths.contains(&Pattern::Any);
        let ports_hold =
            |o: &Operation| o.ports.is_empty() || (port_unknown && matches!(unknown_port, UnknownPort::Matches));
        let ports_may_hold =
            |o: &Operation| o.ports.is_empty() || !port_unknown || matches!(unknown_port, UnknownPort::Matches);
        let every = self.when.is_empty()
            && (self.to.is_empty() || self.to.iter().any(|o| o.methods.is_empty() && all_paths(o) && ports_hold(o)));
        let some = self.to.is_empty() || self.to.iter().any(ports_may_hold);
        (every, some)
    }
}

impl Policy {
    /// Whether some rule of the policy holds for every request of `caller`, and whether
    /// one holds for any (see [`Rule::scope`]).
    fn scope(&self, caller: &Caller<'_>, unknown_port: UnknownPort) -> (bool, bool) {
        self.rules
            .iter()
            .filter(|rule| rule.names_caller(caller))
            .map(|rule| rule.scope(caller, unknown_port))
            .fold((false, false), |(every, some), (rule_every, rule_some)| (every || rule_every, some || rule_some))
    }
}

/// The compiled policies of one Service.
pub struct Authorizer {
    deny: Vec<Policy>,
    allow: Vec<Policy>,
    default: DefaultPolicy,
}

/// Without policies: allows everything, as a mesh without MeshConfig does.
impl Default for Authorizer {
    fn default() -> Self {
        Authorizer { deny: Vec::new(), allow: Vec::new(), default: DefaultPolicy::Allow }
    }
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = |policies: &[Policy]| policies.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
        f.debug_struct("Authorizer")
            .field("deny", &names(&self.deny))
            .field("allow", &names(&self.allow))
            .field("default", &self.default)
            .finish()
    }
}

impl Authorizer {
    /// Denies every request, naming `reason` as the policy.
    pub fn deny_all(reason: String) -> Self {
        Authorizer {
            deny: vec![Policy { name: reason, rules: vec![Rule::everything()] }],
            allow: Vec::new(),
            default: DefaultPolicy::Deny,
        }
    }

    /// Compiles `policies` (name, spec) for one Service; refuses a malformed pattern,
    /// naming the policy.
    pub fn new(policies: &[(&str, &AuthorizationPolicySpec)], default: DefaultPolicy) -> Result<Self, String> {
        let mut authorizer = Authorizer { deny: Vec::new(), allow: Vec::new(), default };
        for (name, spec) in policies {
            let rules = spec
                .rules
                .iter()
                .map(compile_rule)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("AuthorizationPolicy {name}: {e}"))?;
            let policy = Policy { name: name.to_string(), rules };
            match spec.action {
                AuthorizationAction::Deny => authorizer.deny.push(policy),
                AuthorizationAction::Allow => authorizer.allow.push(policy),
            }
        }
        Ok(authorizer)
    }

    /// Judges one request.
    pub fn decide(&self, caller: &Caller<'_>, call: &Call<'_>) -> Decision {
        let Some(path) = normalize_path(call.path) else {
            return Decision::Deny { policy: "(a path that cannot be normalised)".into() };
        };
        let path = path.as_str();
        let matching = |unknown_port| {
            move |policy: &&Policy| policy.rules.iter().any(|rule| rule.matches(caller, call, path, unknown_port))
        };
        if let Some(policy) = self.deny.iter().find(matching(UnknownPort::Matches)) {
            return Decision::Deny { policy: policy.name.clone() };
        }
        if !self.allow.is_empty() {
            return match self.allow.iter().find(matching(UnknownPort::DoesNotMatch)) {
                Some(policy) => Decision::Allow { policy: Some(policy.name.clone()) },
                None => Decision::Deny { policy: "(no ALLOW policy matched)".into() },
            };
        }
        match self.default {
            DefaultPolicy::Allow => Decision::Allow { policy: None },
            DefaultPolicy::Deny => Decision::Deny { policy: "(default: deny)".into() },
            DefaultPolicy::Authenticated if caller.principal.is_some() => Decision::Allow { policy: None },
            DefaultPolicy::Authenticated => Decision::Deny { policy: "(default: authenticated callers only)".into() },
        }
    }
}

impl Authorizer {
    /// How far `caller` reaches the Service over every request it could make (a path
    /// that cannot be normalised aside: that is always denied). Judged as [`decide`]
    /// judges one request: DENY first, then ALLOW if there is any, then the default.
    ///
    /// [`decide`]: Authorizer::decide
    pub fn reach(&self, caller: &Caller<'_>) -> Reach {
        let mut denying = Vec::new();
        for policy in &self.deny {
            let (every, some) = policy.scope(caller, UnknownPort::Matches);
            if every {
                return Reach::None { policy: policy.name.clone() };
            }
            if some {
                denying.push(policy.name.clone());
            }
        }
        let allowed = if self.allow.is_empty() {
            match self.default {
                DefaultPolicy::Allow => Reach::All { policy: None },
                DefaultPolicy::Deny => Reach::None { policy: "(default: deny)".into() },
                DefaultPolicy::Authenticated if caller.principal.is_some() => Reach::All { policy: None },
                DefaultPolicy::Authenticated => Reach::None { policy: "(default: authenticated callers only)".into() },
            }
        } else {
            let mut allowing = Vec::new();
            let mut whole = None;
            for policy in &self.allow {
                let (every, some) = policy.scope(caller, UnknownPort::DoesNotMatch);
                if every {
                    whole = Some(policy.name.clone());
                    break;
                }
                if some {
                    allowing.push(policy.name.clone());
                }
            }
            match whole {
                Some(policy) => Reach::All { policy: Some(policy) },
                None if allowing.is_empty() => Reach::None { policy: "(no ALLOW policy matched)".into() },
                None => Reach::Some { allow: allowing, deny: Vec::new() },
            }
        };
        match allowed {
            Reach::All { policy } if !denying.is_empty() => {
                Reach::Some { allow: policy.into_iter().collect(), deny: denying }
            }
            Reach::Some { allow, .. } => Reach::Some { allow, deny: denying },
            other => other,
        }
    }
}

/// The path part of `raw` (no query), with unreserved percent-escapes decoded (others
/// stay encoded), empty and `.` segments dropped and `..` resolved. `None` for what must
/// be refused: an encoded `/` or `\`, a bad escape, non-ASCII, or `..` above the root.
pub fn normalize_path(raw: &str) -> Option<String> {
    let path = raw.split(['?', '#']).next().unwrap_or("");
    if !path.starts_with('/') || path.contains('\\') || !path.is_ascii() {
        return None;
    }
    let mut decoded = String::with_capacity(path.len());
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = path.get(i + 1..i + 3)?;
            let byte = u8::from_str_radix(hex, 16).ok()?;
            match byte {
                b'/' | b'\\' => return None,
                b if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') => decoded.push(b as char),
                _ => {
                    decoded.push('%');
                    decoded.push_str(&hex.to_ascii_uppercase());
                }
            }
            i += 3;
        } else {
            decoded.push(bytes[i] as char);
            i += 1;
        }
    }
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop()?;
            }
            other => segments.push(other),
        }
    }
    let trailing = decoded.ends_with('/') && !segments.is_empty();
    let mut normalized = format!("/{}", segments.join("/"));
    if trailing {
        normalized.push('/');
    }
    Some(normalized)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = "spiffe://weft.local/ns/default/sa/web";
    const BATCH: &str = "spiffe://weft.local/ns/jobs/sa/batch";

    fn policy(yaml: &str) -> AuthorizationPolicySpec {
        serde_norway::from_str(yaml).unwrap()
    }

    fn caller(principal: &'static str) -> Caller<'static> {
        let namespace = principal.split("/ns/").nth(1).and_then(|rest| rest.split('/').next());
        Caller { principal: Some(principal), namespace }
    }

    fn decide(authorizer: &Authorizer, caller: &Caller<'_>, method: &str, path: &str) -> Decision {
        let header = |name: &str| (name == "x-debug").then_some("1");
        authorizer.decide(caller, &Call { method, path, port: Some(80), header: &header })
    }

    #[test]
    fn reach_says_whether_every_some_or_no_request_gets_through() {
        let read_only = policy(
            "targetRef: {kind: Service, name: r}\naction: ALLOW\nrules:\n- from: [{principals: [\"*/sa/web\"]}]\n  \
             to: [{methods: [GET]}]\n- from: [{namespaces: [jobs]}]\n",
        );
        let no_admin =
            policy("targetRef: {kind: Service, name: r}\naction: DENY\nrules:\n- to: [{paths: [\"/admin*\"]}]\n");
        let ban_batch = policy(
            "targetRef: {kind: Service, name: r}\naction: DENY\nrules:\n- from: [{principals: [\"*/sa/batch\"]}]\n",
        );
        let allowing = Authorizer::new(&[("read-only", &read_only)], DefaultPolicy::Allow).unwrap();
        let plaintext = Caller::default();
        assert_eq!(allowing.reach(&caller(WEB)), Reach::Some { allow: vec!["read-only".into()], deny: vec![] });
        assert_eq!(allowing.reach(&caller(BATCH)), Reach::All { policy: Some("read-only".into()) });
        assert_eq!(allowing.reach(&plaintext), Reach::None { policy: "(no ALLOW policy matched)".into() });

        let with_denials = Authorizer::new(
            &[("read-only", &read_only), ("no-admin", &no_admin), ("ban", &ban_batch)],
            DefaultPolicy::Allow,
        )
        .unwrap();
        assert_eq!(with_denials.reach(&caller(BATCH)), Reach::None { policy: "ban".into() });
        assert_eq!(
            with_denials.reach(&caller(WEB)),
            Reach::Some { allow: vec!["read-only".into()], deny: vec!["no-admin".into()] }
        );

        // Without ALLOW policies, the default; a partial DENY makes it partial.
        let deny_only = Authorizer::new(&[("no-admin", &no_admin)], DefaultPolicy::Authenticated).unwrap();
        assert_eq!(deny_only.reach(&caller(WEB)), Reach::Some { allow: vec![], deny: vec!["no-admin".into()] });
        assert_eq!(deny_only.reach(&plaintext), Reach::None { policy: "(default: authenticated callers only)".into() });
        assert_eq!(Authorizer::default().reach(&plaintext), Reach::All { policy: None });

        // A port is unknown for a plaintext caller: a port-scoped ALLOW never lets it in,
        // a port-scoped DENY always keeps it out, as when judging its requests.
        let port_allow =
            policy("targetRef: {kind: Service, name: r}\naction: ALLOW\nrules:\n- to: [{ports: [8080]}]\n");
        let port_deny = policy("targetRef: {kind: Service, name: r}\naction: DENY\nrules:\n- to: [{ports: [9090]}]\n");
        let ports = Authorizer::new(&[("p", &port_allow)], DefaultPolicy::Allow).unwrap();
        assert_eq!(ports.reach(&plaintext), Reach::None { policy: "(no ALLOW policy matched)".into() });
        assert_eq!(ports.reach(&caller(WEB)), Reach::Some { allow: vec!["p".into()], deny: vec![] });
        let ports = Authorizer::new(&[("d", &port_deny)], DefaultPolicy::Allow).unwrap();
        assert_eq!(ports.reach(&plaintext), Reach::None { policy: "d".into() });
        assert_eq!(ports.reach(&caller(WEB)), Reach::Some { allow: vec![], deny: vec!["d".into()] });

        // Every reach agrees with the decisions on requests.
        let web = caller(WEB);
        assert!(decide(&with_denials, &web, "GET", "/x").allowed());
        assert!(!decide(&with_denials, &web, "GET", "/admin/x").allowed());
        assert!(!decide(&with_denials, &web, "POST", "/x").allowed());
    }

    #[test]
    fn the_issue_example_allows_web_to_read_reviews_and_nothing_else() {
        let allow = policy(
            r#"
targetRef: {kind: Service, name: reviews}
action: ALLOW
rules:
- from: [{principals: ["spiffe://weft.local/ns/default/sa/web"]}]
  to: [{methods: [GET], paths: ["/reviews/*"]}]
"#,
        );
        let authorizer = Authorizer::new(&[("reviews-from-web", &allow)], DefaultPolicy::Allow).unwrap();
        let web = caller(WEB);
        assert_eq!(
            decide(&authorizer, &web, "GET", "/reviews/1"),
            Decision::Allow { policy: Some("reviews-from-web".into()) }
        );
        assert!(!decide(&authorizer, &web, "POST", "/reviews/1").allowed());
        assert!(!decide(&authorizer, &caller(BATCH), "GET", "/reviews/1").allowed());
        assert!(!decide(&authorizer, &Caller::default(), "GET", "/reviews/1").allowed(), "plaintext: no identity");
        // Normalisation cannot be used to step outside the rule, nor into it.
        assert!(decide(&authorizer, &web, "GET", "//reviews//1").allowed());
        assert!(!decide(&authorizer, &web, "GET", "/reviews/../admin").allowed());
        assert!(!decide(&authorizer, &web, "GET", "/reviews/%2e%2e/admin").allowed());
        assert!(!decide(&authorizer, &web, "GET", "/reviews%2F1").allowed());
    }

    #[test]
    fn deny_wins_over_allow_and_the_default_applies_only_without_policies() {
        let allow_all = policy("targetRef: {kind: Service, name: r}\naction: ALLOW\nrules: [{}]\n");
        let deny_admin =
            policy("targetRef: {kind: Service, name: r}\naction: DENY\nrules: [{to: [{paths: [\"/admin*\"]}]}]\n");
        let both = Authorizer::new(&[("all", &allow_all), ("no-admin", &deny_admin)], DefaultPolicy::Allow).unwrap();
        let web = caller(WEB);
        assert!(decide(&both, &web, "GET", "/").allowed());
        assert_eq!(decide(&both, &web, "GET", "/admin/x"), Decision::Deny { policy: "no-admin".into() });
        assert_eq!(decide(&both, &web, "GET", "/x/../%61dmin"), Decision::Deny { policy: "no-admin".into() });

        let nothing = policy("targetRef: {kind: Service, name: r}\naction: ALLOW\n");
        assert!(
            !decide(&Authorizer::new(&[("none", &nothing)], DefaultPolicy::Allow).unwrap(), &web, "GET", "/").allowed()
        );

        let deny = Authorizer::new(&[], DefaultPolicy::Deny).unwrap();
        assert!(!decide(&deny, &web, "GET", "/").allowed());
        let authenticated = Authorizer::new(&[], DefaultPolicy::Authenticated).unwrap();
        assert!(decide(&authenticated, &web, "GET", "/").allowed());
        assert!(!decide(&authenticated, &Caller::default(), "GET", "/").allowed());
        assert!(decide(&Authorizer::new(&[], DefaultPolicy::Allow).unwrap(), &Caller::default(), "GET", "/").allowed());
    }

    #[test]
    fn namespaces_wildcards_ports_and_headers() {
        let spec = policy(
            r#"
targetRef: {kind: Service, name: r}
action: ALLOW
rules:
- from: [{namespaces: [jobs]}, {principals: ["*/sa/web"]}]
  to: [{ports: [80]}]
  when: [{header: x-debug, values: ["1"]}]
"#,
        );
        let authorizer = Authorizer::new(&[("p", &spec)], DefaultPolicy::Deny).unwrap();
        assert!(decide(&authorizer, &caller(BATCH), "GET", "/").allowed());
        assert!(decide(&authorizer, &caller(WEB), "DELETE", "/x").allowed());
        assert!(!decide(&authorizer, &caller("spiffe://weft.local/ns/default/sa/other"), "GET", "/").allowed());
        let no_header = |_: &str| None;
        let call = Call { method: "GET", path: "/", port: Some(80), header: &no_header };
        assert!(!authorizer.decide(&caller(WEB), &call).allowed(), "the header condition must hold");
        let header = |_: &str| Some("1");
        let call = Call { method: "GET", path: "/", port: Some(8080), header: &header };
        assert!(!authorizer.decide(&caller(WEB), &call).allowed(), "another port");
    }

    #[test]
    fn an_unknown_port_fails_closed() {
        let deny = policy("targetRef: {kind: Service, name: r}\naction: DENY\nrules: [{to: [{ports: [80]}]}]\n");
        let allow = policy("targetRef: {kind: Service, name: r}\naction: ALLOW\nrules: [{to: [{ports: [8080]}]}]\n");
        let no_header = |_: &str| None;
        let call = |port| Call { method: "GET", path: "/", port, header: &no_header };
        let denying = Authorizer::new(&[("no-80", &deny)], DefaultPolicy::Allow).unwrap();
        assert_eq!(denying.decide(&caller(WEB), &call(None)), Decision::Deny { policy: "no-80".into() });
        assert!(denying.decide(&caller(WEB), &call(Some(8080))).allowed());
        let allowing = Authorizer::new(&[("only-8080", &allow)], DefaultPolicy::Allow).unwrap();
        assert!(!allowing.decide(&caller(WEB), &call(None)).allowed(), "an ALLOW for a port needs the port");
        assert!(allowing.decide(&caller(WEB), &call(Some(8080))).allowed());
    }

    #[test]
    fn malformed_patterns_are_refused_naming_the_policy() {
        for (rule, reason) in [
            ("{to: [{paths: [\"/a*b\"]}]}", "only start or end"),
            ("{to: [{paths: [\"admin\"]}]}", "start with '/'"),
            ("{to: [{methods: [get]}]}", "uppercase"),
            ("{from: [{principals: [\"web\"]}]}", "SPIFFE ID"),
            ("{when: [{header: X-Debug, values: [\"1\"]}]}", "lowercase"),
            ("{to: [{ports: [0]}]}", "1-65535"),
        ] {
            let spec = policy(&format!("targetRef: {{kind: Service, name: r}}\naction: ALLOW\nrules: [{rule}]\n"));
            let error = Authorizer::new(&[("bad", &spec)], DefaultPolicy::Allow).err().unwrap();
            assert!(error.contains("AuthorizationPolicy bad") && error.contains(reason), "{rule}: {error}");
        }
    }

    #[test]
    fn paths_normalise_or_are_refused() {
        for (raw, normalized) in [
            ("/", "/"),
            ("/a/b?x=1", "/a/b"),
            ("//a///b/", "/a/b/"),
            ("/a/./b/../c", "/a/c"),
            ("/%61%62c", "/abc"),
            ("/a%20b", "/a%20b"),
        ] {
            assert_eq!(normalize_path(raw).as_deref(), Some(normalized), "{raw}");
        }
        for raw in ["", "a", "/..", "/a/../..", "/a%2fb", "/a%5Cb", "/a\\b", "/a%2", "/a%zz"] {
            assert!(normalize_path(raw).is_none(), "{raw}");
        }
    }
}
