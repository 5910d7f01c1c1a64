//! Build identity for `vigil_exporter_build_info{revision, rustc}`: the git commit
//! the exporter was built from (`VIGIL_BUILD_REVISION` overrides it, e.g. in an image
//! build without `.git`), and the compiler's version.

use std::process::Command;

fn run(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=VIGIL_BUILD_REVISION");
    println!("cargo:rerun-if-changed=../.git/HEAD");
    if let Some(r) = run("git", &["symbolic-ref", "-q", "HEAD"]) {
        println!("cargo:rerun-if-changed=../.git/{r}");
    }
    let revision = std::env::var("VIGIL_BUILD_REVISION")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| run("git", &["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = run(&rustc, &["--version"])
        .and_then(|v| v.split_whitespace().nth(1).map(str::to_string))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=VIGIL_BUILD_REVISION={revision}");
    println!("cargo:rustc-env=VIGIL_BUILD_RUSTC={version}");
}
