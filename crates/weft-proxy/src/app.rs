//! The application a proxy runs itself (`weft proxy ... -- ./my-app`): started only once
//! the proxy is ready, stopped first on shutdown, and whose exit code becomes the proxy's.
//!
//! Order matters at both ends. At start, nothing the application sends may meet a proxy
//! that is not serving yet. At stop, the application may still be finishing requests
//! that call other services, so the outbound listener keeps serving until it has exited;
//! only then does the proxy drain and exit.

use std::{process::ExitStatus, time::Duration};

use nix::{sys::signal, unistd::Pid};
use tokio::process::{Child, Command};

use crate::proxy::BoundPorts;

/// A running application.
pub struct App {
    child: Child,
    program: String,
}

/// Why the application could not be started.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the application {program:?}: {source}; check the command after `--`")]
pub struct SpawnError {
    program: String,
    source: std::io::Error,
}

impl App {
    /// Starts `command` (program and arguments). It inherits the proxy's environment plus
    /// `WEFT_OUTBOUND` (the outbound listener) and `WEFT_ADMIN`, and `HTTP_PROXY` pointing at
    /// the outbound listener unless the environment already sets one.
    ///
    /// Under capture (`captured`) no `HTTP_PROXY` is set: the application's connections
    /// reach the proxy as they are. `user` runs it as another uid and gid (`--app-user`).
    pub fn spawn(
        command: &[String],
        ports: &BoundPorts,
        captured: bool,
        user: Option<(u32, u32)>,
    ) -> Result<App, SpawnError> {
        let program = command[0].clone();
        let mut process = Command::new(&program);
        process.args(&command[1..]);
        process.env("WEFT_OUTBOUND", ports.outbound.to_string()).env("WEFT_ADMIN", ports.admin.to_string());
        if let Some((uid, gid)) = user {
            process.uid(uid).gid(gid);
        }
        if !captured && std::env::var_os("HTTP_PROXY").is_none() && std::env::var_os("http_proxy").is_none() {
            let proxy = format!("http://{}", ports.outbound);
            process.env("HTTP_PROXY", &proxy).env("http_proxy", &proxy);
        }
        // The application stays in the proxy's process group so that a terminal's Ctrl-C
        // reaches both; the proxy still sequences the stop itself.
        let child = process.spawn().map_err(|source| SpawnError { program: program.clone(), source })?;
        tracing::info!(%program, pid = child.id(), "application started");
        Ok(App { child, program })
    }

    /// Waits for the application to exit on its own.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// Asks the application to stop (SIGTERM), and kills it if it has not exited within
    /// `grace`.
    pub async fn stop(&mut self, grace: Duration) -> std::io::Result<ExitStatus> {
        if let Some(pid) = self.child.id() {
            tracing::info!(program = %self.program, pid, "stopping the application (SIGTERM)");
            let _ = signal::kill(Pid::from_raw(pid as i32), signal::Signal::SIGTERM);
        }
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                tracing::warn!(program = %self.program, ?grace, "the application did not exit in time; killing it");
                self.child.kill().await?;
                self.child.wait().await
            }
        }
    }
}

/// The exit code a shell would report for `status`: the code, or 128 + the signal.
pub fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}
