//! `cargo xtask fuzz`: runs the cargo-fuzz targets of `fuzz/` with nightly,
//! each for a fixed time over its working corpus and its committed seeds,
//! and fails with the path of the input when a target crashes. `cargo xtask
//! test` runs the same function for a few seconds per target.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::util::{self, step};

/// The targets in fuzz/fuzz_targets, in the order they run.
pub const TARGETS: &[&str] = &[
    "request_json",
    "form",
    "sse_usage",
    "config",
    "packet",
    "h1_response",
    "h1_request",
];
/// Seconds per target for `cargo xtask fuzz`.
pub const DEFAULT_SECONDS: u64 = 60;
/// Seconds per target in `cargo xtask test`: a smoke pass that keeps CI short.
pub const TEST_SECONDS: u64 = 5;

fn fuzz_dir() -> PathBuf {
    util::root().join("fuzz")
}

/// `cargo +nightly fuzz <args>` in fuzz/. cargo-fuzz needs nightly for the
/// sanitizer flags; the rustup proxy resolves `+nightly`, so this is the
/// `cargo` on PATH rather than the stable one running xtask.
fn cargo_fuzz(args: &[&str]) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg("+nightly")
        .arg("fuzz")
        .args(args)
        .current_dir(fuzz_dir());
    cmd
}

/// Builds every target, so the timed runs spend their time fuzzing.
pub fn build() -> Result<()> {
    step("fuzz: build the targets (nightly, AddressSanitizer)");
    let mut cmd = cargo_fuzz(&["build"]);
    let status = cmd
        .status()
        .context("starting `cargo +nightly fuzz build`; `cargo xtask setup` installs cargo-fuzz")?;
    if !status.success() {
        bail!("`cargo +nightly fuzz build` (in fuzz/) failed with {status}");
    }
    Ok(())
}

/// What one run reported.
struct Outcome {
    target: String,
    /// libFuzzer's `Done N runs in S second(s)`, as (runs, seconds).
    done: Option<(u64, u64)>,
    /// libFuzzer's final status line (`#N DONE cov: ... corp: ...`).
    last: Option<String>,
    /// The input a crash, timeout or out-of-memory was written to.
    artifact: Option<String>,
    success: bool,
}

/// Builds, then runs each of `targets` (all when empty) for `seconds`.
/// Every target runs even after one crashes; the error lists them all.
pub fn run(targets: &[String], seconds: u64) -> Result<()> {
    let targets: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    if let Some(t) = targets.iter().find(|t| !TARGETS.contains(t)) {
        bail!(
            "unknown fuzz target {t:?}; the targets are {}",
            TARGETS.join(", ")
        );
    }
    build()?;
    let mut outcomes = Vec::new();
    for t in targets {
        step(&format!("fuzz: {t} for {seconds} s"));
        outcomes.push(run_one(t, seconds)?);
    }

    step("fuzz: summary");
    for o in &outcomes {
        let rate = match o.done {
            Some((runs, secs)) => {
                format!("{runs} runs in {secs} s ({} exec/s)", runs / secs.max(1))
            }
            None => "no libFuzzer summary".into(),
        };
        let state = if o.success { "ok" } else { "FAILED" };
        eprintln!("fuzz: {:<13} {state:<6} {rate}", o.target);
        if let Some(l) = &o.last {
            eprintln!("      {l}");
        }
    }
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| !o.success).collect();
    if failed.is_empty() {
        return Ok(());
    }
    for o in &failed {
        match &o.artifact {
            Some(a) => eprintln!(
                "\nfuzz: {t} failed on the input in {a}\n  reproduce: cargo +nightly fuzz run {t} {a}\n  \
                 then copy it to fuzz/seeds/{t}/ and add a unit test next to the code that reproduces it \
                 (README.md, \"Fuzzing\")",
                t = o.target
            ),
            None => eprintln!(
                "\nfuzz: {} failed without writing an input; see its output above",
                o.target
            ),
        }
    }
    bail!(
        "fuzzing failed: {}",
        failed
            .iter()
            .map(|o| o.target.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// `cargo fuzz run <target> corpus/<target> seeds/<target> -- -max_total_time=N
/// [-dict=dicts/<target>.dict]`. libFuzzer writes new inputs to the first
/// corpus directory only, so the committed seeds stay as they are.
fn run_one(target: &str, seconds: u64) -> Result<Outcome> {
    let dir = fuzz_dir();
    let corpus = dir.join("corpus").join(target);
    let seeds = dir.join("seeds").join(target);
    std::fs::create_dir_all(&corpus)
        .with_context(|| format!("creating the corpus directory {}", corpus.display()))?;
    let mut libfuzzer = vec![format!("-max_total_time={seconds}")];
    let dict = dir.join("dicts").join(format!("{target}.dict"));
    if dict.exists() {
        libfuzzer.push(format!("-dict={}", dict.display()));
    }
    let mut child = cargo_fuzz(&["run", target])
        .arg(&corpus)
        .arg(&seeds)
        .arg("--")
        .args(&libfuzzer)
        .stderr(Stdio::piped())
        .spawn()
        .context("starting `cargo +nightly fuzz run`")?;
    let mut outcome = Outcome {
        target: target.to_owned(),
        done: None,
        last: None,
        artifact: None,
        success: false,
    };
    // Echo libFuzzer's output as it comes and keep the lines that matter.
    let stderr = child.stderr.take().expect("piped stderr");
    for line in BufReader::new(stderr).lines() {
        let line = line.context("reading the fuzzer's output")?;
        eprintln!("{line}");
        if let Some(d) = parse_done(&line) {
            outcome.done = Some(d);
        } else if line.starts_with('#') && line.split_whitespace().nth(1) == Some("DONE") {
            outcome.last = Some(line.clone());
        } else if let Some((_, path)) = line.split_once("Test unit written to ") {
            outcome.artifact = Some(shown_path(&dir, path.trim()));
        }
    }
    let status = child.wait().context("waiting for the fuzzer")?;
    outcome.success = status.success();
    Ok(outcome)
}

/// `Done 1234 runs in 5 second(s)` -> (1234, 5).
fn parse_done(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("Done ")?;
    let (runs, rest) = rest.split_once(" runs in ")?;
    let secs = rest.split_whitespace().next()?;
    Some((runs.parse().ok()?, secs.parse().ok()?))
}

/// An artifact path relative to the workspace root when it is inside it.
fn shown_path(fuzz_dir: &Path, path: &str) -> String {
    let p = fuzz_dir.join(path);
    match p.strip_prefix(util::root()) {
        Ok(rel) => rel.display().to_string(),
        Err(_) => p.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_summary() {
        assert_eq!(
            parse_done("Done 1048576 runs in 21 second(s)"),
            Some((1048576, 21))
        );
        assert_eq!(parse_done("#2 INITED cov: 10 ft: 10 corp: 1/1b"), None);
    }
}
