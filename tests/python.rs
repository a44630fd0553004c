//! The Python package's own tests (crates/highrise-py/tests, pytest), run against this build: the
//! extension is built (cargo, the same profile), staged beside the package's Python sources in a
//! temporary folder, and put first on PYTHONPATH, so an older installed copy cannot stand in for it.
//! Skipped, saying why, where python3 lacks numpy or pytest (`.ci/run` installs them).

use std::path::{Path, PathBuf};
use std::process::Command;

fn python_with(modules: &[&str]) -> Result<(), String> {
    let probe = format!("import {}", modules.join(", "));
    match Command::new("python3").args(["-c", &probe]).output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("").to_string()),
        Err(e) => Err(format!("python3: {e}")),
    }
}

#[test]
fn python_package_tests_pass() {
    if let Err(why) = python_with(&["numpy", "pytest"]) {
        println!("skipped: the Python package's tests need python3 with numpy and pytest ({why})");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let release = !cfg!(debug_assertions);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "--workspace", "--all-targets"]).current_dir(root);
    if release {
        build.arg("--release");
    }
    let status = build.status().expect("run cargo");
    assert!(status.success(), "building the extension failed");

    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    let profile = target.join(if release { "release" } else { "debug" });
    let stage = std::env::temp_dir().join(format!("highrise-py-test-{}", std::process::id()));
    let pkg = stage.join("highrise");
    std::fs::create_dir_all(&pkg).unwrap();
    for entry in std::fs::read_dir(root.join("crates/highrise-py/python/highrise")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, pkg.join(path.file_name().unwrap())).unwrap();
    }
    std::fs::copy(profile.join("lib_highrise.so"), pkg.join("_highrise.abi3.so")).unwrap();

    let out = Command::new("python3")
        .args(["-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "crates/highrise-py/tests"])
        .current_dir(root)
        .env("PYTHONPATH", &stage)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("HIGHRISE_BIN", profile.join("highrise"))
        .output()
        .expect("run pytest");
    let _ = std::fs::remove_dir_all(&stage);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(out.status.success(), "pytest failed:\n{text}");
    assert!(text.contains(" passed"), "pytest ran nothing:\n{text}");
}
