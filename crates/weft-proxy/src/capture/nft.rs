//! Installs and removes capture's table by running `nft` (the nftables command line, as
//! an operator would), in the network namespace of the calling thread.
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
    #[error("cannot run nft ({0}): transparent capture needs nftables (Debian: apt-get install nftables)")]
    NftMissing(std::io::Error),
    #[error(
        "nft refused to change the capture table: {0}; capture needs root or CAP_NET_ADMIN in the workload's \
         network namespace"
    )]
    Refused(String),
    #[error("cannot route the Services' virtual IPs ({0}): capture needs iproute2 and CAP_NET_ADMIN")]
    Route(String),
}

/// Replaces capture's table with `rules`. A kernel without nftables' `socket` expression
/// refuses the chains that keep connection tracking off the proxy's own flows: capture
/// then works without them, at the cost of tracking every flow, and says so.
pub fn install(rules: &CaptureRules) -> Result<(), CaptureError> {
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
pub fn remove() -> Result<bool, CaptureError> {
    let there = is_installed()?;
    if there {
        apply(&removal_script())?;
    }
    Ok(there)
}

/// Whether capture's table is there.
pub fn is_installed() -> Result<bool, CaptureError> {
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
