//! `weft control`: opens the store, loads the catalog, and serves the API until SIGTERM
//! or Ctrl-C.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::net::TcpListener;

use crate::{
    api,
    catalog::Catalog,
    store::{embedded::EmbeddedStore, Store, StoreError},
};

/// The default API address.
pub const DEFAULT_API_ADDR: &str = "127.0.0.1:15080";

/// How a control plane is run.
#[derive(Clone, Debug)]
pub struct ControlSettings {
    pub api_addr: SocketAddr,
    /// Where the embedded store keeps its file.
    pub data_dir: PathBuf,
    /// Where to write the bound addresses as JSON, for scripts and tests using port 0.
    pub ports_file: Option<PathBuf>,
}

/// Why the control plane could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {what} address {addr}: {source}; pick a free port with --{flag}, or stop the process using it")]
    Bind { what: &'static str, flag: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("cannot write the ports file {path}: {source}")]
    PortsFile { path: String, source: std::io::Error },
    #[error("the API server failed: {0}")]
    Serve(std::io::Error),
}

/// `$XDG_DATA_HOME/weft`, else `~/.local/share/weft`, else `./weft-data`.
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("weft");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/share/weft"),
        None => PathBuf::from("weft-data"),
    }
}

fn store_path(data_dir: &Path) -> PathBuf {
    data_dir.join("store.redb")
}

/// Runs the control plane until `shutdown` completes.
pub async fn run(
    settings: ControlSettings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ControlError> {
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&store_path(&settings.data_dir))?);
    let catalog = Arc::new(Catalog::load(store).await?);
    let listener = TcpListener::bind(settings.api_addr).await.map_err(|source| ControlError::Bind {
        what: "API",
        flag: "api-addr",
        addr: settings.api_addr,
        source,
    })?;
    let api_addr = listener.local_addr().map_err(ControlError::Serve)?;
    if let Some(path) = &settings.ports_file {
        let text = serde_json::json!({ "api": api_addr.to_string() }).to_string();
        std::fs::write(path, text)
            .map_err(|source| ControlError::PortsFile { path: path.display().to_string(), source })?;
    }
    tracing::info!(%api_addr, store = %catalog.store_description(), "control plane ready");
    axum::serve(listener, api::router(catalog)).with_graceful_shutdown(shutdown).await.map_err(ControlError::Serve)?;
    tracing::info!("control plane stopped");
    Ok(())
}
