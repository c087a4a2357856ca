use super::{Config, ConfigError};
use std::path::Path;

pub(super) fn load(dir: &Path) -> Result<Config, ConfigError> {
    Err(ConfigError::NotFound {
        dir: dir.to_path_buf(),
    })
}
