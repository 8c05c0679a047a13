//! Named contexts, like kubeconfig's: which control plane the CLI talks to, with which
//! operator token, kept in one file so that no command needs exports.
//!
//! The file is `$WEFT_CONFIG`, else `$XDG_CONFIG_HOME/weft/config.yaml`, else
//! `~/.config/weft/config.yaml`; written with mode 0600 (it names token files, and a
//! token's path is worth keeping private). `weft demo` makes a `demo` context current
//! while it runs and restores the previous one when it stops.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};

/// One named context.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Context {
    pub name: String,
    /// The API's URL, `https://HOST:PORT`.
    pub server: String,
    /// The file holding the operator token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// A CA bundle (PEM) to verify the server with, for an API certificate from the
    /// operator's own PKI; without it the token's root hash is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

/// The contexts file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Contexts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    #[serde(default)]
    pub contexts: Vec<Context>,
}

/// Where the contexts file is.
pub fn path() -> PathBuf {
    if let Some(path) = std::env::var_os("WEFT_CONFIG").filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").filter(|d| !d.is_empty()).map(|home| PathBuf::from(home).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("weft").join("config.yaml")
}

impl Contexts {
    /// Reads the file at `path`; a missing file is no contexts.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_norway::from_str(&text)
                .with_context(|| format!("{} is not a weft contexts file; fix or remove it", path.display())),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Contexts::default()),
            Err(error) => Err(error).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Writes the file (mode 0600), replacing it whole.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let text = serde_norway::to_string(self)?;
        let temporary = path.with_extension("yaml.tmp");
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&temporary).with_context(|| format!("cannot write {}", temporary.display()))?;
        std::io::Write::write_all(&mut file, text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temporary, path).with_context(|| format!("cannot write {}", path.display()))
    }

    /// The current context, if one is set and exists.
    pub fn current(&self) -> Option<&Context> {
        let name = self.current.as_deref()?;
        self.contexts.iter().find(|c| c.name == name)
    }

    /// Adds `context` or replaces the one of its name.
    pub fn set(&mut self, context: Context) {
        match self.contexts.iter_mut().find(|c| c.name == context.name) {
            Some(existing) => *existing = context,
            None => self.contexts.push(context),
        }
    }

    /// Makes `name` current; it must exist.
    pub fn use_context(&mut self, name: &str) -> anyhow::Result<()> {
        if !self.contexts.iter().any(|c| c.name == name) {
            let known: Vec<&str> = self.contexts.iter().map(|c| c.name.as_str()).collect();
            bail!("no context named {name:?} (known: {}); make it with weft context set", known.join(", "));
        }
        self.current = Some(name.to_string());
        Ok(())
    }

    /// Removes `name`; it is current no more.
    pub fn delete(&mut self, name: &str) -> anyhow::Result<()> {
        let before = self.contexts.len();
        self.contexts.retain(|c| c.name != name);
        if self.contexts.len() == before {
            bail!("no context named {name:?}");
        }
        if self.current.as_deref() == Some(name) {
            self.current = None;
        }
        Ok(())
    }
}

/// `weft context list`.
pub fn list() -> anyhow::Result<()> {
    let contexts = Contexts::load(&path())?;
    if contexts.contexts.is_empty() {
        eprintln!(
            "no contexts in {}; make one with weft context set NAME --server URL --token-file FILE",
            path().display()
        );
        return Ok(());
    }
    let mut rows = vec![["CURRENT", "NAME", "SERVER", "TOKEN FILE", "CA FILE"].map(String::from).to_vec()];
    for context in &contexts.contexts {
        let file = |p: &Option<PathBuf>| p.as_ref().map_or("-".to_string(), |p| p.display().to_string());
        rows.push(vec![
            if contexts.current.as_deref() == Some(&context.name) { "*".into() } else { String::new() },
            context.name.clone(),
            context.server.clone(),
            file(&context.token_file),
            file(&context.ca_file),
        ]);
    }
    crate::cli::print_rows(&rows);
    Ok(())
}

/// `weft context set NAME ...`: creates or updates a context; the first one becomes
/// current.
pub fn set(context: Context, make_current: bool) -> anyhow::Result<()> {
    if !context.server.starts_with("https://") && !context.server.starts_with("http://") {
        bail!("--server must be a URL such as https://10.0.0.1:15080, got {:?}", context.server);
    }
    let path = path();
    let mut contexts = Contexts::load(&path)?;
    let name = context.name.clone();
    contexts.set(context);
    if make_current || contexts.current.is_none() {
        contexts.current = Some(name.clone());
    }
    contexts.save(&path)?;
    eprintln!(
        "context {name} set in {}{}",
        path.display(),
        if contexts.current.as_deref() == Some(&name) { " (current)" } else { "" }
    );
    Ok(())
}

/// `weft context use NAME`.
pub fn use_context(name: &str) -> anyhow::Result<()> {
    let path = path();
    let mut contexts = Contexts::load(&path)?;
    contexts.use_context(name)?;
    contexts.save(&path)?;
    eprintln!("now using context {name}");
    Ok(())
}

/// `weft context delete NAME`.
pub fn delete(name: &str) -> anyhow::Result<()> {
    let path = path();
    let mut contexts = Contexts::load(&path)?;
    contexts.delete(name)?;
    contexts.save(&path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_are_set_used_and_written_privately() {
        let dir = std::env::temp_dir().join(format!("weft-contexts-{}", std::process::id()));
        let path = dir.join("config.yaml");
        let mut contexts = Contexts::load(&path).unwrap();
        assert_eq!(contexts, Contexts::default(), "no file: no contexts");
        contexts.set(Context { name: "prod".into(), server: "https://10.0.0.1:15080".into(), ..Default::default() });
        contexts.set(Context { name: "demo".into(), server: "https://127.0.0.1:15080".into(), ..Default::default() });
        contexts.use_context("demo").unwrap();
        assert!(contexts.use_context("nope").is_err());
        contexts.save(&path).unwrap();
        let again = Contexts::load(&path).unwrap();
        assert_eq!(again.current().unwrap().server, "https://127.0.0.1:15080");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let mut again = again;
        again.delete("demo").unwrap();
        assert!(again.current().is_none());
        let _ = std::fs::remove_dir_all(dir);
    }
}
