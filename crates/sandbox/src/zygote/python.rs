//! A minimal binding to an embedded CPython, loaded with `dlopen` at run time.
//!
//! The server binary does not link libpython: only the zygote process loads it, from the
//! interpreter the runtime was provisioned with. We need a handful of entry points (start the
//! interpreter, run source text, and the three fork hooks), so a hand-written table over
//! `libloading` is smaller and more portable across Python versions than a full binding such as
//! pyo3, which cannot load libpython lazily.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CString};
use std::path::Path;

use libloading::os::unix::{Library, Symbol, RTLD_GLOBAL, RTLD_NOW};

/// Failure to load or drive the embedded interpreter.
#[derive(Debug, thiserror::Error)]
pub enum PythonError {
    #[error("cannot load {path}")]
    Load { path: String, source: libloading::Error },
    #[error("python source raised an exception (traceback on the zygote's stderr)")]
    Raised,
    #[error("python source contains a NUL byte")]
    Nul,
}

/// The loaded interpreter library and the entry points we call.
pub struct EmbeddedPython {
    // Kept alive for the life of the process: the symbols below point into it.
    _library: Library,
    initialize_ex: Symbol<unsafe extern "C" fn(c_int)>,
    run_simple_string_flags: Symbol<unsafe extern "C" fn(*const c_char, *mut c_void) -> c_int>,
    before_fork: Symbol<unsafe extern "C" fn()>,
    after_fork_parent: Symbol<unsafe extern "C" fn()>,
    after_fork_child: Symbol<unsafe extern "C" fn()>,
}

impl EmbeddedPython {
    /// Loads libpython. `RTLD_GLOBAL` is required: extension modules such as numpy's resolve the
    /// C API against the global symbol namespace instead of linking libpython themselves.
    pub fn load(libpython: &Path) -> Result<EmbeddedPython, PythonError> {
        let load_err = |source| PythonError::Load { path: libpython.display().to_string(), source };
        // SAFETY: loading libpython runs only its ELF constructors, which have no preconditions;
        // the symbol types below match the CPython stable C API signatures.
        unsafe {
            let library = Library::open(Some(libpython), RTLD_NOW | RTLD_GLOBAL).map_err(load_err)?;
            let initialize_ex = library.get(b"Py_InitializeEx\0").map_err(load_err)?;
            let run_simple_string_flags = library.get(b"PyRun_SimpleStringFlags\0").map_err(load_err)?;
            let before_fork = library.get(b"PyOS_BeforeFork\0").map_err(load_err)?;
            let after_fork_parent = library.get(b"PyOS_AfterFork_Parent\0").map_err(load_err)?;
            let after_fork_child = library.get(b"PyOS_AfterFork_Child\0").map_err(load_err)?;
            Ok(EmbeddedPython {
                _library: library,
                initialize_ex,
                run_simple_string_flags,
                before_fork,
                after_fork_parent,
                after_fork_child,
            })
        }
    }

    /// Starts the interpreter without installing Python's own signal handlers (the zygote keeps
    /// control of its signals). `PYTHONHOME` and friends must already be in the environment.
    pub fn initialize(&self) {
        // SAFETY: called once, from the only thread, before any other Python call.
        unsafe { (self.initialize_ex)(0) }
    }

    /// Runs Python source in `__main__`. An exception prints its traceback to stderr.
    pub fn run(&self, source: &str) -> Result<(), PythonError> {
        let source = CString::new(source).map_err(|_| PythonError::Nul)?;
        // SAFETY: the interpreter is initialized and this thread holds the GIL (the zygote and
        // its children only ever run Python on their main thread).
        let rc = unsafe { (self.run_simple_string_flags)(source.as_ptr(), std::ptr::null_mut()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(PythonError::Raised)
        }
    }

    /// Must be called right before `fork`.
    pub fn before_fork(&self) {
        // SAFETY: main thread, GIL held.
        unsafe { (self.before_fork)() }
    }

    /// Must be called in the parent right after `fork`.
    pub fn after_fork_parent(&self) {
        // SAFETY: main thread, GIL held, paired with `before_fork`.
        unsafe { (self.after_fork_parent)() }
    }

    /// Must be called in the child after `fork`, before running any Python.
    pub fn after_fork_child(&self) {
        // SAFETY: the child is single-threaded and inherited the GIL from the forking thread.
        unsafe { (self.after_fork_child)() }
    }
}
