//! Multi-document YAML → validated [`Resource`]s, or every error with its location.
//!
//! Each error names the file, the document's 1-based index, its kind/name when known,
//! and the field path (`spec.rules[0].backendRefs[1].weight`), so a user can go straight
//! to the line. Nothing is returned unless every document is valid: a configuration is
//! taken whole or not at all.

use std::{collections::HashSet, fmt};

use serde::de::DeserializeOwned;
use serde_norway::Value;

use crate::{
    resource::{Metadata, Resource, ResourceKind, ResourceSpec},
    validate,
};

/// One refused document.
#[derive(Clone, Debug, PartialEq, thiserror::Error, serde::Serialize)]
pub struct ConfigError {
    /// The file (or other source) the document came from.
    #[serde(rename = "source")]
    pub source_name: String,
    /// 1-based index of the document within the source.
    #[serde(rename = "document")]
    pub index: usize,
    /// `Kind name` when the envelope could be read.
    pub resource: Option<String>,
    /// Dotted field path, empty for document-level errors.
    #[serde(rename = "field")]
    pub path: String,
    pub message: String,
    /// Where in the source the field is (or the nearest field around it, for one that is
    /// missing): line and column, from 1. `None` when it cannot be told.
    pub line: Option<usize>,
    pub column: Option<usize>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.source_name, self.index)?;
        if let Some(resource) = &self.resource {
            write!(f, " ({resource})")?;
        }
        if !self.path.is_empty() {
            write!(f, ", field {}", self.path)?;
        }
        if let (Some(line), Some(column)) = (self.line, self.column) {
            write!(f, " (line {line}, column {column})")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every error found in one source.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

/// The most documents one source (a file, an apply) may hold: far above real meshes'
/// files, and a bound on what one input makes the parser build.
pub const MAX_DOCUMENTS: usize = 10_000;
/// Invalid documents reported before parsing stops: enough to fix a file in a few rounds,
/// and a bound on the refusal's size.
pub const MAX_REPORTED_ERRORS: usize = 100;

/// The deepest nesting of flow collections (`[...]`, `{...}`) accepted. The YAML parser
/// keeps per-level state it rescans on every token, so deep flow nesting costs it
/// quadratic time (100 KB of `[` took a minute): such text is refused by a linear scan
/// before it is parsed. Real documents nest a handful of levels.
pub const MAX_FLOW_NESTING: usize = 64;

/// The 1-based line where flow collections first nest deeper than `limit`, if they do.
/// Quoted scalars and comments are skipped; a bracket inside a plain scalar counts, which
/// can only refuse text nobody writes (dozens of unmatched brackets in plain words).
fn flow_nesting_beyond(text: &str, limit: usize) -> Option<usize> {
    let (mut depth, mut line) = (0usize, 1usize);
    let mut quote: Option<u8> = None;
    let mut comment = false;
    let mut previous = b'\n';
    let mut bytes = text.bytes();
    while let Some(byte) = bytes.next() {
        if byte == b'\n' {
            line += 1;
            comment = false;
        }
        match quote {
            _ if comment => {}
            // YAML escapes a single quote by doubling it, which this reads as a close
            // and a reopen: the same outcome.
            Some(b'"') if byte == b'\\' => {
                bytes.next();
            }
            Some(q) if byte == q => quote = None,
            Some(_) => {}
            None => match byte {
                b'#' if previous.is_ascii_whitespace() => comment = true,
                // A quote opens a scalar only where a scalar can start (`it's` is plain).
                b'"' | b'\'' if previous.is_ascii_whitespace() || b"[{,:-?".contains(&previous) => quote = Some(byte),
                b'[' | b'{' => {
                    depth += 1;
                    if depth > limit {
                        return Some(line);
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            },
        }
        previous = byte;
    }
    None
}

/// Parses and validates every document in `text`; `source_name` is used in errors.
pub fn parse_documents(source_name: &str, text: &str) -> Result<Vec<Resource>, ConfigErrors> {
    parse_with_documents(source_name, text).map(|parsed| parsed.into_iter().map(|p| p.resource).collect())
}

/// A validated resource together with the document it came from, as the user wrote it
/// (with `metadata.namespace` filled in), as JSON. The control plane stores the document,
/// so that `weft get -o yaml` gives back what was applied and re-parsing it is exact.
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedDocument {
    pub resource: Resource,
    pub document: serde_json::Value,
}

/// [`parse_documents`], keeping each document's text as JSON alongside.
pub fn parse_with_documents(source_name: &str, text: &str) -> Result<Vec<ParsedDocument>, ConfigErrors> {
    if let Some(line) = flow_nesting_beyond(text, MAX_FLOW_NESTING) {
        return Err(ConfigErrors(vec![ConfigError {
            source_name: source_name.to_string(),
            index: 1,
            resource: None,
            path: String::new(),
            message: format!(
                "not valid YAML: flow collections ([...], {{...}}) nested more than {MAX_FLOW_NESTING} deep, at line {line}"
            ),
            line: Some(line),
            column: None,
        }]));
    }
    let mut resources = Vec::new();
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    for (i, document) in serde_norway::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let error = |resource: Option<String>, path: &str, message: String| ConfigError {
            source_name: source_name.to_string(),
            index,
            resource,
            path: path.to_string(),
            message,
            line: None,
            column: None,
        };
        if index > MAX_DOCUMENTS {
            errors.push(error(
                None,
                "",
                format!("more than {MAX_DOCUMENTS} documents in one source: split them over several files or applies"),
            ));
            break;
        }
        if errors.len() >= MAX_REPORTED_ERRORS {
            errors.push(error(None, "", format!("stopped reading after {MAX_REPORTED_ERRORS} invalid documents")));
            break;
        }
        let value: Value = match serde::Deserialize::deserialize(document) {
            Ok(value) => value,
            Err(e) => {
                let mut refused = error(None, "", format!("not valid YAML: {e}"));
                refused.line = e.location().map(|l| l.line());
                refused.column = e.location().map(|l| l.column());
                errors.push(refused);
                // The YAML stream cannot be trusted past a syntax error.
                break;
            }
        };
        if value.is_null() {
            continue; // an empty document, e.g. a trailing `---`
        }
        match parse_one(&value).and_then(|resource| Ok((as_json(&value, &resource)?, resource))) {
            Ok((document, resource)) => {
                let key = (resource.kind(), resource.key());
                if !seen.insert(key) {
                    errors.push(error(
                        Some(describe(&value)),
                        "metadata.name",
                        format!(
                            "duplicate {} {}: each resource may appear once",
                            resource.kind().as_str(),
                            resource.key()
                        ),
                    ));
                } else {
                    resources.push(ParsedDocument { resource, document });
                }
            }
            Err((path, message)) => errors.push(error(Some(describe(&value)), &path, message)),
        }
    }
    if errors.is_empty() {
        Ok(resources)
    } else {
        crate::locate::locate_errors(text, &mut errors);
        Err(ConfigErrors(errors))
    }
}

/// The document as JSON, with the defaulted namespace written out.
fn as_json(value: &Value, resource: &Resource) -> Result<serde_json::Value, FieldError> {
    let mut document = serde_json::to_value(value).map_err(|e| (String::new(), format!("cannot be stored: {e}")))?;
    if let Some(metadata) = document.get_mut("metadata").and_then(serde_json::Value::as_object_mut) {
        metadata.insert("namespace".into(), resource.metadata.namespace.clone().into());
    }
    Ok(document)
}

/// `Kind name`, best effort, for error messages.
fn describe(value: &Value) -> String {
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or("<no kind>");
    let name = value.get("metadata").and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or("<no name>");
    format!("{kind} {name}")
}

type FieldError = (String, String);

fn parse_one(value: &Value) -> Result<Resource, FieldError> {
    let Value::Mapping(map) = value else {
        return Err((String::new(), "a document must be a mapping with apiVersion, kind, metadata and spec".into()));
    };
    for key in map.keys() {
        match key.as_str() {
            Some("apiVersion" | "kind" | "metadata" | "spec") => {}
            Some("status") => {
                return Err(("status".into(), "status is written by weft, not by users; remove it".into()))
            }
            other => {
                return Err((
                    other.unwrap_or("<non-string key>").to_string(),
                    "unknown top-level field; expected apiVersion, kind, metadata, spec".into(),
                ))
            }
        }
    }
    let kind_name = required_str(value, "kind")?;
    let kind = ResourceKind::from_name(kind_name).map_err(|m| ("kind".to_string(), m))?;
    let api_version = required_str(value, "apiVersion")?;
    if api_version != kind.api_version() {
        return Err((
            "apiVersion".into(),
            format!("{} must have apiVersion {}, not {api_version:?}", kind.as_str(), kind.api_version()),
        ));
    }
    let metadata: Metadata = typed(value.get("metadata"), "metadata")?;
    validate::metadata(&metadata).map_err(|(p, m)| (format!("metadata.{p}"), m))?;
    if kind == ResourceKind::MeshConfig && metadata.name != crate::resource::MESH_CONFIG_NAME {
        return Err(("metadata.name".into(), "there is one MeshConfig and it is named mesh".into()));
    }
    if kind == ResourceKind::MeshConfig && metadata.namespace != crate::DEFAULT_NAMESPACE {
        return Err(("metadata.namespace".into(), "the MeshConfig is mesh-wide: leave out the namespace".into()));
    }
    let spec_value = value.get("spec");
    let spec = match kind {
        ResourceKind::Service => ResourceSpec::Service(typed(spec_value, "spec")?),
        ResourceKind::Workload => ResourceSpec::Workload(typed(spec_value, "spec")?),
        ResourceKind::HttpRoute => ResourceSpec::HttpRoute(Box::new(typed(spec_value, "spec")?)),
        ResourceKind::GrpcRoute => ResourceSpec::GrpcRoute(Box::new(typed(spec_value, "spec")?)),
        ResourceKind::TrafficPolicy => ResourceSpec::TrafficPolicy(Box::new(typed(spec_value, "spec")?)),
        ResourceKind::AuthorizationPolicy => ResourceSpec::AuthorizationPolicy(Box::new(typed(spec_value, "spec")?)),
        ResourceKind::MeshConfig => ResourceSpec::MeshConfig(typed(spec_value, "spec")?),
        ResourceKind::ExternalService => ResourceSpec::ExternalService(typed(spec_value, "spec")?),
    };
    validate::spec(&spec).map_err(|(p, m)| (format!("spec.{p}"), m))?;
    Ok(Resource { metadata, spec })
}

fn required_str<'a>(value: &'a Value, field: &str) -> Result<&'a str, FieldError> {
    match value.get(field) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err((field.into(), "must be a string".into())),
        None => Err((field.into(), "missing required field".into())),
    }
}

