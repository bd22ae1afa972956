//! The worker's local snapshot file: written atomically (temp file, fsync, rename, fsync of
//! the directory), read at boot. A file that cannot be used is reported in one log line and
//! set aside; the worker then boots from NATS instead.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sluice_events::state::snapshot::{self, SnapshotInfo};
use sluice_events::{AuthState, Keyring};

pub const FILE: &str = "snapshot.bin";

pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// Writes `bytes` as the snapshot in `dir`, atomically.
pub fn write(dir: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{FILE}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path(dir))?;
    std::fs::File::open(dir)?.sync_all()
}

/// The local snapshot, if there is a usable one.
pub fn read(dir: &Path, keyring: Option<Arc<Keyring>>) -> Option<(AuthState, SnapshotInfo)> {
    let p = path(dir);
    let bytes = match std::fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::error!(path = %p.display(), error = %e, "local snapshot unreadable; booting without it");
            return None;
        }
    };
    match snapshot::decode(&bytes, keyring) {
        Ok(ok) => Some(ok),
        Err(e) => {
            // Keep the bad file for a post-mortem, out of the way of the next boot.
            let aside = dir.join(format!("{FILE}.rejected"));
            let _ = std::fs::rename(&p, &aside);
            tracing::error!(
                path = %p.display(), moved_to = %aside.display(), error = %e,
                "local snapshot rejected; booting from NATS instead"
            );
            None
        }
    }
}
