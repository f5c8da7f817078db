//! Error kinds that decide the process exit code: a `UsageError` (bad input,
//! bad config, wrong environment the operator must fix) exits 2; anything
//! else exits 1.

/// An error caused by what the operator asked for; exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Exit code for an error chain.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    if e.chain()
        .any(|c| c.is::<UsageError>() || c.is::<crate::config::ConfigError>())
    {
        2
    } else {
        1
    }
}
