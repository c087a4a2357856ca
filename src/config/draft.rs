//! What both readers of a Migrantfile produce and what checking it needs:
//! a [`Draft`] (every value with its line and field, nothing validated),
//! the [`Ctx`] of the file being read, and the [`Span`] of an assignment
//! of the original's format. `parse` turns a draft into a `Config`;
//! `legacy` and `toml_file` fill drafts; `convert` rewrites spans. All of
//! them sit above this module, none below it.

use super::{Accel, Autoconnect, ConfigError, Egress, FILE_NAME, Firmware, Format};
use std::fmt::Display;
use std::path::{Component, Path, PathBuf};

/// A value read from the file, with where it was read: the line (1-based,
/// 0 when unknown) and the field as the file spells it.
#[derive(Debug, Clone)]
pub(super) struct At<T> {
    pub value: T,
    pub line: usize,
    pub field: String,
}

impl<T> At<T> {
    pub fn new(value: T, line: usize, field: impl Into<String>) -> Self {
        At {
            value,
            line,
            field: field.into(),
        }
    }
}

/// One shared folder as read, before path resolution and checks.
#[derive(Debug, Clone)]
pub(super) struct DraftShare {
    /// Where the share is declared (its first line; `share[0]`,
    /// `SHARED_FOLDERS[0]`), for errors about the share as a whole.
    pub at: At<()>,
    pub host: At<String>,
    pub tag: Option<At<String>>,
    pub guest: Option<At<String>>,
    pub size: Option<At<u64>>,
    pub isolation: bool,
    /// How to name the isolation setting in messages.
    pub isolation_field: String,
}

/// One `[secrets.NAME]` table as read.
#[derive(Debug, Clone)]
pub(super) struct DraftSecret {
    pub name: At<String>,
    pub from: At<String>,
    pub hosts: Vec<At<String>>,
}

/// What a reader extracted, typed but not yet validated. `None` means
/// "not set, use the default".
#[derive(Debug, Clone)]
pub(super) struct Draft {
    pub format: Format,
    pub name: Option<At<String>>,
    pub image: Option<At<String>>,
    pub image_checksum: Option<At<String>>,
    pub secure_boot: Option<At<bool>>,
    pub cpus: Option<At<i64>>,
    pub memory: Option<At<u64>>,
    pub disk: Option<At<u64>>,
    pub firmware: Firmware,
    pub accel: Accel,
    pub halt_timeout: Option<At<i64>>,
    pub shares: Vec<DraftShare>,
    /// Size of shares that give none (legacy `SHARED_FOLDER_SIZE_GB`).
    pub share_default_size: Option<At<u64>>,
    pub egress: Egress,
    pub subnet: Option<At<String>>,
    pub rules: Vec<At<String>>,
    pub allow_domains: Vec<At<String>>,
    pub wireguard: Option<At<String>>,
    pub wireguard_timeout: Option<At<i64>>,
    /// `[network] dns = "host"`.
    pub dns_host: bool,
    pub ipv6: Option<At<bool>>,
    pub legacy_networks: Vec<String>,
    pub ssh_user: Option<At<String>>,
    pub ssh_key: Option<At<String>>,
    pub autoconnect: Autoconnect,
    pub tunnel_ports: Vec<At<i64>>,
    pub wait_cloud_init: bool,
    pub secrets: Vec<DraftSecret>,
    pub warnings: Vec<String>,
}

impl Draft {
    pub fn new(format: Format) -> Self {
        Draft {
            format,
            name: None,
            image: None,
            image_checksum: None,
            secure_boot: None,
            cpus: None,
            memory: None,
            disk: None,
            firmware: Firmware::Bios,
            accel: Accel::Auto,
            halt_timeout: None,
            shares: Vec::new(),
            share_default_size: None,
            egress: Egress::Direct,
            subnet: None,
            rules: Vec::new(),
            allow_domains: Vec::new(),
            wireguard: None,
            wireguard_timeout: None,
            dns_host: false,
            ipv6: None,
            legacy_networks: Vec::new(),
            ssh_user: None,
            ssh_key: None,
            autoconnect: Autoconnect::None,
            tunnel_ports: Vec::new(),
            wait_cloud_init: true,
            secrets: Vec::new(),
            warnings: Vec::new(),
        }
    }

    /// The name of a setting in this draft's format.
    pub(super) fn key(&self, toml: &'static str, legacy: &'static str) -> &'static str {
        match self.format {
            Format::Toml => toml,
            Format::Legacy => legacy,
        }
    }
}

/// Where the file is and how `~` expands: everything a reader needs to
/// report errors and resolve paths.
#[derive(Debug, Clone)]
pub(super) struct Ctx {
    /// The Migrantfile (absolute).
    pub file: PathBuf,
    /// Its folder (absolute).
    pub dir: PathBuf,
    /// Home of the invoking user, for `~/`.
    pub home: Option<PathBuf>,
}

impl Ctx {
    pub fn new(dir: &Path, home: Option<PathBuf>) -> Self {
        let dir = std::path::absolute(dir)
            .map(|d| normalize(&d))
            .unwrap_or_else(|_| dir.to_path_buf());
        Ctx {
            file: dir.join(FILE_NAME),
            dir,
            home,
        }
    }

    /// An [`ConfigError::Invalid`] about this file.
    pub fn err(&self, line: usize, field: impl Display, message: impl Display) -> ConfigError {
        ConfigError::invalid(&self.file, line, field, message)
    }

    /// An error at a value's place.
    pub fn err_at<T>(&self, at: &At<T>, message: impl Display) -> ConfigError {
        self.err(at.line, &at.field, message)
    }

    /// Resolve a path from the file: `~` and `~/...` against the invoking
    /// user's home, relative paths against the project folder; `.` and
    /// `..` are folded lexically (symlinks are left alone).
    pub fn resolve(&self, at: &At<String>) -> Result<PathBuf, ConfigError> {
        let text = at.value.as_str();
        if text.is_empty() {
            return Err(self.err_at(at, "the path is empty"));
        }
        if text.contains('\0') {
            return Err(self.err_at(at, "the path contains a NUL character"));
        }
        let path = if text == "~" || text.starts_with("~/") {
            let Some(home) = &self.home else {
                return Err(self.err_at(
                    at,
                    format!("cannot expand {text:?}: the invoking user's home is unknown (HOME is not set)"),
                ));
            };
            home.join(text.trim_start_matches('~').trim_start_matches('/'))
        } else if text.starts_with('~') {
            return Err(self.err_at(
                at,
                format!("{text:?}: only \"~/\" (your own home) is supported, not \"~user\""),
            ));
        } else {
            self.dir.join(text)
        };
        Ok(normalize(&path))
    }
}

/// Fold `.` and `..` components without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push(c);
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// One assignment of the original file: its variable, first and last
/// line.
pub(super) struct Span {
    pub name: String,
    pub first: usize,
    pub last: usize,
}
