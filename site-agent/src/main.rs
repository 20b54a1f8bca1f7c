//! `site-agent`: parses flags, sets up logging and runs the command from the library.

use std::process::ExitCode;

use site_agent::commands::Cli;

/// Training allocates and frees large activation buffers every step; mimalloc keeps freed pages
/// for reuse where the system allocator returns them to the kernel and faults them back in.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long candle's elementwise worker threads spin before parking, unless the operator set
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT`. candle's default (25 000 spins) keeps a worker spinning
/// between the many small ops of a training step, where it takes a core from the rayon threads
/// that run the convolution and batch-norm ops: on 2 cores that cost 20 % of the cycles and a
/// third of full-training throughput (`site-agent bench --config tiny`: 220 -> 310 img/s).
const CANDLE_SPIN_LIMIT: &str = "1000";

/// Also fixes the thread count once, unless the operator set `RAYON_NUM_THREADS`: one thread
/// per physical core, for rayon (the convolution and batch-norm ops) and candle alike, as
/// PyTorch does by default. candle 0.11 otherwise works its count out again at every matmul and
/// pool use, reading /proc/cpuinfo each time (770 reads in a 2-step `tiny` bench; 1.7 % of the
/// cycles of the `resnet103` bench went to the kernel formatting that file).
#[allow(unsafe_code, clippy::disallowed_methods)]
fn tune_candle_thread_pool() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: called first thing in `main`, before this process starts any thread (the
        // allocator starts none), so no other thread can read the environment concurrently.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", CANDLE_SPIN_LIMIT) };
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = num_cpus::get_physical().max(1).to_string();
        // SAFETY: as above, no other thread exists yet.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads) };
    }
}

fn main() -> ExitCode {
    tune_candle_thread_pool();
    site_agent::memory::keep_freed_pages();
    let cli: Cli = match shared::cli::parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    shared::cli::init_tracing(&cli.log);
    // One crypto provider for every TLS connection of the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match site_agent::commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
