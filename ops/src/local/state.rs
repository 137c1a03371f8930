//! The state files of the local provider: a cluster's or a service's
//! instances, read back after a restart, written atomically.

use std::path::Path;

use drover_domain::ports::ProviderError;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::image::io;

/// The file each cluster's and service's directory keeps its instances in.
pub(super) const STATE: &str = "instances.json";

/// The state in `dir`, or the default when there is none yet.
pub(super) fn read<T: DeserializeOwned + Default>(dir: &Path) -> Result<T, ProviderError> {
    match std::fs::read(dir.join(STATE)) {
        Ok(b) => serde_json::from_slice(&b)
            .map_err(|e| ProviderError::fatal("corrupt_state", format!("instance state file is unreadable: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(io("read the instance state")(e)),
    }
}

/// Writes the state in `dir` atomically (a new file renamed over the old),
/// so that a crash at any point leaves the last complete state.
pub(super) fn write<T: Serialize>(dir: &Path, state: &T) -> Result<(), ProviderError> {
    std::fs::create_dir_all(dir).map_err(io("create the state directory"))?;
    let tmp = dir.join(format!("{STATE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(state).expect("state serialises"))
        .map_err(io("write the instance state"))?;
    std::fs::rename(&tmp, dir.join(STATE)).map_err(io("write the instance state"))
}

/// Removes a directory tree; one already gone is fine.
pub(super) fn remove(dir: &Path, what: &'static str) -> Result<(), ProviderError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(what)(e)),
    }
}
