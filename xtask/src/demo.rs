//! `cargo xtask demo`: the README's first command. Builds nixb, then adds the bundled example
//! (`examples/hello`) to a demo store under `./demo-store` and realises it, printing every
//! nixb command it runs so the session can be repeated by hand.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

pub fn run(_args: &[String]) -> Result<()> {
    let root = crate::workspace_root();
    let nixb = crate::build_nixb(&root)?;
    let demo = std::env::current_dir()?.join("demo-store");
    let env = Env::new(&demo)?;
    eprintln!("demo store: {} (remove it to start afresh)", demo.display());
    for (k, v) in env.vars() {
        eprintln!("  export {k}={v}");
    }

    let ex = root.join("examples/hello");
    let builder = env.nixb(
        &nixb,
        &["add", &ex.join("builder.sh").display().to_string()],
        None,
    )?;
    let greeting_json =
        std::fs::read_to_string(ex.join("greeting.drv.json"))?.replace("@builder@", &builder);
    let greeting_drv = env.nixb(&nixb, &["derivation", "add"], Some(&greeting_json))?;
    let greeting_out = env.nixb(&nixb, &["query", "--outputs", &greeting_drv], None)?;
    let hello_json = std::fs::read_to_string(ex.join("hello.drv.json"))?
        .replace("@builder@", &builder)
        .replace("@greeting.drv@", &greeting_drv)
        .replace("@greeting@", &greeting_out);
    let hello_drv = env.nixb(&nixb, &["derivation", "add"], Some(&hello_json))?;
    let hello_out = env.nixb(&nixb, &["realise", &hello_drv], None)?;
    env.nixb(&nixb, &["query", "--requisites", &hello_out], None)?;
    env.nixb(&nixb, &["log", &hello_drv], None)?;
    let ran = Command::new(Path::new(&hello_out).join("bin/hello")).output()?;
    eprintln!("+ {hello_out}/bin/hello");
    print!("{}", String::from_utf8_lossy(&ran.stdout));
    Ok(())
}

struct Env {
    vars: Vec<(&'static str, String)>,
}

impl Env {
    fn new(demo: &Path) -> Result<Env> {
        let conf = demo.join("etc");
        std::fs::create_dir_all(&conf).with_context(|| format!("creating {}", conf.display()))?;
        let nix_conf = conf.join("nix.conf");
        if !nix_conf.exists() {
            std::fs::write(
                &nix_conf,
                "# demo store settings\nsandbox = false\nbuild-users-group =\n",
            )?;
        }
        let p = |s: &str| demo.join(s).display().to_string();
        Ok(Env {
            vars: vec![
                ("NIX_STORE_DIR", p("store")),
                ("NIX_STATE_DIR", p("state")),
                ("NIX_LOG_DIR", p("log")),
                ("NIX_CONF_DIR", p("etc")),
            ],
        })
    }

    fn vars(&self) -> impl Iterator<Item = &(&'static str, String)> {
        self.vars.iter()
    }

    /// Runs nixb, echoing the command; returns its trimmed stdout (also echoed).
    fn nixb(&self, nixb: &PathBuf, args: &[&str], stdin: Option<&str>) -> Result<String> {
        eprintln!(
            "+ nixb {}{}",
            args.join(" "),
            if stdin.is_some() { " < <json>" } else { "" }
        );
        let mut cmd = Command::new(nixb);
        cmd.args(args).envs(self.vars.iter().map(|(k, v)| (k, v)));
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        cmd.stdout(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("running {}", nixb.display()))?;
        if let Some(text) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .context("stdin")?
                .write_all(text.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        print!("{stdout}");
        if !out.status.success() {
            bail!("nixb {} failed ({})", args.join(" "), out.status);
        }
        Ok(stdout.lines().last().unwrap_or("").trim().to_string())
    }
}
