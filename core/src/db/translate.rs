//! Driver errors to [`Error`].

use tokio_postgres::error::SqlState;

use crate::error::Error;

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Error {
        let Some(db) = e.as_db_error() else {
            // No server response: the socket closed, timed out or never opened.
            return Error::ConnectionFailed {
                message: error_chain(&e),
            };
        };
        let message = db.message().to_owned();
        let code = db.code();
        if *code == SqlState::QUERY_CANCELED {
            Error::StatementTimeout { message }
        } else if *code == SqlState::T_R_SERIALIZATION_FAILURE || *code == SqlState::T_R_DEADLOCK_DETECTED {
            Error::TransactionConflict { message }
        } else if *code == SqlState::UNDEFINED_TABLE || *code == SqlState::UNDEFINED_FUNCTION {
            Error::SchemaNotReady { message }
        } else if code.code() == "SY001" {
            // migrations/repeatable/70_erasure.sql
            Error::UserBeingErased { message }
        } else if code.code() == "SY002" {
            // migrations/repeatable/70_erasure.sql: "stream <uuid> was deleted: ..."
            match message.split(' ').nth(1).and_then(|id| uuid::Uuid::parse_str(id).ok()) {
                Some(aggregate_id) => Error::StreamDeleted { aggregate_id },
                None => Error::Database {
                    sqlstate: code.code().to_owned(),
                    message,
                },
            }
        } else if *code == SqlState::INSUFFICIENT_PRIVILEGE {
            Error::PermissionDenied { message }
        } else if code.code().starts_with("08")
            || *code == SqlState::ADMIN_SHUTDOWN
            || *code == SqlState::CRASH_SHUTDOWN
            || *code == SqlState::CANNOT_CONNECT_NOW
            || *code == SqlState::TOO_MANY_CONNECTIONS
        {
            Error::ConnectionFailed { message }
        } else {
            Error::Database {
                sqlstate: code.code().to_owned(),
                message,
            }
        }
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Error {
        use deadpool_postgres::PoolError;
        match e {
            PoolError::Backend(e) => e.into(),
            PoolError::Timeout(_) => Error::PoolTimeout { timeout_ms: 0 },
            PoolError::Closed => Error::ConnectionFailed {
                message: "the repository was closed".into(),
            },
            other => Error::ConnectionFailed {
                message: other.to_string(),
            },
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}
