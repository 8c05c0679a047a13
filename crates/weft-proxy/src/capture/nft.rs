//! Installs and removes capture's table by running `nft` (the nftables command line, as
//! an operator would), in the network namespace of the calling thread; where `nft` is
//! not installed, through `iptables-nft` instead ([`super::iptables`]).
//!
//! Each change is one `nft -f -` transaction: it applies whole or not at all, so a
//! failed install leaves the previous table (or none) in place.

use std::{
    io::Write,
    process::{Command, Stdio},
};

use super::rules::{removal_script, CaptureRules, TABLE};

/// Why capture's table could not be changed or read.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "cannot run nft ({0}), nor iptables-nft-restore: transparent capture needs nftables (Debian: apt-get \
         install nftables)"
    )]
    NftMissing(std::io::Error),
    #[error(
        "nft refused to change the capture table: {0}; capture needs root or CAP_NET_ADMIN in the workload's \
         network namespace"
    )]
    Refused(String),
    #[error("cannot route the Services' virtual IPs ({0}): capture needs iproute2 and CAP_NET_ADMIN")]
    Route(String),
}

/// The command line capture's rules go through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `nft`: one table of weft's own, with the untracked chains.
    Nft,
    /// `iptables-nft`, where `nft` is missing: chains of weft's own in `nat`.
    IptablesNft,
}

impl Backend {
    /// `nft` where it can be run, else `iptables-nft`.
    pub fn detect() -> Result<Backend, CaptureError> {
        match Command::new("nft").arg("--version").stdin(Stdio::null()).output() {
            Ok(_) => Ok(Backend::Nft),
            Err(_) if super::iptables::available() => Ok(Backend::IptablesNft),
            Err(error) => Err(CaptureError::NftMissing(error)),
        }
    }
}

/// Replaces capture's rules with `rules`, through `nft` or, where it is missing,
/// `iptables-nft`; says which.
pub fn install(rules: &CaptureRules) -> Result<Backend, CaptureError> {
    let backend = Backend::detect()?;
    install_with(backend, rules)?;
    Ok(backend)
}

/// Replaces capture's rules with `rules` through `backend`.
pub fn install_with(backend: Backend, rules: &CaptureRules) -> Result<(), CaptureError> {
    match backend {
        Backend::Nft => install_table(rules),
        Backend::IptablesNft => {
            tracing::warn!(
                "nft is not installed: capture's rules go through iptables-nft, which cannot leave the mesh's own \
                 flows out of connection tracking (install nftables to spare that CPU)"
            );
            super::iptables::install(rules)
        }
    }
}

/// Removes capture's rules; says whether there were any.
pub fn remove() -> Result<bool, CaptureError> {
    remove_with(Backend::detect()?)
}

/// Removes capture's rules made through `backend`; says whether there were any.
pub fn remove_with(backend: Backend) -> Result<bool, CaptureError> {
    match backend {
        Backend::Nft => remove_table(),
        Backend::IptablesNft => super::iptables::remove(),
    }
}

/// Whether capture's rules are there.
pub fn is_installed() -> Result<bool, CaptureError> {
    is_installed_with(Backend::detect()?)
}

/// Whether capture's rules made through `backend` are there.
pub fn is_installed_with(backend: Backend) -> Result<bool, CaptureError> {
    match backend {
        Backend::Nft => is_table_installed(),
        Backend::IptablesNft => super::iptables::is_installed(),
    }
}

/// Replaces capture's table with `rules`. A kernel without nftables' `socket` expression
/// refuses the chains that keep connection tracking off the proxy's own flows: capture
/// then works without them, at the cost of tracking every flow, and says so.
fn install_table(rules: &CaptureRules) -> Result<(), CaptureError> {
    match apply(&rules.script()) {
        Err(CaptureError::Refused(reason)) if rules.untrack => {
            apply(&CaptureRules { untrack: false, ..rules.clone() }.script())?;
            tracing::warn!(
                %reason,
                "nft refused capture's untracked chains (a kernel without nft_socket?): every flow of this network \
                 namespace is connection-tracked, which costs CPU on each packet"
            );
            Ok(())
        }
        applied => applied,
    }
}

/// Removes capture's table; says whether there was one.
fn remove_table() -> Result<bool, CaptureError> {
    let there = is_table_installed()?;
    if there {
        apply(&removal_script())?;
    }
    Ok(there)
}

/// Whether capture's table is there.
fn is_table_installed() -> Result<bool, CaptureError> {
    let listed =
        Command::new("nft").args(["list", "tables"]).stdin(Stdio::null()).output().map_err(CaptureError::NftMissing)?;
    if !listed.status.success() {
        return Err(CaptureError::Refused(String::from_utf8_lossy(&listed.stderr).trim().to_string()));
    }
    Ok(String::from_utf8_lossy(&listed.stdout).lines().any(|line| line.trim() == format!("table {TABLE}")))
}

/// Runs `script` as one nft transaction.
fn apply(script: &str) -> Result<(), CaptureError> {
    let mut nft = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(CaptureError::NftMissing)?;
    if let Some(mut stdin) = nft.stdin.take() {
        stdin.write_all(script.as_bytes()).map_err(|error| CaptureError::Refused(error.to_string()))?;
    }
    let done = nft.wait_with_output().map_err(|error| CaptureError::Refused(error.to_string()))?;
    if done.status.success() {
        tracing::debug!(table = TABLE, "capture table changed");
        Ok(())
    } else {
        Err(CaptureError::Refused(String::from_utf8_lossy(&done.stderr).trim().to_string()))
    }
}
