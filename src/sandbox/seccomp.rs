//! Installing an allow-list (libseccomp, as the embedded virtiofsd uses).

/// The number of system call `name` on this architecture.
pub(super) fn resolve(name: &str) -> Option<i32> {
    let cname = std::ffi::CString::new(name).ok()?;
    // SAFETY: `cname` is a valid NUL-terminated string for the call.
    let nr = unsafe { libseccomp_sys::seccomp_syscall_resolve_name(cname.as_ptr()) };
    (nr != libseccomp_sys::__NR_SCMP_ERROR).then_some(nr)
}

/// A seccomp allow-list (libseccomp, as the embedded virtiofsd uses):
/// anything not allowed kills the whole process.
#[derive(Debug, Default)]
pub struct Filter {
    rules: Vec<(String, Vec<(u32, u64)>)>,
}

impl Filter {
    pub fn new() -> Filter {
        Filter::default()
    }

    /// Allow each of `names` with any arguments.
    pub fn allow(mut self, names: &[&str]) -> Filter {
        self.rules
            .extend(names.iter().map(|n| (n.to_string(), Vec::new())));
        self
    }

    /// Allow `name` only when each `(argument index, value)` holds.
    pub fn allow_if(mut self, name: &str, args: &[(u32, u64)]) -> Filter {
        self.rules.push((name.to_string(), args.to_vec()));
        self
    }

    /// Install the filter on the calling thread and every thread it starts
    /// later (call before the process starts any).
    pub fn load(&self) -> std::io::Result<()> {
        use libseccomp_sys::*;
        // SAFETY: seccomp_init allocates a filter context or returns null;
        // it is released below on every path.
        let ctx = unsafe { seccomp_init(SCMP_ACT_KILL_PROCESS) };
        if ctx.is_null() {
            return Err(std::io::Error::other("seccomp_init failed"));
        }
        let mut result = Ok(());
        for (name, args) in &self.rules {
            // A name that is no system call here is a mistake in a list:
            // refused, not skipped (a skipped call would kill the helper
            // later, unexplained).
            let Some(nr) = resolve(name) else {
                result = Err(std::io::Error::other(format!(
                    "seccomp: {name:?} is not a system call on this architecture"
                )));
                break;
            };
            let cmps: Vec<scmp_arg_cmp> = args
                .iter()
                .map(|&(arg, datum)| scmp_arg_cmp {
                    arg,
                    op: scmp_compare::SCMP_CMP_EQ,
                    datum_a: datum,
                    datum_b: 0,
                })
                .collect();
            // SAFETY: `ctx` is a live filter context and `cmps` holds
            // exactly `cmps.len()` comparisons for the call to read.
            let rc = unsafe {
                seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, nr, cmps.len() as u32, cmps.as_ptr())
            };
            if rc < 0 {
                result = Err(std::io::Error::other(format!(
                    "seccomp: cannot allow {name}"
                )));
                break;
            }
        }
        if result.is_ok() {
            // SAFETY: `ctx` is a live, complete filter context.
            let rc = unsafe { seccomp_load(ctx) };
            if rc < 0 {
                result = Err(std::io::Error::from_raw_os_error(-rc));
            }
        }
        // SAFETY: `ctx` came from seccomp_init and is not used after this.
        unsafe { seccomp_release(ctx) };
        result
    }
}
