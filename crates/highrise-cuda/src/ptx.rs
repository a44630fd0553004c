//! Reading what a PTX module says of its kernels: entry names, each parameter's type and byte size,
//! the block size a kernel was compiled for (`.maxntid`, from `__launch_bounds__`), and its static
//! shared memory. The real driver needs only the names; the recording driver holds every launch to
//! the rest.

/// One `.entry` of a PTX module.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub name: String,
    /// Each parameter's PTX type (".u64", ".u32", ".f32", ".b8[24]") and size in bytes, in order.
    pub params: Vec<(String, usize)>,
    /// `.maxntid x, y, z`: the most threads per block it may be launched with.
    pub max_threads: Option<(u32, u32, u32)>,
    /// Bytes of `.shared` memory it declares or uses from the module's scope.
    pub static_shared: usize,
}

/// The `.entry` names of a PTX module.
pub fn entries(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|l| l.trim_start().strip_prefix(".visible .entry "))
        .map(|rest| rest.split(['(', ' ']).next().unwrap_or_default().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// `.shared .align A .b8 NAME[N];` -> (NAME, N).
fn shared_decl(line: &str) -> Option<(String, usize)> {
    let rest = line.trim_start().strip_prefix(".shared ")?;
    let decl = rest.split_whitespace().last()?.trim_end_matches(';');
    let (name, count) = decl.split_once('[')?;
    let count: usize = count.trim_end_matches(']').parse().ok()?;
    let unit = if rest.contains(".b8 ") || rest.contains(".u8 ") {
        1
    } else if rest.contains(".b16 ") || rest.contains(".u16 ") {
        2
    } else if rest.contains(".b64 ") || rest.contains(".u64 ") || rest.contains(".f64 ") {
        8
    } else {
        4
    };
    Some((name.to_string(), count * unit))
}

/// Size of a PTX parameter type: `.u64` 8, `.u32`/`.f32` 4, `.b8 name[24]` 24 ...
fn param_size(ty: &str, decl: &str) -> Option<usize> {
    let unit = match ty {
        ".u64" | ".s64" | ".b64" | ".f64" => 8,
        ".u32" | ".s32" | ".b32" | ".f32" => 4,
        ".u16" | ".s16" | ".b16" | ".f16" => 2,
        ".u8" | ".s8" | ".b8" => 1,
        _ => return None,
    };
    match decl.split_once('[') {
        Some((_, n)) => Some(unit * n.trim_end_matches([']', ',', ')']).parse::<usize>().ok()?),
        None => Some(unit),
    }
}

/// Every entry of a PTX module with its parameters, launch bound and shared memory.
pub fn parse(ptx: &str) -> Vec<Entry> {
    let lines: Vec<&str> = ptx.lines().collect();
    let module_shared: Vec<(String, usize)> =
        lines.iter().take_while(|l| !l.contains(".entry ")).filter_map(|l| shared_decl(l)).collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(rest) = lines[i].trim_start().strip_prefix(".visible .entry ") else {
            i += 1;
            continue;
        };
        let name = rest.split(['(', ' ']).next().unwrap_or_default().to_string();
        let mut entry = Entry { name, params: Vec::new(), max_threads: None, static_shared: 0 };
        i += 1;
        // Parameters, one a line, until ")".
        while i < lines.len() && !lines[i].trim_start().starts_with(')') {
            let l = lines[i].trim();
            if let Some(p) = l.strip_prefix(".param ") {
                let words: Vec<&str> = p.split_whitespace().collect();
                // ".param .align 8 .b8 name[24]" or ".param .u64 name".
                let ty = words.iter().find(|w| w.starts_with('.') && !w.starts_with(".align")).copied().unwrap_or("");
                let decl = words.last().copied().unwrap_or("");
                let size = param_size(ty, decl).unwrap_or(0);
                let shown = if decl.contains('[') { format!("{ty}[{size}]") } else { ty.to_string() };
                entry.params.push((shown, size));
            }
            i += 1;
        }
        // Directives, then the body between braces.
        let mut depth = 0i32;
        let mut started = false;
        let mut used = vec![false; module_shared.len()];
        while i < lines.len() {
            let l = lines[i].trim();
            if let Some(n) = l.strip_prefix(".maxntid ") {
                let v: Vec<u32> = n.split(',').filter_map(|x| x.trim().parse().ok()).collect();
                let at = |k: usize| v.get(k).copied().unwrap_or(1);
                entry.max_threads = Some((at(0), at(1), at(2)));
            }
            if let Some((_, bytes)) = shared_decl(l) {
                entry.static_shared += bytes;
            }
            for (u, (name, _)) in used.iter_mut().zip(&module_shared) {
                *u |= l.contains(name.as_str());
            }
            depth += l.matches('{').count() as i32 - l.matches('}').count() as i32;
            started |= l.contains('{');
            i += 1;
            if started && depth <= 0 {
                break;
            }
        }
        entry.static_shared += used.iter().zip(&module_shared).filter(|(u, _)| **u).map(|(_, (_, b))| b).sum::<usize>();
        out.push(entry);
    }
    out
}
