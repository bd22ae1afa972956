//! systemd's notify protocol (`Type=notify` units): `READY=1` once the API serves,
//! `STOPPING=1` on SIGTERM, `WATCHDOG=1` every half `WatchdogSec` from the runtime (a wedged
//! runtime stops pinging and systemd restarts it). Without `NOTIFY_SOCKET`, nothing.

use sd_notify::NotifyState;

pub fn ready(tasks: &sluice_control_plane::task::Tasks) {
    let _ = sd_notify::notify(false, &[NotifyState::Ready]);
    if let Some(usec) = watchdog_usec() {
        let every = std::time::Duration::from_micros(usec / 2);
        tasks.spawn("systemd watchdog", async move {
            loop {
                let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
                tokio::time::sleep(every).await;
            }
        });
    }
}

/// `WATCHDOG_USEC`, when the watchdog is this process's (`WATCHDOG_PID` unset, as
/// libsystemd reads it, or ours).
fn watchdog_usec() -> Option<u64> {
    let usec = std::env::var("WATCHDOG_USEC").ok()?.parse::<u64>().ok().filter(|u| *u > 0)?;
    match std::env::var("WATCHDOG_PID") {
        Ok(pid) if pid.parse::<u32>().ok() != Some(std::process::id()) => None,
        _ => Some(usec),
    }
}

pub fn stopping() {
    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
}
