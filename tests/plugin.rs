//! The plugin ABI's failure modes: each is an error naming the file (and versions), never an abort.

mod common;

use std::path::PathBuf;

use highrise::core::plugin::{self, Plugin, ABI_VERSION};
use highrise::core::{DType, Error, Tensor};

/// A fixture plugin built by cargo beside the test binary (they are dev-dependencies).
fn fixture(name: &str) -> PathBuf {
    let deps = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    deps.join(format!("{}{name}{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX))
}

#[test]
fn cpu_plugin_is_found_by_name_and_usable() {
    let path = plugin::find_backend("cpu").expect("cargo builds libhighrise_cpu before the tests");
    let p = Plugin::open(&path).unwrap();
    assert_eq!(p.name(), "cpu");
    p.probe().unwrap();
    let b = p.create().unwrap();
    assert!(b.info().device.contains("threads"), "{}", b.info().device);
}

#[test]
fn backend_dir_env_is_searched_first() {
    let dir = std::env::temp_dir().join(format!("highrise-plugin-dir-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = plugin::backend_file_name("fixturecopy");
    std::fs::copy(fixture("panicking_plugin"), dir.join(&file)).unwrap();
    // Only this test touches the variable, and it is read by this thread's calls alone.
    std::env::set_var("HIGHRISE_BACKEND_DIR", &dir);
    let found = plugin::find_backend("fixturecopy");
    std::env::remove_var("HIGHRISE_BACKEND_DIR");
    assert_eq!(found.unwrap(), dir.join(file));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn unknown_backend_name_lists_where_it_looked() {
    let err = highrise::load_backend("nosuch").err().expect("no such backend");
    let msg = err.to_string();
    assert!(matches!(err, Error::NotFound { .. }), "{msg}");
    assert!(msg.contains("libhighrise_nosuch.so") && msg.contains("HIGHRISE_BACKEND_DIR"), "{msg}");
}

#[test]
fn missing_file_is_an_error_naming_it() {
    let path = "/nonexistent/dir/libhighrise_cpu.so";
    let err = highrise::load_backend(path).err().expect("missing file");
    let msg = err.to_string();
    assert!(matches!(err, Error::Plugin { .. }), "{msg}");
    assert!(msg.contains(path) && msg.contains("no such file"), "{msg}");
}

#[test]
fn library_without_entry_symbol_is_refused() {
    // Any shared library that is not a highrise plugin: the C library this test already has mapped.
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let libc = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.contains("/libc.so") || p.contains("/libc-"))
        .expect("libc mapped");
    let err = Plugin::open(libc.as_ref()).err().expect("libc is no plugin");
    let msg = err.to_string();
    assert!(msg.contains(libc) && msg.contains("highrise_backend_entry"), "{msg}");
}

#[test]
fn different_abi_version_is_refused_naming_both() {
    let path = fixture("abi_mismatch_plugin");
    let err = Plugin::open(&path).err().expect("version differs");
    let msg = err.to_string();
    match err {
        Error::AbiMismatch { expected, found, .. } => {
            assert_eq!(expected, ABI_VERSION);
            assert_eq!(found, abi_mismatch_plugin::CLAIMED_VERSION);
        }
        other => panic!("expected AbiMismatch, got {other}"),
    }
    let path = path.display().to_string();
    assert!(msg.contains(&path), "{msg}");
    assert!(msg.contains(&ABI_VERSION.to_string()), "{msg}");
    assert!(msg.contains(&abi_mismatch_plugin::CLAIMED_VERSION.to_string()), "{msg}");
}

#[test]
fn panic_inside_plugin_becomes_an_error_and_the_process_carries_on() {
    let backend = highrise::load_backend(fixture("panicking_plugin").to_str().unwrap()).unwrap();
    let x = Tensor::empty(&backend, DType::F32, &[2, 4]).unwrap();
    let w = Tensor::empty(&backend, DType::F32, &[4]).unwrap();
    for _ in 0..3 {
        let mut out = Tensor::empty(&backend, DType::F32, &[2, 4]).unwrap();
        let err = backend.rms_norm(&mut out, &x, &w, 1e-5).unwrap_err();
        assert!(matches!(err, Error::Panic(_)), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("panicking") && msg.contains("deliberate panic in rms_norm"), "{msg}");
    }
    // The host's other backend still works.
    let cpu = common::cpu();
    let t = Tensor::from_f32(&cpu, DType::F32, &[2], &[1.0, 2.0]).unwrap();
    assert_eq!(t.to_f32().unwrap(), vec![1.0, 2.0]);
}

#[test]
fn library_stays_loaded_while_its_tensors_live() {
    let backend = highrise::load_backend("cpu").unwrap();
    let t = Tensor::from_f32(&backend, DType::F32, &[3], &[1.0, 2.0, 3.0]).unwrap();
    drop(backend);
    // The tensor holds the backend, and the backend the library: reading still calls into it.
    assert_eq!(t.to_f32().unwrap(), vec![1.0, 2.0, 3.0]);
}
