//! The service's errors, each answered as one gRPC status.

use std::path::PathBuf;

use tonic::Status;

use crate::store::StoreError;

/// Service errors, each mapped to one gRPC status in [`ServiceError::status`].
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The client stopped sending (or taking) messages for longer than the idle limit.
    #[error("{0}")]
    Stalled(String),
    /// A stored model no longer matches its sha256 (or no longer reads).
    #[error("{0}")]
    DataLoss(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

impl ServiceError {
    fn status(&self) -> Status {
        let msg = self.to_string();
        match self {
            ServiceError::Unauthenticated(_) => Status::unauthenticated(msg),
            ServiceError::PermissionDenied(_) => Status::permission_denied(msg),
            ServiceError::NotFound(_) => Status::not_found(msg),
            ServiceError::InvalidArgument(_) => Status::invalid_argument(msg),
            ServiceError::FailedPrecondition(_) => Status::failed_precondition(msg),
            ServiceError::AlreadyExists(_) => Status::already_exists(msg),
            ServiceError::Stalled(_) => Status::deadline_exceeded(msg),
            ServiceError::DataLoss(_) => Status::data_loss(msg),
            // A full disk is named, since only the operator can mend it and the caller
            // should wait rather than retry at once. The database stops for good after a
            // failed write (sled keeps the error until it is reopened), so then the operator
            // must also restart the coordinator.
            ServiceError::Store(_) if self.disk_full() => {
                tracing::error!(
                    error = %msg,
                    "the database stopped: its disk is full. Free space in the data_dir and \
                     restart the coordinator; every acknowledged write is on disk"
                );
                Status::resource_exhausted(
                    "the coordinator's disk is full and its database stopped; its operator must \
                     free space and restart it. Nothing acknowledged was lost; try again later",
                )
            }
            _ if self.disk_full() => {
                tracing::error!(error = %msg, "storage full: free space in the data_dir");
                Status::resource_exhausted(
                    "the coordinator's disk is full; its operator must free space. Nothing \
                     already stored was changed; try again later",
                )
            }
            ServiceError::Store(StoreError::Sled(sled::Error::Io(_))) => {
                tracing::error!(
                    error = %msg,
                    "the database stopped after a failed write. Mend the data_dir's disk and \
                     restart the coordinator; every acknowledged write is on disk"
                );
                Status::unavailable(
                    "the coordinator's database stopped after a failed write; its operator must \
                     restart it. Nothing acknowledged was lost; try again later",
                )
            }
            // Storage trouble is the operator's, not the caller's: say so without details
            // that could help an attacker; the details go to the coordinator's log.
            ServiceError::Store(_) | ServiceError::Io { .. } => {
                tracing::error!(error = %msg, "storage error");
                Status::unavailable("the coordinator cannot write its data; try again later")
            }
        }
    }
    /// Whether the error is "no space left on device", from a file or from the database.
    fn disk_full(&self) -> bool {
        let io = match self {
            ServiceError::Io { source, .. } => Some(source),
            ServiceError::Store(StoreError::Sled(sled::Error::Io(e))) => Some(e),
            _ => None,
        };
        io.is_some_and(|e| e.kind() == std::io::ErrorKind::StorageFull)
    }
}

/// A store error answers a call as the service error it is, so handlers can use `?` on
/// store calls directly.
impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        ServiceError::from(e).into()
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        e.status()
    }
}
