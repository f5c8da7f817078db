//! CLI commands answered by the running daemon over the admin socket:
//! `gateway reload` and `gateway backends ...`.

use anyhow::{bail, Result};

use super::output;
use crate::{
    admin::{self, Reply, Request},
    config::Config,
    error::UsageError,
};

fn ask(cfg: &Config, req: Request) -> Result<Reply> {
    let path = &cfg.server.admin_socket;
    match admin::call(path, &req)? {
        Some(r) => Ok(r),
        None => bail!(
            "no gateway daemon answers on {} (server.admin_socket): is `gateway run` running with this --config?",
            path.display()
        ),
    }
}

pub fn reload(cfg: &Config) -> Result<()> {
    let r = ask(cfg, Request::Reload)?;
    if !r.ok {
        for e in &r.errors {
            eprintln!("  {e}");
        }
        return Err(UsageError(format!(
            "reload rejected ({} problem(s)); the old config keeps serving",
            r.errors.len()
        ))
        .into());
    }
    for n in r.data["notes"].as_array().into_iter().flatten() {
        println!("{}", n.as_str().unwrap_or_default());
    }
    Ok(())
}

pub fn backends_list(cfg: &Config, json: bool) -> Result<()> {
    let r = ask(cfg, Request::Backends)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r.data)?);
        return Ok(());
    }
    let mut t = vec![[
        "MODEL",
        "BACKEND",
        "WEIGHT",
        "IN FLIGHT",
        "MAX",
        "STATE",
        "HEALTH",
        "FAILURES",
    ]
    .map(String::from)
    .to_vec()];
    for b in r.data.as_array().into_iter().flatten() {
        let s = |k: &str| match &b[k] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => "-".into(),
            v => v.to_string(),
        };
        t.push(vec![
            s("model"),
            s("url"),
            s("weight"),
            s("in_flight"),
            s("max_connections"),
            s("state"),
            s("health"),
            s("consecutive_failures"),
        ]);
    }
    output::table(
        &mut output::Io {
            out: &mut std::io::stdout(),
            err: &mut std::io::stderr(),
        },
        &t,
    )?;
    Ok(())
}

pub fn drain(cfg: &Config, url: &str, on: bool) -> Result<()> {
    let r = ask(
        cfg,
        Request::Drain {
            url: url.to_owned(),
            on,
        },
    )?;
    if !r.ok {
        let why = r.errors.join("; ");
        return Err(if r.data["usage"] == true {
            UsageError(why).into()
        } else {
            anyhow::anyhow!(why)
        });
    }
    println!("{} {url}", if on { "drained" } else { "undrained" });
    Ok(())
}
