//! The scaling hook: an operator-supplied shell command that makes a scaling decision happen
//! (start or stop containers, call an orchestrator). The NLB records the decision either way and
//! tells modules through heartbeats; the hook's outcome is reported to the caller.

use std::{process::Stdio, time::Duration};

use marchproxy::names::ModuleKind;
use tokio::process::Command;

/// One decision for the hook.
pub struct Decision<'a> {
    pub kind: ModuleKind,
    pub action: &'a str,
    pub current: u32,
    pub desired: u32,
}

/// Runs `command` with `sh -c` and the decision in its environment. `Ok` carries the first line
/// of its output; `Err` says how it failed, with the end of its error output.
pub async fn run_hook(
    command: &str,
    timeout: Duration,
    decision: &Decision<'_>,
) -> Result<String, String> {
    let child = Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("MARCHPROXY_MODULE_TYPE", decision.kind.name())
        .env("MARCHPROXY_SCALING_ACTION", decision.action)
        .env("MARCHPROXY_CURRENT_INSTANCES", decision.current.to_string())
        .env("MARCHPROXY_DESIRED_INSTANCES", decision.desired.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start scaling hook `{command}`: {e}"))?;
    let output = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| {
            format!(
                "scaling hook `{command}` did not finish within {}s and was killed",
                timeout.as_secs()
            )
        })?
        .map_err(|e| format!("scaling hook `{command}` failed: {e}"))?;
    if output.status.success() {
        let stdout = String::from_utf8_lossy(&output.stdout);
        Ok(stdout.lines().next().unwrap_or("").trim().to_owned())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: String = stderr
            .trim()
            .chars()
            .rev()
            .take(300)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        Err(format!(
            "scaling hook `{command}` exited with {}: {tail}",
            output.status
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision() -> Decision<'static> {
        Decision {
            kind: ModuleKind::Alb,
            action: "scale-up",
            current: 1,
            desired: 3,
        }
    }

    #[tokio::test]
    async fn passes_the_decision_and_reports_failures() {
        let ok = run_hook(
            "echo $MARCHPROXY_MODULE_TYPE $MARCHPROXY_SCALING_ACTION $MARCHPROXY_CURRENT_INSTANCES $MARCHPROXY_DESIRED_INSTANCES",
            Duration::from_secs(5),
            &decision(),
        )
        .await;
        assert_eq!(ok.unwrap(), "alb scale-up 1 3");
        let failed = run_hook(
            "echo no capacity >&2; exit 3",
            Duration::from_secs(5),
            &decision(),
        )
        .await;
        assert!(failed.unwrap_err().contains("no capacity"));
        let slow = run_hook("sleep 5", Duration::from_millis(100), &decision()).await;
        assert!(slow.unwrap_err().contains("killed"));
    }
}
