//! Loading the configuration file, and reloading it on SIGHUP or when it changes.
//!
//! A file is parsed, validated and compiled completely before anything is swapped; a bad
//! new file is refused with a logged error (and shown on `/config`) while the previous
//! configuration keeps serving.

use std::{
    hash::{Hash, Hasher},
    path::Path,
    sync::Arc,
};

use weft_model::{compile, parse::ConfigErrors, parse_documents, Snapshot};

use crate::{metrics::ReloadLabels, state::SharedState};

/// Why a configuration file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read config file {path}: {source}; check the path given to --config")]
    Read { path: String, source: std::io::Error },
    #[error("invalid configuration, nothing was applied:\n{0}")]
    Invalid(#[from] ConfigErrors),
}

/// Reads, validates and compiles `path`; returns the snapshot, its version and the text.
pub fn load(path: &Path, namespace: &str) -> Result<(Snapshot, String, String), LoadError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| LoadError::Read { path: path.display().to_string(), source })?;
    let (snapshot, version) = compile_text(path, &text, namespace)?;
    Ok((snapshot, version, text))
}

fn compile_text(path: &Path, text: &str, namespace: &str) -> Result<(Snapshot, String), ConfigErrors> {
    let resources = parse_documents(&path.display().to_string(), text)?;
    Ok((compile(&resources, namespace), version_of(text)))
}

/// A short content hash, so operators can tell which file version a proxy serves.
pub fn version_of(text: &str) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

/// Watches the config file until the process ends: reloads on SIGHUP at once, and when
/// the content changes (checked every `reload_interval`).
pub async fn watch(state: Arc<SharedState>, mut current_text: String) {
    let Some(path) = state.settings.config_path.clone() else { return };
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGHUP; the config file is still polled for changes");
            None
        }
    };
    let mut interval = tokio::time::interval(state.settings.reload_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forced = tokio::select! {
            _ = interval.tick() => false,
            Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
        };
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(text) => text,
            Err(error) => {
                if forced {
                    tracing::error!(path = %path.display(), %error, "cannot read config file; keeping the current configuration");
                }
                continue;
            }
        };
        if text == current_text && !forced {
            continue;
        }
        match compile_text(&path, &text, &state.settings.namespace) {
            Ok((snapshot, version)) => {
                tracing::info!(path = %path.display(), %version, services = snapshot.services.len(), "configuration reloaded");
                state.install(snapshot, version);
                *state.last_reload_error.lock().expect("lock poisoned") = None;
                state.metrics.config_reloads.get_or_create(&ReloadLabels { result: "applied" }).inc();
            }
            Err(errors) => {
                tracing::error!(path = %path.display(), "configuration refused, the previous one keeps serving:\n{errors}");
                *state.last_reload_error.lock().expect("lock poisoned") = Some(errors.to_string());
                state.metrics.config_reloads.get_or_create(&ReloadLabels { result: "refused" }).inc();
            }
        }
        current_text = text;
    }
}
