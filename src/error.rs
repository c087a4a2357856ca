//! The one error of every command and of the supervisor: one variant per
//! module error, each with its exit code, gathered here once; `main` (and
//! the supervisor, into `up`'s progress) prints the chain once.

use crate::exit;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error(transparent)]
    Seed(#[from] crate::seed::SeedError),
    #[error(transparent)]
    Key(#[from] crate::provision::keys::KeyError),
    #[error(transparent)]
    Control(#[from] crate::supervisor::control::ControlError),
    #[error(transparent)]
    Supervisor(#[from] crate::supervisor::error::SupervisorError),
    #[error(transparent)]
    Refusal(#[from] crate::runstate::Refusal),
    #[error(transparent)]
    Netns(#[from] crate::net::netns::NetnsError),
    #[error(transparent)]
    Tap(#[from] crate::net::tap::TapError),
    #[error(transparent)]
    Setup(#[from] crate::net::setup::SetupError),
    #[error(transparent)]
    Dataplane(#[from] crate::net::dataplane::DataplaneError),
    #[error(transparent)]
    Process(#[from] crate::qemu::process::ProcessError),
    #[error(transparent)]
    Qmp(#[from] crate::qemu::qmp::QmpError),
    #[error(transparent)]
    Accel(#[from] crate::qemu::accel::AccelError),
    #[error(transparent)]
    Wireguard(#[from] crate::wireguard::WgError),
    #[error(transparent)]
    Firmware(#[from] crate::firmware::FirmwareError),
    #[error(transparent)]
    Hook(#[from] crate::provision::hooks::HookError),
    #[error(transparent)]
    Ansible(#[from] crate::provision::ansible::AnsibleError),
    #[error(transparent)]
    Share(#[from] crate::share::ShareError),
    #[error(transparent)]
    Userns(#[from] crate::userns::UsernsError),
    /// A failure that carries its own exit code.
    #[error("{message}")]
    Other { message: String, code: u8 },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl From<crate::provision::as_user::AsUserError> for Error {
    fn from(e: crate::provision::as_user::AsUserError) -> Self {
        Error::Key(e.into())
    }
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(e) => e.exit_code(),
            Error::State(e) => e.exit_code(),
            Error::Image(e) => e.exit_code(),
            Error::Seed(e) => e.exit_code(),
            Error::Key(e) => e.exit_code(),
            Error::Control(e) => e.exit_code(),
            Error::Supervisor(e) => e.exit_code(),
            Error::Tap(crate::net::tap::TapError::Open(_)) => exit::UNAVAILABLE,
            Error::Netns(_) | Error::Tap(_) | Error::Qmp(_) => exit::SOFTWARE,
            Error::Setup(e) => e.exit_code(),
            Error::Refusal(e) => e.exit_code(),
            Error::Dataplane(e) => e.exit_code(),
            Error::Process(e) => e.exit_code(),
            Error::Accel(e) => e.exit_code(),
            Error::Wireguard(e) => e.exit_code(),
            Error::Firmware(e) => e.exit_code(),
            Error::Hook(e) => e.exit_code(),
            Error::Ansible(e) => e.exit_code(),
            Error::Share(e) => e.exit_code(),
            Error::Userns(e) => e.exit_code(),
            Error::Other { code, .. } => *code,
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied => {
                exit::NOPERM
            }
            Error::Io { .. } => exit::SOFTWARE,
        }
    }

    pub fn other(code: u8, message: impl Into<String>) -> Error {
        Error::Other {
            message: message.into(),
            code,
        }
    }

    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}
