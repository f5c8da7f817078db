//! Integration tests: one binary, one module per area.

mod cli_errors;
mod control;
mod kernel;
mod l7;
mod openai_sdk;
mod resilience;
mod routing;

/// Skips (with a printed reason) or, under CI=true, fails a test that needs
/// root.
macro_rules! require_root {
    () => {
        if !gateway::kernel::testrun::kernel_tests_enabled(module_path!()) {
            return;
        }
    };
}
pub(crate) use require_root;
