//! QMP over a connected unix socket, with the `qapi` crate. Every command
//! has a deadline.

use std::time::Duration;

use qapi::futures::{QapiEvents, QapiService, QmpStreamTokio};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::UnixStream;

/// Default deadline for a QMP command.
pub const DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP: {0} did not answer within {1:?}")]
    Timeout(&'static str, Duration),
    #[error("QMP: connection to QEMU failed")]
    Io(#[from] std::io::Error),
    #[error("QMP: {0} failed: {1}")]
    Command(&'static str, String),
}

pub type Service = QapiService<QmpStreamTokio<WriteHalf<UnixStream>>>;
pub type Events = QapiEvents<QmpStreamTokio<ReadHalf<UnixStream>>>;

/// A QMP session: commands go through [`Qmp::run`]; events arrive on the
/// [`Events`] stream returned by [`Qmp::open`], which must be polled for
/// command replies to be delivered.
pub struct Qmp {
    service: Service,
}

impl Qmp {
    /// Read the greeting and negotiate capabilities.
    pub async fn open(stream: UnixStream) -> Result<(Qmp, Events), QmpError> {
        let fut = async {
            let (r, w) = tokio::io::split(stream);
            let nego = QmpStreamTokio::open_split(r, w).await?;
            // Negotiation needs the event side polled for the reply.
            nego.negotiate().await
        };
        let stream = tokio::time::timeout(DEADLINE, fut)
            .await
            .map_err(|_| QmpError::Timeout("qmp_capabilities", DEADLINE))??;
        let (service, events) = stream.into_parts();
        Ok((Qmp { service }, events))
    }

    /// Run a command with the default deadline.
    pub async fn run<C>(&self, command: C) -> Result<C::Ok, QmpError>
    where
        C: qapi::Command + qapi::qmp::QmpCommand + 'static,
    {
        self.run_within(command, DEADLINE).await
    }

    pub async fn run_within<C>(&self, command: C, deadline: Duration) -> Result<C::Ok, QmpError>
    where
        C: qapi::Command + qapi::qmp::QmpCommand + 'static,
    {
        let name = C::NAME;
        match tokio::time::timeout(deadline, self.service.execute(command)).await {
            Err(_) => Err(QmpError::Timeout(name, deadline)),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(qapi::ExecuteError::Qapi(e))) => Err(QmpError::Command(name, e.desc)),
            Ok(Err(qapi::ExecuteError::Io(e))) => Err(QmpError::Io(e)),
        }
    }
}