/// Deserializes one section, reporting the full field path on failure.
fn typed<T: DeserializeOwned>(value: Option<&Value>, prefix: &str) -> Result<T, FieldError> {
    let Some(value) = value else {
        return Err((prefix.into(), "missing required field".into()));
    };
    serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        let inner = e.path().to_string();
        let path = if inner == "." { prefix.to_string() } else { format!("{prefix}.{inner}") };
        (path, e.into_inner().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: reviews}
spec:
  selector: {app: reviews}
  ports: [{port: 80, protocol: http}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: canary}
spec:
  parentRefs: [{kind: Service, name: reviews, port: 80}]
  rules:
  - backendRefs: [{name: reviews-v1, port: 80, weight: 90}, {name: reviews-v2, port: 80, weight: 10}]
    timeouts: {request: 5s}
---
"#;

    #[test]
    fn parses_several_documents_and_defaults_namespace() {
        let resources = parse_documents("mesh.yaml", GOOD).unwrap();
        assert_eq!(resources.len(), 2);
        assert_eq!(resources[0].metadata.namespace, "default");
        assert_eq!(resources[1].kind(), ResourceKind::HttpRoute);
    }

    #[test]
    fn error_names_file_document_resource_and_field_path() {
        let bad = GOOD.replace("weight: 10}", "weight: ten}");
        let errors = parse_documents("mesh.yaml", &bad).unwrap_err();
        let text = errors.to_string();
        assert!(text.contains("mesh.yaml: document 2 (HTTPRoute canary)"), "{text}");
        assert!(text.contains("spec.rules[0].backendRefs[1].weight"), "{text}");
    }

    #[test]
    fn unknown_field_is_refused_not_ignored() {
        let bad = GOOD.replace("selector: {app: reviews}", "selector: {app: reviews}\n  sessionAffinity: ClientIP");
        let text = parse_documents("f", &bad).unwrap_err().to_string();
        assert!(text.contains("sessionAffinity"), "{text}");
    }

    #[test]
    fn unknown_kinds_and_a_second_mesh_config_are_refused_with_reason() {
        let doc = "apiVersion: weft.dev/v1alpha1\nkind: Gateway\nmetadata: {name: a}\nspec: {}\n";
        let text = parse_documents("f", doc).unwrap_err().to_string();
        assert!(text.contains("unknown kind") && text.contains("AuthorizationPolicy"), "{text}");
        let doc = "apiVersion: weft.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: other}\nspec: {mtls: STRICT}\n";
        let text = parse_documents("f", doc).unwrap_err().to_string();
        assert!(text.contains("metadata.name") && text.contains("named mesh"), "{text}");
        let doc = "apiVersion: weft.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {mtls: STRICT}\n";
        assert!(parse_documents("f", doc).is_ok());
        let doc = "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec: {targetRef: {kind: Service, name: r}, action: ALLOW, rules: [{to: [{paths: [\"/a*b\"]}]}]}\n";
        let text = parse_documents("f", doc).unwrap_err().to_string();
        assert!(text.contains("spec.rules[0]"), "{text}");
    }

    #[test]
    fn tracing_settings_are_checked_field_by_field() {
        let mesh = |tracing: &str| {
            format!("apiVersion: weft.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: mesh}}\nspec: {{tracing: {tracing}}}\n")
        };
        let good = mesh("{endpoint: \"http://127.0.0.1:4317\", samplingRate: 0.5, forceFrom: [\"spiffe://weft.local/ns/default/sa/ops\"]}");
        let resources = parse_documents("f", &good).unwrap();
        let ResourceSpec::MeshConfig(spec) = &resources[0].spec else { panic!("a MeshConfig") };
        let tracing = spec.tracing.as_ref().unwrap();
        assert_eq!((tracing.protocol, tracing.sampling_rate), (crate::spec::OtlpProtocol::Grpc, 0.5));
        let defaulted = parse_documents("f", &mesh("{endpoint: \"http://c:4318\", protocol: http}")).unwrap();
        let ResourceSpec::MeshConfig(spec) = &defaulted[0].spec else { panic!("a MeshConfig") };
        assert_eq!(spec.tracing.as_ref().unwrap().sampling_rate, 0.01, "1% unless said");
        for (tracing, field, words) in [
            ("{endpoint: \"collector:4317\"}", "tracing.endpoint", "http://"),
            ("{endpoint: \"https://c:4317\"}", "tracing.endpoint", "not implemented"),
            ("{endpoint: \"http://c\"}", "tracing.endpoint", "needs a port"),
            ("{endpoint: \"http://c:4317\", samplingRate: 2}", "tracing.samplingRate", "0 to 1"),
            ("{endpoint: \"http://c:4317\", forceFrom: [ops]}", "tracing.forceFrom[0]", ""),
            ("{endpoint: \"http://c:4317\", protocol: zipkin}", "protocol", ""),
        ] {
            let text = parse_documents("f", &mesh(tracing)).unwrap_err().to_string();
            assert!(text.contains(field) && text.contains(words), "{tracing}: {text}");
        }
        let log = |spec: &str| {
            format!("apiVersion: weft.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: mesh}}\nspec: {{accessLog: {spec}}}\n")
        };
        assert!(parse_documents("f", &log("{path: stderr, errorsOnly: true}")).is_ok());
        for (spec, field) in [
            ("{samplingRate: 1.5}", "accessLog.samplingRate"),
            ("{path: \"\"}", "accessLog.path"),
            ("{format: text}", "format"),
        ] {
            let text = parse_documents("f", &log(spec)).unwrap_err().to_string();
            assert!(text.contains(field), "{spec}: {text}");
        }
        let policy = "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec: {targetRef: {kind: Service, name: r}, accessLog: {samplingRate: 7}}\n";
        assert!(parse_documents("f", policy).unwrap_err().to_string().contains("accessLog.samplingRate"));
        let policy = "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec: {targetRef: {kind: Service, name: r}, tracing: {samplingRate: -1}}\n";
        let text = parse_documents("f", policy).unwrap_err().to_string();
        assert!(text.contains("tracing.samplingRate"), "{text}");
    }

    #[test]
    fn wrong_api_version_and_duplicates_are_refused() {
        let doc = GOOD.replace("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1");
        assert!(parse_documents("f", &doc).unwrap_err().to_string().contains("apiVersion"));
        let twice = format!("{GOOD}\n{GOOD}");
        assert!(parse_documents("f", &twice).unwrap_err().to_string().contains("duplicate"));
    }

    #[test]
    fn documents_are_kept_as_written_and_reparse_to_the_same_resources() {
        let parsed = parse_with_documents("mesh.yaml", GOOD).unwrap();
        assert_eq!(parsed[0].document["metadata"]["namespace"], "default");
        assert_eq!(parsed[1].document["spec"]["rules"][0]["timeouts"]["request"], "5s");
        let json: Vec<String> = parsed.iter().map(|p| p.document.to_string()).collect();
        let again = parse_documents("stored", &json.join("\n---\n")).unwrap();
        assert_eq!(again, parsed.into_iter().map(|p| p.resource).collect::<Vec<_>>());
    }

    #[test]
    fn deep_flow_nesting_is_refused_before_parsing_and_quotes_do_not_hide_it() {
        let deep = format!("a: {}", "[".repeat(100_000));
        let errors = parse_documents("deep.yaml", &deep).unwrap_err();
        assert!(errors.to_string().contains("nested more than 64 deep, at line 1"), "{errors}");
        // An apostrophe in a plain word opens no quote that could hide brackets.
        let hidden = format!("a: it's\nb: {}", "[".repeat(1000));
        assert!(parse_documents("hidden.yaml", &hidden).unwrap_err().to_string().contains("at line 2"));
        // Brackets inside quoted scalars and comments are text.
        let quoted = format!("a: '{}'\nb: \"{}\" # {}\n", "[".repeat(100), "{".repeat(100), "[".repeat(100));
        assert_eq!(flow_nesting_beyond(&quoted, MAX_FLOW_NESTING), None);
        assert_eq!(flow_nesting_beyond("a: [[1, 2], {b: [3]}]", 3), None);
        assert_eq!(flow_nesting_beyond("a: [[1, 2], {b: [3]}]", 2), Some(1));
    }

    #[test]
    fn yaml_syntax_error_is_reported() {
        let text = parse_documents("f", "kind: [unclosed").unwrap_err().to_string();
        assert!(text.contains("not valid YAML"), "{text}");
    }
}
