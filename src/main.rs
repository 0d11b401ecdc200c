//! The `prelu` binary: the command line of the library ([`prelu::cli`]),
//! with the library's allocator. Every command has `--json` (one JSON
//! object on stdout at the end, errors too) and shows progress on stderr.

use std::process::ExitCode;

#[global_allocator]
static ALLOC: prelu::memory::HugePageAlloc = prelu::memory::HugePageAlloc;

fn main() -> ExitCode {
    // A closed stdout (`prelu ... | head`) ends the process quietly, as for
    // any Unix tool, instead of a panic in println!. Everything a command
    // saves is written before its output is printed.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    ExitCode::from(prelu::cli::main_with_args(std::env::args_os().collect()))
}
